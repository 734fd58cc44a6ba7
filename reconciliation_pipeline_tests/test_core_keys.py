"""Unit and property tests of reconciliation_pipeline.core.keys (RULES.md section 3)."""

from __future__ import annotations

import unicodedata

import re

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.core import keys


def one(fn, value):
    """Apply a vectorised key function to a single value; NA becomes None."""
    result = fn(pd.Series([value], dtype="object")).iloc[0]
    return None if result is pd.NA or (isinstance(result, float) and result != result) else result


NFC_MUELLER = unicodedata.normalize("NFC", "Müller")
NFD_MUELLER = unicodedata.normalize("NFD", "Müller")


# ---------------------------------------------------------------------------------------------
# text_key
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        pytest.param(NFC_MUELLER, NFD_MUELLER, True, id="nfc-vs-nfd"),
        pytest.param("Müller", "MÜLLER", True, id="case"),
        pytest.param("Müller", "Muller", False, id="umlaut-is-not-plain-u"),
        pytest.param("Müller", "Mueller", False, id="umlaut-is-not-ue"),
        pytest.param("STRASSE", "straße", True, id="casefold-sharp-s"),
        pytest.param("Sparkasse  Bochum", " sparkasse bochum ", True, id="whitespace-collapse"),
        pytest.param("Sparkasse\tBochum\n", "Sparkasse Bochum", True, id="tabs-newlines"),
        pytest.param("Sparkasse Bochum", "Sparkasse Bochum AG", False, id="different-names"),
    ],
)
def test_text_key_equality(left, right, equal):
    assert left != right or equal
    assert (one(keys.text_key, left) == one(keys.text_key, right)) is equal


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Sparkasse Bochum", "sparkasse bochum"),
        ("  A   b  ", "a b"),
        ("STRASSE", "strasse"),
        ("straße", "strasse"),
        (NFD_MUELLER, NFC_MUELLER.casefold()),
        ("", None),
        ("   ", None),
        (None, None),
        (5, None),
        (5.5, None),
        (True, None),
        ({"$ne": None}, None),
        (["Sparkasse"], None),
        ("x" * 501, None),
    ],
)
def test_text_key_values(value, expected):
    assert one(keys.text_key, value) == expected


def test_text_key_keeps_index_and_length():
    s = pd.Series(["A", None, "b"], index=[10, 20, 30], dtype="object")
    out = keys.text_key(s)
    assert list(out.index) == [10, 20, 30]
    assert out.iloc[0] == "a" and out.isna().iloc[1] and out.iloc[2] == "b"


@settings(deadline=None)
@given(st.text(max_size=40))
def test_text_key_is_idempotent_and_case_insensitive(text):
    k = one(keys.text_key, text)
    if k is None:
        return
    assert one(keys.text_key, k) == k
    assert one(keys.text_key, unicodedata.normalize("NFD", text)) == k
    assert k == k.strip() and "  " not in k


# ---------------------------------------------------------------------------------------------
# email_key / email_domain
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (" Forderungen@Sparkasse-Bochum.DE ", "forderungen@sparkasse-bochum.de"),
        ("a@b.de", "a@b.de"),
        ("\tA@B.DE\n", "a@b.de"),
        ("", None),
        ("   ", None),
        (None, None),
        (42, None),
        ({"$gt": ""}, None),
        (["a@b.de"], None),
    ],
)
def test_email_key(value, expected):
    assert one(keys.email_key, value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("forderungen@sparkasse-bochum.de", "sparkasse-bochum.de"),
        ("a@b@c.de", "c.de"),
        ("no-at-sign", None),
        ("x@", None),
        (None, None),
    ],
)
def test_email_domain(value, expected):
    emails = keys.email_key(pd.Series([value], dtype="object"))
    result = keys.email_domain(emails).iloc[0]
    assert (None if result is pd.NA else result) == expected


def test_email_domain_from_mixed_case_address():
    emails = keys.email_key(pd.Series([" Info@Inkasso-Nord.DE "], dtype="object"))
    assert keys.email_domain(emails).iloc[0] == "inkasso-nord.de"


