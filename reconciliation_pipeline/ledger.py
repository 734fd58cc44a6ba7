"""The drift ledger: one reconciliation_drift row per problem; `python -m reconciliation_pipeline.ledger`.

A problem is keyed by (aktenzeichen, creditor address, kind) as `problem_key`; a finding without an
aktenzeichen uses its email's id (`email:<id>`, else `client:<id>`), one without a creditor address
its email's id (else `pos:<n>`); a failed outbox delivery is `outbox:<message id>|outbox_delivery`.

Each finished run (MongoDB reachable, not a dry run) updates the ledger in the transaction that
completes its report: new problems open, problems seen again are refreshed (times_seen, amounts,
cause), a problem repaired and verified by the run resolves as `repaired`, an open problem whose
pair (or email) the run compared without finding it again resolves as `fixed_at_source` (or as
`superseded` when its cause was an outbox message that has since been superseded), and an open
failed outbox delivery resolves once its message is delivered (`repaired`) or superseded. Pairs the
run did not compare keep their state, and a row whose evidence comes from a later window than the
run's (a backfill of an older partition) is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from reconciliation_pipeline.core.diff import (
    AMBIGUOUS_CLIENT, AMBIGUOUS_CREDITOR, CLIENT_NOT_FOUND, CREDITOR_NOT_FOUND, INVALID_MONGO_AMOUNT, INVALID_PG_AMOUNT,
    OUTBOX_DELIVERY,
)
from reconciliation_pipeline.core.frames import held_once
from reconciliation_pipeline.core.repair import REPAIRED, SUPERSEDED
from reconciliation_pipeline.schema import NUL_STORED_AS, pg_text

LEDGER_LOCK = 7_340_210_003  # pg advisory xact lock: one ledger update at a time (MONGO_WRITER_LOCK is ...001)
CAUSES = ("outbox_pending", "outbox_dead", "sync_failed", "portal_newer", "invalid_source", "unmatched", "unknown")
UNMATCHED_KINDS = (CLIENT_NOT_FOUND, CREDITOR_NOT_FOUND, AMBIGUOUS_CLIENT, AMBIGUOUS_CREDITOR)
INVALID_KINDS = (INVALID_PG_AMOUNT, INVALID_MONGO_AMOUNT)
SEEN_COLUMNS = ["problem_key", "client_aktenzeichen", "creditor_email", "kind", "email_id", "pg_amount_cents",
                "mongo_amount_cents", "flag", "portal_newer"]
COMPARED_COLUMNS = ["client_aktenzeichen", "creditor_email", "email_id"]


def _az(values: pd.Series) -> pd.Series:
    return values.map(lambda v: v.strip()[:255] or None if isinstance(v, str) and not v.startswith("\x00") else None).astype(object)


def _address(values: pd.Series) -> pd.Series:
    return values.map(lambda v: v.strip().lower()[:255] or None if isinstance(v, str) else None).astype(object)


def _ids(values: pd.Series, prefix: str) -> pd.Series:
    return values.map(lambda v: None if v is None or pd.isna(v) else f"{prefix}{int(v) if not isinstance(v, str) else v}").astype(object)


def problem_keys(findings: pd.DataFrame) -> pd.Series:
    """The ledger key of each diff finding: `aktenzeichen|creditor address|kind`, ids where one is missing (as `pg_text`)."""
    if findings.empty:
        return pd.Series([], dtype=object, index=findings.index)
    email = _ids(findings["email_id"], "email:")
    subject = _az(findings["aktenzeichen"]).fillna(email).fillna(_ids(findings["client_id"], "client:")).fillna("?")
    other = _address(findings["creditor_email"]).fillna(email).fillna(_ids(findings["pos"], "pos:")).fillna("?")
    return (subject + "|" + other + "|" + findings["kind"].astype(str)).str.replace("\x00", NUL_STORED_AS, regex=False)


def compared_pairs(emails: pd.DataFrame) -> pd.DataFrame:
    """What a shard's comparison covered: its window emails' aktenzeichen (the route: an email found by
    name carries its client's), creditor address and id. A ledger problem of such a pair (or email)
    that the run did not find again is gone."""
    window = emails.loc[emails["in_window"].astype(bool)] if len(emails) else emails
    if not len(window):
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in COMPARED_COLUMNS})
    return pd.DataFrame({
        "client_aktenzeichen": _on_distinct(window["route"], _az), "creditor_email": _on_distinct(window["from_email_key"], _address),
        "email_id": window["email_id"].astype("int64"),
    }).reset_index(drop=True)


def _on_distinct(values: pd.Series, normalise: Any) -> pd.Series:
    """`normalise` applied once per distinct value, each result held once (not a new string a row)."""
    return pd.Series(held_once(values.to_numpy(object), normalise), index=values.index, dtype=object)


def seen_frame(findings: pd.DataFrame) -> pd.DataFrame:
    """One row per problem key of a run's diff findings: flag `repaired` when every finding of the key
    was repaired and verified, else `problem`."""
    if findings.empty:
        return pd.DataFrame(columns=SEEN_COLUMNS)
    observed = pd.to_datetime(findings["observed_response_at"], utc=True)
    expected = pd.to_datetime(findings["received_at"], utc=True)
    frame = pd.DataFrame({
        "problem_key": problem_keys(findings),
        "client_aktenzeichen": _az(findings["aktenzeichen"]),
        "creditor_email": _address(findings["creditor_email"]),
        "kind": findings["kind"].astype(str),
        "email_id": findings["email_id"].astype("Int64"),
        "pg_amount_cents": findings["pg_amount_cents"].astype("Int64"),
        "mongo_amount_cents": findings["mongo_amount_cents"].astype("Int64"),
        "repaired": (findings["action"] == REPAIRED).astype(bool),
        "portal_newer": (observed > expected).fillna(False).astype(bool),
    })
    out = frame.groupby("problem_key", sort=False).agg(
        client_aktenzeichen=("client_aktenzeichen", "first"), creditor_email=("creditor_email", "first"),
        kind=("kind", "first"), email_id=("email_id", "max"), pg_amount_cents=("pg_amount_cents", "last"),
        mongo_amount_cents=("mongo_amount_cents", "last"), repaired=("repaired", "all"), portal_newer=("portal_newer", "any"),
    ).reset_index()
    out["flag"] = out["repaired"].map({True: "repaired", False: "problem"})
    return out[SEEN_COLUMNS]


@dataclass
class DriftEvidence:
    """What one finished run tells the ledger."""

    window_end: datetime
    dry_run: bool
    mongo_available: bool
    findings: pd.DataFrame  # the run's repaired diff findings (RepairResult.findings)
    compared: pd.DataFrame | None = None  # compared_pairs of the run's shards (RepairResult.compared)

    @property
    def applies(self) -> bool:
        """Only a run that compared (MongoDB reachable) and could repair (not a dry run) changes the ledger."""
        return self.mongo_available and not self.dry_run


@dataclass
class DriftSummary:
    """The ledger after a run's update."""

    opened: int
    resolved: int
    open: int
    oldest_open_hours: float
    open_by_cause: dict[str, int] = field(default_factory=dict)
    updated: bool = True

    def metadata_values(self) -> dict[str, int | float]:
        """The plottable numbers: drift_open, drift_opened, drift_resolved, drift_oldest_open_hours, drift_open_<cause>."""
        return {"drift_open": self.open, "drift_opened": self.opened, "drift_resolved": self.resolved,
                "drift_oldest_open_hours": self.oldest_open_hours,
                **{f"drift_open_{c}": int(self.open_by_cause.get(c, 0)) for c in CAUSES}}


_TEMP_TABLES = """
CREATE TEMP TABLE drift_seen (
    problem_key text PRIMARY KEY, client_aktenzeichen text, creditor_email text, kind text NOT NULL,
    email_id integer, outbox_message_id integer, pg_amount_cents bigint, mongo_amount_cents bigint,
    flag text NOT NULL, portal_newer boolean NOT NULL DEFAULT false, cause text
) ON COMMIT DROP;
CREATE TEMP TABLE drift_compared (client_aktenzeichen text, creditor_email text, email_id integer) ON COMMIT DROP;
"""
_SEEN_TYPES = ("text", "text", "text", "text", "integer", "bigint", "bigint", "text", "boolean")
_INSERT_SEEN = sa.text(  # one statement of arrays: a mass drift of 100,000 findings is one round trip
    f"INSERT INTO drift_seen ({', '.join(SEEN_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"CAST(:{c} AS {t}[])" for c, t in zip(SEEN_COLUMNS, _SEEN_TYPES)) + ")"
)
# this run's failed outbox deliveries (the newest audit row of each message)
_OUTBOX_SEEN = sa.text(f"""
INSERT INTO drift_seen (problem_key, client_aktenzeichen, creditor_email, kind, email_id, outbox_message_id,
                        pg_amount_cents, mongo_amount_cents, flag)
SELECT 'outbox:' || f.outbox_message_id || '|{OUTBOX_DELIVERY}', nullif(btrim(f.client_aktenzeichen), ''),
       nullif(lower(btrim(f.creditor_email)), ''), '{OUTBOX_DELIVERY}', f.email_id, f.outbox_message_id,
       f.pg_amount_cents, f.mongo_amount_cents_before, 'problem'
FROM (SELECT DISTINCT ON (outbox_message_id) * FROM reconciliation_findings_current
      WHERE report_id = :r AND kind = '{OUTBOX_DELIVERY}' AND outbox_message_id IS NOT NULL
      ORDER BY outbox_message_id, id DESC) f
WHERE f.action = 'repair_failed'
""")
# the root cause of each seen problem, from what the stores say now: a waiting or dead outbox message
# for its email, pair or message; a failed sync of an email of the pair; then the finding itself
_CAUSES = sa.text(f"""
WITH waiting AS (
    SELECT o.id,
           CASE WHEN strpos(o.payload::text, '\\u0000') = 0 AND json_typeof(o.payload) = 'object'
                THEN btrim(o.payload ->> 'client_aktenzeichen') END AS az,
           CASE WHEN strpos(o.payload::text, '\\u0000') = 0 AND json_typeof(o.payload) = 'object'
                THEN lower(btrim(o.payload ->> 'creditor_email')) END AS creditor,
           CASE WHEN o.aggregate_type = 'incoming_email' AND o.aggregate_id ~ '^[0-9]{{1,9}}$'
                THEN o.aggregate_id::integer END AS email_id,
           o.retry_count >= o.max_retries AS dead
    FROM outbox_messages o WHERE o.processed_at IS NULL
), failed AS (
    SELECT e.id, lower(btrim(e.from_email)) AS creditor,
           CASE WHEN strpos(e.extracted_data::text, '\\u0000') = 0 AND json_typeof(e.extracted_data) = 'object'
                THEN btrim(e.extracted_data ->> 'client_aktenzeichen') END AS az
    FROM incoming_emails e
    WHERE (e.sync_status = 'failed' OR e.sync_error IS NOT NULL)
      AND lower(btrim(e.from_email)) IN (SELECT creditor_email FROM drift_seen)
), flags AS (  -- equi-joins only: a large backlog stays a hash join
    SELECT s.problem_key, w.id AS message_id, w.dead, false AS sync FROM drift_seen s JOIN waiting w ON w.id = s.outbox_message_id
    UNION ALL SELECT s.problem_key, w.id, w.dead, false FROM drift_seen s JOIN waiting w ON w.email_id = s.email_id
    UNION ALL SELECT s.problem_key, w.id, w.dead, false FROM drift_seen s
              JOIN waiting w ON w.az = s.client_aktenzeichen AND w.creditor = s.creditor_email
    UNION ALL SELECT s.problem_key, NULL, NULL, true FROM drift_seen s JOIN failed x ON x.id = s.email_id
    UNION ALL SELECT s.problem_key, NULL, NULL, true FROM drift_seen s
              JOIN failed x ON x.az = s.client_aktenzeichen AND x.creditor = s.creditor_email
), per_key AS (
    SELECT s.problem_key, coalesce(bool_or(NOT f.dead), false) AS pending, coalesce(bool_or(f.dead), false) AS dead,
           coalesce(bool_or(f.sync), false) AS sync_failed,
           min(f.message_id) FILTER (WHERE NOT f.dead) AS pending_id, min(f.message_id) FILTER (WHERE f.dead) AS dead_id
    FROM drift_seen s LEFT JOIN flags f ON f.problem_key = s.problem_key
    GROUP BY s.problem_key
)
UPDATE drift_seen s SET
    cause = CASE
        WHEN p.pending THEN 'outbox_pending'
        WHEN p.dead THEN 'outbox_dead'
        WHEN s.kind = '{OUTBOX_DELIVERY}' THEN 'outbox_pending'
        WHEN p.sync_failed THEN 'sync_failed'
        WHEN s.portal_newer THEN 'portal_newer'
        WHEN s.kind IN ({", ".join(f"'{k}'" for k in INVALID_KINDS)}) THEN 'invalid_source'
        WHEN s.kind IN ({", ".join(f"'{k}'" for k in UNMATCHED_KINDS)}) THEN 'unmatched'
        ELSE 'unknown' END,
    outbox_message_id = coalesce(s.outbox_message_id, p.pending_id, p.dead_id)
FROM per_key p WHERE p.problem_key = s.problem_key
""")
# a row is the run's to change unless its evidence comes from a later window (a backfill's run)
_CURRENT = "(d.kind = '{k}' OR d.evidence_window_end IS NULL OR d.evidence_window_end <= CAST(:window_end AS timestamptz))".format(
    k=OUTBOX_DELIVERY)
