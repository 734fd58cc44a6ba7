"""Writes never go back in time (issue 9): an outbox message is delivered only while it is the newest
statement for its (client, creditor) pair; no writer puts an older answer over a newer one.

Real PostgreSQL and the MongoDB wire server, through the asset (`reconcile`)."""

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from reconciliation_pipeline_tests.builders import IN_WINDOW, add_client, add_email, add_outbox, creditor, findings, reply, reports

SENDER = "forderungen@sparkasse-bochum.de"
T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=3)


def payload(amount, key="new_debt_amount", **extra):
    data = {"client_aktenzeichen": "542900", "client_name": "Mustermann, Max", "creditor_email": SENDER,
            "creditor_name": "Sparkasse Bochum", key: amount}
    data.update(extra)
    return data


def amount(mongo_db, az="542900"):
    return mongo_db.clients.find_one({"aktenzeichen": az})["final_creditor_list"][0]["creditor_response_amount"]


def outbox(engine):
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM outbox_messages")).mappings()}


def email(engine, email_id):
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT * FROM incoming_emails WHERE id = :i"), {"i": email_id}).mappings().one())


def audit(engine, action=None):
    return [f for f in findings(engine) if f["kind"] == "outbox_delivery" and (action is None or f["action"] == action)]


def _two_messages_one_email(pg, newer_has_lower_id):
    email_id = add_email(pg, from_email=SENDER, extracted=reply(amount=300), sync_status="failed", received_at=T0)
    agg = {"aggregate_type": "incoming_email", "aggregate_id": str(email_id)}
    if newer_has_lower_id:
        newer = add_outbox(pg, payload(300), created_at=T0 + timedelta(minutes=2), **agg)
        older = add_outbox(pg, payload(200, key="debt_amount"), created_at=T0 + timedelta(minutes=1), **agg)
    else:
        older = add_outbox(pg, payload(200, key="debt_amount"), created_at=T0 + timedelta(minutes=1), **agg)
        newer = add_outbox(pg, payload(300), created_at=T0 + timedelta(minutes=2), **agg)
    return older, newer, 300.0, [email_id]


def _two_emails_one_creditor(pg, newer_has_lower_id):
    e_old = add_email(pg, from_email=SENDER, extracted=reply(amount=200), sync_status="failed", received_at=T0)
    e_new = add_email(pg, from_email=SENDER, extracted=reply(amount=300), sync_status="failed", received_at=T0 + timedelta(minutes=30))
    old_agg = {"aggregate_type": "incoming_email", "aggregate_id": str(e_old)}
    new_agg = {"aggregate_type": "incoming_email", "aggregate_id": str(e_new)}
    created = T0 + timedelta(minutes=40)
    if newer_has_lower_id:
        newer = add_outbox(pg, payload(300), created_at=created, **new_agg)
        older = add_outbox(pg, payload(200), created_at=created, **old_agg)
    else:
        older = add_outbox(pg, payload(200), created_at=created, **old_agg)
        newer = add_outbox(pg, payload(300), created_at=created, **new_agg)
    return older, newer, 300.0, [e_old, e_new]


def _two_debt_updates(pg, newer_has_lower_id):
    first, second = (T0 + timedelta(minutes=1), T0 + timedelta(minutes=2))
    if newer_has_lower_id:
        newer = add_outbox(pg, payload(300), created_at=second)
        older = add_outbox(pg, payload(200), created_at=first)
    else:
        older = add_outbox(pg, payload(200), created_at=first)
        newer = add_outbox(pg, payload(300), created_at=second)
    return older, newer, 300.0, []


@pytest.mark.parametrize("batch_size", [1000, 1], ids=["one_batch", "batch_per_message"])
@pytest.mark.parametrize("newer_has_lower_id", [False, True], ids=["ids_in_order", "ids_reversed"])
@pytest.mark.parametrize("history", [_two_messages_one_email, _two_emails_one_creditor, _two_debt_updates],
                         ids=["one_email", "two_emails", "creditor_debt_update"])
def test_only_the_newest_of_two_pending_messages_is_written_and_the_next_run_keeps_it(
    pg, mongo_db, reconcile, history, newer_has_lower_id, batch_size
):
    """The reported bug: both were delivered, the older one judged a concurrent change and left pending,
    and the next run wrote it alone: MongoDB went back to the older amount."""
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    older, newer, expected, email_ids = history(pg, newer_has_lower_id)
    assert reconcile(outbox_batch_size=batch_size).success
    assert amount(mongo_db) == expected
    rows = outbox(pg)
    assert rows[older]["processed_at"] is not None and rows[newer]["processed_at"] is not None
    assert f"superseded by outbox message {newer}" in rows[older]["error_message"]
    assert rows[newer]["error_message"] is None
    for email_id in email_ids:
        assert email(pg, email_id)["sync_status"] == "synced"
    assert [(a["outbox_message_id"], a["action"]) for a in audit(pg)] == [(older, "superseded"), (newer, "repaired")] or \
        sorted((a["outbox_message_id"], a["action"]) for a in audit(pg)) == sorted([(older, "superseded"), (newer, "repaired")])
    [superseded] = audit(pg, "superseded")
    assert superseded["mongo_amount_cents_after"] is None and superseded["pg_amount_cents"] == 20000
    report = reports(pg)[0]
    assert (report["outbox_succeeded"], report["outbox_superseded"], report["outbox_retried"]) == (1, 1, 1)
    assert reconcile(outbox_batch_size=batch_size).success
    assert amount(mongo_db) == expected
    assert reports(pg)[1]["outbox_retried"] == 0


