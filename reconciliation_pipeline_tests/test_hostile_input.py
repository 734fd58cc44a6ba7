"""Hostile and malformed input through the whole pipeline (real PostgreSQL, the wire server, a recording proxy).

* Operator injection: client_aktenzeichen / client_name / creditor_name / from_email values that are
  objects ({"$gt": ""}, {"$regex": ".*"}, {"$where": ...}) or strings with `$`, `.`, NUL, regex
  metacharacters, SQL wildcards, or of enormous length; the same for outbox payloads. Never more than
  the one intended document is read or written (every document compared before/after, every document
  the server returned recorded by the proxy, writes counted in the audit table), nothing is evaluated,
  and the finding / the outbox error says why.
* Malformed extracted_data (hypothesis): not an object, wrong types, huge strings, deep nesting, amounts
  of every strange shape: reported, never crashing the run, never written.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from bson import json_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.resources import MongoResource
from reconciliation_pipeline_tests.builders import IN_WINDOW, add_client, add_email, add_outbox, creditor, reply
from reconciliation_pipeline_tests.support import (
    MongoCutProxy, changed_documents, finding_rows, mongo_port, outbox, report_rows, reset_data, snapshot,
)

SPARKASSE = "forderungen@sparkasse-bochum.de"
TELEKOM = "mahnwesen@telekom.de"
UNKNOWN = "niemand@unbekannt.de"
HOSTILE_KEYS = {"a.b": "dotted key", "$bad": "dollar key", "nested": {"$x": 1, "y.z": 2}}


def seed_portal(mongo_db: Any) -> dict[str, str]:
    """Five client files; some with aktenzeichen that look like operators or patterns. Returns az -> _id."""
    ids = {
        "542900": add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0), creditor(TELEKOM, 2.0, name="Telekom Deutschland")]),
        "542901": add_client(mongo_db, "542901", [creditor("info@volksbank-ruhr.de", 3.0, name="Volksbank Ruhr")],
                             first="Erika", last="Musterfrau"),
        "a.b": add_client(mongo_db, "a.b", [creditor("p@inkasso-nord.de", 4.0, name="Inkasso Nord", **HOSTILE_KEYS)],
                          first="Paul", last="Weber"),
        "$where": add_client(mongo_db, "$where", [creditor("s@inkasso-sued.de", 5.0, name="Inkasso Sued")],
                             first="Anna", last="Schmidt"),
        ".*": add_client(mongo_db, ".*", [creditor("l@inkasso-west.de", 6.0, name="Inkasso West")], first="Leon", last="Becker"),
    }
    return {az: str(oid) for az, oid in ids.items()}


def through_proxy(resources: dict, service_env: dict, mongo_db: Any) -> MongoCutProxy:
    proxy = MongoCutProxy(mongo_port(service_env["RECON_MONGO_URI"]), record=True, max_lifetime=240)
    resources["mongo"] = MongoResource(uri=proxy.uri, database=mongo_db.name, server_selection_timeout_ms=3000)
    return proxy


def _answered_in_window_query(command: dict) -> bool:
    """The extra_in_mongo reads (ids of the documents with creditor answers since the window start, then
    those not yet compared, by `_id`): they depend on no input value, and the wire server answers the
    `$elemMatch` date range with a superset (the pipeline bounds it in pandas)."""
    query = command.get("filter", {})
    by_id = set(query) == {"_id"} and "firstName" in command.get("projection", {})  # repair's reads project less
    return by_id or "$elemMatch" in json_util.dumps(query)


def documents_read(proxy: MongoCutProxy) -> set[str]:
    """Client documents returned to a query built from the input's values."""
    return {str(d["_id"]) for d in proxy.documents_returned(exclude=_answered_in_window_query) if "_id" in d}


def never_sent(proxy: MongoCutProxy, value: Any) -> None:
    """An object value from the input never appears in any command sent to MongoDB."""
    needle = json_util.dumps(value)
    for command in proxy.sent:
        assert needle not in json_util.dumps(command), f"{needle} reached MongoDB in {command}"


