"""Environments of the test subprocesses: the service variables, a DAGSTER_HOME, scratch databases, run config."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from reconciliation_pipeline_tests.support.processes import REPO

# Variables of the parent environment that must not leak into a subprocess (each test sets its own).
SERVICE_VARS = ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL", "RECON_POSTGRES_URL", "RECON_MONGO_URI", "RECON_MONGO_DB",
                "RECON_FAULT_KILL_AT", "RECON_PARTITIONS_START")


def cli_env(*, pg_url: str, mongo_uri: str, mongo_db: str, dagster_home: Path, dagster_postgres_url: str | None = None,
            fault: str | None = None) -> dict[str, str]:
    """The parent's environment with the service variables replaced by the test's (and an optional crash point)."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    env.update(
        RECON_POSTGRES_URL=pg_url, RECON_MONGO_URI=mongo_uri, RECON_MONGO_DB=mongo_db,
        DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    if dagster_postgres_url:
        env["DAGSTER_POSTGRES_URL"] = dagster_postgres_url
    if fault:
        env["RECON_FAULT_KILL_AT"] = fault
    return env


def sqlite_home(path: Path) -> Path:
    """A DAGSTER_HOME with Dagster's default (sqlite) storage in the directory."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return path


def postgres_home(path: Path) -> Path:
    """A DAGSTER_HOME holding the repository's own dagster.yaml (PostgreSQL storage from DAGSTER_POSTGRES_URL,
    the run queue): the shipped configuration is the one the daemon, UI and concurrency tests exercise."""
    text = (REPO / "dagster.yaml").read_text()
    assert "DAGSTER_POSTGRES_URL" in text and "QueuedRunCoordinator" in text, \
        "the repository's dagster.yaml no longer stores runs in PostgreSQL behind the run queue"
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "dagster.yaml", path / "dagster.yaml")
    return path


@contextmanager
def scratch_database(pg_url: str, prefix: str = "recon_scratch") -> Iterator[str]:
    """A fresh database on the server of `pg_url`, dropped afterwards.

    Yields a `postgresql+psycopg2://` URL: dagster-postgres' LISTEN/NOTIFY watcher breaks on
    psycopg 3 (what a plain postgresql:// URL picks under SQLAlchemy 2.1).
    """
    base = make_url(pg_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def database_at(pg_url: str, revision: str, prefix: str = "recon_migrations") -> Iterator[tuple[str, sa.Engine]]:
    """A scratch database with the application's tables and the pipeline's migrated up to `revision`:
    yields its psycopg URL and an engine on it (disposed after)."""
    from reconciliation_pipeline.db import create_app_tables, upgrade

    with scratch_database(pg_url, prefix=prefix) as url:
        url = url.replace("postgresql+psycopg2", "postgresql+psycopg")
        create_app_tables(url)
        upgrade(url, revision)
        engine = sa.create_engine(url)
        try:
            yield url, engine
        finally:
            engine.dispose()


def write_config(path: Path, **settings: Any) -> Path:
    """A run config file (JSON is valid YAML) that configures the `settings` resource."""
    path.write_text(json.dumps({"resources": {"settings": {"config": settings}}}, indent=2))
    return path
