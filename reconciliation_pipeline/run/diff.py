"""Step 3, diff (RULES.md section 3): each shard's emails against its client documents, with the vectorised diff."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pymongo.collection import Collection

from reconciliation_pipeline import ledger
from reconciliation_pipeline.core import diff as core_diff
from reconciliation_pipeline.run.extract import extract_mongo, route_emails
from reconciliation_pipeline.run.types import REST, ROUTED, DiffResult, Logger, MongoExtract, MongoShard, RunContext, counts_text, progress


def _concat_findings(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=core_diff.FINDING_COLUMNS)


def diff_shard(
    shard: MongoShard, extracted: MongoExtract, *, options: core_diff.DiffOptions, keys_per_diff: int, log: Logger
) -> DiffResult:
    """Diff one shard's emails against its client documents, part by part in the order they were read.

    Each part's documents meet the emails routed to them (core.diff, vectorised; consecutive routed
    parts together, up to `keys_per_diff` aktenzeichen a call); only the findings are kept. Each
    document's unclaimed answers (extra_in_mongo) are judged once, by the part that owns the document.
    """
    if not shard.available or not extracted.available:
        return DiffResult.skipped(shard.error or extracted.error)
    emails = shard.emails
    owned = set(extracted.owned["client_id"]) if len(extracted.owned) else set()
    emails_of = _emails_by_part(emails, extracted.keys)
    key_counts = extracted.keys["part"].value_counts().to_dict() if len(extracted.keys) else {}
    parts: list[pd.DataFrame] = []
    checked = 0

    def compare(numbers: list[int], batch_emails: pd.DataFrame, rest: bool = False) -> None:
        nonlocal checked
        clients = pd.concat([extracted.clients[i] for i in numbers], ignore_index=True)
        elements = pd.concat([extracted.elements[i] for i in numbers], ignore_index=True)
        findings, n = core_diff.diff(batch_emails, clients, elements, options)
        if rest:
            findings = findings[(findings["kind"] != core_diff.EXTRA_IN_MONGO) | findings["client_id"].isin(owned)]
        parts.append(findings)
        checked += n

    group: list[int] = []  # consecutive routed parts: their emails are one contiguous run of emails_of
    group_keys = 0

    def compare_group() -> None:
        nonlocal group, group_keys
        if group:
            compare(group, emails_of(group[0], group[-1]))
        group, group_keys = [], 0

    report_progress = progress(log, f"diff shard {shard.index}")
    for part, kind, has_documents in zip(extracted.parts["part"], extracted.parts["kind"], extracted.parts["has_documents"]):
        report_progress(part + 1, len(extracted.parts))
        if kind == ROUTED:
            group.append(part)
            group_keys += key_counts.get(part, 0)
            if group_keys >= keys_per_diff:
                compare_group()
            continue
        compare_group()
        if kind == REST:  # unrouted emails, emails naming an aktenzeichen no document has, the documents found by name
            rest = emails_of(-1, -1)
            if len(rest) or has_documents:
                compare([part], rest, rest=True)
        else:
            compare([part], emails.iloc[:0])
    compare_group()
    result = DiffResult(_concat_findings(parts), checked, True, compared=ledger.compared_pairs(emails))
    counts = result.findings["kind"].value_counts().to_dict() if len(result.findings) else {}
    log.info(f"diff shard {shard.index}: {len(extracted.parts)} parts, {checked} pairs compared, "
             f"{len(result.findings)} findings ({counts_text(counts)})")
    return result


def _emails_by_part(emails: pd.DataFrame, keys: pd.DataFrame):
    """(first, last) part -> the emails routed to those parts' documents (-1: to none), in their order;
    one map and one stable sort instead of a filter of all emails per part."""
    route_part = pd.Series(keys["part"].to_numpy(np.int64), index=keys["route"].to_numpy(object)) if len(keys) else pd.Series(dtype=np.int64)
    codes = emails["route"].map(route_part).fillna(-1).to_numpy(np.int64)
    order = np.argsort(codes, kind="stable")
    ordered, sorted_codes = emails.take(order), codes[order]

    def rows(first: int, last: int) -> pd.DataFrame:
        lo, hi = np.searchsorted(sorted_codes, first, "left"), np.searchsorted(sorted_codes, last, "right")
        return ordered.iloc[lo:hi]

    return rows


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
    """Route, extract and diff every shard in this process (the ops run the shards in parallel)."""
    routed = route_emails(collection, emails, count=shards, batch_size=batch_size, full_scan_ratio=full_scan_ratio, log=log)
    return merge_diffs([
        diff_shard(shard, extract_mongo(collection, shard, ctx, batch_size=batch_size, log=log), options=options,
                   keys_per_diff=batch_size, log=log)
        for shard in routed
    ])


def diff_options(ctx: RunContext, *, tolerance_cents: int, repair_low_confidence: bool) -> core_diff.DiffOptions:
    """The diff's options for this run's window."""
    return core_diff.DiffOptions(ctx.window_start, ctx.window_end, tolerance_cents, repair_low_confidence)
