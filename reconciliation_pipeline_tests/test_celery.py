"""reconciliation_celery_job on two real Celery workers (dagster-celery) against a real broker.

The shard steps must run in the workers' processes, not the launching one, and the run must find
and repair exactly what an in-process run of reconciliation_job finds on the same data. Runs
whenever a broker is reachable (RECON_CELERY_BROKER_URL, else RabbitMQ or Redis on 127.0.0.1);
without one it FAILs under CI=true and skips locally.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import psutil
import pytest
import sqlalchemy as sa

from benchmarks import datagen
from reconciliation_pipeline_tests.builders import PARTITION, WINDOW_END
from reconciliation_pipeline_tests.support import (
    REPO, cli_env, execute_args, finding_rows, free_port, kill_group, postgres_home, report_rows, run_cli,
    scratch_database, wait_until,
)

CELERY_JOB = "reconciliation_celery_job"
DAGSTER_CELERY = [str(Path(sys.executable).parent / "dagster-celery")]
CANDIDATES = ("amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/0")


def _host_port(url: str) -> tuple[str, int]:
    """Host and port of an amqp:// / pyamqp:// / redis:// broker URL (the scheme's default port)."""
    parsed = urlsplit(url)
    default = 6379 if parsed.scheme.startswith(("redis", "rediss")) else 5672
    return parsed.hostname or "127.0.0.1", parsed.port or default


def _reachable(url: str) -> bool:
    try:
        with socket.create_connection(_host_port(url), timeout=1):
            return True
    except OSError:
        return False


def _broker() -> tuple[str | None, str]:
    """The broker to use (None when none answers) and the URLs that were tried."""
    explicit = os.environ.get("RECON_CELERY_BROKER_URL")
    candidates = [explicit] if explicit else list(CANDIDATES)
    tried = ", ".join(f"{_host_port(u)[0]}:{_host_port(u)[1]}" for u in candidates)
    return next((u for u in candidates if _reachable(u)), None), tried


@pytest.fixture
def broker() -> str:
    """A reachable Celery broker; none: FAIL under CI=true, skip locally (one line)."""
    url, tried = _broker()
    if url is None:
        message = f"no Celery broker reachable at {tried} (set RECON_CELERY_BROKER_URL or start RabbitMQ / Redis)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return url


def _settings(queue: str, backend: str) -> dict[str, Any]:
    return {
        "resources": {"settings": {"config": {"mongo_shards": 2, "repair_lock_wait_seconds": 30}}},
        "execution": {"config": {"queue": queue, "backend": backend}},
    }


def _comparable_findings(engine: sa.Engine, report_id: int) -> list[tuple]:
    keys = ("kind", "client_aktenzeichen", "creditor_email", "pg_amount_cents", "mongo_amount_cents_before",
            "mongo_amount_cents_after", "action", "error")
    return sorted((tuple(str(r[k]) for k in keys) for r in finding_rows(engine, report_id)))


def _mongo_state(db: Any) -> list[dict]:
    return sorted(({k: v for k, v in d.items() if k != "_id"} for d in db.clients.find({})), key=lambda d: str(d.get("aktenzeichen")))


def _load(pg: sa.Engine, mongo_db: Any) -> None:
    datagen.generate(pg, mongo_db, emails=600, clients=60, creditors_per_client=5, drift=0.08, outbox=10, keys=10,
                     window_end=WINDOW_END, seed=13, name_only=0.02)


