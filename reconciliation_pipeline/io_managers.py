"""The run-scoped IO manager: op outputs as Parquet, BSON and JSON files, never pickles.

Each output is a directory `<base>/<run_id>/<step key>/<output name>[/<mapping key>]` holding a
`value.json` manifest and one file per DataFrame (`<n>.parquet`) or list of MongoDB documents
(`<n>.bson`). Frames keep their dtypes (Int64, tz-aware datetimes, object columns with None):
object columns of strings are Arrow strings, any other object column is stored cell by cell as
tagged JSON (BSON for MongoDB's own types). Only the pipeline's own dataclasses are rebuilt. A successful run's files are dropped by
`finish_report` (see `RunFilesIOManager.drop_run`); a failed run's stay for re-execution from failure.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import bson
import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from bson.codec_options import CodecOptions
from pydantic import Field

from reconciliation_pipeline.core.frames import held_once, share_strings

MANIFEST = "value.json"
# What pymongo hands the pipeline (MongoResource: tz_aware=True), so decoded documents are the same objects.
BSON_OPTIONS = CodecOptions(tz_aware=True)
DATACLASS_MODULES = ("reconciliation_pipeline.",)  # only these classes are rebuilt from a manifest
REPORT_TABLE = "reconciliation_reports"
RUN_FILES_DIR = "run_outputs"


# --- values <-> files ---------------------------------------------------------------------------


class _Writer:
    def __init__(self, directory: Path):
        self.directory, self.count = directory, 0

    def file(self, suffix: str) -> str:
        self.count += 1
        return f"{self.count}.{suffix}"


def _column_codec(values: pd.Series) -> str:
    """arrow (pyarrow and pandas metadata keep the dtype), strings (object column of str and None) or json (per cell)."""
    if values.dtype != object:
        return "arrow"
    present = values[values.map(lambda v: v is not None)]
    return "strings" if present.map(type).eq(str).all() else "json"


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """One Parquet file; object columns outside pandas' metadata, their codec in the schema metadata."""
    if not frame.columns.is_unique or not all(isinstance(c, str) for c in frame.columns):
        raise TypeError("frame columns must be unique strings to be stored as Parquet")
    codecs = {c: _column_codec(frame[c]) for c in frame.columns}
    arrow_cols = [c for c, codec in codecs.items() if codec == "arrow"]
    table = pa.Table.from_pandas(frame[arrow_cols], preserve_index=None)
    for column, codec in codecs.items():
        if codec == "strings":
            table = table.append_column(pa.field(column, pa.string()), pa.array(frame[column].to_numpy(object), pa.string()))
        elif codec == "json":
            cells = [json.dumps(encode_json(v)) for v in frame[column].to_numpy(object)]
            table = table.append_column(pa.field(column, pa.string()), pa.array(cells, pa.string()))
    info = {"columns": list(frame.columns), "codecs": codecs, "rows": len(frame), "attrs": encode_json(frame.attrs)}
    meta = {**(table.schema.metadata or {}), b"reconciliation": json.dumps(info).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)


def read_frame(path: Path) -> pd.DataFrame:
    """The frame `write_frame` stored: same columns, order, dtypes, index and values."""
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[b"reconciliation"])
    others = [c for c, codec in info["codecs"].items() if codec != "arrow"]
    frame = table.drop_columns(others).to_pandas()
    if len(frame) != info["rows"]:  # no Arrow column: the index alone does not carry the length
        frame = pd.DataFrame(index=pd.RangeIndex(info["rows"]))
    for column in others:
        values = table.column(column).to_numpy(zero_copy_only=False)
        if info["codecs"][column] == "json":
            values = np.array([decode_json(json.loads(v)) for v in values] + [None], dtype=object)[:-1]
        else:
            # Arrow hands back a new str object a row; the extract held each distinct string once (a
            # million emails name a few thousand creditors), and memory at 1M emails depends on it
            values = held_once(values)
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    frame = frame[info["columns"]]
    frame.attrs = decode_json(info["attrs"])
    # the same for pandas string columns, which Arrow rebuilds a str object a row
    return share_strings(frame, [c for c in frame.columns if isinstance(frame[c].dtype, pd.StringDtype)])


