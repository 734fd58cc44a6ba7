"""The run-scoped IO manager: op outputs as Parquet, BSON and JSON files (store.frame_files), never pickles.

Each output is a directory `<base>/<run_id>/<step key>/<output name>[/<mapping key>]`. A successful
run's files are dropped by `finish_report` (see `RunFiles.drop_run`); a failed run's stay for
re-execution from failure. The report asset's value is its PostgreSQL row, not a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from reconciliation_pipeline.store.frame_files import read_value, write_value

__all__ = ["REPORT_TABLE", "RUN_FILES_DIR", "RunFiles", "RunFilesIOManager", "read_value", "write_value"]

REPORT_TABLE = "reconciliation_reports"
RUN_FILES_DIR = "run_outputs"


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
