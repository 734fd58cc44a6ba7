"""`python -m reconciliation_pipeline.db upgrade|downgrade|current|create-app-tables`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from reconciliation_pipeline.schema import app_metadata

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def database_url(url: str | None = None) -> str:
    """The application database's SQLAlchemy URL (argument, else RECON_POSTGRES_URL)."""
    url = url or os.environ.get("RECON_POSTGRES_URL")
    if not url:
        raise SystemExit("RECON_POSTGRES_URL is not set (e.g. postgresql+psycopg://user@host:5432/dbname)")
    return url


def alembic_config(url: str) -> Config:
    """An alembic Config for the pipeline's migrations against `url`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Create or migrate the pipeline's own tables and indexes."""
    command.upgrade(alembic_config(database_url(url)), revision)


def create_app_tables(url: str | None = None) -> None:
    """Create the application's three tables exactly as SCHEMA.md (tests and demo only)."""
    engine = sa.create_engine(database_url(url))
    try:
        app_metadata.create_all(engine)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciliation_pipeline.db", description=__doc__)
    parser.add_argument("--url", help="SQLAlchemy URL (default: $RECON_POSTGRES_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("upgrade", help="create/migrate the pipeline's tables (alembic upgrade head)")
    down = sub.add_parser("downgrade", help="alembic downgrade to a revision")
    down.add_argument("revision")
    sub.add_parser("current", help="show the current migration revision")
    sub.add_parser("create-app-tables", help="create the application's tables (demo and tests only)")
    args = parser.parse_args(argv)
    url = database_url(args.url)
    if args.command == "upgrade":
        upgrade(url)
    elif args.command == "downgrade":
        command.downgrade(alembic_config(url), args.revision)
    elif args.command == "current":
        command.current(alembic_config(url), verbose=True)
    else:
        create_app_tables(url)
    print(f"{args.command}: done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
