"""The run's report: the reconciliation_reports row, the asset's metadata and its check results."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd

from reconciliation_pipeline.core import repair as core_repair
from reconciliation_pipeline.ledger import DriftSummary
from reconciliation_pipeline.core.diff import EXTRA_IN_MONGO, KINDS, REPAIRABLE_KINDS
from reconciliation_pipeline.run.types import OutboxResult, RepairResult, RunContext

ASSET_KEY = dg.AssetKey("reconciliation_report")
CHECK_UNREPAIRED_DRIFT = "no_unrepaired_drift"
CHECK_REPAIR_BUDGET = "repair_budget_not_exceeded"
CHECK_DEAD_OUTBOX = "no_dead_outbox_messages"
CHECK_AUDIT_CHAIN = "audit_chain_intact"
CHECK_SPECS = [
    dg.AssetCheckSpec(CHECK_UNREPAIRED_DRIFT, asset=ASSET_KEY, description="Every finding of the window was repaired (red: drift is left in MongoDB; see the findings table and the audit table)."),
    dg.AssetCheckSpec(CHECK_REPAIR_BUDGET, asset=ASSET_KEY, description="Repairable findings stayed within max_repairs (red: mass drift, nothing was repaired; investigate before raising the budget)."),
    dg.AssetCheckSpec(CHECK_DEAD_OUTBOX, asset=ASSET_KEY, description="No outbox message exhausted its retries (red: failed MongoDB writes need a person; see outbox_messages.error_message)."),
    dg.AssetCheckSpec(CHECK_AUDIT_CHAIN, asset=ASSET_KEY, description="The audit rows added since the last verified point form an intact hash chain (red: an audit row was altered, removed or inserted; run `python -m reconciliation_pipeline.audit verify`)."),
]
TABLE_ROWS = 50
FINDINGS_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("aktenzeichen", "string", description="the client's file number (never a name)"),
    dg.TableColumn("creditor", "string", description="the creditor's e-mail address"),
    dg.TableColumn("kind", "string", description="data_mismatch, missing_in_mongo, extra_in_mongo, client_not_found, ..."),
    dg.TableColumn("action", "string", description="repaired, repair_failed, skipped_*, reported"),
    dg.TableColumn("postgres_eur", "float", description="amount in PostgreSQL (the source of truth), EUR"),
    dg.TableColumn("mongo_eur", "float", description="amount in MongoDB before the run, EUR"),
    dg.TableColumn("times_seen", "int", description="runs the drift ledger has seen this problem in (blank: not in the ledger, e.g. a dry run)"),
    dg.TableColumn("cause", "string", description="the ledger's root cause: outbox_pending, outbox_dead, sync_failed, portal_newer, invalid_source, unmatched, unknown"),
])
TABLE_COLUMNS = [c.name for c in FINDINGS_SCHEMA.columns]


@dataclass
class Report:
    """Everything the finish_report op records."""

    row: dict[str, Any]
    counts: dict[str, int]
    summary: dict[str, Any]
    metadata: dict[str, Any]
    check_results: list[dg.AssetCheckResult]


def _euros(cents: Any) -> float | None:
    return None if cents is None or pd.isna(cents) else int(cents) / 100


def _text(value: Any) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)[:200]


def findings_table(findings: pd.DataFrame, described: pd.DataFrame | None = None, limit: int = TABLE_ROWS) -> dg.TableMetadataValue:
    """The first findings as a table (aktenzeichen and creditor address, never names; amounts in EUR), with
    the drift ledger's times_seen and cause of each (`ledger.describe`)."""
    head = findings.head(limit)
    ledger_rows = (described.reindex(head.index) if described is not None
                   else pd.DataFrame({"times_seen": pd.NA, "cause": None}, index=head.index))
    records = [
        dg.TableRecord({"aktenzeichen": _text(az), "creditor": _text(creditor), "kind": _text(kind), "action": _text(action),
                        "postgres_eur": _euros(pg_cents), "mongo_eur": _euros(mongo_cents),
                        "times_seen": None if pd.isna(seen) else int(seen), "cause": _text(cause)})
        for az, creditor, kind, pg_cents, mongo_cents, action, seen, cause in zip(
            head["aktenzeichen"], head["creditor_email"], head["kind"], head["pg_amount_cents"],
            head["mongo_amount_cents"], head["action"], ledger_rows["times_seen"], ledger_rows["cause"])
    ] if len(head) else []
    return dg.MetadataValue.table(records, schema=FINDINGS_SCHEMA)


