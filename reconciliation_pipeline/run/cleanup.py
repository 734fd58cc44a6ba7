"""Step 5, cleanup (RULES.md section 5): expired idempotency keys and old processed outbox rows, in bounded batches."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from reconciliation_pipeline import faults
from reconciliation_pipeline.run.types import Logger
from reconciliation_pipeline.store import postgres as pg


def cleanup(engine: Engine, *, retention_days: int, batch_size: int, log: Logger) -> dict[str, int]:
    """Delete expired idempotency keys and old processed outbox rows in bounded batches."""
    def deleted_keys(n: int) -> None:
        log.info(f"cleanup: {n} expired keys deleted")
        faults.checkpoint("mid_cleanup")

    keys = pg.delete_in_batches(engine, pg.DELETE_EXPIRED_KEYS, {}, batch_size, deleted_keys)
    outbox = pg.delete_in_batches(
        engine, pg.DELETE_OLD_OUTBOX, {"days": retention_days}, batch_size,
        lambda n: log.info(f"cleanup: {n} old outbox rows deleted"),
    )
    log.info(f"cleanup: {keys} expired idempotency keys, {outbox} processed outbox rows older than {retention_days} days")
    return {"expired_keys_deleted": keys, "old_outbox_deleted": outbox}
