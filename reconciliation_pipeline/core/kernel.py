"""The integer-coded join kernel of the matching and the diff.

Every string column is hashed once (as pd.factorize does), and joins, counts and "newest per pair"
are numpy over int64 codes and row numbers; frames are built only for the rows that need them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def objects(values: pd.Series | pd.Index | np.ndarray) -> np.ndarray:
    return values.to_numpy(object) if isinstance(values, (pd.Series, pd.Index)) else np.asarray(values, dtype=object)


_NOT_A_STRING = object()


def factorize_objects(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pd.factorize of an object array (same codes and distinct values), faster for repeated strings.

    pd.factorize hashes an array of only strings as UTF-8 bytes, every value again; with one
    non-string behind the values it uses the object hash table, which reuses the hash each string
    object caches: about three times faster for a million repeated keys. The marker is dropped again.
    """
    codes, uniques = pd.factorize(np.append(values, _NOT_A_STRING))
    return codes[:-1].astype(np.int64, copy=False), objects(uniques)[:-1]


def factorized(first: pd.Series | np.ndarray, *more: pd.Series | np.ndarray) -> tuple[list[np.ndarray], pd.Index]:
    """Codes of several arrays in one coding and the distinct values: exactly what pd.factorize of
    their concatenation gives (codes in order of first appearance, -1 for NA).

    Only `first` is factorized; the others are looked up among its distinct values (a small hash
    table: several times faster than factorizing a million repeated strings), and the values
    `first` lacks are factorized on their own and numbered after it.
    """
    codes, uniques = factorize_objects(objects(first))
    index = pd.Index(uniques, dtype=object)
    out = [codes]
    for values in more:
        values = objects(values)
        found = index.get_indexer(values).astype(np.int64, copy=False)
        unknown = np.flatnonzero(found < 0)
        unknown = unknown[pd.notna(values[unknown])]
        if len(unknown):
            new_codes, new_values = factorize_objects(values[unknown])
            found[unknown] = new_codes + len(index)
            index = index.append(pd.Index(new_values, dtype=object))
        out.append(found)
    return out, index


def take(values: np.ndarray, codes: np.ndarray, missing: int = -1) -> np.ndarray:
    """values[codes], and `missing` where a code is -1 (the appended last element)."""
    return np.append(values, np.asarray(missing, dtype=values.dtype))[codes]


def pair(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """One int64 code per (a, b) pair of codes, 0 <= b < width; -1 where a or b is -1 (NA)."""
    width = max(int(width), 1)
    if len(a) and int(a.max()) >= np.iinfo(np.int64).max // width - 1:
        raise OverflowError("too many distinct values to pair in int64")
    return np.where((a >= 0) & (b >= 0), a * width + b, -1)


def equi_join(left: np.ndarray, right: np.ndarray, n_codes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(left rows, right rows) of all pairs with equal codes (negative codes pair with nothing),
    ordered by left row and then by right row: the rows an inner DataFrame.merge pairs, in its order.

    `n_codes`: the codes are already 0 <= code < n_codes (from `factorized`); else they are renumbered.
    """
    left_rows, right_rows = np.flatnonzero(left >= 0), np.flatnonzero(right >= 0)
    if n_codes is None:
        codes, uniques = pd.factorize(np.concatenate([right[right_rows], left[left_rows]]))
        right_code, left_code, n_codes = codes[: len(right_rows)], codes[len(right_rows):], len(uniques)
    else:
        right_code, left_code = right[right_rows], left[left_rows]
    count = np.bincount(right_code, minlength=n_codes)
    grouped = right_rows[np.argsort(right_code, kind="stable")]  # right rows by code, in row order within a code
    start = np.cumsum(count) - count
    n = count[left_code]
    offset = np.repeat(start[left_code] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    return np.repeat(left_rows, n), grouped[offset]


def email_codes(email_ids: pd.Series | np.ndarray) -> tuple[np.ndarray, int]:
    """A code per row for its email_id (the matching counts candidates per email_id) and how many."""
    ids = pd.Index(email_ids)
    if ids.hasnans:
        raise ValueError("email_id must not be missing")
    if ids.is_unique:
        return np.arange(len(ids), dtype=np.int64), len(ids)
    codes, uniques = pd.factorize(ids)
    return codes.astype(np.int64, copy=False), len(uniques)


def small_codes(left: pd.Series, right: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Client ids of both sides as codes: int64 codes (matching.coded) as they are (no second hashing
    of a million ids), anything else factorized."""
    if pd.api.types.is_integer_dtype(left) and pd.api.types.is_integer_dtype(right):
        a, b = left.to_numpy(np.int64), right.to_numpy(np.int64)
        if (a >= 0).all() and (b >= 0).all():
            return a, b
    (a, b), _ = factorized(left, right)
    return a, b


def per_email(email: np.ndarray, n_emails: int, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many candidate `targets` its email_id has, and the target when exactly one (else -1)."""
    count = np.bincount(email[rows], minlength=n_emails)
    single = count[email[rows]] == 1
    only = np.full(n_emails, -1, dtype=np.int64)
    only[email[rows[single]]] = targets[single]
    return count[email], only[email]


def newest(group: np.ndarray, n_groups: int, received_at: pd.Series, email_id: np.ndarray) -> np.ndarray:
    """Per group, the row of its newest email: greatest received_at (NaT counts as newest, as
    sort_values puts it last), then greatest email_id, then the last row."""
    # minus one: NaT (the smallest int64) wraps around to the largest value, the order of the rest stays
    received = pd.DatetimeIndex(received_at).asi8 - 1
    newest = np.full(n_groups, np.iinfo(np.int64).min)
    np.maximum.at(newest, group, received)
    top = received == newest[group]
    highest = np.full(n_groups, np.iinfo(np.int64).min)
    np.maximum.at(highest, group[top], email_id[top])
    top &= email_id == highest[group]
    last = np.full(n_groups, -1, dtype=np.int64)
    np.maximum.at(last, group[top], np.flatnonzero(top))
    return last
