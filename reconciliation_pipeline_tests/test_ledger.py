"""The drift ledger (issue 11): one reconciliation_drift row per problem, opened, refreshed and resolved
by the runs that compare its pair, with its root cause; the asset's drift metadata and the ledger CLI.

Real PostgreSQL and the MongoDB wire server, through the asset (`reconcile`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import sqlalchemy as sa

from reconciliation_pipeline.resources import MongoResource
from reconciliation_pipeline_tests.builders import IN_WINDOW, add_client, add_email, add_outbox, creditor, reply, reports
from reconciliation_pipeline_tests.support import free_port

SENDER = "forderungen@sparkasse-bochum.de"
KEY = f"542900|{SENDER}|data_mismatch"
OLDER_PARTITION = "2026-11-28-09:00"  # ends 09:00 UTC: its 48-hour window still holds the email at 08:00 UTC


def drift(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["problem_key"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM reconciliation_drift ORDER BY id")).mappings()}


def mismatch(pg, mongo_db, **element):
    """PostgreSQL says 1,234.56, MongoDB 1,000.00: one data_mismatch for (542900, SENDER)."""
    add_client(mongo_db, "542900", [creditor(SENDER, 1000.0, **element)])
    return add_email(pg, from_email=SENDER, extracted=reply(amount=1234.56))


def set_mongo_amount(mongo_db, amount):
    doc = mongo_db.clients.find_one({"aktenzeichen": "542900"})
    doc["final_creditor_list"][0].update(creditor_response_amount=amount, current_debt_amount=amount)
    mongo_db.clients.replace_one({"_id": doc["_id"]}, doc)
    assert mongo_db.clients.find_one({"_id": doc["_id"]})["final_creditor_list"][0]["creditor_response_amount"] == amount


def materialization(result):
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def table_rows(result) -> list[dict]:
    """The findings table of the run's materialization, as records."""
    [event] = result.get_asset_materialization_events()
    return [dict(r.data) for r in event.materialization.metadata["findings"].records]


