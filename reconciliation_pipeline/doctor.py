"""`python -m reconciliation_pipeline.doctor`: preflight checks of the configured deployment.

Checks (pure functions returning `Check`s; printing is separate): PostgreSQL (connection, version,
privileges, migrations at head, indexes), MongoDB (reachable, version, topology, `clients` and its
indexes, find/update allowed), a semantics self-test of the pipeline's own query and write shapes on
a scratch collection it creates and drops, and the Dagster instance. Exit 1 when any check FAILs.
"""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from bson import ObjectId
from pymongo import UpdateOne, WriteConcern
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from reconciliation_pipeline.core import repair as core_repair
from reconciliation_pipeline.core.keys import last_name_patterns
from reconciliation_pipeline.resources import (
    CLIENTS_COLLECTION, MongoResource, PostgresResource, WeakWriteConcernError, parse_write_concern,
)
from reconciliation_pipeline.store import mongo as mongo_store

OK, WARN, FAIL = "ok", "warn", "FAIL"
MONGO_WRITER_POOL = "reconciliation_mongo_writer"  # ops.MONGO_WRITER_POOL (ops imports Dagster's op layer)

# What the pipeline's statements need (RULES.md sections 1, 5, 6 and store/postgres.py). `SELECT ...
# FOR UPDATE SKIP LOCKED` in the batched deletes needs UPDATE as well as DELETE.
REQUIRED_PRIVILEGES = {
    "incoming_emails": ("SELECT", "UPDATE"),
    "outbox_messages": ("SELECT", "UPDATE", "DELETE"),
    "idempotency_keys": ("SELECT", "UPDATE", "DELETE"),
    "reconciliation_reports": ("SELECT", "INSERT", "UPDATE"),
    "reconciliation_findings": ("SELECT", "INSERT"),  # append-only (migration 0006): outcomes are new rows
    "reconciliation_findings_current": ("SELECT",),  # the view: each finding with its newest outcome
    "reconciliation_drift": ("SELECT", "INSERT", "UPDATE"),
    "reconciliation_audit_checkpoints": ("SELECT", "INSERT"),
    "reconciliation_alembic_version": ("SELECT",),
}
SEQUENCES_OF = ("reconciliation_reports", "reconciliation_findings", "reconciliation_drift", "reconciliation_audit_checkpoints")  # bigserial ids the INSERTs draw
# Indexes of the pipeline's own tables (migrations 0001, 0003 and 0005); those on the application's
# tables come from migration 0002 itself (`INDEXES`).
PIPELINE_TABLE_INDEXES = {
    "ix_reconciliation_reports_partition_key": "reconciliation_reports",
    "ix_reconciliation_reports_running": "reconciliation_reports",
    "ix_reconciliation_findings_report_id": "reconciliation_findings",
    "ix_reconciliation_findings_email_id": "reconciliation_findings",
    "ix_recon_findings_unverified": "reconciliation_findings",
    "ix_recon_findings_outbox_message_id": "reconciliation_findings",
    "ix_recon_findings_intent_id": "reconciliation_findings",
    "ix_reconciliation_drift_open": "reconciliation_drift",
    "ix_reconciliation_drift_pair": "reconciliation_drift",
    "ix_reconciliation_drift_email_id": "reconciliation_drift",
}
MONGO_INDEXES = {"aktenzeichen": [("aktenzeichen", 1)], "lastName": [("lastName", 1)]}


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    area: str
    name: str
    status: str
    detail: str = ""
    fix: str = ""


def failed(checks: Iterable[Check]) -> list[Check]:
    """The FAILed checks."""
    return [c for c in checks if c.status == FAIL]


def format_table(checks: Iterable[Check]) -> str:
    """One line per check: status, area, name, detail, and what to do when it is not ok."""
    lines = []
    for c in checks:
        line = f"{c.status:<4}  {c.area:<9} {c.name:<34} {c.detail}"
        if c.fix and c.status != OK:
            line += f"\n{'':<16}-> {c.fix}"
        lines.append(line.rstrip())
    bad = failed(checks)
    lines.append(f"{len(bad)} FAIL, {sum(c.status == WARN for c in checks)} warn, {sum(c.status == OK for c in checks)} ok")
    return "\n".join(lines)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


# =============================================================================== PostgreSQL


def expected_pg_indexes() -> dict[str, str]:
    """index name -> table, for every index the migrations create."""
    from alembic.script import ScriptDirectory

    from reconciliation_pipeline.db import alembic_config

    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    app = script.get_revision("0002").module.INDEXES
    out = {name: definition.split()[0] for name, definition in app.items()}
    out.update(PIPELINE_TABLE_INDEXES)
    return out


