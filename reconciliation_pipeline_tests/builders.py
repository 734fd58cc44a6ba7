"""Builders for test data in the application's PostgreSQL tables and the portal's MongoDB."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from reconciliation_pipeline.schema import idempotency_keys, incoming_emails, outbox_messages

PARTITION = "2026-11-28-10:00"  # Europe/Berlin: the window ends 2026-11-28 10:00 UTC (11:00 Berlin)
WINDOW_END = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
IN_WINDOW = WINDOW_END - timedelta(hours=2)


def add_email(engine: sa.Engine, *, from_email: str, extracted: Any, received_at: datetime = IN_WINDOW,
              created_at: datetime | None = None, sync_status: str = "synced", raw_json: str | None = None) -> int:
    """Insert an incoming_emails row; `raw_json` stores text that SQLAlchemy's JSON type would re-encode."""
    values = dict(
        zendesk_ticket_id=f"ZD-{uuid.uuid4().hex[:8]}", from_email=from_email, received_at=received_at,
        created_at=created_at or received_at, sync_status=sync_status, processing_status="completed",
    )
    with engine.begin() as conn:
        if raw_json is not None:
            return conn.execute(
                sa.text(
                    "INSERT INTO incoming_emails (zendesk_ticket_id, from_email, received_at, created_at, sync_status, "
                    "processing_status, extracted_data) VALUES (:zendesk_ticket_id, :from_email, :received_at, "
                    ":created_at, :sync_status, :processing_status, CAST(:raw AS json)) RETURNING id"
                ),
                {**values, "raw": raw_json},
            ).scalar_one()
        return conn.execute(incoming_emails.insert().values(**values, extracted_data=extracted).returning(incoming_emails.c.id)).scalar_one()


def add_outbox(engine: sa.Engine, payload: Any, *, aggregate_type: str = "creditor_debt_update", aggregate_id: str = "x",
               created_at: datetime | None = None, **values: Any) -> int:
    with engine.begin() as conn:
        return conn.execute(
            outbox_messages.insert().values(
                aggregate_type=aggregate_type, aggregate_id=aggregate_id, operation="UPDATE", payload=payload,
                idempotency_key=f"k-{uuid.uuid4().hex}", created_at=created_at or datetime.now(timezone.utc), **values,
            ).returning(outbox_messages.c.id)
        ).scalar_one()


def add_key(engine: sa.Engine, key: str, expires_at: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(idempotency_keys.insert().values(key=key, created_at=expires_at - timedelta(days=1), expires_at=expires_at))


def creditor(email: str, amount: Any = None, name: str = "Sparkasse Bochum", **extra: Any) -> dict:
    element = {"sender_name": name, "sender_email": email, "claim_amount": 1500.0, "contact_status": "contacted"}
    if amount is not None:
        element.update(creditor_response_amount=amount, current_debt_amount=amount, amount_source="creditor_response",
                       response_received_at=IN_WINDOW - timedelta(days=10), contact_status="responded")
    element.update(extra)
    return element


def add_client(db: Any, aktenzeichen: Any, creditors: list[dict], first: str = "Max", last: str = "Mustermann") -> Any:
    return db.clients.insert_one(
        {"aktenzeichen": aktenzeichen, "firstName": first, "lastName": last, "final_creditor_list": creditors}
    ).inserted_id


def reply(az: Any = "542900", amount: Any = 1234.56, creditor_name: str = "Sparkasse Bochum", name: Any = "Mustermann, Max", **extra: Any) -> dict:
    data = {"is_creditor_reply": True, "client_name": name, "client_aktenzeichen": az,
            "creditor_name": creditor_name, "debt_amount": amount, "confidence": 0.9}
    data.update(extra)
    return data


def reports(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM reconciliation_reports ORDER BY id")).mappings()]


def findings(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM reconciliation_findings_current ORDER BY id")).mappings()]


def dumps(value: Any) -> str:
    return json.dumps(value)