_EVIDENCE = (f"CASE WHEN d.kind = '{OUTBOX_DELIVERY}' THEN NULL "
             "ELSE greatest(d.evidence_window_end, CAST(:window_end AS timestamptz)) END")
# seen again: counted as opened when the row was resolved (reopened), as resolved when repaired now
_REOPENED = sa.text(f"""
SELECT count(*) FROM reconciliation_drift d JOIN drift_seen s ON s.problem_key = d.problem_key
WHERE d.status = 'resolved' AND {_CURRENT} AND d.last_report_id <> :r
""")
_REFRESH = sa.text(f"""
UPDATE reconciliation_drift d SET
    status = CASE WHEN s.flag = 'problem' THEN 'open' ELSE 'resolved' END,
    times_seen = d.times_seen + 1, last_seen_at = now(), last_report_id = :r,
    client_aktenzeichen = coalesce(s.client_aktenzeichen, d.client_aktenzeichen),
    creditor_email = coalesce(s.creditor_email, d.creditor_email),
    email_id = coalesce(s.email_id, d.email_id), outbox_message_id = coalesce(s.outbox_message_id, d.outbox_message_id),
    pg_amount_cents = s.pg_amount_cents, mongo_amount_cents = s.mongo_amount_cents, cause = s.cause,
    evidence_window_end = {_EVIDENCE},
    resolved_at = CASE WHEN s.flag = 'problem' THEN NULL ELSE now() END,
    resolved_report_id = CASE WHEN s.flag = 'problem' THEN NULL ELSE :r END,
    resolution = CASE WHEN s.flag = 'problem' THEN NULL ELSE 'repaired' END
FROM drift_seen s
WHERE d.problem_key = s.problem_key AND {_CURRENT} AND d.last_report_id <> :r
""")
_OPEN_NEW = sa.text(f"""
INSERT INTO reconciliation_drift (problem_key, client_aktenzeichen, creditor_email, kind, email_id, outbox_message_id,
    status, cause, first_seen_at, last_seen_at, first_report_id, last_report_id, times_seen, pg_amount_cents,
    mongo_amount_cents, evidence_window_end, resolved_at, resolved_report_id, resolution)
SELECT s.problem_key, s.client_aktenzeichen, s.creditor_email, s.kind, s.email_id, s.outbox_message_id,
       CASE WHEN s.flag = 'problem' THEN 'open' ELSE 'resolved' END, s.cause, now(), now(), :r, :r, 1,
       s.pg_amount_cents, s.mongo_amount_cents,
       CASE WHEN s.kind = '{OUTBOX_DELIVERY}' THEN NULL ELSE CAST(:window_end AS timestamptz) END,
       CASE WHEN s.flag = 'problem' THEN NULL ELSE now() END, CASE WHEN s.flag = 'problem' THEN NULL ELSE :r END,
       CASE WHEN s.flag = 'problem' THEN NULL ELSE 'repaired' END
FROM drift_seen s
WHERE NOT EXISTS (SELECT 1 FROM reconciliation_drift d WHERE d.problem_key = s.problem_key)
""")
_INSERT_COMPARED = sa.text(
    "INSERT INTO drift_compared SELECT * FROM unnest(CAST(:a AS text[]), CAST(:c AS text[]), CAST(:e AS integer[]))"
)
# open problems whose pair (or email) this run compared without finding them again
_GONE = sa.text(f"""
WITH hit AS (  -- two hash joins, not an OR of correlated EXISTS (that was a nested loop: 70 s at 50,000 rows)
    SELECT d.id FROM reconciliation_drift d JOIN drift_compared c
      ON c.client_aktenzeichen = d.client_aktenzeichen AND c.creditor_email = d.creditor_email
    WHERE d.status = 'open'
    UNION
    SELECT d.id FROM reconciliation_drift d JOIN drift_compared c ON c.email_id = d.email_id
    WHERE d.status = 'open'
)
UPDATE reconciliation_drift d SET status = 'resolved', resolved_at = now(), resolved_report_id = :r,
    evidence_window_end = {_EVIDENCE},
    resolution = CASE WHEN d.cause IN ('outbox_pending', 'outbox_dead') AND EXISTS (
                          SELECT 1 FROM reconciliation_findings_current f
                          WHERE f.outbox_message_id = d.outbox_message_id AND f.action = '{SUPERSEDED}')
                      THEN 'superseded' ELSE 'fixed_at_source' END
FROM hit
WHERE d.id = hit.id AND d.status = 'open' AND d.kind <> '{OUTBOX_DELIVERY}' AND {_CURRENT}
  AND NOT EXISTS (SELECT 1 FROM drift_seen s WHERE s.problem_key = d.problem_key)
""")
# open failed deliveries whose message has since been closed: delivered, or superseded unwritten
_OUTBOX_CLOSED = sa.text(f"""
UPDATE reconciliation_drift d SET status = 'resolved', resolved_at = now(), resolved_report_id = :r,
    resolution = CASE WHEN EXISTS (SELECT 1 FROM reconciliation_findings_current f
                                   WHERE f.outbox_message_id = d.outbox_message_id AND f.action = '{SUPERSEDED}')
                      THEN 'superseded'
                      WHEN EXISTS (SELECT 1 FROM reconciliation_findings_current f
                                   WHERE f.outbox_message_id = d.outbox_message_id AND f.action = '{REPAIRED}')
                      THEN 'repaired' ELSE 'fixed_at_source' END  -- closed by someone else
FROM outbox_messages o
WHERE d.status = 'open' AND d.kind = '{OUTBOX_DELIVERY}' AND o.id = d.outbox_message_id AND o.processed_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM drift_seen s WHERE s.problem_key = d.problem_key)
""")
_RESOLVED_BY = sa.text("SELECT count(*) FROM reconciliation_drift WHERE resolved_report_id = :r AND status = 'resolved'")
_SUMMARY = sa.text("""
SELECT count(*) AS open,
       coalesce(extract(epoch FROM now() - min(first_seen_at)) / 3600, 0) AS oldest
FROM reconciliation_drift WHERE status = 'open'
""")
_BY_CAUSE = sa.text("SELECT cause, count(*) FROM reconciliation_drift WHERE status = 'open' GROUP BY cause")


