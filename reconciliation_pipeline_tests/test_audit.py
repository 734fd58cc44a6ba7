"""The audit trail (issue 11): reconciliation_findings is append-only and hash-chained.

Against real PostgreSQL and the wire server, through `reconcile` (the asset in-process):
* UPDATE and DELETE on the audit table fail (the trigger); the outcome of a repair is a new row
  naming its intent row, and the view gives the finding with its newest outcome.
* A row altered, deleted or inserted behind the trigger's back (ALTER TABLE ... DISABLE TRIGGER),
  or a sealed report's counts changed, makes `python -m reconciliation_pipeline.audit verify` exit 1
  naming the row; the `audit_chain_intact` check of the next run fails too.
* Two concurrent materializations (threads) and concurrent appends leave one valid chain.
* Migration 0006 goes up and down with rows present.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from alembic import command

from reconciliation_pipeline import audit
from reconciliation_pipeline.db import alembic_config, upgrade
from reconciliation_pipeline.run.audit_rows import IN_FLIGHT
from reconciliation_pipeline.store import postgres as pg_store
from reconciliation_pipeline_tests.builders import add_client, add_email, creditor, reply
from reconciliation_pipeline_tests.support import database_at

SENDER = "forderungen@sparkasse-bochum.de"


def verify_cli(url: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "reconciliation_pipeline.audit", "verify", "--url", url],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def raw(engine: sa.Engine, sql: str, **params: Any) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


def behind_the_trigger(engine: sa.Engine, sql: str, **params: Any) -> None:
    """What a superuser can do: disable the trigger, change the table, enable it again."""
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE reconciliation_findings DISABLE TRIGGER reconciliation_findings_append_only"))
        conn.execute(sa.text(sql), params)
        conn.execute(sa.text("ALTER TABLE reconciliation_findings ENABLE TRIGGER reconciliation_findings_append_only"))


def chain_check(result: dg.ExecuteInJobResult) -> dg.AssetCheckEvaluation:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}["audit_chain_intact"]


@pytest.fixture
def repaired_run(pg, mongo_db, reconcile):
    """One mismatch, repaired: an intent row, its outcome row and the report's seal."""
    add_client(mongo_db, "542900", [creditor(SENDER, 1000.0)])
    add_email(pg, from_email=SENDER, extracted=reply(amount=1234.56))
    result = reconcile()
    check = chain_check(result)
    assert result.success and check.passed
    # the check publishes the chain's tail in Dagster's event log: an anchor outside the audit table
    tail = raw(pg, "SELECT id, row_hash FROM reconciliation_findings ORDER BY id DESC LIMIT 1")[0]
    assert (check.metadata["audit_last_id"].value, check.metadata["audit_last_hash"].value) == (tail["id"], tail["row_hash"])
    return result