def assert_only_target_changed(before: dict, after: dict, target: str | None, pos: int = 0) -> None:
    changed = changed_documents(before, after)
    assert changed == ({target} if target else set()), changed
    if target:
        old, new = before[target]["final_creditor_list"], after[target]["final_creditor_list"]
        assert len(old) == len(new)
        for i, (o, n) in enumerate(zip(old, new)):
            if i != pos:
                assert o == n, f"element {i} changed"
        o, n = old[pos], new[pos]
        touched = {k for k in set(o) | set(n) if o.get(k) != n.get(k)}
        allowed = {"creditor_response_amount", "current_debt_amount", "amount_source", "response_received_at",
                   "contact_status", "last_contacted_at", "creditor_response_text", "response_reference_numbers"}
        assert touched <= allowed, touched
        assert n["claim_amount"] == o["claim_amount"]
        for key, value in HOSTILE_KEYS.items():
            if key in o:
                assert n[key] == value, f"{key!r} was not preserved: {n}"


# =============================================================================== incoming_emails

LONG = "9" * 100_000
EMAIL_CASES = {
    # client_aktenzeichen
    "az_regex_object": dict(az={"$regex": ".*"}, name=None, kind="client_not_found", why="plain string"),
    "az_in_object": dict(az={"$in": ["542900"]}, name=None, kind="client_not_found", why="plain string"),
    "az_where_object": dict(az={"$where": "function() { db.clients.drop(); return true; }"}, name=None,
                            kind="client_not_found", why="plain string"),
    "az_nested_field": dict(az={"aktenzeichen": "542900"}, name=None, kind="client_not_found", why="plain string"),
    # an unusable aktenzeichen next to a usable client_name: the named client is the intended document
    "az_object_with_a_name": dict(az={"$gt": ""}, kind="client_not_found", why="plain string", client="542900"),
    "az_dot_star_is_a_literal": dict(az=".*", name=None, sender="l@inkasso-west.de", creditor="Inkasso West", target=".*"),
    "az_dotted_is_a_literal": dict(az="a.b", name=None, sender="p@inkasso-nord.de", creditor="Inkasso Nord", target="a.b"),
    "az_anchor": dict(az="^5429", name=None, kind="client_not_found"),
    "az_inline_flag": dict(az="(?i)542900", name=None, kind="client_not_found"),
    "az_alternation": dict(az="542900|542901", name=None, kind="client_not_found"),
    "az_dollar_string": dict(az="$ne", name=None, kind="client_not_found"),
    "az_very_long": dict(az=LONG, name=None, kind="client_not_found", why="too long"),
    # client_name (no aktenzeichen)
    "name_ne_object": dict(az=None, name={"$ne": None}, kind="client_not_found"),
    "name_regex_object": dict(az=None, name={"$regex": "^M"}, kind="client_not_found"),
    "name_all_wildcards": dict(az=None, name=".*, .*", kind="client_not_found"),
    "name_wildcard_last": dict(az=None, name="Muster.*, Max", kind="client_not_found"),
    "name_inline_flag": dict(az=None, name="(?i)mustermann, max", kind="client_not_found"),
    "name_alternation": dict(az=None, name="Max Mustermann|Musterfrau", kind="client_not_found"),
    "name_nul": dict(az=None, name="Weber\u0000, Paul", kind="client_not_found"),
    "name_very_long": dict(az=None, name="M" * 100_000 + ", Max", kind="client_not_found"),
    # creditor_name (known client, unknown sender)
    "creditor_ne_object": dict(sender=UNKNOWN, creditor={"$ne": None}, kind="creditor_not_found", client="542900"),
    "creditor_dot_star": dict(sender=UNKNOWN, creditor=".*", kind="creditor_not_found", client="542900"),
    "creditor_anchored_any": dict(sender=UNKNOWN, creditor="^.+$", kind="creditor_not_found", client="542900"),
    # from_email (known client, no creditor name)
    "sender_regex": dict(sender=".*@.*", creditor=None, kind="creditor_not_found", client="542900"),
    "sender_sql_injection": dict(sender="' OR '1'='1' --", creditor=None, kind="creditor_not_found", client="542900"),
    "sender_sql_wildcard": dict(sender="%@%", creditor=None, kind="creditor_not_found", client="542900"),
    # operator keys at the top of extracted_data are just ignored data
    "top_level_operators": dict(extra={"$where": "sleep(10000)", "$set": {"final_creditor_list": []}}, target="542900"),
}