def check_postgres(url: str) -> list[Check]:
    """Connection, version, privileges, alembic revision and indexes of the application database."""
    area = "postgres"
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from reconciliation_pipeline.db import alembic_config
    VERSION_TABLE = "reconciliation_alembic_version"  # migrations/env.py (runs only inside alembic)

    checks: list[Check] = []
    try:
        with PostgresResource(url=url, statement_timeout_ms=30_000).get_engine() as engine, engine.connect() as conn:
            user, version = conn.execute(sa.text("SELECT current_user, current_setting('server_version_num')::int")).one()
            checks.append(Check(area, "connect", OK, f"as role {user}"))
            major = version // 10000
            checks.append(Check(area, "server version", OK if major >= 13 else WARN, f"PostgreSQL {version // 10000}.{version % 10000}",
                                "" if major >= 13 else "the pipeline is tested on PostgreSQL 15; 13+ is expected"))
            existing = set(conn.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "UNION SELECT viewname FROM pg_views WHERE schemaname = current_schema()")).scalars())
            for table, needed in REQUIRED_PRIVILEGES.items():
                if table not in existing:
                    checks.append(Check(area, f"table {table}", FAIL, "missing",
                                        "python -m reconciliation_pipeline.db upgrade" if table.startswith("reconciliation_") else
                                        "RECON_POSTGRES_URL must point at the application's database"))
                    continue
                missing = [p for p in needed if not conn.execute(sa.text("SELECT has_table_privilege(:t, :p)"), {"t": table, "p": p}).scalar()]
                checks.append(Check(area, f"privileges {table}", FAIL if missing else OK,
                                    f"missing {', '.join(missing)}" if missing else ", ".join(needed),
                                    f"GRANT {', '.join(missing)} ON {table} TO {user};" if missing else ""))
            for table in SEQUENCES_OF:
                if table not in existing:
                    continue
                seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar()
                if seq and not conn.execute(sa.text("SELECT has_sequence_privilege(:s, 'USAGE')"), {"s": seq}).scalar():
                    checks.append(Check(area, f"sequence {seq}", FAIL, "no USAGE (INSERTs fail)", f"GRANT USAGE ON SEQUENCE {seq} TO {user};"))
            head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
            current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision() \
                if VERSION_TABLE in existing else None
            checks.append(Check(area, "migrations", OK if current == head else FAIL, f"at {current or 'none'}, head {head}",
                                "python -m reconciliation_pipeline.db upgrade"))
            rows = conn.execute(sa.text(
                "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
            )).all()
            present = {name: valid for name, valid in rows}
            expected = expected_pg_indexes()
            absent = sorted(n for n in expected if n not in present)
            invalid = sorted(n for n in expected if present.get(n) is False)
            detail = f"{len(expected) - len(absent) - len(invalid)}/{len(expected)} present and valid"
            if absent:
                detail += f"; missing {', '.join(absent)}"
            if invalid:
                detail += f"; INVALID (an interrupted CREATE INDEX CONCURRENTLY) {', '.join(invalid)}"
            fix = ("DROP INDEX CONCURRENTLY the invalid ones, then " if invalid else "") + "python -m reconciliation_pipeline.db upgrade"
            checks.append(Check(area, "indexes", FAIL if absent or invalid else OK, detail, fix))
    except sa.exc.SQLAlchemyError as exc:
        checks.append(Check(area, "connect", FAIL, _short(exc).replace(url, "<RECON_POSTGRES_URL>"),
                            "check RECON_POSTGRES_URL, the server and pg_hba.conf"))
    return checks


# =============================================================================== MongoDB


def create_index_command(database: str, field: str) -> str:
    """The mongosh command that creates the index the pipeline needs on `clients.<field>`."""
    return f'use {database}; db.{CLIENTS_COLLECTION}.createIndex({{"{field}": 1}})'