def _tz_name(tz: Any) -> str | None:
    if tz is None:
        return None
    if isinstance(tz, ZoneInfo):
        return tz.key
    if isinstance(tz, timezone):
        return "fixed"  # the ISO offset says it; fromisoformat rebuilds timezone(offset) (timezone.utc for +00:00)
    raise TypeError(f"datetime with tzinfo {type(tz).__name__} cannot be stored")


def encode_json(value: Any, writer: _Writer | None = None) -> Any:
    """A JSON-able form of `value` (frames and document lists go to files through `writer`)."""
    if value is None or isinstance(value, (bool, str)) or type(value) is int:
        return value
    if value is pd.NA or value is pd.NaT:
        return {"$missing": "NA" if value is pd.NA else "NaT"}
    if type(value) is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, datetime) and value.tzinfo is not None and not isinstance(value.tzinfo, (timezone, ZoneInfo)):
        return _bson(value)  # e.g. bson's utc of a pymongo document
    if isinstance(value, pd.Timestamp):
        return {"$timestamp": value.isoformat(), "tz": _tz_name(value.tzinfo), "unit": value.unit}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat(), "tz": _tz_name(value.tzinfo)}
    if writer is not None and isinstance(value, pd.DataFrame):
        name = writer.file("parquet")
        write_frame(value, writer.directory / name)
        return {"$frame": name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith(DATACLASS_MODULES):
            raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a pipeline dataclass")
        fields = {f.name: encode_json(getattr(value, f.name), writer) for f in dataclasses.fields(value)}
        return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, (tuple, frozenset, set)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return {f"${type(value).__name__}": [encode_json(v, writer) for v in items]}
    if isinstance(value, list):
        if writer is not None and value and all(type(v) is dict for v in value):
            name = writer.file("bson")  # MongoDB documents: BSON keeps ObjectId, datetime, Decimal128, int64
            (writer.directory / name).write_bytes(b"".join(bson.encode(v) for v in value))
            return {"$documents": name}
        return [encode_json(v, writer) for v in value]
    if type(value) is dict:
        if all(isinstance(k, str) for k in value):
            return {"$dict": {k: encode_json(v, writer) for k, v in value.items()}}
        return {"$items": [[encode_json(k, writer), encode_json(v, writer)] for k, v in value.items()]}
    return _bson(value)


def _bson(value: Any) -> dict[str, str]:
    """BSON types (ObjectId, Decimal128, Int64, ...) as they come from pymongo."""
    try:
        return {"$bson": bson.encode({"v": value}).hex()}
    except (bson.errors.InvalidDocument, OverflowError) as exc:
        raise TypeError(f"{type(value).__name__} cannot be stored by the run's IO manager") from exc


def _datetime(text: str, tz: str | None, parse: Any = datetime.fromisoformat) -> Any:
    value = parse(text)
    if tz in (None, "fixed"):
        return value
    return value.tz_convert(ZoneInfo(tz)) if isinstance(value, pd.Timestamp) else value.astimezone(ZoneInfo(tz))


def decode_json(spec: Any, directory: Path | None = None) -> Any:
    """The value `encode_json` described."""
    if isinstance(spec, list):
        return [decode_json(v, directory) for v in spec]
    if not isinstance(spec, dict):
        return spec
    (tag, body), *_ = spec.items()
    if tag == "$dict":
        return {k: decode_json(v, directory) for k, v in body.items()}
    if tag == "$items":
        return {decode_json(k, directory): decode_json(v, directory) for k, v in body}
    if tag in ("$tuple", "$frozenset", "$set"):
        return {"$tuple": tuple, "$frozenset": frozenset, "$set": set}[tag](decode_json(v, directory) for v in body)
    if tag == "$missing":
        return pd.NA if body == "NA" else pd.NaT
    if tag == "$bson":
        return bson.decode(bytes.fromhex(body), BSON_OPTIONS)["v"]
    if tag == "$float":
        return float(body)
    if tag == "$datetime":
        return _datetime(body, spec["tz"])
    if tag == "$timestamp":
        return _datetime(body, spec["tz"], pd.Timestamp).as_unit(spec["unit"])
    if directory is None:
        raise ValueError(f"{tag} needs the output's directory")
    if tag == "$frame":
        return read_frame(directory / body)
    if tag == "$documents":
        return bson.decode_all((directory / body).read_bytes(), BSON_OPTIONS)
    if tag == "$dataclass":
        module, _, name = body.partition(":")
        if not module.startswith(DATACLASS_MODULES):
            raise ValueError(f"refusing to load {body}: not a pipeline dataclass")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: decode_json(v, directory) for k, v in spec["fields"].items()})
    raise ValueError(f"unknown tag {tag!r} in an IO manager manifest")