# ---------------------------------------------------------------------------------------------
# aktenzeichen_key
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        pytest.param("542900", "542900", None, id="plain"),
        pytest.param(" 542900 ", "542900", None, id="trimmed"),
        pytest.param("AZ-12/2024", "AZ-12/2024", None, id="other-characters-kept"),
        pytest.param(None, None, None, id="missing"),
        pytest.param("", None, None, id="empty"),
        pytest.param("   ", None, None, id="blank"),
        pytest.param({"$ne": None}, None, "not a plain string", id="operator-dict"),
        pytest.param({"$gt": ""}, None, "not a plain string", id="operator-gt"),
        pytest.param(542900, None, "not a plain string", id="int"),
        pytest.param(542900.0, None, "not a plain string", id="float"),
        pytest.param(True, None, "not a plain string", id="bool"),
        pytest.param(["542900"], None, "not a plain string", id="list"),
        pytest.param("5429\x0000", None, "NUL", id="nul"),
        pytest.param("5" * 501, None, "too long", id="too-long"),
    ],
)
def test_aktenzeichen_key(value, key, reason):
    k, r = keys.aktenzeichen_key(pd.Series([value], dtype="object"))
    got_key = None if k.iloc[0] is pd.NA else k.iloc[0]
    got_reason = None if r.iloc[0] is pd.NA else r.iloc[0]
    assert got_key == key
    if reason is None:
        assert got_reason is None
    else:
        assert got_reason is not None and reason in got_reason


def test_aktenzeichen_key_vectorised_keeps_rows_apart():
    values = pd.Series([" 1 ", {"$ne": None}, None, "2"], dtype="object")
    k, r = keys.aktenzeichen_key(values)
    assert k.tolist()[0] == "1" and k.tolist()[3] == "2"
    assert k.isna().tolist() == [False, True, True, False]
    assert r.isna().tolist() == [True, False, True, True]


# ---------------------------------------------------------------------------------------------
# client_name_key / person_name_key
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    ["Mustermann, Max", "Max Mustermann", " max   MUSTERMANN ", "MUSTERMANN,MAX", "  Mustermann ,  Max "],
)
def test_client_name_key_both_orders(name):
    assert one(keys.client_name_key, name) == "max mustermann"


def test_client_name_key_matches_person_name_key():
    person = keys.person_name_key(
        pd.Series(["Max", "Hans Peter", "Jürgen"], dtype="object"),
        pd.Series(["Mustermann", "Müller-Lüdenscheidt", "Straße"], dtype="object"),
    )
    names = keys.client_name_key(
        pd.Series(["Mustermann, Max", "hans peter MÜLLER-LÜDENSCHEIDT", "STRASSE, JÜRGEN"], dtype="object")
    )
    assert person.tolist() == names.tolist()


def test_client_name_key_mixed_series():
    names = pd.Series(["Mustermann, Max", "Erika Musterfrau", None, 7, ""], dtype="object")
    out = keys.client_name_key(names)
    assert out.iloc[0] == "max mustermann"
    assert out.iloc[1] == "erika musterfrau"
    assert out.iloc[2:].isna().all()


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        ("Müller, Max", "Max Muller", False),
        (f"{NFD_MUELLER}, Max", f"Max {NFC_MUELLER}", True),
        ("Mustermann, Max", "Mustermann Max", False),
        ("Mustermann, Max", "Erika Mustermann", False),
    ],
)
def test_client_name_key_equality(left, right, equal):
    assert (one(keys.client_name_key, left) == one(keys.client_name_key, right)) is equal


def test_person_name_key_missing_parts():
    out = keys.person_name_key(pd.Series([None, "Max", None], dtype="object"), pd.Series(["Solo", None, None], dtype="object"))
    assert out.iloc[0] == "solo"
    assert out.iloc[1] == "max"
    assert out.isna().iloc[2]


_name_part = st.text(alphabet=st.characters(categories=("Lu", "Ll")), min_size=1, max_size=12)


@settings(deadline=None)
@given(_name_part, _name_part)
def test_client_name_orders_agree_with_person_key(first, last):
    expected = keys.person_name_key(pd.Series([first], dtype="object"), pd.Series([last], dtype="object")).iloc[0]
    assert one(keys.client_name_key, f"{last}, {first}") == expected
    assert one(keys.client_name_key, f"{first} {last}") == expected
    assert one(keys.client_name_key, f"  {first}   {last}  ") == expected