def check_mongo(mongo: MongoResource) -> list[Check]:
    """Reachability, version, topology, write concern, `clients`, its indexes and find/update rights."""
    area = "mongodb"
    checks: list[Check] = []
    try:
        options = mongo.collection_options()
        checks.append(Check(area, "write concern setting", OK, f"w={options['write_concern'].document.get('w')}, reads: read concern majority, primary"))
    except WeakWriteConcernError as exc:
        return [Check(area, "write concern setting", FAIL, str(exc), "set mongo_write_concern: majority")]
    try:
        with mongo.get_client() as client:
            hello = client.admin.command("hello")
            build = client.admin.command("buildInfo")
            checks.append(Check(area, "reachable", OK, f"server {build.get('version', '?')}"
                                + (f" ({build['process']})" if build.get("process") not in (None, "mongod", "mongos") else "")))
            major = int(str(build.get("version", "0")).split(".")[0] or 0)
            checks.append(Check(area, "server version", OK if major >= 5 else FAIL, f"{build.get('version')}",
                                "" if major >= 5 else "MongoDB 5.0 or newer is required ($expr/$literal CAS, read concern majority)"))
            if hello.get("setName"):
                checks.append(Check(area, "topology", OK, f"replica set {hello['setName']} ({len(hello.get('hosts', []))} members)"))
            elif hello.get("msg") == "isdbgrid":
                checks.append(Check(area, "topology", OK, "sharded cluster (mongos)"))
            else:
                checks.append(Check(area, "topology", WARN, "standalone server: w=majority is one node, a lost disk loses repaired writes",
                                    "production should be a replica set"))
            checks.append(_write_concern_honoured(client[mongo.database], hello))
            db = client[mongo.database]
            if CLIENTS_COLLECTION not in db.list_collection_names():
                checks.append(Check(area, "collection clients", FAIL, f"no collection {CLIENTS_COLLECTION!r} in database {mongo.database!r}",
                                    "check RECON_MONGO_DB"))
                return checks
            checks.append(Check(area, "collection clients", OK, f"database {mongo.database}"))
            keys = [list(spec["key"]) for spec in db[CLIENTS_COLLECTION].index_information().values()]
            for field, wanted in MONGO_INDEXES.items():
                has = any([tuple(k) for k in key][:1] == [tuple(w) for w in wanted] for key in keys)
                checks.append(Check(area, f"index clients.{field}", OK if has else FAIL, "present" if has else "missing",
                                    "" if has else create_index_command(mongo.database, field)))
            coll = db.get_collection(CLIENTS_COLLECTION, **options)
            coll.find_one({}, {"_id": 1})
            result = coll.update_one({"_id": ObjectId(), "aktenzeichen": {"$exists": False}}, {"$set": {"reconciliation_doctor_probe": 1}})
            checks.append(Check(area, "find and update allowed", OK, f"find ok, update ok (matched {result.matched_count})"))
    except OperationFailure as exc:
        checks.append(Check(area, "find and update allowed", FAIL, _short(exc), "grant the role readWrite on the portal database"))
    except (PyMongoError, KeyError, OSError) as exc:
        checks.append(Check(area, "reachable", FAIL, _short(exc), "check RECON_MONGO_URI, the network and the server"))
    return checks


def _write_concern_honoured(db, hello: dict) -> Check:
    """A write concern naming no member tag must be refused by a server that honours write concerns."""
    name = f"reconciliation_doctor_wc_{uuid.uuid4().hex[:8]}"
    # through pymongo's write path: a server may refuse the command or answer ok with a writeConcernError,
    # which insert_one raises as WriteConcernError (an OperationFailure); db.command would not
    probe = db.get_collection(name, write_concern=WriteConcern(w="no_such_tag_recon_doctor", wtimeout=1000))
    try:
        probe.insert_one({"probe": 1})
        honoured = False
    except OperationFailure:
        honoured = True
    finally:
        db.drop_collection(name)
    if honoured:
        return Check("mongodb", "write concern honoured", OK, "an unknown write concern tag is refused")
    return Check("mongodb", "write concern honoured", WARN,
                 "the server acknowledged an impossible write concern: it ignores write concerns (the nx-27017 stand-in does); "
                 "majority cannot be verified here", "point RECON_MONGO_URI at a real MongoDB replica set for production")


# =============================================================================== semantics self-test


def check_semantics(mongo: MongoResource) -> list[Check]:
    """The pipeline's query and write shapes on a scratch collection, each result checked."""
    try:
        with mongo.get_collection(f"reconciliation_doctor_{uuid.uuid4().hex[:10]}") as coll:
            try:
                return [_run_case("semantics", name, case, coll) for name, case in SEMANTIC_CASES]
            finally:
                coll.drop()
    except (PyMongoError, KeyError, OSError, WeakWriteConcernError) as exc:
        return [Check("semantics", "scratch collection", FAIL, _short(exc))]


