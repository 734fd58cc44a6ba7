"""Unit and property tests of the repair plan (reconciliation_pipeline.core.repair).

RULES.md section 4 and SCHEMA.md: set exactly the fields the application sets for a creditor
answer, never claim_amount; compare-and-swap on identity and observed value; verify the read-back.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from bson import Decimal128
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.core import frames
from reconciliation_pipeline.core.amounts import to_cents
from reconciliation_pipeline.core.diff import DiffOptions, diff
from reconciliation_pipeline.core.frames import MISSING
from reconciliation_pipeline.core.repair import (
    UNCHECKED,
    ElementUpdate,
    answered_element,
    current_amount,
    plan_client,
    settle_unverified,
    verify,
)

RECEIVED = datetime(2026, 11, 28, 8, 0, tzinfo=timezone.utc)
OLD = RECEIVED - timedelta(days=10)
BANK = "forderungen@sparkasse-bochum.de"
BANK_NAME = "Sparkasse Bochum"

APP_FIELDS = {
    "creditor_response_amount", "current_debt_amount", "amount_source", "response_received_at",
    "contact_status", "last_contacted_at",
}
OPTIONAL_FIELDS = {"creditor_response_text", "response_reference_numbers"}


def element(email=BANK, name=BANK_NAME, amount=1000.0, **extra) -> dict:
    e = {
        "sender_name": name, "sender_email": email, "claim_amount": 1500.0, "current_debt_amount": amount,
        "creditor_response_amount": amount, "amount_source": "creditor_response", "response_received_at": OLD,
        "contact_status": "responded", "last_contacted_at": OLD, "creditor_id": "cr-1", "notes": ["keep me"],
    }
    e.update(extra)
    return e


def unanswered(email=BANK, name=BANK_NAME, **extra) -> dict:
    e = {"sender_name": name, "sender_email": email, "claim_amount": 1500.0, "contact_status": "contacted",
         "current_debt_amount": 1500.0}
    e.update(extra)
    return e


def update(pos=0, cents=123456, key="k", email=BANK, name=BANK_NAME, observed=UNCHECKED, **extra) -> ElementUpdate:
    return ElementUpdate(key=key, pos=pos, sender_email=email, sender_name=name, cents=cents, received_at=RECEIVED,
                         observed_amount=observed, **extra)


def changed_keys(before: dict, after: dict) -> set:
    return {k for k in set(before) | set(after) if k not in before or k not in after or before[k] != after[k]
            or type(before[k]) is not type(after[k])}


# ---------------------------------------------------------------------------------------------
# answered_element
# ---------------------------------------------------------------------------------------------

def test_answered_element_sets_exactly_the_application_fields():
    old = element(amount=1000.0)
    new = answered_element(old, update(cents=123456))
    assert new["creditor_response_amount"] == 1234.56
    assert new["current_debt_amount"] == 1234.56
    assert isinstance(new["creditor_response_amount"], float)
    assert isinstance(new["current_debt_amount"], float)
    assert new["amount_source"] == "creditor_response"
    assert new["response_received_at"] == RECEIVED
    assert new["contact_status"] == "responded"
    assert new["last_contacted_at"] == RECEIVED
    assert changed_keys(old, new) <= APP_FIELDS
    # everything else untouched, claim_amount above all
    for k in set(old) - APP_FIELDS:
        assert new[k] == old[k]
    assert new["claim_amount"] == 1500.0


def test_answered_element_on_unanswered_creditor():
    old = unanswered()
    new = answered_element(old, update(cents=5))
    assert changed_keys(old, new) == APP_FIELDS
    assert new["claim_amount"] == 1500.0
    assert new["creditor_response_amount"] == 0.05
    assert "creditor_response_text" not in new and "response_reference_numbers" not in new


def test_answered_element_optional_text_and_references():
    old = element()
    new = answered_element(old, update(response_text="Forderung beträgt 1.234,56 EUR", reference_numbers=("AZ-1", "AZ-2")))
    assert new["creditor_response_text"] == "Forderung beträgt 1.234,56 EUR"
    assert new["response_reference_numbers"] == ["AZ-1", "AZ-2"]
    assert isinstance(new["response_reference_numbers"], list)
    assert changed_keys(old, new) <= APP_FIELDS | OPTIONAL_FIELDS


def test_answered_element_keeps_existing_text_when_none_given():
    old = element(creditor_response_text="alt", response_reference_numbers=["X"])
    new = answered_element(old, update())
    assert new["creditor_response_text"] == "alt"
    assert new["response_reference_numbers"] == ["X"]


def test_answered_element_does_not_mutate_its_input():
    old = element()
    snapshot = copy.deepcopy(old)
    answered_element(old, update(response_text="t", reference_numbers=["r"]))
    assert old == snapshot


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=10**14))
def test_answered_amount_round_trips_to_cents(cents):
    new = answered_element(unanswered(), update(cents=cents))
    assert to_cents(new["creditor_response_amount"]) == cents
    assert to_cents(new["current_debt_amount"]) == cents
    assert new["claim_amount"] == 1500.0


# ---------------------------------------------------------------------------------------------
# plan_client
# ---------------------------------------------------------------------------------------------

def test_plan_applies_update_and_leaves_other_elements_alone():
    others = [unanswered("a@volksbank.de", "Volksbank Ruhr"), element("b@commerzbank.de", "Commerzbank", amount=5.0)]
    observed = [others[0], element(amount=1000.0), others[1]]
    snapshot = copy.deepcopy(observed)
    plan = plan_client(observed, [update(pos=1, cents=123456, key="u1", observed=1000.0)])
    assert plan.conflicts == {}
    assert [u.key for u in plan.applied] == ["u1"]
    assert plan.before == {"u1": 100000}
    assert plan.new[0] == snapshot[0] and plan.new[2] == snapshot[2]
    assert plan.new[1]["creditor_response_amount"] == 1234.56
    assert changed_keys(snapshot[1], plan.new[1]) <= APP_FIELDS
    assert len(plan.new) == 3
    # the observed list and its elements are not modified, and plan.observed is what was read
    assert observed == snapshot
    assert plan.observed == snapshot


@pytest.mark.parametrize(
    ("current", "observed_amount", "before"),
    [
        pytest.param(1000.0, 1000.0, 100000, id="float"),
        pytest.param(1000.0, 1000, 100000, id="int-observed-float-current"),
        pytest.param(1000, 1000.0, 100000, id="float-observed-int-current"),
        pytest.param("1.000,00", "1.000,00", 100000, id="string"),
        pytest.param(Decimal128("10.00"), Decimal128("10.00"), 1000, id="decimal128"),
        pytest.param(None, None, None, id="null"),
        pytest.param("abc", "abc", None, id="invalid-string"),
    ],
)
def test_plan_no_conflict_when_amount_unchanged(current, observed_amount, before):
    plan = plan_client([element(amount=current)], [update(observed=observed_amount, key="u")])
    assert plan.conflicts == {}
    assert plan.before == {"u": before}
    assert plan.new[0]["creditor_response_amount"] == 1234.56


def test_plan_no_conflict_when_field_absent_as_observed():
    observed = [unanswered()]
    plan = plan_client(observed, [update(observed=MISSING, key="u")])
    assert plan.conflicts == {}
    assert plan.before == {"u": None}
    assert current_amount(plan.new[0]) == 1234.56


@pytest.mark.parametrize(
    ("observed_list", "upd", "reason"),
    [
        pytest.param([element()], update(email="other@bank.de"), "replaced", id="sender-email-changed"),
        pytest.param([element()], update(name="Sparkasse Essen"), "replaced", id="sender-name-changed"),
        pytest.param([element(email=BANK.upper())], update(), "replaced", id="sender-email-case-changed"),
        pytest.param([element()], update(pos=1), "no longer exists", id="element-gone"),
        pytest.param([element()], update(pos=-1), "no longer exists", id="negative-pos"),
        pytest.param([], update(), "no longer exists", id="empty-list"),
        pytest.param(["not a dict"], update(), "no longer exists", id="element-not-a-mapping"),
        pytest.param([None], update(), "no longer exists", id="element-null"),
        pytest.param([element(amount=1000.0)], update(observed=999.0), "changed", id="amount-changed"),
        pytest.param([element(amount=None)], update(observed=1000.0), "changed", id="amount-now-null"),
        pytest.param([unanswered()], update(observed=1000.0), "changed", id="amount-now-absent"),
        pytest.param([element(amount=1000.0)], update(observed=None), "changed", id="amount-was-null"),
        pytest.param([element(amount=1000.0)], update(observed=MISSING), "changed", id="amount-was-absent"),
        pytest.param([element(amount=1.0)], update(observed=True), "changed", id="bool-is-not-one"),
        pytest.param([element(amount="1000")], update(observed=1000), "changed", id="string-vs-number"),
    ],
)
def test_plan_conflicts(observed_list, upd, reason):
    snapshot = copy.deepcopy(observed_list)
    plan = plan_client(observed_list, [upd])
    assert list(plan.conflicts) == [upd.key]
    assert reason in plan.conflicts[upd.key]
    assert plan.applied == []
    assert plan.before == {}
    assert plan.new == snapshot
    assert observed_list == snapshot


@pytest.mark.parametrize("current", [999.0, None, "x", Decimal128("1.00")])
def test_plan_unchecked_ignores_the_current_amount(current):
    plan = plan_client([element(amount=current)], [update(key="u", observed=UNCHECKED)])
    assert plan.conflicts == {}
    assert [u.key for u in plan.applied] == ["u"]
    assert plan.new[0]["creditor_response_amount"] == 1234.56


def test_plan_unchecked_still_checks_identity():
    plan = plan_client([element()], [update(key="u", email="x@y.de")])
    assert "u" in plan.conflicts


def test_plan_several_updates_apply_in_order():
    observed = [element(amount=1.0), unanswered("a@volksbank.de", "Volksbank Ruhr"), element("c@c.de", "C", amount=3.0)]
    updates = [
        update(pos=0, cents=1000, key="first"),
        update(pos=1, cents=2000, key="second", email="a@volksbank.de", name="Volksbank Ruhr", observed=MISSING),
        update(pos=0, cents=3000, key="third"),  # same element again: the later update wins
        update(pos=2, cents=4000, key="conflict", observed=2.0, email="c@c.de", name="C"),
    ]
    plan = plan_client(observed, updates)
    assert [u.key for u in plan.applied] == ["first", "second", "third"]
    assert set(plan.conflicts) == {"conflict"}
    assert plan.new[0]["creditor_response_amount"] == 30.0
    assert plan.new[1]["creditor_response_amount"] == 20.0
    assert plan.new[2] == observed[2]
    assert plan.before == {"first": 100, "second": None, "third": 1000}


def test_plan_second_checked_update_of_same_element_sees_first():
    # the second update observed the original amount; after the first update it has changed
    plan = plan_client([element(amount=1.0)], [update(cents=1000, key="a", observed=1.0), update(cents=2000, key="b", observed=1.0)])
    assert [u.key for u in plan.applied] == ["a"]
    assert "changed" in plan.conflicts["b"]
    assert plan.new[0]["creditor_response_amount"] == 10.0


def test_plan_never_touches_claim_amount_even_if_equal_field_names_differ():
    observed = [element(claim_amount=7777.77, current_debt_amount=1.0)]
    plan = plan_client(observed, [update(cents=1)])
    assert plan.new[0]["claim_amount"] == 7777.77
    assert plan.new[0]["current_debt_amount"] == 0.01


@settings(deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=6),
    st.data(),
)
def test_plan_property_only_targeted_elements_change(amounts, data):
    observed = [element(f"c{i}@bank{i}.de", f"Bank {i}", amount=a / 100) for i, a in enumerate(amounts)]
    snapshot = copy.deepcopy(observed)
    targets = data.draw(st.lists(st.integers(0, len(amounts) - 1), unique=True))
    new_cents = {i: data.draw(st.integers(0, 10**14)) for i in targets}
    updates = [update(pos=i, cents=c, key=i, email=f"c{i}@bank{i}.de", name=f"Bank {i}", observed=amounts[i] / 100)
               for i, c in new_cents.items()]
    plan = plan_client(observed, updates)
    assert plan.conflicts == {}
    assert observed == snapshot
    for i, old in enumerate(snapshot):
        if i in new_cents:
            assert to_cents(plan.new[i]["creditor_response_amount"]) == new_cents[i]
            assert changed_keys(old, plan.new[i]) <= APP_FIELDS
            assert plan.new[i]["claim_amount"] == old["claim_amount"]
            assert plan.before[i] == amounts[i]
            assert verify(plan.new, updates[targets.index(i)]) == (True, new_cents[i])
        else:
            assert plan.new[i] == old


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------

def test_verify_true_for_the_written_value():
    u = update(pos=1, cents=123456)
    read_back = [unanswered("x@x.de", "X"), answered_element(element(), u)]
    assert verify(read_back, u) == (True, 123456)


@pytest.mark.parametrize(
    ("read_back", "ok", "after"),
    [
        pytest.param([element(amount=1234.55)], False, 123455, id="other-value"),
        pytest.param([element(amount=1000.0)], False, 100000, id="old-value"),
        pytest.param([unanswered()], False, None, id="amount-absent"),
        pytest.param([element(amount=None)], False, None, id="amount-null"),
        pytest.param([element(amount=1234.56, current_debt_amount=1000.0)], False, 123456, id="current-debt-differs"),
        pytest.param([element(amount=1234.56, amount_source="manual")], False, 123456, id="amount-source-differs"),
        pytest.param([element(amount=1234.56, sender_email="other@x.de")], False, 123456, id="sender-email-differs"),
        pytest.param([element(amount=1234.56, sender_name="Other")], False, 123456, id="sender-name-differs"),
        pytest.param([], False, None, id="empty-list"),
        pytest.param(None, False, None, id="no-list"),
        pytest.param("x", False, None, id="list-not-a-list"),
        pytest.param([None], False, None, id="element-not-a-mapping"),
        pytest.param([element(amount=1234.56)], True, 123456, id="equal-float"),
        pytest.param([element(amount="1.234,56", current_debt_amount=Decimal128("1234.56"))], True, 123456,
                     id="equal-other-representations"),
    ],
)
def test_verify(read_back, ok, after):
    assert verify(read_back, update(pos=0, cents=123456)) == (ok, after)


def test_verify_wrong_position():
    u = update(pos=1, cents=100)
    good = answered_element(element(), u)
    assert verify([good], u) == (False, None)
    assert verify([good, element(amount=5.0)], u) == (False, 500)


# ---------------------------------------------------------------------------------------------
# The diff's findings feed the plan (observed values as the diff saw them)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "mongo_element",
    [
        pytest.param(element(amount=1000.0), id="data_mismatch"),
        pytest.param(unanswered(), id="missing-absent"),
        pytest.param(element(amount=None), id="missing-null"),
        pytest.param(element(amount=Decimal128("10.00")), id="decimal128"),
    ],
)
def test_plan_from_diff_finding_applies_and_verifies(mongo_element):
    window_end = RECEIVED + timedelta(hours=2)
    rows = pd.DataFrame([dict(
        email_id=1, from_email=BANK, received_at=RECEIVED, created_at=RECEIVED, in_window=True,
        extracted_json=json.dumps({"client_aktenzeichen": "1", "creditor_name": BANK_NAME, "debt_amount": 1234.56}),
    )])
    doc = {"_id": "c1", "aktenzeichen": "1", "firstName": "Max", "lastName": "Mustermann",
           "final_creditor_list": [unanswered("a@volksbank.de", "Volksbank Ruhr"), mongo_element]}
    clients, elements = frames.prepare_clients([doc])
    findings, _ = diff(frames.prepare_emails(rows), clients, elements, DiffOptions(window_end - timedelta(hours=48), window_end))
    assert len(findings) == 1
    f = findings.iloc[0]
    assert bool(f["repairable"])
    u = ElementUpdate(key=1, pos=int(f["pos"]), sender_email=f["observed_sender_email"], sender_name=f["observed_sender_name"],
                      cents=int(f["pg_amount_cents"]), received_at=pd.Timestamp(f["received_at"]).to_pydatetime(),
                      observed_amount=f["mongo_raw"])
    snapshot = copy.deepcopy(doc["final_creditor_list"])
    plan = plan_client(doc["final_creditor_list"], [u])
    assert plan.conflicts == {}
    assert plan.new[0] == snapshot[0]
    assert changed_keys(snapshot[1], plan.new[1]) <= APP_FIELDS
    assert plan.new[1]["claim_amount"] == 1500.0
    assert plan.new[1]["response_received_at"] == RECEIVED
    assert verify(plan.new, u) == (True, 123456)
    # a concurrent application write of another value makes the same update a conflict
    concurrent = copy.deepcopy(snapshot)
    concurrent[1]["creditor_response_amount"] = 1.5
    assert plan_client(concurrent, [u]).conflicts



# ---------------------------------------------------------------------------------------------
# Read-back of a write whose run ended first
# ---------------------------------------------------------------------------------------------

_ANSWERED = {"sender_email": "Forderungen@Sparkasse-Bochum.de", "creditor_response_amount": 1234.56,
             "current_debt_amount": 1234.56, "amount_source": "creditor_response", "claim_amount": 1500.0}


@pytest.mark.parametrize(
    "creditors, pos, cents, address, action, after, says",
    [
        ([_ANSWERED], 0, 123456, "forderungen@sparkasse-bochum.de", "repaired", 123456, "applied"),
        ([_ANSWERED], 0, 123456, None, "repaired", 123456, "applied"),
        ([{"x": 1}, _ANSWERED], 1, 123456, " FORDERUNGEN@sparkasse-bochum.de ", "repaired", 123456, "applied"),
        ([_ANSWERED], 0, 99900, "forderungen@sparkasse-bochum.de", "repair_failed", 123456, "does not hold the amount sent"),
        ([{**_ANSWERED, "current_debt_amount": 1.0}], 0, 123456, None, "repair_failed", 123456, "does not hold"),
        ([{**_ANSWERED, "amount_source": "claim"}], 0, 123456, None, "repair_failed", 123456, "does not hold"),
        ([{k: v for k, v in _ANSWERED.items() if k != "creditor_response_amount"}], 0, 123456, None, "repair_failed", None, "does not hold"),
        ([_ANSWERED], 0, 123456, "mahnwesen@telekom.de", "repair_failed", None, "another creditor is at position 0"),
        ([_ANSWERED], 1, 123456, None, "repair_failed", None, "gone"),
        ([_ANSWERED], -1, 123456, None, "repair_failed", None, "gone"),
        (None, 0, 123456, None, "repair_failed", None, "gone"),
        (["not an element"], 0, 123456, None, "repair_failed", None, "gone"),
        ([_ANSWERED], None, 123456, None, "repair_failed", None, "position was not recorded"),
    ],
    ids=["applied", "applied_no_address", "applied_address_case", "other_amount", "debt_not_set", "not_an_answer",
         "no_amount", "other_creditor", "pos_past_end", "negative_pos", "document_gone", "element_not_mapping", "no_pos"],
)
def test_settle_unverified(creditors, pos, cents, address, action, after, says):
    outcome = settle_unverified(creditors, pos, cents, address)
    assert (outcome.action, outcome.after_cents) == (action, after)
    assert says in outcome.error and "read back by a later run" in outcome.error
