"""One reconciliation run's steps as plain functions over an engine and a collection (no Dagster).

The ops in `ops.py` are thin wrappers that pass resources, the partition window and a logger.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure
from sqlalchemy.engine import Engine

from reconciliation_pipeline import faults, ledger
from reconciliation_pipeline.core import diff as core_diff
from reconciliation_pipeline.core import repair as core_repair
from reconciliation_pipeline.core.frames import add_email_keys, prepare_clients, prepare_emails
from reconciliation_pipeline.core.keys import client_name_key, last_name_patterns, route_key
from reconciliation_pipeline.core.outbox import (
    DeliveryRequest,
    email_statements,
    message_statements,
    newest_statement,
    parse_payload,
    stated_at,
)
from reconciliation_pipeline.store import mongo as mongo_store
from reconciliation_pipeline.store import postgres as pg

Logger = logging.Logger | Any  # Dagster's DagsterLogManager has the same interface
IN_FLIGHT = "write sent, not verified: the run ended before the read-back"


@dataclass(frozen=True)
class RunContext:
    """What every step of one run needs to know."""

    report_id: int
    run_id: str
    partition_key: str | None
    window_start: datetime
    window_end: datetime
    dry_run: bool


def window_for(partition_end: datetime, lookback_hours: int) -> tuple[datetime, datetime]:
    """[end - lookback, end) in UTC for the partition that ends at `partition_end`.

    Converted to UTC first: arithmetic on zoneinfo datetimes is wall-clock and would be an hour
    off across a DST change.
    """
    end = partition_end.astimezone(timezone.utc)
    return end - timedelta(hours=lookback_hours), end


def _progress(log: Logger, what: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if total <= 1:
            return
        if done == total or done % max(1, total // 10) == 0:
            log.info(f"{what}: batch {done}/{total}")

    return report


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"


# --- 1. outbox retry ----------------------------------------------------------------------------

@dataclass
class OutboxResult:
    """Counts of one outbox retry pass."""

    retried: int = 0
    succeeded: int = 0
    failed: int = 0
    deferred: int = 0
    dead: int = 0
    became_dead: int = 0
    superseded: int = 0  # closed unwritten: a newer statement for the pair exists
    settled: int = 0  # writes of ended runs read back (see settle_unverified_writes)
    note: str | None = None


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
    known: pd.DataFrame, batch_size: int, record_intent: Callable[[dict[int, tuple[str, int]]], dict[int, int]],
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
    matched = core_diff.match(frame.assign(in_window=True), clients, elements)[0]
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
    intent = record_intent({u.key: (cid, u.pos) for cid, us in updates.items() for u in us}) if updates else {}
    outcomes = mongo_store.write_updates(collection, by_id, updates, batch_size) if updates else {}
    return outcomes, failures, intent, superseded


def retry_outbox(
    engine: Engine, collection_factory: Callable[[], Any], mongo_available: bool, ctx: RunContext,
    batch_size: int, mongo_batch_size: int, log: Logger, lock_wait_seconds: int = 300, low_confidence: bool = False,
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
        outcomes.append({"finding_id": row["id"], "action": outcome.action, "error": outcome.error,
                         "after": outcome.after_cents, "before": None})
    pg.append_finding_outcomes(engine, outcomes)
    applied = sum(o["action"] == core_repair.REPAIRED for o in outcomes)
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
                        audit.append(_outbox_audit(ctx, m, None, core_repair.REPAIR_FAILED, poison))
                        continue
                    requests[m["id"]] = request
                    deliverable.append(m)
                def record_intent(targets: dict[int, tuple[str, int]]) -> dict[int, int]:
                    # audit rows before the write, so that a run killed before its commit leaves a record
                    by_mid = {m["id"]: m for m in deliverable}
                    rows = [_outbox_audit(ctx, by_mid[mid], requests[mid], core_repair.REPAIR_FAILED, IN_FLIGHT, target=target)
                            for mid, target in targets.items()]
                    return dict(zip(targets, pg.insert_findings(engine, rows, returning_ids=True)))

                outcomes, failures, intent, superseded = (
                    _deliver_batch(collection, conn, deliverable, requests, known, mongo_batch_size, record_intent, low_confidence)
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
                        audit.append(_outbox_audit(ctx, m, requests[mid], core_repair.SUPERSEDED, superseded[mid], outcome))
                        continue
                    if failures.get(mid) == HELD_BACK:
                        result.deferred += 1
                        continue
                    if outcome is not None and (outcome.connection_lost or outcome.action == core_repair.SKIPPED_CONCURRENT_CHANGE):
                        # not the message's fault: no retry consumed, delivered again next run
                        result.deferred += 1
                        blocked_aggregates.add((m["aggregate_type"], m["aggregate_id"]))
                        audit.append(_outbox_audit(ctx, m, requests[mid], outcome.action, outcome.error, outcome))
                        continue
                    result.retried += 1
                    if outcome is not None and outcome.action == core_repair.REPAIRED:
                        result.succeeded += 1
                        delivered.append(mid)
                        if m["email_id"] is not None:
                            delivered_emails.append(m["email_id"])
                        audit.append(_outbox_audit(ctx, m, requests[mid], core_repair.REPAIRED, None, outcome))
                        continue
                    error = failures.get(mid) or (outcome.error if outcome else "not delivered")
                    result.failed += 1
                    dead = pg.mark_failed(conn, mid, m["email_id"], error, poison=False)
                    result.became_dead += int(dead)
                    if not dead:  # a dead message no longer holds back the newer ones
                        blocked_aggregates.add((m["aggregate_type"], m["aggregate_id"]))
                    else:  # nor does it supersede an older one: it never reached MongoDB
                        known = known[known["source_id"] != mid]
                    audit.append(_outbox_audit(ctx, m, requests[mid], core_repair.REPAIR_FAILED, error, outcome))
                if delivered:
                    pg.mark_delivered(conn, delivered, delivered_emails)
                if superseded:
                    pg.mark_superseded(conn, superseded, superseded_emails)
            pg.insert_findings(engine, [a for a in audit if a["outbox_message_id"] not in intent])
            pg.append_finding_outcomes(engine, [
                {"finding_id": intent[a["outbox_message_id"]], "action": a["action"], "error": a["error"],
                 "after": a["mongo_amount_cents_after"], "before": a["mongo_amount_cents_before"]}
                for a in audit if a["outbox_message_id"] in intent
            ])
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


def _outbox_audit(
    ctx: RunContext, message: Mapping[str, Any], request: DeliveryRequest | None, action: str, error: str | None,
    outcome: core_repair.Outcome | None = None, target: tuple[str, int] | None = None,
) -> dict:
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


# --- 2. extract -----------------------------------------------------------------------------------

def _prepared(chunks: Any, log: Logger, what: str) -> pd.DataFrame:
    frames, rows = [], 0
    for chunk in chunks:  # parse each chunk at once so the JSON text never piles up
        frames.append(prepare_emails(chunk))
        rows += len(chunk)
        log.info(f"extract postgres: {rows} {what} rows read")
    return pd.concat(frames, ignore_index=True) if frames else prepare_emails(pd.DataFrame())


def extract_postgres(engine: Engine, ctx: RunContext, log: Logger, chunk_rows: int = 100_000) -> pd.DataFrame:
    """The window's synced emails plus the later/related ones, parsed into narrow comparison frames."""
    window = _prepared(pg.copy_window_emails(engine, ctx.window_start, ctx.window_end, chunk_rows), log, "window")
    if window.empty:
        log.info("extract postgres: no synced emails with a debt_amount in the window")
        return window
    senders = sorted(window["from_email_key"].dropna().unique())
    min_received = window["received_at"].min().to_pydatetime()
    related = _prepared(
        pg.copy_related_emails(engine, ctx.window_start, ctx.window_end, senders, min_received, chunk_rows), log, "related"
    )
    emails = pd.concat([window, related], ignore_index=True) if len(related) else window  # strings shared per chunk
    log.info(f"extract postgres: {len(window)} emails in the window, {len(related)} related emails")
    return emails


