"""PostgreSQL access: window extracts, outbox claims, cleanup batches and the report tables."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from reconciliation_pipeline import audit, ledger
from reconciliation_pipeline.core.frames import EMAIL_COLUMNS, TYPED_COLUMNS, prepare_emails
from reconciliation_pipeline.schema import reconciliation_reports

# extracted_data is `json`: PostgreSQL splits it into typed fields (json_typeof, ->>) in C, except
# for rows whose text holds a \u0000 escape, on which any `->` raises: those come back as text and
# are parsed in Python (frames.prepare_emails). The strpos() test on "debt_amount" only narrows.
_EMAIL_SELECT = """
SELECT e.id AS email_id, e.from_email, e.received_at, e.created_at, {in_window} AS in_window,
       CASE WHEN d.safe THEN NULL ELSE d.txt END AS extracted_json,
       CASE WHEN d.safe THEN json_typeof(e.extracted_data -> 'client_aktenzeichen') END AS az_type,
       CASE WHEN d.safe AND json_typeof(e.extracted_data -> 'client_aktenzeichen') = 'string'
            THEN e.extracted_data ->> 'client_aktenzeichen' END AS az_text,
       CASE WHEN d.safe AND json_typeof(e.extracted_data -> 'client_name') = 'string'
            THEN e.extracted_data ->> 'client_name' END AS client_name,
       CASE WHEN d.safe AND json_typeof(e.extracted_data -> 'creditor_name') = 'string'
            THEN e.extracted_data ->> 'creditor_name' END AS creditor_name,
       CASE WHEN d.safe THEN json_typeof(e.extracted_data -> 'debt_amount') END AS amount_type,
       CASE WHEN d.safe AND json_typeof(e.extracted_data -> 'debt_amount') IN ('number', 'string')
            THEN e.extracted_data ->> 'debt_amount' END AS amount_text
FROM incoming_emails e
CROSS JOIN LATERAL (SELECT e.extracted_data::text AS txt,
                           strpos(e.extracted_data::text, '\\u0000') = 0 AS safe) d
WHERE e.sync_status = 'synced'
  AND json_typeof(e.extracted_data) = 'object'
  AND strpos(d.txt, '"debt_amount"') > 0
"""
MONGO_WRITER_LOCK = 7_340_210_001  # pg advisory lock key: one MongoDB writer at a time


def _stream(
    engine: Engine, statement: sa.TextClause, params: Mapping[str, Any], chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """Raw email rows in chunks from a server-side cursor (bounded memory for any window); COPY's fallback."""
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(statement, params)
        for part in result.partitions(chunk_rows):
            yield pd.DataFrame(part, columns=EMAIL_COLUMNS + TYPED_COLUMNS)


# COPY streams the same rows as CSV, parsed by pandas' C reader: several times faster than building
# a Python tuple per row. psycopg binds the parameters on the client for COPY.
_COPY_COLUMNS = ["email_id", "from_email", "received_us", "in_window", "extracted_json"] + TYPED_COLUMNS
_COPY_SQL = (
    "COPY (SELECT s.email_id, s.from_email, (extract(epoch FROM s.received_at) * 1000000)::bigint, s.in_window, "
    "s.extracted_json, " + ", ".join(f"s.{c}" for c in TYPED_COLUMNS) + " FROM ({select}) s) "
    "TO STDOUT (FORMAT csv, NULL '\\N')"
)
_WINDOW_WHERE = " AND e.created_at >= %(start)s AND e.created_at < %(end)s"
_RELATED_WHERE = """
  AND NOT (e.created_at >= %(start)s AND e.created_at < %(end)s)
  AND ((lower(btrim(e.from_email)) = ANY(%(emails)s) AND e.received_at >= %(min_received)s)
       OR (e.received_at >= %(start)s AND e.received_at < %(end)s))
"""


