"""Values <-> files without pickles: frames as Parquet, MongoDB documents as BSON, the rest as tagged JSON.

A value is stored in a directory holding a `value.json` manifest and one file per DataFrame
(`<n>.parquet`), list of MongoDB documents (`<n>.bson`) or part of a `FrameParts` (`<n>.parquet`).
Frames keep their dtypes (Int64, tz-aware datetimes, object columns with None): object columns of
strings are Arrow strings, floats in an object column (MongoDB's amounts) are stored by value and any
other cell as tagged JSON (BSON for MongoDB's own types). Only the pipeline's own dataclasses are
rebuilt. No Dagster here: the run's IO manager (io_managers.py) and the steps both use it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import bson
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from bson.codec_options import CodecOptions

MANIFEST = "value.json"
# What pymongo hands the pipeline (MongoResource: tz_aware=True), so decoded documents are the same objects.
BSON_OPTIONS = CodecOptions(tz_aware=True)
DATACLASS_MODULES = ("reconciliation_pipeline.",)  # only these classes are rebuilt from a manifest


class _Writer:
    def __init__(self, directory: Path):
        self.directory, self.count = directory, 0

    def file(self, suffix: str) -> str:
        self.count += 1
        return f"{self.count}.{suffix}"


def _column_codec(values: pd.Series) -> str:
    """arrow (pyarrow and pandas metadata keep the dtype), strings (object column of str and None),
    str (pandas' string dtypes: storage and na_value in the metadata), floats (Python floats by
    value, the other cells as JSON: MongoDB amounts) or json (per cell)."""
    if isinstance(values.dtype, pd.StringDtype):
        return "str"
    if values.dtype != object:
        return "arrow"
    types = {type(v) for v in values.to_numpy(object)} - {type(None)}
    if types <= {str}:
        return "strings"
    return "floats" if float in types else "json"


def _to_json(cells: np.ndarray) -> list[str]:
    return [json.dumps(encode_json(v)) for v in cells]


def _from_json(texts: list[str]) -> np.ndarray:
    return np.array([decode_json(json.loads(v)) for v in texts] + [None], dtype=object)[:-1]  # 1-D even for lists


FLOATS_OTHERS = "{}\x1fjson"  # the side column of a floats column: the cells that are not floats


def write_frame(frame: pd.DataFrame, path: Path | pa.NativeFile) -> None:
    """One Parquet file; object columns outside pandas' metadata, their codec in the schema metadata."""
    if not frame.columns.is_unique or not all(isinstance(c, str) and "\x1f" not in c for c in frame.columns):
        raise TypeError("frame columns must be unique strings (without \\x1f) to be stored as Parquet")
    codecs = {c: _column_codec(frame[c]) for c in frame.columns}
    arrow_cols = [c for c, codec in codecs.items() if codec == "arrow"]
    table = pa.Table.from_pandas(frame[arrow_cols], preserve_index=None)
    for column, codec in codecs.items():
        if codec in ("strings", "str"):
            cells = frame[column].to_numpy(object, na_value=None) if codec == "str" else frame[column].to_numpy(object)
            table = table.append_column(pa.field(column, pa.string()), pa.array(cells, pa.string()))
        elif codec == "json":
            table = table.append_column(pa.field(column, pa.string()), pa.array(_to_json(frame[column].to_numpy(object)), pa.string()))
        elif codec == "floats":
            cells = frame[column].to_numpy(object)
            is_float = np.fromiter((type(v) is float for v in cells), dtype=bool, count=len(cells))
            floats = np.zeros(len(cells))
            floats[is_float] = cells[is_float].astype(np.float64)
            others = np.full(len(cells), None, dtype=object)
            others[~is_float] = _to_json(cells[~is_float])
            table = table.append_column(pa.field(column, pa.float64()), pa.array(floats, pa.float64(), mask=~is_float))
            table = table.append_column(pa.field(FLOATS_OTHERS.format(column), pa.string()), pa.array(others, pa.string()))
    strings = {c: [frame[c].dtype.storage, "NA" if frame[c].dtype.na_value is pd.NA else "nan"] for c, codec in codecs.items() if codec == "str"}
    info = {"columns": list(frame.columns), "codecs": codecs, "rows": len(frame), "attrs": encode_json(frame.attrs), "strings": strings}
    meta = {**(table.schema.metadata or {}), b"reconciliation": json.dumps(info).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)