def _run_case(area: str, name: str, case: Callable, coll) -> Check:
    coll.delete_many({})
    try:
        detail = case(coll)
        return Check(area, name, OK, detail)
    except AssertionError as exc:
        return Check(area, name, FAIL, f"server answered differently: {exc}"[:400], "this server does not behave like MongoDB; do not point the pipeline at it")
    except PyMongoError as exc:
        return Check(area, name, FAIL, _short(exc), "this server does not behave like MongoDB; do not point the pipeline at it")


AT_MS = datetime(2026, 3, 29, 1, 59, 59, 123456, tzinfo=timezone.utc)  # stored as ...59.123


def _creditors() -> list[dict]:
    return [
        {"sender_name": "$ne Inkasso", "sender_email": "$where@inkasso.example", "claim_amount": 100,
         "creditor_response_amount": 100, "response_received_at": AT_MS, "tags": ["$x", "$$y"]},
        {"sender_name": "Sparkasse", "sender_email": "f@sparkasse.example", "claim_amount": 1500.0,
         "creditor_response_amount": 12.5, "last_contacted_at": AT_MS},
    ]


def _update(pos: int, element: dict, cents: int, key: str) -> core_repair.ElementUpdate:
    return core_repair.ElementUpdate(key=key, pos=pos, sender_email=element["sender_email"], sender_name=element["sender_name"],
                                     cents=cents, received_at=AT_MS, observed_amount=element.get("creditor_response_amount"))


def _case_round_trip(coll) -> str:
    oid = coll.insert_one({"aktenzeichen": "RT-1", "final_creditor_list": _creditors()}).inserted_id
    doc = mongo_store.fetch_by_ids(coll, [str(oid)], 10)[str(oid)]
    first, second = doc["final_creditor_list"]
    assert type(first["creditor_response_amount"]) is int and type(second["claim_amount"]) is float, "int/double types not kept"
    assert first["response_received_at"] == AT_MS.replace(microsecond=123000), f"datetime read back as {first['response_received_at']!r}"
    assert first["sender_name"] == "$ne Inkasso", "a string starting with $ changed"
    return "ints stay ints, doubles doubles, datetimes to the ms, '$' strings as written"


def _matches(coll, query: dict) -> int:
    # find, as the pipeline reads (count_documents goes through an aggregation the pipeline never sends)
    return len(list(coll.find(query, {"_id": 1})))


def _case_cas_applies(coll) -> str:
    oid = coll.insert_one({"aktenzeichen": "CAS-1", "final_creditor_list": _creditors(), "other": "kept"}).inserted_id
    docs = mongo_store.fetch_by_ids(coll, [oid], 10)
    observed = docs[str(oid)]["final_creditor_list"]
    # the list as read matches (its ints and doubles, '$' strings and ms datetimes as stored); one changed
    # number or a datetime 1 ms later does not
    assert _matches(coll, mongo_store._cas_filter(oid, observed)) == 1, "the list as read does not match itself"
    for changed in ([dict(observed[0], creditor_response_amount=101), observed[1]],
                    [observed[0], dict(observed[1], creditor_response_amount=12.25)],
                    [dict(observed[0], response_received_at=AT_MS.replace(microsecond=124000)), observed[1]]):
        assert _matches(coll, mongo_store._cas_filter(oid, changed)) == 0, f"a changed list matched: {changed}"
    outcomes = mongo_store.write_updates(coll, docs, {str(oid): [_update(0, observed[0], 4_200, "a"), _update(1, observed[1], 99, "b")]}, 10)
    assert {k: o.action for k, o in outcomes.items()} == {"a": core_repair.REPAIRED, "b": core_repair.REPAIRED}, f"outcomes {outcomes}"
    after = coll.find_one({"_id": oid})
    assert after["final_creditor_list"][0]["creditor_response_amount"] == 42.0 and after["final_creditor_list"][1]["creditor_response_amount"] == 0.99
    assert after["final_creditor_list"][0]["claim_amount"] == 100 and after["other"] == "kept", "fields outside the update changed"
    return "$expr/$literal CAS on the whole list ('$' strings, int==double, ms datetimes), write + read-back repaired"


