"""Unit and property tests of reconciliation_pipeline.core.amounts (RULES.md section 2)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from bson import Decimal128
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.core.amounts import InvalidAmount, cents_to_float, to_cents, try_cents

MAX_CENTS = 10**14  # 10^12 euros


def _json_number(text: str):
    """A number as the pipeline's JSON parser gives it (floats as exact Decimals)."""
    return json.loads(text, parse_float=Decimal)


# ---------------------------------------------------------------------------------------------
# Accepted values
# ---------------------------------------------------------------------------------------------

ACCEPTED = [
    # JSON numbers
    pytest.param(0, 0, id="int-zero"),
    pytest.param(1234, 123400, id="int"),
    pytest.param(10**12, MAX_CENTS, id="int-max"),
    pytest.param(1234.56, 123456, id="float"),
    pytest.param(1.0, 100, id="float-whole"),
    pytest.param(0.0, 0, id="float-zero"),
    pytest.param(-0.0, 0, id="float-negative-zero"),
    pytest.param(Decimal("1234.56"), 123456, id="decimal"),
    pytest.param(_json_number("1234.56"), 123456, id="json-parse_float-decimal"),
    pytest.param(_json_number("1234"), 123400, id="json-int"),
    pytest.param(_json_number("1e3"), 100000, id="json-exponent"),
    pytest.param(Decimal("1E+3"), 100000, id="decimal-exponent"),
    pytest.param(Decimal("1000000000000.00"), MAX_CENTS, id="decimal-max"),
    # half-up rounding
    pytest.param(0.005, 1, id="float-half-up-0.005"),
    pytest.param(0.145, 15, id="float-0.145-half-up"),
    pytest.param(2.675, 268, id="float-2.675-half-up"),
    pytest.param(0.004, 0, id="float-0.004-down"),
    pytest.param(Decimal("0.005"), 1, id="decimal-half-up"),
    pytest.param(Decimal("0.0049999"), 0, id="decimal-below-half"),
    pytest.param(Decimal("1.995"), 200, id="decimal-carry"),
    pytest.param(_json_number("0.145"), 15, id="json-0.145"),
    pytest.param(_json_number("0.125"), 13, id="json-half-up-not-even"),
    # strings: German / English notation, currency markers
    pytest.param("1.234,56", 123456, id="german"),
    pytest.param("1234,56 EUR", 123456, id="german-EUR-suffix"),
    pytest.param("1234,56 eur", 123456, id="german-eur-lowercase"),
    pytest.param("EUR 1234,56", 123456, id="EUR-prefix"),
    pytest.param("€ 1,234.56", 123456, id="euro-sign-english"),
    pytest.param("€1.234,56", 123456, id="euro-sign-no-space"),
    pytest.param("1.234,56 €", 123456, id="euro-sign-suffix"),
    pytest.param("1234.56", 123456, id="english-plain"),
    pytest.param("1234,56", 123456, id="german-plain"),
    pytest.param("1.234.567,89", 123456789, id="german-two-groups"),
    pytest.param("1,234,567.89", 123456789, id="english-two-groups"),
    pytest.param("1.234.567", 123456700, id="german-grouping-no-decimals"),
    pytest.param("1,234,567", 123456700, id="english-grouping-no-decimals"),
    pytest.param("1.234,5", 123450, id="german-one-decimal"),
    pytest.param("1,5", 150, id="german-short"),
    pytest.param("0,05", 5, id="german-cents"),
    pytest.param("1234", 123400, id="digits-only"),
    pytest.param("  1234,56  ", 123456, id="surrounding-spaces"),
    pytest.param("1.234,56\u00a0EUR", 123456, id="nbsp-before-EUR"),
    pytest.param("\u20ac\u00a01.234,56", 123456, id="nbsp-after-euro-sign"),
    pytest.param("\u00a01234,56\u00a0", 123456, id="nbsp-around"),
    pytest.param("1.000.000.000.000,00", MAX_CENTS, id="string-max"),
    # MongoDB's Decimal128
    pytest.param(Decimal128("12.34"), 1234, id="decimal128"),
    pytest.param(Decimal128("0.005"), 1, id="decimal128-half-up"),
]


@pytest.mark.parametrize(("value", "cents"), ACCEPTED)
def test_to_cents_accepts(value, cents):
    assert to_cents(value) == cents
    assert try_cents(value) == (cents, None)


def test_to_cents_returns_plain_int():
    for value in (1234.56, Decimal("1.5"), "1.234,56", 7, Decimal128("3.10")):
        assert type(to_cents(value)) is int


# ---------------------------------------------------------------------------------------------
# Rejected values
# ---------------------------------------------------------------------------------------------