@pytest.mark.parametrize("case", list(EMAIL_CASES))
def test_hostile_email_values_touch_at_most_the_intended_document(case, pg, mongo_db, resources, reconcile, service_env):
    spec = EMAIL_CASES[case]
    ids = seed_portal(mongo_db)
    extracted = reply(az=spec.get("az", "542900"), name=spec.get("name", "Mustermann, Max"), amount=100,
                      creditor_name=spec.get("creditor", "Sparkasse Bochum"), **spec.get("extra", {}))
    email_id = add_email(pg, from_email=spec.get("sender", SPARKASSE), extracted=extracted)
    before = snapshot(mongo_db)
    with through_proxy(resources, service_env, mongo_db) as proxy:
        result = reconcile()
    assert result.success
    [report] = report_rows(pg)
    assert report["status"] == "completed"
    target = ids[spec["target"]] if "target" in spec else None
    assert_only_target_changed(before, snapshot(mongo_db), target)
    intended = ids[spec.get("target") or spec.get("client")] if (spec.get("target") or spec.get("client")) else None
    assert documents_read(proxy) <= ({intended} if intended else set()), "documents other than the intended one were read"
    for value in (spec.get("az"), spec.get("name"), spec.get("creditor")):
        if isinstance(value, dict):
            never_sent(proxy, value)
    audit = [a for a in finding_rows(pg) if a["email_id"] == email_id]
    repaired = [a for a in finding_rows(pg) if a["action"] == "repaired"]
    if target:
        assert [(a["kind"], a["action"]) for a in audit] == [("data_mismatch", "repaired")]
        assert len(repaired) == 1 and repaired[0]["client_aktenzeichen"] == spec["target"]
        assert snapshot(mongo_db)[target]["final_creditor_list"][0]["creditor_response_amount"] == 100.0
    else:
        assert repaired == []
        [finding] = audit
        assert finding["kind"] == spec["kind"] and finding["action"] == "reported", finding
        assert finding["error"], "the finding does not say why"
        if "why" in spec:
            assert spec["why"] in finding["error"], finding["error"]


# =============================================================================== outbox payloads


def payload(**changes: Any) -> dict:
    data = {"client_aktenzeichen": "542900", "client_name": "Mustermann, Max", "creditor_email": SPARKASSE,
            "creditor_name": "Sparkasse Bochum", "new_debt_amount": 321.5, "response_text": "Restforderung",
            "reference_numbers": ["AZ-1"]}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


OUTBOX_CASES = {
    "az_gt_object": dict(payload=payload(client_aktenzeichen={"$gt": ""}), dead=True, why="plain string"),
    "name_regex_object_without_az": dict(payload=payload(client_aktenzeichen=None, client_name={"$regex": ".*"}), dead=True, why="client key"),
    "creditor_email_object_without_name": dict(payload=payload(creditor_email={"$ne": None}, creditor_name=None), dead=True, why="creditor key"),
    "amount_as_operator_object": dict(payload=payload(new_debt_amount={"$numberDecimal": "5"}), dead=True, why="invalid"),
    "amount_as_expression": dict(payload=payload(new_debt_amount="1e3"), dead=True, why="invalid"),
    "creditor_patterns": dict(payload=payload(creditor_email=".*", creditor_name=".*"), why="creditor", client="542900"),
    "az_anchor": dict(payload=payload(client_aktenzeichen="^542900", client_name=None), why="client"),
    "name_wildcard_without_az": dict(payload=payload(client_aktenzeichen=None, client_name="Muster.*, Max"), why="client"),
    "az_dot_star_is_a_literal": dict(payload=payload(client_aktenzeichen=".*", client_name=None, creditor_email="l@inkasso-west.de",
                                                     creditor_name="Inkasso West"), target=".*"),
    "az_dotted_is_a_literal": dict(payload=payload(client_aktenzeichen="a.b", client_name=None, creditor_email="p@inkasso-nord.de",
                                                   creditor_name="Inkasso Nord"), target="a.b"),
    "operator_text_is_stored_as_text": dict(payload=payload(response_text="$set: {final_creditor_list: []}",
                                                            reference_numbers=["$where", "a.b", "(?i).*"]), target="542900"),
    "top_level_operators_are_ignored": dict(payload={**payload(), "$set": {"final_creditor_list": []}, "$where": "sleep(1)"},
                                            target="542900"),
    "reference_objects_are_not_written": dict(payload=payload(reference_numbers=[{"$gt": 1}]), target="542900"),
}