def _copy_frames(engine: Engine, select: str, params: Mapping[str, Any], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Email rows in chunks of `chunk_rows` via COPY ... TO STDOUT (CSV) through a temporary file."""
    if engine.dialect.driver != "psycopg":  # COPY with client-side parameters needs psycopg 3
        statement = sa.text(select.replace("%(", ":").replace(")s", ""))
        yield from _stream(engine, statement, params, chunk_rows)
        return
    with tempfile.TemporaryFile() as spool:
        raw = engine.raw_connection()
        try:
            cursor = raw.driver_connection.cursor()
            with cursor.copy(_COPY_SQL.format(select=select), params) as copy:
                for block in copy:
                    spool.write(block)
            raw.driver_connection.rollback()
        finally:
            raw.close()
        spool.seek(0)
        reader = pd.read_csv(
            spool, header=None, names=_COPY_COLUMNS, na_values=["\\N"], keep_default_na=False, encoding="utf-8",
            dtype={c: object for c in _COPY_COLUMNS} | {"email_id": "int64", "received_us": "Int64"}, chunksize=chunk_rows,
        )
        for chunk in reader:
            micros = chunk.pop("received_us").to_numpy("int64", na_value=np.iinfo(np.int64).min)
            chunk.insert(2, "received_at", pd.Series(micros.view("datetime64[us]"), index=chunk.index).dt.tz_localize("UTC"))
            chunk["in_window"] = chunk["in_window"] == "t"
            yield chunk.astype({c: object for c in TYPED_COLUMNS + ["extracted_json"]}).where(chunk.notna(), None)


def copy_window_emails(engine: Engine, start: datetime, end: datetime, chunk_rows: int = 100_000) -> Iterator[pd.DataFrame]:
    """The window's synced emails that have a debt_amount, in chunks (COPY)."""
    return _copy_frames(engine, _EMAIL_SELECT.format(in_window="true") + _WINDOW_WHERE, {"start": start, "end": end}, chunk_rows)


def copy_related_emails(
    engine: Engine, start: datetime, end: datetime, senders: Sequence[str], min_received: datetime, chunk_rows: int = 100_000
) -> Iterator[pd.DataFrame]:
    """Synced emails outside the window that may be newer for a window email's creditor (same
    sender, received after the oldest window email) or that answer inside the window, in chunks (COPY)."""
    params = {"start": start, "end": end, "emails": list(senders), "min_received": min_received}
    return _copy_frames(engine, _EMAIL_SELECT.format(in_window="false") + _RELATED_WHERE, params, chunk_rows)


# --- outbox -------------------------------------------------------------------------------------

CLAIM_OUTBOX = sa.text(
    """
SELECT o.id, o.aggregate_type, o.aggregate_id, o.payload::text AS payload, o.created_at,
       o.retry_count, o.max_retries, e.id AS email_id, e.received_at AS email_received_at
FROM outbox_messages o
LEFT JOIN incoming_emails e
  ON o.aggregate_type = 'incoming_email'
 AND e.id = CASE WHEN o.aggregate_id ~ '^[0-9]{1,9}$' THEN o.aggregate_id::integer END
WHERE o.processed_at IS NULL AND o.retry_count < o.max_retries
  AND (o.created_at, o.id) > (CAST(:after_created AS timestamptz), CAST(:after_id AS integer))
ORDER BY o.created_at, o.id
LIMIT :limit
FOR UPDATE OF o SKIP LOCKED
"""
)


OutboxCursor = tuple[datetime, int]
START_OF_OUTBOX: OutboxCursor = (datetime(1, 1, 1, tzinfo=timezone.utc), 0)


def claim_outbox(conn: Connection, limit: int, after: OutboxCursor = START_OF_OUTBOX) -> list[Mapping[str, Any]]:
    """Lock up to `limit` pending messages after `after` (created_at, id), oldest first, skipping rows
    other workers hold. The cursor, not a list of the ids seen, keeps a 100,000-message backlog linear."""
    params = {"limit": limit, "after_created": after[0], "after_id": after[1]}
    return [dict(r._mapping) for r in conn.execute(CLAIM_OUTBOX, params)]


OUTBOX_STATEMENTS = sa.text(
    """
SELECT o.id, o.payload::text AS payload, o.created_at, e.id AS email_id, e.received_at AS email_received_at
FROM outbox_messages o
LEFT JOIN incoming_emails e
  ON o.aggregate_type = 'incoming_email'
 AND e.id = CASE WHEN o.aggregate_id ~ '^[0-9]{1,9}$' THEN o.aggregate_id::integer END
WHERE o.processed_at IS NOT NULL OR o.retry_count < o.max_retries
"""
)


def outbox_statements(conn: Connection) -> list[Mapping[str, Any]]:
    """Every outbox message that is or was a live statement (pending, or processed): the candidates
    that may supersede an older message of the same pair. Dead messages never reached MongoDB."""
    return [dict(r._mapping) for r in conn.execute(OUTBOX_STATEMENTS)]


SYNCED_EMAILS_OF_SENDERS = sa.text(
    _EMAIL_SELECT.format(in_window="false") + " AND lower(btrim(e.from_email)) = ANY(:senders) AND e.received_at >= :since"
)


def synced_email_statements(conn: Connection, senders: Sequence[str], since: datetime) -> pd.DataFrame:
    """Synced emails with a debt_amount from `senders` (lower-cased addresses) received at or after `since`,
    prepared as the extract prepares them (the newer words that supersede an outbox message)."""
    rows = conn.execute(SYNCED_EMAILS_OF_SENDERS, {"senders": list(senders), "since": since}).all() if senders else []
    return prepare_emails(pd.DataFrame(rows, columns=EMAIL_COLUMNS + TYPED_COLUMNS))


def count_pending_outbox(conn: Connection, after: OutboxCursor = START_OF_OUTBOX) -> int:
    """Messages still waiting for delivery (after the cursor `after`)."""
    return conn.execute(
        sa.text(
            "SELECT count(*) FROM outbox_messages WHERE processed_at IS NULL AND retry_count < max_retries "
            "AND (created_at, id) > (CAST(:after_created AS timestamptz), CAST(:after_id AS integer))"
        ),
        {"after_created": after[0], "after_id": after[1]},
    ).scalar_one()


def count_dead_outbox(conn: Connection) -> int:
    """Messages that exhausted their retries and were never delivered."""
    return conn.execute(
        sa.text("SELECT count(*) FROM outbox_messages WHERE processed_at IS NULL AND retry_count >= max_retries")
    ).scalar_one()


def _mark_emails_synced(conn: Connection, email_ids: Sequence[int]) -> None:
    if email_ids:
        conn.execute(
            sa.text(
                "UPDATE incoming_emails SET sync_status = 'synced', sync_error = NULL, updated_at = now() "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": list(email_ids)},
        )


def mark_delivered(conn: Connection, message_ids: Sequence[int], email_ids: Sequence[int]) -> None:
    """Delivered messages get processed_at; their emails become synced (same transaction)."""
    conn.execute(
        sa.text("UPDATE outbox_messages SET processed_at = now(), error_message = NULL WHERE id = ANY(:ids)"),
        {"ids": list(message_ids)},
    )
    _mark_emails_synced(conn, email_ids)


def mark_superseded(conn: Connection, notes: Mapping[int, str], email_ids: Sequence[int]) -> None:
    """Close superseded messages unwritten (processed_at, the note as error_message); their emails count
    as synced: MongoDB holds, or is about to hold, a newer word for their pair."""
    conn.execute(
        sa.text("UPDATE outbox_messages SET processed_at = now(), error_message = :note WHERE id = :id"),
        [{"id": mid, "note": note} for mid, note in notes.items()],
    )
    _mark_emails_synced(conn, email_ids)


def mark_failed(conn: Connection, message_id: int, email_id: int | None, error: str, poison: bool) -> bool:
    """Count a failed attempt (a poison message goes dead at once); returns whether it is now dead."""
    dead = conn.execute(
        sa.text(
            "UPDATE outbox_messages SET retry_count = CASE WHEN :poison THEN greatest(max_retries, retry_count + 1) "
            "ELSE retry_count + 1 END, error_message = :error WHERE id = :id RETURNING retry_count >= max_retries"
        ),
        {"id": message_id, "error": error, "poison": poison},
    ).scalar_one()
    if email_id is not None:
        conn.execute(
            sa.text(
                "UPDATE incoming_emails SET sync_error = :error, sync_retry_count = sync_retry_count + 1, "
                "sync_status = CASE WHEN :dead THEN 'failed' ELSE sync_status END, updated_at = now() WHERE id = :id"
            ),
            {"id": email_id, "error": error, "dead": dead},
        )
    return bool(dead)


# --- cleanup ------------------------------------------------------------------------------------

DELETE_EXPIRED_KEYS = sa.text(
    "DELETE FROM idempotency_keys WHERE key IN "
    "(SELECT key FROM idempotency_keys WHERE expires_at < now() LIMIT :n FOR UPDATE SKIP LOCKED)"
)
DELETE_OLD_OUTBOX = sa.text(
    "DELETE FROM outbox_messages WHERE id IN (SELECT id FROM outbox_messages WHERE processed_at IS NOT NULL "
    "AND created_at < now() - make_interval(days => :days) LIMIT :n FOR UPDATE SKIP LOCKED)"
)


def delete_in_batches(
    engine: Engine, statement: sa.TextClause, params: Mapping[str, Any], batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run a bounded DELETE repeatedly, one short transaction per batch; returns the rows deleted."""
    total = 0
    while True:
        with engine.begin() as conn:
            deleted = conn.execute(statement, {**params, "n": batch_size}).rowcount
        total += deleted
        if progress and deleted:
            progress(total)
        if deleted < batch_size:
            return total


# --- reports ------------------------------------------------------------------------------------

def open_report(
    engine: Engine, run_id: str, partition_key: str | None, window_start: datetime, window_end: datetime, dry_run: bool
) -> int:
    """Create (or re-open, for a re-executed run) the run's report row with status running."""
    values = dict(
        run_id=run_id, partition_key=partition_key, window_start=window_start, window_end=window_end,
        status="running", dry_run=dry_run, pid=os.getpid(), hostname=socket.gethostname(),
        heartbeat_at=sa.func.now(), run_at=sa.func.now(), completed_at=None, error_message=None,
    )
    stmt = sa.dialects.postgresql.insert(reconciliation_reports).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id"], set_={k: stmt.excluded[k] for k in values if k != "run_id"}
    ).returning(reconciliation_reports.c.id)
    with engine.begin() as conn:
        return conn.execute(stmt).scalar_one()


def heartbeat(engine: Engine, report_id: int) -> None:
    """Mark the report as alive (the stale-report sensor looks at this)."""
    with engine.begin() as conn:
        conn.execute(
            reconciliation_reports.update().where(reconciliation_reports.c.id == report_id).values(heartbeat_at=sa.func.now())
        )


def finish_report(
    engine: Engine, report_id: int, values: Mapping[str, Any], drift: ledger.DriftEvidence | None = None
) -> ledger.DriftSummary | None:
    """Record the final counts and details and mark the report completed (a re-execution from failure clears the failure); with the run's evidence, update
    the drift ledger in the same transaction and return its summary."""
    with engine.begin() as conn:
        conn.execute(
            reconciliation_reports.update()
            .where(reconciliation_reports.c.id == report_id)
            .values(**values, status="completed", error_message=None, completed_at=sa.func.now(), heartbeat_at=sa.func.now())
        )
        summary = ledger.update(conn, report_id, drift) if drift is not None else None
        audit.seal_report(conn, report_id)  # the report's counts join the audit chain
        return summary


def fail_report(engine: Engine, run_id: str, error: str) -> int:
    """Close a still-running report as failed; returns the number of rows changed."""
    with engine.begin() as conn:
        return conn.execute(
            reconciliation_reports.update()
            .where(reconciliation_reports.c.run_id == run_id, reconciliation_reports.c.status == "running")
            .values(status="failed", error_message=error[:10_000], completed_at=sa.func.now())
        ).rowcount


def running_reports(engine: Engine) -> list[Mapping[str, Any]]:
    """Reports still marked running (to be checked against their Dagster runs)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                reconciliation_reports.c.id, reconciliation_reports.c.run_id, reconciliation_reports.c.pid,
                reconciliation_reports.c.hostname, reconciliation_reports.c.heartbeat_at,
            ).where(reconciliation_reports.c.status == "running")
        )
        return [dict(r._mapping) for r in rows]


FINDING_FIELDS = list(audit.WRITABLE)


def insert_findings(
    engine: Engine, rows: Sequence[Mapping[str, Any]], batch_size: int = 5_000, returning_ids: bool = False
) -> Any:
    """Append audit rows to the reconciliation_findings chain; the new ids in row order when asked, else the count."""
    ids: list[int] = []
    for i in range(0, len(rows), batch_size):
        chunk = [{k: r.get(k) for k in FINDING_FIELDS} for r in rows[i : i + batch_size]]
        with engine.begin() as conn:
            ids += audit.append(conn, chunk)
    return ids if returning_ids else len(rows)


def append_finding_outcomes(engine: Engine, outcomes: Sequence[Mapping[str, Any]]) -> None:
    """Record the verified outcome (action, error, amounts) of writes as new audit rows naming their intent row (append-only)."""
    if not outcomes:
        return
    with engine.begin() as conn:
        ids = sorted({int(o["finding_id"]) for o in outcomes})
        intents = {r["id"]: r for r in conn.execute(
            sa.text(f"SELECT id, {', '.join(FINDING_FIELDS)} FROM reconciliation_findings WHERE id = ANY(:ids)"), {"ids": ids}
        ).mappings()}
        rows = []
        for o in outcomes:
            intent = intents[int(o["finding_id"])]
            row = {k: intent[k] for k in FINDING_FIELDS}
            row.update(
                intent_id=intent["id"], action=o["action"], error=o["error"], mongo_amount_cents_after=o["after"],
                mongo_amount_cents_before=o["before"] if o.get("before") is not None else intent["mongo_amount_cents_before"],
            )
            rows.append(row)
        audit.append(conn, rows)


@contextmanager
def advisory_lock(engine: Engine, key: int, wait_seconds: float, poll_seconds: float = 1.0) -> Iterator[bool]:
    """Hold a session-level advisory lock while the block runs; yields False if it was not free in time.

    The lock dies with the connection, so a killed run never leaves it behind.
    """
    with engine.connect() as conn:
        deadline = time.monotonic() + wait_seconds
        while not conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar_one():
            conn.commit()
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(poll_seconds)
        conn.commit()
        try:
            yield True
        finally:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
            conn.commit()


def unverified_writes(conn: Connection, in_flight: str, limit: int) -> list[Mapping[str, Any]]:
    """Audit rows of writes sent by runs that ended (reports no longer running) before the read-back."""
    return [dict(r._mapping) for r in conn.execute(
        sa.text(
            "SELECT f.id, f.outbox_message_id, f.email_id, f.client_id, f.creditor_pos, f.creditor_email, f.pg_amount_cents "
            "FROM reconciliation_findings f JOIN reconciliation_reports r ON r.id = f.report_id "
            "WHERE f.error = :in_flight AND f.intent_id IS NULL AND r.status <> 'running' "
            "AND NOT EXISTS (SELECT 1 FROM reconciliation_findings o WHERE o.intent_id = f.id) ORDER BY f.id LIMIT :limit"
        ),
        {"in_flight": in_flight, "limit": limit},
    )]



def unrepaired_findings(engine: Engine, report_id: int) -> list[Mapping[str, Any]]:
    """The report's findings left in MongoDB (every action but `repaired`; outbox deliveries excluded)."""
    with engine.connect() as conn:  # each finding with its newest outcome
        rows = conn.execute(sa.text(
            f"SELECT kind, client_aktenzeichen, creditor_email, email_id, client_id, creditor_pos FROM {audit.CURRENT_VIEW} "
            "WHERE report_id = :r AND kind <> 'outbox_delivery' AND action <> 'repaired' ORDER BY id"
        ), {"r": report_id})
        return [dict(r._mapping) for r in rows]
