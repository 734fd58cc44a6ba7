"""Step 1, outbox retry (RULES.md section 1): deliver pending messages oldest first, read back what killed runs sent."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure
from sqlalchemy.engine import Engine

from reconciliation_pipeline import faults
from reconciliation_pipeline.core import diff as core_diff
from reconciliation_pipeline.core import repair as core_repair
from reconciliation_pipeline.core.frames import add_email_keys, prepare_clients
from reconciliation_pipeline.core.keys import last_name_patterns
from reconciliation_pipeline.core.matching import match
from reconciliation_pipeline.core.outbox import (
    DeliveryRequest,
    email_statements,
    message_statements,
    newest_statement,
    parse_payload,
    stated_at,
)
from reconciliation_pipeline.run.audit_rows import IN_FLIGHT, outbox_row, outcome_of, record_intent, record_outcomes, without_before
from reconciliation_pipeline.run.types import Logger, OutboxResult, RunContext
from reconciliation_pipeline.store import mongo as mongo_store
from reconciliation_pipeline.store import postgres as pg


LOW_CONFIDENCE_REFUSED = (
    "creditor matched only by a shared word in the names (low confidence): not written "
    "(repair_low_confidence allows it)"
)
HELD_BACK = "held back: an older message of the same aggregate failed in this run"


def known_statements(conn: Any) -> pd.DataFrame:
    """The outbox's live statements (pending or processed messages with a valid payload), keyed for matching."""
    rows = pg.outbox_statements(conn)
    requests = {r["id"]: request for r in rows if (request := parse_payload(r["payload"])[0]) is not None}
    return add_email_keys(message_statements(rows, requests))


