"""Optional pytest helpers for the local dev services (PostgreSQL + nx-27017 MongoDB).

Use from ``reconciliation_pipeline_tests/conftest.py``::

    pytest_plugins = ["reconciliation_pipeline_tests.conftest_services"]
    # or: from reconciliation_pipeline_tests.conftest_services import *  # noqa: F401,F403

Fixtures
--------
``devservices_env`` (session)
    Makes sure the services run (``ensure_services``; a no-op when ``make test`` already started
    them) and exports the five variables (RECON_POSTGRES_URL, RECON_MONGO_URI, RECON_MONGO_DB,
    DAGSTER_HOME, DAGSTER_POSTGRES_URL) into ``os.environ`` for the session; returns them as a dict.
``throwaway_mongo`` (function)
    A private nx-27017 wire server on a free loopback port with its data under ``tmp_path``;
    tests may ``kill()`` it to simulate an outage.  Always killed at teardown.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from reconciliation_pipeline.devservices import ENV_KEYS, ensure_services, start_mongo_wire_server

__all__ = ["ThrowawayMongo", "devservices_env", "throwaway_mongo", "start_throwaway_mongo"]


@dataclass
class ThrowawayMongo:
    proc: subprocess.Popen
    port: int
    data_dir: Path
    uri: str = field(init=False)

    def __post_init__(self) -> None:
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the wire server (simulated crash) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start it again on the same port with the same data (after ``kill()``)."""
        self.kill()
        self.proc, _ = start_mongo_wire_server(self.data_dir, self.port)


def start_throwaway_mongo(data_dir: Path, port: int | None = None) -> ThrowawayMongo:
    proc, port = start_mongo_wire_server(Path(data_dir), port)
    return ThrowawayMongo(proc=proc, port=port, data_dir=Path(data_dir))


@pytest.fixture(scope="session")
def devservices_env() -> Iterator[dict[str, str]]:
    env = ensure_services()
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def throwaway_mongo(tmp_path: Path) -> Iterator[ThrowawayMongo]:
    server = start_throwaway_mongo(tmp_path / "nx-data")
    try:
        yield server
    finally:
        server.kill()
