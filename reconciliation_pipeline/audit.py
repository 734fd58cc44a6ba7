"""The audit trail: reconciliation_findings as an append-only SHA-256 hash chain (`python -m reconciliation_pipeline.audit verify`).

Every row carries `prev_hash` (the previous row's `row_hash`, in id order) and `row_hash` =
SHA-256 over the canonical encoding (`canonical`) of its content and `prev_hash`. Appends take
`pg_advisory_xact_lock(LOCK_KEY)`, read the chain's tail and draw their ids under it, so concurrent
runs still produce one chain. The outcome of a write is a new row whose `intent_id` names the intent
row; a finished report is sealed as a `report_seal` row carrying its counts (`sealed_counts`).
The view `reconciliation_findings_current` gives each finding (intent) with its newest outcome.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from reconciliation_pipeline.schema import pg_text, reconciliation_findings

LOCK_KEY = 7340210011
GENESIS = "0" * 64
SEAL_KIND = "report_seal"
SEAL_ACTION = "sealed"
CURRENT_VIEW = "reconciliation_findings_current"
# the hashed content, in this order; never change it (old rows would no longer verify)
HASHED = (
    "id", "report_id", "email_id", "outbox_message_id", "kind", "client_aktenzeichen", "creditor_email",
    "pg_amount_cents", "mongo_amount_cents_before", "mongo_amount_cents_after", "action", "error",
    "client_id", "match_level", "creditor_pos", "created_at", "intent_id", "sealed_counts",
)
WRITABLE = [c for c in HASHED if c not in ("id", "created_at")]
# the report counts a seal carries
SEALED_COUNTS = (
    "records_checked", "mismatches_found", "auto_repaired", "failed_repairs", "outbox_retried", "outbox_succeeded",
    "outbox_failed", "outbox_deferred", "outbox_dead", "outbox_superseded", "expired_keys_deleted", "old_outbox_deleted",
)


def _plain(v: Any) -> Any:
    """A stored value as a plain Python value (numpy scalars, NaN/NA as None, text as `pg_text`)."""
    if isinstance(v, str):
        return pg_text(v)
    if v is None or isinstance(v, (int, dt.datetime)):
        return v
    if hasattr(v, "item") and not isinstance(v, (list, tuple)):
        v = v.item()
    try:
        if v != v:  # NaN, NaT
            return None
    except (TypeError, ValueError):  # pd.NA
        return None
    return v


def _value(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        return v.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, int) or (hasattr(v, "__int__") and float(v) == int(v)):
        return int(v)
    return str(v)


def canonical(row: Mapping[str, Any], prev_hash: str) -> bytes:
    """The canonical encoding of a row: a JSON list of the HASHED values (UTC microsecond times) and prev_hash."""
    return json.dumps([_value(row.get(c)) for c in HASHED] + [prev_hash], ensure_ascii=False, separators=(",", ":")).encode()


def row_hash(row: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of the row's canonical encoding."""
    return hashlib.sha256(canonical(row, prev_hash)).hexdigest()


def tail(conn: Connection) -> tuple[int | None, str]:
    """The last row's id and row_hash (the chain's start after an archive, or GENESIS when empty)."""
    last = conn.execute(sa.text("SELECT id, row_hash FROM reconciliation_findings ORDER BY id DESC LIMIT 1")).first()
    if last is not None:
        return last[0], last[1]
    start = _archived(conn)
    return (start[0], start[1]) if start else (None, GENESIS)


def _archived(conn: Connection) -> tuple[int, str] | None:
    row = conn.execute(sa.text(
        "SELECT verified_through_id, row_hash FROM reconciliation_audit_checkpoints WHERE kind = 'archived' ORDER BY id DESC LIMIT 1"
    )).first()
    return (row[0], row[1]) if row else None


