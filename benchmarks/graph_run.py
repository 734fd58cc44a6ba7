"""The bench's pipeline run: `reconciliation_job` itself, in process, each op measured from Dagster's own
step events (wall, CPU of this process and of the servers, peak RSS), so the bench times the graph the
schedule runs and not a second copy of its order. `cli_run` times the same partition the way an
operator meets it: `dagster job execute` in a new process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

STEP_END = ("STEP_SUCCESS", "STEP_FAILURE")
Snapshot = Callable[[], dict[str, Any]]
Delta = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def partition_for(start: datetime, end: datetime) -> tuple[str, int]:
    """The hourly partition whose window ends at `end`, and the lookback hours that make it [start, end)."""
    from reconciliation_pipeline.partitions import hourly_partitions

    hours = (end - start) / timedelta(hours=1)
    if hours != int(hours) or end.minute or end.second or end.microsecond:
        raise ValueError(f"bench window [{start}, {end}) is not whole hours ending on the hour")
    key = hourly_partitions.get_partition_key_for_timestamp((end - timedelta(hours=1)).timestamp())
    assert hourly_partitions.time_window_for_partition_key(key).end == end, (key, end)
    return key, int(hours)


def op_name(step_key: str) -> str:
    """`reconciliation_report.extract_mongo[shard_0]` -> `extract_mongo` (mapped steps add up per op)."""
    return step_key.split(".")[-1].split("[")[0]


class StepMeter(logging.Handler):
    """Receives the run's events through a Dagster logger; measures each step between its STEP_START and
    its STEP_SUCCESS / STEP_FAILURE (a dynamic op's mapped steps add up under the op's name)."""

    def __init__(self, snapshot: Snapshot, delta: Delta, on_step: Callable[[str], None], high_water: Callable[[], int]) -> None:
        super().__init__(logging.DEBUG)
        self.snapshot, self.delta, self.on_step, self.high_water = snapshot, delta, on_step, high_water
        self.started: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, dict[str, float]] = {}
        self.rss_after: dict[str, int] = {}
        self.failed: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "dagster_event", None)
        if event is None or not event.step_key:
            return
        kind = event.event_type_value
        if kind == "STEP_START":
            self.started[event.step_key] = self.snapshot()
            self.on_step(op_name(event.step_key))
        elif kind in STEP_END and event.step_key in self.started:
            name = op_name(event.step_key)
            d = self.delta(self.started.pop(event.step_key), self.snapshot())
            self.seconds[name] = self.seconds.get(name, 0.0) + d["wall"]
            total = self.cpu.setdefault(name, {})
            for k, v in d.items():
                total[k] = v if k == "load1" else (total.get(k) or 0.0) + (v or 0.0)
            self.rss_after[name] = self.high_water()
            if kind == "STEP_FAILURE":
                self.failed.append(event.step_key)
            self.on_step("dagster")


def run_graph(
    *, pg_url: str, mongo_uri: str, mongo_db: str, start: datetime, end: datetime, settings: dict[str, Any],
    snapshot: Snapshot, delta: Delta, on_step: Callable[[str], None], high_water: Callable[[], int], verbose: bool = False,
) -> dict[str, Any]:
    """Materialize reconciliation_report for the partition of [start, end) through `reconciliation_job`
    (its executor, IO manager, hooks and checks) in this process; per-op figures and the report."""
    import dagster as dg

    from reconciliation_pipeline.assets import reconciliation_report
    from reconciliation_pipeline.io_managers import RunFilesIOManager
    from reconciliation_pipeline.jobs import reconciliation_job
    from reconciliation_pipeline.ops import LOOKBACK_TAG
    from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings

    key, lookback = partition_for(start, end)
    meter = StepMeter(snapshot, delta, on_step, high_water)

    @dg.logger
    def bench_steps(_init_context: Any) -> logging.Logger:
        logger = logging.Logger("bench.steps", logging.DEBUG)
        logger.addHandler(meter)
        return logger

    loggers = {"bench_steps": bench_steps, "console": dg.colored_console_logger}
    defs = dg.Definitions(
        assets=[reconciliation_report], jobs=[reconciliation_job], loggers=loggers,
        resources={
            "postgres": PostgresResource(url=pg_url),
            "mongo": MongoResource(uri=mongo_uri, database=mongo_db),
            "settings": ReconciliationSettings(**settings),
            "io_manager": RunFilesIOManager(),
        },
    )
    job = defs.resolve_job_def(reconciliation_job.name)
    run_config = {"loggers": {"bench_steps": {}, **({"console": {"config": {"log_level": "INFO"}}} if verbose else {})}}
    instance = dg.DagsterInstance.ephemeral()
    wall = time.perf_counter()
    result = job.execute_in_process(
        partition_key=key, tags={LOOKBACK_TAG: str(lookback)}, run_config=run_config, instance=instance, raise_on_error=False,
    )
    total = time.perf_counter() - wall
    if not result.success:
        raise RuntimeError(f"bench run of partition {key} failed: steps {meter.failed}")
    [materialization] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in materialization.materialization.metadata.items()}
    left = _run_files(instance, result.run_id)
    return {
        "partition_key": key, "lookback_hours": lookback, "run_id": result.run_id, "report_id": int(metadata["report_id"]),
        "steps": meter.seconds, "cpu": meter.cpu, "peak_rss_after_step": meter.rss_after, "total_seconds": total,
        "dagster_between_steps_seconds": total - sum(meter.seconds.values()),
        "metadata": {k: v for k, v in metadata.items() if isinstance(v, (int, float, bool, str))},
        "run_files_left": left,
    }


def _run_files(instance: Any, run_id: str) -> int:
    """Files of the run's outputs still under the instance's storage directory (a successful run leaves none)."""
    root = Path(instance.storage_directory())
    return sum(1 for p in root.rglob("*") if p.is_file() and run_id in str(p))


def cli_run(*, env: dict[str, str], start: datetime, end: datetime, pg_url: str, repo: Path) -> dict[str, Any]:
    """`dagster job execute` of the bench partition in a new process: process start to exit, and the
    report row's run_at to completed_at (what the run itself took, without process start)."""
    import sqlalchemy as sa

    from reconciliation_pipeline.ops import LOOKBACK_TAG

    key, lookback = partition_for(start, end)
    dagster = Path(sys.executable).parent / "dagster"
    cmd = [str(dagster), "job", "execute", "-m", "reconciliation_pipeline.definitions", "-j", "reconciliation_job",
           "--tags", json.dumps({"dagster/partition": key, LOOKBACK_TAG: str(lookback)})]
    wall = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, cwd=repo, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - wall
    if done.returncode != 0:
        raise RuntimeError(f"dagster job execute exited {done.returncode}:\n{done.stderr[-4000:]}")
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT id, run_at, completed_at, status, records_checked, mismatches_found, auto_repaired "
                "FROM reconciliation_reports WHERE partition_key = :k ORDER BY id DESC LIMIT 1"), {"k": key}).mappings().one()
    finally:
        engine.dispose()
    return {"partition_key": key, "process_seconds": seconds, "report_id": int(row["id"]), "status": row["status"],
            "report_seconds": (row["completed_at"] - row["run_at"]).total_seconds(),
            "records_checked": int(row["records_checked"]), "mismatches_found": int(row["mismatches_found"]),
            "auto_repaired": int(row["auto_repaired"])}
