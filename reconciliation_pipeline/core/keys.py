"""Comparison keys for clients and creditors, vectorised over pandas Series."""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

_WORD = re.compile(r"[^\W\d_]{4,}")  # "longer than 3 letters": letters only, no digits
_MAX_KEY_TEXT = 500


def _mask(values: pd.Series, test) -> pd.Series:
    return pd.Series(np.fromiter((test(v) for v in values), dtype=bool, count=len(values)), index=values.index)


def _plain_strings(values: pd.Series) -> pd.Series:
    """The values that are non-empty plain strings of sane length; everything else NA."""
    ok = _mask(values, lambda v: isinstance(v, str) and 0 < len(v) <= _MAX_KEY_TEXT)
    return values.astype(object).where(ok).astype("string")


def _per_unique_string(func):
    """Compute `func` once per distinct string (a window repeats a few thousand creditor names and
    addresses a million times) and once per non-string value; same result, same index."""

    def wrapper(values: pd.Series) -> pd.Series:
        values = values.astype(object)
        is_str = _mask(values, lambda v: isinstance(v, str)).to_numpy(bool)
        if not is_str.any():
            return func(values)
        codes, uniques = pd.factorize(values.to_numpy(object)[is_str])
        mapped = func(pd.Series(uniques, dtype=object))
        rest = func(values[~is_str]) if not is_str.all() else None
        if isinstance(mapped, tuple):  # several results (aktenzeichen_key: key and reason)
            rests = rest if rest is not None else (None,) * len(mapped)
            return tuple(_spread(m, codes, values, is_str, r) for m, r in zip(mapped, rests))
        return _spread(mapped, codes, values, is_str, rest)

    def _spread(mapped: pd.Series, codes: np.ndarray, values: pd.Series, is_str: np.ndarray, rest: pd.Series | None) -> pd.Series:
        out = mapped.iloc[codes].set_axis(values.index[is_str])
        return out if rest is None else pd.concat([out, rest]).reindex(values.index)

    wrapper.__doc__ = func.__doc__
    wrapper.__name__ = func.__name__
    return wrapper


@_per_unique_string
def text_key(values: pd.Series) -> pd.Series:
    """NFC, casefold, whitespace collapsed and trimmed; NA for missing, empty or non-string values."""
    s = _plain_strings(values).str.normalize("NFC").str.casefold()
    s = s.str.replace(r"\s+", " ", regex=True).str.strip()
    return s.where(s.str.len() > 0)


@_per_unique_string
def email_key(values: pd.Series) -> pd.Series:
    """An e-mail address compared ignoring case and surrounding spaces."""
    s = _plain_strings(values).str.strip().str.lower()
    return s.where(s.str.len() > 0)


def email_domain(email_keys: pd.Series) -> pd.Series:
    """The part after the last '@' of an e-mail key, NA when there is none."""
    domain = email_keys.str.extract(r"@([^@]+)$", expand=False)
    return domain.astype("string")


@_per_unique_string
def aktenzeichen_key(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(trimmed aktenzeichen or NA, reason why a present value is unusable or NA)."""
    present = values.notna()
    is_str = _mask(values, lambda v: isinstance(v, str))
    key = _plain_strings(values).str.strip()
    key = key.where(key.str.len() > 0)
    reason = pd.Series(pd.NA, index=values.index, dtype="string")
    reason = reason.mask(present & ~is_str, "client_aktenzeichen is not a plain string")
    too_long = _mask(values, lambda v: isinstance(v, str) and len(v) > _MAX_KEY_TEXT)
    reason = reason.mask(too_long, "client_aktenzeichen is too long")
    nul = key.str.contains("\x00", regex=False).fillna(False).astype(bool)
    reason = reason.mask(nul, "client_aktenzeichen contains a NUL character")
    return key.mask(nul), reason


def person_name_key(first: pd.Series, last: pd.Series) -> pd.Series:
    """Key of a MongoDB client's firstName/lastName as 'first last'."""
    return text_key(_plain_strings(first).fillna("") + " " + _plain_strings(last).fillna(""))


@_per_unique_string
def client_name_key(names: pd.Series) -> pd.Series:
    """Key of an extracted client_name, written 'Last, First' or 'First Last'."""
    s = _plain_strings(names)
    parts = s.str.split(",", n=1, expand=True)
    if parts.shape[1] == 2:
        swapped = parts[1].str.strip() + " " + parts[0].str.strip()
        s = swapped.where(parts[1].notna(), s)
    return text_key(s)


def _last_name_tails(name: str) -> list[str]:
    if "," in name:
        return [name.split(",", 1)[0]]
    words = name.split()
    # "First Last": the last name may have several words ("Anna von Müller")
    return [" ".join(words[-k:]) for k in range(1, max(1, min(3, len(words) - 1)) + 1)]


def last_name_patterns(names: pd.Series) -> list[str]:
    """Anchored, escaped regular expressions for the lastName of every client a client_name may mean.

    Used with `$options: "i"` to fetch candidates; the exact casefold/NFC comparison happens
    afterwards in pandas. Both Unicode normal forms are asked for, and "ss" also as "ß" (and back),
    because casefold equates them and a case-insensitive regex does not.
    """
    patterns: set[str] = set()
    for name in _plain_strings(names).dropna().unique():
        for tail in _last_name_tails(name):
            words = tail.split()
            if not words:
                continue
            given = " ".join(words)
            base = given.lower()  # the regex ignores case; `given` stays for letters like "İ" that lower() expands
            # upper()/title() too: letters whose case mapping expands ("ὐ" -> "Υ̓") escape a simple case-insensitive match
            spellings = {given, base, given.upper(), given.title(), base.casefold().replace("ss", "ß"), base.replace("ß", "ss")}
            forms = {unicodedata.normalize(form, sp) for sp in spellings for form in ("NFC", "NFD")} | spellings
            for spelling in forms:
                patterns.add("^\\s*" + "\\s+".join(re.escape(p) for p in spelling.split()) + "\\s*$")
    return sorted(patterns)


@_per_unique_string
def name_words(values: pd.Series) -> pd.Series:
    """Frozensets of the casefolded words longer than 3 letters (NA-safe)."""
    keys = text_key(values)
    return keys.map(lambda k: frozenset(_WORD.findall(k)) if isinstance(k, str) else frozenset())


def route_key(aktenzeichen: object, client_id: str) -> str:
    """The key that brings a client document and its emails into one batch: the stored aktenzeichen
    when it is a usable string, else the document's id behind a NUL (never a real aktenzeichen)."""
    if isinstance(aktenzeichen, str) and aktenzeichen.strip() and "\x00" not in aktenzeichen and len(aktenzeichen) <= _MAX_KEY_TEXT:
        return aktenzeichen
    return "\x00" + client_id
