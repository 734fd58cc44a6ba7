"""liveness.why_dead: which running reports belong to runs that can no longer finish them."""

import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from reconciliation_pipeline.liveness import run_process_pid, why_dead

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run(status: dg.DagsterRunStatus) -> dg.DagsterRun:
    return dg.DagsterRun(job_name="reconciliation_job", run_id="r1", status=status)


GONE = _gone_pid()
HOST = socket.gethostname()


@pytest.mark.parametrize(
    "report, run, run_pid, dead",
    [
        ({"pid": GONE, "hostname": HOST}, None, None, "does not exist"),
        ({"pid": GONE, "hostname": HOST}, _run(dg.DagsterRunStatus.FAILURE), GONE, "ended with status FAILURE"),
        # open_report ran in the run's own process (in-process executor) and that process is gone: killed
        ({"pid": GONE, "hostname": HOST}, _run(dg.DagsterRunStatus.STARTED), GONE, "is gone"),
        # multiprocess / Celery: the recorded pid was a step's process, the run's own process lives on
        ({"pid": GONE, "hostname": HOST}, _run(dg.DagsterRunStatus.STARTED), os.getpid(), None),
        ({"pid": GONE, "hostname": HOST}, _run(dg.DagsterRunStatus.STARTED), None, None),
        ({"pid": GONE, "hostname": "another-host"}, _run(dg.DagsterRunStatus.STARTED), GONE, None),
        ({"pid": os.getpid(), "hostname": HOST}, _run(dg.DagsterRunStatus.STARTED), os.getpid(), None),
        ({"pid": GONE, "hostname": "another-host", "heartbeat_at": NOW - timedelta(hours=4)},
         _run(dg.DagsterRunStatus.STARTED), None, "no heartbeat"),
    ],
    ids=["no_run", "run_failed", "killed_in_process", "step_process_gone_run_alive", "no_run_start",
         "other_host", "alive", "stale_heartbeat"],
)
def test_why_dead(report, run, run_pid, dead):
    reason = why_dead(report, run, NOW, run_pid)
    assert (reason is None) if dead is None else (reason is not None and dead in reason), reason


def test_run_process_pid_is_the_pid_of_the_run_process():
    @dg.op
    def noop() -> None:
        """Nothing."""

    @dg.job
    def tiny():
        noop()

    instance = dg.DagsterInstance.ephemeral()
    result = tiny.execute_in_process(instance=instance)
    assert run_process_pid(instance, result.run_id) == os.getpid()
    assert run_process_pid(instance, "no-such-run") is None
