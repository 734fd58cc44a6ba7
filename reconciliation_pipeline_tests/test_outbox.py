"""RULES.md section 1: outbox retry against real PostgreSQL and the MongoDB wire server."""

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from reconciliation_pipeline.resources import MongoResource
from reconciliation_pipeline_tests.builders import add_client, add_email, add_outbox, creditor, findings, reply, reports
from reconciliation_pipeline_tests.support import free_port

SENDER = "forderungen@sparkasse-bochum.de"


def payload(**extra):
    data = {"client_aktenzeichen": "542900", "client_name": "Mustermann, Max", "creditor_email": SENDER,
            "creditor_name": "Sparkasse Bochum", "new_debt_amount": 321.5, "response_text": "Restforderung",
            "reference_numbers": ["AZ-1"]}
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def outbox_row(engine, message_id):
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT * FROM outbox_messages WHERE id = :i"), {"i": message_id}).mappings().one())


def email_row(engine, email_id):
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT * FROM incoming_emails WHERE id = :i"), {"i": email_id}).mappings().one())


def element(mongo_db, az="542900", pos=0):
    return mongo_db.clients.find_one({"aktenzeichen": az})["final_creditor_list"][pos]


def test_delivery_marks_processed_and_syncs_the_email(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0), creditor("other@x.de", 5.0, name="Other")])
    email_id = add_email(pg, from_email=SENDER, extracted=reply(amount=321.5), sync_status="failed")
    received = email_row(pg, email_id)["received_at"]
    mid = add_outbox(pg, payload(), aggregate_type="incoming_email", aggregate_id=str(email_id))
    assert reconcile().success
    msg, email = outbox_row(pg, mid), email_row(pg, email_id)
    assert msg["processed_at"] is not None and msg["error_message"] is None
    assert email["sync_status"] == "synced" and email["sync_error"] is None
    el = element(mongo_db)
    assert el["creditor_response_amount"] == 321.5 and el["current_debt_amount"] == 321.5
    assert el["amount_source"] == "creditor_response" and el["contact_status"] == "responded"
    assert el["response_received_at"] == received
    assert el["creditor_response_text"] == "Restforderung" and el["response_reference_numbers"] == ["AZ-1"]
    assert el["claim_amount"] == 1500.0
    assert element(mongo_db, pos=1)["creditor_response_amount"] == 5.0
    [report] = reports(pg)
    assert (report["outbox_retried"], report["outbox_succeeded"], report["outbox_failed"]) == (1, 1, 0)
    audit = [f for f in findings(pg) if f["kind"] == "outbox_delivery"]
    assert [(a["outbox_message_id"], a["action"], a["mongo_amount_cents_before"], a["mongo_amount_cents_after"]) for a in audit] == [
        (mid, "repaired", 10000, 32150)
    ]


