"""`make demo`'s day of history: the demo's own seeding and replay (real runs of reconciliation_job in a
Dagster instance, over the test's PostgreSQL and MongoDB databases) leave 24 materializations of
reconciliation_report with varying drift, one dead outbox message from one hour on, and one hour whose
run tripped the repair budget; the console gets one line per hour and none of Dagster's log."""

from __future__ import annotations

import io
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from reconciliation_pipeline import demo
from reconciliation_pipeline.report import ASSET_KEY, CHECK_DEAD_OUTBOX, CHECK_REPAIR_BUDGET

LAST = "2026-11-28-10:00"


@pytest.fixture
def demo_env(monkeypatch: pytest.MonkeyPatch, pg_url: str, mongo_db: Any, service_env: dict[str, str]) -> None:
    """The definitions' resources (EnvVar) pointed at the test's databases."""
    monkeypatch.setenv("RECON_POSTGRES_URL", pg_url)
    monkeypatch.setenv("RECON_MONGO_URI", service_env["RECON_MONGO_URI"])
    monkeypatch.setenv("RECON_MONGO_DB", mongo_db.name)


def check_results(instance: dg.DagsterInstance, run_id: str) -> dict[str, bool]:
    records = instance.get_records_for_run(run_id=run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    return {r.event_log_entry.dagster_event.event_specific_data.check_name:
            r.event_log_entry.dagster_event.event_specific_data.passed for r in records}


def test_demo_history_is_a_day_of_varying_drift(demo_env, pg: sa.Engine, mongo_db: Any, tmp_path) -> None:
    partitions = demo.history_partitions(LAST)
    assert len(partitions) == demo.HOURS == 24 and partitions[-1] == LAST
    out = io.StringIO()
    with dg.instance_for_test() as instance:
        results = demo.replay_history(pg, mongo_db, instance, partitions, tmp_path / "runs.log", out=out)

        assert [h.partition for h in results] == partitions
        assert all(h.success for h in results), [(h.partition, h.run_id) for h in results if not h.success]
        records = list(instance.fetch_materializations(ASSET_KEY, limit=100).records)
        assert sorted(r.asset_materialization.partition for r in records) == sorted(partitions)
        by_run = {r.run_id: r.asset_materialization.metadata for r in records}
        assert set(by_run) == {h.run_id for h in results}

        # varying drift: the plotted counts differ from hour to hour, and match each hour's report row
        found = [int(by_run[h.run_id]["mismatches_found"].value) for h in results]
        repaired = [int(by_run[h.run_id]["auto_repaired"].value) for h in results]
        assert found == [h.report["mismatches_found"] for h in results]
        assert repaired == [h.report["auto_repaired"] for h in results]
        assert len(set(found)) >= 5 and len(set(repaired)) >= 5, (found, repaired)
        assert all(h.report["status"] == "completed" for h in results)

        # one dead outbox message, from its hour on (red check from then)
        dead = [h.report["outbox_dead"] for h in results]
        assert dead == [0] * demo.DEAD_OUTBOX_HOUR + [1] * (24 - demo.DEAD_OUTBOX_HOUR), dead
        with pg.connect() as conn:
            assert conn.execute(sa.text(
                "SELECT count(*) FROM outbox_messages WHERE processed_at IS NULL AND retry_count >= max_retries")).scalar() == 1
        dead_checks = [check_results(instance, h.run_id)[CHECK_DEAD_OUTBOX] for h in results]
        assert dead_checks == [d == 0 for d in dead]

        # one repair budget trip: that hour repaired nothing and its check is red; the next hour repaired its drift
        halted = [h.partition for h in results if h.report["repairs_halted"]]
        assert halted == [partitions[demo.BUDGET_HOUR]], halted
        budget_checks = [check_results(instance, h.run_id)[CHECK_REPAIR_BUDGET] for h in results]
        assert budget_checks.count(False) == 1 and not budget_checks[demo.BUDGET_HOUR]
        assert repaired[demo.BUDGET_HOUR] == 0 and found[demo.BUDGET_HOUR] > demo.BUDGET_MAX_REPAIRS
        assert repaired[demo.BUDGET_HOUR + 1] >= demo.DRIFT_PER_HOUR[demo.BUDGET_HOUR]

    # the console: one line per hour, Dagster's log in the file
    lines = out.getvalue().splitlines()
    assert len(lines) == 24 and all(partitions[i] in line for i, line in enumerate(lines)), lines
    assert "REPAIR BUDGET TRIPPED" in lines[demo.BUDGET_HOUR]
    assert "DEBUG" not in out.getvalue() and "reconciliation_report.finish_report" in (tmp_path / "runs.log").read_text()
