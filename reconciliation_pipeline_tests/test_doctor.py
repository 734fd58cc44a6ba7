"""The preflight doctor: passes on the dev services, FAILs on purpose for each broken precondition.

Real services only: the embedded PostgreSQL (roles and databases created here) and the MongoDB
wire server over pymongo; the CLI and the preflight job run as an operator would run them.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from pymongo import monitoring
from sqlalchemy.engine import make_url

from reconciliation_pipeline import doctor
from reconciliation_pipeline.db import create_app_tables, upgrade
from reconciliation_pipeline.resources import MongoResource, WeakWriteConcernError
from reconciliation_pipeline.store import postgres as pg_store
from reconciliation_pipeline_tests.support import REPO, free_port, scratch_database


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def portal(mongo_db: Any) -> Any:
    """A portal database with `clients` and both indexes, as a deployment must have it."""
    mongo_db.create_collection("clients")
    mongo_db.clients.create_index([("aktenzeichen", 1)])
    mongo_db.clients.create_index([("lastName", 1)])
    return mongo_db


def _mongo(service_env: dict[str, str], database: str, **kw: Any) -> MongoResource:
    return MongoResource(uri=service_env["RECON_MONGO_URI"], database=database, server_selection_timeout_ms=3000, **kw)


def _doctor_cli(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciliation_pipeline.doctor"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _dev_env(service_env: dict[str, str], **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(service_env)
    env.update(overrides)
    return env


def _exports(stdout: str) -> dict[str, str]:
    """The variables of `devservices up`'s `export NAME='value'` lines."""
    return {name: shlex.split(value)[0] for name, value in
            (line.removeprefix("export ").split("=", 1) for line in stdout.splitlines() if line.startswith("export "))}


