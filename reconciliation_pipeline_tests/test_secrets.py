"""Credentials never leak: not in the CLI's output, not in Dagster's event log or any file of the instance,
not in the report row, its details or the asset's metadata, also not when the run fails.

The PostgreSQL URL carries the password of a real role (`recon_secret`, created with that password and
rights on the test database; the embedded server uses trust authentication, so the password travels only
inside the URL - which is exactly where a leak would come from). The MongoDB wire server (nx-27017) does
not implement authentication (SCRAM: the handshake dies with KeyError 'payload'), so a MongoDB URI with
credentials is used only where the connection fails anyway: an unreachable port, and the wire server itself.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._serdes import serialize_value
from sqlalchemy.engine import make_url

from reconciliation_pipeline_tests.builders import PARTITION, add_client, add_email, add_outbox, creditor, reply
from reconciliation_pipeline_tests.support import (
    cli_env, execute_args, finding_rows, free_port, mongo_port, report_rows, run_cli, sqlite_home, write_config,
)

PASSWORD = "S3cr3t-Pa55-xyz"
ROLE = "recon_secret"
SPARKASSE = "forderungen@sparkasse-bochum.de"
NEEDLES = {PASSWORD, quote(PASSWORD, safe=""), PASSWORD[::-1]}


@pytest.fixture
def secret_pg_url(pg_url: str, pg: sa.Engine) -> Any:
    """pg_url with the role recon_secret and its password (the role may use the test database's tables)."""
    admin = sa.create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    database = make_url(pg_url).database
    with admin.connect() as conn:
        exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).first()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(sa.text(f"{verb} ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"))
        conn.execute(sa.text(f'GRANT CONNECT ON DATABASE "{database}" TO {ROLE}'))
    with pg.begin() as conn:
        conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {ROLE}"))
        conn.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {ROLE}"))
        conn.execute(sa.text(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {ROLE}"))
    url = make_url(pg_url).set(username=ROLE, password=PASSWORD).render_as_string(hide_password=False)
    assert PASSWORD in url
    check = sa.create_engine(url)
    with check.connect() as conn:
        assert conn.execute(sa.text("SELECT current_user")).scalar_one() == ROLE
    check.dispose()
    yield url
    with pg.begin() as conn:
        conn.execute(sa.text(f"DROP OWNED BY {ROLE}"))
    with admin.connect() as conn:
        conn.execute(sa.text(f'REVOKE CONNECT ON DATABASE "{database}" FROM {ROLE}'))
        conn.execute(sa.text(f"DROP ROLE IF EXISTS {ROLE}"))
    admin.dispose()


def seed(pg: sa.Engine, mongo_db: Any) -> None:
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 999.99)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount="1.234,56"))
    add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": SPARKASSE, "new_debt_amount": 1234.56})


def leaks(where: str, text: str | bytes) -> list[str]:
    blob = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    return [f"{where}: {needle!r}" for needle in NEEDLES if needle.encode() in blob]


def instance_leaks(home: Path) -> list[str]:
    """Every event of every run (serialized whole), the runs themselves, and every file under DAGSTER_HOME."""
    found: list[str] = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert runs, "no run recorded"
        for run in runs:
            found += leaks(f"run {run.run_id} record", serialize_value(run))
            for entry in instance.all_logs(run.run_id):
                found += leaks(f"event {entry.dagster_event_type or 'log'} of {run.run_id}", serialize_value(entry))
                found += leaks(f"message of {run.run_id}", entry.user_message or "")
    for path in home.rglob("*"):
        if path.is_file():
            found += leaks(str(path.relative_to(home)), path.read_bytes())
    return found


def database_leaks(pg: sa.Engine) -> list[str]:
    found = []
    for row in report_rows(pg):
        found += leaks(f"report {row['id']}", repr(row))
    for row in finding_rows(pg):
        found += leaks(f"finding {row['id']}", repr(row))
    return found


def test_successful_run_with_a_password_in_the_postgres_url_leaks_it_nowhere(pg, mongo_db, service_env, secret_pg_url, tmp_path):
    seed(pg, mongo_db)
    home = sqlite_home(tmp_path / "dagster_home")
    env = cli_env(pg_url=secret_pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db.name, dagster_home=home)
    result = run_cli(execute_args(PARTITION, write_config(tmp_path / "run_config.yaml")), env, tmp_path / "logs", timeout=240)
    assert result.returncode == 0, result.describe()
    [report] = report_rows(pg)
    # the run used the secret URL and worked: the outbox message was delivered
    assert report["status"] == "completed" and report["outbox_succeeded"] == 1, report
    assert mongo_db.clients.find_one()["final_creditor_list"][0]["creditor_response_amount"] == 1234.56
    found = leaks("stdout", result.stdout) + leaks("stderr", result.stderr) + instance_leaks(home) + database_leaks(pg)
    assert found == [], found


def _mongo_uri_with_password(kind: str, service_env: dict[str, str]) -> str:
    port = free_port() if kind == "unreachable" else mongo_port(service_env["RECON_MONGO_URI"])
    return f"mongodb://recon:{PASSWORD}@127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=1500&authSource=admin"


FAILURES = {
    # MongoDB URI with credentials: nothing listens on the port
    "mongo_unreachable": dict(pg="secret", mongo="unreachable"),
    # MongoDB URI with credentials against the wire server, which rejects authentication
    "mongo_auth_rejected": dict(pg="secret", mongo="wire_server"),
    # PostgreSQL URL with the password and a port nothing listens on
    "postgres_wrong_port": dict(pg="wrong_port", mongo="plain"),
    # PostgreSQL URL with the password and a database that does not exist
    "postgres_wrong_database": dict(pg="wrong_database", mongo="plain"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failing_runs_do_not_leak_the_password(case, pg, mongo_db, service_env, secret_pg_url, tmp_path):
    spec = FAILURES[case]
    seed(pg, mongo_db)
    url = make_url(secret_pg_url)
    pg_url = {
        "secret": secret_pg_url,
        "wrong_port": url.set(host="127.0.0.1", port=free_port(), query={}).render_as_string(hide_password=False),
        "wrong_database": url.set(database=f"missing_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False),
    }[spec["pg"]]
    mongo_uri = service_env["RECON_MONGO_URI"] if spec["mongo"] == "plain" else _mongo_uri_with_password(spec["mongo"], service_env)
    assert PASSWORD in pg_url or PASSWORD in mongo_uri
    home = sqlite_home(tmp_path / "dagster_home")
    env = cli_env(pg_url=pg_url, mongo_uri=mongo_uri, mongo_db=mongo_db.name, dagster_home=home)
    result = run_cli(execute_args(PARTITION, write_config(tmp_path / "run_config.yaml")), env, tmp_path / "logs", timeout=240)
    print(result.describe(2000))
    if spec["pg"] != "secret":
        assert result.returncode != 0, "a run that cannot reach PostgreSQL must fail"
        assert "error" in (result.stdout + result.stderr).lower()
    found = leaks("stdout", result.stdout) + leaks("stderr", result.stderr) + instance_leaks(home) + database_leaks(pg)
    assert found == [], found
    if spec["mongo"] == "unreachable":
        assert result.returncode == 0, result.describe()
        [report] = report_rows(pg)
        assert report["status"] == "completed" and report["mongo_available"] is False
