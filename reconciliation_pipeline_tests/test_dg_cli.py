"""The `dg` CLI (dagster-dg-cli, `[tool.dg]` in pyproject.toml) on the project, against real PostgreSQL and the wire server."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
import pytest

from reconciliation_pipeline_tests.builders import PARTITION
from reconciliation_pipeline_tests.support import (
    CliProcess, CliRun, amounts, cli_env, job_runs, materializations, report_rows, sqlite_home,
)
from reconciliation_pipeline_tests.test_cli_e2e import seed_mismatch_and_missing

pytestmark = pytest.mark.e2e

DG = Path(sys.executable).parent / "dg"


def run_dg(args: list[str], env: dict[str, str], timeout: float = 300) -> CliRun:
    assert DG.exists(), f"{DG} missing: dagster-dg-cli is a main dependency (make venv)"
    # the venv's dg, run from the project root as an operator does; the venv is "active" for it
    env = {**env, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent), "COLUMNS": "200", "NO_COLOR": "1"}
    process = CliProcess(args, env, command=[str(DG)])
    try:
        result = process.wait(timeout)
    finally:
        process.kill()
    print(f"$ dg {' '.join(args)} -> rc={result.returncode}")
    return result


@pytest.fixture
def dg_env(pg, pg_url, mongo_db, service_env, tmp_path) -> dict[str, str]:
    home = sqlite_home(tmp_path / "dagster_home")
    return cli_env(pg_url=pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db.name, dagster_home=home)


def test_dg_check_and_list_defs(dg_env):
    check = run_dg(["check", "defs"], dg_env)
    assert check.returncode == 0 and "All definitions loaded successfully" in check.output, check.describe()
    listed = run_dg(["list", "defs", "--json"], dg_env)
    assert listed.returncode == 0, listed.describe()
    for name in ("reconciliation_report", "reconciliation_job", "reconciliation_parallel_job",
                 "reconciliation_hourly_schedule", "close_stale_reports_sensor", "reconciliation_alert_sensor",
                 "no_unrepaired_drift", "repair_budget_not_exceeded", "no_dead_outbox_messages", "audit_chain_intact"):
        assert name in listed.output, (name, listed.describe())


def test_dg_launch_one_partition_repairs_and_materializes(dg_env, pg, mongo_db):
    expected = seed_mismatch_and_missing(pg, mongo_db)
    result = run_dg(["launch", "--assets", "reconciliation_report", "--partition", PARTITION], dg_env)
    assert result.returncode == 0, result.describe()
    [report] = report_rows(pg)
    assert report["status"] == "completed" and report["partition_key"] == PARTITION, report
    assert (report["mismatches_found"], report["auto_repaired"]) == (2, 2)
    assert amounts(mongo_db) == expected
    with dg.DagsterInstance.from_config(dg_env["DAGSTER_HOME"]) as instance:
        [record] = materializations(instance, [PARTITION])
        assert record.run_id == report["run_id"]
        assert record.event_log_entry.asset_materialization.metadata["auto_repaired"].value == 2
        assert job_runs(instance) == []  # an ad-hoc asset run, not reconciliation_job (no job tags)


def test_dg_launch_partition_range_is_refused_without_a_single_run_backfill_policy(dg_env, pg):
    """Each partition is its own window and report, so the asset has no BackfillPolicy.single_run(): ranges go
    through a backfill (daemon), never one run over many hours."""
    result = run_dg(["launch", "--assets", "reconciliation_report",
                     "--partition-range", "2026-11-28-08:00...2026-11-28-10:00"], dg_env)
    assert result.returncode != 0, result.describe()
    assert "BackfillPolicy.single_run()" in result.output, result.describe()
    assert report_rows(pg) == []
