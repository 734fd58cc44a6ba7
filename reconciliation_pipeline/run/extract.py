"""Step 2, extract (RULES.md section 2): the window's emails from PostgreSQL, routed to MongoDB shards."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure
from sqlalchemy.engine import Engine

from reconciliation_pipeline.core.frames import prepare_clients, prepare_emails
from reconciliation_pipeline.core.keys import client_name_key, last_name_patterns, route_key
from reconciliation_pipeline.core.matching import match_clients
from reconciliation_pipeline.run.types import Logger, MongoShard, RunContext
from reconciliation_pipeline.store import mongo as mongo_store
from reconciliation_pipeline.store import postgres as pg


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
