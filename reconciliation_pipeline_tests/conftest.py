"""Shared fixtures: a fresh PostgreSQL database and MongoDB database per test session / test.

Real services only: PostgreSQL from RECON_POSTGRES_URL (or the embedded one `devservices` starts)
and the MongoDB wire server from RECON_MONGO_URI, always through psycopg and pymongo over the wire.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pymongo import MongoClient
from sqlalchemy.engine import make_url

from reconciliation_pipeline.db import create_app_tables, upgrade
from reconciliation_pipeline.io_managers import RunFilesIOManager
from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings
from reconciliation_pipeline_tests.builders import PARTITION
from reconciliation_pipeline_tests.support import DATA_TABLES, cli_env, sqlite_home

REPO = Path(__file__).resolve().parent.parent
SERVICE_VARS = ("RECON_POSTGRES_URL", "RECON_MONGO_URI", "RECON_MONGO_DB", "DAGSTER_HOME", "DAGSTER_POSTGRES_URL")


@pytest.fixture(scope="session")
def service_env() -> dict[str, str]:
    """The five service variables: from the environment, else started by devservices."""
    if all(os.environ.get(v) for v in SERVICE_VARS[:2]):
        return {v: os.environ[v] for v in SERVICE_VARS if os.environ.get(v)}
    from reconciliation_pipeline.devservices import ensure_services

    env = ensure_services(REPO / ".devservices")
    os.environ.update(env)
    return env


def _admin_url(url: str) -> sa.URL:
    return make_url(url).set(database="postgres")


@pytest.fixture(scope="session")
def pg_url(service_env: dict[str, str]) -> Iterator[str]:
    """A new database for this test session, with the application's and the pipeline's tables."""
    base = make_url(service_env["RECON_POSTGRES_URL"])
    name = f"recon_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(_admin_url(service_env["RECON_POSTGRES_URL"]), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    create_app_tables(url)
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg(pg_engine: sa.Engine) -> sa.Engine:
    """The session database, emptied before the test."""
    with pg_engine.begin() as conn:
        conn.execute(sa.text(
            f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"
        ))
    return pg_engine


@pytest.fixture(scope="session")
def mongo_client(service_env: dict[str, str]) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(service_env["RECON_MONGO_URI"], tz_aware=True, serverSelectionTimeoutMS=10_000)
    client.admin.command("ping")
    yield client
    client.close()


@pytest.fixture
def mongo_db(mongo_client: MongoClient) -> Iterator[Any]:
    """A fresh MongoDB database for the test, dropped afterwards."""
    name = f"recon_test_{uuid.uuid4().hex[:10]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


@pytest.fixture
def sqlite_dagster_home(tmp_path: Path) -> Path:
    """A DAGSTER_HOME with sqlite storage for the test's CLI runs."""
    return sqlite_home(tmp_path / "dagster_home")


@pytest.fixture
def run_env(pg: sa.Engine, pg_url: str, mongo_db: Any, service_env: dict[str, str], sqlite_dagster_home: Path) -> dict[str, str]:
    """The environment of a CLI run against the test's databases and `sqlite_dagster_home`."""
    return cli_env(pg_url=pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db.name,
                   dagster_home=sqlite_dagster_home)


@pytest.fixture
def resources(pg: sa.Engine, pg_url: str, mongo_db: Any, service_env: dict[str, str]) -> dict[str, Any]:
    """Dagster resources pointing at the test's databases (settings overridable per test)."""
    return {
        "postgres": PostgresResource(url=pg_url),
        "mongo": MongoResource(uri=service_env["RECON_MONGO_URI"], database=mongo_db.name, server_selection_timeout_ms=3000),
        "settings": ReconciliationSettings(repair_lock_wait_seconds=5),
        "io_manager": RunFilesIOManager(),
    }


@pytest.fixture
def reconcile(resources: dict[str, Any]):
    """Materialize reconciliation_report for a partition in-process; settings as keyword overrides."""
    import dagster as dg

    from reconciliation_pipeline.assets import reconciliation_report

    instance = dg.DagsterInstance.ephemeral()

    def run(partition: str = PARTITION, raise_on_error: bool = True, tags: dict[str, str] | None = None, **settings: Any) -> dg.ExecuteInJobResult:
        res = dict(resources)
        res["settings"] = ReconciliationSettings(**{"repair_lock_wait_seconds": 5, **settings})
        return dg.materialize(
            [reconciliation_report], partition_key=partition, resources=res, instance=instance,
            raise_on_error=raise_on_error, tags=tags,
        )

    run.instance = instance  # type: ignore[attr-defined]
    return run