REJECTED = [
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(None, id="none"),
    pytest.param(float("nan"), id="float-nan"),
    pytest.param(float("inf"), id="float-inf"),
    pytest.param(float("-inf"), id="float-minus-inf"),
    pytest.param(Decimal("NaN"), id="decimal-nan"),
    pytest.param(Decimal("sNaN"), id="decimal-snan"),
    pytest.param(Decimal("Infinity"), id="decimal-inf"),
    pytest.param(Decimal("-Infinity"), id="decimal-minus-inf"),
    pytest.param(-5, id="negative-int"),
    pytest.param(-0.01, id="negative-float"),
    pytest.param(Decimal("-0.01"), id="negative-decimal"),
    pytest.param("-5", id="negative-string"),
    pytest.param("-5,00 EUR", id="negative-string-eur"),
    pytest.param("- 5", id="negative-string-space"),
    pytest.param(10**12 + 1, id="int-above-max"),
    pytest.param(1e13, id="float-above-max"),
    pytest.param(Decimal("1000000000000.01"), id="decimal-above-max"),
    pytest.param("1000000000000,01", id="string-above-max"),
    pytest.param("1.000.000.000.001", id="grouped-string-above-max"),
    pytest.param(1e300, id="float-huge"),
    pytest.param(10**400, id="int-huge"),
    pytest.param("1.234", id="ambiguous-dot-three-digits"),
    pytest.param("1,234", id="ambiguous-comma-three-digits"),
    pytest.param("€ 1.234", id="ambiguous-with-euro"),
    pytest.param("1,234 EUR", id="ambiguous-with-EUR"),
    pytest.param("12.345,6.7", id="mixed-garbage"),
    pytest.param("1,234.567", id="three-decimals-english"),
    pytest.param("1.234,567", id="three-decimals-german"),
    pytest.param("1,2345", id="four-decimals"),
    pytest.param("12.34.56", id="bad-grouping"),
    pytest.param("1234.567,89", id="bad-group-length"),
    pytest.param("1.23,45", id="short-group"),
    pytest.param("1,234,56", id="comma-grouping-bad-last-group"),
    pytest.param("abc", id="garbage"),
    pytest.param("12 Euro und 50 Cent", id="prose"),
    pytest.param("1e3", id="exponent-string"),
    pytest.param("NaN", id="nan-string"),
    pytest.param("Infinity", id="infinity-string"),
    pytest.param("0x10", id="hex-string"),
    pytest.param("+5", id="plus-sign"),
    pytest.param("1 234,56", id="space-grouping"),
    pytest.param("1_000", id="underscore-grouping"),
    pytest.param(".5", id="no-integer-part"),
    pytest.param("5.", id="no-fraction-digits"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("EUR", id="currency-only"),
    pytest.param("€", id="euro-only"),
    pytest.param("12 EURO", id="EURO-suffix"),
    pytest.param("$12", id="dollar"),
    pytest.param({}, id="dict"),
    pytest.param({"$numberDecimal": "12.34"}, id="extended-json-dict"),
    pytest.param([], id="list"),
    pytest.param([12.34], id="list-of-number"),
    pytest.param(("12",), id="tuple"),
    pytest.param(b"12", id="bytes"),
    pytest.param("1" * 65, id="overlong-digits"),
    pytest.param("1" + " " * 100 + "EUR", id="overlong-padding"),
    pytest.param("x" * 10_000, id="overlong-garbage"),
    pytest.param(Decimal128("NaN"), id="decimal128-nan"),
    pytest.param(Decimal128("Infinity"), id="decimal128-inf"),
    pytest.param(Decimal128("-1.00"), id="decimal128-negative"),
    pytest.param(Decimal128("1E+13"), id="decimal128-above-max"),
    # Only ASCII digits are German or English notation (RULES.md 2: "anything else" is invalid).
    pytest.param("\uff11\uff12\uff13", id="fullwidth-digits"),
    pytest.param("\u0661\u0662\u0663", id="arabic-indic-digits"),
    pytest.param("12,\u0663\u0664", id="arabic-indic-fraction"),
]


@pytest.mark.parametrize("value", REJECTED)
def test_to_cents_rejects(value):
    with pytest.raises(InvalidAmount):
        to_cents(value)
    cents, reason = try_cents(value)
    assert cents is None
    assert isinstance(reason, str) and reason


def test_invalid_amount_is_a_value_error():
    assert issubclass(InvalidAmount, ValueError)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1.234", "ambiguous"),
        ("1,234", "ambiguous"),
        (-1, "negative"),
        (10**13, "10^12"),
        (True, "boolean"),
        (float("nan"), "finite"),
    ],
)
def test_try_cents_reason_says_why(value, fragment):
    assert fragment in try_cents(value)[1]


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

amounts_2dp = st.integers(min_value=0, max_value=MAX_CENTS).map(lambda c: Decimal(c).scaleb(-2))


def _german(value: Decimal) -> str:
    integer, fraction = f"{value:.2f}".split(".")
    return f"{int(integer):,}".replace(",", ".") + "," + fraction


def _english(value: Decimal) -> str:
    return f"{value:,.2f}"


