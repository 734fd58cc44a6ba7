"""Matching and the vectorised diff of PostgreSQL emails against MongoDB creditor elements."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from reconciliation_pipeline.core import keys

# Kinds of finding (RULES.md section 3) plus the outbox audit kind.
DATA_MISMATCH = "data_mismatch"
MISSING_IN_MONGO = "missing_in_mongo"
CLIENT_NOT_FOUND = "client_not_found"
CREDITOR_NOT_FOUND = "creditor_not_found"
AMBIGUOUS_CLIENT = "ambiguous_client"
AMBIGUOUS_CREDITOR = "ambiguous_creditor"
INVALID_PG_AMOUNT = "invalid_pg_amount"
INVALID_MONGO_AMOUNT = "invalid_mongo_amount"
EXTRA_IN_MONGO = "extra_in_mongo"
OUTBOX_DELIVERY = "outbox_delivery"
KINDS = (
    DATA_MISMATCH, MISSING_IN_MONGO, CLIENT_NOT_FOUND, CREDITOR_NOT_FOUND, AMBIGUOUS_CLIENT,
    AMBIGUOUS_CREDITOR, INVALID_PG_AMOUNT, INVALID_MONGO_AMOUNT, EXTRA_IN_MONGO,
)
REPAIRABLE_KINDS = (DATA_MISMATCH, MISSING_IN_MONGO)
LOW_CONFIDENCE_LEVEL = 4

FINDING_COLUMNS = [
    "kind", "email_id", "client_id", "aktenzeichen", "pos", "creditor_email", "match_level",
    "pg_amount_cents", "mongo_amount_cents", "mongo_raw", "received_at", "repairable", "reason",
    "observed_sender_email", "observed_sender_name", "observed_response_at",
]


@dataclass(frozen=True)
class DiffOptions:
    """What the diff needs to know besides the data."""

    window_start: datetime
    window_end: datetime
    tolerance_cents: int = 0
    repair_low_confidence: bool = False


# --- Vectorised building blocks -------------------------------------------------------------------
# The matching and the diff join on int64 codes: every string column is hashed once (as
# pd.factorize does), and joins, counts and "newest per pair" are numpy over integers.


def _objects(values: pd.Series | pd.Index | np.ndarray) -> np.ndarray:
    return values.to_numpy(object) if isinstance(values, (pd.Series, pd.Index)) else np.asarray(values, dtype=object)


_NOT_A_STRING = object()


def _factorize_objects(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pd.factorize of an object array (same codes and distinct values), faster for repeated strings.

    pd.factorize hashes an array of only strings as UTF-8 bytes, every value again; with one
    non-string behind the values it uses the object hash table, which reuses the hash each string
    object caches: about three times faster for a million repeated keys. The marker is dropped again.
    """
    codes, uniques = pd.factorize(np.append(values, _NOT_A_STRING))
    return codes[:-1].astype(np.int64, copy=False), _objects(uniques)[:-1]


def _factorized(first: pd.Series | np.ndarray, *more: pd.Series | np.ndarray) -> tuple[list[np.ndarray], pd.Index]:
    """Codes of several arrays in one coding and the distinct values: exactly what pd.factorize of
    their concatenation gives (codes in order of first appearance, -1 for NA).

    Only `first` is factorized; the others are looked up among its distinct values (a small hash
    table: several times faster than factorizing a million repeated strings), and the values
    `first` lacks are factorized on their own and numbered after it.
    """
    codes, uniques = _factorize_objects(_objects(first))
    index = pd.Index(uniques, dtype=object)
    out = [codes]
    for values in more:
        values = _objects(values)
        found = index.get_indexer(values).astype(np.int64, copy=False)
        unknown = np.flatnonzero(found < 0)
        unknown = unknown[pd.notna(values[unknown])]
        if len(unknown):
            new_codes, new_values = _factorize_objects(values[unknown])
            found[unknown] = new_codes + len(index)
            index = index.append(pd.Index(new_values, dtype=object))
        out.append(found)
    return out, index


def _take(values: np.ndarray, codes: np.ndarray, missing: int = -1) -> np.ndarray:
    """values[codes], and `missing` where a code is -1 (the appended last element)."""
    return np.append(values, np.asarray(missing, dtype=values.dtype))[codes]


