"""Outbox payloads: what a message asks MongoDB to record, or why it never can (plain Python)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