def test_an_older_message_after_the_newer_one_was_delivered_in_an_earlier_run_is_superseded(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    newer = add_outbox(pg, payload(300), created_at=T0 + timedelta(minutes=2))
    assert reconcile().success and amount(mongo_db) == 300.0
    older = add_outbox(pg, payload(200), created_at=T0 + timedelta(minutes=1))  # e.g. it was locked by another worker
    assert reconcile().success
    assert amount(mongo_db) == 300.0
    assert f"superseded by outbox message {newer}" in outbox(pg)[older]["error_message"]
    assert reports(pg)[1]["outbox_superseded"] == 1


def test_a_newer_email_synced_directly_supersedes_an_older_pending_message(pg, mongo_db, reconcile):
    """The newer reply never went through the outbox: the application wrote it to MongoDB itself."""
    newer_time = T0 + timedelta(minutes=30)
    add_client(mongo_db, "542900", [creditor(SENDER, 300.0, response_received_at=newer_time)])
    old_email = add_email(pg, from_email=SENDER, extracted=reply(amount=200), sync_status="failed", received_at=T0)
    new_email = add_email(pg, from_email=SENDER, extracted=reply(amount=300), sync_status="synced", received_at=newer_time)
    older = add_outbox(pg, payload(200), aggregate_type="incoming_email", aggregate_id=str(old_email), created_at=T0 + timedelta(hours=1))
    assert reconcile().success
    assert amount(mongo_db) == 300.0
    assert f"superseded by synced email {new_email}" in outbox(pg)[older]["error_message"]
    assert email(pg, old_email)["sync_status"] == "synced"
    assert [a["action"] for a in audit(pg)] == ["superseded"]


def test_a_newer_synced_email_that_mongodb_lacks_is_not_written_over_by_the_older_message(pg, mongo_db, reconcile):
    """Superseded by PostgreSQL's newer word even when MongoDB does not hold it yet: the repair writes it."""
    add_client(mongo_db, "542900", [creditor(SENDER, 100.0)])
    old_email = add_email(pg, from_email=SENDER, extracted=reply(amount=200), sync_status="failed", received_at=IN_WINDOW - timedelta(hours=1))
    add_email(pg, from_email=SENDER, extracted=reply(amount=300), sync_status="synced", received_at=IN_WINDOW)
    older = add_outbox(pg, payload(200), aggregate_type="incoming_email", aggregate_id=str(old_email))
    assert reconcile().success
    assert amount(mongo_db) == 300.0  # the repair, from the newest synced email
    assert outbox(pg)[older]["processed_at"] is not None
    assert [a["action"] for a in audit(pg)] == ["superseded"]  # never written, not even for a moment
    assert [f["action"] for f in findings(pg) if f["kind"] == "data_mismatch"] == ["repaired"]


def test_a_message_older_than_the_answer_mongodb_holds_is_not_written(pg, mongo_db, reconcile):
    """No newer statement in PostgreSQL, but MongoDB's element holds an answer received later (the
    application's direct write whose PostgreSQL side did not commit yet, or a portal edit)."""
    portal_time = T0 + timedelta(hours=1)
    add_client(mongo_db, "542900", [creditor(SENDER, 300.0, response_received_at=portal_time)])
    mid = add_outbox(pg, payload(200, response_received_at=T0.isoformat()), created_at=T0 + timedelta(hours=2))
    assert reconcile().success
    assert amount(mongo_db) == 300.0
    row = outbox(pg)[mid]
    assert row["processed_at"] is not None and "MongoDB holds a newer answer" in row["error_message"]
    [a] = audit(pg)
    assert a["action"] == "superseded" and "newer answer" in a["error"]
    assert reports(pg)[0]["outbox_superseded"] == 1


def test_the_repair_never_writes_an_older_email_over_a_newer_mongodb_answer(pg, mongo_db, reconcile):
    portal_time = IN_WINDOW + timedelta(minutes=30)
    add_client(mongo_db, "542900", [creditor(SENDER, 300.0, response_received_at=portal_time)])
    add_email(pg, from_email=SENDER, extracted=reply(amount=200), received_at=IN_WINDOW)
    assert reconcile().success
    assert amount(mongo_db) == 300.0
    [f] = [f for f in findings(pg) if f["kind"] == "data_mismatch"]
    assert f["action"] == "reported" and "newer creditor answer" in f["error"]  # the diff's guard
    assert (f["pg_amount_cents"], f["mongo_amount_cents_before"]) == (20000, 30000)


def test_the_repair_still_writes_an_email_newer_than_mongodbs_answer(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SENDER, 300.0, response_received_at=IN_WINDOW - timedelta(minutes=30))])
    add_email(pg, from_email=SENDER, extracted=reply(amount=200), received_at=IN_WINDOW)
    assert reconcile().success
    assert amount(mongo_db) == 200.0