def _case_cas_refuses_changed_array(coll) -> str:
    oid = coll.insert_one({"aktenzeichen": "CAS-2", "final_creditor_list": _creditors()}).inserted_id
    docs = mongo_store.fetch_by_ids(coll, [oid], 10)
    observed = docs[str(oid)]["final_creditor_list"]
    changed = [observed[0], dict(observed[1], creditor_response_amount=13.0)]
    coll.update_one({"_id": oid}, {"$set": {"final_creditor_list": changed}})  # the application's write in between
    outcomes = mongo_store.write_updates(coll, docs, {str(oid): [_update(0, observed[0], 4_200, "a")]}, 10)
    assert outcomes["a"].action == core_repair.SKIPPED_CONCURRENT_CHANGE, f"outcome {outcomes['a']}"
    after = coll.find_one({"_id": oid})["final_creditor_list"]
    assert after[0]["creditor_response_amount"] == 100 and after[1]["creditor_response_amount"] == 13.0, "the CAS wrote over a changed list"
    return "a list changed since it was read is not written (skipped_concurrent_change)"


def _case_in_batches_and_projection(coll) -> str:
    coll.insert_many([{"aktenzeichen": f"AZ-{i}", "firstName": "F", "lastName": "L", "final_creditor_list": [], "secret": "x"} for i in range(7)])
    coll.insert_one({"aktenzeichen": {"$ne": None}, "final_creditor_list": []})
    asked = [f"AZ-{i}" for i in range(0, 9, 2)] + [{"$ne": None}, "AZ-1\x00"]
    batches = list(mongo_store.iter_clients_by_aktenzeichen(coll, asked, 2))
    got = sorted(d["aktenzeichen"] for _, docs in batches for d in docs)
    assert got == ["AZ-0", "AZ-2", "AZ-4", "AZ-6"], f"$in batches returned {got}"
    assert len(batches) == 3, f"{len(batches)} batches for 5 plain keys in batches of 2"
    fields = {k for _, docs in batches for d in docs for k in d}
    assert fields == {"_id", "aktenzeichen", "firstName", "lastName", "final_creditor_list"}, f"projection returned {sorted(fields)}"
    return "$in batches of the plain keys only, projected to the compared fields"


NAME_DOCS = {
    "nfc": unicodedata.normalize("NFC", "Müller"), "nfd": unicodedata.normalize("NFD", "Müller"), "upper": "MÜLLER",
    "spaced": "  müller ", "plain_u": "Muller", "longer": "Müllerson", "sz": "Strauß", "ss_upper": "STRAUSS",
    "dot": "A.B", "dot_like": "AxB",
}


def _case_name_regexes(coll) -> str:
    coll.insert_many([{"aktenzeichen": f"N-{k}", "lastName": v, "final_creditor_list": []} for k, v in NAME_DOCS.items()])
    patterns = last_name_patterns(pd.Series(["Müller, Max", "Anna Strauss", "A.B, X"]))
    found = {d["aktenzeichen"][2:] for d in mongo_store.fetch_clients(coll, (), patterns, 1000)}
    expected = {"nfc", "nfd", "upper", "spaced", "sz", "ss_upper", "dot"}
    assert found == expected, f"found {sorted(found)}, expected {sorted(expected)}"
    assert len(mongo_store.combined_patterns(patterns)) == 1, "patterns were not combined into one alternation"
    return "anchored, escaped, case-insensitive lastName regexes: NFC and NFD, ß and ss, no prefix or metacharacter matches"


def _case_bulk_unordered(coll) -> str:
    ids = coll.insert_many([{"aktenzeichen": f"B-{i}", "final_creditor_list": [{"n": i}]} for i in range(3)]).inserted_ids
    ops = [
        UpdateOne(mongo_store._cas_filter(ids[0], [{"n": 0}]), {"$set": {"final_creditor_list": [{"n": 10}]}}),
        UpdateOne({"_id": ids[1]}, {"$inc": {"aktenzeichen": 1}}),  # fails: $inc on a string
        UpdateOne(mongo_store._cas_filter(ids[2], [{"n": 2}]), {"$set": {"final_creditor_list": [{"n": 12}]}}),
    ]
    try:
        coll.bulk_write(ops, ordered=False)
        raise AssertionError("$inc on a string was accepted")
    except BulkWriteError as exc:
        errors = [e["index"] for e in exc.details.get("writeErrors", [])]
        assert errors == [1], f"write errors at {errors}"
    lists = {d["aktenzeichen"]: d["final_creditor_list"] for d in mongo_store.fetch_by_ids(coll, ids, 10).values()}
    assert lists == {"B-0": [{"n": 10}], "B-1": [{"n": 1}], "B-2": [{"n": 12}]}, f"after the bulk: {lists}"
    return "bulk_write ordered=False applies every other write past a failed one; the read-back by _id sees them"