def _descendants(procs: list[subprocess.Popen]) -> set[int]:
    pids = set()
    for proc in procs:
        try:
            parent = psutil.Process(proc.pid)
            pids |= {parent.pid} | {c.pid for c in parent.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.mark.e2e
def test_celery_job_runs_the_shards_on_the_workers_and_matches_an_in_process_run(
    broker: str, pg: sa.Engine, pg_url: str, mongo_db: Any, service_env: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = f"recon_test_{uuid.uuid4().hex[:8]}"  # other engineers' workers on this broker never see our tasks
    backend = broker if broker.startswith("redis") else "rpc://"
    run_config = tmp_path / "run_config.yaml"
    import json

    run_config.write_text(json.dumps(_settings(queue, backend)))
    worker_yaml = tmp_path / "worker.yaml"
    worker_yaml.write_text(json.dumps({"execution": {"config": {"broker": {"env": "RECON_CELERY_BROKER_URL"}, "backend": backend,
                                                                "config_source": {"task_default_queue": queue}}}}))
    with scratch_database(pg_url) as dagster_url:
        home = postgres_home(tmp_path / "dagster_home")
        env = cli_env(pg_url=pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db.name,
                             dagster_home=home, dagster_postgres_url=dagster_url)
        env["RECON_CELERY_BROKER_URL"] = broker
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `celery` of this venv

        # the reference: reconciliation_job in one process
        _load(pg, mongo_db)
        settings_only = tmp_path / "settings.yaml"
        settings_only.write_text(json.dumps({"resources": _settings(queue, backend)["resources"]}))
        ref = run_cli(execute_args(PARTITION, settings_only), env, timeout=300)
        assert ref.returncode == 0, ref.describe()
        ref_report = report_rows(pg)[-1]
        ref_findings = _comparable_findings(pg, ref_report["id"])
        ref_state = _mongo_state(mongo_db)
        assert ref_report["status"] == "completed" and ref_report["auto_repaired"] > 0, ref_report

        # the same data again, now on two Celery workers
        _load(pg, mongo_db)
        workers: list[subprocess.Popen] = []
        logs = []
        try:
            for n in (1, 2):
                log = open(tmp_path / f"worker{n}.log", "w")  # noqa: SIM115 - closed below
                logs.append(log)
                workers.append(subprocess.Popen(
                    [*DAGSTER_CELERY, "worker", "start", "-A", "dagster_celery.app", "-y", str(worker_yaml), "-q", queue,
                     "-n", f"recon{n}-{queue}", "--", "--concurrency=1", "--pool=prefork"],
                    env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                ))
            wait_until(lambda: all("ready" in (tmp_path / f"worker{n}.log").read_text() for n in (1, 2)), timeout=120,
                       what="both Celery workers ready",
                       on_timeout=lambda: "\n".join((tmp_path / f"worker{n}.log").read_text()[-3000:] for n in (1, 2)))
            launched: dict[str, int] = {}
            result = run_cli(execute_args(PARTITION, run_config, job=CELERY_JOB), env, timeout=600,
                             watch=lambda pid: (launched.setdefault("pid", pid), lambda: None)[1])
            worker_pids = _descendants(workers)

            assert result.returncode == 0, result.describe() + "\n".join((tmp_path / f"worker{n}.log").read_text()[-5000:] for n in (1, 2))
        finally:
            for proc in workers:
                kill_group(proc, grace=15)
            for log in logs:
                log.close()
        assert all(proc.poll() is not None for proc in workers)

        monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_url)  # the home's dagster.yaml reads it
        with dg.DagsterInstance.from_config(str(home)) as instance:
            run = next(r for r in instance.get_runs(filters=dg.RunsFilter(job_name=CELERY_JOB)))
            records = instance.all_logs(run.run_id)
        events = [e.dagster_event for e in records if e.dagster_event]
        launcher_pid = next(ev.pid for ev in events if ev.event_type == dg.DagsterEventType.RUN_START)
        starts = {ev.step_key: ev.pid for ev in events if ev.event_type == dg.DagsterEventType.STEP_START}
        # dagster-celery's task reports "[CeleryExecutor] Executing steps <key> in celery worker" with
        # the worker's hostname (`-n`) before it runs the step
        celery_hosts = {ev.step_key: ev.event_specific_data.metadata["Celery worker"].value
                        for ev in events if ev.event_type == dg.DagsterEventType.ENGINE_EVENT
                        and "in celery worker" in (ev.message or "")}
        shard_steps = sorted(k for k in starts if ".extract_mongo[" in k or ".diff[" in k)
        evidence = "\n".join(f"  {k:<52} pid {starts[k]:<7} celery worker {celery_hosts.get(k)}" for k in sorted(starts))
        print(f"\nlauncher (dagster job execute): pid {launcher_pid} on {socket.gethostname()}, cli pid {launched.get('pid')}\n"
              f"worker process trees: {sorted(worker_pids)}\nstep -> process:\n{evidence}")
        assert launcher_pid == launched["pid"], (launcher_pid, launched)
        assert len(shard_steps) == 4, evidence  # extract_mongo and diff of each of the two shards
        worker_names = {f"recon{n}-{queue}@{socket.gethostname()}" for n in (1, 2)}
        for step, pid in starts.items():  # every step, not only the shards
            assert pid in worker_pids and pid != launcher_pid, (step, evidence, worker_pids)
            assert celery_hosts.get(step) in worker_names, (step, evidence, worker_names)

        report = report_rows(pg)[-1]
        assert report["run_id"] == run.run_id and report["status"] == "completed", report
        assert _comparable_findings(pg, report["id"]) == ref_findings
        assert {k: report[k] for k in ("records_checked", "mismatches_found", "auto_repaired", "failed_repairs")} == \
            {k: ref_report[k] for k in ("records_checked", "mismatches_found", "auto_repaired", "failed_repairs")}
        assert _mongo_state(mongo_db) == ref_state


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_without_a_broker_the_celery_test_fails_in_ci_and_skips_locally(ci: str, outcome: str, service_env: dict[str, str]) -> None:
    """The two-worker test above, run by pytest against a broker URL nothing listens on: CI=true fails the run."""
    port = free_port()  # nothing listens there
    env = {**os.environ, **service_env, "RECON_CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{port}//", "CI": ci}
    test = f"{Path(__file__).resolve()}::test_celery_job_runs_the_shards_on_the_workers_and_matches_an_in_process_run"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", "-p", "no:logging", test],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert outcome in out, out
    assert result.returncode == (1 if ci else 0), out
    summary = [line for line in out.splitlines() if line.startswith(("ERROR ", "SKIPPED "))]  # the -rsE summary
    assert len(summary) == 1 and summary[0].startswith("ERROR" if ci else "SKIPPED"), out  # a fixture failure: pytest exits 1
    assert f"no Celery broker reachable at 127.0.0.1:{port} (" in summary[0], out
