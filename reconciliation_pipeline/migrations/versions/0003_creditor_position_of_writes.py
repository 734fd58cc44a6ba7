"""reconciliation_findings.creditor_pos: where a write went, so a later run can read it back

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# run.audit_rows.IN_FLIGHT: the audit rows of writes whose run ended before the read-back
IN_FLIGHT = "write sent, not verified: the run ended before the read-back"


def upgrade() -> None:
    op.add_column("reconciliation_findings", sa.Column("creditor_pos", sa.Integer))
    op.create_index(
        "ix_recon_findings_unverified", "reconciliation_findings", ["id"],
        postgresql_where=sa.text(f"error = '{IN_FLIGHT}'"),
    )


def downgrade() -> None:
    op.drop_index("ix_recon_findings_unverified", table_name="reconciliation_findings")
    op.drop_column("reconciliation_findings", "creditor_pos")