SEMANTIC_CASES = [
    ("types round-trip", _case_round_trip),
    ("compare-and-swap write", _case_cas_applies),
    ("compare-and-swap refuses changes", _case_cas_refuses_changed_array),
    ("$in batches and projection", _case_in_batches_and_projection),
    ("name regexes", _case_name_regexes),
    ("bulk_write ordered=False", _case_bulk_unordered),
]


# =============================================================================== Dagster


def check_dagster(dagster_home: str | None) -> list[Check]:
    """DAGSTER_HOME, its storage, and the writer pool's slot count."""
    area = "dagster"
    if not dagster_home:
        return [Check(area, "DAGSTER_HOME", FAIL, "not set", "export DAGSTER_HOME=<directory with this repo's dagster.yaml>")]
    if not (Path(dagster_home) / "dagster.yaml").is_file():
        return [Check(area, "DAGSTER_HOME", FAIL, f"no dagster.yaml in {dagster_home}", "copy the repo's dagster.yaml there")]
    checks = [Check(area, "DAGSTER_HOME", OK, dagster_home)]
    import dagster as dg

    try:
        with dg.DagsterInstance.from_config(dagster_home) as instance:
            instance.get_runs(limit=1)
            checks.append(Check(area, "storage", OK, type(instance.run_storage).__name__))
            limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
            if MONGO_WRITER_POOL in limits:
                slots = limits[MONGO_WRITER_POOL]
                checks.append(Check(area, f"pool {MONGO_WRITER_POOL}", OK if slots == 1 else FAIL, f"{slots} slot(s)",
                                    f"dagster instance concurrency set {MONGO_WRITER_POOL} 1"))
            else:
                default = instance.get_concurrency_config().pool_config.default_pool_limit
                checks.append(Check(area, f"pool {MONGO_WRITER_POOL}", OK if default == 1 else FAIL,
                                    f"not set yet; default_limit {default} applies",
                                    f"dagster instance concurrency set {MONGO_WRITER_POOL} 1  (before the first runs)"))
    except Exception as exc:  # noqa: BLE001 - any storage error is the finding
        checks.append(Check(area, "storage", FAIL, _short(exc), "check dagster.yaml and DAGSTER_POSTGRES_URL"))
    return checks


# =============================================================================== entry points


def run_checks(pg_url: str | None, mongo: MongoResource | None, dagster_home: str | None, dagster: bool = True) -> list[Check]:
    """Every check, in the order they are printed."""
    checks = check_postgres(pg_url) if pg_url else [Check("postgres", "RECON_POSTGRES_URL", FAIL, "not set")]
    if mongo is None:
        checks.append(Check("mongodb", "RECON_MONGO_URI", FAIL, "RECON_MONGO_URI / RECON_MONGO_DB not set"))
    else:
        mongo_checks = check_mongo(mongo)
        checks += mongo_checks
        if not any(c.name == "reachable" and c.status == FAIL for c in mongo_checks):
            checks += check_semantics(mongo)
    if dagster:
        checks += check_dagster(dagster_home)
    return checks


def checks_from_environment(**mongo_options) -> list[Check]:
    """run_checks with the job's environment variables; a refused write concern FAILs and the rest still runs."""
    uri, database = os.environ.get("RECON_MONGO_URI"), os.environ.get("RECON_MONGO_DB")
    refused = None
    try:
        parse_write_concern(mongo_options.get("mongo_write_concern", "majority"), mongo_options.get("allow_weak_write_concern", False))
    except WeakWriteConcernError as exc:
        refused = Check("mongodb", "write concern setting", FAIL, str(exc), "set mongo_write_concern: majority")
        mongo_options = {k: v for k, v in mongo_options.items() if k not in ("mongo_write_concern", "allow_weak_write_concern")}
    mongo = MongoResource(uri=uri, database=database, **mongo_options) if uri and database else None
    checks = run_checks(os.environ.get("RECON_POSTGRES_URL"), mongo, os.environ.get("DAGSTER_HOME"))
    if refused is not None:
        checks = [refused if c.name == refused.name else c for c in checks]
        if refused not in checks:
            checks.append(refused)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciliation_pipeline.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--mongo-write-concern", default="majority")
    parser.add_argument("--allow-weak-write-concern", action="store_true")
    args = parser.parse_args(argv)
    checks = checks_from_environment(mongo_write_concern=args.mongo_write_concern, allow_weak_write_concern=args.allow_weak_write_concern)
    print(format_table(checks))
    return 1 if failed(checks) else 0


if __name__ == "__main__":
    sys.exit(main())
