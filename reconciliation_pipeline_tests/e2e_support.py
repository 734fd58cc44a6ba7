"""Helpers for the end-to-end tests that drive the `dagster` CLI and `dagster-daemon` as subprocesses.

Everything stays on loopback; every wait is bounded; every subprocess that may outlive its
parent (daemon, code server, run workers) is started in its own session and killed as a group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from reconciliation_pipeline_tests.fault_support import scratch_database

REPO = Path(__file__).resolve().parent.parent
DEFS_MODULE = "reconciliation_pipeline.definitions"
JOB = "reconciliation_job"
ASSET = "reconciliation_report"
CHECK_NAMES = {"no_unrepaired_drift", "repair_budget_not_exceeded", "no_dead_outbox_messages", "audit_chain_intact"}
# Variables of the parent environment that must not leak into the subprocesses.
SCRUBBED_VARS = ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL", "RECON_PARTITIONS_START", "RECON_POSTGRES_URL",
                 "RECON_MONGO_URI", "RECON_MONGO_DB")


def _bin(name: str) -> list[str]:
    """The console script next to the running interpreter, else `python -m <module>`."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    return [sys.executable, "-m", {"dagster": "dagster", "dagster-daemon": "dagster._daemon"}[name]]


DAGSTER = _bin("dagster")
DAGSTER_DAEMON = _bin("dagster-daemon")


def partition_end_utc(partition_key: str) -> datetime:
    """Where the hourly Europe/Berlin partition ends, in UTC."""
    from reconciliation_pipeline.partitions import hourly_partitions

    return hourly_partitions.time_window_for_partition_key(partition_key).end.astimezone(timezone.utc)


# --------------------------------------------------------------------------------------- env / home


def subprocess_env(*, pg_url: str, mongo_uri: str, mongo_db: str, dagster_home: Path,
                   dagster_postgres_url: str | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: the parent's, with the service variables replaced."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_VARS}
    env.update(
        RECON_POSTGRES_URL=pg_url, RECON_MONGO_URI=mongo_uri, RECON_MONGO_DB=mongo_db,
        DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    if dagster_postgres_url:
        env["DAGSTER_POSTGRES_URL"] = dagster_postgres_url
    return env


SQLITE_DAGSTER_YAML = """\
# written by reconciliation_pipeline_tests/e2e_support.py: default (sqlite) storage in this directory
telemetry:
  enabled: false
"""

POSTGRES_DAGSTER_YAML = """\
# written by reconciliation_pipeline_tests/e2e_support.py (the repo has no dagster.yaml)
storage:
  postgres:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
concurrency:
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: "reconciliation/mongo-writer"
        limit: 1
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


def write_sqlite_home(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(SQLITE_DAGSTER_YAML)
    return home


def write_postgres_home(home: Path) -> tuple[Path, str]:
    """A DAGSTER_HOME with PostgreSQL storage and the QueuedRunCoordinator.

    Uses the repository's dagster.yaml when there is one that configures exactly that (so the
    shipped configuration is what the daemon test exercises), else a minimal equivalent.
    Returns the home and a description of which file was used.
    """
    home.mkdir(parents=True, exist_ok=True)
    repo_yaml = REPO / "dagster.yaml"
    text = repo_yaml.read_text() if repo_yaml.exists() else ""
    if "DAGSTER_POSTGRES_URL" in text and "QueuedRunCoordinator" in text:
        shutil.copyfile(repo_yaml, home / "dagster.yaml")
        return home, f"copied {repo_yaml}"
    (home / "dagster.yaml").write_text(POSTGRES_DAGSTER_YAML)
    return home, "test's own dagster.yaml (repo dagster.yaml missing or not PostgreSQL + QueuedRunCoordinator)"


@contextmanager
def dagster_storage_database(pg_url: str) -> Iterator[str]:
    """A fresh database for Dagster's run/event/schedule storage on the same server; dropped after.

    Yields a `postgresql+psycopg2://` URL: dagster-postgres' LISTEN/NOTIFY watcher breaks on
    psycopg 3 (what a plain postgresql:// URL picks under SQLAlchemy 2.1).
    """
    with scratch_database(pg_url, prefix="dagster_e2e") as url:
        yield url


# --------------------------------------------------------------------------------------- processes


def run_cli(args: Sequence[str], env: Mapping[str, str], *, timeout: float = 300, cwd: Path = REPO,
            watch: Callable[[int], Callable[[], None]] | None = None) -> subprocess.CompletedProcess:
    """Run `dagster <args>` to completion (bounded); the output is kept for assertion messages.
    `watch(pid)`, if given, starts observing the process and returns the function that stops it."""
    cmd = [*DAGSTER, *args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    stop_watching = watch(proc.pid) if watch else None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-20_000:]}") from None
    finally:
        if stop_watching:
            stop_watching()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    print(f"$ {' '.join(cmd)}  -> rc={proc.returncode} in {time.monotonic() - started:.1f}s")
    return result


def describe(result: subprocess.CompletedProcess, tail: int = 12_000) -> str:
    return f"$ {' '.join(result.args)}\nexit {result.returncode}\n{result.stdout[-tail:]}"


def kill_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left; reap the leader."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None and pgid != os.getpgrp():
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)  # also the code server / run workers the daemon started
        except ProcessLookupError:
            pass
    elif proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class Daemon:
    """`dagster-daemon run` in its own session, its output in a log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, workspace_args: Sequence[str] = ("-m", DEFS_MODULE)):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.cmd = [*DAGSTER_DAEMON, "run", *workspace_args]
        self.proc = subprocess.Popen(self.cmd, env=dict(env), cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 20_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError as exc:
            return f"<no daemon log: {exc}>"

    def stop(self) -> None:
        kill_group(self.proc)
        self._log.close()


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 1.0,
               on_timeout: Callable[[], str] = lambda: "", what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail with `on_timeout()` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------- data


def mongo_snapshot(db: Any) -> list[dict]:
    """Every client document (sorted), to compare MongoDB before and after a run."""
    return list(db.clients.find({}, sort=[("aktenzeichen", 1)]))


def amounts(db: Any) -> dict[tuple[str, str], Any]:
    """(aktenzeichen, sender_email) -> creditor_response_amount (absent: the string '<absent>')."""
    out = {}
    for doc in db.clients.find({}):
        for element in doc.get("final_creditor_list", []):
            out[(doc["aktenzeichen"], element["sender_email"])] = element.get("creditor_response_amount", "<absent>")
    return out


def write_run_config(path: Path, settings: Mapping[str, Any]) -> Path:
    """A run config file (JSON is valid YAML) that configures the settings resource."""
    path.write_text(json.dumps({"resources": {"settings": {"config": dict(settings)}}}, indent=2))
    return path


def report_rows(engine: sa.Engine, partitions: Sequence[str] | None = None) -> list[dict]:
    sql = "SELECT * FROM reconciliation_reports"
    params: dict[str, Any] = {}
    if partitions is not None:
        sql += " WHERE partition_key = ANY(:p)"
        params["p"] = list(partitions)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql + " ORDER BY id"), params).mappings()]


