"""Step 3, compare (RULES.md section 3): each shard's client documents against its emails, with the vectorised diff."""

from __future__ import annotations

import pandas as pd
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure

from reconciliation_pipeline import ledger
from reconciliation_pipeline.core import diff as core_diff
from reconciliation_pipeline.core.frames import prepare_clients
from reconciliation_pipeline.core.keys import route_key
from reconciliation_pipeline.run.extract import route_emails, route_slot
from reconciliation_pipeline.run.types import DiffResult, Logger, MongoShard, RunContext, counts_text, progress
from reconciliation_pipeline.store import mongo as mongo_store


def _concat_findings(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=core_diff.FINDING_COLUMNS)


def compare_shard(
    collection: Collection, shard: MongoShard, ctx: RunContext, *, options: core_diff.DiffOptions, batch_size: int, log: Logger
) -> DiffResult:
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
        report_progress = progress(log, f"compare shard {shard.index}")
        for done, (keys, docs) in enumerate(batches, start=1):
            clients, elements = prepare_clients(docs)
            if shard.named_keys:
                clients, elements, keys = _hold_back_named(clients, elements, docs, keys, shard.named_keys, held)
            routed.update(keys)
            compare(clients, elements, emails[routes.isin(keys)])
            report_progress(min(done, total), total)
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
                if str(d["_id"]) not in seen and route_slot(mongo_store.document_route(d), shard.count) == shard.index
            ]
            for docs in mongo_store.iter_by_ids(collection, unseen, batch_size):
                compare(*prepare_clients(docs), emails.iloc[:0])
    except ConnectionFailure as exc:
        log.warning(f"compare: MongoDB unreachable ({type(exc).__name__}); comparison skipped")
        return DiffResult.skipped(f"MongoDB unreachable: {type(exc).__name__}")
    result = DiffResult(_concat_findings(parts), checked, True, compared=ledger.compared_pairs(emails))
    counts = result.findings["kind"].value_counts().to_dict() if len(result.findings) else {}
    log.info(f"compare shard {shard.index}: {len(seen)} client documents, {checked} pairs compared, "
             f"{len(result.findings)} findings ({counts_text(counts)})")
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
    collection: Collection, emails: pd.DataFrame, ctx: RunContext, *, options: core_diff.DiffOptions,
    batch_size: int, log: Logger, shards: int = 1, full_scan_ratio: float = 0.5,
) -> DiffResult:
    """Route, then compare every shard in this process (the ops run the shards in parallel)."""
    routed = route_emails(collection, emails, count=shards, batch_size=batch_size, full_scan_ratio=full_scan_ratio, log=log)
    return merge_diffs([compare_shard(collection, shard, ctx, options=options, batch_size=batch_size, log=log) for shard in routed])


def diff_options(ctx: RunContext, *, tolerance_cents: int, repair_low_confidence: bool) -> core_diff.DiffOptions:
    """The diff's options for this run's window."""
    return core_diff.DiffOptions(ctx.window_start, ctx.window_end, tolerance_cents, repair_low_confidence)