def _array(values: pd.Series) -> list[Any]:
    """Plain Python values (None for NA, numpy scalars unwrapped, text as `pg_text`) for an unnest() parameter."""
    return [None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else
            pg_text(v) if isinstance(v, str) else (v.item() if hasattr(v, "item") else v)
            for v in values.astype(object)]


def summary(conn: Connection, opened: int = 0, resolved: int = 0, updated: bool = True) -> DriftSummary:
    """The ledger's open problems now (count, oldest age in hours, per cause) with a run's opened/resolved."""
    row = conn.execute(_SUMMARY).mappings().one()
    by_cause = {c: int(n) for c, n in conn.execute(_BY_CAUSE)}
    return DriftSummary(int(opened), int(resolved), int(row["open"]), round(float(row["oldest"]), 3), by_cause, updated)


def update(conn: Connection, report_id: int, evidence: DriftEvidence) -> DriftSummary:
    """Apply one finished run's evidence to the ledger inside the caller's transaction."""
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LEDGER_LOCK)))
    if not evidence.applies:  # MongoDB down or a dry run: nothing compared or repaired, every row keeps its state
        return summary(conn, updated=False)
    conn.execute(sa.text("DROP TABLE IF EXISTS drift_seen, drift_compared"))  # a second update in one transaction
    for statement in _TEMP_TABLES.split(";"):
        if statement.strip():
            conn.execute(sa.text(statement))
    seen = seen_frame(evidence.findings)
    if len(seen):
        conn.execute(_INSERT_SEEN, {c: _array(seen[c]) for c in SEEN_COLUMNS})
    conn.execute(_OUTBOX_SEEN, {"r": report_id})
    conn.execute(_CAUSES)
    params = {"r": report_id, "window_end": evidence.window_end}
    reopened = conn.execute(_REOPENED, params).scalar_one()
    conn.execute(_REFRESH, params)
    opened = conn.execute(_OPEN_NEW, params).rowcount + reopened
    compared = evidence.compared
    if compared is not None and len(compared):
        compared = compared.drop_duplicates()
        conn.execute(_INSERT_COMPARED, {"a": _array(compared["client_aktenzeichen"]), "c": _array(compared["creditor_email"]),
                                        "e": _array(compared["email_id"])})
        conn.execute(sa.text("ANALYZE drift_compared"))
        conn.execute(_GONE, params)
    conn.execute(_OUTBOX_CLOSED, params)
    resolved = conn.execute(_RESOLVED_BY, params).scalar_one()
    return summary(conn, opened, resolved)