def _statements(
    conn: Any, messages: list[Mapping[str, Any]], requests: Mapping[int, DeliveryRequest], known: pd.DataFrame
) -> pd.DataFrame:
    """The batch's messages (first, in order) and every other statement that may be newer for their pairs:
    other live outbox messages naming the same client or sender, and synced emails of the same senders."""
    batch = add_email_keys(message_statements(messages, requests))
    senders = set(batch["from_email_key"].dropna())
    others = known[~known["source_id"].isin(batch["source_id"])]
    others = others[others["from_email_key"].isin(senders) | others["az_key"].isin(set(batch["az_key"].dropna())) | others["az_key"].isna()]
    since = min(pd.to_datetime(batch["stated_at"], utc=True)).to_pydatetime() if len(batch) else None
    emails = email_statements(pg.synced_email_statements(conn, sorted(senders), since)) if since else None
    frames = [f for f in (batch, others, emails) if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else batch


def _deliver_batch(
    collection: Collection, conn: Any, messages: list[Mapping[str, Any]], requests: Mapping[int, DeliveryRequest],
    known: pd.DataFrame, batch_size: int, announce: Callable[[dict[int, tuple[str, int]]], dict[int, int]],
    low_confidence: bool = False,
) -> tuple[dict[int, core_repair.Outcome], dict[int, str], dict[int, int], dict[int, str]]:
    """Match each message to its client's creditor; close the ones a newer statement supersedes and
    write the others with the shared CAS writer. Returns (outcomes, failures, intent ids, superseded notes)."""
    statements = _statements(conn, messages, requests, known)
    frame = statements.assign(email_id=np.arange(len(statements), dtype=np.int64))
    batch = frame[frame["source"].eq("outbox message") & frame["source_id"].isin([m["id"] for m in messages])]
    try:
        # names only where there is no aktenzeichen: a case-insensitive regex can't use an index.
        # One `$in` for the whole claimed batch (the stand-in answers each `$in` with a collection scan).
        docs = mongo_store.fetch_clients(
            collection, batch["az_key"].dropna(), last_name_patterns(batch.loc[batch["az_key"].isna(), "client_name"]),
            max(batch_size, len(messages)),
        )
    except ConnectionFailure as exc:  # nothing written: every message waits for the next run
        lost = core_repair.Outcome(core_repair.REPAIR_FAILED, error=f"MongoDB unreachable: {type(exc).__name__}", connection_lost=True)
        return {m["id"]: lost for m in messages}, {}, {}, {}
    clients, elements = prepare_clients(docs)
    matched = match(frame.assign(in_window=True), clients, elements)[0]
    resolved = matched[(matched["client_status"] == "matched") & (matched["creditor_status"] == "matched")]
    newest = newest_statement(resolved)
    matched = matched.join(newest)
    by_message = matched.loc[matched["email_id"].isin(batch["email_id"])].set_index("source_id")
    by_id = {str(d["_id"]): d for d in docs}
    updates: dict[str, list[core_repair.ElementUpdate]] = {}
    failures: dict[int, str] = {}
    superseded: dict[int, str] = {}
    failed_aggregates: set[tuple[str, str]] = set()
    for message in messages:  # already in created_at order
        mid, request = message["id"], requests[message["id"]]
        aggregate = (message["aggregate_type"], message["aggregate_id"])
        row = by_message.loc[mid]
        if pd.notna(row["newest_id"]) and not (row["newest_source"] == "outbox message" and row["newest_id"] == mid):
            superseded[mid] = f"superseded by {row['newest_source']} {int(row['newest_id'])}: not written"
            continue
        if aggregate in failed_aggregates:
            failures[mid] = HELD_BACK
            continue
        if row["client_status"] != "matched":
            failures[mid] = f"client {row['client_status']}: {row['client_reason']}"
        elif row["creditor_status"] != "matched":
            failures[mid] = f"creditor {row['creditor_status']}: {row['creditor_reason']}"
        elif "\x00" in row["client_id"]:
            failures[mid] = core_diff.UNAUDITABLE_ID
        elif int(row["match_level"]) >= core_diff.LOW_CONFIDENCE_LEVEL and not low_confidence:
            # as in the repair: a shared word alone (e.g. "GmbH") is not enough to write someone's debt
            failures[mid] = LOW_CONFIDENCE_REFUSED
        if mid in failures:
            failed_aggregates.add(aggregate)
            continue
        element = by_id[row["client_id"]]["final_creditor_list"][int(row["pos"])]
        updates.setdefault(row["client_id"], []).append(
            core_repair.ElementUpdate(
                key=mid, pos=int(row["pos"]), sender_email=element.get("sender_email"),
                sender_name=element.get("sender_name"), cents=request.cents,
                received_at=stated_at(message["email_received_at"], request, message["created_at"]),
                response_text=request.response_text, reference_numbers=request.reference_numbers,
            )
        )
    intent = announce({u.key: (cid, u.pos) for cid, us in updates.items() for u in us}) if updates else {}
    outcomes = mongo_store.write_updates(collection, by_id, updates, batch_size) if updates else {}
    return outcomes, failures, intent, superseded


def retry_outbox(
    engine: Engine, collection_factory: Callable[[], Any], ctx: RunContext, *, mongo_available: bool,
    batch_size: int, mongo_batch_size: int, lock_wait_seconds: int = 300, low_confidence: bool = False, log: Logger,
) -> OutboxResult:
    """Deliver pending outbox messages oldest first, in locked batches; see RULES.md section 1."""
    result = OutboxResult()
    if not mongo_available or ctx.dry_run:
        with engine.connect() as conn:
            result.deferred = pg.count_pending_outbox(conn)
            result.dead = pg.count_dead_outbox(conn)
        result.note = "MongoDB unreachable: nothing attempted" if not mongo_available else "dry run: nothing delivered"
        log.warning(f"outbox: {result.note}; {result.deferred} pending messages deferred")
        return result

    with engine.connect() as conn:
        pending = pg.count_pending_outbox(conn)
        unverified = pg.unverified_writes(conn, IN_FLIGHT, 1)
        if not pending and not unverified:  # nothing to write or read back: do not queue behind another run's repair
            result.dead = pg.count_dead_outbox(conn)
            log.info(f"outbox: nothing pending ({result.dead} dead)")
            return result
    log.info(f"outbox: {pending} pending messages; taking the MongoDB writer lock (waits up to {lock_wait_seconds} s)")
    with pg.advisory_lock(engine, pg.MONGO_WRITER_LOCK, lock_wait_seconds) as locked:
        if not locked:
            with engine.connect() as conn:
                result.deferred = pg.count_pending_outbox(conn)
                result.dead = pg.count_dead_outbox(conn)
            result.note = "another reconciliation run held the MongoDB writer lock: outbox deferred"
            log.warning(f"outbox: {result.note}")
            return result
        try:
            with collection_factory() as collection:
                result.settled = settle_unverified_writes(engine, collection, mongo_batch_size, log)
        except ConnectionFailure as exc:
            log.warning(f"outbox: unverified writes of ended runs not read back: MongoDB unreachable ({type(exc).__name__})")
        _deliver_pending(engine, collection_factory, ctx, batch_size, mongo_batch_size, log, result, low_confidence)
    return result


def settle_unverified_writes(engine: Engine, collection: Collection, batch_size: int, log: Logger, limit: int = 100_000) -> int:
    """Read back the writes that killed runs sent but never verified and record their outcome.

    Only the audit trail changes (an outcome row per write). An outbox message of such a write is still pending and is delivered
    again in its order (writing the same values again if it was applied): marking it delivered here
    could let an older pending message of the same creditor overwrite it afterwards.
    Returns how many audit rows were settled.
    """
    with engine.connect() as conn:
        rows = pg.unverified_writes(conn, IN_FLIGHT, limit)
    if not rows:
        return 0
    documents = mongo_store.fetch_by_ids(collection, sorted({r["client_id"] for r in rows if r["client_id"]}), batch_size)
    outcomes = []
    for row in rows:
        creditors = (documents.get(row["client_id"]) or {}).get("final_creditor_list") if row["client_id"] else None
        # an outbox row names the payload's creditor e-mail, not necessarily the element's: position only
        address = None if row["outbox_message_id"] is not None else row["creditor_email"]
        outcome = core_repair.settle_unverified(creditors, row["creditor_pos"], row["pg_amount_cents"], address)
        outcomes.append((row["id"], without_before(outcome)))
    record_outcomes(engine, outcomes)
    applied = sum(o.action == core_repair.REPAIRED for _, o in outcomes)
    log.warning(
        f"outbox: read back {len(rows)} writes that ended runs left unverified: {applied} applied, "
        f"{len(rows) - applied} not applied (their pairs are compared again, their outbox messages delivered again)"
    )
    return len(rows)


def _deliver_pending(
    engine: Engine, collection_factory: Callable[[], Any], ctx: RunContext, batch_size: int, mongo_batch_size: int,
    log: Logger, result: OutboxResult, low_confidence: bool = False,
) -> None:
    after = pg.START_OF_OUTBOX
    claimed = 0
    blocked_aggregates: set[tuple[str, str]] = set()
    connection_lost = False
    with engine.connect() as conn:  # the live statements a message must be newer than (pending ones too)
        known = known_statements(conn)
    with collection_factory() as collection:
        while not connection_lost:
            with engine.begin() as conn:
                messages = pg.claim_outbox(conn, batch_size, after)
                if not messages:
                    break
                after = (messages[-1]["created_at"], messages[-1]["id"])
                claimed += len(messages)
                audit: list[dict] = []
                requests: dict[int, DeliveryRequest] = {}
                deliverable = []
                for m in messages:
                    aggregate = (m["aggregate_type"], m["aggregate_id"])
                    if aggregate in blocked_aggregates:  # an older message of this email failed: keep order
                        result.deferred += 1
                        continue
                    request, poison = parse_payload(m["payload"])
                    if request is None:
                        result.retried += 1
                        result.failed += 1
                        result.became_dead += int(pg.mark_failed(conn, m["id"], m["email_id"], poison, poison=True))
                        audit.append(outbox_row(ctx, m, None, core_repair.REPAIR_FAILED, poison))
                        continue
                    requests[m["id"]] = request
                    deliverable.append(m)
                def intent_of(targets: dict[int, tuple[str, int]]) -> dict[int, int]:
                    by_mid = {m["id"]: m for m in deliverable}
                    rows = [outbox_row(ctx, by_mid[mid], requests[mid], core_repair.REPAIR_FAILED, None, target=target)
                            for mid, target in targets.items()]
                    return dict(zip(targets, record_intent(engine, rows)))

                outcomes, failures, intent, superseded = (
                    _deliver_batch(collection, conn, deliverable, requests, known, mongo_batch_size, intent_of, low_confidence)
                    if deliverable else ({}, {}, {}, {})
                )
                if outcomes:
                    faults.checkpoint("after_outbox_mongo_write")
                delivered, delivered_emails, superseded_emails = [], [], []
                for m in deliverable:
                    mid = m["id"]
                    outcome = outcomes.get(mid)
                    if outcome is not None and outcome.connection_lost:
                        connection_lost = True
                    if outcome is not None and outcome.action == core_repair.SUPERSEDED:  # MongoDB holds a newer answer
                        superseded[mid] = outcome.error
                    if mid in superseded:  # a newer word for the pair exists: closed, never written
                        result.superseded += 1
                        if m["email_id"] is not None:
                            superseded_emails.append(m["email_id"])
                        audit.append(outbox_row(ctx, m, requests[mid], core_repair.SUPERSEDED, superseded[mid], outcome))
                        continue
                    if failures.get(mid) == HELD_BACK:
                        result.deferred += 1
                        continue
                    if outcome is not None and (outcome.connection_lost or outcome.action == core_repair.SKIPPED_CONCURRENT_CHANGE):
                        # not the message's fault: no retry consumed, delivered again next run
                        result.deferred += 1
                        blocked_aggregates.add((m["aggregate_type"], m["aggregate_id"]))
                        audit.append(outbox_row(ctx, m, requests[mid], outcome.action, outcome.error, outcome))
                        continue
                    result.retried += 1
                    if outcome is not None and outcome.action == core_repair.REPAIRED:
                        result.succeeded += 1
                        delivered.append(mid)
                        if m["email_id"] is not None:
                            delivered_emails.append(m["email_id"])
                        audit.append(outbox_row(ctx, m, requests[mid], core_repair.REPAIRED, None, outcome))
                        continue
                    error = failures.get(mid) or (outcome.error if outcome else "not delivered")
                    result.failed += 1
                    dead = pg.mark_failed(conn, mid, m["email_id"], error, poison=False)
                    result.became_dead += int(dead)
                    if not dead:  # a dead message no longer holds back the newer ones
                        blocked_aggregates.add((m["aggregate_type"], m["aggregate_id"]))
                    else:  # nor does it supersede an older one: it never reached MongoDB
                        known = known[known["source_id"] != mid]
                    audit.append(outbox_row(ctx, m, requests[mid], core_repair.REPAIR_FAILED, error, outcome))
                if delivered:
                    pg.mark_delivered(conn, delivered, delivered_emails)
                if superseded:
                    pg.mark_superseded(conn, superseded, superseded_emails)
            pg.insert_findings(engine, [a for a in audit if a["outbox_message_id"] not in intent])
            record_outcomes(engine, [(intent[a["outbox_message_id"]], outcome_of(a)) for a in audit if a["outbox_message_id"] in intent])
            log.info(
                f"outbox: {claimed} claimed so far, {result.succeeded} delivered, {result.superseded} superseded, "
                f"{result.failed} failed, {result.deferred} deferred"
            )
        if connection_lost:
            result.note = "MongoDB connection lost during delivery: the rest is deferred"
            log.warning(f"outbox: {result.note}")
    with engine.connect() as conn:
        result.dead = pg.count_dead_outbox(conn)
        if connection_lost:
            result.deferred += pg.count_pending_outbox(conn, after)
