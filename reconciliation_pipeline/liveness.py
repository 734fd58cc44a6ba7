"""Close reports left `running` by runs that are no longer alive (crash, cancel, SIGKILL)."""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
from sqlalchemy.engine import Engine

from reconciliation_pipeline.store import postgres as pg

FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
STALE_HEARTBEAT = timedelta(hours=3)  # longer than the job's dagster/max_runtime tag


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_process_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the run's own process (its RUN_START event), not of a step subprocess or worker."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    event = records[0].event_log_entry.dagster_event if records else None
    return event.pid if event is not None else None


def why_dead(report: dict[str, Any], run: dg.DagsterRun | None, now: datetime, run_pid: int | None = None) -> str | None:
    """Why the report's run can no longer finish it, or None while it may still be alive.

    The recorded pid says something only when open_report ran in the run's own process (`run_pid`):
    with the multiprocess or Celery executor it is a step's process, gone once the step ends while
    the run goes on; Dagster's run status and the heartbeat decide then.
    """
    if run is None:
        return "its Dagster run does not exist"
    if run.status in FINISHED:
        return f"its Dagster run ended with status {run.status.value} without completing the report"
    pid = report.get("pid")
    if (report.get("hostname") == socket.gethostname() and pid is not None and pid == run_pid
            and not _process_alive(pid)):
        return f"the run's process {report.get('pid')} is gone (killed)"
    heartbeat = report.get("heartbeat_at")
    if heartbeat is not None and now - heartbeat > STALE_HEARTBEAT:
        return f"no heartbeat since {heartbeat.isoformat()}"
    return None


def close_stale_reports(engine: Engine, instance: dg.DagsterInstance, log: Any) -> int:
    """Mark `failed` every running report whose run is dead; returns how many were closed."""
    now = datetime.now(timezone.utc)
    closed = 0
    for report in pg.running_reports(engine):
        run = instance.get_run_by_id(report["run_id"])
        if run is not None and run.status in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING):
            continue
        reason = why_dead(report, run, now, run_process_pid(instance, report["run_id"]) if run is not None else None)
        if reason is None:
            continue
        if pg.fail_report(engine, report["run_id"], f"closed as failed: {reason}"):
            closed += 1
            log.warning(f"report {report['id']} (run {report['run_id']}) closed as failed: {reason}")
        if run is not None and run.status == dg.DagsterRunStatus.STARTED:
            instance.report_run_failed(run, f"reconciliation report closed: {reason}")
        if run is not None and instance.event_log_storage.supports_global_concurrency_limits:
            # a killed `dagster job execute` run never gives back its pool slot; without the daemon
            # (run monitoring frees them) the next run's MongoDB writer ops would wait forever
            freed = instance.event_log_storage.free_concurrency_slots_for_run(report["run_id"])
            if freed:
                log.warning(f"freed {freed} concurrency pool slots held by dead run {report['run_id']}")
    return closed