@pytest.mark.parametrize("case", list(OUTBOX_CASES))
def test_hostile_outbox_payloads_touch_at_most_the_intended_document(case, pg, mongo_db, resources, reconcile, service_env):
    spec = OUTBOX_CASES[case]
    ids = seed_portal(mongo_db)
    message_id = add_outbox(pg, spec["payload"])
    before = snapshot(mongo_db)
    with through_proxy(resources, service_env, mongo_db) as proxy:
        result = reconcile()
    assert result.success and report_rows(pg)[0]["status"] == "completed"
    target = ids[spec["target"]] if "target" in spec else None
    after = snapshot(mongo_db)
    assert_only_target_changed(before, after, target)
    intended = ids[spec.get("target") or spec.get("client")] if (spec.get("target") or spec.get("client")) else None
    assert documents_read(proxy) <= ({intended} if intended else set()), "documents other than the intended one were read"
    for value in spec["payload"].values():
        if isinstance(value, dict):
            never_sent(proxy, value)
    message = outbox(pg)[message_id]
    delivered = [a for a in finding_rows(pg) if a["action"] == "repaired"]
    if target:
        assert message["processed_at"] is not None, message
        assert len(delivered) == 1 and delivered[0]["outbox_message_id"] == message_id
        el = after[target]["final_creditor_list"][0]
        assert el["creditor_response_amount"] == 321.5
        assert el["creditor_response_text"] == spec["payload"]["response_text"]
        refs = spec["payload"]["reference_numbers"]
        if all(isinstance(r, str) for r in refs):
            assert el["response_reference_numbers"] == refs
        else:
            assert el.get("response_reference_numbers") == before[target]["final_creditor_list"][0].get("response_reference_numbers")
    else:
        assert delivered == []
        assert message["processed_at"] is None
        assert spec["why"] in (message["error_message"] or ""), message["error_message"]
        if spec.get("dead"):
            assert message["retry_count"] >= message["max_retries"], message


# =============================================================================== malformed extracted_data

def _deep(levels: int, leaf: Any = 1) -> str:
    return "[" * levels + json.dumps(leaf) + "]" * levels


# amounts RULES.md rejects (JSON text); every one must be reported as invalid_pg_amount, never written
INVALID_AMOUNTS = st.sampled_from([
    "true", "false", "[]", "[1]", "{}", '{"$numberDecimal": "5"}', '{"value": 5}',
    "-0.01", "-5", "1e13", "1000000000000.01", "1e400", "-1e400",
    '""', '" "', '"abc"', '"1.234"', '"1,234"', '"12.345,678"', '"1,2,3"', '"NaN"', '"Infinity"', '"-Infinity"',
    '"-5"', '"+5"', '"1e3"', '"0x10"', '"1_000"', '"5 USD"', '"€€5"', '"12 34"', '"١٢٣"', '"１２３"', '"5\\u0000"',
    '"' + "9" * 70 + '"', '"' + "9" * 100_000 + '"', _deep(50),
])
WRONG_TYPES = st.sampled_from([1, 1.5, True, None, [], ["542900"], {"$ne": None}, {"$gt": ""}])


@st.composite
def malformed_email(draw, index: int) -> tuple[str, str]:
    """(raw JSON of extracted_data, what must happen: 'skip' | 'invalid_amount' | 'client' | 'creditor').

    The email's sender is c<index>@inkasso.de (the address of the client's creditor <index>), except for
    'creditor', whose sender matches no creditor so that only the (wrongly typed) creditor_name is left.
    """
    shape = draw(st.sampled_from(["not_object", "no_amount", "invalid_amount", "wrong_client", "wrong_creditor"]))
    base = {"client_aktenzeichen": "542900", "client_name": "Mustermann, Max", "creditor_name": f"Creditor {index}",
            "confidence": 0.5}
    if shape == "not_object":
        raw = draw(st.sampled_from(["null", "[]", "[1, 2]", '"a string"', "42", "true", _deep(3),
                                    json.dumps("x" * 200_000), '[{"debt_amount": 5}]']))
        return raw, "skip"
    if shape == "no_amount":
        extra = draw(st.sampled_from([{}, {"debt_amount_x": 5}, {"amount": 5}, {"DEBT_AMOUNT": 5}]))
        return json.dumps({**base, **extra}), "skip"
    if shape == "invalid_amount":
        amount = draw(INVALID_AMOUNTS)
        return json.dumps(base)[:-1] + ', "debt_amount": ' + amount + "}", "invalid_amount"
    if shape == "wrong_client":
        return json.dumps({**base, "client_aktenzeichen": draw(WRONG_TYPES), "client_name": draw(WRONG_TYPES),
                           "debt_amount": 5}), "client"
    return json.dumps({**base, "creditor_name": draw(WRONG_TYPES), "debt_amount": 5}), "creditor"