@settings(deadline=None, max_examples=300)
@given(amounts_2dp)
def test_notations_agree_with_the_number(value):
    expected = int(value * 100)
    assert to_cents(value) == expected
    assert to_cents(float(value)) == expected
    texts = [
        _german(value), _english(value), f"{value:.2f}", f"{value:.2f}".replace(".", ","),
    ]
    for text in list(texts):
        texts += [f"€ {text}", f"{text} EUR", f"€{text}", f"{text} €", f"EUR {text}", f"{text}\u00a0EUR"]
    for text in texts:
        assert to_cents(text) == expected, text


@settings(deadline=None, max_examples=300)
@given(st.integers(min_value=0, max_value=MAX_CENTS))
def test_cents_to_float_round_trips(cents):
    value = cents_to_float(cents)
    assert isinstance(value, float)
    assert to_cents(value) == cents
    assert Decimal(repr(value)) == Decimal(cents) / 100


anything = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789.,-+ €EURer\u00a0\t\nxe", max_size=30),
    st.from_regex(r"\A[€ ]{0,2}[0-9]{1,7}([.,][0-9]{1,4}){0,3}( ?(EUR|€))?\Z"),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(deadline=None, max_examples=1000)
@given(anything)
def test_to_cents_raises_only_invalid_amount(value):
    try:
        cents = to_cents(value)
    except InvalidAmount:
        pass
    else:
        assert isinstance(cents, int) and not isinstance(cents, bool)
        assert 0 <= cents <= MAX_CENTS


@settings(deadline=None, max_examples=1000)
@given(anything)
def test_try_cents_never_raises(value):
    cents, reason = try_cents(value)
    assert (cents is None) != (reason is None)
    if cents is not None:
        assert 0 <= cents <= MAX_CENTS


@settings(deadline=None)
@given(st.integers(min_value=-(10**15), max_value=-1))
def test_negative_numbers_always_rejected(value):
    for v in (value, Decimal(value).scaleb(-2), float(Decimal(value).scaleb(-2)), str(value)):
        assert try_cents(v)[0] is None


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=999), st.integers(min_value=0, max_value=999))
def test_lone_separator_with_three_digits_is_ambiguous(head, tail):
    for sep in (".", ","):
        text = f"{head}{sep}{tail:03d}"
        with pytest.raises(InvalidAmount, match="ambiguous"):
            to_cents(text)


# --- the vectorised MongoDB path (frames.mongo_amounts) agrees with to_cents value by value ----------

import pandas as pd  # noqa: E402

from reconciliation_pipeline.core.frames import MISSING, mongo_amounts  # noqa: E402


def _one(value):
    missing, cents, reason = mongo_amounts(pd.Series([value, 1.5], dtype=object))  # a second value keeps arrays 1-d
    return bool(missing[0]), (None if pd.isna(cents.iloc[0]) else int(cents.iloc[0])), reason.iloc[0]


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e12),
    st.decimals(min_value=0, max_value=10**6, places=3).map(float),
    st.integers(min_value=-(10**13), max_value=10**13),
    st.booleans(),
    st.text(max_size=12),
))
def test_mongo_amounts_fast_path_equals_try_cents(value):
    missing, cents, _ = _one(value)
    assert not missing
    assert cents == try_cents(value)[0]


@pytest.mark.parametrize("value", [0.125, 0.005, 1234.565, 0.1 + 0.2, 1e12, 1e12 + 0.01, -0.0, 0.0, 2**53 / 100])
def test_mongo_amounts_edge_floats_equal_try_cents(value):
    assert _one(value)[1] == try_cents(value)[0]


@pytest.mark.parametrize("value", [None, MISSING])
def test_mongo_amounts_missing(value):
    missing, cents, reason = _one(value)
    assert missing and cents is None and reason is pd.NA


# --- the vectorised PostgreSQL path (frames.cents_from_typed) agrees with to_cents text by text ---------

from reconciliation_pipeline.core.frames import cents_from_typed  # noqa: E402

_digits = st.text(alphabet="0123456789", min_size=1, max_size=15)
_amount_texts = st.one_of(
    st.builds(lambda w, d: w + ("." + d if d else ""), _digits, st.one_of(st.just(""), _digits)),
    st.text(alphabet="0123456789.,-+eE €EURa١٢ \u00a0", max_size=16),
    st.text(max_size=8),
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["number", "string"]), st.lists(_amount_texts, min_size=1, max_size=5))
def test_cents_from_typed_equals_try_cents(kind, texts):
    cents, _ = cents_from_typed(pd.Series([kind] * len(texts), dtype=object), pd.Series(texts, dtype=object))
    for text, got in zip(texts, cents):
        if kind == "number":
            try:
                expected = try_cents(Decimal(text))[0]
            except ArithmeticError:
                expected = None
        else:
            expected = try_cents(text)[0]
        assert (None if pd.isna(got) else int(got)) == expected, text
