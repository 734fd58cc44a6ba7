"""The code location loads and has the job, partitions, schedule, sensor, checks and resources it promises.

Needs no running service: loading the definitions never connects to a database.
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from reconciliation_pipeline_tests.support import CHECK_NAMES, DEFS_MODULE, cli_env, run_cli

LOOPBACK_ENV = {
    "RECON_POSTGRES_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/recon_defs_test",
    "RECON_MONGO_URI": "mongodb://127.0.0.1:27017/?directConnection=true",
    "RECON_MONGO_DB": "recon_defs_test",
}


@pytest.fixture
def defs(monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    for key, value in LOOPBACK_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RECON_PARTITIONS_START", raising=False)
    import reconciliation_pipeline.definitions as module

    return module.defs


def test_job_is_hourly_partitioned_in_berlin(defs: dg.Definitions) -> None:
    job = defs.resolve_job_def("reconciliation_job")
    pdef = job.partitions_def
    assert isinstance(pdef, dg.TimeWindowPartitionsDefinition), type(pdef)
    assert pdef.timezone == "Europe/Berlin"
    assert pdef.cron_schedule == "0 * * * *"  # hourly
    assert pdef.start <= datetime(2025, 1, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    # the key format the CLI, the demo and the tests use; the partition ends at 10:00 UTC in winter
    window = pdef.time_window_for_partition_key("2026-11-28-10:00")
    assert window.end.astimezone(timezone.utc) == datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
    assert window.start.astimezone(timezone.utc) == datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)
    # the job materializes the report asset and runs its checks
    assert job.asset_layer.selected_asset_keys == {dg.AssetKey("reconciliation_report")}
    assert {k.name for k in job.asset_layer.asset_graph.asset_check_keys} == CHECK_NAMES


def test_schedule_targets_the_job(defs: dg.Definitions) -> None:
    schedule = defs.resolve_schedule_def("reconciliation_hourly_schedule")
    assert schedule.job_name == "reconciliation_job"
    assert schedule.execution_timezone == "Europe/Berlin"
    assert schedule.cron_schedule.split()[1:] == ["*", "*", "*", "*"]  # once an hour


def test_sensor_exists(defs: dg.Definitions) -> None:
    sensor = defs.resolve_sensor_def("close_stale_reports_sensor")
    assert sensor.name == "close_stale_reports_sensor"


def test_alert_sensor_runs_by_default_at_most_once_a_minute(defs: dg.Definitions) -> None:
    sensor = defs.resolve_sensor_def("reconciliation_alert_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 60
    assert "postgres" in sensor.required_resource_keys


def test_report_asset_has_the_three_checks(defs: dg.Definitions) -> None:
    asset = defs.resolve_assets_def("reconciliation_report")
    assert {k.name for k in asset.check_keys} == CHECK_NAMES
    assert all(k.asset_key == dg.AssetKey("reconciliation_report") for k in asset.check_keys)
    assert isinstance(asset.partitions_def, dg.TimeWindowPartitionsDefinition)
    assert asset.partitions_def.timezone == "Europe/Berlin"


def test_resources_and_settings_defaults(defs: dg.Definitions) -> None:
    from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings

    resources = defs.get_repository_def().get_top_level_resources()
    assert {"postgres", "mongo", "settings"} <= set(resources)
    assert isinstance(defs.resources["postgres"], PostgresResource)
    assert isinstance(defs.resources["mongo"], MongoResource)
    settings = defs.resources["settings"]
    assert isinstance(settings, ReconciliationSettings)
    expected = dict(lookback_hours=48, dry_run=False, max_repairs=1000, amount_tolerance_cents=0,
                    outbox_retention_days=30, repair_low_confidence=False)
    assert {k: getattr(settings, k) for k in expected} == expected
    # the same defaults apply when the launchpad / a run config leaves settings empty
    fresh = ReconciliationSettings()
    assert {k: getattr(fresh, k) for k in expected} == expected


def test_database_urls_come_from_the_environment(defs: dg.Definitions) -> None:
    """Nothing is baked in: the resources resolve RECON_* at run time."""
    postgres = defs.resources["postgres"]
    mongo = defs.resources["mongo"]
    # EnvVar objects (resolved when a run starts), not strings captured at import
    for value, name in ((postgres.url, "RECON_POSTGRES_URL"), (mongo.uri, "RECON_MONGO_URI"), (mongo.database, "RECON_MONGO_DB")):
        assert isinstance(value, dg.EnvVar) and value.env_var_name == name, (value, name)


def test_cli_validates_the_definitions(tmp_path) -> None:
    """`dagster definitions validate` (dagster 1.13) loads the code location and exits 0."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = cli_env(pg_url=LOOPBACK_ENV["RECON_POSTGRES_URL"], mongo_uri=LOOPBACK_ENV["RECON_MONGO_URI"],
                         mongo_db=LOOPBACK_ENV["RECON_MONGO_DB"], dagster_home=home)
    result = run_cli(["definitions", "validate", "-m", DEFS_MODULE], env, timeout=180)
    assert result.returncode == 0, result.describe()
    assert "Validation successful" in result.output or "passed validation" in result.output, result.describe()


def test_preflight_job_and_durable_mongo_defaults(defs: dg.Definitions) -> None:
    """The doctor's job is in the code location; MongoDB writes default to w=majority."""
    job = defs.resolve_job_def("reconciliation_preflight_job")
    assert [n.name for n in job.graph.nodes] == ["preflight_checks"]
    mongo = defs.resources["mongo"]
    assert mongo.mongo_write_concern == "majority" and mongo.allow_weak_write_concern is False


def test_the_report_graph_has_the_ops_the_design_names(defs: dg.Definitions) -> None:
    """open_report -> retry_outbox -> extract_postgres -> (route) -> extract_mongo -> diff -> (merge) -> repair_mongo, cleanup -> finish_report."""
    from reconciliation_pipeline.assets import reconciliation_report

    graph = reconciliation_report.node_def
    upstream = {
        node.name: sorted({dep.node_name for dep in graph.dependency_structure.all_upstream_outputs_from_node(node.name)})
        for node in graph.nodes
    }
    assert upstream == {
        "open_report": [],
        "retry_outbox": ["open_report"],
        "extract_postgres": ["open_report", "retry_outbox"],
        "route_emails": ["extract_postgres"],
        "extract_mongo": ["open_report", "route_emails"],
        "diff": ["extract_mongo", "open_report", "route_emails"],
        "merge_diffs": ["diff"],
        "repair_mongo": ["merge_diffs", "open_report"],
        "cleanup": ["open_report", "retry_outbox"],
        "finish_report": ["cleanup", "open_report", "repair_mongo", "retry_outbox"],
    }
