"""End to end through the `dagster` CLI and `dagster-daemon`, against real PostgreSQL and the MongoDB wire server.

  a. `dagster job execute` for one partition: repairs, report row, materialization, checks; a
     second run of the same partition writes nothing.
  b. the same with a run config file (lookback 1 h, dry run): reported, nothing written.
  c. `dagster job backfill` of three partitions, launched by a running daemon over PostgreSQL
     storage and the QueuedRunCoordinator; backfilling again is safe.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from reconciliation_pipeline_tests.builders import IN_WINDOW, PARTITION, WINDOW_END, add_client, add_email, creditor, reply
from reconciliation_pipeline_tests.support import (
    CHECK_NAMES, DEFS_MODULE, JOB, Daemon, amounts, check_evaluations, cli_env, execute_args, finding_rows,
    job_runs, materializations, mongo_snapshot, partition_end_utc, postgres_home, report_rows, run_cli, run_debug,
    scratch_database, wait_until, write_config,
)

pytestmark = pytest.mark.e2e

SPARKASSE = "forderungen@sparkasse-bochum.de"
TELEKOM = "mahnwesen@telekom.de"
VODAFONE = "forderung@vodafone.de"
NUMERIC_METADATA = ("records_checked", "mismatches_found", "auto_repaired", "failed_repairs", "outbox_retried",
                    "outbox_dead", "unrepaired_findings")


def execute_partition(env: dict[str, str], partition: str, *extra: str) -> Any:
    return run_cli([*execute_args(partition), *extra], env, timeout=300)


def seed_mismatch_and_missing(pg: sa.Engine, mongo_db: Any, at=IN_WINDOW) -> dict[tuple[str, str], Any]:
    """A data_mismatch (Sparkasse) and a missing_in_mongo (Telekom) for client 542900; returns the expected amounts."""
    add_client(mongo_db, "542900", [
        creditor(SPARKASSE, 999.99),
        creditor(TELEKOM, name="Telekom Deutschland GmbH"),  # asked, no answer recorded yet
    ])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount="1.234,56"), received_at=at)
    add_email(pg, from_email=TELEKOM, extracted=reply(amount=250.0, creditor_name="Telekom Deutschland GmbH"),
              received_at=at + timedelta(minutes=5))
    return {("542900", SPARKASSE): 1234.56, ("542900", TELEKOM): 250.0}


# ------------------------------------------------------------------------------------------- a


def test_job_execute_repairs_reports_materializes_and_is_idempotent(pg, mongo_db, run_env, sqlite_dagster_home):
    expected = seed_mismatch_and_missing(pg, mongo_db)
    assert amounts(mongo_db) != expected

    first = execute_partition(run_env, PARTITION)
    assert first.returncode == 0, first.describe()

    # PostgreSQL: exactly one completed report for the partition, run by this Dagster run
    with dg.DagsterInstance.from_config(str(sqlite_dagster_home)) as instance:
        runs = job_runs(instance)
        assert len(runs) == 1, run_debug(instance)
        run = runs[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS, run_debug(instance)
        assert run.tags.get("dagster/partition") == PARTITION
        [report] = report_rows(pg)
        assert report["status"] == "completed", report
        assert report["partition_key"] == PARTITION
        assert report["run_id"] == run.run_id
        assert report["window_end"] == WINDOW_END
        assert report["window_start"] == WINDOW_END - timedelta(hours=48)  # default lookback
        assert report["dry_run"] is False and report["mongo_available"] is True
        assert report["records_checked"] == 2
        assert report["mismatches_found"] == 2
        assert report["auto_repaired"] == 2 and report["failed_repairs"] == 0
        assert sorted((f["kind"], f["action"]) for f in finding_rows(pg, report["id"])) == [
            ("data_mismatch", "repaired"), ("missing_in_mongo", "repaired")]

        # MongoDB holds PostgreSQL's amounts; the rest of the elements is untouched
        assert amounts(mongo_db) == expected
        doc = mongo_db.clients.find_one({"aktenzeichen": "542900"})
        assert [e["claim_amount"] for e in doc["final_creditor_list"]] == [1500.0, 1500.0]

        # Dagster: the partition's materialization with numeric metadata, and the three checks
        records = materializations(instance, [PARTITION])
        assert len(records) == 1
        mat = records[0].event_log_entry.asset_materialization
        assert mat.partition == PARTITION and records[0].run_id == run.run_id
        for key in NUMERIC_METADATA:
            assert isinstance(mat.metadata[key], dg.IntMetadataValue), (key, mat.metadata.get(key))
        assert mat.metadata["records_checked"].value == 2
        assert mat.metadata["mismatches_found"].value == 2
        assert mat.metadata["auto_repaired"].value == 2
        assert mat.metadata["unrepaired_findings"].value == 0
        assert isinstance(mat.metadata["drift_rate"], dg.FloatMetadataValue)
        assert mat.metadata["report_id"].value == report["id"]
        checks = check_evaluations(instance, run.run_id)
        assert set(checks) == CHECK_NAMES
        assert all(c.passed for c in checks.values()), {n: (c.passed, c.description) for n, c in checks.items()}
        assert all(c.asset_key == dg.AssetKey("reconciliation_report") for c in checks.values())

    after_first = mongo_snapshot(mongo_db)

    # Second run of the same partition: a new report, nothing found, nothing written
    second = execute_partition(run_env, PARTITION)
    assert second.returncode == 0, second.describe()
    with dg.DagsterInstance.from_config(str(sqlite_dagster_home)) as instance:
        runs = job_runs(instance)
        assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), run_debug(instance)
        second_run = next(r for r in runs if r.run_id != run.run_id)
        rows = report_rows(pg)
        assert len(rows) == 2
        again = rows[1]
        assert again["run_id"] == second_run.run_id and again["partition_key"] == PARTITION
        assert again["status"] == "completed"
        assert again["records_checked"] == 2
        assert again["mismatches_found"] == 0 and again["auto_repaired"] == 0 and again["failed_repairs"] == 0
        assert finding_rows(pg, again["id"]) == []
        assert len(materializations(instance, [PARTITION])) == 2
        assert all(c.passed for c in check_evaluations(instance, second_run.run_id).values())
    assert mongo_snapshot(mongo_db) == after_first


# ------------------------------------------------------------------------------------------- b


def test_job_execute_with_run_config_dry_run_and_short_lookback(pg, mongo_db, run_env, tmp_path):
    # inside the last hour of the window: seen with lookback 1
    expected_if_repaired = seed_mismatch_and_missing(pg, mongo_db, at=WINDOW_END - timedelta(minutes=30))
    # two hours before the end: outside a one-hour window, so not even reported
    add_client(mongo_db, "542901", [creditor(VODAFONE, 10.0, name="Vodafone GmbH")], first="Erika", last="Musterfrau")
    add_email(pg, from_email=VODAFONE, extracted=reply(az="542901", amount=20.0, creditor_name="Vodafone GmbH",
                                                        name="Musterfrau, Erika"), received_at=IN_WINDOW)
    before = mongo_snapshot(mongo_db)
    config = write_config(tmp_path / "run_config.yaml", lookback_hours=1, dry_run=True)

    result = execute_partition(run_env, PARTITION, "-c", str(config))
    assert result.returncode == 0, result.describe()

    [report] = report_rows(pg)
    assert report["status"] == "completed", report
    assert report["dry_run"] is True
    assert report["window_end"] == WINDOW_END
    assert report["window_start"] == WINDOW_END - timedelta(hours=1)
    assert report["records_checked"] == 2  # the Vodafone email is outside the window
    assert report["mismatches_found"] == 2 and report["auto_repaired"] == 0
    found = finding_rows(pg, report["id"])
    assert sorted((f["kind"], f["action"]) for f in found) == [
        ("data_mismatch", "skipped_dry_run"), ("missing_in_mongo", "skipped_dry_run")]
    assert {f["client_aktenzeichen"] for f in found} == {"542900"}
    assert mongo_snapshot(mongo_db) == before
    assert amounts(mongo_db) != expected_if_repaired


# ------------------------------------------------------------------------------------------- c

BACKFILL_PARTITIONS = ["2026-11-28-08:00", "2026-11-28-09:00", "2026-11-28-10:00"]
# `dagster job backfill` (1.13) has no --config option: the lookback comes from the run tag
# `reconciliation/lookback_hours`, which `--tags` puts on every run of the backfill.
BACKFILL_LOOKBACK = timedelta(hours=1)
BACKFILL_TIMEOUT = 240


@pytest.fixture
def daemon_setup(pg, pg_url, mongo_db, service_env, tmp_path):
    """A DAGSTER_HOME with PostgreSQL storage in a fresh database, and a running dagster-daemon."""
    with scratch_database(pg_url) as dagster_pg_url:
        home = postgres_home(tmp_path / "dagster_home")
        env = cli_env(pg_url=pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db.name,
                      dagster_home=home, dagster_postgres_url=dagster_pg_url)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DAGSTER_POSTGRES_URL", dagster_pg_url)  # for DagsterInstance.from_config in this process
            with dg.DagsterInstance.from_config(str(home)) as instance:  # creates the storage schema once
                # The hourly schedule is RUNNING by default: stop it, or a tick at :05 would reconcile
                # the current hour's 48 h window (which covers the seeded emails) in the middle of the test.
                stopped = run_cli(["schedule", "stop", "reconciliation_hourly_schedule", "-m", DEFS_MODULE], env, timeout=180)
                assert stopped.returncode == 0, stopped.describe()
                daemon = Daemon(env, tmp_path / "daemon.log")
                try:
                    yield {"env": env, "home": home, "instance": instance, "daemon": daemon}
                finally:
                    daemon.stop()
                    print("---- dagster-daemon log (tail) ----\n" + daemon.log(8_000))


def seed_three_hours(pg: sa.Engine, mongo_db: Any) -> dict[str, dict]:
    """Per backfill partition one email created inside the partition's hour whose amount MongoDB lacks."""
    cases = {
        BACKFILL_PARTITIONS[0]: dict(az="542900", first="Max", last="Mustermann", email=SPARKASSE, name="Sparkasse Bochum",
                                     mongo=999.99, pg="1.234,56", expected=1234.56),
        BACKFILL_PARTITIONS[1]: dict(az="542901", first="Erika", last="Musterfrau", email=TELEKOM, name="Telekom Deutschland GmbH",
                                     mongo=None, pg=250.0, expected=250.0),
        BACKFILL_PARTITIONS[2]: dict(az="542902", first="Jürgen", last="Müller", email=VODAFONE, name="Vodafone GmbH",
                                     mongo=10.0, pg="77,70 EUR", expected=77.7),
    }
    for partition, case in cases.items():
        hour_start = partition_end_utc(partition) - timedelta(hours=1)
        add_client(mongo_db, case["az"], [creditor(case["email"], case["mongo"], name=case["name"])],
                   first=case["first"], last=case["last"])
        case["email_id"] = add_email(
            pg, from_email=case["email"], received_at=hour_start + timedelta(minutes=20),
            extracted=reply(az=case["az"], amount=case["pg"], creditor_name=case["name"], name=f"{case['last']}, {case['first']}"),
        )
    return cases


