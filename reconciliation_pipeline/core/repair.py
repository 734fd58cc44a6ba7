"""The repair plan: new `final_creditor_list` values for a compare-and-swap write (plain Python)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from reconciliation_pipeline.core.amounts import cents_to_float, try_cents
from reconciliation_pipeline.core.frames import MISSING

UNCHECKED = object()  # the element's current value is not compared (outbox delivery)

# Audit actions (SCHEMA.md reconciliation_findings.action)
REPAIRED = "repaired"
REPAIR_FAILED = "repair_failed"
SKIPPED_CONCURRENT_CHANGE = "skipped_concurrent_change"
SKIPPED_DRY_RUN = "skipped_dry_run"
SKIPPED_BUDGET = "skipped_budget"
REPORTED = "reported"
SUPERSEDED = "superseded"  # not written: a newer word for the pair exists (PostgreSQL or MongoDB's own answer)


@dataclass(frozen=True)
class ElementUpdate:
    """Set one creditor element's answer to `cents`, if it still looks as observed."""

    key: Hashable
    pos: int
    sender_email: Any
    sender_name: Any
    cents: int
    received_at: datetime
    observed_amount: Any = UNCHECKED
    response_text: str | None = None
    reference_numbers: Sequence[str] | None = None


@dataclass
class Outcome:
    """What happened to one update."""

    action: str
    before_cents: int | None = None
    after_cents: int | None = None
    error: str | None = None
    connection_lost: bool = False


@dataclass
class ClientPlan:
    """The new list for one client document and the updates it carries."""

    observed: list
    new: list
    applied: list[ElementUpdate] = field(default_factory=list)
    conflicts: dict[Hashable, str] = field(default_factory=dict)
    newer: dict[Hashable, str] = field(default_factory=dict)  # not written: the element holds a newer answer
    before: dict[Hashable, int | None] = field(default_factory=dict)


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (an int and a float of equal value count as the same)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def current_amount(element: Any) -> Any:
    """The raw creditor_response_amount of an element, MISSING when absent."""
    return element.get("creditor_response_amount", MISSING) if isinstance(element, Mapping) else MISSING


def _cents_or_none(value: Any) -> int | None:
    return None if value is MISSING or value == MISSING else try_cents(value)[0]


def answered_element(element: Mapping, update: ElementUpdate) -> dict:
    """The element with exactly the fields the application sets for a creditor answer."""
    amount = cents_to_float(update.cents)
    new = dict(element)
    new.update(
        creditor_response_amount=amount,
        current_debt_amount=amount,
        amount_source="creditor_response",
        response_received_at=update.received_at,
        contact_status="responded",
        last_contacted_at=update.received_at,
    )
    if update.response_text is not None:
        new["creditor_response_text"] = update.response_text
    if update.reference_numbers is not None:
        new["response_reference_numbers"] = list(update.reference_numbers)
    return new


def _utc_millis(value: datetime) -> datetime:
    """`value` as MongoDB stores it: UTC, whole milliseconds (a naive value is taken as UTC)."""
    value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def newer_answer(element: Mapping, received_at: datetime) -> str | None:
    """Why writing an answer received at `received_at` would move the element back in time, or None.

    The element's `response_received_at` says when the answer it holds was received; one strictly
    newer (to the millisecond MongoDB keeps) wins over an older statement, whoever wrote it.
    """
    held = element.get("response_received_at")
    if not isinstance(held, datetime) or not isinstance(received_at, datetime):
        return None
    held, received_at = _utc_millis(held), _utc_millis(received_at)
    if held > received_at:
        return (f"MongoDB holds a newer answer (response_received_at {held.isoformat()}) than this one "
                f"({received_at.isoformat()}): not written back in time")
    return None


def plan_client(observed: Sequence, updates: Sequence[ElementUpdate]) -> ClientPlan:
    """Apply `updates` in order to a copy of `observed`; updates whose element changed are conflicts,
    updates older than the answer the element holds are not applied (`newer`)."""
    new = list(observed)
    plan = ClientPlan(observed=list(observed), new=new)
    for update in updates:
        element = new[update.pos] if 0 <= update.pos < len(new) else None
        if not isinstance(element, Mapping):
            plan.conflicts[update.key] = "creditor element no longer exists"
            continue
        if not (_same(element.get("sender_email"), update.sender_email) and _same(element.get("sender_name"), update.sender_name)):
            plan.conflicts[update.key] = "creditor element was replaced"
            continue
        current = current_amount(element)
        if update.observed_amount is not UNCHECKED and not _same(current, update.observed_amount):
            plan.conflicts[update.key] = "creditor_response_amount changed since it was read"
            continue
        newer = newer_answer(element, update.received_at)
        if newer is not None:
            plan.newer[update.key] = newer
            continue
        plan.before[update.key] = _cents_or_none(current)
        new[update.pos] = answered_element(element, update)
        plan.applied.append(update)
    return plan


def verify(read_back: Any, update: ElementUpdate) -> tuple[bool, int | None]:
    """(the read-back element carries the update, its amount in cents)."""
    if not isinstance(read_back, list) or not 0 <= update.pos < len(read_back):
        return False, None
    element = read_back[update.pos]
    if not isinstance(element, Mapping):
        return False, None
    after = _cents_or_none(current_amount(element))
    ok = (
        _carries_answer(element, after, update.cents)
        and _same(element.get("sender_email"), update.sender_email)
        and _same(element.get("sender_name"), update.sender_name)
    )
    return ok, after


def _carries_answer(element: Mapping, amount_cents: int | None, cents: int) -> bool:
    """The element (whose creditor_response_amount is `amount_cents`) holds a creditor answer of `cents`."""
    return (
        amount_cents == cents
        and try_cents(element.get("current_debt_amount"))[0] == cents
        and element.get("amount_source") == "creditor_response"
    )


READ_BACK_LATER = "write sent by a run that ended before its read-back; read back by a later run"


def _address(value: Any) -> str | None:
    return value.strip().lower() or None if isinstance(value, str) else None


def settle_unverified(creditors: Any, pos: int | None, cents: int | None, creditor_email: str | None) -> Outcome:
    """The outcome of a write whose run ended before reading it back, judged from the element now.

    `repaired` only if the element at `pos` is still that creditor and carries the amount sent;
    otherwise `repair_failed` (the next comparison of the pair decides what to do).
    """
    if pos is None or cents is None:
        return Outcome(REPAIR_FAILED, error=f"{READ_BACK_LATER}: not possible, the write's creditor position was not recorded")
    element = creditors[pos] if isinstance(creditors, list) and 0 <= pos < len(creditors) else None
    if not isinstance(element, Mapping):
        return Outcome(REPAIR_FAILED, error=f"{READ_BACK_LATER}: the client document or creditor element is gone")
    recorded, now = _address(creditor_email), _address(element.get("sender_email"))
    if recorded and now and recorded != now:
        return Outcome(REPAIR_FAILED, error=f"{READ_BACK_LATER}: another creditor is at position {pos} now")
    after = _cents_or_none(current_amount(element))
    if _carries_answer(element, after, cents):
        return Outcome(REPAIRED, after_cents=after, error=f"{READ_BACK_LATER}: applied")
    return Outcome(REPAIR_FAILED, after_cents=after, error=f"{READ_BACK_LATER}: MongoDB does not hold the amount sent")