def test_outcome_is_a_new_row_and_update_delete_are_rejected(pg, pg_url, repaired_run):
    rows = raw(pg, "SELECT * FROM reconciliation_findings ORDER BY id")
    intent = next(r for r in rows if r["kind"] == "data_mismatch" and r["intent_id"] is None)
    outcome = next(r for r in rows if r["intent_id"] == intent["id"])
    seal = next(r for r in rows if r["kind"] == audit.SEAL_KIND)
    assert intent["error"] == IN_FLIGHT and outcome["action"] == "repaired" and outcome["mongo_amount_cents_after"] == 123456
    assert seal["sealed_counts"] and '"auto_repaired":1' in seal["sealed_counts"]
    current = raw(pg, "SELECT * FROM reconciliation_findings_current")
    assert [(r["id"], r["action"], r["error"], r["outcome_id"]) for r in current] == [(intent["id"], "repaired", None, outcome["id"])]
    for sql in ("UPDATE reconciliation_findings SET action = 'reported' WHERE id = :i",
                "DELETE FROM reconciliation_findings WHERE id = :i"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with pg.begin() as conn:
                conn.execute(sa.text(sql), {"i": intent["id"]})
    assert raw(pg, "SELECT count(*) AS n FROM reconciliation_findings")[0]["n"] == len(rows)
    assert verify_cli(pg_url) == (0, f"audit chain intact: {len(rows)} rows checked, last id {rows[-1]['id']}\n")


def test_a_row_altered_behind_the_trigger_is_named(pg, pg_url, repaired_run, reconcile):
    intent = raw(pg, "SELECT id FROM reconciliation_findings WHERE kind = 'data_mismatch' AND intent_id IS NULL")[0]["id"]
    behind_the_trigger(pg, "UPDATE reconciliation_findings SET pg_amount_cents = 100000 WHERE id = :i", i=intent)
    code, out = verify_cli(pg_url)
    assert code == 1 and f"broken at row id {intent}:" in out and "altered" in out, out


def test_the_check_of_the_next_run_fails_when_its_verified_point_changed(pg, pg_url, repaired_run, reconcile):
    last = raw(pg, "SELECT max(id) AS i FROM reconciliation_findings")[0]["i"]  # the seal, the last verified point
    behind_the_trigger(pg, "UPDATE reconciliation_findings SET sealed_counts = '{}' WHERE id = :i", i=last)
    result = reconcile()
    check = chain_check(result)
    assert not check.passed and f"row id {last}" in check.description and check.metadata["audit_broken_id"].value == last


def test_a_row_deleted_behind_the_trigger_is_named(pg, pg_url, repaired_run):
    rows = raw(pg, "SELECT id FROM reconciliation_findings ORDER BY id")
    behind_the_trigger(pg, "DELETE FROM reconciliation_findings WHERE id = :i", i=rows[1]["id"])
    code, out = verify_cli(pg_url)
    assert code == 1 and f"broken at row id {rows[2]['id']}:" in out and f"between id {rows[0]['id']}" in out, out


def test_the_last_row_deleted_is_found_by_the_verified_point(pg, pg_url, repaired_run):
    last = raw(pg, "SELECT max(id) AS i FROM reconciliation_findings")[0]["i"]
    behind_the_trigger(pg, "DELETE FROM reconciliation_findings WHERE id = :i", i=last)
    code, out = verify_cli(pg_url)
    assert code == 1 and f"broken at row id {last}:" in out and "missing" in out, out


def test_a_row_inserted_behind_the_trigger_is_named(pg, pg_url, repaired_run):
    tail = raw(pg, "SELECT id, report_id, row_hash FROM reconciliation_findings ORDER BY id DESC LIMIT 1")[0]
    # a forged outcome at the end of the chain that links to the tail but whose hash is made up
    with pg.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO reconciliation_findings (id, report_id, kind, action, prev_hash, row_hash) "
            "VALUES (:i, :r, 'data_mismatch', 'repaired', :p, :h)"), {"i": tail["id"] + 5, "r": tail["report_id"], "p": tail["row_hash"], "h": "f" * 64})
    code, out = verify_cli(pg_url)
    assert code == 1 and f"broken at row id {tail['id'] + 5}:" in out, out
    # and one inserted in the middle of the chain (in a gap of ids), with a valid hash of its own
    behind_the_trigger(pg, "DELETE FROM reconciliation_findings WHERE id = :i", i=tail["id"] + 5)
    first = raw(pg, f"SELECT {', '.join(audit.HASHED)}, prev_hash FROM reconciliation_findings ORDER BY id LIMIT 1")[0]
    behind_the_trigger(pg, "DELETE FROM reconciliation_audit_checkpoints")
    with pg.begin() as conn:  # id 0 is before every row: a forged first row
        forged = {**first, "id": 0, "action": "reported", "prev_hash": audit.GENESIS}
        forged["row_hash"] = audit.row_hash(forged, audit.GENESIS)
        cols = list(audit.HASHED) + ["prev_hash", "row_hash"]
        conn.execute(sa.text(f"INSERT INTO reconciliation_findings ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"), forged)
    code, out = verify_cli(pg_url)
    assert code == 1 and f"broken at row id {first['id']}:" in out and "prev_hash" in out, out


def test_a_sealed_report_changed_afterwards_is_named(pg, pg_url, repaired_run):
    seal = raw(pg, "SELECT id FROM reconciliation_findings WHERE kind = :k", k=audit.SEAL_KIND)[0]["id"]
    with pg.begin() as conn:
        conn.execute(sa.text("UPDATE reconciliation_reports SET auto_repaired = 0"))
    code, out = verify_cli(pg_url)
    assert code == 1 and f"broken at row id {seal}:" in out and "counts" in out, out


