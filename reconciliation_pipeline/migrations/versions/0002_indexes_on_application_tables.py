"""Indexes the pipeline needs on the application's tables (structure untouched)

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

APP_TABLES = ("incoming_emails", "outbox_messages", "idempotency_keys")
INDEXES = {
    "ix_recon_incoming_emails_synced_created_at":
        "incoming_emails (created_at) WHERE sync_status = 'synced'",
    "ix_recon_incoming_emails_synced_received_at":
        "incoming_emails (received_at) WHERE sync_status = 'synced'",
    "ix_recon_incoming_emails_synced_from_email":
        "incoming_emails (lower(btrim(from_email))) WHERE sync_status = 'synced'",
    "ix_recon_outbox_messages_pending":
        "outbox_messages (created_at, id) WHERE processed_at IS NULL",
    "ix_recon_outbox_messages_processed_created_at":
        "outbox_messages (created_at) WHERE processed_at IS NOT NULL",
    "ix_recon_idempotency_keys_expires_at":
        "idempotency_keys (expires_at)",
}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    missing = [t for t in APP_TABLES if t not in existing]
    if missing:
        raise RuntimeError(
            f"application tables missing: {', '.join(missing)}. Point RECON_POSTGRES_URL at the "
            "application's database, or for a local demo run "
            "`python -m reconciliation_pipeline.db create-app-tables` first."
        )
    # CONCURRENTLY so that production tables stay writable while the index builds.
    with op.get_context().autocommit_block():
        for name, definition in INDEXES.items():
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {definition}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
