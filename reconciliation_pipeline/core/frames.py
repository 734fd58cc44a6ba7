"""Turn raw extracts (PostgreSQL rows, MongoDB documents) into the narrow frames the diff compares."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import pandas as pd

from reconciliation_pipeline.core import keys
from reconciliation_pipeline.core.amounts import try_cents

MISSING = "\x00<creditor_response_amount absent>"  # marker for a missing field (distinct from null)

EMAIL_COLUMNS = ["email_id", "from_email", "received_at", "created_at", "in_window", "extracted_json"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(text: Any) -> dict | None:
    """The JSON object in `text`, or None when it is not an object (numbers stay exact Decimals)."""
    if not isinstance(text, str):
        return text if isinstance(text, dict) else None
    try:
        value = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _amount_columns(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(cents as Int64, reason string) for each raw amount, computed once per distinct value."""
    cache: dict[tuple[type, Any], tuple[int | None, str | None]] = {}
    results = []
    for value in raw:
        try:
            key = (type(value), value)
            hit = cache.get(key)
        except TypeError:  # unhashable (dict, list): rare, never cached
            results.append(try_cents(value))
            continue
        if hit is None:
            hit = cache[key] = try_cents(value)
        results.append(hit)
    cents = pd.array([c for c, _ in results], dtype="Int64")
    reasons = pd.array([r for _, r in results], dtype="string")
    return pd.Series(cents, index=raw.index), pd.Series(reasons, index=raw.index)


def add_email_keys(raw: pd.DataFrame) -> pd.DataFrame:
    """Comparison keys from raw columns from_email, client_aktenzeichen, client_name, creditor_name."""
    out = raw.copy()
    out["from_email_key"] = keys.email_key(raw["from_email"])
    out["domain"] = keys.email_domain(out["from_email_key"])
    out["az_key"], out["az_reason"] = keys.aktenzeichen_key(raw["client_aktenzeichen"])
    out["name_key"] = keys.client_name_key(raw["client_name"])
    out["creditor_name_key"] = keys.text_key(raw["creditor_name"])
    out["creditor_words"] = keys.name_words(raw["creditor_name"])
    return out


def prepare_emails(rows: pd.DataFrame) -> pd.DataFrame:
    """Parse `extracted_data` and add the comparison keys and the amount in cents."""
    if rows.empty:
        rows = pd.DataFrame({c: pd.Series(dtype="object") for c in EMAIL_COLUMNS})
    data = rows["extracted_json"].map(parse_json_object)
    field = lambda name: data.map(lambda d: d.get(name) if isinstance(d, dict) else None).astype(object)  # noqa: E731
    raw = pd.DataFrame(
        {
            "email_id": rows["email_id"].astype("int64"),
            "in_window": rows["in_window"].astype(bool),
            "received_at": pd.to_datetime(rows["received_at"], utc=True),
            "from_email": rows["from_email"].astype(object),
            "client_aktenzeichen": field("client_aktenzeichen"),
            "client_name": field("client_name"),
            "creditor_name": field("creditor_name"),
        },
        index=rows.index,
    )
    out = add_email_keys(raw)
    out["amount_cents"], out["amount_reason"] = _amount_columns(field("debt_amount"))
    return out.drop(columns=["creditor_name"]).reset_index(drop=True)


def _amount_or_missing(element: Mapping) -> Any:
    return element.get("creditor_response_amount", MISSING) if isinstance(element, Mapping) else MISSING


def prepare_clients(documents: Iterable[Mapping]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(clients, creditor elements) frames from MongoDB client documents."""
    docs = list({str(d["_id"]): d for d in documents}.values())
    clients = pd.DataFrame(
        {
            "client_id": pd.Series([str(d["_id"]) for d in docs], dtype="object"),
            "aktenzeichen": pd.Series([d.get("aktenzeichen") for d in docs], dtype="object"),
            "first": pd.Series([d.get("firstName") for d in docs], dtype="object"),
            "last": pd.Series([d.get("lastName") for d in docs], dtype="object"),
        }
    )
    clients["az_key"], _ = keys.aktenzeichen_key(clients["aktenzeichen"])
    clients["name_key"] = keys.person_name_key(clients["first"], clients["last"])
    clients = clients.drop(columns=["first", "last"])

    owner, pos, items = [], [], []
    for d in docs:
        creditors = d.get("final_creditor_list")
        if not isinstance(creditors, list):
            continue
        for i, element in enumerate(creditors):
            owner.append(str(d["_id"]))
            pos.append(i)
            items.append(element if isinstance(element, Mapping) else {})
    get = lambda name: pd.Series([e.get(name) for e in items], dtype="object")  # noqa: E731
    elements = pd.DataFrame({"client_id": pd.Series(owner, dtype="object"), "pos": pd.Series(pos, dtype="int64")})
    elements["observed_sender_email"] = get("sender_email")
    elements["observed_sender_name"] = get("sender_name")
    elements["sender_email_key"] = keys.email_key(elements["observed_sender_email"])
    elements["sender_domain"] = keys.email_domain(elements["sender_email_key"])
    elements["sender_name_key"] = keys.text_key(elements["observed_sender_name"])
    elements["sender_words"] = keys.name_words(elements["observed_sender_name"])
    raw = pd.Series([_amount_or_missing(e) for e in items], dtype="object")
    elements["mongo_raw"] = raw
    elements["mongo_missing"] = raw.map(lambda v: v is None or (isinstance(v, str) and v == MISSING)).astype(bool)
    cents, reasons = _amount_columns(raw.where(~elements["mongo_missing"], None))
    elements["mongo_cents"], elements["mongo_reason"] = cents, reasons
    elements["amount_source"] = get("amount_source")
    elements["response_received_at"] = pd.to_datetime(
        get("response_received_at").map(lambda v: v if hasattr(v, "tzinfo") else None), utc=True
    )
    return clients, elements