_DESCRIBE = sa.text(
    "SELECT problem_key, times_seen, cause FROM reconciliation_drift WHERE problem_key = ANY(CAST(:keys AS text[]))"
)


def describe(conn: Connection, findings: pd.DataFrame) -> pd.DataFrame:
    """The ledger's `times_seen` and `cause` of each finding's problem (indexed like `findings`; NA where the
    ledger has no row for it, as for a dry run's new problem)."""
    keys = problem_keys(findings)
    rows = conn.execute(_DESCRIBE, {"keys": sorted(set(keys))}).all() if len(keys) else []
    known = pd.DataFrame(rows, columns=["problem_key", "times_seen", "cause"]).set_index("problem_key")
    described = known.reindex(keys.to_numpy())
    described.index = findings.index
    return described.astype({"times_seen": "Int64", "cause": object})


# --- CLI ----------------------------------------------------------------------------------------

_LIST = """
SELECT id, problem_key, client_aktenzeichen, creditor_email, kind, cause, status, resolution, times_seen,
       round((extract(epoch FROM coalesce(resolved_at, now()) - first_seen_at) / 3600)::numeric, 1) AS age_hours,
       pg_amount_cents, mongo_amount_cents, first_seen_at, last_seen_at, resolved_at,
       first_report_id, last_report_id, resolved_report_id, email_id, outbox_message_id
FROM reconciliation_drift {where} ORDER BY status, first_seen_at, id
"""