def _wait_for_reports(pg: sa.Engine, setup: dict, count: int) -> list[dict]:
    instance, daemon = setup["instance"], setup["daemon"]

    def done() -> list[dict] | None:
        assert daemon.alive, f"dagster-daemon exited with {daemon.proc.returncode}\n{daemon.log()}"
        rows = report_rows(pg, BACKFILL_PARTITIONS)
        failed = [r for r in rows if r["status"] == "failed"]
        bad_runs = [r for r in job_runs(instance) if r.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)]
        assert not failed and not bad_runs, f"{failed}\n{run_debug(instance)}\n{daemon.log()}"
        completed = [r for r in rows if r["status"] == "completed"]
        if len(completed) < count:
            return None
        # the report is completed by the last op; the Dagster run ends a moment later
        statuses = {r.run_id: r.status for r in job_runs(instance)}
        finished = all(statuses.get(r["run_id"]) == dg.DagsterRunStatus.SUCCESS for r in completed)
        return rows if finished else None

    return wait_until(done, timeout=BACKFILL_TIMEOUT, interval=2, what=f"{count} completed reports",
                      on_timeout=lambda: f"reports: {[(r['partition_key'], r['status']) for r in report_rows(pg)]}\n"
                                         f"{run_debug(instance)}\n---- daemon log ----\n{setup['daemon'].log()}")


