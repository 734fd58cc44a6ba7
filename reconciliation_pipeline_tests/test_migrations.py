"""The alembic migrations build exactly the pipeline tables that `schema.py` describes, and 0003
(the creditor position of writes) goes down and up again on a database that already holds rows."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from reconciliation_pipeline import schema
from reconciliation_pipeline.db import alembic_config, upgrade
from reconciliation_pipeline.run.audit_rows import IN_FLIGHT
from reconciliation_pipeline_tests.support import database_at


def _columns(engine: sa.Engine, table: str) -> dict[str, tuple[str, bool]]:
    """name -> (SQL type as PostgreSQL spells it, nullable) of the table in the database."""
    return {c["name"]: (c["type"].compile(dialect=engine.dialect), bool(c["nullable"]))
            for c in sa.inspect(engine).get_columns(table)}


def _declared(engine: sa.Engine, table: sa.Table) -> dict[str, tuple[str, bool]]:
    return {c.name: (c.type.compile(dialect=engine.dialect), bool(c.nullable)) for c in table.columns}


def test_migrations_match_schema_and_0003_goes_down_and_up(pg_url):
    with database_at(pg_url, "0002", prefix="recon_migrations") as (url, engine):
        assert "creditor_pos" not in _columns(engine, "reconciliation_findings")
        with engine.begin() as conn:  # a finding written before 0003
            report = conn.execute(sa.text(
                "INSERT INTO reconciliation_reports (run_id, status, window_start, window_end) "
                "VALUES ('r1', 'failed', now() - interval '1 hour', now()) RETURNING id")).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO reconciliation_findings (report_id, kind, action, error) VALUES (:r, 'data_mismatch', 'repair_failed', :e)"
            ), {"r": report, "e": IN_FLIGHT})

        upgrade(url)
        for table in schema.metadata.sorted_tables:
            assert _columns(engine, table.name) == _declared(engine, table), table.name
        indexes = {i["name"]: i for i in sa.inspect(engine).get_indexes("reconciliation_findings")}
        # the migration keeps its own copy of run.audit_rows.IN_FLIGHT: the partial index must name the text the code writes
        assert IN_FLIGHT in str(indexes["ix_recon_findings_unverified"]["dialect_options"]["postgresql_where"])
        with engine.connect() as conn:
            old = conn.execute(sa.text("SELECT creditor_pos, error FROM reconciliation_findings")).one()
        assert old == (None, IN_FLIGHT)  # kept; the read-back says its position was not recorded

        command.downgrade(alembic_config(url), "0002")
        assert "creditor_pos" not in _columns(engine, "reconciliation_findings")
        upgrade(url)
        assert "creditor_pos" in _columns(engine, "reconciliation_findings")


def test_0005_drift_ledger_goes_down_and_up_with_rows(pg_url):
    with database_at(pg_url, "0004", prefix="recon_migrations") as (url, engine):
        assert "reconciliation_drift" not in sa.inspect(engine).get_table_names()
        with engine.begin() as conn:  # a report and a finding from before the ledger
            report = conn.execute(sa.text(
                "INSERT INTO reconciliation_reports (run_id, status, window_start, window_end) "
                "VALUES ('r1', 'completed', now() - interval '1 hour', now()) RETURNING id")).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO reconciliation_findings (report_id, kind, action) VALUES (:r, 'data_mismatch', 'reported')"
            ), {"r": report})
        upgrade(url)
        assert _columns(engine, "reconciliation_drift") == _declared(engine, schema.reconciliation_drift)
        with engine.begin() as conn:  # a ledger row, then down (the ledger goes) and up again
            conn.execute(sa.text(
                "INSERT INTO reconciliation_drift (problem_key, client_aktenzeichen, creditor_email, kind, status, cause, "
                "first_seen_at, last_seen_at, first_report_id, last_report_id, times_seen) "
                "VALUES ('542900|a@b.de|data_mismatch', '542900', 'a@b.de', 'data_mismatch', 'open', 'unknown', now(), now(), :r, :r, 1)"
            ), {"r": report})
            try:
                with conn.begin_nested():
                    conn.execute(sa.text(
                        "INSERT INTO reconciliation_drift (problem_key, kind, status, cause, first_seen_at, last_seen_at, "
                        "first_report_id, last_report_id, times_seen) "
                        "VALUES ('542900|a@b.de|data_mismatch', 'data_mismatch', 'open', 'unknown', now(), now(), :r, :r, 1)"
                    ), {"r": report})
                raise AssertionError("a second row with the same problem_key was accepted")
            except sa.exc.IntegrityError:
                pass
        command.downgrade(alembic_config(url), "0004")
        assert "reconciliation_drift" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM reconciliation_findings")).scalar_one() == 1
        upgrade(url)
        assert "reconciliation_drift" in sa.inspect(engine).get_table_names()