def problems(conn: Connection, include_resolved: bool = False) -> list[dict[str, Any]]:
    """The ledger's rows (open ones only unless asked), oldest first; never a client name."""
    where = "" if include_resolved else "WHERE status = 'open'"
    return [dict(r) for r in conn.execute(sa.text(_LIST.format(where=where))).mappings()]


def _euros(cents: Any) -> str:
    return "" if cents is None else f"{int(cents) / 100:,.2f}"


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else float(value)


def main(argv: list[str] | None = None) -> int:
    """`python -m reconciliation_pipeline.ledger [--all] [--json]`: the open (or all) drift problems."""
    from reconciliation_pipeline.db import database_url

    parser = argparse.ArgumentParser(prog="python -m reconciliation_pipeline.ledger", description="The drift ledger's open problems.")
    parser.add_argument("--url", help="SQLAlchemy URL (default: $RECON_POSTGRES_URL)")
    parser.add_argument("--all", action="store_true", help="include resolved problems")
    parser.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    args = parser.parse_args(argv)
    engine = sa.create_engine(database_url(args.url))
    try:
        with engine.connect() as conn:
            rows = problems(conn, args.all)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, default=_json_value, indent=2))
        return 0
    print(f"{'aktenzeichen':16} {'creditor':36} {'kind':22} {'cause':15} {'status':15} {'seen':>4} {'age h':>7} "
          f"{'PostgreSQL':>12} {'MongoDB':>12}")
    for r in rows:
        status = r["status"] if r["status"] == "open" else r["resolution"] or r["status"]
        print(f"{(r['client_aktenzeichen'] or '-')[:16]:16} {(r['creditor_email'] or '-')[:36]:36} {r['kind'][:22]:22} "
              f"{r['cause']:15} {status[:15]:15} {r['times_seen']:>4} {float(r['age_hours']):>7.1f} "
              f"{_euros(r['pg_amount_cents']):>12} {_euros(r['mongo_amount_cents']):>12}")
    print(f"{len(rows)} {'problems' if args.all else 'open problems'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