@st.composite
def batches(draw) -> list[tuple[str, str]]:
    count = draw(st.integers(min_value=1, max_value=4))
    return [draw(malformed_email(i)) for i in range(count)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          derandomize=True)
@given(batch=batches())
def test_malformed_extracted_data_is_reported_never_crashes_never_written(batch, pg, mongo_db, reconcile):
    reset_data(pg, mongo_db)
    add_client(mongo_db, "542900", [creditor(f"c{i}@inkasso.de", 1.0, name=f"Creditor {i}") for i in range(4)]
               + [creditor("ok@inkasso.de", 2.0, name="Control Inkasso")])
    email_ids = [add_email(pg, from_email=f"c{i}@inkasso.de" if expected != "creditor" else f"x{i}@elsewhere.de",
                           extracted=None, raw_json=raw) for i, (raw, expected) in enumerate(batch)]
    control = add_email(pg, from_email="ok@inkasso.de", extracted=reply(amount=7, creditor_name="Control Inkasso"),
                        received_at=IN_WINDOW + timedelta(minutes=1))
    before = snapshot(mongo_db)
    result = reconcile(raise_on_error=False)
    assert result.success, [str(e.event_specific_data.error)[:2000] for e in result.all_events if e.is_step_failure]
    [report] = report_rows(pg)
    assert report["status"] == "completed"
    # only the control element was written
    [doc_id] = changed_documents(before, snapshot(mongo_db))
    after = snapshot(mongo_db)[doc_id]["final_creditor_list"]
    assert after[:4] == before[doc_id]["final_creditor_list"][:4], "a malformed email was written"
    assert after[4]["creditor_response_amount"] == 7.0
    by_email = {}
    for row in finding_rows(pg):
        by_email.setdefault(row["email_id"], []).append(row)
    assert [(r["kind"], r["action"]) for r in by_email.pop(control)] == [("data_mismatch", "repaired")]
    for email_id, (raw, expected) in zip(email_ids, batch):
        found = by_email.get(email_id, [])
        if expected == "skip":
            assert found == [], (raw[:200], found)
            continue
        assert len(found) == 1, (raw[:200], found)
        [row] = found
        assert row["action"] == "reported" and row["error"], row
        kind = {"invalid_amount": "invalid_pg_amount", "client": "client_not_found", "creditor": "creditor_not_found"}[expected]
        assert row["kind"] == kind, (raw[:200], row["kind"], row["error"])


DEEP_LEVELS = 5_000


@pytest.mark.parametrize("with_nul", [False, True], ids=["plain", "with_a_nul_escape_elsewhere"])
def test_deep_nesting_in_an_unrelated_field_does_not_hide_the_email(with_nul, pg, mongo_db, reconcile):
    """extracted_data with a 5,000-level array in a field the pipeline ignores (PostgreSQL's json accepts it):
    the run completes and the email is compared by its own keys (here: repaired), or at least reported with
    a reason that is true (not "no client_aktenzeichen or client_name", which it has)."""
    with pg.connect() as conn:
        assert conn.execute(sa.text("SELECT json_typeof(CAST(:j AS json))"), {"j": _deep(DEEP_LEVELS)}).scalar_one() == "array"
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    raw = json.dumps(reply(amount=100))[:-1] + ', "raw_llm_output": ' + _deep(DEEP_LEVELS)
    raw += (', "subject_raw": "Re: Forderung\\u0000"}' if with_nul else "}")  # a \u0000 escape makes PostgreSQL's -> raise
    email_id = add_email(pg, from_email=SPARKASSE, extracted=None, raw_json=raw)
    result = reconcile(raise_on_error=False)
    assert result.success
    assert report_rows(pg)[0]["status"] == "completed"
    [row] = [r for r in finding_rows(pg) if r["email_id"] == email_id]
    assert row["action"] == "repaired" or "no client_aktenzeichen or client_name" not in (row["error"] or ""), (
        f"{row['kind']}: {row['error']!r} - the email has both keys; its extracted_data was not parsed "
        f"(nesting deeper than Python's json recursion limit) and the finding says something false")


def test_deep_nesting_as_the_amount_is_reported_not_written(pg, mongo_db, reconcile):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    raw = json.dumps(reply(amount=None))[:-1].replace('"debt_amount": null', '"debt_amount": ' + _deep(DEEP_LEVELS)) + "}"
    email_id = add_email(pg, from_email=SPARKASSE, extracted=None, raw_json=raw)
    before = snapshot(mongo_db)
    result = reconcile(raise_on_error=False)
    assert result.success and report_rows(pg)[0]["status"] == "completed"
    assert snapshot(mongo_db) == before
    [row] = [r for r in finding_rows(pg) if r["email_id"] == email_id]
    assert row["action"] == "reported" and row["error"], row