MATERIALIZE = """
import sys, dagster as dg
from reconciliation_pipeline.assets import reconciliation_report
from reconciliation_pipeline.io_managers import RunFilesIOManager
from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings
url, mongo_uri, database, partition = sys.argv[1:5]
result = dg.materialize([reconciliation_report], partition_key=partition, instance=dg.DagsterInstance.ephemeral(), resources={
    "postgres": PostgresResource(url=url), "settings": ReconciliationSettings(repair_lock_wait_seconds=60),
    "mongo": MongoResource(uri=mongo_uri, database=database, server_selection_timeout_ms=3000), "io_manager": RunFilesIOManager()})
sys.exit(0 if result.success else 1)
"""


def test_two_concurrent_runs_leave_one_valid_chain(pg, pg_url, mongo_db, service_env):
    add_client(mongo_db, "542900", [creditor(SENDER, 1000.0)])
    add_email(pg, from_email=SENDER, extracted=reply(amount=1234.56))
    runs = [subprocess.Popen([sys.executable, "-c", MATERIALIZE, pg_url, service_env["RECON_MONGO_URI"], mongo_db.name, p],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for p in ("2026-11-28-10:00", "2026-11-28-11:00")]  # two processes materializing at once
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
    assert len(raw(pg, "SELECT id FROM reconciliation_findings WHERE kind = :k", k=audit.SEAL_KIND)) == 2
    assert verify_cli(pg_url)[0] == 0

    def appender(n: int) -> None:  # appends racing each other, many times
        report = raw(pg, "SELECT min(id) AS i FROM reconciliation_reports")[0]["i"]
        for _ in range(15):
            pg_store.insert_findings(pg, [{"report_id": report, "kind": "data_mismatch", "action": "reported", "email_id": n}] * 3)

    racers = [threading.Thread(target=appender, args=(n,)) for n in range(4)]
    for t in racers:
        t.start()
    for t in racers:
        t.join(120)
    rows = raw(pg, "SELECT id, prev_hash, row_hash FROM reconciliation_findings ORDER BY id")
    assert len(rows) >= 4 * 15 * 3 + 2
    assert [r["prev_hash"] for r in rows[1:]] == [r["row_hash"] for r in rows[:-1]]  # one chain, no fork
    assert verify_cli(pg_url)[0] == 0


def test_migration_0006_up_and_down_with_rows(pg_url):
    with database_at(pg_url, "0005", prefix="recon_audit_mig") as (url, engine):
        with engine.begin() as conn:
            report = conn.execute(sa.text(
                "INSERT INTO reconciliation_reports (run_id, status) VALUES ('r1', 'completed') RETURNING id")).scalar_one()
            for action, error in (("reported", None), ("repair_failed", IN_FLIGHT)):
                conn.execute(sa.text("INSERT INTO reconciliation_findings (report_id, kind, action, error, pg_amount_cents) "
                                     "VALUES (:r, 'data_mismatch', :a, :e, 500)"), {"r": report, "a": action, "e": error})
        upgrade(url)
        rows = raw(engine, "SELECT id, prev_hash, row_hash FROM reconciliation_findings ORDER BY id")
        assert rows[0]["prev_hash"] == audit.GENESIS and rows[1]["prev_hash"] == rows[0]["row_hash"]
        assert verify_cli(url)[0] == 0
        pg_store.append_finding_outcomes(engine, [{"finding_id": rows[1]["id"], "action": "repaired", "error": None, "after": 500, "before": 100}])
        with engine.begin() as conn:
            audit.seal_report(conn, report)
        assert verify_cli(url)[0] == 0 and len(raw(engine, "SELECT id FROM reconciliation_findings")) == 4

        command.downgrade(alembic_config(url), "0005")  # the outcome folds back into its intent row
        assert raw(engine, "SELECT id, action, error, mongo_amount_cents_before, mongo_amount_cents_after FROM reconciliation_findings ORDER BY id") == [
            {"id": rows[0]["id"], "action": "reported", "error": None, "mongo_amount_cents_before": None, "mongo_amount_cents_after": None},
            {"id": rows[1]["id"], "action": "repaired", "error": None, "mongo_amount_cents_before": 100, "mongo_amount_cents_after": 500},
        ]
        with engine.begin() as conn:  # no trigger any more
            conn.execute(sa.text("UPDATE reconciliation_findings SET action = 'reported' WHERE id = :i"), {"i": rows[1]["id"]})
        upgrade(url)
        assert verify_cli(url)[0] == 0
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM reconciliation_findings"))
