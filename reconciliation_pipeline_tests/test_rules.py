"""RULES.md sections 2-6 through the whole asset, against real PostgreSQL and the MongoDB wire server."""

from datetime import timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from reconciliation_pipeline.run import diff as diff_step
from reconciliation_pipeline.run import extract as extract_step
from reconciliation_pipeline.run import repair as repair_step
from reconciliation_pipeline.run.types import RunContext, window_for
from reconciliation_pipeline.resources import MongoResource
from reconciliation_pipeline_tests.builders import (
    IN_WINDOW, WINDOW_END, add_client, add_email, add_key, add_outbox, creditor, findings, reply, reports,
)
from reconciliation_pipeline_tests.support import free_port

SPARKASSE = "forderungen@sparkasse-bochum.de"
TELEKOM = "mahnwesen@telekom.de"


def amounts(mongo_db, az="542900"):
    return [e.get("creditor_response_amount") for e in mongo_db.clients.find_one({"aktenzeichen": az})["final_creditor_list"]]


def kinds_and_actions(engine):
    return sorted((f["kind"], f["action"]) for f in findings(engine) if f["kind"] != "outbox_delivery")


def checks(result):
    return {c.check_name: c.passed for c in result.get_asset_check_evaluations()}


def test_every_kind_of_finding_end_to_end(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 999.99), creditor(TELEKOM, name="Telekom Deutschland GmbH")])
    add_client(mongo_db, "542901", [creditor("a@x.de", "zwölf", name="Alpha"), creditor("b@x.de", 1.0, name="Beta"), creditor("b@x.de", 2.0, name="Beta")], first="Erika", last="Musterfrau")
    add_client(mongo_db, "542902", [], first="Anna", last="Schmidt")
    add_client(mongo_db, "542903", [], first="Anna", last="Schmidt")
    add_client(mongo_db, "542904", [creditor("extra@x.de", 75.0, name="Inkasso Nord", response_received_at=IN_WINDOW)], first="Paul", last="Weber")
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount="1.234,56"))                       # data_mismatch
    add_email(pg, from_email=TELEKOM, extracted=reply(amount=50, creditor_name="Telekom"))       # missing_in_mongo
    add_email(pg, from_email="x@unknown.de", extracted=reply(az="999999", name="Nobody, No"))      # client_not_found
    add_email(pg, from_email="fremd@bank.de", extracted=reply(creditor_name="Fremdbank AG"))       # creditor_not_found
    add_email(pg, from_email="c@x.de", extracted=reply(az=None, name="Anna Schmidt"))              # ambiguous_client
    add_email(pg, from_email="b@x.de", extracted=reply(az="542901", name=None, creditor_name="Beta"))  # ambiguous_creditor
    add_email(pg, from_email="a@x.de", extracted=reply(az="542901", name=None, amount=5, creditor_name="Alpha"))  # invalid_mongo_amount
    add_client(mongo_db, "542905", [creditor("z@x.de", 5.0, name="Zeta")], first="Leon", last="Becker")
    add_email(pg, from_email="z@x.de", extracted=reply(az="542905", name=None, amount="1.234", creditor_name="Zeta"))  # invalid_pg_amount
    result = reconcile()
    assert result.success
    assert kinds_and_actions(pg) == sorted([
        ("data_mismatch", "repaired"), ("missing_in_mongo", "repaired"), ("client_not_found", "reported"),
        ("creditor_not_found", "reported"), ("ambiguous_client", "reported"), ("ambiguous_creditor", "reported"),
        ("invalid_mongo_amount", "reported"), ("invalid_pg_amount", "reported"), ("extra_in_mongo", "reported"),
    ])
    assert amounts(mongo_db) == [1234.56, 50.0]
    assert amounts(mongo_db, "542905") == [5.0]  # an invalid PostgreSQL amount is never written
    [report] = reports(pg)
    assert report["status"] == "completed" and report["mismatches_found"] == 9 and report["auto_repaired"] == 2
    assert report["records_checked"] >= 8
    assert checks(result) == {"no_unrepaired_drift": False, "repair_budget_not_exceeded": True, "no_dead_outbox_messages": True, "audit_chain_intact": True}
    # the materialization carries plottable counts and the findings table, without client names
    [mat] = result.asset_materializations_for_node("reconciliation_report")
    meta = mat.metadata
    assert meta["records_checked"].value == report["records_checked"] and meta["auto_repaired"].value == 2
    table = meta["findings"]
    assert isinstance(table, dg.TableMetadataValue) and [c.name for c in table.schema.columns] == [
        "aktenzeichen", "creditor", "kind", "action", "postgres_eur", "mongo_eur", "times_seen", "cause"]
    assert meta["dagster/row_count"].value == report["mismatches_found"] == len(table.records)
    rows = [r.data for r in table.records]
    assert {"aktenzeichen": "542900", "kind": "data_mismatch"}.items() <= next(r for r in rows if r["kind"] == "data_mismatch").items()
    assert all(isinstance(r["postgres_eur"], (float, type(None))) for r in rows)
    text = repr(rows)
    assert "Mustermann" not in text and "Schmidt" not in text