def _backfill(setup: dict) -> None:
    result = run_cli(["job", "backfill", "-m", DEFS_MODULE, "-j", JOB, "--partitions", ",".join(BACKFILL_PARTITIONS),
                      "--tags", '{"reconciliation/lookback_hours": "1"}', "--noprompt"], setup["env"], timeout=240)
    assert result.returncode == 0, result.describe()
    assert "Launched backfill" in result.output, result.describe()


def test_daemon_backfill_of_three_partitions_and_again(pg, mongo_db, daemon_setup):
    setup, instance = daemon_setup, daemon_setup["instance"]
    cases = seed_three_hours(pg, mongo_db)
    expected = {(c["az"], c["email"]): c["expected"] for c in cases.values()}
    assert amounts(mongo_db) != expected

    started = time.monotonic()
    _backfill(setup)
    rows = _wait_for_reports(pg, setup, 3)
    print(f"first backfill: 3 reports completed in {time.monotonic() - started:.1f}s")

    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows), rows
    by_partition = {r["partition_key"]: r for r in rows}
    assert sorted(by_partition) == BACKFILL_PARTITIONS  # one report per partition
    runs = {r.run_id: r for r in job_runs(instance)}
    for partition, report in by_partition.items():
        end = partition_end_utc(partition)
        assert report["window_end"] == end, (partition, report["window_end"])
        assert report["window_start"] == end - BACKFILL_LOOKBACK, (partition, report["window_start"])
        assert report["dry_run"] is False and report["mongo_available"] is True
        run = runs[report["run_id"]]
        assert run.tags.get("dagster/partition") == partition and run.tags.get("dagster/backfill")
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert report["failed_repairs"] == 0
        assert run.tags.get("reconciliation/mongo-writer") == "1"  # the tag the run queue limits to one at a time

    # the queue's tag concurrency limit: the backfill's runs never overlapped
    spans = sorted((instance.get_run_stats(r["run_id"]).start_time, instance.get_run_stats(r["run_id"]).end_time)
                   for r in rows)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    # every seeded drift was repaired exactly once, by a run whose window contains the email
    repaired = [(r, f) for r in rows for f in finding_rows(pg, r["id"]) if f["action"] == "repaired"]
    assert Counter(f["email_id"] for _, f in repaired) == Counter(c["email_id"] for c in cases.values())
    created = {c["email_id"]: partition_end_utc(p) - timedelta(minutes=40) for p, c in cases.items()}
    for report, finding in repaired:
        assert report["window_start"] <= created[finding["email_id"]] < report["window_end"]
    assert sum(r["auto_repaired"] for r in rows) == 3
    # with a one-hour lookback each hour sees, and repairs, exactly its own email
    assert [by_partition[p]["auto_repaired"] for p in BACKFILL_PARTITIONS] == [1, 1, 1]
    assert [by_partition[p]["records_checked"] for p in BACKFILL_PARTITIONS] == [1, 1, 1]
    assert amounts(mongo_db) == expected

    mats = materializations(instance, BACKFILL_PARTITIONS)
    assert sorted(m.event_log_entry.asset_materialization.partition for m in mats) == BACKFILL_PARTITIONS
    for m in mats:
        assert isinstance(m.event_log_entry.asset_materialization.metadata["records_checked"], dg.IntMetadataValue)
        assert set(check_evaluations(instance, m.run_id)) == CHECK_NAMES

    # The same backfill again: three more completed reports, no repairs, MongoDB unchanged
    after_first = mongo_snapshot(mongo_db)
    started = time.monotonic()
    _backfill(setup)
    rows = _wait_for_reports(pg, setup, 6)
    print(f"second backfill: 3 more reports completed in {time.monotonic() - started:.1f}s")
    assert len(rows) == 6 and all(r["status"] == "completed" for r in rows)
    second = rows[3:]
    assert sorted(r["partition_key"] for r in second) == BACKFILL_PARTITIONS
    for report in second:
        assert report["auto_repaired"] == 0 and report["mismatches_found"] == 0 and report["failed_repairs"] == 0, report
        assert finding_rows(pg, report["id"]) == []
    assert mongo_snapshot(mongo_db) == after_first
    assert len({r["run_id"] for r in rows}) == 6
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in job_runs(instance)), run_debug(instance)
    assert Counter(m.event_log_entry.asset_materialization.partition
                   for m in materializations(instance, BACKFILL_PARTITIONS)) == {p: 2 for p in BACKFILL_PARTITIONS}
