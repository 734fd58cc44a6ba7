"""SQLAlchemy Core tables: the application's (SCHEMA.md, read and updated) and the pipeline's own."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
app_metadata = sa.MetaData()  # the application's tables: created only for tests and the demo
NUL_STORED_AS = "\ufffd"


def pg_text(value: str) -> str:
    """`value` as PostgreSQL text can hold it: NUL (which text cannot hold) as U+FFFD, so a finding about
    a MongoDB value with NUL in it is recorded instead of failing the run; the same value, the same text."""
    return value.replace("\x00", NUL_STORED_AS) if "\x00" in value else value


incoming_emails = sa.Table(
    "incoming_emails",
    app_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("zendesk_ticket_id", sa.String(50), nullable=False),
    sa.Column("from_email", sa.String(255), nullable=False),
    sa.Column("from_name", sa.String(255)),
    sa.Column("subject", sa.String(500)),
    sa.Column("extracted_data", sa.JSON),
    sa.Column("processing_status", sa.String(50)),
    sa.Column("match_status", sa.String(50)),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("sync_status", sa.String(50), nullable=False, server_default="pending"),
    sa.Column("sync_error", sa.Text),
    sa.Column("sync_retry_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("idempotency_key", sa.String(255), unique=True),
)

outbox_messages = sa.Table(
    "outbox_messages",
    app_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("aggregate_type", sa.String(100), nullable=False),
    sa.Column("aggregate_id", sa.String(255), nullable=False),
    sa.Column("operation", sa.String(50), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("idempotency_key", sa.String(255), unique=True, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("processed_at", sa.DateTime(timezone=True)),
    sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_retries", sa.Integer, nullable=False, server_default="5"),
    sa.Column("error_message", sa.Text),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    app_metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("response", sa.JSON),
)

reconciliation_reports = sa.Table(
    "reconciliation_reports",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False, unique=True),
    sa.Column("partition_key", sa.String(64)),
    sa.Column("window_start", sa.DateTime(timezone=True)),
    sa.Column("window_end", sa.DateTime(timezone=True)),
    sa.Column("run_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.String(20), nullable=False, server_default="running"),
    sa.Column("mongo_available", sa.Boolean),
    sa.Column("dry_run", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("repairs_halted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("records_checked", sa.Integer, nullable=False, server_default="0"),
    sa.Column("mismatches_found", sa.Integer, nullable=False, server_default="0"),
    sa.Column("auto_repaired", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed_repairs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("outbox_retried", sa.Integer, nullable=False, server_default="0"),
    sa.Column("outbox_succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("outbox_failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("outbox_deferred", sa.Integer, nullable=False, server_default="0"),
    sa.Column("outbox_dead", sa.Integer, nullable=False, server_default="0"),
    sa.Column("outbox_superseded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("expired_keys_deleted", sa.Integer, nullable=False, server_default="0"),
    sa.Column("old_outbox_deleted", sa.Integer, nullable=False, server_default="0"),
    sa.Column("details", sa.JSON),
    sa.Column("error_message", sa.Text),
    sa.Column("pid", sa.Integer),
    sa.Column("hostname", sa.String(255)),
)

reconciliation_findings = sa.Table(
    "reconciliation_findings",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("email_id", sa.Integer),
    sa.Column("outbox_message_id", sa.Integer),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("client_aktenzeichen", sa.String(255)),
    sa.Column("creditor_email", sa.String(255)),
    sa.Column("pg_amount_cents", sa.BigInteger),
    sa.Column("mongo_amount_cents_before", sa.BigInteger),
    sa.Column("mongo_amount_cents_after", sa.BigInteger),
    sa.Column("action", sa.String(50), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("client_id", sa.String(64)),
    sa.Column("match_level", sa.SmallInteger),
    sa.Column("creditor_pos", sa.Integer),  # index in final_creditor_list of a write, for the read-back
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # migration 0006, the audit chain (audit.py): append-only, a trigger rejects UPDATE and DELETE
    sa.Column("intent_id", sa.BigInteger, sa.ForeignKey("reconciliation_findings.id")),  # an outcome row's intent row
    sa.Column("sealed_counts", sa.Text),  # a report_seal row: the finished report's counts (canonical JSON)
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("row_hash", sa.String(64), nullable=False),
)

reconciliation_audit_checkpoints = sa.Table(
    "reconciliation_audit_checkpoints",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(20), nullable=False),  # verified (the asset check), archived (audit.py, 0006)
    sa.Column("verified_through_id", sa.BigInteger, nullable=False),
    sa.Column("row_hash", sa.String(64), nullable=False),
    sa.Column("rows_checked", sa.Integer, nullable=False),
    sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

reconciliation_drift = sa.Table(
    "reconciliation_drift",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("problem_key", sa.Text, nullable=False, unique=True),  # ledger.problem_keys
    sa.Column("client_aktenzeichen", sa.String(255)),
    sa.Column("creditor_email", sa.String(255)),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("email_id", sa.Integer),
    sa.Column("outbox_message_id", sa.Integer),  # the message the cause names, or the failed delivery
    sa.Column("status", sa.String(20), nullable=False),  # open, resolved
    sa.Column("cause", sa.String(30), nullable=False),  # ledger.CAUSES
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("first_report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id"), nullable=False),
    sa.Column("last_report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id"), nullable=False),
    sa.Column("times_seen", sa.Integer, nullable=False),
    sa.Column("pg_amount_cents", sa.BigInteger),
    sa.Column("mongo_amount_cents", sa.BigInteger),
    sa.Column("evidence_window_end", sa.DateTime(timezone=True)),  # newest evidence: older windows change nothing
    sa.Column("resolved_at", sa.DateTime(timezone=True)),
    sa.Column("resolved_report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id")),
    sa.Column("resolution", sa.String(30)),  # repaired, fixed_at_source, superseded
)
