"""reconciliation_reports.outbox_superseded: outbox messages closed unwritten because a newer word for their pair exists

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "reconciliation_reports",
        sa.Column("outbox_superseded", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("reconciliation_reports", "outbox_superseded")