def _pair(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """One int64 code per (a, b) pair of codes, 0 <= b < width; -1 where a or b is -1 (NA)."""
    width = max(int(width), 1)
    if len(a) and int(a.max()) >= np.iinfo(np.int64).max // width - 1:
        raise OverflowError("too many distinct values to pair in int64")
    return np.where((a >= 0) & (b >= 0), a * width + b, -1)


def _equi_join(left: np.ndarray, right: np.ndarray, n_codes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(left rows, right rows) of all pairs with equal codes (negative codes pair with nothing),
    ordered by left row and then by right row: the rows an inner DataFrame.merge pairs, in its order.

    `n_codes`: the codes are already 0 <= code < n_codes (from `_factorized`); else they are renumbered.
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


def _email_codes(email_ids: pd.Series | np.ndarray) -> tuple[np.ndarray, int]:
    """A code per row for its email_id (the matching counts candidates per email_id) and how many."""
    ids = pd.Index(email_ids)
    if ids.hasnans:
        raise ValueError("email_id must not be missing")
    if ids.is_unique:
        return np.arange(len(ids), dtype=np.int64), len(ids)
    codes, uniques = pd.factorize(ids)
    return codes.astype(np.int64, copy=False), len(uniques)


def _small_codes(left: pd.Series, right: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Client ids of both sides as codes: the int64 codes of `_coded` as they are (no second hashing of
    a million ids), anything else factorized."""
    if pd.api.types.is_integer_dtype(left) and pd.api.types.is_integer_dtype(right):
        a, b = left.to_numpy(np.int64), right.to_numpy(np.int64)
        if (a >= 0).all() and (b >= 0).all():
            return a, b
    (a, b), _ = _factorized(left, right)
    return a, b


# --- Client match ---------------------------------------------------------------------------------


def _client_candidates(emails: pd.DataFrame, clients: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(email rows, client rows) of every client an email may mean, and which emails have a key.

    By aktenzeichen; only emails that give no aktenzeichen (and no reason against it) by name, whose
    key is built for those emails only. An aktenzeichen that names no document matches nothing.
    """
    (client_az, email_az), az_values = _factorized(clients["az_key"], emails["az_key"])
    email_rows, client_rows = _equi_join(email_az, client_az, len(az_values))
    has_key = emails["az_key"].notna().to_numpy(bool, copy=True)
    no_az = np.flatnonzero(~has_key & emails["az_reason"].isna().to_numpy(bool))
    if len(no_az):
        name_key = keys.client_name_key(emails["client_name"].iloc[no_az].astype(object))
        named = no_az[name_key.notna().to_numpy(bool)]
        has_key[named] = True
        (client_name, email_name), name_values = _factorized(clients["name_key"], name_key.dropna())
        by_name = _equi_join(email_name, client_name, len(name_values))
        email_rows = np.concatenate([email_rows, named[by_name[0]]])
        client_rows = np.concatenate([client_rows, by_name[1]])
    return email_rows, client_rows, has_key


def _client_match(
    emails: pd.DataFrame, clients: pd.DataFrame, email: np.ndarray, n_emails: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per email row: (number of clients its email_id may mean, the client row when exactly one else -1, has a key).

    `email`, `n_emails`: the rows' email_id codes (_email_codes)."""
    email_rows, client_rows, has_key = _client_candidates(emails, clients)
    return (*_per_email(email, n_emails, email_rows, client_rows), has_key)


def _per_email(email: np.ndarray, n_emails: int, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many candidate `targets` its email_id has, and the target when exactly one (else -1)."""
    count = np.bincount(email[rows], minlength=n_emails)
    single = count[email[rows]] == 1
    only = np.full(n_emails, -1, dtype=np.int64)
    only[email[rows[single]]] = targets[single]
    return count[email], only[email]


def _client_reason(az_reason: pd.Series, has_key: np.ndarray, n: np.ndarray) -> pd.Series:
    reason = az_reason.astype(object)
    n = pd.Series(n, index=az_reason.index)
    reason = reason.mask(reason.isna() & ~has_key, "no client_aktenzeichen or client_name")
    reason = reason.mask(reason.isna() & (n == 0), "no client document with this aktenzeichen or name")
    return reason.mask(n > 1, n.astype(str) + " client documents match")


def match_clients(emails: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    """Per email: client_status (matched, not_found, ambiguous), client_id, client_reason.

    By aktenzeichen; only emails that give no aktenzeichen are matched by name (whose key is built
    for those emails only). An aktenzeichen that names no document is client_not_found: the result
    never depends on which other documents happen to be read in the same batch.
    """
    n, client_row, has_key = _client_match(emails, clients, *_email_codes(emails["email_id"]))
    usable = emails["az_reason"].isna().to_numpy(bool)
    found = (n == 1) & usable
    ids = clients["client_id"].to_numpy()
    out = emails[["email_id"]].copy()
    if pd.api.types.is_integer_dtype(clients["client_id"]):
        client_id = pd.array(np.where(found, _take(ids.astype(np.int64), client_row), 0), dtype="Int64")
        client_id[~found] = pd.NA
    else:
        client_id = np.where(found, _take(ids.astype(object), client_row, None), np.nan)
    out["client_id"] = pd.Series(client_id, index=out.index, dtype=client_id.dtype)
    out["client_status"] = np.where(usable, np.select([n == 1, n > 1], ["matched", "ambiguous"], "not_found"), "not_found")
    out["client_reason"] = _client_reason(emails["az_reason"], has_key, n)
    return out


# --- Creditor match -------------------------------------------------------------------------------


def _distinct(values: np.ndarray) -> tuple[np.ndarray, pd.Series]:
    """(codes, the distinct values as an object Series) of names: the key functions run once per
    distinct value. A non-string name is no name (-1), as the key functions say of it anyway."""
    try:
        codes, uniques = _factorize_objects(values)
    except TypeError:  # an unhashable value (a list or an object from MongoDB)
        codes, uniques = _factorize_objects(np.array([v if isinstance(v, str) else None for v in values], dtype=object))
    return codes, pd.Series(uniques, dtype=object)


def _creditor_match(
    email: np.ndarray, n_emails: int, client_ids: pd.Series, from_keys: pd.Series, creditor_names: np.ndarray, elements: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(email rows, element rows, level) of the candidates at each email's first level with candidates.

    Level 1 pairs emails and their client's creditors by e-mail key; only the emails left without
    a candidate are paired with every creditor of their client for level 2 (name key) and then,
    where that finds nothing, the word-based levels 3 and 4. Blocks of level 1, 2, then 3/4 rows,
    each in email row and then element order. `email`, `n_emails`: the rows' email_id codes.
    """
    client, element_client = _small_codes(client_ids, elements["client_id"])
    (element_key, email_key), key_values = _factorized(elements["sender_email_key"], from_keys)
    l1 = _equi_join(_pair(client, email_key, len(key_values)), _pair(element_client, element_key, len(key_values)))
    done = np.zeros(n_emails, dtype=bool)
    done[email[l1[0]]] = True
    rest = np.flatnonzero(~done[email])
    if not len(rest):
        return l1[0], l1[1], np.ones(len(l1[0]), dtype=np.int64)

    # every remaining email with every creditor of its client
    pair_rest, pair_element = _equi_join(client[rest], element_client)
    rows = rest[pair_rest]
    needed = np.zeros(len(elements), dtype=bool)
    needed[pair_element] = True
    needed = np.flatnonzero(needed)
    name_codes, names = _distinct(creditor_names[rest])
    sender_codes = np.full(len(elements), -1, dtype=np.int64)
    sender_codes[needed], senders = _distinct(elements["observed_sender_name"].to_numpy(object)[needed])
    (sender_key, name_key), _ = _factorized(keys.text_key(senders), keys.text_key(names))
    name = _take(name_key, name_codes)[pair_rest]
    level2 = (name >= 0) & (name == _take(sender_key, sender_codes)[pair_element])
    done[email[rows[level2]]] = True

    # levels 3 and 4, decided once per distinct (creditor name, sender name) and per e-mail domain
    rest3 = ~done[email[rows]]
    a, b = name_codes[pair_rest], sender_codes[pair_element]
    both = rest3 & (a >= 0) & (b >= 0)
    width = max(len(senders), 1)
    combos, combo_values = pd.factorize(a[both] * width + b[both])
    name_words, sender_words = keys.name_words(names).to_numpy(object), keys.name_words(senders).to_numpy(object)
    shares = np.fromiter(
        (bool(name_words[v // width] & sender_words[v % width]) for v in combo_values), dtype=bool, count=len(combo_values)
    )
    shared = np.zeros(len(rows), dtype=bool)
    shared[both] = shares[combos]
    domain_codes, _ = pd.factorize(keys.email_domain(pd.Series(_objects(key_values), dtype=object)).to_numpy(object))
    domain = _take(domain_codes.astype(np.int64), email_key)[rows]
    same_domain = (domain >= 0) & (domain == _take(domain_codes.astype(np.int64), element_key)[pair_element])
    level = np.select([shared & same_domain, shared], [3, 4], 0)
    keep = rest3 & (level > 0)
    best = np.full(n_emails, 5, dtype=np.int64)
    np.minimum.at(best, email[rows[keep]], level[keep])
    keep &= level == best[email[rows]]
    return (
        np.concatenate([l1[0], rows[level2], rows[keep]]),
        np.concatenate([l1[1], pair_element[level2], pair_element[keep]]),
        np.concatenate([np.ones(len(l1[0]), dtype=np.int64), np.full(int(level2.sum()), 2, dtype=np.int64), level[keep]]),
    )


def _creditor_args(emails: pd.DataFrame) -> tuple:
    return *_email_codes(emails["email_id"]), emails["client_id"], emails["from_email_key"], emails["creditor_name"].to_numpy(object)


def _candidate_frame(
    emails: pd.DataFrame, elements: pd.DataFrame, rows: np.ndarray, element_rows: np.ndarray, level: np.ndarray
) -> pd.DataFrame:
    out = pd.DataFrame({
        "email_id": emails["email_id"].to_numpy()[rows],
        "client_id": emails["client_id"].to_numpy()[rows],
        "pos": elements["pos"].to_numpy(np.int64)[element_rows],
        "level": level,
    })
    return out.astype({"client_id": emails["client_id"].dtype, "pos": "int64", "level": "int64"})


def _creditor_reason(n: np.ndarray, level: np.ndarray) -> np.ndarray:
    reason = np.full(len(n), "no creditor of this client matches the sender or creditor name", dtype=object)
    for i in np.flatnonzero(n > 1):
        reason[i] = f"{n[i]} creditors match at level {level[i]}"
    return reason


def _creditor_stats(
    email: np.ndarray, n_emails: int, rows: np.ndarray, element_rows: np.ndarray, level: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per email row: (number of candidates of its email_id, the element row when exactly one else -1, level or 0)."""
    n, element_row = _per_email(email, n_emails, rows, element_rows)
    level_of = np.zeros(n_emails, dtype=np.int64)
    level_of[email[rows]] = level  # one level per email: its first level with candidates
    return n, element_row, level_of[email]


def match_creditors(emails: pd.DataFrame, elements: pd.DataFrame) -> pd.DataFrame:
    """Per email with a matched client: creditor_status, pos and match_level (1..4).

    Level 1 e-mail, 2 name, 3 domain + shared word, 4 shared word only; the first level with
    candidates wins and several candidates there make the creditor ambiguous.
    """
    args = _creditor_args(emails)
    rows, element_rows, level = _creditor_match(*args, elements)
    n, element_row, match_level = _creditor_stats(args[0], args[1], rows, element_rows, level)
    pos = elements["pos"].to_numpy(np.int64)
    out = emails[["email_id"]].copy()
    out["pos"] = _int64_or_na(_take(pos, element_row, 0), n == 1, out.index)
    out["match_level"] = _int64_or_na(match_level, n > 0, out.index)
    out["creditor_status"] = np.select([n == 1, n > 1], ["matched", "ambiguous"], "not_found")
    out.attrs["candidates"] = _candidate_frame(emails, elements, rows, element_rows, level)[["email_id", "client_id", "pos"]]
    out["creditor_reason"] = _creditor_reason(n, match_level)
    return out


def _int64_or_na(values: np.ndarray, present: np.ndarray, index: pd.Index) -> pd.Series:
    out = pd.array(np.where(present, values, 0), dtype="Int64")
    out[~present] = pd.NA
    return pd.Series(out, index=index)


def match(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`emails` with client and creditor match columns, the winning creditor candidates per email).

    The candidates include those of ambiguous emails: such elements are not unclaimed answers.
    """
    ids, clients, elements = _coded(clients, elements)
    matched, candidates = _match(emails.reset_index(drop=True), clients, elements)
    matched["client_id"] = _decoded(ids, matched["client_id"])
    candidates["client_id"] = _decoded(ids, candidates["client_id"])
    return matched, candidates


def _coded(clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.Index, pd.DataFrame, pd.DataFrame]:
    """Client ids as int64 codes (joins on integers, not 24-character strings) and the ids to map back."""
    (client_codes, element_codes), ids = _factorized(clients["client_id"], elements["client_id"])
    if (client_codes < 0).any() or (element_codes < 0).any():
        raise ValueError("client_id must not be missing")
    return ids, clients.assign(client_id=client_codes), elements.assign(client_id=element_codes)


def _decoded(ids: pd.Index, codes: pd.Series) -> pd.Series:
    values = pd.array(codes, dtype="Int64")
    out = np.full(len(values), None, dtype=object)
    present = ~pd.isna(values)
    out[present] = ids.to_numpy(object)[values[present].to_numpy(np.int64)]
    return pd.Series(out, index=codes.index, dtype=object)


def _match(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    client_match = match_clients(emails, clients)
    matched = emails.join(client_match.drop(columns="email_id"))  # same index, one row per email
    found = matched.loc[matched["client_status"] == "matched", ["email_id", "client_id", "from_email_key", "creditor_name"]]
    creditors = match_creditors(found.astype({"client_id": "int64"}), elements)
    candidates = creditors.attrs.pop("candidates")
    return matched.join(creditors.drop(columns="email_id")), candidates


def _email_findings(rows: pd.DataFrame, kind: str, reason: pd.Series) -> pd.DataFrame:
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


def _newest(group: np.ndarray, n_groups: int, received_at: pd.Series, email_id: np.ndarray) -> np.ndarray:
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


def diff(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame, options: DiffOptions) -> tuple[pd.DataFrame, int]:
    """(findings, records_checked): one outer merge of expected and observed amounts, split into kinds.

    `emails` holds the window's synced emails (in_window) plus later or related synced emails, so
    the expected amount of a pair is that of its newest email overall. The match works on row
    numbers and int64 codes; frames are built only for the rows that become findings.
    """
    ids, coded_clients, el = _coded(clients, elements)
    emails = emails.reset_index(drop=True)
    in_window = emails["in_window"].to_numpy(bool)
    email_id = emails["email_id"].to_numpy()

    # Client per email, then creditor per email whose client matched.
    email, n_emails = _email_codes(email_id)
    n_clients, client_row, has_key = _client_match(emails, coded_clients, email, n_emails)
    usable = emails["az_reason"].isna().to_numpy(bool)
    client = _take(coded_clients["client_id"].to_numpy(np.int64), np.where((n_clients == 1) & usable, client_row, -1))
    found = np.flatnonzero(client >= 0)
    cand_rows, cand_elements, cand_level = _creditor_match(
        email[found], n_emails, pd.Series(client[found]), emails["from_email_key"].iloc[found],
        emails["creditor_name"].to_numpy(object)[found], el,
    )
    n_creditors, element_row, level = _creditor_stats(email[found], n_emails, cand_rows, cand_elements, cand_level)

    parts: list[pd.DataFrame] = []
    not_client = np.flatnonzero(in_window & (client < 0))
    ambiguous_client = (n_clients[not_client] > 1) & usable[not_client]
    for at, kind in ((not_client[~ambiguous_client], CLIENT_NOT_FOUND), (not_client[ambiguous_client], AMBIGUOUS_CLIENT)):
        frame = emails.iloc[at].assign(client_id=pd.array([pd.NA] * len(at), dtype="Int64"))
        parts.append(_email_findings(frame, kind, _client_reason(frame["az_reason"], has_key[at], n_clients[at])))
    not_creditor = np.flatnonzero(in_window[found] & (n_creditors != 1))
    ambiguous_creditor = n_creditors[not_creditor] > 1
    for at, kind in ((not_creditor[~ambiguous_creditor], CREDITOR_NOT_FOUND), (not_creditor[ambiguous_creditor], AMBIGUOUS_CREDITOR)):
        frame = emails.iloc[found[at]].assign(client_id=pd.array(client[found[at]], dtype="Int64"))
        reason = pd.Series(_creditor_reason(n_creditors[at], level[at]), index=frame.index)
        parts.append(_email_findings(frame, kind, reason))

    # Expected amount per (client, creditor) pair: the newest matched email overall, for the pairs
    # with a matched email in the window.
    pos = el["pos"].to_numpy(np.int64)
    if len(pos) and pos.min() < 0:
        raise ValueError("negative creditor position")
    element_pair = _pair(el["client_id"].to_numpy(np.int64), pos, int(pos.max()) + 1 if len(pos) else 1)
    paired = np.flatnonzero(n_creditors == 1)  # rows of `found`
    if (np.diff(element_pair) > 0).all():  # pairs unique (prepare_clients' order): the element row is the pair
        pair_group, n_pairs = element_row[paired], len(element_pair)
    else:
        pair_group, pair_values = pd.factorize(element_pair[element_row[paired]])
        n_pairs = len(pair_values)
    checked_pairs = np.zeros(n_pairs, dtype=bool)
    checked_pairs[pair_group[in_window[found[paired]]]] = True
    newest = _newest(pair_group, n_pairs, emails["received_at"].iloc[found[paired]], email_id[found[paired]])[checked_pairs]
    records_checked = len(newest) + len(not_client) + len(not_creditor)

    # The datacompy-style core: one outer merge with an indicator of the expected amounts (one per
    # pair, by email row) against the creditor elements (by element row), on the pair code.
    newest = newest[np.argsort(element_pair[element_row[paired[newest]]])]  # keys in order: a faster merge, same result
    expected = pd.DataFrame({"pair": element_pair[element_row[paired[newest]]], "email_row": found[paired[newest]],
                             "match_level": pd.array(level[paired[newest]], dtype="Int64")})
    observed = pd.DataFrame({"pair": element_pair, "element_row": np.arange(len(el))})
    merged = expected.merge(observed, on="pair", how="outer", indicator=True)
    both = merged[merged["_merge"] == "both"]
    rows, elements_at = both["email_row"].to_numpy(np.int64), both["element_row"].to_numpy(np.int64)
    amount = emails["amount_cents"].array[rows]
    mongo = el["mongo_cents"].array[elements_at]
    pg_ok = ~pd.isna(amount)
    mongo_missing = el["mongo_missing"].to_numpy(bool)[elements_at]
    mongo_ok = ~pd.isna(mongo)
    differs = np.asarray((abs(amount - mongo) > options.tolerance_cents).fillna(False), dtype=bool)
    kind = np.select([~pg_ok, mongo_missing, ~mongo_ok, differs], [1, 2, 3, 4], 0)  # first that applies
    finding = kind > 0
    rows, elements_at = rows[finding], elements_at[finding]
    reason = np.select(
        [~pg_ok[finding], ~mongo_missing[finding] & ~mongo_ok[finding]],
        [emails["amount_reason"].iloc[rows].astype(object).to_numpy(), el["mongo_reason"].iloc[elements_at].astype(object).to_numpy()],
        None,
    )
    compared = pd.concat(
        [emails.iloc[rows][["email_id", "received_at", "amount_cents", "from_email_key"]].reset_index(drop=True),
         el.iloc[elements_at].reset_index(drop=True)],
        axis=1,
    )
    compared = compared.assign(
        match_level=both["match_level"].array[finding], reason=reason,
        kind=np.array(["", INVALID_PG_AMOUNT, MISSING_IN_MONGO, INVALID_MONGO_AMOUNT, DATA_MISMATCH])[kind[finding]],
        creditor_email=compared["sender_email_key"].fillna(compared["from_email_key"]),
        observed_response_at=compared["response_received_at"],
    )

    # A creditor answer in MongoDB inside the window that no synced email maps to.
    mapped = pd.Series(element_pair).isin(element_pair[cand_elements]).to_numpy(bool)
    answered = (el["response_received_at"] >= options.window_start) & (el["response_received_at"] < options.window_end)
    unmapped = np.flatnonzero(~mapped & answered.fillna(False).to_numpy(bool))
    extra = el.iloc[unmapped]
    extra = extra[extra["amount_source"] == "creditor_response"]
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
    findings["client_id"] = _decoded(ids, findings["client_id"])
    findings = _attach_aktenzeichen(findings, clients)
    findings["repairable"] = _repairable(findings, options)
    return findings.reset_index(drop=True), int(records_checked)


def _attach_aktenzeichen(findings: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    az = clients.set_index("client_id")["aktenzeichen"]
    az = az[~az.index.duplicated()]
    findings["aktenzeichen"] = findings["client_id"].map(az).astype(object).fillna(findings["aktenzeichen"].astype(object))
    return findings


def _repairable(findings: pd.DataFrame, options: DiffOptions) -> pd.Series:
    """Repairable kinds, not low confidence unless configured, and never older than MongoDB's answer."""
    level = findings["match_level"].fillna(0).astype(int)
    level_ok = options.repair_low_confidence | (level < LOW_CONFIDENCE_LEVEL)
    observed = pd.to_datetime(findings["observed_response_at"], utc=True)
    expected = pd.to_datetime(findings["received_at"], utc=True)
    newer_in_mongo = (observed > expected).fillna(False).astype(bool)
    repairable = findings["kind"].isin(REPAIRABLE_KINDS)
    findings.loc[repairable & newer_in_mongo, "reason"] = "MongoDB holds a newer creditor answer than the newest synced email"
    findings.loc[repairable & ~level_ok, "reason"] = "low-confidence creditor match (level 4)"
    return (repairable & level_ok & ~newer_in_mongo).astype(bool)
