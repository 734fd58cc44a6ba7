"""Matching (RULES.md section 2): each email to its client (aktenzeichen, then name) and to one of
that client's creditors (levels 1..4), composed once in `match_rows` for `match` and the diff."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reconciliation_pipeline.core import keys
from reconciliation_pipeline.core.kernel import (
    email_codes, equi_join, factorize_objects, factorized, objects, pair, per_email, small_codes, take,
)

# --- Client match ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientMatch:
    """Per email row: the email_id codes, how many clients its email_id may mean, the client row when
    exactly one (else -1), whether it names a client at all, and whether its aktenzeichen is usable."""

    email: np.ndarray
    n_emails: int
    n: np.ndarray
    client_row: np.ndarray
    has_key: np.ndarray
    usable: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        """Per email row: exactly one client, and no reason against the email's aktenzeichen."""
        return (self.n == 1) & self.usable


def _client_candidates(emails: pd.DataFrame, clients: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(email rows, client rows) of every client an email may mean, and which emails have a key.

    By aktenzeichen; only emails that give no aktenzeichen (and no reason against it) by name, whose
    key is built for those emails only. An aktenzeichen that names no document matches nothing.
    """
    (client_az, email_az), az_values = factorized(clients["az_key"], emails["az_key"])
    email_rows, client_rows = equi_join(email_az, client_az, len(az_values))
    has_key = emails["az_key"].notna().to_numpy(bool, copy=True)
    no_az = np.flatnonzero(~has_key & emails["az_reason"].isna().to_numpy(bool))
    if len(no_az):
        name_key = keys.client_name_key(emails["client_name"].iloc[no_az].astype(object))
        named = no_az[name_key.notna().to_numpy(bool)]
        has_key[named] = True
        (client_name, email_name), name_values = factorized(clients["name_key"], name_key.dropna())
        by_name = equi_join(email_name, client_name, len(name_values))
        email_rows = np.concatenate([email_rows, named[by_name[0]]])
        client_rows = np.concatenate([client_rows, by_name[1]])
    return email_rows, client_rows, has_key


def client_match(emails: pd.DataFrame, clients: pd.DataFrame) -> ClientMatch:
    """The client match of every email row (see ClientMatch)."""
    email, n_emails = email_codes(emails["email_id"])
    email_rows, client_rows, has_key = _client_candidates(emails, clients)
    n, client_row = per_email(email, n_emails, email_rows, client_rows)
    return ClientMatch(email, n_emails, n, client_row, has_key, emails["az_reason"].isna().to_numpy(bool))


def client_reason(az_reason: pd.Series, has_key: np.ndarray, n: np.ndarray) -> pd.Series:
    reason = az_reason.astype(object)
    n = pd.Series(n, index=az_reason.index)
    reason = reason.mask(reason.isna() & ~has_key, "no client_aktenzeichen or client_name")
    reason = reason.mask(reason.isna() & (n == 0), "no client document with this aktenzeichen or name")
    return reason.mask(n > 1, n.astype(str) + " client documents match")


def _client_columns(emails: pd.DataFrame, clients: pd.DataFrame, m: ClientMatch) -> pd.DataFrame:
    """email_id, client_id, client_status, client_reason per email."""
    found = m.matched
    ids = clients["client_id"].to_numpy()
    out = emails[["email_id"]].copy()
    if pd.api.types.is_integer_dtype(clients["client_id"]):
        client_id = pd.array(np.where(found, take(ids.astype(np.int64), m.client_row), 0), dtype="Int64")
        client_id[~found] = pd.NA
    else:
        client_id = np.where(found, take(ids.astype(object), m.client_row, None), np.nan)
    out["client_id"] = pd.Series(client_id, index=out.index, dtype=client_id.dtype)
    out["client_status"] = np.where(m.usable, np.select([m.n == 1, m.n > 1], ["matched", "ambiguous"], "not_found"), "not_found")
    out["client_reason"] = client_reason(emails["az_reason"], m.has_key, m.n)
    return out


def match_clients(emails: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    """Per email: client_status (matched, not_found, ambiguous), client_id, client_reason.

    By aktenzeichen; only emails that give no aktenzeichen are matched by name (whose key is built
    for those emails only). An aktenzeichen that names no document is client_not_found: the result
    never depends on which other documents happen to be read in the same batch.
    """
    return _client_columns(emails, clients, client_match(emails, clients))


# --- Creditor match -------------------------------------------------------------------------------


def _distinct(values: np.ndarray) -> tuple[np.ndarray, pd.Series]:
    """(codes, the distinct values as an object Series) of names: the key functions run once per
    distinct value. A non-string name is no name (-1), as the key functions say of it anyway."""
    try:
        codes, uniques = factorize_objects(values)
    except TypeError:  # an unhashable value (a list or an object from MongoDB)
        codes, uniques = factorize_objects(np.array([v if isinstance(v, str) else None for v in values], dtype=object))
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
    client, element_client = small_codes(client_ids, elements["client_id"])
    (element_key, email_key), key_values = factorized(elements["sender_email_key"], from_keys)
    l1 = equi_join(pair(client, email_key, len(key_values)), pair(element_client, element_key, len(key_values)))
    done = np.zeros(n_emails, dtype=bool)
    done[email[l1[0]]] = True
    rest = np.flatnonzero(~done[email])
    if not len(rest):
        return l1[0], l1[1], np.ones(len(l1[0]), dtype=np.int64)

    # every remaining email with every creditor of its client
    pair_rest, pair_element = equi_join(client[rest], element_client)
    rows = rest[pair_rest]
    needed = np.zeros(len(elements), dtype=bool)
    needed[pair_element] = True
    needed = np.flatnonzero(needed)
    name_codes, names = _distinct(creditor_names[rest])
    sender_codes = np.full(len(elements), -1, dtype=np.int64)
    sender_codes[needed], senders = _distinct(elements["observed_sender_name"].to_numpy(object)[needed])
    (sender_key, name_key), _ = factorized(keys.text_key(senders), keys.text_key(names))
    name = take(name_key, name_codes)[pair_rest]
    level2 = (name >= 0) & (name == take(sender_key, sender_codes)[pair_element])
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
    domain_codes, _ = pd.factorize(keys.email_domain(pd.Series(objects(key_values), dtype=object)).to_numpy(object))
    domain = take(domain_codes.astype(np.int64), email_key)[rows]
    same_domain = (domain >= 0) & (domain == take(domain_codes.astype(np.int64), element_key)[pair_element])
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
    return *email_codes(emails["email_id"]), emails["client_id"], emails["from_email_key"], emails["creditor_name"].to_numpy(object)


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


def creditor_reason(n: np.ndarray, level: np.ndarray) -> np.ndarray:
    reason = np.full(len(n), "no creditor of this client matches the sender or creditor name", dtype=object)
    for i in np.flatnonzero(n > 1):
        reason[i] = f"{n[i]} creditors match at level {level[i]}"
    return reason


def _creditor_stats(
    email: np.ndarray, n_emails: int, rows: np.ndarray, element_rows: np.ndarray, level: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per email row: (number of candidates of its email_id, the element row when exactly one else -1, level or 0)."""
    n, element_row = per_email(email, n_emails, rows, element_rows)
    level_of = np.zeros(n_emails, dtype=np.int64)
    level_of[email[rows]] = level  # one level per email: its first level with candidates
    return n, element_row, level_of[email]


def _int64_or_na(values: np.ndarray, present: np.ndarray, index: pd.Index) -> pd.Series:
    out = pd.array(np.where(present, values, 0), dtype="Int64")
    out[~present] = pd.NA
    return pd.Series(out, index=index)


# --- The match, composed once ---------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """Client and creditor match of every email row, as row numbers and int64 codes.

    `client`: per email row the matched client's code (-1 if none); `found`: the email rows with a
    matched client. The rest is per row of `found`: the winning creditor candidates
    (`candidate_rows` index `found`; `candidate_elements`, `candidate_levels`), and how many
    candidates each has (`n_creditors`), the element row when exactly one (`element_row`) and the level.
    """

    clients: ClientMatch
    client: np.ndarray
    found: np.ndarray
    candidate_rows: np.ndarray
    candidate_elements: np.ndarray
    candidate_levels: np.ndarray
    n_creditors: np.ndarray
    element_row: np.ndarray
    level: np.ndarray


def match_rows(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame) -> Matching:
    """Match every email (RangeIndex) against clients and elements whose client_id are `coded`."""
    cm = client_match(emails, clients)
    client = take(clients["client_id"].to_numpy(np.int64), np.where(cm.matched, cm.client_row, -1))
    found = np.flatnonzero(client >= 0)
    email = cm.email[found]
    rows, element_rows, levels = _creditor_match(
        email, cm.n_emails, pd.Series(client[found]), emails["from_email_key"].iloc[found],
        emails["creditor_name"].to_numpy(object)[found], elements,
    )
    n, element_row, level = _creditor_stats(email, cm.n_emails, rows, element_rows, levels)
    return Matching(cm, client, found, rows, element_rows, levels, n, element_row, level)


def coded(clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.Index, pd.DataFrame, pd.DataFrame]:
    """Client ids as int64 codes (joins on integers, not 24-character strings) and the ids to map back."""
    (client_codes, element_codes), ids = factorized(clients["client_id"], elements["client_id"])
    if (client_codes < 0).any() or (element_codes < 0).any():
        raise ValueError("client_id must not be missing")
    return ids, clients.assign(client_id=client_codes), elements.assign(client_id=element_codes)


def decoded(ids: pd.Index, codes: pd.Series) -> pd.Series:
    values = pd.array(codes, dtype="Int64")
    out = np.full(len(values), None, dtype=object)
    present = ~pd.isna(values)
    out[present] = ids.to_numpy(object)[values[present].to_numpy(np.int64)]
    return pd.Series(out, index=codes.index, dtype=object)


def match(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`emails` with client and creditor match columns, the winning creditor candidates per email).

    Creditor columns are those of the emails with a matched client (level 1 e-mail, 2 name, 3 domain
    + shared word, 4 shared word only; the first level with candidates wins and several candidates
    there make the creditor ambiguous). The candidates include those of ambiguous emails: such
    elements are not unclaimed answers.
    """
    ids, clients, elements = coded(clients, elements)
    emails = emails.reset_index(drop=True)
    m = match_rows(emails, clients, elements)
    matched = emails.join(_client_columns(emails, clients, m.clients).drop(columns="email_id"))  # same index, one row per email
    found = emails.iloc[m.found][["email_id"]].assign(client_id=m.client[m.found])
    pos = elements["pos"].to_numpy(np.int64)
    creditors = pd.DataFrame(index=found.index)
    creditors["pos"] = _int64_or_na(take(pos, m.element_row, 0), m.n_creditors == 1, found.index)
    creditors["match_level"] = _int64_or_na(m.level, m.n_creditors > 0, found.index)
    creditors["creditor_status"] = np.select([m.n_creditors == 1, m.n_creditors > 1], ["matched", "ambiguous"], "not_found")
    creditors["creditor_reason"] = creditor_reason(m.n_creditors, m.level)
    candidates = _candidate_frame(found, elements, m.candidate_rows, m.candidate_elements, m.candidate_levels)[["email_id", "client_id", "pos"]]
    matched = matched.join(creditors)
    matched["client_id"] = decoded(ids, matched["client_id"])
    candidates["client_id"] = decoded(ids, candidates["client_id"])
    return matched, candidates
