"""Random histories held against a model: no run ever moves MongoDB backwards (issue 9).

A hypothesis `RuleBasedStateMachine` plays the application (replies synced directly to MongoDB, or
failed into the outbox as one or several messages with either amount key, with received_at and
created_at out of order; creditor_debt_update messages; poison messages), MongoDB going away and
coming back, connections cut mid-write (the write applied, its answer lost), application writes
landing between the pipeline's read and its write (the cut proxy), and reconciliation runs of the
current partition and backfills of old ones with any lookback, in-process through the asset's
graph and, once per history, through `dagster job execute`, killed at a named crash point or not.
Everything runs against real PostgreSQL and the wire server through pymongo.

The model is PostgreSQL's newest statement per (client, creditor) pair, in the order the rule
names: (stated_at, email id, created_at, message id). Invariants, after every step: no run moves a
pair to an older statement than the one it held before (or than the application's own write during
the run); MongoDB holds only amounts somebody stated, with their response_received_at; after a quiet
run every reconciled pair holds the model's newest amount; claim_amount and unknown fields never
change; every MongoDB write of a run has its audit row; the report's counts add up.

    RECON_MODEL_EXAMPLES  histories per run (default 12; CI sets more)
    RECON_MODEL_STEPS     steps per history (default 14)
    RECON_MODEL_SEED      replay the histories of one seed (printed at the start and on failure)
"""

from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from pymongo import MongoClient

from reconciliation_pipeline.assets import reconciliation_report
from reconciliation_pipeline.core.amounts import try_cents
from reconciliation_pipeline.core.outbox import parse_payload
from reconciliation_pipeline.faults import POINTS
from reconciliation_pipeline.io_managers import RunFilesIOManager
from reconciliation_pipeline.ops import LOOKBACK_TAG
from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings
from reconciliation_pipeline.schema import idempotency_keys, incoming_emails, outbox_messages
from reconciliation_pipeline.run.audit_rows import IN_FLIGHT
from reconciliation_pipeline_tests.support import (
    FORWARD_THEN_CUT, CutRule, MongoCutProxy, cli_env, execute_args, free_port, mongo_port, run_cli, sqlite_home, write_config,
)

