"""End to end: a running `dagster-daemon` picks up reconciliation_alert_sensor (RUNNING by default) and posts
the drift a `dagster job execute` run leaves open to a local webhook receiver; after a daemon restart
only what is new since is sent."""

from __future__ import annotations

import json
import time

import dagster as dg
from dagster._core.scheduler.instigation import InstigatorType
import pytest

from reconciliation_pipeline import alerts
from reconciliation_pipeline_tests.support.alerts import webhook_receiver
from reconciliation_pipeline_tests.builders import PARTITION, add_email, reply
from reconciliation_pipeline_tests.support import (
    DEFS_MODULE, Daemon, cli_env, execute_args, report_rows, run_cli, sqlite_home, wait_until,
)

pytestmark = pytest.mark.e2e
SENSOR = "reconciliation_alert_sensor"
UI = "http://dagster.example.internal:3000"


def sensor_cursor(instance: dg.DagsterInstance) -> str | None:
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.name == SENSOR and state.instigator_data is not None:
            return state.instigator_data.cursor
    return None


def test_daemon_runs_the_alert_sensor_and_posts_new_drift_once(pg, pg_url, mongo_db, service_env, tmp_path):
    with webhook_receiver() as receiver:
        home = sqlite_home(tmp_path / "dagster_home")
        env = cli_env(pg_url=pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db.name,
                             dagster_home=home)
        env.update({alerts.ENV_WEBHOOK_URL: receiver.url, alerts.ENV_UI_BASE_URL: UI})
        stopped = run_cli(["schedule", "stop", "reconciliation_hourly_schedule", "-m", DEFS_MODULE], env, timeout=180)
        assert stopped.returncode == 0, stopped.describe()
        daemon = Daemon(env, tmp_path / "daemon.log")
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                # first tick: the baseline (nothing materialized yet), stored as the sensor's cursor
                wait_until(lambda: sensor_cursor(instance), timeout=120, interval=1, what="the sensor's first tick",
                           on_timeout=daemon.log)
                assert receiver.bodies == []
                add_email(pg, from_email="inkasso@example.de", extracted=reply(az="999999", amount=10.0, name="Nobody, No"))
                run = run_cli(execute_args(PARTITION), env, timeout=300)
                assert run.returncode == 0, run.describe()
                [report] = report_rows(pg)
                # the next tick (minimum_interval_seconds=60) sends it
                bodies = receiver.wait_for(1, timeout=150)
                assert daemon.alive, daemon.log()
                assert [b["event"] for b in bodies] == ["checks_failed", "new_drift"] or \
                       sorted(b["event"] for b in receiver.wait_for(2, timeout=10)) == ["checks_failed", "new_drift"], \
                       (receiver.bodies, daemon.log())
                drift = next(b for b in receiver.bodies if b["event"] == "new_drift")
                assert drift["partition"] == PARTITION and drift["aktenzeichen"] == ["999999"]
                assert drift["run_url"] == f"{UI}/runs/{report['run_id']}"
                assert "Nobody" not in json.dumps(receiver.bodies)
                assert SENSOR in daemon.log() or "SensorDaemon" in daemon.log()

                # the daemon restarts: the cursor (kept in the instance) keeps the sensor's place, so the
                # next tick sends only what is new (one more open problem; the red check is still red, not news)
                cursor = sensor_cursor(instance)
                sent = len(receiver.bodies)
                daemon.stop()
                daemon = Daemon(env, tmp_path / "daemon_restarted.log")
                add_email(pg, from_email="inkasso-2@example.de", extracted=reply(az="888888", amount=10.0, name="Nobody, No"))
                run = run_cli(execute_args(PARTITION), env, timeout=300)
                assert run.returncode == 0, run.describe()
                bodies = receiver.wait_for(sent + 1, timeout=150)
                time.sleep(3)
                assert daemon.alive, daemon.log()
                assert sensor_cursor(instance) != cursor
                new = receiver.bodies[sent:]
                assert [b["event"] for b in new] == ["new_drift"], (new, daemon.log())
                assert new[0]["aktenzeichen"] == ["888888"] and new[0]["new_problems"] == 1
                assert "Nobody" not in json.dumps(receiver.bodies)
        finally:
            daemon.stop()
            print("---- dagster-daemon log (tail) ----\n" + daemon.log(8_000))
