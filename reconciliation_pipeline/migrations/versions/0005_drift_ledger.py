"""reconciliation_drift: the drift ledger, one row per problem (aktenzeichen, creditor address, kind)

Revision ID: 0005
Revises: 0004

`problem_key` is the stable key of a problem: `<aktenzeichen>|<creditor address>|<kind>`, with
`email:<id>` (or `client:<id>`, `pos:<n>`) standing in for a missing aktenzeichen or address, and
`outbox:<message id>|outbox_delivery` for a failed outbox delivery. `evidence_window_end` is the
window end of the newest run that changed the row: a run whose window ends earlier (a backfill)
leaves the row alone. Downgrade drops the table (the ledger is derived from the runs' findings).
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciliation_drift",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("problem_key", sa.Text, nullable=False, unique=True),
        sa.Column("client_aktenzeichen", sa.String(255)),
        sa.Column("creditor_email", sa.String(255)),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("email_id", sa.Integer),
        sa.Column("outbox_message_id", sa.Integer),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("cause", sa.String(30), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id"), nullable=False),
        sa.Column("last_report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id"), nullable=False),
        sa.Column("times_seen", sa.Integer, nullable=False),
        sa.Column("pg_amount_cents", sa.BigInteger),
        sa.Column("mongo_amount_cents", sa.BigInteger),
        sa.Column("evidence_window_end", sa.DateTime(timezone=True)),
        sa.Column("resolved_at", sa.DateTime(timezone=True)),
        sa.Column("resolved_report_id", sa.BigInteger, sa.ForeignKey("reconciliation_reports.id")),
        sa.Column("resolution", sa.String(30)),
        sa.CheckConstraint("status IN ('open', 'resolved')", name="ck_reconciliation_drift_status"),
        sa.CheckConstraint(
            "resolution IS NULL OR resolution IN ('repaired', 'fixed_at_source', 'superseded')",
            name="ck_reconciliation_drift_resolution",
        ),
    )
    op.create_index("ix_reconciliation_drift_open", "reconciliation_drift", ["first_seen_at"],
                    postgresql_where=sa.text("status = 'open'"))
    op.create_index("ix_reconciliation_drift_pair", "reconciliation_drift", ["client_aktenzeichen", "creditor_email"])
    op.create_index("ix_reconciliation_drift_email_id", "reconciliation_drift", ["email_id"])
    # the ledger asks whether an outbox message was superseded / delivered (audit rows by message)
    op.create_index("ix_recon_findings_outbox_message_id", "reconciliation_findings", ["outbox_message_id"],
                    postgresql_where=sa.text("outbox_message_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_recon_findings_outbox_message_id", table_name="reconciliation_findings")
    op.drop_table("reconciliation_drift")