def test_second_run_writes_nothing(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0), creditor(TELEKOM)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100))
    add_email(pg, from_email=TELEKOM, extracted=reply(amount=200, creditor_name="Telekom"))
    assert reconcile().success
    after_first = mongo_db.clients.find_one({"aktenzeichen": "542900"})
    assert reconcile().success
    assert mongo_db.clients.find_one({"aktenzeichen": "542900"}) == after_first
    second = reports(pg)[1]
    assert (second["mismatches_found"], second["auto_repaired"]) == (0, 0)


def test_claim_amount_and_other_fields_are_never_touched(pg, mongo_db, reconcile):
    el = creditor(SPARKASSE, 1.0, creditor_response_text="alt", note="$keep.me")
    add_client(mongo_db, "542900", [el, creditor(TELEKOM, 7.0, name="Telekom")])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100))
    assert reconcile().success
    new = mongo_db.clients.find_one({"aktenzeichen": "542900"})["final_creditor_list"]
    assert new[0]["claim_amount"] == 1500.0 and new[0]["note"] == "$keep.me" and new[0]["creditor_response_text"] == "alt"
    assert new[0]["response_received_at"] == IN_WINDOW
    assert new[1] == {**creditor(TELEKOM, 7.0, name="Telekom"), "response_received_at": new[1]["response_received_at"]}


def test_latest_email_wins_even_after_the_window(pg, mongo_db, reconcile):
    """A backfill of an old window must never put an old amount back."""
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 300.0, response_received_at=WINDOW_END + timedelta(hours=5))])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100), received_at=IN_WINDOW)
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=300), received_at=WINDOW_END + timedelta(hours=5))
    assert reconcile().success
    assert amounts(mongo_db) == [300.0]
    assert kinds_and_actions(pg) == []


def test_latest_email_wins_and_is_repaired_to(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 100.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100), received_at=IN_WINDOW - timedelta(hours=1))
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=250), received_at=WINDOW_END + timedelta(hours=1))
    assert reconcile().success
    assert amounts(mongo_db) == [250.0]


def test_unsynced_and_out_of_window_emails_are_not_compared(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100), sync_status="pending")
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=200), received_at=WINDOW_END - timedelta(hours=49))
    add_email(pg, from_email=SPARKASSE, extracted={"client_aktenzeichen": "542900"})  # no debt_amount
    assert reconcile().success
    assert amounts(mongo_db) == [1.0]
    assert reports(pg)[0]["records_checked"] == 0


def test_dry_run_reports_and_writes_nothing(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100))
    mid = add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": SPARKASSE, "new_debt_amount": 5})
    before = mongo_db.clients.find_one({"aktenzeichen": "542900"})
    assert reconcile(dry_run=True).success
    assert mongo_db.clients.find_one({"aktenzeichen": "542900"}) == before
    assert kinds_and_actions(pg) == [("data_mismatch", "skipped_dry_run")]
    [report] = reports(pg)
    assert report["dry_run"] is True and report["auto_repaired"] == 0 and report["outbox_deferred"] == 1
    with pg.connect() as conn:
        assert conn.execute(sa.text("SELECT retry_count, processed_at FROM outbox_messages WHERE id=:i"), {"i": mid}).one() == (0, None)


def test_repair_budget_halts_all_repairs_and_fails_the_check(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(f"c{i}@x.de", 1.0, name=f"Creditor {i}") for i in range(3)])
    for i in range(3):
        add_email(pg, from_email=f"c{i}@x.de", extracted=reply(amount=100 + i, creditor_name=f"Creditor {i}"))
    result = reconcile(max_repairs=2)
    assert result.success
    assert amounts(mongo_db) == [1.0, 1.0, 1.0]
    assert kinds_and_actions(pg) == [("data_mismatch", "skipped_budget")] * 3
    assert reports(pg)[0]["repairs_halted"] is True
    assert checks(result)["repair_budget_not_exceeded"] is False
    [evaluation] = [c for c in result.get_asset_check_evaluations() if c.check_name == "repair_budget_not_exceeded"]
    assert evaluation.severity.value == "ERROR"


