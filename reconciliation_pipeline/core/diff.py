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


def match_clients(emails: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    """Per email: client_status (matched, not_found, ambiguous), client_id, client_reason.

    By aktenzeichen; only emails that give no aktenzeichen are matched by name (whose key is built
    for those emails only). An aktenzeichen that names no document is client_not_found: the result
    never depends on which other documents happen to be read in the same batch.
    """
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
    out["client_id"] = out["email_id"].map(counts["first"]).astype(object).where(out["n"] == 1)
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


def _shares_word(left: pd.Series, right: pd.Series) -> np.ndarray:
    return np.fromiter((bool(a & b) for a, b in zip(left, right)), dtype=bool, count=len(left))


def _creditor_candidates(emails: pd.DataFrame, elements: pd.DataFrame) -> pd.DataFrame:
    """(email_id, client_id, pos, level) at each email's first level with candidates.

    Level 1 and 2 are equi-joins; only the emails left without a candidate are paired with every
    creditor of their client for the word-based levels 3 and 4.
    """
    el = elements[["client_id", "pos", "sender_email_key"]]
    l1 = emails[["email_id", "client_id", "from_email_key"]].dropna(subset=["from_email_key"]).merge(
        el.dropna(subset=["sender_email_key"]), left_on=["client_id", "from_email_key"], right_on=["client_id", "sender_email_key"]
    )[["email_id", "client_id", "pos"]].assign(level=1)
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
    shared = _shares_word(words, sender_words)
    same_domain = (keys.email_domain(cand["from_email_key"]) == keys.email_domain(cand["sender_email_key"])).fillna(False).to_numpy(bool)
    cand = cand.assign(level=np.select([shared & same_domain, shared], [3, 4], 0))[["email_id", "client_id", "pos", "level"]]
    cand = cand[cand["level"] > 0]
    cand = cand[cand["level"] == cand.groupby("email_id")["level"].transform("min")]
    return pd.concat([l1, l2, cand], ignore_index=True).astype({"client_id": object, "pos": "Int64", "level": "int64"})


def match_creditors(emails: pd.DataFrame, elements: pd.DataFrame) -> pd.DataFrame:
    """Per email with a matched client: creditor_status, pos and match_level (1..4).

    Level 1 e-mail, 2 name, 3 domain + shared word, 4 shared word only; the first level with
    candidates wins and several candidates there make the creditor ambiguous.
    """
    emails = emails.astype({"client_id": object})
    winners = _creditor_candidates(emails, elements.astype({"client_id": object}))
    stats = winners.groupby("email_id").agg(n=("pos", "size"), pos=("pos", "first"), level=("level", "first"))

    out = emails[["email_id"]].copy()
    out["n"] = out["email_id"].map(stats["n"]).fillna(0).astype(int)
    out["pos"] = out["email_id"].map(stats["pos"]).where(out["n"] == 1).astype("Int64")
    out["match_level"] = out["email_id"].map(stats["level"]).astype("Int64")
    out["creditor_status"] = np.select([out["n"] == 1, out["n"] > 1], ["matched", "ambiguous"], "not_found")
    out.attrs["candidates"] = winners[["email_id", "client_id", "pos"]].reset_index(drop=True)
    out["creditor_reason"] = np.where(
        out["n"] > 1,
        out["n"].astype(str) + " creditors match at level " + out["match_level"].astype(str),
        "no creditor of this client matches the sender or creditor name",
    )
    return out.drop(columns="n")


def match(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`emails` with client and creditor match columns, the winning creditor candidates per email).

    The candidates include those of ambiguous emails: such elements are not unclaimed answers.
    """
    client_match = match_clients(emails, clients)
    matched = emails.merge(client_match, on="email_id", how="left")
    found = matched[matched["client_status"] == "matched"]
    creditors = match_creditors(found, elements)
    candidates = creditors.attrs.pop("candidates")
    return matched.merge(creditors, on="email_id", how="left"), candidates


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
    the expected amount of a pair is that of its newest email overall.
    """
    m, candidates = match(emails, clients, elements)
    window = m[m["in_window"]]
    parts: list[pd.DataFrame] = []

    not_client = window[window["client_status"] != "matched"]
    for status, kind in (("not_found", CLIENT_NOT_FOUND), ("ambiguous", AMBIGUOUS_CLIENT)):
        rows = not_client[not_client["client_status"] == status]
        parts.append(_email_findings(rows, kind, rows["client_reason"]))
    not_creditor = window[(window["client_status"] == "matched") & (window["creditor_status"] != "matched")]
    for status, kind in (("not_found", CREDITOR_NOT_FOUND), ("ambiguous", AMBIGUOUS_CREDITOR)):
        rows = not_creditor[not_creditor["creditor_status"] == status]
        parts.append(_email_findings(rows, kind, rows["creditor_reason"]))

    # Expected amount per (client, creditor) pair: the newest matched email overall.
    paired = m[m["creditor_status"] == "matched"].sort_values(["received_at", "email_id"])
    window_pairs = paired.loc[paired["in_window"], ["client_id", "pos"]].drop_duplicates()
    newest = paired.drop_duplicates(["client_id", "pos"], keep="last").merge(window_pairs, on=["client_id", "pos"])
    newest = newest.astype({"client_id": object, "pos": "Int64"})
    records_checked = len(newest) + len(not_client) + len(not_creditor)

    # The datacompy-style core: one outer merge with an indicator against the creditor elements.
    el = elements.astype({"client_id": object, "pos": "Int64"})
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
    mapped = candidates[["client_id", "pos"]].drop_duplicates().astype({"client_id": object, "pos": "Int64"}).assign(_mapped=True)
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