def finding_rows(engine: sa.Engine, report_id: int | None = None) -> list[dict]:
    sql = "SELECT * FROM reconciliation_findings_current"
    params: dict[str, Any] = {}
    if report_id is not None:
        sql += " WHERE report_id = :r"
        params["r"] = report_id
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql + " ORDER BY id"), params).mappings()]


# --------------------------------------------------------------------------------------- instance


def job_runs(instance: Any) -> list[Any]:
    import dagster as dg

    return list(instance.get_runs(filters=dg.RunsFilter(job_name=JOB)))


def materializations(instance: Any, partitions: Sequence[str]) -> list[Any]:
    """Materialization event records of the report asset for these partitions (newest first)."""
    import dagster as dg

    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(ASSET), asset_partitions=list(partitions)), limit=1000
    )
    return list(result.records)


def check_evaluations(instance: Any, run_id: str) -> dict[str, Any]:
    """check name -> AssetCheckEvaluation recorded by the run."""
    import dagster as dg

    records = instance.get_records_for_run(run_id=run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    out = {}
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        out[evaluation.check_name] = evaluation
    return out


def run_debug(instance: Any, run_ids: Sequence[str] | None = None, max_chars: int = 20_000) -> str:
    """Status of the job's runs plus the error events of the failed ones (for failure messages)."""
    import dagster as dg

    lines = []
    for run in job_runs(instance):
        if run_ids is not None and run.run_id not in run_ids:
            continue
        lines.append(f"run {run.run_id} partition={run.tags.get('dagster/partition')} status={run.status.value}")
        if run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            for entry in instance.all_logs(run.run_id):
                ev = entry.dagster_event
                if entry.level >= 40 or (ev is not None and ev.is_failure):
                    lines.append(f"    {entry.user_message[:2000]}")
                    if ev is not None and getattr(ev.event_specific_data, "error", None) is not None:
                        lines.append("    " + ev.event_specific_data.error.to_string()[:4000])
    return "\n".join(lines)[-max_chars:]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def minutes_before(end: datetime, minutes: int) -> datetime:
    return end - timedelta(minutes=minutes)