@dataclass
class DiffResult:
    """The window's findings; `mongo_available` False means the comparison was skipped."""

    findings: pd.DataFrame
    records_checked: int
    mongo_available: bool
    note: str | None = None
    compared: pd.DataFrame | None = None  # the window emails' pairs the comparison covered (ledger.compared_pairs)

    @classmethod
    def skipped(cls, note: str | None) -> DiffResult:
        """No comparison: MongoDB was unreachable."""
        return cls(pd.DataFrame(columns=core_diff.FINDING_COLUMNS), 0, False, note)


def _concat_findings(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=core_diff.FINDING_COLUMNS)


@dataclass
class MongoShard:
    """One slice of the comparison: the emails routed to it and the aktenzeichen whose documents it reads.

    Every email is routed to an aktenzeichen (its own, or that of the one client its name matches)
    and each aktenzeichen to one shard by a stable hash, so a client's emails and documents always
    meet in the same batch. Emails without a route and the documents found by name go to shard 0.
    """

    index: int
    count: int
    emails: pd.DataFrame
    aktenzeichen: tuple[str, ...]
    named_documents: list = field(default_factory=list)
    full_scan: bool = False
    named_keys: frozenset = frozenset()  # full scan: name keys of the emails to resolve during the pass
    available: bool = True
    error: str | None = None