def test_doctor_passes_on_the_dev_services(service_env: dict[str, str], mongo_db: Any) -> None:
    """`devservices up` (which creates `clients` and its indexes), `make tables`, then the doctor CLI: 0 FAIL.
    The portal database is a fresh one, so the indexes the doctor finds are the ones `up` created."""
    assert mongo_db.name not in mongo_db.client.list_database_names()
    env = _dev_env(service_env, RECON_MONGO_DB=mongo_db.name)
    up = subprocess.run([sys.executable, "-m", "reconciliation_pipeline.devservices", "up"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    env.update(_exports(up.stdout))
    assert env["RECON_MONGO_DB"] == mongo_db.name
    indexes = [spec["key"] for spec in mongo_db.clients.index_information().values()]
    assert [("aktenzeichen", 1)] in indexes and [("lastName", 1)] in indexes, indexes
    for command in ("create-app-tables", "upgrade"):  # make tables
        step = subprocess.run([sys.executable, "-m", "reconciliation_pipeline.db", command], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert step.returncode == 0, step.stdout + step.stderr
    result = _doctor_cli(env)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\n0 FAIL," in result.stdout
    for name in ("migrations", "indexes", "index clients.aktenzeichen", "index clients.lastName", "compare-and-swap write",
                 "compare-and-swap refuses changes", "name regexes", "bulk_write ordered=False", "$in batches and projection",
                 "types round-trip", "storage", "pool reconciliation_mongo_writer", "privileges incoming_emails"):
        assert any(line.startswith("ok") and f" {name} " in line + " " for line in result.stdout.splitlines()), (name, result.stdout)


def test_doctor_cli_fails_when_mongodb_is_unreachable(service_env: dict[str, str]) -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true&serverSelectionTimeoutMS=1000"
    result = _doctor_cli(_dev_env(service_env, RECON_MONGO_URI=uri))
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if " reachable " in line)
    assert line.startswith("FAIL") and "mongodb" in line, result.stdout
    assert "semantics" not in result.stdout  # no self-test against a server that is not there


def test_missing_index_fails_with_the_create_index_command(service_env: dict[str, str], mongo_db: Any) -> None:
    mongo_db.create_collection("clients")
    mongo_db.clients.create_index([("aktenzeichen", 1)])
    checks = _by_name(doctor.check_mongo(_mongo(service_env, mongo_db.name)))
    assert checks["index clients.aktenzeichen"].status == doctor.OK
    missing = checks["index clients.lastName"]
    assert missing.status == doctor.FAIL
    assert missing.fix == f'use {mongo_db.name}; db.clients.createIndex({{"lastName": 1}})'
    mongo_db.clients.create_index([("lastName", 1)])
    assert _by_name(doctor.check_mongo(_mongo(service_env, mongo_db.name)))["index clients.lastName"].status == doctor.OK


def test_missing_clients_collection_fails(service_env: dict[str, str], mongo_db: Any) -> None:
    checks = _by_name(doctor.check_mongo(_mongo(service_env, mongo_db.name)))
    assert checks["collection clients"].status == doctor.FAIL


@contextmanager
def _role(pg_url: str, grants: list[str]) -> Iterator[str]:
    """A LOGIN role with exactly `grants` in the database of `pg_url`; yields its URL; dropped after."""
    name = f"recon_doctor_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{name}" LOGIN'))
        for grant in grants:
            conn.execute(sa.text(grant.format(role=f'"{name}"')))
    try:
        yield make_url(pg_url).set(username=name, password=None).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :n"), {"n": name})
            conn.execute(sa.text(f'DROP OWNED BY "{name}"'))
            conn.execute(sa.text(f'DROP ROLE "{name}"'))
        admin.dispose()


def _grants_except(table: str, privilege: str) -> list[str]:
    out = []
    for t, privileges in doctor.REQUIRED_PRIVILEGES.items():
        kept = [p for p in privileges if (t, p) != (table, privilege)]
        if kept:
            out.append(f"GRANT {', '.join(kept)} ON {t} TO {{role}}")
    out += [f"GRANT USAGE ON SEQUENCE {t}_id_seq TO {{role}}" for t in doctor.SEQUENCES_OF]
    return out


@pytest.fixture
def scratch_pg(pg_url: str) -> Iterator[str]:
    """A scratch database with the application's tables and the migrations at head (psycopg 3 URL)."""
    with scratch_database(pg_url, prefix="recon_doctor") as url:
        url = make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        create_app_tables(url)
        upgrade(url)
        yield url


def test_role_without_update_on_incoming_emails_fails(scratch_pg: str) -> None:
    with _role(scratch_pg, _grants_except("nothing", "")) as full:
        checks = _by_name(doctor.check_postgres(full))
        assert all(c.status == doctor.OK for c in checks.values()), checks
    with _role(scratch_pg, _grants_except("incoming_emails", "UPDATE")) as url:
        checks = _by_name(doctor.check_postgres(url))
        bad = checks["privileges incoming_emails"]
        assert bad.status == doctor.FAIL and bad.detail == "missing UPDATE"
        assert bad.fix.startswith("GRANT UPDATE ON incoming_emails TO recon_doctor_")
        assert [c.name for c in doctor.failed(checks.values())] == ["privileges incoming_emails"]


def test_the_batched_delete_of_expired_keys_needs_update_too(scratch_pg: str) -> None:
    """Why REQUIRED_PRIVILEGES lists UPDATE on idempotency_keys: SELECT ... FOR UPDATE needs it."""
    with _role(scratch_pg, _grants_except("idempotency_keys", "UPDATE")) as url:
        engine = sa.create_engine(url)
        try:
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                with engine.begin() as conn:
                    conn.execute(pg_store.DELETE_EXPIRED_KEYS, {"n": 10})
        finally:
            engine.dispose()
        assert _by_name(doctor.check_postgres(url))["privileges idempotency_keys"].status == doctor.FAIL
    with _role(scratch_pg, _grants_except("nothing", "")) as url:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(pg_store.DELETE_EXPIRED_KEYS, {"n": 10})
        finally:
            engine.dispose()


def test_migrations_behind_fail(pg_url: str) -> None:
    """One migration behind head: FAIL with the upgrade command; after the upgrade: ok."""
    from alembic.script import ScriptDirectory

    from reconciliation_pipeline.db import alembic_config

    script = ScriptDirectory.from_config(alembic_config(pg_url))
    head = script.get_current_head()
    behind = script.get_revision(head).down_revision
    with scratch_database(pg_url, prefix="recon_doctor") as url:
        url = make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        create_app_tables(url)
        upgrade(url, revision=behind)
        checks = _by_name(doctor.check_postgres(url))
        assert checks["migrations"].status == doctor.FAIL
        assert checks["migrations"].detail == f"at {behind}, head {head}"
        assert checks["migrations"].fix == "python -m reconciliation_pipeline.db upgrade"
        upgrade(url)
        assert _by_name(doctor.check_postgres(url))["migrations"].status == doctor.OK


def test_missing_postgres_index_fails(scratch_pg: str) -> None:
    engine = sa.create_engine(scratch_pg, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("DROP INDEX ix_recon_outbox_messages_pending"))
    finally:
        engine.dispose()
    check = _by_name(doctor.check_postgres(scratch_pg))["indexes"]
    assert check.status == doctor.FAIL and "missing ix_recon_outbox_messages_pending" in check.detail


def test_semantics_self_test_passes_on_the_wire_server_and_drops_its_collection(service_env: dict[str, str], portal: Any) -> None:
    checks = doctor.check_semantics(_mongo(service_env, portal.name))
    assert [c.name for c in checks] == [name for name, _ in doctor.SEMANTIC_CASES]
    assert all(c.status == doctor.OK for c in checks), doctor.format_table(checks)
    assert portal.list_collection_names() == ["clients"]


def test_semantics_self_test_fails_on_a_server_that_answers_differently(service_env: dict[str, str], portal: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A CAS filter the server matches although the list changed is a FAIL (simulated by a filter
    that ignores the list, i.e. a server that answers `$expr` with true)."""
    from reconciliation_pipeline.store import mongo as mongo_store

    monkeypatch.setattr(mongo_store, "_cas_filter", lambda doc_id, observed: {"_id": doc_id})
    checks = _by_name(doctor.check_semantics(_mongo(service_env, portal.name)))
    assert checks["compare-and-swap write"].status == doctor.FAIL
    assert checks["compare-and-swap refuses changes"].status == doctor.FAIL


def test_dagster_checks(tmp_path: Any) -> None:
    assert doctor.check_dagster(None)[0].status == doctor.FAIL
    assert doctor.check_dagster(str(tmp_path))[0].status == doctor.FAIL  # no dagster.yaml
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    checks = _by_name(doctor.check_dagster(str(tmp_path)))
    assert checks["storage"].status == doctor.OK
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots(doctor.MONGO_WRITER_POOL, 2)
    pool = _by_name(doctor.check_dagster(str(tmp_path)))[f"pool {doctor.MONGO_WRITER_POOL}"]
    assert pool.status == doctor.FAIL and pool.detail == "2 slot(s)"
    assert pool.fix == f"dagster instance concurrency set {doctor.MONGO_WRITER_POOL} 1"


def test_preflight_job_passes_and_fails_with_the_table(service_env: dict[str, str], portal: Any, scratch_pg: str) -> None:
    from reconciliation_pipeline.jobs import reconciliation_preflight_job
    from reconciliation_pipeline.resources import PostgresResource

    resources = {"postgres": PostgresResource(url=scratch_pg), "mongo": _mongo(service_env, portal.name)}
    assert reconciliation_preflight_job.execute_in_process(resources=resources).success
    portal.clients.drop_index("lastName_1") if "lastName_1" in portal.clients.index_information() else \
        portal.clients.drop_index(next(n for n, i in portal.clients.index_information().items() if i["key"] == [("lastName", 1)]))
    result = reconciliation_preflight_job.execute_in_process(resources=resources, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("preflight_checks").error
    assert "FAIL  mongodb   index clients.lastName" in failure.message
    assert "db.clients.createIndex({\"lastName\": 1})" in failure.message


def test_weak_write_concern_is_refused_unless_allowed(service_env: dict[str, str], portal: Any) -> None:
    with pytest.raises(ValueError, match="mongo_write_concern 1 is refused.*allow_weak_write_concern"):
        _mongo(service_env, portal.name, mongo_write_concern="1")
    with pytest.raises(ValueError, match="0 .unacknowledged. is never allowed"):
        _mongo(service_env, portal.name, mongo_write_concern="0", allow_weak_write_concern=True)
    weak = _mongo(service_env, portal.name, mongo_write_concern="1", allow_weak_write_concern=True)
    with weak.get_clients_collection() as coll:
        assert coll.write_concern.document["w"] == 1
    assert issubclass(WeakWriteConcernError, ValueError)


def test_the_clients_collection_is_durable_and_the_wire_server_accepts_it(service_env: dict[str, str], portal: Any) -> None:
    """Writes with w=majority, reads with read concern majority from the primary; nx-27017 takes both
    (and ignores them, which the doctor reports as a warn)."""
    mongo = _mongo(service_env, portal.name)
    with mongo.get_clients_collection() as coll:
        assert coll.write_concern.document == {"w": "majority", "wtimeout": 30_000}
        assert coll.read_concern.level == "majority"
        assert coll.read_preference.mongos_mode == "primary"
        oid = coll.insert_one({"aktenzeichen": "WC-1", "final_creditor_list": []}).inserted_id
        assert coll.find_one({"_id": oid})["aktenzeichen"] == "WC-1"
    honoured = _by_name(doctor.check_mongo(mongo))["write concern honoured"]
    assert honoured.status == doctor.WARN and "ignores write concerns" in honoured.detail


class _ClientsCommands(monitoring.CommandListener):
    """Records the commands sent to one database's `clients` while `database` is set (pymongo command monitoring)."""

    def __init__(self) -> None:
        self.database: str | None = None
        self.commands: list[dict] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.database and event.database_name == self.database and event.command.get(event.command_name) == "clients":
            self.commands.append(dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


_LISTENER = _ClientsCommands()
monitoring.register(_LISTENER)  # applies to MongoClients created from now on (each resource block makes one)


def test_the_pipeline_writes_with_majority_and_reads_with_read_concern_majority(pg: sa.Engine, mongo_db: Any, reconcile) -> None:
    """A real run (outbox deliveries, repairs and their read-backs) as seen on the wire: every write to
    `clients` carries w=majority, every read readConcern majority."""
    from benchmarks import datagen
    from reconciliation_pipeline_tests.builders import WINDOW_END, reports

    datagen.generate(pg, mongo_db, emails=300, clients=30, creditors_per_client=4, drift=0.1, outbox=10, keys=4,
                     window_end=WINDOW_END, seed=7)
    _LISTENER.database, _LISTENER.commands = mongo_db.name, []
    try:
        reconcile()
    finally:
        _LISTENER.database = None
    report = reports(pg)[-1]
    assert report["status"] == "completed" and report["auto_repaired"] > 0 and report["outbox_succeeded"] > 0, report
    writes = [c for c in _LISTENER.commands if next(iter(c)) in ("update", "insert", "delete")]
    reads = [c for c in _LISTENER.commands if next(iter(c)) in ("find", "aggregate", "count", "distinct")]
    assert len(writes) >= 2, writes  # the outbox's bulk_write and the repair's (several updates of one document are one)
    assert writes and all(c.get("writeConcern") == {"w": "majority", "wtimeout": 30_000} for c in writes), \
        [c.get("writeConcern") for c in writes]
    assert len(reads) > 1 and all(c.get("readConcern") == {"level": "majority"} for c in reads), [c.get("readConcern") for c in reads]
    assert not any("$readPreference" in c and c["$readPreference"].get("mode") != "primary" for c in reads)


def test_a_weak_write_concern_in_run_config_fails_the_run_before_any_write(
    pg: sa.Engine, pg_url: str, mongo_db: Any, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`resources.mongo.config.mongo_write_concern: "1"` is refused when the run starts its resources;
    with allow_weak_write_concern: true the same run writes (with w=1)."""
    from reconciliation_pipeline.definitions import defs
    from benchmarks import datagen
    from reconciliation_pipeline_tests.builders import PARTITION, WINDOW_END, reports

    for name, value in {"RECON_POSTGRES_URL": pg_url, "RECON_MONGO_URI": service_env["RECON_MONGO_URI"], "RECON_MONGO_DB": mongo_db.name}.items():
        monkeypatch.setenv(name, value)
    datagen.generate(pg, mongo_db, emails=100, clients=10, creditors_per_client=3, drift=0.2, outbox=2, keys=2,
                     window_end=WINDOW_END, seed=3)
    before = list(mongo_db.clients.find({}, sort=[("_id", 1)]))
    job = defs.resolve_job_def("reconciliation_job")
    connection = {"uri": {"env": "RECON_MONGO_URI"}, "database": {"env": "RECON_MONGO_DB"}}  # run config replaces the whole resource config
    weak = {"resources": {"mongo": {"config": {**connection, "mongo_write_concern": "1"}}}}
    result = job.execute_in_process(run_config=weak, partition_key=PARTITION, raise_on_error=False, instance=dg.DagsterInstance.ephemeral())
    assert not result.success
    errors = [e.event_specific_data.error.to_string() for e in result.all_events
              if e.event_type_value in ("RESOURCE_INIT_FAILURE", "STEP_FAILURE", "RUN_FAILURE") and getattr(e.event_specific_data, "error", None)]
    assert any("mongo_write_concern 1 is refused" in text for text in errors), errors
    assert list(mongo_db.clients.find({}, sort=[("_id", 1)])) == before  # nothing written
    allowed = {"resources": {"mongo": {"config": {**connection, "mongo_write_concern": "1", "allow_weak_write_concern": True}}}}
    result = job.execute_in_process(run_config=allowed, partition_key=PARTITION, instance=dg.DagsterInstance.ephemeral())
    assert result.success and reports(pg)[-1]["auto_repaired"] > 0


def test_the_doctor_cli_fails_a_weak_write_concern(service_env: dict[str, str], portal: Any) -> None:
    """`--mongo-write-concern 1` FAILs the doctor; with --allow-weak-write-concern the setting is ok."""
    env = _dev_env(service_env, RECON_MONGO_DB=portal.name)
    weak = subprocess.run([sys.executable, "-m", "reconciliation_pipeline.doctor", "--mongo-write-concern", "1"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert weak.returncode == 1
    line = next(line for line in weak.stdout.splitlines() if " write concern setting " in line)
    assert line.startswith("FAIL") and "mongo_write_concern 1 is refused" in line, weak.stdout
    assert [line for line in weak.stdout.splitlines() if line.startswith("FAIL")] == [line], weak.stdout  # the only FAIL
    assert " migrations " in weak.stdout and " compare-and-swap write " in weak.stdout  # the other checks still ran
    allowed = subprocess.run([sys.executable, "-m", "reconciliation_pipeline.doctor", "--mongo-write-concern", "1",
                              "--allow-weak-write-concern"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    line = next(line for line in allowed.stdout.splitlines() if " write concern setting " in line)
    assert line.startswith("ok") and "w=1" in line, allowed.stdout


def test_the_doctor_never_prints_credentials(service_env: dict[str, str]) -> None:
    """Unreachable PostgreSQL and MongoDB with passwords in their URLs: both FAIL, no password in the output."""
    secret = f"S3cret{uuid.uuid4().hex[:8]}"
    env = _dev_env(
        service_env,
        RECON_POSTGRES_URL=f"postgresql+psycopg://recon:{secret}@127.0.0.1:{free_port()}/app",
        RECON_MONGO_URI=f"mongodb://recon:{secret}@127.0.0.1:{free_port()}/?directConnection=true&serverSelectionTimeoutMS=1000",
    )
    result = _doctor_cli(env)
    assert result.returncode == 1, result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("postgres" in line and " connect " in line for line in fails), result.stdout
    assert any("mongodb" in line and " reachable " in line for line in fails), result.stdout
    assert secret not in result.stdout + result.stderr
