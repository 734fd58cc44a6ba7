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


def _shares_word(left: pd.Series, right: pd.Series) -> np.ndarray:
    return np.fromiter((bool(a & b) for a, b in zip(left, right)), dtype=bool, count=len(left))


def _creditor_candidates(emails: pd.DataFrame, elements: pd.DataFrame) -> pd.DataFrame:
    """(email_id, client_id, pos, level) at each email's first level with candidates.

    Level 1 and 2 are equi-joins; only the emails left without a candidate are paired with every
    creditor of their client for the word-based levels 3 and 4.
    """
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
    shared = _shares_word(words, sender_words)
    same_domain = (keys.email_domain(cand["from_email_key"]) == keys.email_domain(cand["sender_email_key"])).fillna(False).to_numpy(bool)
    cand = cand.assign(level=np.select([shared & same_domain, shared], [3, 4], 0))[["email_id", "client_id", "pos", "level"]]
    cand = cand[cand["level"] > 0]
    cand = cand[cand["level"] == cand.groupby("email_id")["level"].transform("min")]
    out = pd.concat([l1, l2, cand], ignore_index=True)
    return out.astype({"client_id": emails["client_id"].dtype, "pos": "int64", "level": "int64"})


def match_creditors(emails: pd.DataFrame, elements: pd.DataFrame) -> pd.DataFrame:
    """Per email with a matched client: creditor_status, pos and match_level (1..4).

    Level 1 e-mail, 2 name, 3 domain + shared word, 4 shared word only; the first level with
    candidates wins and several candidates there make the creditor ambiguous.
    """
    winners = _creditor_candidates(emails, elements)
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
    ids = pd.Index(pd.unique(np.concatenate([clients["client_id"].to_numpy(object), elements["client_id"].to_numpy(object)])))
    return (
        ids,
        clients.assign(client_id=ids.get_indexer(clients["client_id"].to_numpy(object)).astype(np.int64)),
        elements.assign(client_id=ids.get_indexer(elements["client_id"].to_numpy(object)).astype(np.int64)),
    )


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


_PAIR_COLUMNS = ["email_id", "client_id", "pos", "match_level", "received_at", "in_window", "amount_cents", "amount_reason",
                 "from_email_key", "az_key"]


def diff(emails: pd.DataFrame, clients: pd.DataFrame, elements: pd.DataFrame, options: DiffOptions) -> tuple[pd.DataFrame, int]:
    """(findings, records_checked): one outer merge of expected and observed amounts, split into kinds.

    `emails` holds the window's synced emails (in_window) plus later or related synced emails, so
    the expected amount of a pair is that of its newest email overall.
    """
    ids, coded_clients, elements = _coded(clients, elements)
    m, candidates = _match(emails.reset_index(drop=True), coded_clients, elements)
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
    paired = m.loc[m["creditor_status"] == "matched", _PAIR_COLUMNS].sort_values(["received_at", "email_id"])
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
