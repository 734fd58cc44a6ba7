"""Step 2, extract (RULES.md section 2): the window's emails from PostgreSQL, routed to shards, and each shard's client documents from MongoDB."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure
from sqlalchemy.engine import Engine

from reconciliation_pipeline.core.frames import prepare_clients, prepare_emails
from reconciliation_pipeline.core.keys import client_name_key, last_name_patterns, route_key
from reconciliation_pipeline.core.matching import match_clients
from reconciliation_pipeline.run.types import REST, ROUTED, UNSEEN, Logger, MongoExtract, MongoShard, RunContext, progress
from reconciliation_pipeline.store import mongo as mongo_store
from reconciliation_pipeline.store import postgres as pg
from reconciliation_pipeline.store.frame_files import FrameParts

READ_DOCUMENTS = 1000  # client documents decoded at a time: ~10 MB of dicts, not ~100 MB per 10,000


def _prepared(chunks: Any, log: Logger, what: str) -> pd.DataFrame:
    frames, rows = [], 0
    for chunk in chunks:  # parse each chunk at once so the JSON text never piles up
        frames.append(prepare_emails(chunk))
        rows += len(chunk)
        log.info(f"extract postgres: {rows} {what} rows read")
    return pd.concat(frames, ignore_index=True) if frames else prepare_emails(pd.DataFrame())


def extract_postgres(engine: Engine, ctx: RunContext, *, log: Logger, chunk_rows: int = 100_000) -> pd.DataFrame:
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


def _slot(value: str, count: int) -> int:
    return zlib.crc32(value.encode("utf-8", "surrogatepass")) % count


def route_emails(
    collection: Collection, emails: pd.DataFrame, *, count: int, batch_size: int, full_scan_ratio: float, log: Logger
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
            found = match_clients(named, clients)
            found = found[found["client_status"] == "matched"].merge(clients[["client_id", "route"]], on="client_id")
            by_email = found.set_index("email_id")["route"]
            hit = emails["email_id"].isin(by_email.index)
            emails.loc[hit, "route"] = emails.loc[hit, "email_id"].map(by_email)
            log.info(f"route: {len(named)} emails without aktenzeichen, {len(found)} matched by name, {len(named_docs)} documents")
    except ConnectionFailure as exc:
        log.warning(f"route: MongoDB unreachable ({type(exc).__name__}); comparison skipped")
        return [MongoShard(0, 1, emails.iloc[:0], (), available=False, error=f"MongoDB unreachable: {type(exc).__name__}")]
    slots = np.fromiter((route_slot(r, count) for r in emails["route"]), dtype=np.int64, count=len(emails))
    keys = sorted({r for r in emails["route"] if r is not None and not r.startswith("\x00")})
    named_keys = frozenset(client_name_key(named["client_name"]).dropna()) if full_scan else frozenset()
    if full_scan:
        log.info(f"route: the window names {len(keys)} of about {documents} client documents: one sorted pass over the "
                 f"collection, {len(named)} emails without aktenzeichen resolved by name during it")
    return [
        MongoShard(i, count, emails[slots == i].reset_index(drop=True), tuple(k for k in keys if route_slot(k, count) == i),
                   named_docs if i == 0 else [], full_scan, named_keys)
        for i in range(count)
    ]


def route_slot(route: str | None, count: int) -> int:
    """The shard of a route key."""
    # unrouted emails and documents without a usable aktenzeichen belong to shard 0
    return 0 if count == 1 or route is None or route.startswith("\x00") else _slot(route, count)


def extract_mongo(
    collection: Collection, shard: MongoShard, ctx: RunContext, *, batch_size: int, log: Logger, read_size: int = READ_DOCUMENTS
) -> MongoExtract:
    """Read one shard's client documents in batches into narrow frames, in the parts `diff_shard` compares.

    Documents are decoded `read_size` at a time (at most `batch_size` aktenzeichen per `$in`), and
    each batch becomes a part: (clients, creditor elements) rows kept as Parquet bytes (FrameParts),
    so neither the documents nor a Python object per cell piles up. The client ids and
    routes kept across batches are Arrow strings, for the same reason: a few survivors per memory
    page of a batch's documents would keep every page of them.
    """
    if not shard.available:
        return MongoExtract.skipped(shard.index, shard.error)
    clients_parts, element_parts = FrameParts(), FrameParts()
    keys: list[pa.Array] = []
    key_parts: list[np.ndarray] = []
    parts: list[tuple[int, str, bool]] = []
    seen_ids: list[pa.Array] = []  # documents whose extras a part judges

    def add(kind: str, clients: pd.DataFrame, elements: pd.DataFrame, routes: Sequence[str] = (), has_documents: bool = True) -> None:
        part = len(parts)
        parts.append((part, kind, has_documents))
        clients_parts.append(clients)
        element_parts.append(elements)
        keys.append(pa.array(routes, pa.string()))  # not numpy text: it drops trailing NULs
        key_parts.append(np.full(len(routes), part, dtype=np.int64))

    def seen() -> set[str]:
        return set(pa.concat_arrays(seen_ids).to_pylist()) if seen_ids else set()

    held: list = []  # full scan: documents a name-only email may mean, compared at the end with those emails
    try:
        read = min(read_size, batch_size)  # two batches in flight with the prefetch
        if shard.full_scan:
            batches = mongo_store.iter_all_clients(collection, read)
        else:
            batches = mongo_store.iter_clients_by_aktenzeichen(collection, shard.aktenzeichen, read)
        batches = mongo_store.prefetched(batches)
        total = max(1, -(-len(shard.aktenzeichen) // read))
        report_progress = progress(log, f"extract mongo shard {shard.index}")
        for done, (routes, docs) in enumerate(batches, start=1):
            clients, elements = prepare_clients(docs)
            if shard.named_keys:
                clients, elements, routes = _hold_back_named(clients, elements, docs, routes, shard.named_keys, held)
            add(ROUTED, clients, elements, routes)
            seen_ids.append(pa.array(clients["client_id"].to_numpy(object), pa.string()))
            report_progress(min(done, total), total)
        named = held if shard.full_scan else shard.named_documents
        clients, elements = prepare_clients(named)
        if shard.full_scan:
            owned: set[str] = set(clients["client_id"])  # held back: compared nowhere else
        else:
            owned = {str(d["_id"]) for d in shard.named_documents if mongo_store.document_route(d).startswith("\x00")}
        judged = seen()
        owned -= judged
        add(REST, clients, elements, has_documents=bool(named))
        judged |= owned
        if not shard.full_scan:  # documents with an answer in the window that no email of the window names
            unseen = [
                d["_id"] for d in mongo_store.iter_answered_since(collection, ctx.window_start)
                if str(d["_id"]) not in judged and route_slot(mongo_store.document_route(d), shard.count) == shard.index
            ]
            for docs in mongo_store.iter_by_ids(collection, unseen, batch_size):
                add(UNSEEN, *prepare_clients(docs))
    except ConnectionFailure as exc:
        log.warning(f"extract mongo: MongoDB unreachable ({type(exc).__name__}); comparison skipped")
        return MongoExtract.skipped(shard.index, f"MongoDB unreachable: {type(exc).__name__}")
    extracted = MongoExtract(
        shard.index, clients_parts, element_parts, pd.DataFrame(parts, columns=["part", "kind", "has_documents"]),
        pd.DataFrame({"part": np.concatenate(key_parts), "route": pa.concat_arrays(keys).to_numpy(zero_copy_only=False)}),
        pd.DataFrame({"client_id": sorted(owned)}, dtype=object),
    )
    log.info(f"extract mongo shard {shard.index}: {clients_parts.rows} client documents, "
             f"{element_parts.rows} creditor elements in {len(parts)} parts")
    return extracted


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