def check(result, name):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_a_problem_seen_in_two_runs_is_one_open_row_seen_twice(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    first = reconcile(max_repairs=0)  # the budget holds the repair back: the problem stays
    second = reconcile(max_repairs=0)
    assert first.success and second.success
    rows = drift(pg)
    assert list(rows) == [KEY]
    row = rows[KEY]
    r1, r2 = (r["id"] for r in reports(pg))
    assert (row["status"], row["times_seen"], row["first_report_id"], row["last_report_id"]) == ("open", 2, r1, r2)
    assert (row["pg_amount_cents"], row["mongo_amount_cents"], row["cause"], row["resolution"]) == (123456, 100000, "unknown", None)
    assert row["client_aktenzeichen"] == "542900" and row["creditor_email"] == SENDER
    assert row["last_seen_at"] >= row["first_seen_at"]
    meta = materialization(first), materialization(second)
    assert [(m["drift_open"], m["drift_opened"], m["drift_resolved"]) for m in meta] == [(1, 1, 0), (1, 0, 0)]
    assert meta[1]["drift_open_unknown"] == 1 and meta[1]["drift_open_outbox_pending"] == 0
    assert isinstance(meta[1]["drift_oldest_open_hours"], float) and meta[1]["drift_oldest_open_hours"] >= 0
    description = check(second, "no_unrepaired_drift").description
    assert "Drift ledger: 1 open problems, the oldest open for" in description
    # the findings table says how often the ledger has seen each problem, and why it happened
    assert [(r["aktenzeichen"], r["kind"], r["times_seen"], r["cause"]) for r in table_rows(first)] == [
        ("542900", "data_mismatch", 1, "unknown")]
    assert [(r["aktenzeichen"], r["kind"], r["times_seen"], r["cause"]) for r in table_rows(second)] == [
        ("542900", "data_mismatch", 2, "unknown")]


def test_fixed_at_the_source_resolves_as_fixed_at_source(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    assert reconcile(max_repairs=0).success
    set_mongo_amount(mongo_db, 1234.56)  # someone corrected the portal
    result = reconcile(max_repairs=0)
    row = drift(pg)[KEY]
    assert (row["status"], row["resolution"], row["resolved_report_id"], row["times_seen"]) == ("resolved", "fixed_at_source", reports(pg)[1]["id"], 1)
    assert row["resolved_at"] is not None
    meta = materialization(result)
    assert (meta["drift_open"], meta["drift_opened"], meta["drift_resolved"]) == (0, 0, 1)
    assert "Drift ledger: 0 open problems" in check(result, "no_unrepaired_drift").description


def test_repaired_resolves_as_repaired(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    assert reconcile(max_repairs=0).success
    assert reconcile().success  # this run repairs and verifies it
    assert mongo_db.clients.find_one()["final_creditor_list"][0]["creditor_response_amount"] == 1234.56
    row = drift(pg)[KEY]
    assert (row["status"], row["resolution"], row["times_seen"], row["resolved_report_id"]) == ("resolved", "repaired", 2, reports(pg)[1]["id"])
    assert reconcile().success  # clean now: nothing changes
    assert drift(pg)[KEY]["resolved_report_id"] == reports(pg)[1]["id"]


def test_repaired_in_its_first_run_is_recorded_resolved(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    result = reconcile()
    row = drift(pg)[KEY]
    assert (row["status"], row["resolution"], row["times_seen"]) == ("resolved", "repaired", 1)
    meta = materialization(result)
    assert (meta["drift_open"], meta["drift_opened"], meta["drift_resolved"]) == (0, 1, 1)


def test_a_backfill_of_an_older_partition_neither_resolves_nor_refreshes_nor_reopens(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    assert reconcile(max_repairs=0).success
    before = drift(pg)[KEY]
    assert reconcile(OLDER_PARTITION, max_repairs=0).success  # sees the problem again, with older evidence
    assert drift(pg)[KEY] == before
    set_mongo_amount(mongo_db, 1234.56)
    assert reconcile(OLDER_PARTITION, max_repairs=0).success  # the pair is clean, but the evidence is older
    assert drift(pg)[KEY] == before
    assert reconcile(max_repairs=0).success  # the current partition resolves it
    resolved = drift(pg)[KEY]
    assert (resolved["status"], resolved["resolution"]) == ("resolved", "fixed_at_source")
    set_mongo_amount(mongo_db, 1000.0)  # broken again: an older partition does not reopen it
    assert reconcile(OLDER_PARTITION, max_repairs=0).success
    assert drift(pg)[KEY] == resolved
    assert reconcile(max_repairs=0).success  # the current one does
    reopened = drift(pg)[KEY]
    assert (reopened["status"], reopened["resolution"], reopened["times_seen"]) == ("open", None, 2)


def test_a_pair_not_compared_keeps_its_state_mongo_down_and_dry_run(pg, mongo_db, resources, reconcile):
    mismatch(pg, mongo_db)
    assert reconcile(max_repairs=0).success
    before = drift(pg)[KEY]
    set_mongo_amount(mongo_db, 1234.56)
    assert reconcile(dry_run=True).success  # a dry run compares but changes nothing, the ledger neither
    assert drift(pg)[KEY] == before
    add_email(pg, from_email="inkasso@example.org", extracted=reply(az="777777", amount=5))  # a new problem
    dry = reconcile(dry_run=True)
    assert dry.success and list(drift(pg)) == [KEY]
    # the table shows the ledger as it stands: the known problem is not counted again, the new one is not in it
    assert sorted((r["aktenzeichen"], r["times_seen"]) for r in table_rows(dry)) == [("777777", None)]
    port = free_port()
    real = resources["mongo"]
    resources["mongo"] = MongoResource(uri=f"mongodb://127.0.0.1:{port}/?directConnection=true", database=mongo_db.name,
                                       server_selection_timeout_ms=500)
    result = reconcile()
    assert result.success and reports(pg)[-1]["mongo_available"] is False
    assert list(drift(pg)) == [KEY] and drift(pg)[KEY] == before
    meta = materialization(result)
    assert (meta["drift_open"], meta["drift_opened"], meta["drift_resolved"]) == (1, 0, 0)
    assert "not updated by this run" in check(result, "no_unrepaired_drift").description
    resources["mongo"] = real
    assert reconcile().success
    rows = drift(pg)
    assert rows[KEY]["resolution"] == "fixed_at_source"
    assert rows["777777|inkasso@example.org|client_not_found"]["status"] == "open"


def test_a_pair_outside_the_window_keeps_its_state(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    assert reconcile(max_repairs=0).success
    before = drift(pg)[KEY]
    set_mongo_amount(mongo_db, 1234.56)
    assert reconcile(max_repairs=0, lookback_hours=1).success  # [09:00, 10:00): the email of 08:00 is not compared
    assert drift(pg)[KEY] == before


# --- causes ---------------------------------------------------------------------------------------

def test_cause_unknown_and_amounts(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    assert reconcile(max_repairs=0).success
    assert drift(pg)[KEY]["cause"] == "unknown"


def test_cause_outbox_pending(pg, mongo_db, reconcile):
    email_id = mismatch(pg, mongo_db)
    # a message for the email that cannot be delivered (its creditor is not in the client's list): it waits
    message = add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": "nobody@example.org",
                              "creditor_name": "Niemand Inkasso", "new_debt_amount": 1234.56},
                         aggregate_type="incoming_email", aggregate_id=str(email_id))
    result = reconcile(max_repairs=0)
    assert result.success
    rows = drift(pg)
    assert (rows[KEY]["cause"], rows[KEY]["outbox_message_id"]) == ("outbox_pending", message)
    delivery = rows[f"outbox:{message}|outbox_delivery"]
    assert (delivery["status"], delivery["cause"], delivery["kind"]) == ("open", "outbox_pending", "outbox_delivery")
    assert materialization(result)["drift_open_outbox_pending"] == 2
    assert [(r["kind"], r["times_seen"], r["cause"]) for r in table_rows(result)] == [("data_mismatch", 1, "outbox_pending")]


def test_cause_outbox_dead(pg, mongo_db, reconcile):
    email_id = mismatch(pg, mongo_db)
    add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": SENDER, "new_debt_amount": 1234.56},
               aggregate_type="incoming_email", aggregate_id=str(email_id), retry_count=5, max_retries=5,
               error_message="MongoDB write failed")
    result = reconcile(max_repairs=0)
    assert drift(pg)[KEY]["cause"] == "outbox_dead"
    assert materialization(result)["drift_open_outbox_dead"] == 1


def test_cause_sync_failed(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    with pg.begin() as conn:  # a newer email of the pair whose sync failed (no outbox message)
        failed = add_email(pg, from_email=SENDER, extracted=reply(amount=1234.56), received_at=IN_WINDOW + timedelta(minutes=5),
                           sync_status="failed")
        conn.execute(sa.text("UPDATE incoming_emails SET sync_error = 'portal timeout' WHERE id = :i"), {"i": failed})
    assert reconcile(max_repairs=0).success
    assert drift(pg)[KEY]["cause"] == "sync_failed"


def test_cause_portal_newer(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db, response_received_at=IN_WINDOW + timedelta(minutes=30))  # answered in the portal later
    assert reconcile().success  # not repairable: MongoDB holds the newer answer
    row = drift(pg)[KEY]
    assert (row["cause"], row["status"]) == ("portal_newer", "open")


def test_cause_invalid_source(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 1000.0)])
    add_email(pg, from_email=SENDER, extracted=reply(amount="about a thousand"))
    assert reconcile().success
    row = drift(pg)[f"542900|{SENDER}|invalid_pg_amount"]
    assert (row["cause"], row["status"], row["pg_amount_cents"]) == ("invalid_source", "open", None)


def test_cause_unmatched_and_a_name_only_email_has_a_stable_key(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 1000.0)])
    email_id = add_email(pg, from_email=SENDER, extracted=reply(az=None, name="Unbekannt, Erika", amount=10))
    assert reconcile().success and reconcile().success
    [row] = drift(pg).values()
    assert row["problem_key"] == f"email:{email_id}|{SENDER}|client_not_found"
    assert (row["cause"], row["times_seen"], row["client_aktenzeichen"]) == ("unmatched", 2, None)


def test_superseded_outbox_message_resolves_its_problems_as_superseded(pg, mongo_db, reconcile):
    email_id = mismatch(pg, mongo_db)
    message = add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": "nobody@example.org",
                              "creditor_name": "Niemand Inkasso", "new_debt_amount": 1234.56},
                         aggregate_type="incoming_email", aggregate_id=str(email_id))
    assert reconcile(max_repairs=0).success
    assert drift(pg)[KEY]["cause"] == "outbox_pending"
    # the message is corrected, but the creditor has since written again (1,000.00, what MongoDB holds)
    with pg.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_messages SET payload = CAST(:p AS json) WHERE id = :i"), {"i": message, "p": json.dumps(
            {"client_aktenzeichen": "542900", "creditor_email": SENDER, "creditor_name": "Sparkasse Bochum", "new_debt_amount": 1234.56})})
    add_email(pg, from_email=SENDER, extracted=reply(amount=1000.0), received_at=IN_WINDOW + timedelta(minutes=30))
    assert reconcile(max_repairs=0).success
    rows = drift(pg)
    assert (rows[KEY]["status"], rows[KEY]["resolution"]) == ("resolved", "superseded")
    delivery = rows[f"outbox:{message}|outbox_delivery"]
    assert (delivery["status"], delivery["resolution"]) == ("resolved", "superseded")
    assert mongo_db.clients.find_one()["final_creditor_list"][0]["creditor_response_amount"] == 1000.0


