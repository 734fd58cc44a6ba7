"""Outbox payloads: what a message asks MongoDB to record, or why it never can (plain Python)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from reconciliation_pipeline.core.amounts import try_cents
from reconciliation_pipeline.core.frames import parse_json_object

_MAX_TEXT = 100_000


@dataclass(frozen=True)
class DeliveryRequest:
    """A valid outbox payload, ready to be matched and written."""

    client_aktenzeichen: str | None
    client_name: str | None
    creditor_email: str | None
    creditor_name: str | None
    cents: int
    response_text: str | None
    reference_numbers: tuple[str, ...] | None
    response_received_at: datetime | None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def parse_payload(payload: Any) -> tuple[DeliveryRequest | None, str | None]:
    """(request, None) for a deliverable payload, (None, why it can never succeed) otherwise."""
    data = parse_json_object(payload)
    if data is None:
        return None, "poison: payload is not a JSON object"
    if "new_debt_amount" in data:
        amount_field = "new_debt_amount"
    elif "debt_amount" in data:
        amount_field = "debt_amount"
    else:
        return None, "poison: payload has neither new_debt_amount nor debt_amount"
    cents, reason = try_cents(data[amount_field])
    if cents is None:
        return None, f"poison: invalid {amount_field} ({reason})"
    az = data.get("client_aktenzeichen")
    if az is not None and not isinstance(az, str):
        return None, "poison: client_aktenzeichen is not a plain string"
    if az is not None and "\x00" in az:
        return None, "poison: client_aktenzeichen contains a NUL character"
    if _text(az) is None and _text(data.get("client_name")) is None:
        return None, "poison: payload has no client key (client_aktenzeichen or client_name)"
    if _text(data.get("creditor_email")) is None and _text(data.get("creditor_name")) is None:
        return None, "poison: payload has no creditor key (creditor_email or creditor_name)"
    refs = data.get("reference_numbers")
    refs = tuple(refs) if isinstance(refs, list) and all(isinstance(r, str) for r in refs) else None
    text = data.get("response_text")
    text = text[:_MAX_TEXT] if isinstance(text, str) else None
    received = data.get("response_received_at")
    try:
        received = datetime.fromisoformat(received) if isinstance(received, str) else None
    except ValueError:
        received = None
    if received is not None and received.tzinfo is None:
        received = None
    return (
        DeliveryRequest(
            client_aktenzeichen=_text(az) and az.strip(),
            client_name=_text(data.get("client_name")),
            creditor_email=_text(data.get("creditor_email")),
            creditor_name=_text(data.get("creditor_name")),
            cents=cents,
            response_text=text,
            reference_numbers=refs,
            response_received_at=received,
        ),
        None,
    )


# --- supersession: PostgreSQL's newest word for a (client, creditor) pair wins ------------------

STATEMENT_ORDER = ["stated_at", "email_rank", "created_at", "seq"]
_EARLIEST = pd.Timestamp("1900-01-01", tz="UTC")


def stated_at(email_received_at: datetime | None, request: DeliveryRequest, created_at: datetime) -> datetime:
    """When a message's answer was received: its email's received_at, else the payload's, else created_at.

    It is also the response_received_at the delivery writes, so MongoDB can tell a newer answer.
    """
    return email_received_at or request.response_received_at or created_at


def message_statements(messages: list[Mapping[str, Any]], requests: Mapping[int, DeliveryRequest]) -> pd.DataFrame:
    """Outbox messages as statements: match keys and the order columns (see newest_statement)."""
    rows = [m for m in messages if m["id"] in requests]
    return pd.DataFrame(
        {
            "source": "outbox message",
            "source_id": pd.Series([m["id"] for m in rows], dtype="int64"),
            "stated_at": pd.Series([stated_at(m["email_received_at"], requests[m["id"]], m["created_at"]) for m in rows], dtype=object),
            "email_rank": pd.Series([m["email_id"] or 0 for m in rows], dtype="int64"),
            "created_at": pd.Series([m["created_at"] for m in rows], dtype=object),
            "seq": pd.Series([m["id"] for m in rows], dtype="int64"),
            "from_email": pd.Series([requests[m["id"]].creditor_email for m in rows], dtype=object),
            "client_aktenzeichen": pd.Series([requests[m["id"]].client_aktenzeichen for m in rows], dtype=object),
            "client_name": pd.Series([requests[m["id"]].client_name for m in rows], dtype=object),
            "creditor_name": pd.Series([requests[m["id"]].creditor_name for m in rows], dtype=object),
        }
    )


def email_statements(emails: pd.DataFrame) -> pd.DataFrame:
    """Synced emails, prepared with their match keys (frames.prepare_emails), as statements. An email
    orders before every message of its own (they restate it, later)."""
    return pd.DataFrame(
        {
            "source": "synced email",
            "source_id": emails["email_id"].astype("int64"),
            "stated_at": emails["received_at"],
            "email_rank": emails["email_id"].astype("int64"),
            "created_at": _EARLIEST,
            "seq": 0,
            **{c: emails[c] for c in ("from_email_key", "az_key", "az_reason", "client_name", "creditor_name")},
        }
    )


def newest_statement(statements: pd.DataFrame) -> pd.DataFrame:
    """For each statement that resolved to a creditor element (`client_id`, `pos`), the newest statement
    for that element: columns `newest_source`, `newest_id`, on the input's index.

    Newest = greatest (stated_at, email_rank, created_at, seq): the answer received last; for one
    email, the message created last (then the highest id); an email without a message before its messages.
    """
    order = statements.assign(
        stated_at=pd.to_datetime(statements["stated_at"], utc=True),
        created_at=pd.to_datetime(statements["created_at"], utc=True),
    ).sort_values(STATEMENT_ORDER, kind="mergesort")
    newest = order.groupby(["client_id", "pos"], sort=False).tail(1)
    newest = newest[["client_id", "pos", "source", "source_id"]].rename(columns={"source": "newest_source", "source_id": "newest_id"})
    out = statements[["client_id", "pos"]].reset_index().merge(newest, on=["client_id", "pos"], how="left").set_index("index")
    return out[["newest_source", "newest_id"]].reindex(statements.index)
