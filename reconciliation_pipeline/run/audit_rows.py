"""reconciliation_findings rows of one run: what it found and every write it sent (intent, then outcome)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy.engine import Engine

from reconciliation_pipeline.core import diff as core_diff
from reconciliation_pipeline.core import repair as core_repair
from reconciliation_pipeline.core.outbox import DeliveryRequest
from reconciliation_pipeline.run.types import RunContext
from reconciliation_pipeline.store import postgres as pg

IN_FLIGHT = "write sent, not verified: the run ended before the read-back"


def record_intent(engine: Engine, rows: Sequence[Mapping[str, Any]], writes: Sequence[bool] | None = None) -> list[int]:
    """Append the audit rows of writes about to be sent (all rows, or where `writes`) as not verified; their ids in row order.

    Committed before the write, so a run killed before its read-back still leaves a record of
    what it sent; the verified outcome follows as a row of its own (`record_outcomes`).
    """
    marks = [True] * len(rows) if writes is None else list(writes)
    intent = [{**r, "action": core_repair.REPAIR_FAILED, "error": IN_FLIGHT} if w else dict(r) for r, w in zip(rows, marks)]
    return pg.insert_findings(engine, intent, returning_ids=True)


def record_outcomes(engine: Engine, outcomes: Iterable[tuple[int, core_repair.Outcome]]) -> None:
    """Append the outcome of each write as a new row naming its intent row (the audit table is append-only)."""
    pg.append_finding_outcomes(engine, [
        {"finding_id": finding_id, "action": o.action, "error": o.error, "after": o.after_cents, "before": o.before_cents}
        for finding_id, o in outcomes
    ])


def outcome_of(row: Mapping[str, Any]) -> core_repair.Outcome:
    """The outcome an audit row records (action, error, amounts before and after)."""
    return core_repair.Outcome(row["action"], row["mongo_amount_cents_before"], row["mongo_amount_cents_after"], row["error"])


def without_before(outcome: core_repair.Outcome) -> core_repair.Outcome:
    """A read-back's outcome: what MongoDB holds now, not what it held before the write."""
    return dataclasses.replace(outcome, before_cents=None)


def outbox_row(
    ctx: RunContext, message: Mapping[str, Any], request: DeliveryRequest | None, action: str, error: str | None,
    outcome: core_repair.Outcome | None = None, target: tuple[str, int] | None = None,
) -> dict:
    """The reconciliation_findings row of one outbox message's delivery (target: the element it writes)."""
    return {
        "client_id": target[0] if target else None,
        "creditor_pos": target[1] if target else None,
        "report_id": ctx.report_id,
        "email_id": message["email_id"],
        "outbox_message_id": message["id"],
        "kind": core_diff.OUTBOX_DELIVERY,
        "client_aktenzeichen": request.client_aktenzeichen if request else None,
        "creditor_email": (request.creditor_email or "")[:255] or None if request else None,
        "pg_amount_cents": request.cents if request else None,
        "mongo_amount_cents_before": outcome.before_cents if outcome else None,
        "mongo_amount_cents_after": outcome.after_cents if outcome else None,
        "action": action,
        "error": error,
    }


def finding_rows(ctx: RunContext, findings: pd.DataFrame) -> list[dict]:
    """reconciliation_findings rows for the diff's findings (with their repair action)."""
    if findings.empty:
        return []
    frame = pd.DataFrame(
        {
            "report_id": ctx.report_id,
            "email_id": findings["email_id"].astype(object),
            "kind": findings["kind"],
            "client_aktenzeichen": findings["aktenzeichen"].map(lambda v: v[:255] if isinstance(v, str) else None),
            "creditor_email": findings["creditor_email"].map(lambda v: v[:255] if isinstance(v, str) else None),
            "pg_amount_cents": findings["pg_amount_cents"].astype(object),
            "mongo_amount_cents_before": findings["mongo_amount_cents"].astype(object),
            "mongo_amount_cents_after": findings["mongo_amount_cents_after"].astype(object),
            "action": findings["action"],
            "error": findings["error"].map(lambda v: v if isinstance(v, str) else None),
            "client_id": findings["client_id"].map(lambda v: v if isinstance(v, str) else None),
            "match_level": findings["match_level"].astype(object),
            "creditor_pos": findings["pos"].astype(object),
        }
    )
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict("records")
