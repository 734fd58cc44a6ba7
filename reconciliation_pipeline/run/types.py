"""The values one run's steps hand each other (and the ops pass between them through the IO manager)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd

from reconciliation_pipeline.core import diff as core_diff
from reconciliation_pipeline.store.frame_files import FrameParts

Logger = logging.Logger | Any  # Dagster's DagsterLogManager has the same interface


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


ROUTED, REST, UNSEEN = "routed", "rest", "unseen"  # the parts of a MongoExtract


@dataclass
class MongoExtract:
    """One shard's client documents as narrow frames, in the parts the diff compares one at a time.

    Parts, in read order: `routed` (a batch read by aktenzeichen, compared with the emails routed to
    its `keys`), one `rest` (the documents found by name or held back by the full pass, compared with
    the emails no batch took; only the extras of `owned` documents are judged there) and `unseen`
    (documents with an answer in the window that no email names: their extras only). Part i of
    `clients` and of `elements` is row i of `parts`; both are kept as Parquet bytes, so a million
    creditor elements hold no Python object a cell (and no page of the documents they came from).
    """

    shard: int
    clients: FrameParts
    elements: FrameParts
    parts: pd.DataFrame  # part, kind, has_documents
    keys: pd.DataFrame  # part, route: the route keys of each routed part
    owned: pd.DataFrame  # client_id: the documents whose extras the rest part judges
    available: bool = True
    error: str | None = None

    @classmethod
    def skipped(cls, shard: int, error: str | None) -> MongoExtract:
        """Nothing read: MongoDB was unreachable."""
        empty = pd.DataFrame()
        return cls(shard, FrameParts(), FrameParts(), empty, empty, empty, available=False, error=error)


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


def progress(log: Logger, what: str) -> Callable[[int, int], None]:
    """A callback that logs every tenth batch of `what`."""
    def report(done: int, total: int) -> None:
        if total <= 1:
            return
        if done == total or done % max(1, total // 10) == 0:
            log.info(f"{what}: batch {done}/{total}")

    return report


def counts_text(counts: Mapping[str, int]) -> str:
    """`kind=n, ...` for a log line."""
    return ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"
