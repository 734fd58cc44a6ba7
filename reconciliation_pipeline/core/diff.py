"""The vectorised diff of PostgreSQL emails against MongoDB creditor elements (RULES.md section 3), on the matching's rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from reconciliation_pipeline.core import kernel
from reconciliation_pipeline.core.matching import client_reason, coded, creditor_reason, decoded, match_rows

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
# PostgreSQL text cannot hold NUL, so the audit trail could not name such a document exactly (its
# read-back after a killed run would look for another _id): such a document is never written
UNAUDITABLE_ID = "the client document's _id holds a NUL character, which the audit trail cannot record: not written"

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


def diff(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame, options: DiffOptions) -> tuple[pd.DataFrame, int]:
    """(findings, records_checked): one outer merge of expected and observed amounts, split into kinds.

    `emails` holds the window's synced emails (in_window) plus later or related synced emails, so
    the expected amount of a pair is that of its newest email overall. The match works on row
    numbers and int64 codes; frames are built only for the rows that become findings.
    """
    ids, coded_clients, el = coded(clients, elements)
    emails = emails.reset_index(drop=True)
    in_window = emails["in_window"].to_numpy(bool)
    email_id = emails["email_id"].to_numpy()

    # Client per email, then creditor per email whose client matched.
    m = match_rows(emails, coded_clients, el)
    n_clients, has_key, usable = m.clients.n, m.clients.has_key, m.clients.usable
    client, found, cand_elements = m.client, m.found, m.candidate_elements
    n_creditors, element_row, level = m.n_creditors, m.element_row, m.level

    parts: list[pd.DataFrame] = []
    not_client = np.flatnonzero(in_window & (client < 0))
    ambiguous_client = (n_clients[not_client] > 1) & usable[not_client]
    for at, kind in ((not_client[~ambiguous_client], CLIENT_NOT_FOUND), (not_client[ambiguous_client], AMBIGUOUS_CLIENT)):
        frame = emails.iloc[at].assign(client_id=pd.array([pd.NA] * len(at), dtype="Int64"))
        parts.append(_email_findings(frame, kind, client_reason(frame["az_reason"], has_key[at], n_clients[at])))
    not_creditor = np.flatnonzero(in_window[found] & (n_creditors != 1))
    ambiguous_creditor = n_creditors[not_creditor] > 1
    for at, kind in ((not_creditor[~ambiguous_creditor], CREDITOR_NOT_FOUND), (not_creditor[ambiguous_creditor], AMBIGUOUS_CREDITOR)):
        frame = emails.iloc[found[at]].assign(client_id=pd.array(client[found[at]], dtype="Int64"))
        reason = pd.Series(creditor_reason(n_creditors[at], level[at]), index=frame.index)
        parts.append(_email_findings(frame, kind, reason))

    # Expected amount per (client, creditor) pair: the newest matched email overall, for the pairs
    # with a matched email in the window.
    pos = el["pos"].to_numpy(np.int64)
    if len(pos) and pos.min() < 0:
        raise ValueError("negative creditor position")
    element_pair = kernel.pair(el["client_id"].to_numpy(np.int64), pos, int(pos.max()) + 1 if len(pos) else 1)
    paired = np.flatnonzero(n_creditors == 1)  # rows of `found`
    if (np.diff(element_pair) > 0).all():  # pairs unique (prepare_clients' order): the element row is the pair
        pair_group, n_pairs = element_row[paired], len(element_pair)
    else:
        pair_group, pair_values = pd.factorize(element_pair[element_row[paired]])
        n_pairs = len(pair_values)
    checked_pairs = np.zeros(n_pairs, dtype=bool)
    checked_pairs[pair_group[in_window[found[paired]]]] = True
    newest = kernel.newest(pair_group, n_pairs, emails["received_at"].iloc[found[paired]], email_id[found[paired]])[checked_pairs]
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
    findings["client_id"] = decoded(ids, findings["client_id"])
    findings = _attach_aktenzeichen(findings, clients)
    findings["repairable"] = _repairable(findings, options)
    return findings.reset_index(drop=True), int(records_checked)


def _attach_aktenzeichen(findings: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    az = clients.set_index("client_id")["aktenzeichen"]
    az = az[~az.index.duplicated()]
    findings["aktenzeichen"] = findings["client_id"].map(az).astype(object).fillna(findings["aktenzeichen"].astype(object))
    return findings


def _repairable(findings: pd.DataFrame, options: DiffOptions) -> pd.Series:
    """Repairable kinds, not low confidence unless configured, never older than MongoDB's answer, auditable ids."""
    level = findings["match_level"].fillna(0).astype(int)
    level_ok = options.repair_low_confidence | (level < LOW_CONFIDENCE_LEVEL)
    observed = pd.to_datetime(findings["observed_response_at"], utc=True)
    expected = pd.to_datetime(findings["received_at"], utc=True)
    newer_in_mongo = (observed > expected).fillna(False).astype(bool)
    auditable = ~unauditable_ids(findings["client_id"])
    repairable = findings["kind"].isin(REPAIRABLE_KINDS)
    findings.loc[repairable & newer_in_mongo, "reason"] = "MongoDB holds a newer creditor answer than the newest synced email"
    findings.loc[repairable & ~level_ok, "reason"] = "low-confidence creditor match (level 4)"
    findings.loc[repairable & ~auditable, "reason"] = UNAUDITABLE_ID
    return (repairable & level_ok & ~newer_in_mongo & auditable).astype(bool)


def unauditable_ids(client_ids: pd.Series) -> pd.Series:
    """True where a client id holds a NUL character (see UNAUDITABLE_ID)."""
    return client_ids.map(lambda v: isinstance(v, str) and "\x00" in v).astype(bool)
