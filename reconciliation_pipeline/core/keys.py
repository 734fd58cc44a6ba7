"""Comparison keys for clients and creditors, vectorised over pandas Series."""

from __future__ import annotations

import re

import pandas as pd

_WORD = re.compile(r"[^\W_]{4,}")  # "longer than 3 letters"
_MAX_KEY_TEXT = 500


def _plain_strings(values: pd.Series) -> pd.Series:
    """The values that are non-empty plain strings of sane length; everything else NA."""
    is_str = values.map(lambda v: isinstance(v, str) and 0 < len(v) <= _MAX_KEY_TEXT, na_action="ignore")
    return values.where(is_str.fillna(False).astype(bool)).astype("string")


def text_key(values: pd.Series) -> pd.Series:
    """NFC, casefold, whitespace collapsed and trimmed; NA for missing, empty or non-string values."""
    s = _plain_strings(values).str.normalize("NFC").str.casefold()
    s = s.str.replace(r"\s+", " ", regex=True).str.strip()
    return s.where(s.str.len() > 0)


def email_key(values: pd.Series) -> pd.Series:
    """An e-mail address compared ignoring case and surrounding spaces."""
    s = _plain_strings(values).str.strip().str.lower()
    return s.where(s.str.len() > 0)


def email_domain(email_keys: pd.Series) -> pd.Series:
    """The part after the last '@' of an e-mail key, NA when there is none."""
    domain = email_keys.str.extract(r"@([^@]+)$", expand=False)
    return domain.astype("string")


def aktenzeichen_key(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(trimmed aktenzeichen or NA, reason why a present value is unusable or NA)."""
    present = values.notna()
    is_str = values.map(lambda v: isinstance(v, str), na_action="ignore").fillna(False).astype(bool)
    key = _plain_strings(values).str.strip()
    key = key.where(key.str.len() > 0)
    reason = pd.Series(pd.NA, index=values.index, dtype="string")
    reason = reason.mask(present & ~is_str, "client_aktenzeichen is not a plain string")
    too_long = is_str & values.map(lambda v: isinstance(v, str) and len(v) > _MAX_KEY_TEXT, na_action="ignore").fillna(False).astype(bool)
    reason = reason.mask(too_long, "client_aktenzeichen is too long")
    nul = key.str.contains("\x00", regex=False).fillna(False).astype(bool)
    reason = reason.mask(nul, "client_aktenzeichen contains a NUL character")
    return key.mask(nul), reason


def person_name_key(first: pd.Series, last: pd.Series) -> pd.Series:
    """Key of a MongoDB client's firstName/lastName as 'first last'."""
    return text_key(_plain_strings(first).fillna("") + " " + _plain_strings(last).fillna(""))


def client_name_key(names: pd.Series) -> pd.Series:
    """Key of an extracted client_name, written 'Last, First' or 'First Last'."""
    s = _plain_strings(names)
    parts = s.str.split(",", n=1, expand=True)
    if parts.shape[1] == 2:
        swapped = parts[1].str.strip() + " " + parts[0].str.strip()
        s = swapped.where(parts[1].notna(), s)
    return text_key(s)


def last_name_variants(names: pd.Series) -> list[str]:
    """Spellings of the last names in client_name values, to fetch candidates with `$in`.

    MongoDB equality is case-sensitive, so the query asks for the usual capitalisations and the
    exact casefolded comparison happens afterwards in pandas.
    """
    s = _plain_strings(names).dropna()
    comma = s.str.contains(",", regex=False)
    last = s.where(~comma, s.str.split(",", n=1).str[0]).where(comma, s.str.split().str[-1])
    last = last.str.strip().dropna()
    last = last[last.str.len() > 0]
    variants: set[str] = set()
    for fn in (lambda x: x, str.lower, str.upper, str.title, str.capitalize):
        variants.update(fn(v) for v in last.unique())
    return sorted(variants)


def name_words(values: pd.Series) -> pd.Series:
    """Frozensets of the casefolded words longer than 3 letters (NA-safe)."""
    keys = text_key(values)
    return keys.map(lambda k: frozenset(_WORD.findall(k)) if isinstance(k, str) else frozenset())
