"""Step 4, repair (RULES.md section 4): PostgreSQL's amounts into MongoDB under the writer lock, audited."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from pymongo.errors import ConnectionFailure
from sqlalchemy.engine import Engine

from reconciliation_pipeline import faults
from reconciliation_pipeline.core import repair as core_repair
from reconciliation_pipeline.run.audit_rows import finding_rows, record_intent, record_outcomes
from reconciliation_pipeline.run.types import DiffResult, Logger, RepairResult, RunContext, counts_text, progress
from reconciliation_pipeline.store import mongo as mongo_store
from reconciliation_pipeline.store import postgres as pg


def _updates_from_findings(findings: pd.DataFrame) -> dict[str, list[core_repair.ElementUpdate]]:
    todo = findings[findings["repairable"]]
    updates: dict[str, list[core_repair.ElementUpdate]] = {}
    for key, client_id, pos, email, name, cents, received, observed in zip(
        todo.index, todo["client_id"], todo["pos"], todo["observed_sender_email"], todo["observed_sender_name"],
        todo["pg_amount_cents"], todo["received_at"], todo["mongo_raw"],
    ):
        updates.setdefault(client_id, []).append(
            core_repair.ElementUpdate(
                key=int(key), pos=int(pos), sender_email=None if pd.isna(email) else email,
                sender_name=None if pd.isna(name) else name, cents=int(cents),
                received_at=pd.Timestamp(received).to_pydatetime(), observed_amount=observed,
            )
        )
    return updates


def repair(
    engine: Engine, collection_factory: Callable[[], Any], diff: DiffResult, ctx: RunContext, *,
    max_repairs: int, lock_wait_seconds: int, batch_size: int, log: Logger,
) -> RepairResult:
    """Write PostgreSQL's amounts into MongoDB for the repairable findings (CAS, read back, audited).

    The audit rows go in before the first write (repairable ones as not verified) and each verified
    outcome follows as a row of its own, so a run killed mid-write still leaves a record of what it sent.
    """
    findings = diff.findings.copy()
    findings["action"] = core_repair.REPORTED
    findings["error"] = findings["reason"] if len(findings) else None
    findings["mongo_amount_cents_after"] = pd.array([pd.NA] * len(findings), dtype="Int64")
    repairable = findings["repairable"].astype(bool) if len(findings) else pd.Series(dtype=bool)
    result = RepairResult(findings, diff.records_checked, diff.mongo_available, repairable=int(repairable.sum()), note=diff.note,
                          compared=diff.compared)
    if result.repairable and ctx.dry_run:
        findings.loc[repairable, "action"] = core_repair.SKIPPED_DRY_RUN
        log.info(f"repair: dry run, {result.repairable} repairable findings left as they are")
    elif result.repairable > max_repairs:
        findings.loc[repairable, "action"] = core_repair.SKIPPED_BUDGET
        result.repairs_halted = True
        result.note = f"{result.repairable} repairable findings exceed max_repairs={max_repairs}: nothing repaired"
        log.error(f"repair: {result.note}")
    elif result.repairable:
        _write_repairs(engine, collection_factory, findings, repairable, ctx, lock_wait_seconds, batch_size, log, result)
        return result
    pg.insert_findings(engine, finding_rows(ctx, findings))
    return result


def _write_repairs(
    engine: Engine, collection_factory: Callable[[], Any], findings: pd.DataFrame, repairable: pd.Series,
    ctx: RunContext, lock_wait_seconds: int, batch_size: int, log: Logger, result: RepairResult,
) -> None:
    log.info(f"repair: {result.repairable} repairable findings; taking the MongoDB writer lock (waits up to {lock_wait_seconds} s)")
    with pg.advisory_lock(engine, pg.MONGO_WRITER_LOCK, lock_wait_seconds) as locked:
        if not locked:
            findings.loc[repairable, "action"] = core_repair.SKIPPED_CONCURRENT_CHANGE
            findings.loc[repairable, "error"] = "another reconciliation run held the MongoDB writer lock"
            result.note = "another run was writing to MongoDB: repairs skipped, checked again next run"
            log.warning(f"repair: {result.note}")
            pg.insert_findings(engine, finding_rows(ctx, findings))
            return
        audit_ids = dict(zip(findings.index, record_intent(engine, finding_rows(ctx, findings), writes=repairable.to_numpy())))
        updates = _updates_from_findings(findings)
        try:
            with collection_factory() as collection:
                documents = mongo_store.fetch_by_ids(collection, list(updates), batch_size)
                outcomes = mongo_store.write_updates(collection, documents, updates, batch_size, progress(log, "repair"))
                faults.checkpoint("after_repair_mongo_write")
        except ConnectionFailure as exc:
            outcomes = {
                u.key: core_repair.Outcome(core_repair.REPAIR_FAILED, error=f"MongoDB unreachable: {type(exc).__name__}", connection_lost=True)
                for us in updates.values() for u in us
            }
        for key, outcome in outcomes.items():
            findings.loc[key, "action"] = outcome.action
            findings.loc[key, "error"] = outcome.error
            findings.loc[key, "mongo_amount_cents_after"] = outcome.after_cents
        record_outcomes(engine, [(audit_ids[key], o) for key, o in outcomes.items()])
    actions = findings.loc[repairable, "action"].value_counts().to_dict()
    log.info(f"repair: {counts_text(actions)}")