# =============================================================================== NUL in MongoDB values
# PostgreSQL text cannot hold NUL; MongoDB strings can. A finding about such a value is recorded (NUL as
# U+FFFD) and the run completes; a document whose _id holds NUL is never written, since the audit trail
# could not name it exactly (the read-back of a killed run's write would look for another document).

NUL_CASES = {
    "id_with_an_extra_answer": dict(_id="c1\x00", creditors=[creditor(SPARKASSE, 1234.56), creditor(
        "extra@x.de", 75.0, name="Inkasso Nord", response_received_at=IN_WINDOW)], kind="extra_in_mongo", written=False),
    "id_with_a_mismatch": dict(_id="c1\x00", creditors=[creditor(SPARKASSE, 1.0)], kind="data_mismatch", written=False),
    "id_with_a_missing_amount": dict(_id="\x00c1", creditors=[creditor(SPARKASSE)], kind="missing_in_mongo", written=False),
    "address_of_an_extra_answer": dict(_id="c2", creditors=[creditor(SPARKASSE, 1234.56), creditor(
        "ex\x00tra@x.de", 75.0, name="Inkasso\x00 Nord", response_received_at=IN_WINDOW)], kind="extra_in_mongo", written=False),
    "name_of_the_repaired_element": dict(_id="c3", creditors=[creditor(SPARKASSE, 1.0, name="Spark\x00asse")],
                                         kind="data_mismatch", written=True),
}


@pytest.mark.parametrize("case", list(NUL_CASES))
def test_nul_in_a_mongodb_value_is_recorded_and_an_id_with_nul_never_written(case, pg, mongo_db, reconcile):
    from reconciliation_pipeline import audit
    from reconciliation_pipeline.core.diff import UNAUDITABLE_ID

    spec = NUL_CASES[case]
    mongo_db.clients.insert_one({"_id": spec["_id"], "aktenzeichen": "542900", "firstName": "Max", "lastName": "Mustermann",
                                 "final_creditor_list": spec["creditors"]})
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=1234.56))
    before = snapshot(mongo_db)
    for run in (1, 2):  # the second run finds the same problem again: the ledger knows it by the same key
        result = reconcile(raise_on_error=False)
        assert result.success and report_rows(pg)[-1]["status"] == "completed", report_rows(pg)[-1]
        [row] = finding_rows(pg, report_rows(pg)[-1]["id"])
        assert row["kind"] == spec["kind"], row
        if spec["written"]:
            break
        assert row["action"] == "reported" and snapshot(mongo_db) == before
        assert row["client_id"] == spec["_id"].replace("\x00", "\ufffd")
        if spec["kind"] != "extra_in_mongo":
            assert row["error"] == UNAUDITABLE_ID
        else:
            with pg.connect() as conn:
                [seen] = conn.execute(sa.text("SELECT times_seen FROM reconciliation_drift WHERE kind = 'extra_in_mongo'")).scalars()
            assert seen == run
            assert "\x00" not in row["creditor_email"] and "extra@x.de" in row["creditor_email"].replace("\ufffd", "")
    if spec["written"]:
        assert row["action"] == "repaired"
        assert snapshot(mongo_db)[spec["_id"]]["final_creditor_list"][0]["creditor_response_amount"] == 1234.56
    with pg.connect() as conn:
        verdict = audit.verify(conn)
    assert verdict.ok and verdict.checked >= 2, verdict


def test_an_outbox_message_for_a_document_whose_id_holds_nul_is_not_delivered(pg, mongo_db, reconcile):
    from reconciliation_pipeline.core.diff import UNAUDITABLE_ID

    mongo_db.clients.insert_one({"_id": "c1\x00", "aktenzeichen": "542900", "firstName": "Max", "lastName": "Mustermann",
                                 "final_creditor_list": [creditor(SPARKASSE, 1.0)]})
    message_id = add_outbox(pg, payload())
    before = snapshot(mongo_db)
    result = reconcile(raise_on_error=False)
    assert result.success and report_rows(pg)[0]["status"] == "completed"
    assert snapshot(mongo_db) == before
    message = outbox(pg)[message_id]
    assert message["processed_at"] is None and UNAUDITABLE_ID in (message["error_message"] or ""), message
