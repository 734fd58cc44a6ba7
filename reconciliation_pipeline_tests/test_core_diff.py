"""Unit and property tests of the vectorised match and diff (reconciliation_pipeline.core.kernel, matching, diff, frames).

RULES.md sections 2 and 3: expected amount = newest synced email of a pair, client by aktenzeichen
then name, creditor levels 1..4, the kinds of finding and when they are repairable.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from bson import Decimal128
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.core import diff as diff_module
from reconciliation_pipeline.core import frames, kernel, keys, matching
from reconciliation_pipeline.core.diff import (
    AMBIGUOUS_CLIENT,
    AMBIGUOUS_CREDITOR,
    CLIENT_NOT_FOUND,
    CREDITOR_NOT_FOUND,
    DATA_MISMATCH,
    EXTRA_IN_MONGO,
    FINDING_COLUMNS,
    INVALID_MONGO_AMOUNT,
    INVALID_PG_AMOUNT,
    MISSING_IN_MONGO,
    DiffOptions,
    diff,
)

WINDOW_END = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
WINDOW_START = WINDOW_END - timedelta(hours=48)
T = WINDOW_END - timedelta(hours=2)  # a time inside the window
AZ = "542900"
BANK = "forderungen@sparkasse-bochum.de"
BANK_NAME = "Sparkasse Bochum"
_ABSENT = object()


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

def reply(az: Any = AZ, amount: Any = 1234.56, creditor_name: Any = BANK_NAME, name: Any = "Mustermann, Max", **extra: Any) -> dict:
    data = {"is_creditor_reply": True, "client_name": name, "client_aktenzeichen": az,
            "creditor_name": creditor_name, "debt_amount": amount, "confidence": 0.9}
    data.update(extra)
    return {k: v for k, v in data.items() if v is not _ABSENT}


def email(email_id: int, data: Any, from_email: str = BANK, received_at: datetime = T, in_window: bool = True) -> dict:
    text = data if isinstance(data, str) else json.dumps(data)
    return dict(email_id=email_id, from_email=from_email, received_at=received_at, created_at=received_at,
                in_window=in_window, extracted_json=text)


def creditor(email_addr: Any = BANK, amount: Any = _ABSENT, name: Any = BANK_NAME, **extra: Any) -> dict:
    element = {"sender_name": name, "sender_email": email_addr, "claim_amount": 1500.0, "contact_status": "contacted"}
    if amount is not _ABSENT:
        element.update(creditor_response_amount=amount, current_debt_amount=amount, amount_source="creditor_response",
                       response_received_at=T - timedelta(days=10), contact_status="responded")
    element.update(extra)
    return element


def client(cid: str, creditors: list, az: Any = AZ, first: Any = "Max", last: Any = "Mustermann") -> dict:
    doc = {"_id": cid, "aktenzeichen": az, "firstName": first, "lastName": last, "final_creditor_list": creditors}
    return {k: v for k, v in doc.items() if v is not _ABSENT}


def run(rows: list[dict], docs: list[dict], tolerance_cents: int = 0, repair_low_confidence: bool = False,
        window_start: datetime = WINDOW_START, window_end: datetime = WINDOW_END) -> tuple[pd.DataFrame, int]:
    emails = frames.prepare_emails(pd.DataFrame(rows, columns=frames.EMAIL_COLUMNS))
    clients, elements = frames.prepare_clients(docs)
    return diff(emails, clients, elements, DiffOptions(window_start, window_end, tolerance_cents, repair_low_confidence))


def only(findings: pd.DataFrame) -> dict:
    assert len(findings) == 1, findings[["kind", "email_id", "reason"]].to_dict("records")
    return findings.iloc[0].to_dict()


def na(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value)


def kinds(findings: pd.DataFrame) -> list[tuple]:
    return sorted((r["kind"], None if na(r["email_id"]) else int(r["email_id"])) for _, r in findings.iterrows())


# ---------------------------------------------------------------------------------------------
# Basic shape
# ---------------------------------------------------------------------------------------------

def test_equal_amounts_give_no_finding():
    findings, checked = run([email(1, reply(amount=1234.56))], [client("c1", [creditor(amount=1234.56)])])
    assert findings.empty
    assert checked == 1
    assert list(findings.columns[: len(FINDING_COLUMNS)]) == FINDING_COLUMNS


@pytest.mark.parametrize(
    ("pg", "mongo"),
    [
        (1234.56, 1234.56),
        ("1.234,56", 1234.56),
        ("1234,56 EUR", 1234.56),
        ("€ 1,234.56", 1234.56),
        (1234.56, "1.234,56"),
        (1234.56, Decimal128("1234.56")),
        (1234, 1234),
        (1234, 1234.0),
        (0.145, 0.15),
    ],
)
def test_equal_in_cents_across_notations(pg, mongo):
    findings, checked = run([email(1, reply(amount=pg))], [client("c1", [creditor(amount=mongo)])])
    assert findings.empty, findings[["kind", "reason"]].to_dict("records")
    assert checked == 1


def test_no_emails_no_findings():
    findings, checked = run([], [client("c1", [creditor(amount=1.0)])])
    assert findings.empty
    assert checked == 0


# ---------------------------------------------------------------------------------------------
# One test per kind
# ---------------------------------------------------------------------------------------------

def test_data_mismatch():
    docs = [client("c1", [creditor("other@x.de", amount=5.0, name="Other Bank"), creditor(amount=1000.0)])]
    findings, checked = run([email(7, reply(amount="1.234,56"))], docs)
    f = only(findings)
    assert f["kind"] == DATA_MISMATCH
    assert f["email_id"] == 7
    assert f["client_id"] == "c1"
    assert f["aktenzeichen"] == AZ
    assert f["pos"] == 1
    assert f["creditor_email"] == BANK
    assert f["match_level"] == 1
    assert f["pg_amount_cents"] == 123456
    assert f["mongo_amount_cents"] == 100000
    assert bool(f["repairable"]) is True
    assert f["observed_sender_email"] == BANK
    assert f["observed_sender_name"] == BANK_NAME
    assert checked == 1


@pytest.mark.parametrize(
    "element",
    [
        pytest.param(creditor(), id="field-absent"),
        pytest.param(creditor(creditor_response_amount=None), id="field-null"),
    ],
)
def test_missing_in_mongo(element):
    findings, checked = run([email(3, reply(amount=99.99))], [client("c1", [element])])
    f = only(findings)
    assert f["kind"] == MISSING_IN_MONGO
    assert f["email_id"] == 3 and f["client_id"] == "c1" and f["pos"] == 0
    assert f["pg_amount_cents"] == 9999
    assert na(f["mongo_amount_cents"])
    assert bool(f["repairable"]) is True
    assert checked == 1


@pytest.mark.parametrize(
    ("data", "reason_fragment"),
    [
        pytest.param(reply(az="999999", name="Erika Musterfrau"), "no client document", id="unknown-az-and-name"),
        pytest.param(reply(az=_ABSENT, name="Erika Musterfrau"), "no client document", id="unknown-name"),
        pytest.param(reply(az=_ABSENT, name=_ABSENT), "no client_aktenzeichen or client_name", id="no-client-key"),
        pytest.param(reply(az=None, name=None), "no client_aktenzeichen or client_name", id="null-client-keys"),
        pytest.param(reply(az=_ABSENT, name="Max Muller"), "no client document", id="umlaut-differs"),
    ],
)
def test_client_not_found(data, reason_fragment):
    findings, checked = run([email(4, data)], [client("c1", [creditor(amount=1234.56)], first="Max", last="Müller")])
    f = only(findings)
    assert f["kind"] == CLIENT_NOT_FOUND
    assert f["email_id"] == 4
    assert na(f["client_id"])
    assert reason_fragment in f["reason"]
    assert bool(f["repairable"]) is False
    assert f["pg_amount_cents"] == 123456
    assert checked == 1


def test_creditor_not_found():
    docs = [client("c1", [creditor("info@volksbank.de", amount=1.0, name="Volksbank Ruhr")])]
    findings, _ = run([email(5, reply(creditor_name="Telekom Deutschland"), from_email="inkasso@telekom.de")], docs)
    f = only(findings)
    assert f["kind"] == CREDITOR_NOT_FOUND
    assert f["email_id"] == 5 and f["client_id"] == "c1"
    assert f["creditor_email"] == "inkasso@telekom.de"
    assert bool(f["repairable"]) is False


def test_creditor_not_found_when_client_has_no_creditor_list():
    docs = [client("c1", [])]
    docs[0].pop("final_creditor_list")
    f = only(run([email(5, reply())], docs)[0])
    assert f["kind"] == CREDITOR_NOT_FOUND


@pytest.mark.parametrize(
    ("data", "docs"),
    [
        pytest.param(
            reply(az=_ABSENT, name="Max Mustermann"),
            [client("c1", [creditor(amount=1.0)], az="1"), client("c2", [creditor(amount=1.0)], az="2")],
            id="same-name-no-aktenzeichen-in-email",
        ),
        pytest.param(
            reply(az=_ABSENT, name="Mustermann, Max"),
            [client("c1", [creditor(amount=1.0)], az=_ABSENT), client("c2", [creditor(amount=1.0)], az=None)],
            id="same-name-no-aktenzeichen-anywhere",
        ),
        pytest.param(
            reply(az=AZ),
            [client("c1", [creditor(amount=1.0)]), client("c2", [creditor(amount=1.0)], first="Erika")],
            id="duplicate-aktenzeichen",
        ),
    ],
)
def test_ambiguous_client(data, docs):
    findings, checked = run([email(6, data)], docs)
    f = only(findings)
    assert f["kind"] == AMBIGUOUS_CLIENT
    assert f["email_id"] == 6
    assert na(f["client_id"])
    assert "2 client documents" in f["reason"]
    assert bool(f["repairable"]) is False
    assert checked == 1


def test_ambiguous_creditor():
    docs = [client("c1", [creditor(amount=1.0, name="Sparkasse A"), creditor(" FORDERUNGEN@sparkasse-bochum.de", amount=2.0, name="Sparkasse B")])]
    findings, _ = run([email(8, reply(amount=3.0))], docs)
    f = only(findings)
    assert f["kind"] == AMBIGUOUS_CREDITOR
    assert f["email_id"] == 8 and f["client_id"] == "c1"
    assert na(f["pos"])
    assert "level 1" in f["reason"]
    assert bool(f["repairable"]) is False


@pytest.mark.parametrize("amount", ["1.234", "1,234", "garbage", -5, "-5", True, None, {"$numberDecimal": "1"}, [1], 10**13])
def test_invalid_pg_amount(amount):
    findings, checked = run([email(9, reply(amount=amount))], [client("c1", [creditor(amount=1234.56)])])
    f = only(findings)
    assert f["kind"] == INVALID_PG_AMOUNT
    assert f["email_id"] == 9 and f["client_id"] == "c1" and f["pos"] == 0
    assert na(f["pg_amount_cents"])
    assert f["mongo_amount_cents"] == 123456
    assert isinstance(f["reason"], str) and f["reason"]
    assert bool(f["repairable"]) is False
    assert checked == 1


def test_invalid_pg_amount_from_nan_in_json_text():
    text = '{"client_aktenzeichen": "542900", "creditor_name": "Sparkasse Bochum", "debt_amount": NaN}'
    findings, _ = run([email(9, text)], [client("c1", [creditor(amount=1234.56)])])
    # NaN is not JSON: the whole extracted_data is unusable, the email cannot be matched
    f = only(findings)
    assert f["kind"] == CLIENT_NOT_FOUND


@pytest.mark.parametrize(
    "mongo",
    ["abc", "1.234", float("nan"), float("inf"), -1.0, True, Decimal128("NaN"), {"$gt": 0}, [1.0]],
)
def test_invalid_mongo_amount(mongo):
    findings, _ = run([email(10, reply(amount=1234.56))], [client("c1", [creditor(amount=mongo)])])
    f = only(findings)
    assert f["kind"] == INVALID_MONGO_AMOUNT
    assert f["email_id"] == 10 and f["pos"] == 0
    assert f["pg_amount_cents"] == 123456
    assert na(f["mongo_amount_cents"])
    assert isinstance(f["reason"], str) and f["reason"]
    assert bool(f["repairable"]) is False


def test_invalid_pg_amount_wins_over_missing_in_mongo():
    f = only(run([email(1, reply(amount="1.234"))], [client("c1", [creditor()])])[0])
    assert f["kind"] == INVALID_PG_AMOUNT


# ---------------------------------------------------------------------------------------------
# extra_in_mongo
# ---------------------------------------------------------------------------------------------

def _extra_docs(**extra_element: Any) -> list[dict]:
    answered = creditor("info@volksbank.de", amount=50.0, name="Volksbank Ruhr")
    answered.update(extra_element)
    return [client("c1", [creditor(amount=1234.56), answered])]


@pytest.mark.parametrize(
    ("extra_element", "flagged"),
    [
        pytest.param({"response_received_at": T}, True, id="inside-window"),
        pytest.param({"response_received_at": WINDOW_START}, True, id="at-window-start"),
        pytest.param({"response_received_at": WINDOW_END - timedelta(microseconds=1)}, True, id="just-before-end"),
        pytest.param({"response_received_at": WINDOW_END}, False, id="at-window-end"),
        pytest.param({"response_received_at": WINDOW_START - timedelta(seconds=1)}, False, id="before-window"),
        pytest.param({"response_received_at": T + timedelta(days=3)}, False, id="after-window"),
        pytest.param({"response_received_at": None}, False, id="no-response-time"),
        pytest.param({"response_received_at": T, "amount_source": "creditor_list"}, False, id="other-amount-source"),
        pytest.param({"response_received_at": T, "amount_source": None}, False, id="no-amount-source"),
    ],
)
def test_extra_in_mongo(extra_element, flagged):
    findings, checked = run([email(1, reply(amount=1234.56))], _extra_docs(**extra_element))
    assert checked == 1
    if flagged:
        f = only(findings)
        assert f["kind"] == EXTRA_IN_MONGO
        assert f["client_id"] == "c1" and f["pos"] == 1
        assert f["creditor_email"] == "info@volksbank.de"
        assert f["aktenzeichen"] == AZ
        assert f["mongo_amount_cents"] == 5000
        assert na(f["email_id"])
        assert bool(f["repairable"]) is False
    else:
        assert findings.empty, kinds(findings)


def test_extra_in_mongo_with_naive_datetime_from_mongo():
    # pymongo without tz_aware returns naive UTC datetimes
    naive = T.replace(tzinfo=None)
    f = only(run([email(1, reply(amount=1234.56))], _extra_docs(response_received_at=naive))[0])
    assert f["kind"] == EXTRA_IN_MONGO


def test_not_extra_when_an_email_outside_the_window_maps_to_it():
    rows = [
        email(1, reply(amount=1234.56)),
        email(2, reply(amount=50.0, creditor_name="Volksbank Ruhr"), from_email="info@volksbank.de",
              received_at=WINDOW_START - timedelta(days=2), in_window=False),
    ]
    findings, checked = run(rows, _extra_docs(response_received_at=T))
    assert findings.empty, kinds(findings)
    assert checked == 1


def test_extra_in_mongo_without_any_email_for_the_client():
    findings, checked = run([], _extra_docs(response_received_at=T))
    assert kinds(findings) == [(EXTRA_IN_MONGO, None)]
    assert checked == 0


# ---------------------------------------------------------------------------------------------
# Client matching
# ---------------------------------------------------------------------------------------------

def test_aktenzeichen_wins_over_name():
    docs = [
        client("c1", [creditor(amount=10.0)], az="111", first="Erika", last="Musterfrau"),
        client("c2", [creditor(amount=20.0)], az="222", first="Max", last="Mustermann"),
        client("c3", [creditor(amount=30.0)], az="333", first="Max", last="Mustermann"),
    ]
    findings, _ = run([email(1, reply(az=" 111 ", name="Mustermann, Max", amount=99.0))], docs)
    f = only(findings)
    assert f["kind"] == DATA_MISMATCH
    assert f["client_id"] == "c1"
    assert f["aktenzeichen"] == "111"
    assert f["mongo_amount_cents"] == 1000


@pytest.mark.parametrize("name", ["Mustermann, Max", "Max Mustermann", " max   MUSTERMANN ", "MUSTERMANN,max"])
def test_name_fallback_without_aktenzeichen(name):
    docs = [
        client("c1", [creditor(amount=10.0)], az="111", first="Erika", last="Musterfrau"),
        client("c2", [creditor(amount=20.0)], az="222", first="Max", last="Mustermann"),
    ]
    f = only(run([email(1, reply(az=_ABSENT, name=name, amount=99.0))], docs)[0])
    assert f["kind"] == DATA_MISMATCH
    assert f["client_id"] == "c2"
    assert f["aktenzeichen"] == "222"


def test_name_match_is_unicode_aware():
    docs = [
        client("c1", [creditor(amount=10.0)], az="1", first="Jürgen", last="Müller"),
        client("c2", [creditor(amount=20.0)], az="2", first="Jurgen", last="Muller"),
    ]
    name = unicodedata.normalize("NFD", "MÜLLER, JÜRGEN")
    f = only(run([email(1, reply(az=_ABSENT, name=name, amount=99.0))], docs)[0])
    assert f["client_id"] == "c1"


@pytest.mark.parametrize("hostile", [{"$ne": None}, {"$gt": ""}, 542900, ["542900"], True, "5429\x0000"])
def test_hostile_aktenzeichen_is_client_not_found(hostile):
    # The name would match exactly one document: a hostile key must still never match.
    docs = [client("c1", [creditor(amount=10.0)], az="542900")]
    findings, _ = run([email(1, reply(az=hostile, name="Mustermann, Max", amount=99.0))], docs)
    f = only(findings)
    assert f["kind"] == CLIENT_NOT_FOUND
    assert na(f["client_id"])
    assert "client_aktenzeichen" in f["reason"]
    assert bool(f["repairable"]) is False


def test_hostile_aktenzeichen_from_raw_json_text():
    text = '{"client_aktenzeichen": {"$ne": null}, "client_name": "Max Mustermann", "creditor_name": "Sparkasse Bochum", "debt_amount": 1.0}'
    f = only(run([email(1, text)], [client("c1", [creditor(amount=10.0)])])[0])
    assert f["kind"] == CLIENT_NOT_FOUND
    assert "not a plain string" in f["reason"]


@pytest.mark.parametrize("text", ["not json", "[1, 2]", "null", '"a string"', "", "{"])
def test_malformed_extracted_data_is_client_not_found(text):
    f = only(run([email(1, text)], [client("c1", [creditor(amount=10.0)])])[0])
    assert f["kind"] == CLIENT_NOT_FOUND
    assert f["email_id"] == 1


# ---------------------------------------------------------------------------------------------
# Creditor matching levels
# ---------------------------------------------------------------------------------------------

LEVEL_CASES = [
    pytest.param(" Forderungen@Sparkasse-Bochum.DE ", "Ganz Anders", "forderungen@sparkasse-bochum.de", "Sparkasse Bochum", 1,
                 id="level1-email-ignoring-case-and-spaces"),
    pytest.param("noreply@mailer.example", "  SPARKASSE   bochum ", "forderungen@sparkasse-bochum.de", "Sparkasse Bochum", 2,
                 id="level2-name-casefold-whitespace"),
    pytest.param("noreply@mailer.example", "STRASSENBAU Nord", "x@y.de", "Straßenbau Nord", 2,
                 id="level2-name-casefold-sharp-s"),
    pytest.param("mahnung@sparkasse-bochum.de", "Sparkasse Bochum Inkasso", "forderungen@sparkasse-bochum.de", "Sparkasse Bochum", 3,
                 id="level3-domain-and-shared-word"),
    pytest.param("mahnung@inkasso-west.de", "Sparkasse Bochum Inkasso", "forderungen@sparkasse-bochum.de", "Sparkasse Bochum", 4,
                 id="level4-shared-word-only"),
]


@pytest.mark.parametrize(("from_email", "creditor_name", "sender_email", "sender_name", "level"), LEVEL_CASES)
def test_creditor_levels(from_email, creditor_name, sender_email, sender_name, level):
    docs = [client("c1", [
        creditor("info@volksbank.de", amount=1.0, name="Volksbank Ruhr"),
        creditor(sender_email, amount=10.0, name=sender_name),
    ])]
    rows = [email(1, reply(creditor_name=creditor_name, amount=99.0), from_email=from_email)]
    f = only(run(rows, docs)[0])
    assert f["kind"] == DATA_MISMATCH
    assert f["pos"] == 1
    assert f["match_level"] == level
    assert bool(f["repairable"]) is (level < 4)
    if level == 4:
        assert "low-confidence" in f["reason"]
    f = only(run(rows, docs, repair_low_confidence=True)[0])
    assert bool(f["repairable"]) is True


def test_level4_missing_in_mongo_not_repairable_by_default():
    docs = [client("c1", [creditor("a@sparkasse.de", name="Sparkasse Bochum")])]
    rows = [email(1, reply(creditor_name="Inkasso Bochum", amount=99.0), from_email="x@other.de")]
    f = only(run(rows, docs)[0])
    assert f["kind"] == MISSING_IN_MONGO and f["match_level"] == 4
    assert bool(f["repairable"]) is False
    assert bool(only(run(rows, docs, repair_low_confidence=True)[0])["repairable"]) is True


def test_short_words_do_not_match():
    docs = [client("c1", [creditor("a@bank.de", amount=1.0, name="ABC Bank")])]
    rows = [email(1, reply(creditor_name="ABC Inkasso", amount=99.0), from_email="x@bank.de")]
    f = only(run(rows, docs)[0])
    assert f["kind"] == CREDITOR_NOT_FOUND


def test_first_level_with_candidates_wins():
    # element 0 matches at level 2 (name), element 1 at level 1 (e-mail): level 1 wins, not ambiguous
    docs = [client("c1", [
        creditor("other@sparkasse-bochum.de", amount=1.0, name="Sparkasse Bochum"),
        creditor(BANK, amount=2.0, name="Sparkasse Zentrale"),
        creditor("x@sparkasse-bochum.de", amount=3.0, name="Sparkasse Mitte"),
    ])]
    f = only(run([email(1, reply(amount=9.0))], docs)[0])
    assert f["kind"] == DATA_MISMATCH
    assert f["pos"] == 1 and f["match_level"] == 1


def test_level2_wins_over_level3():
    docs = [client("c1", [
        creditor("a@sparkasse-bochum.de", amount=1.0, name="Sparkasse Bochum Nord"),
        creditor("b@other.de", amount=2.0, name="Sparkasse Bochum"),
    ])]
    rows = [email(1, reply(creditor_name="sparkasse bochum", amount=9.0), from_email="c@sparkasse-bochum.de")]
    f = only(run(rows, docs)[0])
    assert f["pos"] == 1 and f["match_level"] == 2


def test_level3_wins_over_level4():
    docs = [client("c1", [
        creditor("a@other.de", amount=1.0, name="Sparkasse Dortmund"),
        creditor("b@sparkasse-bochum.de", amount=2.0, name="Sparkasse Bochum"),
    ])]
    rows = [email(1, reply(creditor_name="Sparkasse Essen", amount=9.0), from_email="c@sparkasse-bochum.de")]
    f = only(run(rows, docs)[0])
    assert f["pos"] == 1 and f["match_level"] == 3


@pytest.mark.parametrize(
    ("elements", "from_email", "creditor_name", "level"),
    [
        pytest.param([creditor("a@x.de", 1.0, "Sparkasse Bochum"), creditor("b@y.de", 2.0, "SPARKASSE BOCHUM")],
                     "z@z.de", "Sparkasse Bochum", 2, id="two-at-level2"),
        pytest.param([creditor("a@bank.de", 1.0, "Sparkasse Nord"), creditor("b@bank.de", 2.0, "Sparkasse Süd")],
                     "z@bank.de", "Sparkasse West", 3, id="two-at-level3"),
        pytest.param([creditor("a@x.de", 1.0, "Sparkasse Nord"), creditor("b@y.de", 2.0, "Sparkasse Süd")],
                     "z@z.de", "Sparkasse West", 4, id="two-at-level4"),
    ],
)
def test_ambiguous_creditor_at_each_level(elements, from_email, creditor_name, level):
    rows = [email(1, reply(creditor_name=creditor_name, amount=9.0), from_email=from_email)]
    f = only(run(rows, [client("c1", elements)])[0])
    assert f["kind"] == AMBIGUOUS_CREDITOR
    assert f"level {level}" in f["reason"]


def test_creditor_is_matched_within_the_client_only():
    docs = [
        client("c1", [creditor("info@volksbank.de", 1.0, "Volksbank Ruhr")], az="1"),
        client("c2", [creditor(BANK, 2.0, BANK_NAME)], az="2"),
    ]
    f = only(run([email(1, reply(az="1", amount=9.0))], docs)[0])
    assert f["kind"] == CREDITOR_NOT_FOUND and f["client_id"] == "c1"


# ---------------------------------------------------------------------------------------------
# Tolerance
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pg", "mongo", "tolerance", "finding"),
    [
        (100.00, 100.00, 0, False),
        (100.01, 100.00, 0, True),
        (100.00, 100.01, 0, True),
        (100.03, 100.00, 5, False),
        (100.00, 100.05, 5, False),
        (100.06, 100.00, 5, True),
        (100.00, 100.06, 5, True),
        (100.03, 100.00, 2, True),
    ],
)
def test_tolerance_cents(pg, mongo, tolerance, finding):
    findings, _ = run([email(1, reply(amount=pg))], [client("c1", [creditor(amount=mongo)])], tolerance_cents=tolerance)
    assert kinds(findings) == ([(DATA_MISMATCH, 1)] if finding else [])


# ---------------------------------------------------------------------------------------------
# Latest email wins
# ---------------------------------------------------------------------------------------------

def test_newest_email_outside_window_decides_expected_amount():
    rows = [
        email(1, reply(amount=100.0), received_at=T - timedelta(hours=1)),
        email(2, reply(amount=200.0), received_at=WINDOW_END + timedelta(days=3), in_window=False),
    ]
    findings, checked = run(rows, [client("c1", [creditor(amount=200.0)])])
    assert findings.empty, kinds(findings)
    assert checked == 1

    findings, checked = run(rows, [client("c1", [creditor(amount=100.0)])])
    f = only(findings)
    assert f["kind"] == DATA_MISMATCH
    assert f["email_id"] == 2
    assert f["pg_amount_cents"] == 20000 and f["mongo_amount_cents"] == 10000
    assert pd.Timestamp(f["received_at"]) == pd.Timestamp(WINDOW_END + timedelta(days=3))
    assert checked == 1


def test_older_in_window_email_with_different_amount_is_no_finding():
    rows = [
        email(1, reply(amount=100.0), received_at=T - timedelta(hours=3)),
        email(2, reply(amount=300.0), received_at=T - timedelta(hours=1)),
    ]
    findings, checked = run(rows, [client("c1", [creditor(amount=300.0)])])
    assert findings.empty, kinds(findings)
    assert checked == 1


def test_email_order_in_input_does_not_matter():
    rows = [
        email(2, reply(amount=300.0), received_at=T - timedelta(hours=1)),
        email(1, reply(amount=100.0), received_at=T - timedelta(hours=3)),
    ]
    findings, _ = run(rows, [client("c1", [creditor(amount=100.0)])])
    f = only(findings)
    assert f["email_id"] == 2 and f["pg_amount_cents"] == 30000


def test_same_received_at_highest_id_wins():
    rows = [email(5, reply(amount=500.0)), email(4, reply(amount=400.0)), email(3, reply(amount=300.0))]
    assert run(rows, [client("c1", [creditor(amount=500.0)])])[0].empty
    f = only(run(rows, [client("c1", [creditor(amount=400.0)])])[0])
    assert f["email_id"] == 5 and f["pg_amount_cents"] == 50000


def test_pair_with_only_emails_outside_the_window_is_not_checked():
    rows = [email(1, reply(amount=100.0), received_at=WINDOW_START - timedelta(days=1), in_window=False)]
    findings, checked = run(rows, [client("c1", [creditor(amount=1.0)])])
    assert findings.empty
    assert checked == 0


def test_unmatched_email_outside_window_is_not_reported():
    rows = [email(1, reply(az="nope", name="Nobody Here"), in_window=False)]
    findings, checked = run(rows, [client("c1", [creditor(amount=1.0)])])
    assert findings.empty and checked == 0


def test_newest_email_invalid_amount_reported_not_older_valid_one():
    rows = [
        email(1, reply(amount=100.0), received_at=T - timedelta(hours=3)),
        email(2, reply(amount="1.234"), received_at=T - timedelta(hours=1)),
    ]
    f = only(run(rows, [client("c1", [creditor(amount=100.0)])])[0])
    assert f["kind"] == INVALID_PG_AMOUNT and f["email_id"] == 2


# ---------------------------------------------------------------------------------------------
# Repairable and MongoDB's own answer time
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("mongo_answer_at", "repairable"),
    [
        pytest.param(T + timedelta(minutes=5), False, id="mongo-newer"),
        pytest.param(T, True, id="same-time"),
        pytest.param(T - timedelta(days=1), True, id="mongo-older"),
        pytest.param(None, True, id="no-answer-time"),
    ],
)
def test_repairable_only_when_email_not_older_than_mongo_answer(mongo_answer_at, repairable):
    docs = [client("c1", [creditor(amount=1.0, response_received_at=mongo_answer_at)])]
    f = only(run([email(1, reply(amount=2.0), received_at=T)], docs)[0])
    assert f["kind"] == DATA_MISMATCH
    assert bool(f["repairable"]) is repairable
    if not repairable:
        assert "newer" in f["reason"]


def test_missing_in_mongo_with_newer_answer_time_not_repairable():
    docs = [client("c1", [creditor(response_received_at=T + timedelta(hours=1))])]
    f = only(run([email(1, reply(amount=2.0), received_at=T)], docs)[0])
    assert f["kind"] == MISSING_IN_MONGO
    assert bool(f["repairable"]) is False


# ---------------------------------------------------------------------------------------------
# Several emails, clients and kinds at once
# ---------------------------------------------------------------------------------------------

def test_mixed_batch():
    docs = [
        client("c1", [creditor(amount=10.0), creditor("info@volksbank.de", name="Volksbank Ruhr")], az="1"),
        client("c2", [creditor(amount=20.0)], az="2", first="Erika", last="Musterfrau"),
    ]
    rows = [
        email(1, reply(az="1", amount=10.0)),                                      # equal
        email(2, reply(az="1", amount=5.0, creditor_name="Volksbank Ruhr"), from_email="info@volksbank.de"),  # missing
        email(3, reply(az=_ABSENT, name="Musterfrau, Erika", amount=21.0)),        # mismatch via name
        email(4, reply(az="3", name="Nobody")),                                    # client not found
        email(5, reply(az="2", creditor_name="Unknown"), from_email="x@unknown.de"),  # creditor not found
    ]
    findings, checked = run(rows, docs)
    assert kinds(findings) == sorted([
        (MISSING_IN_MONGO, 2), (DATA_MISMATCH, 3), (CLIENT_NOT_FOUND, 4), (CREDITOR_NOT_FOUND, 5),
    ])
    assert checked == 5


# ---------------------------------------------------------------------------------------------
# Property: the diff finds exactly the perturbed pairs
# ---------------------------------------------------------------------------------------------

_OFFSETS = [timedelta(hours=h) for h in (-60, -50, -30, -10, -2, -1, 0, 3, 30)]  # relative to WINDOW_END


def _format_pg(cents: int, style: int) -> Any:
    value = Decimal(cents).scaleb(-2)
    if style == 0:
        return float(value)
    if style == 1:
        integer, fraction = f"{value:.2f}".split(".")
        return f"{int(integer):,}".replace(",", ".") + "," + fraction + " EUR"
    return f"€ {value:,.2f}"


def _format_mongo(cents: int, style: int) -> Any:
    value = Decimal(cents).scaleb(-2)
    if style == 0:
        return float(value)
    if style == 1:
        return Decimal128(value)
    return f"{value:.2f}"


@st.composite
def scenarios(draw):
    n_clients = draw(st.integers(1, 4))
    docs, rows, pairs = [], [], {}
    next_id = 1
    for ci in range(n_clients):
        n_cred = draw(st.integers(1, 4))
        cred_ids = draw(st.lists(st.integers(0, 6), min_size=n_cred, max_size=n_cred, unique=True))
        elements = []
        for pos, k in enumerate(cred_ids):
            sender = f"forderung{k}@creditor{k}.de"
            name = f"Glaeubiger{k} Kasse"
            email_rows = []
            for _ in range(draw(st.integers(0, 3))):
                offset = draw(st.sampled_from(_OFFSETS))
                received = WINDOW_END + offset
                in_window = WINDOW_START <= received < WINDOW_END
                cents = draw(st.integers(0, 10**9))
                by_name = draw(st.booleans())
                data = reply(
                    az=_ABSENT if by_name else f"AZ{ci}",
                    name=draw(st.sampled_from([f"Nachname{ci}, Vorname{ci}", f"vorname{ci} NACHNAME{ci}"])),
                    creditor_name=name,
                    amount=_format_pg(cents, draw(st.integers(0, 2))),
                )
                email_rows.append((received, next_id, cents, in_window))
                rows.append(email(next_id, data, from_email=sender.upper() if draw(st.booleans()) else sender,
                                  received_at=received, in_window=in_window))
                next_id += 1
            element = creditor(sender, name=name)
            if email_rows:
                received, eid, cents, _ = max(email_rows)
                perturb = draw(st.booleans())
                mongo = cents + draw(st.integers(1, 10**6)) if perturb else cents
                element.update(creditor_response_amount=_format_mongo(mongo, draw(st.integers(0, 2))),
                               amount_source="creditor_response",
                               response_received_at=received - timedelta(hours=draw(st.integers(0, 100))))
                pairs[(f"c{ci}", pos)] = dict(
                    newest=eid, cents=cents, mongo=mongo, perturbed=perturb,
                    in_window=any(w for *_, w in email_rows),
                )
            else:
                # no email: an old answer (before the window) or no answer at all
                if draw(st.booleans()):
                    element.update(creditor_response_amount=float(draw(st.integers(0, 10**6))) / 100,
                                   amount_source="creditor_response",
                                   response_received_at=WINDOW_START - timedelta(days=draw(st.integers(1, 30))))
            elements.append(element)
        docs.append(client(f"c{ci}", elements, az=f"AZ{ci}", first=f"Vorname{ci}", last=f"Nachname{ci}"))
    order = draw(st.permutations(range(len(rows))))
    return [rows[i] for i in order], docs, pairs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_diff_finds_exactly_the_perturbed_pairs(scenario):
    rows, docs, pairs = scenario
    findings, checked = run(rows, docs)
    checked_pairs = {k: v for k, v in pairs.items() if v["in_window"]}
    assert checked == len(checked_pairs)
    expected = {k: v for k, v in checked_pairs.items() if v["perturbed"]}
    assert set(findings["kind"]) <= {DATA_MISMATCH}, findings[["kind", "email_id", "reason"]].to_dict("records")
    got = {(r["client_id"], int(r["pos"])): r for _, r in findings.iterrows()}
    assert len(got) == len(findings)
    assert set(got) == set(expected)
    for key, r in got.items():
        assert int(r["email_id"]) == expected[key]["newest"]
        assert int(r["pg_amount_cents"]) == expected[key]["cents"]
        assert int(r["mongo_amount_cents"]) == expected[key]["mongo"]
        assert r["match_level"] == 1
        assert bool(r["repairable"]) is True


# ---------------------------------------------------------------------------------------------
# More edges
# ---------------------------------------------------------------------------------------------

def test_ambiguous_creditor_candidates_are_not_extra_in_mongo():
    docs = [client("c1", [
        creditor(BANK, amount=1.0, name="Sparkasse A", response_received_at=T),
        creditor(BANK, amount=2.0, name="Sparkasse B", response_received_at=T),
    ])]
    findings, _ = run([email(1, reply(amount=3.0))], docs)
    assert kinds(findings) == [(AMBIGUOUS_CREDITOR, 1)]


def test_mixed_naive_and_aware_answer_times():
    docs = [client("c1", [
        creditor(BANK, amount=1.0, response_received_at=T.replace(tzinfo=None)),
        creditor("a@volksbank.de", amount=2.0, name="Volksbank Ruhr", response_received_at=T),
        creditor("b@commerzbank.de", amount=3.0, name="Commerzbank", response_received_at=T - timedelta(days=30)),
    ])]
    findings, _ = run([email(1, reply(amount=1.0))], docs)
    assert kinds(findings) == [(EXTRA_IN_MONGO, None)]
    assert int(findings.iloc[0]["pos"]) == 1


def test_duplicate_documents_count_once():
    doc = client("c1", [creditor(amount=1.0)])
    findings, checked = run([email(1, reply(amount=2.0))], [doc, dict(doc)])
    assert kinds(findings) == [(DATA_MISMATCH, 1)]
    assert checked == 1


def test_two_in_window_emails_one_pair_one_record():
    rows = [email(1, reply(amount=1.0), received_at=T - timedelta(hours=1)), email(2, reply(amount=2.0))]
    findings, checked = run(rows, [client("c1", [creditor(amount=1.0)])])
    assert kinds(findings) == [(DATA_MISMATCH, 2)]
    assert checked == 1


def test_other_fields_of_the_element_do_not_matter():
    element = creditor(amount=1234.56, claim_amount=99999.0, current_debt_amount=1.0, contact_status="weird")
    findings, _ = run([email(1, reply(amount=1234.56))], [client("c1", [element])])
    assert findings.empty


def test_no_client_documents_at_all():
    findings, checked = run([email(1, reply())], [])
    assert kinds(findings) == [(CLIENT_NOT_FOUND, 1)]
    assert checked == 1


def test_junk_elements_keep_positions():
    doc = client("c1", ["junk", None, creditor(amount=1.0)])
    f = only(run([email(1, reply(amount=2.0))], [doc])[0])
    assert f["kind"] == DATA_MISMATCH and f["pos"] == 2


def test_window_in_berlin_time():
    berlin = ZoneInfo("Europe/Berlin")
    start, end = WINDOW_START.astimezone(berlin), WINDOW_END.astimezone(berlin)
    for at, flagged in ((T, True), (WINDOW_END - timedelta(seconds=1), True), (WINDOW_END, False)):
        findings, _ = run([email(1, reply(amount=1234.56))], _extra_docs(response_received_at=at.astimezone(berlin)),
                          window_start=start, window_end=end)
        assert kinds(findings) == ([(EXTRA_IN_MONGO, None)] if flagged else [])


# ---------------------------------------------------------------------------------------------
# The vectorised matching against its former pandas-merge implementation (the oracle below) and
# its building blocks against plain pandas. The oracle is the code the fast path replaced, kept
# verbatim (docstrings dropped): same findings, same order, same dtypes.
# ---------------------------------------------------------------------------------------------

def ref_match_clients(emails: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    base = emails[["email_id", "az_key", "az_reason"]]
    by_az = base.dropna(subset=["az_key"]).merge(clients[["client_id", "az_key"]], on="az_key")
    no_az = (base["az_key"].isna() & base["az_reason"].isna()).to_numpy(bool)
    named = emails.loc[no_az, ["email_id", "client_name"]]
    named = named.assign(name_key=keys.client_name_key(named["client_name"].astype(object))).dropna(subset=["name_key"])
    by_name = named.merge(clients[["client_id", "name_key"]].dropna(subset=["name_key"]), on="name_key")
    candidates = pd.concat([by_az[["email_id", "client_id"]], by_name[["email_id", "client_id"]]])
    counts = candidates.groupby("email_id")["client_id"].agg(["count", "first"])

    out = base[["email_id"]].copy()
    out["n"] = out["email_id"].map(counts["count"]).fillna(0).astype(int)
    first = out["email_id"].map(counts["first"]).where(out["n"] == 1)
    coded = pd.api.types.is_integer_dtype(clients["client_id"])
    out["client_id"] = first.astype("Int64") if coded else first.astype(object)
    out["client_status"] = np.select([out["n"] == 1, out["n"] > 1], ["matched", "ambiguous"], "not_found")
    reason = base["az_reason"].astype(object)
    has_name = pd.Series(False, index=base.index)
    has_name.loc[named.index] = True
    has_key = base["az_key"].notna() | has_name
    reason = reason.mask(reason.isna() & ~has_key, "no client_aktenzeichen or client_name")
    reason = reason.mask(reason.isna() & (out["n"] == 0), "no client document with this aktenzeichen or name")
    reason = reason.mask(out["n"] > 1, out["n"].astype(str) + " client documents match")
    out["client_status"] = out["client_status"].where(base["az_reason"].isna(), "not_found")
    out["client_id"] = out["client_id"].where(base["az_reason"].isna())
    out["client_reason"] = reason
    return out.drop(columns="n")


def ref_shares_word(left: pd.Series, right: pd.Series) -> np.ndarray:
    return np.fromiter((bool(a & b) for a, b in zip(left, right)), dtype=bool, count=len(left))


def ref_creditor_candidates(emails: pd.DataFrame, elements: pd.DataFrame) -> pd.DataFrame:
    n = len(emails)
    client_code, _ = pd.factorize(pd.concat([emails["client_id"], elements["client_id"]], ignore_index=True).astype(object))
    key_code, key_values = pd.factorize(pd.concat([emails["from_email_key"], elements["sender_email_key"]], ignore_index=True).astype(object))
    pair = client_code.astype(np.int64) * (len(key_values) + 1) + key_code  # unique per (client, e-mail key)
    has_key = key_code >= 0
    left = pd.DataFrame({"email_id": emails["email_id"].to_numpy(), "client_id": emails["client_id"].to_numpy(), "k": pair[:n]})
    right = pd.DataFrame({"pos": elements["pos"].to_numpy(np.int64), "k": pair[n:]})
    l1 = left[has_key[:n]].merge(right[has_key[n:]], on="k")[["email_id", "client_id", "pos"]].assign(level=1)
    rest = emails[~emails["email_id"].isin(l1["email_id"])]
    rest = rest.assign(creditor_name_key=keys.text_key(rest["creditor_name"].astype(object)))
    needed = elements[elements["client_id"].isin(rest["client_id"])]
    needed = needed.assign(sender_name_key=keys.text_key(needed["observed_sender_name"].astype(object)))
    l2 = rest[["email_id", "client_id", "creditor_name_key"]].dropna(subset=["creditor_name_key"]).merge(
        needed[["client_id", "pos", "sender_name_key"]].dropna(subset=["sender_name_key"]),
        left_on=["client_id", "creditor_name_key"], right_on=["client_id", "sender_name_key"],
    )[["email_id", "client_id", "pos"]].assign(level=2)
    rest = rest[~rest["email_id"].isin(l2["email_id"])]
    cand = rest[["email_id", "client_id", "from_email_key", "creditor_name"]].merge(
        needed[["client_id", "pos", "sender_email_key", "observed_sender_name"]], on="client_id"
    )
    words = keys.name_words(cand["creditor_name"].astype(object))
    sender_words = keys.name_words(cand["observed_sender_name"].astype(object))
    shared = ref_shares_word(words, sender_words)
    same_domain = (keys.email_domain(cand["from_email_key"]) == keys.email_domain(cand["sender_email_key"])).fillna(False).to_numpy(bool)
    cand = cand.assign(level=np.select([shared & same_domain, shared], [3, 4], 0))[["email_id", "client_id", "pos", "level"]]
    cand = cand[cand["level"] > 0]
    cand = cand[cand["level"] == cand.groupby("email_id")["level"].transform("min")]
    out = pd.concat([l1, l2, cand], ignore_index=True)
    return out.astype({"client_id": emails["client_id"].dtype, "pos": "int64", "level": "int64"})


def ref_match_creditors(emails: pd.DataFrame, elements: pd.DataFrame) -> pd.DataFrame:
    winners = ref_creditor_candidates(emails, elements)
    stats = winners.groupby("email_id").agg(n=("pos", "size"), pos=("pos", "first"), level=("level", "first"))

    out = emails[["email_id"]].copy()
    out["n"] = out["email_id"].map(stats["n"]).fillna(0).astype(int)
    out["pos"] = out["email_id"].map(stats["pos"]).where(out["n"] == 1).astype("Int64")
    out["match_level"] = out["email_id"].map(stats["level"]).astype("Int64")
    out["creditor_status"] = np.select([out["n"] == 1, out["n"] > 1], ["matched", "ambiguous"], "not_found")
    out.attrs["candidates"] = winners[["email_id", "client_id", "pos"]].reset_index(drop=True)
    reason = np.full(len(out), "no creditor of this client matches the sender or creditor name", dtype=object)
    several = (out["n"] > 1).to_numpy(bool)
    if several.any():
        reason[several] = (out.loc[several, "n"].astype(str) + " creditors match at level " + out.loc[several, "match_level"].astype(str)).to_numpy(object)
    out["creditor_reason"] = reason
    return out.drop(columns="n")


def ref_match(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    ids, clients, elements = ref_coded(clients, elements)
    matched, candidates = ref_match_inner(emails.reset_index(drop=True), clients, elements)
    matched["client_id"] = ref_decoded(ids, matched["client_id"])
    candidates["client_id"] = ref_decoded(ids, candidates["client_id"])
    return matched, candidates


def ref_coded(clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.Index, pd.DataFrame, pd.DataFrame]:
    ids = pd.Index(pd.unique(np.concatenate([clients["client_id"].to_numpy(object), elements["client_id"].to_numpy(object)])))
    return (
        ids,
        clients.assign(client_id=ids.get_indexer(clients["client_id"].to_numpy(object)).astype(np.int64)),
        elements.assign(client_id=ids.get_indexer(elements["client_id"].to_numpy(object)).astype(np.int64)),
    )


def ref_decoded(ids: pd.Index, codes: pd.Series) -> pd.Series:
    values = pd.array(codes, dtype="Int64")
    out = np.full(len(values), None, dtype=object)
    present = ~pd.isna(values)
    out[present] = ids.to_numpy(object)[values[present].to_numpy(np.int64)]
    return pd.Series(out, index=codes.index, dtype=object)


def ref_match_inner(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    client_match = ref_match_clients(emails, clients)
    matched = emails.join(client_match.drop(columns="email_id"))  # same index, one row per email
    found = matched.loc[matched["client_status"] == "matched", ["email_id", "client_id", "from_email_key", "creditor_name"]]
    creditors = ref_match_creditors(found.astype({"client_id": "int64"}), elements)
    candidates = creditors.attrs.pop("candidates")
    return matched.join(creditors.drop(columns="email_id")), candidates


def ref_email_findings(rows: pd.DataFrame, kind: str, reason: pd.Series) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "kind": kind,
            "email_id": rows["email_id"],
            "client_id": rows.get("client_id"),
            "aktenzeichen": rows["az_key"].astype(object),
            "creditor_email": rows["from_email_key"],
            "pg_amount_cents": rows["amount_cents"],
            "received_at": rows["received_at"],
            "reason": reason,
        }
    )


REF_PAIR_COLUMNS = ["email_id", "client_id", "pos", "match_level", "received_at", "in_window", "amount_cents", "amount_reason",
                 "from_email_key", "az_key"]


def ref_diff(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame, options: DiffOptions) -> tuple[pd.DataFrame, int]:
    ids, coded_clients, elements = ref_coded(clients, elements)
    m, candidates = ref_match_inner(emails.reset_index(drop=True), coded_clients, elements)
    window = m[m["in_window"]]
    parts: list[pd.DataFrame] = []

    not_client = window[window["client_status"] != "matched"]
    for status, kind in (("not_found", CLIENT_NOT_FOUND), ("ambiguous", AMBIGUOUS_CLIENT)):
        rows = not_client[not_client["client_status"] == status]
        parts.append(ref_email_findings(rows, kind, rows["client_reason"]))
    not_creditor = window[(window["client_status"] == "matched") & (window["creditor_status"] != "matched")]
    for status, kind in (("not_found", CREDITOR_NOT_FOUND), ("ambiguous", AMBIGUOUS_CREDITOR)):
        rows = not_creditor[not_creditor["creditor_status"] == status]
        parts.append(ref_email_findings(rows, kind, rows["creditor_reason"]))

    # Expected amount per (client, creditor) pair: the newest matched email overall.
    paired = m.loc[m["creditor_status"] == "matched", REF_PAIR_COLUMNS].sort_values(["received_at", "email_id"])
    window_pairs = paired.loc[paired["in_window"], ["client_id", "pos"]].drop_duplicates()
    newest = paired.drop_duplicates(["client_id", "pos"], keep="last").merge(window_pairs, on=["client_id", "pos"])
    newest = newest.astype({"client_id": "int64", "pos": "int64"})
    records_checked = len(newest) + len(not_client) + len(not_creditor)

    # The datacompy-style core: one outer merge with an indicator against the creditor elements.
    el = elements
    merged = newest.merge(el, on=["client_id", "pos"], how="outer", indicator=True)
    both = merged[merged["_merge"] == "both"]
    pg_ok = both["amount_cents"].notna().to_numpy(bool)
    mongo_missing = both["mongo_missing"].to_numpy(bool)
    mongo_ok = both["mongo_cents"].notna().to_numpy(bool)
    differs = ((both["amount_cents"] - both["mongo_cents"]).abs() > options.tolerance_cents).fillna(False).to_numpy(bool)
    kind = np.select(
        [~pg_ok, mongo_missing, ~mongo_ok, differs],
        [INVALID_PG_AMOUNT, MISSING_IN_MONGO, INVALID_MONGO_AMOUNT, DATA_MISMATCH],
        "",
    )
    reason = np.select(
        [~pg_ok, ~mongo_missing & ~mongo_ok],
        [both["amount_reason"].astype(object).to_numpy(), both["mongo_reason"].astype(object).to_numpy()],
        None,
    )
    compared = both.assign(kind=kind, reason=reason)
    compared = compared[compared["kind"] != ""]
    compared = compared.assign(
        creditor_email=compared["sender_email_key"].fillna(compared["from_email_key"]),
        observed_response_at=compared["response_received_at"],
    )

    # A creditor answer in MongoDB inside the window that no synced email maps to.
    mapped = candidates[["client_id", "pos"]].drop_duplicates().astype({"client_id": "int64", "pos": "int64"}).assign(_mapped=True)
    el_only = el.merge(mapped, on=["client_id", "pos"], how="left")
    in_window = (el_only["response_received_at"] >= options.window_start) & (
        el_only["response_received_at"] < options.window_end
    )
    extra = el_only[
        el_only["_mapped"].isna() & (el_only["amount_source"] == "creditor_response") & in_window.fillna(False)
    ]
    extra = extra.assign(
        kind=EXTRA_IN_MONGO,
        creditor_email=extra["sender_email_key"],
        observed_response_at=extra["response_received_at"],
        reason="no synced email maps to this creditor answer",
    )

    parts += [compared, extra]
    findings = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame()
    findings = findings.reindex(columns=FINDING_COLUMNS + ["amount_cents", "mongo_cents"])
    findings["pg_amount_cents"] = findings["pg_amount_cents"].astype("Int64").fillna(findings["amount_cents"].astype("Int64"))
    findings["mongo_amount_cents"] = findings["mongo_cents"].astype("Int64")
    findings["email_id"] = findings["email_id"].astype("Int64")
    findings["pos"] = findings["pos"].astype("Int64")
    findings = findings.drop(columns=["amount_cents", "mongo_cents"])
    findings["client_id"] = ref_decoded(ids, findings["client_id"])
    findings = diff_module._attach_aktenzeichen(findings, clients)
    findings["repairable"] = diff_module._repairable(findings, options)
    return findings.reset_index(drop=True), int(records_checked)


_TEXTS = ["a", "b", "A", "", " a", "äß", None, float("nan")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_TEXTS), max_size=8), min_size=1, max_size=4))
def test_factorized_is_factorize_of_the_concatenation(columns):
    arrays = [np.array(c, dtype=object) for c in columns]
    codes, uniques = kernel.factorized(*arrays)
    want_codes, want_uniques = pd.factorize(np.concatenate(arrays))
    assert np.array_equal(np.concatenate(codes), want_codes)
    assert list(uniques) == list(want_uniques)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 4), max_size=12), st.lists(st.integers(-1, 4), max_size=12))
def test_equi_join_is_an_inner_merge(left, right):
    left, right = np.array(left, dtype=np.int64), np.array(right, dtype=np.int64)
    rows_left, rows_right = kernel.equi_join(left, right)
    a = pd.DataFrame({"k": left, "l": np.arange(len(left))})
    b = pd.DataFrame({"k": right, "r": np.arange(len(right))})
    merged = a[a["k"] >= 0].merge(b[b["k"] >= 0], on="k")
    assert rows_left.tolist() == merged["l"].tolist()
    assert rows_right.tolist() == merged["r"].tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([None, 0, 1, 2]), st.integers(1, 3)), min_size=1, max_size=12))
def test_newest_is_the_last_after_sorting(rows):
    frame = pd.DataFrame({
        "group": [g for g, _, _ in rows],
        "received_at": pd.to_datetime([None if m is None else T + timedelta(minutes=m) for _, m, _ in rows], utc=True),
        "email_id": [e for _, _, e in rows],
    })
    group, n_groups = pd.factorize(frame["group"])
    got = kernel.newest(group, len(n_groups), frame["received_at"], frame["email_id"].to_numpy())
    want = frame.sort_values(["received_at", "email_id"]).drop_duplicates("group", keep="last")
    assert sorted(got.tolist()) == sorted(want.index.tolist())
    assert all(group[i] == g for g, i in enumerate(got))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 3), st.integers(-1, 3)), max_size=12), st.integers(1, 5))
def test_pair_codes_are_equal_exactly_for_equal_pairs(pairs, extra_width):
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    codes = kernel.pair(a, b, 4 + extra_width)
    for i, p in enumerate(pairs):
        assert (codes[i] == -1) == (min(p) < 0)
        for j, q in enumerate(pairs):
            if min(p) >= 0 and min(q) >= 0:
                assert (codes[i] == codes[j]) == (p == q)


_SENDERS = ["forderungen@sparkasse-bochum.de", " Forderungen@Sparkasse-Bochum.de", "noreply@sparkasse-bochum.de",
            "info@volksbank-ruhr.de", "post@inkasso.de", None, 17]
_CREDITOR_NAMES = ["Sparkasse Bochum", "sparkasse  BOCHUM", "Sparkasse Essen", "Volksbank Ruhr", "Ruhr Inkasso Gruppe",
                   "Bank", None, 3, ["Sparkasse Bochum"]]
_AZS = ["AZ1", "AZ2", "AZ3", " AZ1 ", None, 17, "AZ\x00"]
_PERSONS = [("Max", "Mustermann"), ("Erika", "Muster"), ("max", "MUSTERMANN"), (None, "Muster")]
_EMAIL_NAMES = ["Mustermann, Max", "Max Mustermann", "Muster, Erika", "Unbekannt", None]
_PG_AMOUNTS = [12.5, 1234.56, "12,50", "unbekannt", None, True, 0]
_MONGO_AMOUNTS = [_ABSENT, 12.5, 1234.56, "1.234", None, -3.0, 0.0]
_TIMES = [T - timedelta(days=20), T - timedelta(hours=1), T, T + timedelta(hours=1), WINDOW_END + timedelta(hours=1), None]


@st.composite
def matching_data(draw):
    docs = []
    for i in range(draw(st.integers(0, 4))):
        first, last = draw(st.sampled_from(_PERSONS))
        elements = []
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.integers(0, 9)) == 0:
                elements.append(draw(st.sampled_from(["junk", None])))
                continue
            element = creditor(draw(st.sampled_from(_SENDERS)), name=draw(st.sampled_from(_CREDITOR_NAMES)))
            amount = draw(st.sampled_from(_MONGO_AMOUNTS))
            if amount is not _ABSENT:
                element.update(creditor_response_amount=amount, amount_source=draw(st.sampled_from(["creditor_response", "manual"])),
                               response_received_at=draw(st.sampled_from(_TIMES)))
            elements.append(element)
        docs.append(client(f"c{draw(st.integers(0, 5))}", elements, az=draw(st.sampled_from(_AZS[:3] * 3 + _AZS)), first=first, last=last))
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        known = [d["aktenzeichen"] for d in docs if d.get("aktenzeichen") is not None]
        az = draw(st.sampled_from(known)) if known and draw(st.integers(0, 3)) else draw(st.sampled_from(_AZS + [_ABSENT]))
        data = reply(az=az, amount=draw(st.sampled_from(_PG_AMOUNTS)),
                     creditor_name=draw(st.sampled_from(_CREDITOR_NAMES)), name=draw(st.sampled_from(_EMAIL_NAMES)))
        received = draw(st.sampled_from([t for t in _TIMES if t is not None]))
        sender = draw(st.sampled_from([s for s in _SENDERS if isinstance(s, str)]))
        rows.append(email(draw(st.integers(1, 6)), data, from_email=sender, received_at=received,
                          in_window=WINDOW_START <= received < WINDOW_END))
    return rows, docs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matching_data(), st.integers(0, 200), st.booleans(), st.sampled_from(["as prepared", "shuffled", "repeated"]), st.randoms())
def test_diff_equals_the_reference_implementation(data, tolerance, low_confidence, layout, rnd):
    rows, docs = data
    emails = frames.prepare_emails(pd.DataFrame(rows, columns=frames.EMAIL_COLUMNS))
    clients, elements = frames.prepare_clients(docs)
    if layout == "shuffled":  # rows in any order (prepare_clients gives them sorted by document)
        clients = clients.iloc[rnd.sample(range(len(clients)), len(clients))]
        elements = elements.iloc[rnd.sample(range(len(elements)), len(elements))]
    elif layout == "repeated":  # the same element twice: a (client, pos) pair that is not unique
        elements = pd.concat([elements, elements.iloc[: rnd.randint(0, len(elements))]], ignore_index=True)
    options = DiffOptions(WINDOW_START, WINDOW_END, tolerance, low_confidence)
    got, got_checked = diff(emails, clients, elements, options)
    want, want_checked = ref_diff(emails, clients, elements, options)
    assert got_checked == want_checked
    pd.testing.assert_frame_equal(got, want)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matching_data())
def test_match_equals_the_reference_implementation(data):
    rows, docs = data
    emails = frames.prepare_emails(pd.DataFrame(rows, columns=frames.EMAIL_COLUMNS))
    clients, elements = frames.prepare_clients(docs)
    got, got_candidates = matching.match(emails.assign(in_window=True), clients, elements)
    want, want_candidates = ref_match(emails.assign(in_window=True), clients, elements)
    pd.testing.assert_frame_equal(got, want)
    pd.testing.assert_frame_equal(got_candidates, want_candidates)
    found = got[got["client_status"] == "matched"]  # client ids as strings, not _coded
    candidates = matching._candidate_frame(
        found, elements, *matching._creditor_match(*matching._creditor_args(found), elements))
    pd.testing.assert_frame_equal(candidates, ref_creditor_candidates(found, elements))
    # as route_emails calls it: string client ids, a subset of the emails with their own index
    subset = emails.iloc[::2]
    pd.testing.assert_frame_equal(matching.match_clients(subset, clients), ref_match_clients(subset, clients))