def test_tolerance_and_low_confidence_settings(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 100.0), creditor("post@volksbank-ruhr.de", 1.0, name="Volksbank Ruhr Mitte")])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100.01))
    add_email(pg, from_email="info@other.de", extracted=reply(amount=50, creditor_name="Volksbank"))  # level 4: shared word only
    assert reconcile(amount_tolerance_cents=1).success
    assert kinds_and_actions(pg) == [("data_mismatch", "reported")]
    assert amounts(mongo_db) == [100.0, 1.0]
    assert reconcile(amount_tolerance_cents=1, repair_low_confidence=True).success
    assert amounts(mongo_db) == [100.0, 50.0]


def test_concurrent_application_write_wins(pg, mongo_db, resources):
    """The application writes between the pipeline's read and its write: its value survives."""
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100))
    start, end = window_for(WINDOW_END, 48)
    with pg.begin() as conn:
        report_id = conn.execute(sa.text("INSERT INTO reconciliation_reports (run_id) VALUES ('t') RETURNING id")).scalar_one()
    ctx = RunContext(report_id, "t", None, start, end, False)
    log = _Log()
    emails = extract_step.extract_postgres(pg, ctx, log=log)
    with resources["mongo"].get_clients_collection() as collection:
        options = diff_step.diff_options(ctx, tolerance_cents=0, repair_low_confidence=False)
        diff = diff_step.compare(collection, emails, ctx, options=options, batch_size=100, log=log)
    mongo_db.clients.update_one({"aktenzeichen": "542900"}, {"$set": {"final_creditor_list.0.creditor_response_amount": 777.0}}) \
        if False else _application_write(mongo_db, 777.0)
    result = repair_step.repair(
        pg, resources["mongo"].get_clients_collection, diff, ctx, max_repairs=1000, lock_wait_seconds=5, batch_size=100, log=log
    )
    assert list(result.findings["action"]) == ["skipped_concurrent_change"]
    assert amounts(mongo_db) == [777.0]


def _application_write(mongo_db, amount):
    doc = mongo_db.clients.find_one({"aktenzeichen": "542900"})
    creditors = doc["final_creditor_list"]
    creditors[0]["creditor_response_amount"] = amount
    mongo_db.clients.update_one({"_id": doc["_id"]}, {"$set": {"final_creditor_list": creditors}})


class _Log:
    def __getattr__(self, _name):
        return lambda *a, **k: None


def test_crash_leaves_a_failed_report(pg, mongo_db, reconcile, monkeypatch):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100))

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the diff")

    monkeypatch.setattr(diff_step, "diff_shard", boom)
    result = reconcile(raise_on_error=False)
    assert not result.success
    [report] = reports(pg)
    assert report["status"] == "failed" and "simulated crash in the diff" in report["error_message"]
    assert report["completed_at"] is not None
    assert amounts(mongo_db) == [1.0]


def test_mongo_down_completes_with_comparison_skipped(pg, mongo_db, resources, reconcile):
    port = free_port()
    resources["mongo"] = MongoResource(uri=f"mongodb://127.0.0.1:{port}/?directConnection=true", database=mongo_db.name,
                                       server_selection_timeout_ms=500)
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100))
    add_key(pg, "expired", WINDOW_END - timedelta(days=400))
    result = reconcile()
    assert result.success
    [report] = reports(pg)
    assert report["status"] == "completed" and report["mongo_available"] is False
    assert report["records_checked"] == 0 and report["expired_keys_deleted"] == 1
    assert checks(result)["no_unrepaired_drift"] is False


@pytest.mark.parametrize("hostile", [{"$ne": None}, {"$gt": ""}, {"$where": "sleep(1000)"}, ["542900"], 542900])
def test_hostile_client_keys_are_findings_not_queries(pg, mongo_db, reconcile, hostile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(az=hostile, name=None, amount=100))
    assert reconcile().success
    assert amounts(mongo_db) == [1.0]
    [finding] = findings(pg)
    assert finding["kind"] == "client_not_found" and "plain string" in finding["error"]