# ---------------------------------------------------------------------------------------------
# name_words
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("Sparkasse Bochum", {"sparkasse", "bochum"}),
        ("Die Bank AG", {"bank"}),
        ("ABC Inkasso", {"inkasso"}),
        ("Bank-Haus Nord", {"bank", "haus", "nord"}),
        ("Straße", {"strasse"}),
        ("Ökö Großbank", {"grossbank"}),
        ("Abc Def Ghi", set()),
        ("", set()),
        (None, set()),
        (42, set()),
        # "longer than 3 letters": a number is no word
        pytest.param("Inkasso 2000", {"inkasso"}, id="digits-are-not-letters"),
    ],
)
def test_name_words(value, words):
    out = keys.name_words(pd.Series([value], dtype="object")).iloc[0]
    assert isinstance(out, frozenset)
    assert out == frozenset(words)


@settings(deadline=None)
@given(st.text(max_size=40))
def test_name_words_are_long_casefolded_words_of_the_key(text):
    out = keys.name_words(pd.Series([text], dtype="object")).iloc[0]
    key = one(keys.text_key, text) or ""
    for word in out:
        assert len(word) > 3
        assert word in key
        assert word == word.casefold()


# ---------------------------------------------------------------------------------------------
# last_name_patterns
# ---------------------------------------------------------------------------------------------

def fetched(last: str, client_names: list) -> bool:
    """Whether a document with this lastName is fetched by the `$regex` ($options i) lookups."""
    patterns = keys.last_name_patterns(pd.Series(client_names, dtype="object"))
    return any(re.search(p, last, re.IGNORECASE) for p in patterns)


def test_last_name_patterns_both_orders():
    names = ["Mustermann, Max", "Erika musterfrau"]
    for last in ("Mustermann", "MUSTERMANN", "musterfrau", "Musterfrau"):
        assert fetched(last, names)
    for other in ("Max", "Erika", "Mustermannx", "xMustermann", "Muster"):
        assert not fetched(other, names)


def test_last_name_patterns_escape_and_skip_junk():
    out = keys.last_name_patterns(pd.Series(["müller, hans", None, 7, {"$ne": None}, "", "   ", ".*, x"], dtype="object"))
    assert fetched("Müller", ["müller, hans"]) and not fetched("anything", [".*, x"]) and fetched(".*", [".*, x"])
    assert all(p.startswith("^") and p.endswith("$") for p in out)


def test_last_name_patterns_empty():
    assert keys.last_name_patterns(pd.Series([], dtype="object")) == []


@settings(deadline=None)
@given(_name_part, _name_part)
def test_last_name_patterns_fetch_the_usual_spellings(first, last):
    names = [f"{last}, {first}", f"{first} {last}"]
    for spelling in (last, last.lower(), last.upper(), last.title(), last.capitalize()):
        assert fetched(spelling, names)


@pytest.mark.parametrize(
    ("first", "last", "client_name"),
    [
        pytest.param("Max", "McDonald", "MCDONALD, Max", id="inner-capital-upper-email"),
        pytest.param("Max", "McDonald", "max mcdonald", id="inner-capital-lower-email"),
        pytest.param("Max", "Straße", "STRASSE, Max", id="sharp-s-vs-SS"),
        pytest.param("Max", NFD_MUELLER, f"{NFC_MUELLER}, Max", id="nfd-in-mongo"),
        pytest.param("Max", NFC_MUELLER, f"{NFD_MUELLER}, Max", id="nfd-in-email"),
        pytest.param("Anna", "von Müller", "Anna von Müller", id="multi-word-last-name-first-last-order"),
        pytest.param("Max", "Mustermann", "MUSTERMANN, MAX", id="plain-upper"),
        pytest.param("Max", "Mustermann", "max mustermann", id="plain-lower"),
    ],
)
def test_last_name_patterns_fetch_every_client_the_rule_matches(first, last, client_name):
    """RULES.md 3: client_name equals firstName/lastName ignoring case (casefold, NFC).

    The patterns are what the MongoDB `lastName: {$regex, $options: i}` fetch asks for; a document the rule
    matches but the fetch never asks for can only ever be reported client_not_found.
    """
    person = keys.person_name_key(pd.Series([first], dtype="object"), pd.Series([last], dtype="object")).iloc[0]
    assert one(keys.client_name_key, client_name) == person  # the rule says: same client
    assert fetched(last, [client_name])