def write_value(value: Any, directory: Path) -> None:
    """Store `value` in `directory` (replaced if it exists: a retried step writes again)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    if isinstance(value, pd.DataFrame):
        write_frame(value, directory / "value.parquet")
        spec: Any = {"$frame": "value.parquet"}
    else:
        spec = encode_json(value, _Writer(directory))
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, directory / MANIFEST)  # the manifest last: a directory without one is incomplete


def read_value(directory: Path) -> Any:
    """The value `write_value` stored in `directory`."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"no stored output at {directory} (the run's files are dropped after it succeeds)")
    return decode_json(json.loads(manifest.read_text()), directory)


# --- the IO manager -----------------------------------------------------------------------------


class RunFiles(dg.IOManager):
    """Op outputs under `<base>/<run_id>/...`; the report asset's value is its PostgreSQL row."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir

    def _path(self, identifier: list[str]) -> Path:
        return self.base_dir.joinpath(*identifier)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if context.has_asset_key:  # the report: its value is the reconciliation_reports row, nothing to store
            context.add_output_metadata({"table": REPORT_TABLE})
            return
        write_value(obj, self._path(context.get_identifier()))

    def load_input(self, context: dg.InputContext) -> Any:
        if context.has_asset_key:
            return self._report_row_identity(context)
        return read_value(self._path(context.upstream_output.get_identifier()))

    @staticmethod
    def _report_row_identity(context: dg.InputContext) -> dict[str, Any]:
        """{"table", "report_id"} from the partition's latest materialization."""
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[context.asset_partition_key]), limit=1
        ).records
        if not records:
            raise dg.Failure(f"{context.asset_key.to_user_string()} has no materialization for partition {context.asset_partition_key}")
        metadata = records[0].asset_materialization.metadata
        return {"table": metadata["table"].value, "report_id": metadata["report_id"].value}

    def run_dirs(self, run: dg.DagsterRun, instance: dg.DagsterInstance) -> list[Path]:
        """The run's directory and those of the runs it re-executes (its inputs may come from them)."""
        dirs, seen = [], set()
        while run is not None and run.run_id not in seen:
            seen.add(run.run_id)
            dirs.append(self.base_dir / run.run_id)
            run = instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
        return dirs

    def drop_run(self, run: dg.DagsterRun, instance: dg.DagsterInstance) -> int:
        """Delete the stored outputs of a successful run and of the failed runs it re-executed; how many dirs."""
        dropped = 0
        for directory in self.run_dirs(run, instance):
            if directory.is_dir():
                shutil.rmtree(directory)
                dropped += 1
        return dropped


class RunFilesIOManager(dg.ConfigurableIOManagerFactory):
    """Run-scoped Parquet/BSON/JSON files of op outputs under the instance's storage directory."""

    base_dir: str | None = Field(
        default=None,
        description="Directory for the run files (default: <instance storage directory>/run_outputs); must be shared by all of a run's processes",
    )

    def create_io_manager(self, context: dg.InitResourceContext) -> RunFiles:
        # a subdirectory: the compute logs live in <storage>/<run_id>/ and must stay
        return RunFiles(Path(self.base_dir or os.path.join(context.instance.storage_directory(), RUN_FILES_DIR)))
