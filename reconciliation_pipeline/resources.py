"""Dagster resources: the two databases and the run settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, model_validator
from pymongo import MongoClient, ReadPreference, WriteConcern
from pymongo.collection import Collection
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern

CLIENTS_COLLECTION = "clients"


class PostgresResource(dg.ConfigurableResource):
    """The application's PostgreSQL database: source of truth and home of the report tables."""

    url: str = Field(description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pass@host:5432/db")
    statement_timeout_ms: int = Field(default=900_000, description="Per-statement timeout on the pipeline's connections")

    @contextmanager
    def get_engine(self) -> Iterator[sa.Engine]:
        """An engine for the duration of the block (connections are closed afterwards)."""
        engine = sa.create_engine(
            self.url,
            poolclass=sa.pool.NullPool,
            connect_args={
                "options": f"-c statement_timeout={int(self.statement_timeout_ms)}",
                "application_name": "reconciliation_pipeline",
                "connect_timeout": 10,
            },
        )
        try:
            yield engine
        finally:
            engine.dispose()


class WeakWriteConcernError(ValueError):
    """A write concern that would let a repaired write vanish in a primary failover."""


def parse_write_concern(value: str, allow_weak: bool) -> str | int:
    """`mongo_write_concern` as pymongo's `w`: "majority", or a number of members (1 only when allowed)."""
    text = str(value).strip()
    if text == "majority":
        return "majority"
    if not text.isdigit():
        raise WeakWriteConcernError(f"mongo_write_concern must be 'majority' or a number of members, not {value!r}")
    members = int(text)
    if members < 1:
        raise WeakWriteConcernError("mongo_write_concern 0 (unacknowledged) is never allowed: every write is read back")
    if members == 1 and not allow_weak:
        raise WeakWriteConcernError(
            "mongo_write_concern 1 is refused: a write acknowledged by the primary alone can be rolled back "
            "by a failover after it was counted as repaired; use 'majority', or set allow_weak_write_concern: true "
            "to accept that risk (e.g. a single-node server)"
        )
    return members


class MongoResource(dg.ConfigurableResource):
    """The client portal's MongoDB (collection `clients`)."""

    uri: str = Field(description="MongoDB connection string")
    database: str = Field(description="Database holding the `clients` collection")
    server_selection_timeout_ms: int = Field(default=5_000)
    socket_timeout_ms: int = Field(default=120_000)
    mongo_write_concern: str = Field(
        default="majority",
        description="Write concern `w` of repair and outbox writes: 'majority' (default) or a number of members; '1' needs allow_weak_write_concern",
    )
    allow_weak_write_concern: bool = Field(default=False, description="Accept mongo_write_concern '1' (writes may be lost in a failover)")
    write_concern_timeout_ms: int = Field(default=30_000, ge=1, description="wtimeout: how long a write waits for the members to acknowledge")

    @model_validator(mode="after")
    def _write_concern_is_durable(self) -> "MongoResource":
        parse_write_concern(self.mongo_write_concern, self.allow_weak_write_concern)
        return self

    def collection_options(self) -> dict:
        """Write concern, read concern `majority` and primary reads for every collection the pipeline uses."""
        w = parse_write_concern(self.mongo_write_concern, self.allow_weak_write_concern)
        return {
            "write_concern": WriteConcern(w=w, wtimeout=self.write_concern_timeout_ms),
            "read_concern": ReadConcern("majority"),
            "read_preference": ReadPreference.PRIMARY,
        }

    @contextmanager
    def get_client(self) -> Iterator[MongoClient]:
        """A MongoClient for the duration of the block."""
        client: MongoClient = MongoClient(
            self.uri,
            tz_aware=True,
            serverSelectionTimeoutMS=self.server_selection_timeout_ms,
            connectTimeoutMS=self.server_selection_timeout_ms,
            socketTimeoutMS=self.socket_timeout_ms,
            retryWrites=False,  # a retried compare-and-swap is decided by the read-back instead
            appname="reconciliation_pipeline",
        )
        try:
            yield client
        finally:
            client.close()

    @contextmanager
    def get_collection(self, name: str) -> Iterator[Collection]:
        """A collection of the database with the durable options (collection_options)."""
        options = self.collection_options()
        with self.get_client() as client:
            yield client[self.database].get_collection(name, **options)

    @contextmanager
    def get_clients_collection(self) -> Iterator[Collection]:
        """The `clients` collection, written with `mongo_write_concern` and read with read concern majority."""
        with self.get_collection(CLIENTS_COLLECTION) as collection:
            yield collection

    def is_available(self) -> bool:
        """Whether the server answers a ping within the selection timeout."""
        try:
            with self.get_client() as client:
                client.admin.command("ping")
            return True
        except (PyMongoError, KeyError, OSError):  # KeyError: the wire stand-in's auth handshake
            return False


class ReconciliationSettings(dg.ConfigurableResource):
    """Run settings: window, safety limits, batching (override per run in the launchpad)."""

    lookback_hours: int = Field(default=48, ge=1, le=24 * 366, description="Window length ending at the partition's end")
    dry_run: bool = Field(default=False, description="Detect and report only; write nothing to MongoDB")
    max_repairs: int = Field(default=1000, ge=0, description="More repairable findings than this: repair nothing, fail the budget check")
    amount_tolerance_cents: int = Field(default=0, ge=0, description="Differences up to this many cents are not findings")
    outbox_retention_days: int = Field(default=30, ge=1, description="Processed outbox rows older than this are deleted")
    repair_low_confidence: bool = Field(default=False, description="Also repair level-4 (shared word only) creditor matches")
    outbox_batch_size: int = Field(default=1000, ge=1, description="Outbox messages claimed per transaction")
    cleanup_batch_size: int = Field(default=10_000, ge=1, description="Rows deleted per cleanup transaction")
    mongo_batch_size: int = Field(default=500, ge=1, description="Client documents per MongoDB bulk write / read-back")
    mongo_keys_per_query: int = Field(default=10_000, ge=1, description="Aktenzeichen per vectorised diff call (and at most per `$in` read; documents are decoded 1,000 at a time)")
    mongo_full_scan_ratio: float = Field(default=0.5, ge=0, description="If the window names at least this share of all client documents, read the collection in one sorted pass instead of `$in` batches (above 1: never)")
    mongo_shards: int = Field(default=1, ge=1, le=64, description="Parallel compare ops (hash slices of the aktenzeichen); parallel with the multiprocess executor")
    repair_lock_wait_seconds: int = Field(default=300, ge=0, description="How long to wait for another run's MongoDB writes")
    findings_in_details: int = Field(default=200, ge=0, description="Findings kept in the report row's details (all go to the audit table)")