def _slot(value: str, count: int) -> int:
    return zlib.crc32(value.encode("utf-8", "surrogatepass")) % count


def route_emails(
    collection: Collection, emails: pd.DataFrame, count: int, batch_size: int, full_scan_ratio: float, log: Logger
) -> list[MongoShard]:
    """Route every email to a client document's key and split the window into `count` shards by its hash.

    An email's route is its aktenzeichen; one without is looked up by last name first and, if
    exactly one client matches, goes with that client's key (keys.route_key). Unrouted emails and
    the documents found by name go to shard 0, so a client never lands in two batches. When the
    window names most of the collection, the documents are read in one sorted pass instead and the
    names are resolved during that pass (no separate name query).
    """
    emails = emails.assign(route=emails["az_key"].astype(object).where(emails["az_key"].notna(), None))
    named = emails[emails["az_key"].isna() & emails["az_reason"].isna() & emails["client_name"].notna()]
    named_docs: list = []
    try:
        documents = collection.estimated_document_count() if count == 1 and full_scan_ratio <= 1 else 0
        full_scan = count == 1 and documents > 0 and emails["az_key"].nunique() >= full_scan_ratio * documents
        if len(named) and not full_scan:
            named_docs = mongo_store.fetch_clients(collection, (), last_name_patterns(named["client_name"]), batch_size)
            clients, _ = prepare_clients(named_docs)
            clients["route"] = [route_key(a, c) for a, c in zip(clients["aktenzeichen"], clients["client_id"])]
            found = core_diff.match_clients(named, clients)
            found = found[found["client_status"] == "matched"].merge(clients[["client_id", "route"]], on="client_id")
            by_email = found.set_index("email_id")["route"]
            hit = emails["email_id"].isin(by_email.index)
            emails.loc[hit, "route"] = emails.loc[hit, "email_id"].map(by_email)
            log.info(f"route: {len(named)} emails without aktenzeichen, {len(found)} matched by name, {len(named_docs)} documents")
    except ConnectionFailure as exc:
        log.warning(f"route: MongoDB unreachable ({type(exc).__name__}); comparison skipped")
        return [MongoShard(0, 1, emails.iloc[:0], (), available=False, error=f"MongoDB unreachable: {type(exc).__name__}")]
    slots = np.fromiter((_route_slot(r, count) for r in emails["route"]), dtype=np.int64, count=len(emails))
    keys = sorted({r for r in emails["route"] if r is not None and not r.startswith("\x00")})
    named_keys = frozenset(client_name_key(named["client_name"]).dropna()) if full_scan else frozenset()
    if full_scan:
        log.info(f"route: the window names {len(keys)} of about {documents} client documents: one sorted pass over the "
                 f"collection, {len(named)} emails without aktenzeichen resolved by name during it")
    return [
        MongoShard(i, count, emails[slots == i].reset_index(drop=True), tuple(k for k in keys if _route_slot(k, count) == i),
                   named_docs if i == 0 else [], full_scan, named_keys)
        for i in range(count)
    ]