def test_old_debt_amount_field_is_accepted(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    mid = add_outbox(pg, payload(new_debt_amount=None, debt_amount="1.234,56"))
    assert reconcile().success
    assert outbox_row(pg, mid)["processed_at"] is not None
    assert element(mongo_db)["creditor_response_amount"] == 1234.56


def test_new_debt_amount_wins_over_debt_amount(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    add_outbox(pg, payload(new_debt_amount=200, debt_amount=999))
    assert reconcile().success
    assert element(mongo_db)["creditor_response_amount"] == 200.0


def test_failure_counts_a_retry_and_records_the_error(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    email_id = add_email(pg, from_email=SENDER, extracted=reply(az="000000"), sync_status="failed")
    mid = add_outbox(pg, payload(client_aktenzeichen="000000", client_name=None), aggregate_type="incoming_email", aggregate_id=str(email_id))
    assert reconcile().success
    msg, email = outbox_row(pg, mid), email_row(pg, email_id)
    assert msg["processed_at"] is None and msg["retry_count"] == 1 and "client" in msg["error_message"]
    assert email["sync_retry_count"] == 1 and email["sync_error"] == msg["error_message"]
    assert email["sync_status"] == "failed"  # unchanged until dead or delivered
    [report] = reports(pg)
    assert (report["outbox_retried"], report["outbox_failed"], report["outbox_dead"]) == (1, 1, 0)


def test_reaching_max_retries_makes_the_message_dead(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    email_id = add_email(pg, from_email=SENDER, extracted=reply(), sync_status="pending")
    mid = add_outbox(pg, payload(client_aktenzeichen="000000", client_name=None), aggregate_type="incoming_email",
                     aggregate_id=str(email_id), retry_count=4, max_retries=5)
    result = reconcile()
    assert result.success
    msg = outbox_row(pg, mid)
    assert msg["retry_count"] == 5 and msg["processed_at"] is None
    assert email_row(pg, email_id)["sync_status"] == "failed"
    [report] = reports(pg)
    assert report["outbox_dead"] == 1
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["no_dead_outbox_messages"] is False
    # a dead message is never tried again
    assert reconcile().success
    assert outbox_row(pg, mid)["retry_count"] == 5


def test_poison_payloads_go_dead_at_once_and_are_never_written(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    no_amount = add_outbox(pg, payload(new_debt_amount=None))
    invalid = add_outbox(pg, payload(new_debt_amount="1.234"))
    no_client = add_outbox(pg, payload(client_aktenzeichen=None, client_name=None))
    hostile = add_outbox(pg, payload(client_aktenzeichen={"$ne": None}))
    not_object = add_outbox(pg, ["not", "an", "object"])
    assert reconcile().success
    for mid, words in ((no_amount, "neither"), (invalid, "invalid"), (no_client, "client key"),
                       (hostile, "plain string"), (not_object, "not a JSON object")):
        msg = outbox_row(pg, mid)
        assert msg["processed_at"] is None and msg["retry_count"] >= msg["max_retries"], mid
        assert words in msg["error_message"], msg["error_message"]
    assert element(mongo_db)["creditor_response_amount"] == 100.0
    assert reports(pg)[0]["outbox_dead"] == 5


def test_mongo_down_defers_without_consuming_a_retry(pg, mongo_db, resources, reconcile):
    dead_port = free_port()
    resources["mongo"] = MongoResource(uri=f"mongodb://127.0.0.1:{dead_port}/?directConnection=true",
                                       database=mongo_db.name, server_selection_timeout_ms=500)
    mid = add_outbox(pg, payload())
    add_outbox(pg, payload(), retry_count=2)
    result = reconcile()
    assert result.success
    assert outbox_row(pg, mid)["retry_count"] == 0 and outbox_row(pg, mid)["processed_at"] is None
    [report] = reports(pg)
    assert report["status"] == "completed" and report["mongo_available"] is False
    assert (report["outbox_retried"], report["outbox_deferred"]) == (0, 2)


def test_messages_of_one_email_apply_in_created_at_order(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    email_id = add_email(pg, from_email=SENDER, extracted=reply(amount=300), sync_status="failed")
    t0 = datetime.now(timezone.utc) - timedelta(minutes=10)
    newer = add_outbox(pg, payload(new_debt_amount=300), aggregate_type="incoming_email", aggregate_id=str(email_id), created_at=t0 + timedelta(minutes=1))
    older = add_outbox(pg, payload(new_debt_amount=200), aggregate_type="incoming_email", aggregate_id=str(email_id), created_at=t0)
    assert reconcile(outbox_batch_size=1).success
    assert outbox_row(pg, older)["processed_at"] < outbox_row(pg, newer)["processed_at"] or outbox_row(pg, older)["processed_at"] == outbox_row(pg, newer)["processed_at"]
    assert element(mongo_db)["creditor_response_amount"] == 300.0
    order = [f["outbox_message_id"] for f in findings(pg) if f["kind"] == "outbox_delivery"]
    assert order == [older, newer]


def test_a_failed_older_message_holds_back_newer_ones_of_the_same_email(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    t0 = datetime.now(timezone.utc) - timedelta(minutes=10)
    older = add_outbox(pg, payload(client_aktenzeichen="000000", client_name=None), aggregate_type="incoming_email", aggregate_id="77", created_at=t0)
    newer = add_outbox(pg, payload(new_debt_amount=300), aggregate_type="incoming_email", aggregate_id="77", created_at=t0 + timedelta(minutes=1))
    assert reconcile().success
    assert outbox_row(pg, older)["retry_count"] == 1
    assert outbox_row(pg, newer)["retry_count"] == 0 and outbox_row(pg, newer)["processed_at"] is None
    assert element(mongo_db)["creditor_response_amount"] == 100.0
    assert reports(pg)[0]["outbox_deferred"] == 1


def test_redelivery_is_idempotent(pg, mongo_db, reconcile):
    """A message delivered but not marked (crash between the two) is applied again with the same result."""
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    mid = add_outbox(pg, payload())
    assert reconcile().success
    first = element(mongo_db)
    with pg.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_messages SET processed_at = NULL WHERE id = :i"), {"i": mid})
    assert reconcile().success
    assert element(mongo_db) == first
    assert outbox_row(pg, mid)["processed_at"] is not None


def test_an_empty_outbox_does_not_wait_for_another_runs_writer_lock(pg, mongo_db, reconcile):
    """Another run holds the MongoDB writer lock (it is repairing): with nothing pending this run's
    outbox step goes on at once; with one message pending it waits and then defers it untouched."""
    import time

    from reconciliation_pipeline.store.postgres import MONGO_WRITER_LOCK

    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    with pg.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_lock(MONGO_WRITER_LOCK)))
        holder.commit()
        try:
            started = time.monotonic()
            assert reconcile(repair_lock_wait_seconds=30).success
            assert time.monotonic() - started < 20, "the outbox step waited for a lock it did not need"
            [report] = reports(pg)
            assert (report["outbox_retried"], report["outbox_deferred"]) == (0, 0)

            mid = add_outbox(pg, payload())
            assert reconcile(repair_lock_wait_seconds=2).success
            assert outbox_row(pg, mid)["processed_at"] is None and outbox_row(pg, mid)["retry_count"] == 0
            assert (reports(pg)[-1]["outbox_retried"], reports(pg)[-1]["outbox_deferred"]) == (0, 1)
        finally:
            holder.execute(sa.select(sa.func.pg_advisory_unlock(MONGO_WRITER_LOCK)))
            holder.commit()


def test_a_creditor_matched_only_by_a_shared_word_is_not_written(pg, mongo_db, reconcile):
    """A message for a creditor the client's list does not hold ("Vodafone GmbH") must not land on the
    one that shares only "GmbH" with it (Telekom): level 4, refused as the repair refuses it."""
    add_client(mongo_db, "542909", [creditor("inkasso@telekom.de", 80.0, name="Telekom Deutschland GmbH")])
    mid = add_outbox(pg, payload(client_aktenzeichen="542909", creditor_email="forderungen@vodafone.de",
                                 creditor_name="Vodafone GmbH", new_debt_amount=999.0))
    assert reconcile().success
    assert element(mongo_db, az="542909")["creditor_response_amount"] == 80.0, "written onto another creditor"
    msg = outbox_row(pg, mid)
    assert msg["processed_at"] is None and msg["retry_count"] == 1 and "low confidence" in msg["error_message"], msg
    [audit] = [f for f in findings(pg) if f["kind"] == "outbox_delivery"]
    assert audit["action"] == "repair_failed" and "low confidence" in audit["error"], audit
    assert reports(pg)[0]["outbox_failed"] == 1

    # allowed on purpose (repair_low_confidence), the same message is written
    assert reconcile(repair_low_confidence=True).success
    assert element(mongo_db, az="542909")["creditor_response_amount"] == 999.0
    assert outbox_row(pg, mid)["processed_at"] is not None