def read_frame(path: Path | pa.NativeFile) -> pd.DataFrame:
    """The frame `write_frame` stored: same columns, order, dtypes, index and values."""
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[b"reconciliation"])
    others = [c for c, codec in info["codecs"].items() if codec != "arrow"]
    sides = [FLOATS_OTHERS.format(c) for c, codec in info["codecs"].items() if codec == "floats"]
    frame = table.drop_columns(others + sides).to_pandas()
    if len(frame) != info["rows"]:  # no Arrow column: the index alone does not carry the length
        frame = pd.DataFrame(index=pd.RangeIndex(info["rows"]))
    for column in others:
        codec, cells = info["codecs"][column], table.column(column)
        if codec == "json":
            values = _from_json(cells.to_pylist())
        elif codec == "floats":
            values = cells.to_numpy(zero_copy_only=False).astype(object)  # Python floats, as pymongo returned them
            rest = np.flatnonzero(~cells.is_valid().to_numpy(zero_copy_only=False))
            texts = table.column(FLOATS_OTHERS.format(column)).take(pa.array(rest)).to_pylist()
            values[rest] = _from_json(texts)
        else:
            values = _distinct_strings(cells)
        if codec == "str":
            storage, na = info["strings"][column]
            dtype = pd.StringDtype(storage, na_value=pd.NA if na == "NA" else np.nan)
            frame[column] = pd.Series(pd.array(values, dtype=dtype), index=frame.index)
        else:
            frame[column] = pd.Series(values, index=frame.index, dtype=object)
    frame = frame[info["columns"]]
    frame.attrs = decode_json(info["attrs"])
    return frame


def _distinct_strings(column: pa.ChunkedArray) -> np.ndarray:
    """The column as an object array holding each distinct string once (None for null).

    Arrow would hand back a new str object a row; a million emails name a few thousand creditors,
    and both memory and the diff's hashing (cached per object) depend on sharing them.
    """
    encoded = column.combine_chunks().dictionary_encode()
    words = np.array(encoded.dictionary.to_pylist() + [None], dtype=object)
    return words[encoded.indices.fill_null(len(words) - 1).to_numpy(zero_copy_only=False)]


class FrameParts:
    """A frame kept as parts of Parquet bytes (a few bytes a cell, no Python object a cell), turned
    back into pandas one part at a time. Stored parts are files, read when a part is asked for."""

    def __init__(self, parts: list[pa.Buffer | Path] | None = None, rows: list[int] | None = None):
        self._parts, self._rows = list(parts or []), list(rows or [])

    def append(self, frame: pd.DataFrame) -> None:
        """Encode `frame` as the next part (the frame itself can then be freed)."""
        sink = pa.BufferOutputStream()
        write_frame(frame, sink)
        self._parts.append(sink.getvalue())
        self._rows.append(len(frame))

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, index: int) -> pd.DataFrame:
        part = self._parts[index]
        return read_frame(pa.BufferReader(part) if isinstance(part, pa.Buffer) else part)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return (self[i] for i in range(len(self)))

    def concat(self) -> pd.DataFrame:
        """All parts as one frame (for small extracts and tests: it holds every part at once)."""
        frames = list(self)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def rows(self) -> int:
        """Rows over all parts."""
        return sum(self._rows)

    def write(self, writer: _Writer) -> dict[str, Any]:
        """Each part to a file of its own; the manifest entry."""
        names = []
        for part in self._parts:
            names.append(writer.file("parquet"))
            target = writer.directory / names[-1]
            if isinstance(part, pa.Buffer):
                with pa.OSFile(str(target), "wb") as out:
                    out.write(part)
            else:
                shutil.copyfile(part, target)
        return {"$parts": names, "rows": self._rows}


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
    if writer is not None and isinstance(value, FrameParts):
        return value.write(writer)
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
    if tag == "$parts":
        return FrameParts([directory / name for name in body], spec["rows"])
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