def _route_slot(route: str | None, count: int) -> int:
    # unrouted emails and documents without a usable aktenzeichen belong to shard 0
    return 0 if count == 1 or route is None or route.startswith("\x00") else _slot(route, count)


def compare_shard(collection: Collection, shard: MongoShard, ctx: RunContext, options: core_diff.DiffOptions, batch_size: int, log: Logger) -> DiffResult:
    """Read one shard's client documents in batches and diff each batch against the emails routed to it.

    Memory stays bounded by the batch: its documents become narrow frames, are compared with their
    emails, and only the findings are kept. Each document's unclaimed answers (extra_in_mongo) are
    judged once, by the batch that owns the document.
    """
    if not shard.available:
        return DiffResult.skipped(shard.error)
    emails, routes = shard.emails, shard.emails["route"]
    parts: list[pd.DataFrame] = []
    checked = 0
    seen: set[str] = set()  # documents whose extras have been judged
    routed: set[str] = set()

    def compare(clients: pd.DataFrame, elements: pd.DataFrame, batch_emails: pd.DataFrame, owned: set[str] | None = None) -> None:
        nonlocal checked
        findings, n = core_diff.diff(batch_emails, clients, elements, options)
        if owned is not None:
            findings = findings[(findings["kind"] != core_diff.EXTRA_IN_MONGO) | findings["client_id"].isin(owned)]
        parts.append(findings)
        checked += n
        seen.update(clients["client_id"] if owned is None else owned)

    held: list = []  # full scan: documents a name-only email may mean, compared at the end with those emails
    try:
        if shard.full_scan:
            batches = mongo_store.iter_all_clients(collection, batch_size)
        else:
            batches = mongo_store.iter_clients_by_aktenzeichen(collection, shard.aktenzeichen, batch_size)
        batches = mongo_store.prefetched(batches)
        total = max(1, -(-len(shard.aktenzeichen) // batch_size))
        progress = _progress(log, f"compare shard {shard.index}")
        for done, (keys, docs) in enumerate(batches, start=1):
            clients, elements = prepare_clients(docs)
            if shard.named_keys:
                clients, elements, keys = _hold_back_named(clients, elements, docs, keys, shard.named_keys, held)
            routed.update(keys)
            compare(clients, elements, emails[routes.isin(keys)])
            progress(min(done, total), total)
        # unrouted emails, emails naming an aktenzeichen no document has, and the documents found by name
        rest = emails[~routes.isin(routed)]
        if len(rest) or shard.named_documents or held:
            clients, elements = prepare_clients(held if shard.full_scan else shard.named_documents)
            if shard.full_scan:
                owned: set[str] = set(clients["client_id"])  # held back: compared nowhere else
            else:
                owned = {str(d["_id"]) for d in shard.named_documents if mongo_store.document_route(d).startswith("\x00")}
            compare(clients, elements, rest, owned - seen)
        if not shard.full_scan:  # documents with an answer in the window that no email of the window names
            unseen = [
                d["_id"] for d in mongo_store.iter_answered_since(collection, ctx.window_start)
                if str(d["_id"]) not in seen and _route_slot(mongo_store.document_route(d), shard.count) == shard.index
            ]
            for docs in mongo_store.iter_by_ids(collection, unseen, batch_size):
                compare(*prepare_clients(docs), emails.iloc[:0])
    except ConnectionFailure as exc:
        log.warning(f"compare: MongoDB unreachable ({type(exc).__name__}); comparison skipped")
        return DiffResult.skipped(f"MongoDB unreachable: {type(exc).__name__}")
    result = DiffResult(_concat_findings(parts), checked, True, compared=ledger.compared_pairs(emails))
    counts = result.findings["kind"].value_counts().to_dict() if len(result.findings) else {}
    log.info(f"compare shard {shard.index}: {len(seen)} client documents, {checked} pairs compared, "
             f"{len(result.findings)} findings ({_counts(counts)})")
    return result


def _hold_back_named(
    clients: pd.DataFrame, elements: pd.DataFrame, docs: list, keys: list[str], named_keys: frozenset, held: list
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Take the documents a name-only email may mean out of a full-pass batch (into `held`), with
    every document of their aktenzeichen, so that they are compared once, with all their emails."""
    routes = pd.Series([route_key(a, c) for a, c in zip(clients["aktenzeichen"], clients["client_id"])], index=clients.index)
    hold = set(routes[clients["name_key"].isin(named_keys)])
    if not hold:
        return clients, elements, keys
    held += [d for d in docs if mongo_store.document_route(d) in hold]
    keep = ~routes.isin(hold)
    return clients[keep], elements[elements["client_id"].isin(clients.loc[keep, "client_id"])], [k for k in keys if k not in hold]


def merge_diffs(results: list[DiffResult]) -> DiffResult:
    """One result from the shards' results (any shard without MongoDB makes the comparison skipped)."""
    down = [r for r in results if not r.mongo_available]
    if down:
        return DiffResult.skipped(down[0].note)
    compared = [r.compared for r in results if r.compared is not None]
    return DiffResult(_concat_findings([r.findings for r in results]), sum(r.records_checked for r in results), True,
                      compared=pd.concat(compared, ignore_index=True) if compared else None)


def compare(
    collection: Collection, emails: pd.DataFrame, ctx: RunContext, options: core_diff.DiffOptions,
    batch_size: int, log: Logger, shards: int = 1, full_scan_ratio: float = 0.5,
) -> DiffResult:
    """Route, then compare every shard in this process (the ops run the shards in parallel)."""
    routed = route_emails(collection, emails, shards, batch_size, full_scan_ratio, log)
    return merge_diffs([compare_shard(collection, shard, ctx, options, batch_size, log) for shard in routed])


def diff_options(ctx: RunContext, tolerance_cents: int, repair_low_confidence: bool) -> core_diff.DiffOptions:
    """The diff's options for this run's window."""
    return core_diff.DiffOptions(ctx.window_start, ctx.window_end, tolerance_cents, repair_low_confidence)


# --- 4. repair ------------------------------------------------------------------------------------

@dataclass
class RepairResult:
    """Findings with their action and audit columns, and whether the budget halted repairs."""

    findings: pd.DataFrame
    records_checked: int
    mongo_available: bool
    repairs_halted: bool = False
    repairable: int = 0
    note: str | None = None
    compared: pd.DataFrame | None = None  # DiffResult.compared


def _updates_from_findings(findings: pd.DataFrame) -> dict[str, list[core_repair.ElementUpdate]]:
    todo = findings[findings["repairable"]]
    updates: dict[str, list[core_repair.ElementUpdate]] = {}
    for key, client_id, pos, email, name, cents, received, observed in zip(
        todo.index, todo["client_id"], todo["pos"], todo["observed_sender_email"], todo["observed_sender_name"],
        todo["pg_amount_cents"], todo["received_at"], todo["mongo_raw"],
    ):
        updates.setdefault(client_id, []).append(
            core_repair.ElementUpdate(
                key=int(key), pos=int(pos), sender_email=None if pd.isna(email) else email,
                sender_name=None if pd.isna(name) else name, cents=int(cents),
                received_at=pd.Timestamp(received).to_pydatetime(), observed_amount=observed,
            )
        )
    return updates


def repair(
    engine: Engine, collection_factory: Callable[[], Any], diff: DiffResult, ctx: RunContext,
    max_repairs: int, lock_wait_seconds: int, batch_size: int, log: Logger,
) -> RepairResult:
    """Write PostgreSQL's amounts into MongoDB for the repairable findings (CAS, read back, audited).

    The audit rows go in before the first write (repairable ones as not verified) and are updated
    with each verified outcome, so a run killed mid-write still leaves a record of what it sent.
    """
    findings = diff.findings.copy()
    findings["action"] = core_repair.REPORTED
    findings["error"] = findings["reason"] if len(findings) else None
    findings["mongo_amount_cents_after"] = pd.array([pd.NA] * len(findings), dtype="Int64")
    repairable = findings["repairable"].astype(bool) if len(findings) else pd.Series(dtype=bool)
    result = RepairResult(findings, diff.records_checked, diff.mongo_available, repairable=int(repairable.sum()), note=diff.note,
                          compared=diff.compared)
    if result.repairable and ctx.dry_run:
        findings.loc[repairable, "action"] = core_repair.SKIPPED_DRY_RUN
        log.info(f"repair: dry run, {result.repairable} repairable findings left as they are")
    elif result.repairable > max_repairs:
        findings.loc[repairable, "action"] = core_repair.SKIPPED_BUDGET
        result.repairs_halted = True
        result.note = f"{result.repairable} repairable findings exceed max_repairs={max_repairs}: nothing repaired"
        log.error(f"repair: {result.note}")
    elif result.repairable:
        _write_repairs(engine, collection_factory, findings, repairable, ctx, lock_wait_seconds, batch_size, log, result)
        return result
    pg.insert_findings(engine, audit_rows(ctx, findings))
    return result


def _write_repairs(
    engine: Engine, collection_factory: Callable[[], Any], findings: pd.DataFrame, repairable: pd.Series,
    ctx: RunContext, lock_wait_seconds: int, batch_size: int, log: Logger, result: RepairResult,
) -> None:
    log.info(f"repair: {result.repairable} repairable findings; taking the MongoDB writer lock (waits up to {lock_wait_seconds} s)")
    with pg.advisory_lock(engine, pg.MONGO_WRITER_LOCK, lock_wait_seconds) as locked:
        if not locked:
            findings.loc[repairable, "action"] = core_repair.SKIPPED_CONCURRENT_CHANGE
            findings.loc[repairable, "error"] = "another reconciliation run held the MongoDB writer lock"
            result.note = "another run was writing to MongoDB: repairs skipped, checked again next run"
            log.warning(f"repair: {result.note}")
            pg.insert_findings(engine, audit_rows(ctx, findings))
            return
        intent = findings.copy()
        intent.loc[repairable, "action"] = core_repair.REPAIR_FAILED
        intent.loc[repairable, "error"] = IN_FLIGHT
        audit_ids = dict(zip(findings.index, pg.insert_findings(engine, audit_rows(ctx, intent), returning_ids=True)))
        updates = _updates_from_findings(findings)
        try:
            with collection_factory() as collection:
                documents = mongo_store.fetch_by_ids(collection, list(updates), batch_size)
                outcomes = mongo_store.write_updates(collection, documents, updates, batch_size, _progress(log, "repair"))
                faults.checkpoint("after_repair_mongo_write")
        except ConnectionFailure as exc:
            outcomes = {
                u.key: core_repair.Outcome(core_repair.REPAIR_FAILED, error=f"MongoDB unreachable: {type(exc).__name__}", connection_lost=True)
                for us in updates.values() for u in us
            }
        for key, outcome in outcomes.items():
            findings.loc[key, "action"] = outcome.action
            findings.loc[key, "error"] = outcome.error
            findings.loc[key, "mongo_amount_cents_after"] = outcome.after_cents
        pg.append_finding_outcomes(engine, [
            {"finding_id": audit_ids[key], "action": o.action, "error": o.error, "after": o.after_cents, "before": o.before_cents}
            for key, o in outcomes.items()
        ])
    actions = findings.loc[repairable, "action"].value_counts().to_dict()
    log.info(f"repair: {_counts(actions)}")


def audit_rows(ctx: RunContext, findings: pd.DataFrame) -> list[dict]:
    """reconciliation_findings rows for the diff's findings."""
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


# --- 5. cleanup -----------------------------------------------------------------------------------

def cleanup(engine: Engine, retention_days: int, batch_size: int, log: Logger) -> dict[str, int]:
    """Delete expired idempotency keys and old processed outbox rows in bounded batches."""
    def deleted_keys(n: int) -> None:
        log.info(f"cleanup: {n} expired keys deleted")
        faults.checkpoint("mid_cleanup")

    keys = pg.delete_in_batches(engine, pg.DELETE_EXPIRED_KEYS, {}, batch_size, deleted_keys)
    outbox = pg.delete_in_batches(
        engine, pg.DELETE_OLD_OUTBOX, {"days": retention_days}, batch_size,
        lambda n: log.info(f"cleanup: {n} old outbox rows deleted"),
    )
    log.info(f"cleanup: {keys} expired idempotency keys, {outbox} processed outbox rows older than {retention_days} days")
    return {"expired_keys_deleted": keys, "old_outbox_deleted": outbox}