def append(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Append rows to the chain inside the caller's transaction (serialised by the advisory lock); their ids in order."""
    if not rows:
        return []
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
    _, prev = tail(conn)
    now = conn.execute(sa.text("SELECT now()")).scalar_one()
    ids = list(conn.execute(
        sa.text("SELECT nextval('reconciliation_findings_id_seq') FROM generate_series(1, :n)"), {"n": len(rows)}
    ).scalars())
    ids.sort()
    out = []
    for new_id, r in zip(ids, rows):
        row = {c: _plain(r.get(c)) for c in WRITABLE}
        row.update(id=new_id, created_at=now, prev_hash=prev)
        row["row_hash"] = prev = row_hash(row, row["prev_hash"])
        out.append(row)
    conn.execute(reconciliation_findings.insert(), out)  # a Core insert: batched as multi-row VALUES
    return ids


def seal_report(conn: Connection, report_id: int) -> int:
    """Seal a finished report into the chain: a report_seal row carrying its counts."""
    counts = conn.execute(sa.text(
        f"SELECT {', '.join(SEALED_COUNTS)} FROM reconciliation_reports WHERE id = :r"), {"r": report_id}).one()._mapping
    sealed = json.dumps({k: int(counts[k] or 0) for k in SEALED_COUNTS}, sort_keys=True, separators=(",", ":"))
    return append(conn, [{"report_id": report_id, "kind": SEAL_KIND, "action": SEAL_ACTION, "sealed_counts": sealed}])[0]


@dataclass
class Verdict:
    """The result of walking (part of) the chain."""

    ok: bool
    checked: int
    last_id: int | None
    last_hash: str
    bad_id: int | None = None
    reason: str = ""

    def text(self) -> str:
        """One line for the CLI and the asset check."""
        if self.ok:
            return f"audit chain intact: {self.checked} rows checked, last id {self.last_id}"
        return f"audit chain broken at row id {self.bad_id}: {self.reason}"


def verify(conn: Connection, after_id: int | None = None, after_hash: str | None = None, batch: int = 10_000) -> Verdict:
    """Walk the chain in id order from a verified point (or its start) and name the first row changed, moved, removed or added."""
    checkpoints = conn.execute(sa.text(
        "SELECT c.verified_through_id, c.row_hash, f.row_hash AS now_hash, f.id AS present FROM reconciliation_audit_checkpoints c "
        "LEFT JOIN reconciliation_findings f ON f.id = c.verified_through_id WHERE c.kind = 'verified' ORDER BY c.id"
    )).all()
    archived = _archived(conn)
    if after_id is None:
        after_id, prev = archived if archived else (0, GENESIS)
    else:
        prev = after_hash or GENESIS
    checked, last_id = 0, (after_id if archived or after_hash else None)
    cursor = after_id if last_id is not None else -(2**63)
    seals: dict[int, tuple[int, str]] = {}
    while True:
        rows = conn.execute(sa.text(
            f"SELECT {', '.join(HASHED)}, prev_hash, row_hash FROM reconciliation_findings WHERE id > :a ORDER BY id LIMIT :n"
        ), {"a": cursor, "n": batch}).mappings().all()
        if not rows:
            break
        cursor = rows[-1]["id"]
        for r in rows:
            if r["prev_hash"] != prev:
                if r["row_hash"] == row_hash(r, r["prev_hash"]) and r["prev_hash"] != GENESIS and last_id is not None \
                        and r["id"] > last_id + 1:
                    why = f"the row(s) between id {last_id} and this row were removed (prev_hash names a missing row)"
                else:
                    why = f"prev_hash does not match the row before it (id {last_id}): this row was inserted, moved or a row before it removed"
                return Verdict(False, checked, last_id, prev, r["id"], why)
            if r["row_hash"] != row_hash(r, r["prev_hash"]):
                return Verdict(False, checked, last_id, prev, r["id"], "content does not match its row_hash (altered)")
            if r["kind"] == SEAL_KIND:
                seals[r["report_id"]] = (r["id"], r["sealed_counts"])
            prev, last_id = r["row_hash"], r["id"]
            checked += 1
    for through, hash_then, hash_now, present in checkpoints:  # a verified row removed or replaced at the tail
        if (last_id or 0) >= through and present is None:
            return Verdict(False, checked, last_id, prev, through, "a row verified earlier is missing (deleted)")
        if present is not None and hash_now != hash_then:
            return Verdict(False, checked, last_id, prev, through, "row_hash differs from the one verified earlier (chain rewritten)")
        if (last_id or 0) < through:
            return Verdict(False, checked, last_id, prev, through, "rows verified earlier are missing at the end of the chain (deleted)")
    if seals:
        cols = ", ".join(SEALED_COUNTS)
        reports = {r["id"]: r for r in conn.execute(sa.text(
            f"SELECT id, {cols} FROM reconciliation_reports WHERE id = ANY(:ids)"), {"ids": list(seals)}).mappings()}
        for report_id, (seal_id, sealed) in sorted(seals.items(), key=lambda s: s[1][0]):
            report = reports.get(report_id)
            now = None if report is None else json.dumps({k: int(report[k] or 0) for k in SEALED_COUNTS}, sort_keys=True, separators=(",", ":"))
            if now != sealed:
                return Verdict(False, checked, last_id, prev, seal_id, f"report {report_id}'s counts differ from the ones sealed in this row")
    return Verdict(True, checked, last_id, prev)


def verify_since_last(engine: Engine) -> Verdict:
    """Verify the rows added since the last verified point and record the new point (the asset check)."""
    with engine.begin() as conn:
        point = conn.execute(sa.text(
            "SELECT c.verified_through_id, c.row_hash FROM reconciliation_audit_checkpoints c WHERE c.kind = 'verified' "
            "ORDER BY c.id DESC LIMIT 1")).first()
        if point is not None:
            current = conn.execute(sa.text(
                f"SELECT {', '.join(HASHED)}, prev_hash, row_hash FROM reconciliation_findings WHERE id = :i"), {"i": point[0]}).mappings().first()
            if current is None or current["row_hash"] != point[1] or row_hash(current, current["prev_hash"]) != point[1]:
                return Verdict(False, 0, point[0], point[1], point[0], "the last verified row was altered or removed")
            verdict = verify(conn, point[0], point[1])
        else:
            verdict = verify(conn)
        if verdict.ok and verdict.last_id is not None and (point is None or verdict.last_id != point[0]):
            conn.execute(sa.text(
                "INSERT INTO reconciliation_audit_checkpoints (kind, verified_through_id, row_hash, rows_checked) "
                "VALUES ('verified', :i, :h, :n)"), {"i": verdict.last_id, "h": verdict.last_hash, "n": verdict.checked})
        return verdict


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `verify` walks the whole chain; exit 0 when intact, 1 naming the first broken row."""
    parser = argparse.ArgumentParser(prog="python -m reconciliation_pipeline.audit")
    parser.add_argument("command", choices=["verify"])
    parser.add_argument("--url", default=os.environ.get("RECON_POSTGRES_URL"))
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("--url or RECON_POSTGRES_URL is required")
    engine = sa.create_engine(args.url)
    try:
        with engine.connect() as conn:
            verdict = verify(conn)
    finally:
        engine.dispose()
    print(verdict.text())
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