def _details(findings: pd.DataFrame, cap: int) -> list[dict[str, Any]]:
    cols = ["kind", "email_id", "aktenzeichen", "creditor_email", "pg_amount_cents", "mongo_amount_cents", "action", "error"]
    head = findings.head(cap).reindex(columns=cols).astype(object)
    return head.where(head.notna(), None).to_dict("records")


def build_report(
    run: RunContext, outbox: OutboxResult, repaired: RepairResult, cleaned: dict[str, int], details_cap: int,
    run_started: float | None, drift: DriftSummary | None = None, described: pd.DataFrame | None = None,
) -> Report:
    """Counts, the report row, numeric metadata, the findings table and the three check results
    (with the drift ledger's numbers once the run has updated it, and its times_seen and cause per finding)."""
    findings = repaired.findings
    actions = findings["action"].value_counts().to_dict() if len(findings) else {}
    kinds = findings["kind"].value_counts().to_dict() if len(findings) else {}
    counts = {
        "records_checked": int(repaired.records_checked),
        "mismatches_found": int(len(findings)),
        "auto_repaired": int(actions.get(core_repair.REPAIRED, 0)),
        "failed_repairs": int(actions.get(core_repair.REPAIR_FAILED, 0)),
        "outbox_retried": outbox.retried,
        "outbox_succeeded": outbox.succeeded,
        "outbox_failed": outbox.failed,
        "outbox_deferred": outbox.deferred,
        "outbox_dead": outbox.dead,
        "outbox_superseded": outbox.superseded,
        "expired_keys_deleted": int(cleaned.get("expired_keys_deleted", 0)),
        "old_outbox_deleted": int(cleaned.get("old_outbox_deleted", 0)),
    }
    notes = [n for n in (outbox.note, repaired.note) if n]
    row = {
        **counts,
        "mongo_available": repaired.mongo_available,
        "dry_run": run.dry_run,
        "repairs_halted": repaired.repairs_halted,
        "details": {
            "findings": _details(findings, details_cap),
            "findings_total": int(len(findings)),
            "by_kind": {k: int(v) for k, v in kinds.items()},
            "by_action": {k: int(v) for k, v in actions.items()},
            "unverified_writes_read_back": int(outbox.settled),
            "notes": notes,
        },
    }
    unrepaired = int(len(findings)) - counts["auto_repaired"]
    drift_rate = (unrepaired / counts["records_checked"]) if counts["records_checked"] else 0.0
    duration = time.time() - run_started if run_started else None
    metadata: dict[str, Any] = {
        **{k: dg.MetadataValue.int(v) for k, v in counts.items()},
        "extra_in_mongo": dg.MetadataValue.int(int(kinds.get(EXTRA_IN_MONGO, 0))),
        **{f"kind_{k}": dg.MetadataValue.int(int(kinds.get(k, 0))) for k in KINDS if k != EXTRA_IN_MONGO},
        "unrepaired_findings": dg.MetadataValue.int(unrepaired),
        "unverified_writes_read_back": dg.MetadataValue.int(int(outbox.settled)),
        "drift_rate": dg.MetadataValue.float(round(float(drift_rate), 6)),
        "mongo_available": dg.MetadataValue.bool(bool(repaired.mongo_available)),
        "dry_run": dg.MetadataValue.bool(run.dry_run),
        "repairs_halted": dg.MetadataValue.bool(repaired.repairs_halted),
        "window_start": dg.MetadataValue.text(run.window_start.isoformat()),
        "window_end": dg.MetadataValue.text(run.window_end.isoformat()),
        "report_id": dg.MetadataValue.int(run.report_id),
        "findings": findings_table(findings, described),
        "dagster/row_count": dg.MetadataValue.int(int(len(findings))),  # all findings; the table shows the first TABLE_ROWS
    }
    if drift is not None:
        metadata.update({k: dg.MetadataValue.float(float(v)) if isinstance(v, float) else dg.MetadataValue.int(int(v))
                         for k, v in drift.metadata_values().items()})
    if duration is not None:
        metadata["duration_seconds"] = dg.MetadataValue.float(round(duration, 3))
    if notes:
        metadata["notes"] = dg.MetadataValue.text("; ".join(notes))
    summary = {"report_id": run.report_id, "partition_key": run.partition_key, **counts,
               "mongo_available": repaired.mongo_available, "repairs_halted": repaired.repairs_halted}

    repairable_left = findings[findings["kind"].isin(REPAIRABLE_KINDS) & (findings["action"] != core_repair.REPAIRED)] if len(findings) else findings
    ledger_text = "" if drift is None else (
        f" Drift ledger: {drift.open} open problems"
        + (f", the oldest open for {drift.oldest_open_hours:.1f} h" if drift.open else "")
        + ("" if drift.updated else " (not updated by this run)") + " (`python -m reconciliation_pipeline.ledger`)."
    )
    ledger_meta = {} if drift is None else {"drift_open": drift.open, "drift_oldest_open_hours": float(drift.oldest_open_hours)}
    if not repaired.mongo_available:
        drift_check = dg.AssetCheckResult(
            check_name=CHECK_UNREPAIRED_DRIFT, asset_key=ASSET_KEY, passed=False, severity=dg.AssetCheckSeverity.WARN,
            description="MongoDB was unreachable: the comparison was skipped (outbox retry and cleanup ran)." + ledger_text,
            metadata=ledger_meta,
        )
    else:
        drift_check = dg.AssetCheckResult(
            check_name=CHECK_UNREPAIRED_DRIFT, asset_key=ASSET_KEY, passed=unrepaired == 0, severity=dg.AssetCheckSeverity.ERROR,
            description=f"{unrepaired} findings left unrepaired ({len(repairable_left)} of a repairable kind).{ledger_text}",
            metadata={"unrepaired_findings": unrepaired, "repairable_left": int(len(repairable_left)),
                      **{f"kind_{k}": int(v) for k, v in kinds.items()}, **ledger_meta},
        )
    checks = [
        drift_check,
        dg.AssetCheckResult(
            check_name=CHECK_REPAIR_BUDGET, asset_key=ASSET_KEY, passed=not repaired.repairs_halted,
            severity=dg.AssetCheckSeverity.ERROR,
            description=repaired.note if repaired.repairs_halted else f"{repaired.repairable} repairable findings within the budget.",
            metadata={"repairable": int(repaired.repairable)},
        ),
        dg.AssetCheckResult(
            check_name=CHECK_DEAD_OUTBOX, asset_key=ASSET_KEY, passed=outbox.dead == 0, severity=dg.AssetCheckSeverity.ERROR,
            description=f"{outbox.dead} dead outbox messages (processed_at IS NULL AND retry_count >= max_retries).",
            metadata={"outbox_dead": int(outbox.dead)},
        ),
    ]
    return Report(row, counts, summary, metadata, checks)


def audit_check(verdict: Any) -> dg.AssetCheckResult:
    """The audit_chain_intact result from an audit.Verdict (ids and counts only)."""
    return dg.AssetCheckResult(
        check_name=CHECK_AUDIT_CHAIN, asset_key=ASSET_KEY, passed=bool(verdict.ok), severity=dg.AssetCheckSeverity.ERROR,
        description=verdict.text() + ("" if verdict.ok else " (`python -m reconciliation_pipeline.audit verify`)"),
        metadata={"audit_rows_checked": int(verdict.checked), "audit_last_id": int(verdict.last_id or 0),
                  "audit_last_hash": dg.MetadataValue.text(str(verdict.last_hash)),  # an anchor outside the database
                  **({} if verdict.ok else {"audit_broken_id": int(verdict.bad_id or 0)})},
    )