def test_a_delivered_outbox_message_resolves_its_delivery_problem_as_repaired(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 1000.0)])
    message = add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": "nobody@example.org",
                              "creditor_name": "Niemand Inkasso", "new_debt_amount": 1234.56})
    assert reconcile().success
    assert drift(pg)[f"outbox:{message}|outbox_delivery"]["status"] == "open"
    with pg.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_messages SET payload = CAST(:p AS json) WHERE id = :i"), {"i": message, "p": json.dumps(
            {"client_aktenzeichen": "542900", "creditor_email": SENDER, "creditor_name": "Sparkasse Bochum", "new_debt_amount": 1234.56})})
    assert reconcile().success
    row = drift(pg)[f"outbox:{message}|outbox_delivery"]
    assert (row["status"], row["resolution"]) == ("resolved", "repaired")


# --- CLI ------------------------------------------------------------------------------------------

def _ledger_cli(pg_url, *args):
    env = {**os.environ, "RECON_POSTGRES_URL": pg_url}
    return subprocess.run([sys.executable, "-m", "reconciliation_pipeline.ledger", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_ledger_cli_lists_open_problems_all_and_json_without_names(pg, pg_url, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    add_client(mongo_db, "610001", [creditor("inkasso@example.org", 50.0)], first="Erika", last="Musterfrau")
    add_email(pg, from_email="inkasso@example.org", extracted=reply(az="610001", amount=75, name="Musterfrau, Erika",
                                                                   creditor_name="Sparkasse Bochum"))
    assert reconcile(max_repairs=0).success
    set_mongo_amount(mongo_db, 1234.56)
    assert reconcile(max_repairs=0).success  # 542900 fixed at the source, 610001 still open

    out = _ledger_cli(pg_url)
    assert out.returncode == 0, out.stderr
    assert "610001" in out.stdout and "inkasso@example.org" in out.stdout and "data_mismatch" in out.stdout
    assert "unknown" in out.stdout and "75.00" in out.stdout and "50.00" in out.stdout
    assert "542900" not in out.stdout
    assert "1 open problems" in out.stderr

    everything = _ledger_cli(pg_url, "--all")
    assert everything.returncode == 0 and "542900" in everything.stdout and "fixed_at_source" in everything.stdout

    as_json = _ledger_cli(pg_url, "--all", "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert {(r["client_aktenzeichen"], r["status"]) for r in rows} == {("542900", "resolved"), ("610001", "open")}
    assert {"cause", "kind", "creditor_email", "age_hours", "pg_amount_cents", "mongo_amount_cents", "times_seen"} <= set(rows[0])
    for text in (out.stdout, everything.stdout, as_json.stdout):
        assert "Mustermann" not in text and "Musterfrau" not in text and "Erika" not in text


# --- one transaction, once per report ----------------------------------------------------------------

def test_the_ledger_update_is_part_of_the_transaction_that_completes_the_report(pg, mongo_db, reconcile):
    mismatch(pg, mongo_db)
    with pg.begin() as conn:  # the ledger update fails: the report must not be completed either
        conn.execute(sa.text("ALTER TABLE reconciliation_drift RENAME TO reconciliation_drift_away"))
    try:
        result = reconcile(max_repairs=0, raise_on_error=False)
    finally:
        with pg.begin() as conn:
            conn.execute(sa.text("ALTER TABLE reconciliation_drift_away RENAME TO reconciliation_drift"))
    assert not result.success
    [report] = reports(pg)
    assert report["status"] == "failed" and report["completed_at"] is not None
    assert report["records_checked"] == 0  # the counts were rolled back with the ledger update
    assert drift(pg) == {}
    assert reconcile(max_repairs=0).success
    assert drift(pg)[KEY]["status"] == "open"


def test_the_same_report_applied_twice_counts_once(pg, mongo_db, reconcile):
    import pandas as pd

    from reconciliation_pipeline import ledger

    email_id = mismatch(pg, mongo_db)
    assert reconcile(max_repairs=0).success
    [report] = reports(pg)
    finding = pd.DataFrame([{
        "kind": "data_mismatch", "email_id": email_id, "client_id": "x", "aktenzeichen": "542900", "pos": 0,
        "creditor_email": SENDER, "pg_amount_cents": 123456, "mongo_amount_cents": 100000, "action": "skipped_budget",
        "received_at": IN_WINDOW, "observed_response_at": IN_WINDOW - timedelta(days=10),
    }])
    evidence = ledger.DriftEvidence(report["window_end"], False, True, finding, None)
    with pg.begin() as conn:  # a re-executed finish_report of the same run
        summary = ledger.update(conn, report["id"], evidence)
    assert (summary.open, summary.opened) == (1, 0)
    assert drift(pg)[KEY]["times_seen"] == 1
