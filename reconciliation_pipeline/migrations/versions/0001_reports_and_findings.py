"""reconciliation_reports and reconciliation_findings

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciliation_reports",
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
        *[
            sa.Column(name, sa.Integer, nullable=False, server_default="0")
            for name in (
                "records_checked", "mismatches_found", "auto_repaired", "failed_repairs",
                "outbox_retried", "outbox_succeeded", "outbox_failed", "outbox_deferred", "outbox_dead",
                "expired_keys_deleted", "old_outbox_deleted",
            )
        ],
        sa.Column("details", sa.JSON),
        sa.Column("error_message", sa.Text),
        sa.Column("pid", sa.Integer),
        sa.Column("hostname", sa.String(255)),
        sa.CheckConstraint("status IN ('running', 'completed', 'failed')", name="ck_reconciliation_reports_status"),
    )
    op.create_index("ix_reconciliation_reports_partition_key", "reconciliation_reports", ["partition_key"])
    op.create_index(
        "ix_reconciliation_reports_running", "reconciliation_reports", ["status"],
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_table(
        "reconciliation_findings",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id", ondelete="CASCADE"), nullable=False),
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
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_reconciliation_findings_report_id", "reconciliation_findings", ["report_id"])
    op.create_index("ix_reconciliation_findings_email_id", "reconciliation_findings", ["email_id"])


def downgrade() -> None:
    op.drop_table("reconciliation_findings")
    op.drop_table("reconciliation_reports")