def test_strings_with_operators_and_nul_are_plain_values(pg, mongo_db, reconcile):
    add_client(mongo_db, "$where", [creditor(SPARKASSE, 1.0)])
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(az="$where", name=None, amount=100))
    add_email(pg, from_email=SPARKASSE, raw_json='{"client_aktenzeichen": "5429\\u0000", "debt_amount": 5}', extracted=None)
    assert reconcile().success
    assert amounts(mongo_db, "$where") == [100.0]
    assert amounts(mongo_db) == [1.0]


def test_lookback_tag_overrides_the_setting_for_backfills(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100), received_at=WINDOW_END - timedelta(minutes=90))
    assert reconcile(tags={"reconciliation/lookback_hours": "1"}).success
    [report] = reports(pg)
    assert report["window_start"] == WINDOW_END - timedelta(hours=1) and report["records_checked"] == 0
    assert amounts(mongo_db) == [1.0]
    bad = reconcile(tags={"reconciliation/lookback_hours": "-3"}, raise_on_error=False)
    assert not bad.success


def test_sharded_mongo_extract_gives_the_same_findings(pg, mongo_db, reconcile):
    for i in range(6):
        add_client(mongo_db, f"54290{i}", [creditor(SPARKASSE, 1.0)], last=f"Name{i}")
        add_email(pg, from_email=SPARKASSE, extracted=reply(az=f"54290{i}", name=None, amount=100 + i))
    add_email(pg, from_email=SPARKASSE, extracted=reply(az=None, name="Name3, Max", amount=7))  # by name: ambiguous? no, one doc
    assert reconcile(dry_run=True).success
    assert reconcile(dry_run=True, mongo_shards=3).success
    first, second = ([f for f in findings(pg) if f["report_id"] == r["id"]] for r in reports(pg))
    key = lambda f: (f["kind"], f["email_id"], f["client_aktenzeichen"], f["pg_amount_cents"], f["mongo_amount_cents_before"])  # noqa: E731
    assert sorted(map(key, first)) == sorted(map(key, second)) and len(first) == 6


@pytest.mark.parametrize("client_name", ["MCDONALD, Max", "max mcdonald", "Max   McDonald"])
def test_client_found_by_name_ignoring_case_through_the_wire_server(pg, mongo_db, reconcile, client_name):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)], first="Max", last="McDonald")
    add_client(mongo_db, "542901", [creditor(SPARKASSE, 1.0)], first="Max", last="McDonaldson")
    add_email(pg, from_email=SPARKASSE, extracted=reply(az=None, name=client_name, amount=100))
    assert reconcile().success
    assert amounts(mongo_db) == [100.0] and amounts(mongo_db, "542901") == [1.0]


def test_a_client_id_with_a_trailing_nul_has_its_extras_judged_once(pg, mongo_db, resources):
    """The extract remembers which documents it judged: exactly ("c1\\0" is not "c1"), or the answered-since
    pass reads the document again and its extra_in_mongo answers are reported twice."""
    mongo_db.clients.insert_one({
        "_id": "c1\x00", "aktenzeichen": "542900", "firstName": "Max", "lastName": "Mustermann",
        "final_creditor_list": [creditor(SPARKASSE, 1234.56), creditor("extra@x.de", 75.0, name="Inkasso Nord", response_received_at=IN_WINDOW)],
    })
    for n in range(3):  # documents the window does not name: the extract reads by `$in`, then the answered-since query
        add_client(mongo_db, f"54291{n}", [creditor("o@x.de", 1.0, name="Other")], first="Erika", last=f"Other{n}")
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=1234.56))
    start, end = window_for(WINDOW_END, 48)
    ctx, log = RunContext(1, "t", None, start, end, True), _Log()
    emails = extract_step.extract_postgres(pg, ctx, log=log)
    with resources["mongo"].get_clients_collection() as collection:
        [shard] = extract_step.route_emails(collection, emails, count=1, batch_size=100, full_scan_ratio=0.5, log=log)
        assert not shard.full_scan
        extracted = extract_step.extract_mongo(collection, shard, ctx, batch_size=100, log=log)
    read = [cid for part in extracted.clients for cid in part["client_id"]]
    assert read.count("c1\x00") == 1, (list(extracted.parts["kind"]), read)  # not read again as an unseen document
    options = diff_step.diff_options(ctx, tolerance_cents=0, repair_low_confidence=False)
    diff = diff_step.diff_shard(shard, extracted, options=options, keys_per_diff=100, log=log)
    assert list(diff.findings["kind"]) == ["extra_in_mongo"] and list(diff.findings["client_id"]) == ["c1\x00"]
