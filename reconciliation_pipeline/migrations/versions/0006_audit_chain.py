"""reconciliation_findings: append-only, hash-chained audit trail (outcome rows, report seals, checkpoints)

Revision ID: 0006
Revises: 0005

Adds `intent_id` (an outcome row names its intent row), `sealed_counts` (a `report_seal` row carries
a finished report's counts), `prev_hash` and `row_hash` (see reconciliation_pipeline/audit.py), the
table `reconciliation_audit_checkpoints` (verified points of the asset check, archive points), the
view `reconciliation_findings_current` (each finding with its newest outcome) and the trigger
`reconciliation_findings_append_only`, which rejects UPDATE and DELETE. Existing rows are chained in
id order. Downgrade folds each newest outcome back into its intent row, drops outcome and seal rows
(their history is lost), then the columns, view, trigger and checkpoints.

Archiving after the retention period (an administrator, never the pipeline; the table owner):
    1. `python -m reconciliation_pipeline.audit verify` must exit 0.
    2. Choose the last id N to archive; export the rows `id <= N` with their hashes
       (`\\copy (SELECT * FROM reconciliation_findings WHERE id <= N ORDER BY id) TO 'audit-N.csv' CSV HEADER`)
       and keep that file with the retention records.
    3. In ONE transaction:
         ALTER TABLE reconciliation_findings DISABLE TRIGGER reconciliation_findings_append_only;
         INSERT INTO reconciliation_audit_checkpoints (kind, verified_through_id, row_hash, rows_checked)
           SELECT 'archived', id, row_hash, 0 FROM reconciliation_findings WHERE id = N;
         DELETE FROM reconciliation_audit_checkpoints WHERE kind = 'verified' AND verified_through_id <= N;
         DELETE FROM reconciliation_findings WHERE id <= N;
         ALTER TABLE reconciliation_findings ENABLE TRIGGER reconciliation_findings_append_only;
    4. `audit verify` starts from the newest 'archived' point (its hash is the next row's prev_hash).
"""
import sqlalchemy as sa
from alembic import op

from reconciliation_pipeline import audit

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TRIGGER_FN = """
CREATE OR REPLACE FUNCTION reconciliation_findings_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'reconciliation_findings is append-only (% rejected): record an outcome as a new row', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$
"""
VIEW = f"""
CREATE VIEW {audit.CURRENT_VIEW} AS
SELECT f.id, f.report_id, f.email_id, f.outbox_message_id, f.kind, f.client_aktenzeichen, f.creditor_email,
       f.pg_amount_cents,
       CASE WHEN o.id IS NULL THEN f.mongo_amount_cents_before
            ELSE coalesce(o.mongo_amount_cents_before, f.mongo_amount_cents_before) END AS mongo_amount_cents_before,
       CASE WHEN o.id IS NULL THEN f.mongo_amount_cents_after ELSE o.mongo_amount_cents_after END AS mongo_amount_cents_after,
       coalesce(o.action, f.action) AS action,
       CASE WHEN o.id IS NULL THEN f.error ELSE o.error END AS error,
       f.client_id, f.match_level, f.creditor_pos, f.created_at,
       o.id AS outcome_id, o.created_at AS outcome_at
FROM reconciliation_findings f
LEFT JOIN LATERAL (SELECT x.* FROM reconciliation_findings x WHERE x.intent_id = f.id ORDER BY x.id DESC LIMIT 1) o ON true
WHERE f.intent_id IS NULL AND f.kind <> '{audit.SEAL_KIND}'
"""


def upgrade() -> None:
    op.add_column("reconciliation_findings", sa.Column("intent_id", sa.BigInteger, sa.ForeignKey("reconciliation_findings.id")))
    op.add_column("reconciliation_findings", sa.Column("sealed_counts", sa.Text))
    op.add_column("reconciliation_findings", sa.Column("prev_hash", sa.String(64)))
    op.add_column("reconciliation_findings", sa.Column("row_hash", sa.String(64)))
    op.create_index("ix_recon_findings_intent_id", "reconciliation_findings", ["intent_id"],
                    postgresql_where=sa.text("intent_id IS NOT NULL"))
    op.create_table(
        "reconciliation_audit_checkpoints",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("verified_through_id", sa.BigInteger, nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.Column("rows_checked", sa.Integer, nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("kind IN ('verified', 'archived')", name="ck_audit_checkpoints_kind"),
    )
    conn = op.get_bind()
    prev = audit.GENESIS
    cols = ", ".join(audit.HASHED)
    rows = conn.execute(sa.text(f"SELECT {cols} FROM reconciliation_findings ORDER BY id")).mappings().all()
    chained = []
    for r in rows:
        h = audit.row_hash(r, prev)
        chained.append({"i": r["id"], "p": prev, "h": h})
        prev = h
    if chained:
        conn.execute(sa.text("UPDATE reconciliation_findings SET prev_hash = :p, row_hash = :h WHERE id = :i"), chained)
    op.alter_column("reconciliation_findings", "prev_hash", nullable=False)
    op.alter_column("reconciliation_findings", "row_hash", nullable=False)
    op.execute(VIEW)
    op.execute(TRIGGER_FN)
    op.execute(
        "CREATE TRIGGER reconciliation_findings_append_only BEFORE UPDATE OR DELETE ON reconciliation_findings "
        "FOR EACH ROW EXECUTE FUNCTION reconciliation_findings_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER reconciliation_findings_append_only ON reconciliation_findings")
    op.execute("DROP FUNCTION reconciliation_findings_append_only()")
    op.execute(f"""
        UPDATE reconciliation_findings f SET action = c.action, error = c.error,
               mongo_amount_cents_after = c.mongo_amount_cents_after, mongo_amount_cents_before = c.mongo_amount_cents_before
        FROM {audit.CURRENT_VIEW} c WHERE c.id = f.id AND c.outcome_id IS NOT NULL
    """)
    op.execute(f"DROP VIEW {audit.CURRENT_VIEW}")
    op.execute(f"DELETE FROM reconciliation_findings WHERE intent_id IS NOT NULL OR kind = '{audit.SEAL_KIND}'")
    op.drop_table("reconciliation_audit_checkpoints")
    op.drop_index("ix_recon_findings_intent_id", table_name="reconciliation_findings")
    for c in ("row_hash", "prev_hash", "sealed_counts", "intent_id"):
        op.drop_column("reconciliation_findings", c)