EXAMPLES = int(os.environ.get("RECON_MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("RECON_MODEL_STEPS", "14"))
SEED = int(os.environ.get("RECON_MODEL_SEED") or random.SystemRandom().randrange(2**32))
BERLIN = ZoneInfo("Europe/Berlin")
BASE = datetime(2026, 11, 20, 6, 0, tzinfo=timezone.utc)
EARLIEST = datetime(1900, 1, 1, tzinfo=timezone.utc)

CLIENTS = {"MH-1001": ("Mustermann", "Max"), "MH-1002": ("Schmidt", "Erika")}
CREDITORS = [("forderungen@sparkasse-bochum.de", "Sparkasse Bochum"), ("inkasso@telekom.de", "Telekom Deutschland GmbH")]
PAIRS = [(az, pos) for az in CLIENTS for pos in range(len(CREDITORS))]
NO_ANSWER_YET = ("MH-1002", 1)  # starts without creditor_response_amount (missing_in_mongo)
MAX_KEY = (datetime.max.replace(tzinfo=timezone.utc), 0, datetime.max.replace(tzinfo=timezone.utc), 0)
INITIAL_KEY = (EARLIEST, -1, EARLIEST, -1)
# how long before it was recorded a reply was received: whole minutes (ties on purpose), sometimes with
# microseconds (PostgreSQL keeps them, MongoDB keeps milliseconds)
DELAYS = st.builds(lambda m, us: timedelta(minutes=m, microseconds=us), st.integers(0, 120), st.sampled_from([0, 0, 0, 400, 999_999]))
ELEMENT_WRITABLE = {"creditor_response_amount", "current_debt_amount", "amount_source", "response_received_at",
                    "contact_status", "last_contacted_at", "creditor_response_text", "response_reference_numbers"}


def ms(t: datetime) -> datetime:
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def partition_key_ending(end: datetime) -> str:
    return (end - timedelta(hours=1)).astimezone(BERLIN).strftime("%Y-%m-%d-%H:%M")


@dataclass(frozen=True)
class Statement:
    """One word of the application about a pair's amount; `key` orders them (newest = greatest)."""

    cents: int
    key: tuple
    stated_at: datetime
    what: str


@dataclass
class RunPlan:
    partition_end: datetime
    lookback: int
    dry_run: bool = False
    max_repairs: int = 1000
    fault: str = "none"  # none | mongo_down | cut_update | cut_find | concurrent
    nth: int = 1
    via: str = "in_process"  # in_process | cli
    kill_at: str | None = None

    @property
    def quiet(self) -> bool:
        return self.fault == "none" and not self.dry_run and self.kill_at is None and self.max_repairs >= 1000


@dataclass
class World:
    """What the test knows: the statements per pair and the cents of poison payloads."""

    statements: dict[tuple[str, int], list[Statement]] = field(default_factory=lambda: {p: [] for p in PAIRS})
    by_cents: dict[int, Statement] = field(default_factory=dict)
    poison_cents: set[int] = field(default_factory=set)
    next_cents: int = 10_007

    def cents(self) -> int:
        self.next_cents += 1_013  # unique per statement: a MongoDB amount names the statement it came from
        return self.next_cents

    def add(self, pair: tuple[str, int], statement: Statement) -> None:
        self.statements[pair].append(statement)
        self.by_cents[statement.cents] = statement

    def newest(self, pair: tuple[str, int]) -> Statement | None:
        return max(self.statements[pair], key=lambda s: s.key, default=None)


class Stores:
    """The two databases, the pipeline's resources and the dagster CLI, for one test session."""

    def __init__(self, pg_url: str, engine: sa.Engine, mongo_uri: str, mongo: MongoClient, tmp: Path):
        self.pg_url, self.engine, self.mongo_uri, self.mongo, self.tmp = pg_url, engine, mongo_uri, mongo, tmp
        self.db_name = f"recon_model_{uuid.uuid4().hex[:8]}"
        self.db = mongo[self.db_name]
        self.instance = dg.DagsterInstance.ephemeral()
        self.home = sqlite_home(tmp / "dagster_home")
        self.cli_seconds: list[float] = []

    def reset(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(
                "TRUNCATE incoming_emails, outbox_messages, idempotency_keys, reconciliation_findings, reconciliation_audit_checkpoints, "
                "reconciliation_reports RESTART IDENTITY CASCADE"
            ))
        self.db.clients.drop()

    def rows(self, sql: str, **params: Any) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]

    def materialize(self, plan: RunPlan, mongo_uri: str) -> dg.ExecuteInJobResult:
        resources = {
            "postgres": PostgresResource(url=self.pg_url),
            "mongo": MongoResource(uri=mongo_uri, database=self.db_name, server_selection_timeout_ms=1500,
                                   socket_timeout_ms=10_000),
            "settings": ReconciliationSettings(repair_lock_wait_seconds=5, dry_run=plan.dry_run, max_repairs=plan.max_repairs),
            "io_manager": RunFilesIOManager(),  # the one definitions.py declares: no pickles
        }
        return dg.materialize(
            [reconciliation_report], partition_key=partition_key_ending(plan.partition_end), resources=resources,
            instance=self.instance, raise_on_error=False, tags={LOOKBACK_TAG: str(plan.lookback)},
        )

    def cli(self, plan: RunPlan, mongo_uri: str) -> tuple[int, str]:
        config = write_config(self.tmp / "run_config.json", dry_run=plan.dry_run, max_repairs=plan.max_repairs,
                              repair_lock_wait_seconds=5)
        args = execute_args(partition_key_ending(plan.partition_end), config, **{LOOKBACK_TAG: str(plan.lookback)})
        env = cli_env(pg_url=self.pg_url, mongo_uri=mongo_uri, mongo_db=self.db_name, dagster_home=self.home,
                      fault=plan.kill_at)
        result = run_cli(args, env, self.tmp / "cli_logs", timeout=180)
        self.cli_seconds.append(result.seconds)
        return result.returncode, result.describe(3000)


def element_state(db: Any) -> dict[tuple[str, int], dict]:
    out = {}
    for doc in db.clients.find({}):
        for pos, element in enumerate(doc["final_creditor_list"]):
            out[(doc["aktenzeichen"], pos)] = {**element, "_id": str(doc["_id"]), "_doc_extra": doc.get("portal_flags")}
    return out


def held_cents(element: dict) -> int | None:
    value = element.get("creditor_response_amount")
    return None if value is None else try_cents(value)[0]


class ReconciliationHistories(RuleBasedStateMachine):
    """The application, the faults and the runs; the model and its invariants (see the module docstring)."""

    stores: Stores  # set by the test
    stats: dict[str, int] = {}

    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.clock = BASE + timedelta(minutes=7)
        self.mongo_down = False
        self.cli_runs = 0
        self.runs = 0
        self.last_run_end: datetime | None = None

    # ------------------------------------------------------------------------------- the world
    @initialize()
    def seed_portal(self) -> None:
        self.stores.reset()
        for az, (last, first) in CLIENTS.items():
            creditors = []
            for pos, (address, name) in enumerate(CREDITORS):
                element = {"sender_name": name, "sender_email": address, "claim_amount": 1500.0 + pos,
                           "contact_status": "contacted", "portal_note": f"note {az}/{pos}"}
                if (az, pos) != NO_ANSWER_YET:
                    cents = self.world.cents()
                    stated = BASE - timedelta(days=10)
                    self.world.by_cents[cents] = Statement(cents, INITIAL_KEY, stated, "portal before the history")
                    element.update(creditor_response_amount=cents / 100, current_debt_amount=cents / 100,
                                   amount_source="creditor_response", response_received_at=stated, contact_status="responded")
                creditors.append(element)
            self.stores.db.clients.insert_one({"aktenzeichen": az, "firstName": first, "lastName": last,
                                               "portal_flags": {"archived": False}, "final_creditor_list": creditors})
        self._expired_keys(3)
        self.frozen = {pair: {k: v for k, v in e.items() if k not in ELEMENT_WRITABLE} for pair, e in element_state(self.stores.db).items()}

    def _expired_keys(self, n: int) -> None:
        """Idempotency keys past their expiry: cleanup deletes them (and `mid_cleanup` is reached)."""
        with self.stores.engine.begin() as conn:
            conn.execute(idempotency_keys.insert(), [
                {"key": f"idem-{uuid.uuid4().hex}", "created_at": self.clock - timedelta(days=2), "expires_at": self.clock - timedelta(days=1)}
                for _ in range(n)])

    @rule(n=st.integers(1, 3))
    def idempotency_keys_expire(self, n):
        self._expired_keys(n)

    def _payload(self, pair: tuple[str, int], amount: Any, amount_key: str, **extra: Any) -> dict:
        az, pos = pair
        last, first = CLIENTS[az]
        address, name = CREDITORS[pos]
        return {"client_aktenzeichen": az, "client_name": f"{last}, {first}", "creditor_email": address,
                "creditor_name": name, amount_key: amount, "response_text": "Forderungsaufstellung", **extra}

    def _insert_email(self, pair: tuple[str, int], cents: int, received: datetime, status: str) -> int:
        az, pos = pair
        last, first = CLIENTS[az]
        address, name = CREDITORS[pos]
        extracted = {"is_creditor_reply": True, "client_name": f"{last}, {first}", "client_aktenzeichen": az,
                     "creditor_name": name, "debt_amount": cents / 100, "confidence": 0.9}
        with self.stores.engine.begin() as conn:
            return conn.execute(incoming_emails.insert().values(
                zendesk_ticket_id=f"ZD-{uuid.uuid4().hex[:8]}", from_email=address, received_at=received,
                created_at=self.clock, sync_status=status, processing_status="completed", extracted_data=extracted,
                sync_error="MongoDB timeout" if status == "failed" else None,
            ).returning(incoming_emails.c.id)).scalar_one()

    def _insert_message(self, payload: dict, created: datetime, aggregate: tuple[str, str]) -> int:
        with self.stores.engine.begin() as conn:
            return conn.execute(outbox_messages.insert().values(
                aggregate_type=aggregate[0], aggregate_id=aggregate[1], operation="UPDATE", payload=payload,
                idempotency_key=f"k-{uuid.uuid4().hex}", created_at=created,
            ).returning(outbox_messages.c.id)).scalar_one()

    def _received(self, pair: tuple[str, int], delay: timedelta) -> datetime:
        received = self.clock - delay
        # Known gap, kept out of the histories: the diff compares synced emails only, so it does not
        # restore a delivered creditor_debt_update that the application itself overwrote in MongoDB
        # with an older direct write.
        floor = max((s.stated_at for s in self.world.statements[pair] if s.what.startswith("debt update")), default=None)
        return max(received, floor + timedelta(minutes=1)) if floor and received <= floor else received

    def app_direct_write(self, pair: tuple[str, int], received: datetime, db: Any) -> Statement:
        """The application's happy path: the email synced and the element set, whole list (the stand-in
        does not apply `final_creditor_list.<n>` paths)."""
        cents = self.world.cents()
        email_id = self._insert_email(pair, cents, received, "synced")
        statement = Statement(cents, (received, email_id, EARLIEST, 0), received, f"synced email {email_id}")
        self.world.add(pair, statement)
        az, pos = pair
        doc = db.clients.find_one({"aktenzeichen": az})
        creditors = doc["final_creditor_list"]
        creditors[pos].update(creditor_response_amount=cents / 100, current_debt_amount=cents / 100,
                              amount_source="creditor_response", response_received_at=received,
                              contact_status="responded", last_contacted_at=received)
        db.clients.update_one({"_id": doc["_id"]}, {"$set": {"final_creditor_list": creditors}})
        return statement

    @rule(pair=st.sampled_from(PAIRS), advance=st.integers(1, 50), delay=DELAYS)
    def reply_synced_directly(self, pair, advance, delay):
        self.clock += timedelta(minutes=advance)
        statement = self.app_direct_write(pair, self._received(pair, delay), self.stores.db)
        note(f"app: {pair} {statement.what} {statement.cents} received {statement.stated_at:%H:%M}")

    @rule(pair=st.sampled_from(PAIRS), advance=st.integers(1, 50), delay=DELAYS,
          messages=st.lists(st.tuples(st.integers(-20, 20), st.sampled_from(["new_debt_amount", "debt_amount"])), min_size=1, max_size=3))
    def reply_failed_into_outbox(self, pair, advance, delay, messages):
        self.clock += timedelta(minutes=advance)
        received = self._received(pair, delay)
        amounts = [self.world.cents() for _ in messages]
        ordered = sorted(range(len(messages)), key=lambda i: messages[i][0])  # the newest created_at last (ties: the later id)
        newest = ordered[-1]
        email_id = self._insert_email(pair, amounts[newest], received, "failed")
        for i, ((offset, amount_key), cents) in enumerate(zip(messages, amounts)):
            created = self.clock + timedelta(minutes=offset)
            mid = self._insert_message(self._payload(pair, cents / 100, amount_key), created, ("incoming_email", str(email_id)))
            self.world.add(pair, Statement(cents, (received, email_id, created, mid), received, f"outbox message {mid} (email {email_id})"))
        note(f"app: {pair} email {email_id} failed, messages {list(zip(amounts, messages))} received {received:%H:%M}")

    @rule(pair=st.sampled_from(PAIRS), advance=st.integers(1, 50), offset=st.integers(-20, 20),
          stated_delay=st.none() | DELAYS)
    def debt_update(self, pair, advance, offset, stated_delay):
        self.clock += timedelta(minutes=advance)
        cents = self.world.cents()
        created = self.clock + timedelta(minutes=offset)
        extra = {}
        stated = created
        if stated_delay is not None:
            stated = self.clock - stated_delay
            extra["response_received_at"] = stated.isoformat()
        mid = self._insert_message(self._payload(pair, cents / 100, "new_debt_amount", **extra), created,
                                   ("creditor_debt_update", f"{pair[0]}:{pair[1]}"))
        self.world.add(pair, Statement(cents, (stated, 0, created, mid), stated, f"debt update message {mid}"))
        note(f"app: {pair} debt update {mid} {cents} stated {stated:%H:%M}")

    @rule(pair=st.sampled_from(PAIRS), bad=st.sampled_from([None, "1.234", "abc", -5]))
    def poison_message(self, pair, bad):
        cents = self.world.cents()  # never a statement: written nowhere
        self.world.poison_cents.add(cents)
        payload = self._payload(pair, bad, "new_debt_amount")
        if bad is None:
            payload.pop("new_debt_amount")
        payload["debt_amount_note"] = cents  # so a made-up write of it would be recognisable
        self._insert_message(payload, self.clock, ("creditor_debt_update", f"{pair[0]}:{pair[1]}"))
        note(f"app: {pair} poison message ({bad!r})")

    @rule()
    def mongo_goes_away(self):
        self.mongo_down = True

    @rule()
    def mongo_comes_back(self):
        self.mongo_down = False

    # ------------------------------------------------------------------------------- the runs
    def _plan(self, which: str, back: int, lookback: int) -> RunPlan:
        current = self.clock.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        end = current if which == "current" else max(BASE + timedelta(hours=1), current - timedelta(hours=back))
        return RunPlan(end, lookback)

    def _reconcile(self, plan: RunPlan, fault: str, nth: int, concurrent_pair, concurrent_delay) -> None:
        if fault == "dry_run":
            plan.dry_run = True
        elif fault == "budget":
            plan.max_repairs = 0
        else:
            plan.fault, plan.nth = fault, nth
        if self.mongo_down:
            plan.fault = "mongo_down"
        self._run(plan, concurrent_pair, concurrent_delay)

    @rule(lookback=st.sampled_from([1, 2, 6, 48]))
    def reconcile_current_partition(self, lookback):
        self._reconcile(self._plan("current", 0, lookback), "none", 1, None, timedelta(0))

    @rule(back=st.integers(1, 6), lookback=st.sampled_from([1, 2, 6, 48]))
    def backfill_old_partition(self, back, lookback):
        self._reconcile(self._plan("backfill", back, lookback), "none", 1, None, timedelta(0))

    @rule(which=st.sampled_from(["current", "backfill"]), back=st.integers(1, 6), lookback=st.sampled_from([1, 6, 48]),
          fault=st.sampled_from(["cut_update", "cut_find", "concurrent", "concurrent", "dry_run", "budget"]),
          nth=st.integers(1, 3), concurrent_pair=st.sampled_from(PAIRS), concurrent_delay=DELAYS)
    def reconcile_with_a_fault(self, which, back, lookback, fault, nth, concurrent_pair, concurrent_delay):
        self._reconcile(self._plan(which, back, lookback), fault, nth, concurrent_pair, concurrent_delay)

    @precondition(lambda self: self.cli_runs < 1)
    @rule(which=st.sampled_from(["current", "backfill"]), back=st.integers(1, 6), lookback=st.sampled_from([1, 48]),
          kill_at=st.sampled_from([None, *POINTS]))
    def reconcile_through_the_dagster_cli(self, which, back, lookback, kill_at):
        self.cli_runs += 1
        plan = self._plan(which, back, lookback)
        plan.via, plan.kill_at = "cli", kill_at
        if self.mongo_down:
            plan.fault = "mongo_down"
        self._run(plan, None, timedelta(0))

    def _run(self, plan: RunPlan, concurrent_pair: tuple[str, int] | None, concurrent_delay: timedelta) -> None:
        self.runs += 1
        stats = type(self).stats
        stats["runs"] = stats.get("runs", 0) + 1
        kind = f"{plan.via}:{plan.fault}" + (":dry_run" if plan.dry_run else "") + (":budget" if plan.max_repairs < 1000 else "") \
            + (f":killed_at_{plan.kill_at}" if plan.kill_at else "")
        stats[kind] = stats.get(kind, 0) + 1
        stores = self.stores
        before = element_state(stores.db)
        pending = self._pending_pairs()
        reports_before = {r["id"] for r in stores.rows("SELECT id FROM reconciliation_reports")}
        app_writes: dict[tuple[str, int], Statement] = {}
        proxy = None
        uri = stores.mongo_uri
        if plan.fault == "mongo_down":
            uri = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
        elif plan.fault in ("cut_update", "cut_find", "concurrent"):
            target = mongo_port(stores.mongo_uri)
            if plan.fault == "concurrent":
                def app_write(command: str, count: int) -> None:
                    if command == "update" and count == plan.nth and not app_writes:
                        self.clock += timedelta(minutes=1)
                        with MongoClient(stores.mongo_uri, tz_aware=True, serverSelectionTimeoutMS=5000) as client:
                            app_writes[concurrent_pair] = self.app_direct_write(
                                concurrent_pair, self._received(concurrent_pair, concurrent_delay), client[stores.db_name])
                proxy = MongoCutProxy(target, on_command=app_write, max_lifetime=120)
            else:
                rule_ = CutRule("update", plan.nth, FORWARD_THEN_CUT) if plan.fault == "cut_update" else \
                    CutRule("find", plan.nth + 2, FORWARD_THEN_CUT)
                proxy = MongoCutProxy(target, rule=rule_, max_lifetime=120)
            uri = proxy.uri
        note(f"run {self.runs}: {plan}")
        try:
            if plan.via == "cli":
                code, output = stores.cli(plan, uri)
                if plan.kill_at is None:
                    assert code == 0, output
            else:
                result = stores.materialize(plan, uri)
                assert result.success, [e.message for e in result.all_events if e.is_failure]
        finally:
            if proxy is not None:
                proxy.stop()
        self.clock += timedelta(minutes=1)
        after = element_state(stores.db)
        new_reports = [r for r in stores.rows("SELECT * FROM reconciliation_reports ORDER BY id") if r["id"] not in reports_before]
        assert len(new_reports) == 1, new_reports
        report = new_reports[0]
        self._check_no_step_back(before, after, app_writes)
        self._check_writes_audited(before, after, app_writes, report, verified=plan.fault in ("none", "concurrent"))
        if report["status"] == "completed":
            self._check_counts(report)
        else:
            assert plan.kill_at is not None, report
        changed = sum(held_cents(before[p]) != held_cents(after[p]) and p not in app_writes for p in PAIRS)
        stats["pairs_moved_by_runs"] = stats.get("pairs_moved_by_runs", 0) + changed
        if plan.quiet and plan.fault != "mongo_down":
            self._check_quiet_run(plan, pending, after)
            stats["quiet_runs_checked"] = stats.get("quiet_runs_checked", 0) + 1

    # ------------------------------------------------------------------------------- the checks
    def _pending_pairs(self) -> set[tuple[str, int]]:
        pairs = set()
        for row in self.stores.rows("SELECT payload FROM outbox_messages WHERE processed_at IS NULL AND retry_count < max_retries"):
            payload = row["payload"]
            if parse_payload(payload)[0] is None:  # poison: goes dead, never a statement
                continue
            pos = next((i for i, (address, _) in enumerate(CREDITORS) if address == payload.get("creditor_email")), None)
            if payload.get("client_aktenzeichen") in CLIENTS and pos is not None:
                pairs.add((payload["client_aktenzeichen"], pos))
        return pairs

    def _key_of(self, element: dict) -> tuple:
        cents = held_cents(element)
        if cents is None:
            return INITIAL_KEY
        statement = self.world.by_cents.get(cents)
        assert statement is not None, f"MongoDB holds {cents} cents, an amount nobody stated: {element}"
        return statement.key

    def _check_no_step_back(self, before: dict, after: dict, app_writes: dict) -> None:
        for pair in PAIRS:
            old = app_writes[pair].key if pair in app_writes else self._key_of(before[pair])
            new = self._key_of(after[pair])
            assert new >= old, (
                f"{pair} moved backwards: held {held_cents(before[pair])} ({old}), now {held_cents(after[pair])} ({new})"
            )

    def _check_writes_audited(self, before: dict, after: dict, app_writes: dict, report: dict, verified: bool) -> None:
        """Every pair a run moved has an audit row of that run with the amount; `verified`: its outcome is
        `repaired` (a cut connection leaves it unverified until the next run reads it back)."""
        audit = self.stores.rows("SELECT * FROM reconciliation_findings_current WHERE report_id = :r", r=report["id"])
        for pair in PAIRS:
            if held_cents(before[pair]) == held_cents(after[pair]) or pair in app_writes:
                continue
            cents = held_cents(after[pair])
            rows = [a for a in audit if a["client_id"] == after[pair]["_id"] and a["creditor_pos"] == pair[1]
                    and a["pg_amount_cents"] == cents]
            assert rows, f"{pair}: MongoDB changed to {cents} cents in report {report['id']} without an audit row: {audit}"
            if report["status"] == "completed" and verified:
                assert any(a["action"] == "repaired" for a in rows), rows

    def _check_counts(self, report: dict) -> None:
        audit = self.stores.rows("SELECT kind, action FROM reconciliation_findings_current WHERE report_id = :r", r=report["id"])
        outbox = [a["action"] for a in audit if a["kind"] == "outbox_delivery"]
        diff = [a["action"] for a in audit if a["kind"] != "outbox_delivery"]
        assert report["auto_repaired"] == diff.count("repaired"), (report, diff)
        assert report["mismatches_found"] == len(diff), (report, diff)
        assert report["outbox_succeeded"] == outbox.count("repaired"), (report, outbox)
        assert report["outbox_superseded"] == outbox.count("superseded"), (report, outbox)
        assert report["outbox_retried"] == report["outbox_succeeded"] + report["outbox_failed"], report

    def _check_quiet_run(self, plan: RunPlan, pending: set, after: dict) -> None:
        start = plan.partition_end - timedelta(hours=plan.lookback)
        compared = {
            (r["az"], next(i for i, (address, _) in enumerate(CREDITORS) if address == r["from_email"]))
            for r in self.stores.rows(
                "SELECT extracted_data->>'client_aktenzeichen' AS az, from_email FROM incoming_emails "
                "WHERE created_at >= :s AND created_at < :e", s=start, e=plan.partition_end)
        }
        for pair in sorted(pending | compared):
            newest = self.world.newest(pair)
            assert newest is not None
            assert held_cents(after[pair]) == newest.cents, (
                f"after a quiet run {pair} holds {held_cents(after[pair])}, the newest statement is {newest}; "
                f"all: {sorted(self.world.statements[pair], key=lambda s: s.key)}"
            )
        stuck = self.stores.rows("SELECT id FROM reconciliation_findings_current WHERE error = :e", e=IN_FLIGHT)
        assert not stuck, f"writes left unverified after a quiet run: {stuck}"
        left = self.stores.rows("SELECT id, payload FROM outbox_messages WHERE processed_at IS NULL AND retry_count < max_retries")
        assert not left, f"outbox messages still pending after a quiet run: {left}"

    def teardown(self) -> None:
        """Every history ends with a quiet run of the current partition over the whole history."""
        self.mongo_down = False
        self._run(self._plan("current", 0, 48), None, timedelta(0))
        stats = type(self).stats
        stats["histories"] = stats.get("histories", 0) + 1
        stats["statements"] = stats.get("statements", 0) + sum(len(v) for v in self.world.statements.values())

    @invariant()
    def mongo_holds_only_stated_amounts_with_their_time(self):
        for pair, element in element_state(self.stores.db).items():
            frozen = {k: v for k, v in element.items() if k not in ELEMENT_WRITABLE}
            assert frozen == self.frozen[pair], f"{pair}: a field outside the writer's set changed: {frozen} != {self.frozen[pair]}"
            cents = held_cents(element)
            if cents is None:
                continue
            assert cents not in self.world.poison_cents
            statement = self.world.by_cents.get(cents)
            assert statement is not None, f"{pair} holds {cents} cents, an amount nobody stated"
            assert try_cents(element.get("current_debt_amount"))[0] == cents, element
            assert ms(element["response_received_at"]) == ms(statement.stated_at), (pair, element, statement)


@pytest.fixture
def model_stores(pg_url, pg_engine, mongo_client, service_env, tmp_path):
    stores = Stores(pg_url, pg_engine, service_env["RECON_MONGO_URI"], mongo_client, tmp_path)
    yield stores
    mongo_client.drop_database(stores.db_name)


def test_random_histories_never_move_mongodb_backwards(model_stores, pg):
    print(f"model histories: seed {SEED}, {EXAMPLES} histories of up to {STEPS} steps; "
          f"replay: RECON_MODEL_SEED={SEED} make test PYTEST_ARGS='-k test_random_histories'")
    ReconciliationHistories.stores = model_stores
    ReconciliationHistories.stats = {}
    machine = seed(SEED)(ReconciliationHistories)
    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None, print_blob=True,
            suppress_health_check=list(HealthCheck),
        ))
    except BaseException:
        print(f"FAILED with seed {SEED}: replay with RECON_MODEL_SEED={SEED}")
        raise
    stats = ReconciliationHistories.stats
    print(f"model histories: done; {json.dumps(stats, sort_keys=True)}; dagster CLI runs took "
          f"{[round(s, 1) for s in model_stores.cli_seconds]} s")
    assert stats.get("quiet_runs_checked", 0) > 0 and stats.get("pairs_moved_by_runs", 0) > 0, stats
