"""Unit and property tests of outbox payload parsing (reconciliation_pipeline.core.outbox).

RULES.md section 1 and SCHEMA.md outbox_messages: new_debt_amount (or the older debt_amount),
a payload that can never succeed is poison at once and never written with a made-up value.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.core.outbox import DeliveryRequest, parse_payload

_ABSENT = object()


def payload(**fields) -> dict:
    data = {
        "client_name": "Mustermann, Max", "client_aktenzeichen": "542900",
        "creditor_email": "forderungen@sparkasse-bochum.de", "creditor_name": "Sparkasse Bochum",
        "new_debt_amount": 1234.56, "response_text": "Die Forderung beträgt 1.234,56 EUR.",
        "reference_numbers": ["AZ-123"],
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not _ABSENT}


def ok(value) -> DeliveryRequest:
    request, error = parse_payload(value)
    assert error is None, error
    assert isinstance(request, DeliveryRequest)
    return request


def poison(value) -> str:
    request, error = parse_payload(value)
    assert request is None
    assert isinstance(error, str) and error.startswith("poison")
    return error


# ---------------------------------------------------------------------------------------------
# Valid payloads
# ---------------------------------------------------------------------------------------------

def test_full_payload_as_dict():
    r = ok(payload())
    assert r.client_aktenzeichen == "542900"
    assert r.client_name == "Mustermann, Max"
    assert r.creditor_email == "forderungen@sparkasse-bochum.de"
    assert r.creditor_name == "Sparkasse Bochum"
    assert r.cents == 123456
    assert r.response_text == "Die Forderung beträgt 1.234,56 EUR."
    assert r.reference_numbers == ("AZ-123",)


def test_payload_as_json_text_equals_payload_as_dict():
    data = payload()
    assert ok(json.dumps(data)) == ok(data)


def test_json_text_numbers_are_exact():
    # 0.145 as JSON text is parsed as Decimal, half-up to 15 cents
    assert ok(json.dumps(payload(new_debt_amount=0.145))).cents == 15
    assert ok('{"client_aktenzeichen": "1", "creditor_email": "a@b.de", "new_debt_amount": 1234.565}').cents == 123457


@pytest.mark.parametrize(
    ("fields", "cents"),
    [
        pytest.param({"new_debt_amount": 10.0, "debt_amount": 20.0}, 1000, id="new-preferred"),
        pytest.param({"new_debt_amount": _ABSENT, "debt_amount": 20.0}, 2000, id="old-name"),
        pytest.param({"new_debt_amount": "1.234,56"}, 123456, id="german-string"),
        pytest.param({"new_debt_amount": "€ 1,234.56"}, 123456, id="english-string"),
        pytest.param({"new_debt_amount": "1234,56 EUR"}, 123456, id="eur-suffix"),
        pytest.param({"new_debt_amount": 0}, 0, id="zero-is-a-real-amount"),
        pytest.param({"new_debt_amount": 1500}, 150000, id="int"),
        pytest.param({"new_debt_amount": Decimal("12.345")}, 1235, id="decimal-half-up"),
        pytest.param({"new_debt_amount": 0.005}, 1, id="float-half-up"),
        pytest.param({"new_debt_amount": "oops", "debt_amount": 5}, None, id="invalid-new-is-not-replaced-by-old"),
    ],
)
def test_amount_field(fields, cents):
    if cents is None:
        assert "new_debt_amount" in poison(payload(**fields))
    else:
        assert ok(payload(**fields)).cents == cents


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"client_aktenzeichen": _ABSENT}, (None, "Mustermann, Max"), id="name-only"),
        pytest.param({"client_aktenzeichen": None}, (None, "Mustermann, Max"), id="az-null"),
        pytest.param({"client_aktenzeichen": "   "}, (None, "Mustermann, Max"), id="az-blank"),
        pytest.param({"client_name": _ABSENT}, ("542900", None), id="az-only"),
        pytest.param({"client_aktenzeichen": " 542900 "}, ("542900", "Mustermann, Max"), id="az-trimmed"),
        pytest.param({"client_name": 42}, ("542900", None), id="name-not-a-string"),
    ],
)
def test_client_keys(fields, expected):
    r = ok(payload(**fields))
    assert (r.client_aktenzeichen, r.client_name) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"creditor_email": _ABSENT}, (None, "Sparkasse Bochum"), id="name-only"),
        pytest.param({"creditor_name": _ABSENT}, ("forderungen@sparkasse-bochum.de", None), id="email-only"),
        pytest.param({"creditor_email": " "}, (None, "Sparkasse Bochum"), id="email-blank"),
    ],
)
def test_creditor_keys(fields, expected):
    r = ok(payload(**fields))
    assert (r.creditor_email, r.creditor_name) == expected


@pytest.mark.parametrize(
    ("refs", "expected"),
    [
        pytest.param(["AZ-1", "AZ-2"], ("AZ-1", "AZ-2"), id="list-of-strings"),
        pytest.param([], (), id="empty-list"),
        pytest.param(["AZ-1", 2], None, id="mixed-list"),
        pytest.param([None], None, id="list-of-null"),
        pytest.param("AZ-1", None, id="string"),
        pytest.param({"a": "b"}, None, id="dict"),
        pytest.param(None, None, id="null"),
        pytest.param(_ABSENT, None, id="absent"),
    ],
)
def test_reference_numbers(refs, expected):
    assert ok(payload(reference_numbers=refs)).reference_numbers == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Antwort", "Antwort"),
        (None, None),
        (_ABSENT, None),
        (42, None),
        (["a"], None),
    ],
)
def test_response_text(text, expected):
    assert ok(payload(response_text=text)).response_text == expected


def test_response_text_is_capped():
    assert len(ok(payload(response_text="x" * 200_000)).response_text) == 100_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-28T08:00:00+00:00", datetime(2026, 11, 28, 8, tzinfo=timezone.utc)),
        ("2026-11-28T09:00:00+01:00", datetime(2026, 11, 28, 8, tzinfo=timezone.utc)),
        ("2026-11-28T08:00:00", None),  # naive: unknown zone, not used
        ("yesterday", None),
        (1764316800, None),
        (None, None),
    ],
)
def test_response_received_at(value, expected):
    assert ok(payload(response_received_at=value)).response_received_at == expected


# ---------------------------------------------------------------------------------------------
# Poison payloads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param(payload(new_debt_amount=_ABSENT), "neither", id="no-amount"),
        pytest.param(payload(new_debt_amount=None), "new_debt_amount", id="new-amount-null"),
        pytest.param(payload(new_debt_amount=_ABSENT, debt_amount=None), "debt_amount", id="old-amount-null"),
        pytest.param(payload(new_debt_amount="1.234"), "ambiguous", id="ambiguous-amount"),
        pytest.param(payload(new_debt_amount="garbage"), "invalid new_debt_amount", id="garbage-amount"),
        pytest.param(payload(new_debt_amount=-5), "invalid", id="negative"),
        pytest.param(payload(new_debt_amount="-5"), "invalid", id="negative-string"),
        pytest.param(payload(new_debt_amount=True), "invalid", id="boolean"),
        pytest.param(payload(new_debt_amount=float("nan")), "invalid", id="nan"),
        pytest.param(payload(new_debt_amount=float("inf")), "invalid", id="inf"),
        pytest.param(payload(new_debt_amount=10**13), "invalid", id="too-large"),
        pytest.param(payload(new_debt_amount={"$numberDecimal": "1"}), "invalid", id="dict-amount"),
        pytest.param(payload(new_debt_amount=_ABSENT, debt_amount="x"), "invalid debt_amount", id="old-invalid"),
        pytest.param(payload(client_aktenzeichen=_ABSENT, client_name=_ABSENT), "client key", id="no-client-key"),
        pytest.param(payload(client_aktenzeichen=None, client_name=None), "client key", id="null-client-keys"),
        pytest.param(payload(client_aktenzeichen="", client_name="  "), "client key", id="blank-client-keys"),
        pytest.param(payload(client_aktenzeichen={"$ne": None}), "not a plain string", id="az-operator-dict"),
        pytest.param(payload(client_aktenzeichen=542900), "not a plain string", id="az-int"),
        pytest.param(payload(client_aktenzeichen=["542900"]), "not a plain string", id="az-list"),
        pytest.param(payload(client_aktenzeichen="54\x002900"), "NUL", id="az-nul"),
        pytest.param(payload(creditor_email=_ABSENT, creditor_name=_ABSENT), "creditor key", id="no-creditor-key"),
        pytest.param(payload(creditor_email=None, creditor_name=""), "creditor key", id="blank-creditor-keys"),
        pytest.param(payload(creditor_email={"$ne": None}, creditor_name=_ABSENT), "creditor key", id="creditor-email-dict"),
        pytest.param([payload()], "not a JSON object", id="list"),
        pytest.param("a string", "not a JSON object", id="string"),
        pytest.param("{not json", "not a JSON object", id="invalid-json-text"),
        pytest.param(json.dumps([1, 2]), "not a JSON object", id="json-list-text"),
        pytest.param('"text"', "not a JSON object", id="json-string-text"),
        pytest.param("null", "not a JSON object", id="json-null-text"),
        pytest.param('{"new_debt_amount": NaN, "client_aktenzeichen": "1", "creditor_email": "a@b.de"}',
                     "not a JSON object", id="json-nan-text"),
        pytest.param("", "not a JSON object", id="empty-text"),
        pytest.param(None, "not a JSON object", id="none"),
        pytest.param(42, "not a JSON object", id="number"),
        pytest.param(b'{"new_debt_amount": 1}', "not a JSON object", id="bytes"),
    ],
)
def test_poison(value, fragment):
    assert fragment in poison(value)


def test_poison_as_json_text_too():
    assert "neither" in poison(json.dumps(payload(new_debt_amount=_ABSENT)))
    assert "not a plain string" in poison(json.dumps(payload(client_aktenzeichen={"$ne": None})))


def test_hostile_aktenzeichen_is_poison_even_with_a_good_name():
    assert "not a plain string" in poison(payload(client_aktenzeichen={"$ne": None}, client_name="Max Mustermann"))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(deadline=None)
@given(st.dictionaries(
    st.sampled_from(["client_name", "client_aktenzeichen", "creditor_email", "creditor_name", "new_debt_amount",
                     "debt_amount", "response_text", "reference_numbers", "response_received_at"]),
    _json_values,
))
def test_parse_payload_never_raises_and_never_invents_an_amount(data):
    for value in (data, json.dumps(data)):
        request, error = parse_payload(value)
        assert (request is None) != (error is None)
        if request is not None:
            assert "new_debt_amount" in data or "debt_amount" in data
            assert 0 <= request.cents <= 10**14
            assert request.client_aktenzeichen is not None or request.client_name is not None
            assert request.creditor_email is not None or request.creditor_name is not None
            assert request.reference_numbers is None or all(isinstance(r, str) for r in request.reference_numbers)
        else:
            assert error.startswith("poison")


@settings(deadline=None)
@given(st.text(max_size=200))
def test_parse_payload_arbitrary_text(text):
    request, error = parse_payload(text)
    assert (request is None) != (error is None)


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=10**14))
def test_amount_in_cents_survives_json(cents):
    value = float(Decimal(cents) / 100)
    assert ok(json.dumps(payload(new_debt_amount=value))).cents == cents
    assert ok(payload(new_debt_amount=value)).cents == cents
