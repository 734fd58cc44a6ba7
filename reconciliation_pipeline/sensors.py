"""Sensors: close reports whose run is no longer alive; alert operators about failures and drift."""

from __future__ import annotations

import time
from typing import Any

import dagster as dg
import pandas as pd

from reconciliation_pipeline import alerts, ledger
from reconciliation_pipeline.liveness import close_stale_reports
from reconciliation_pipeline.report import ASSET_KEY
from reconciliation_pipeline.resources import PostgresResource
from reconciliation_pipeline.store import postgres as pg

ALERT_JOBS = ("reconciliation_job", "reconciliation_parallel_job")
BATCH = 100  # materializations / run failures read per tick; the rest follows on the next tick
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
COUNT_KEYS = ("records_checked", "mismatches_found", "auto_repaired", "failed_repairs", "unrepaired_findings",
              "outbox_dead")


@dg.sensor(minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING)
def close_stale_reports_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SkipReason:
    """Mark `failed` the reconciliation reports left running by crashed, cancelled or killed runs."""
    with postgres.get_engine() as engine:
        closed = close_stale_reports(engine, context.instance, context.log)
    return dg.SkipReason(f"closed {closed} stale reports" if closed else "no stale reports")


def _targets_report(run: dg.DagsterRun | None, step_keys: list[str]) -> bool:
    """The job's runs, and ad-hoc asset runs (UI "Materialize", `dg launch`) of the report's steps."""
    if run is None:
        return False
    prefix = f"{ASSET_KEY.to_python_identifier()}."
    return (run.job_name in ALERT_JOBS or ASSET_KEY in (run.asset_selection or ())
            or any(k.startswith(prefix) for k in step_keys))


def _materialization(instance: dg.DagsterInstance, record: Any, engine: Any) -> alerts.Materialization:
    event = record.event_log_entry
    mat = event.asset_materialization
    meta = mat.metadata
    counts = {k: int(meta[k].value) for k in COUNT_KEYS if k in meta}
    failed, passed = {}, []
    for r in instance.get_records_for_run(run_id=record.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION,
                                          limit=100).records:
        evaluation = r.event_log_entry.dagster_event.event_specific_data
        if evaluation.asset_key != ASSET_KEY:
            continue
        if evaluation.passed:
            passed.append(evaluation.check_name)
        elif evaluation.severity == dg.AssetCheckSeverity.ERROR:
            failed[evaluation.check_name] = evaluation.description or ""
    problems: list[alerts.Problem] = []
    if "report_id" in meta:
        rows = pg.unrepaired_findings(engine, int(meta["report_id"].value))
        # keyed as the drift ledger keys them: the same open problem, whichever email shows it next hour
        keys = ledger.problem_keys(pd.DataFrame(
            {"kind": [f["kind"] for f in rows], "aktenzeichen": [f["client_aktenzeichen"] for f in rows],
             "creditor_email": [f["creditor_email"] for f in rows], "email_id": [f["email_id"] for f in rows],
             "client_id": [f["client_id"] for f in rows], "pos": [f["creditor_pos"] for f in rows]}, dtype=object))
        problems = [alerts.Problem(f["kind"], f["client_aktenzeichen"], f["creditor_email"], f["email_id"], key)
                    for f, key in zip(rows, keys)]
    compared = bool(meta["mongo_available"].value) if "mongo_available" in meta else True
    compared = compared and not (bool(meta["dry_run"].value) if "dry_run" in meta else False)
    return alerts.Materialization(
        storage_id=record.storage_id, run_id=record.run_id, partition=mat.partition, timestamp=event.timestamp,
        counts=counts, failed_error_checks=failed, passed_checks=passed, problems=problems, compared=compared)


def _new_materializations(instance: dg.DagsterInstance, state: alerts.AlertState, engine: Any) -> list[alerts.Materialization]:
    """Materializations after the cursor, in order, up to the first whose run is still going (its checks may follow).

    On the first tick: the newest materialization whose run has finished, the baseline (newer ones
    of runs still going are evaluated on later ticks, as news).
    """
    if not state.started:
        for record in instance.fetch_materializations(ASSET_KEY, limit=BATCH).records:  # newest first
            run = instance.get_run_by_id(record.run_id)
            if run is None or run.status in FINISHED:
                return [_materialization(instance, record, engine)]
        return []
    records = list(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ASSET_KEY, after_storage_id=state.materialization_after),
        limit=BATCH, ascending=True).records)
    out = []
    for record in records:
        run = instance.get_run_by_id(record.run_id)
        if run is not None and run.status not in FINISHED:
            break
        out.append(_materialization(instance, record, engine))
    return out


def _new_failures(instance: dg.DagsterInstance, state: alerts.AlertState) -> tuple[list[alerts.RunFailure], int | None]:
    """RUN_FAILURE events after the cursor of runs that target the report; and the newest storage id read."""
    if not state.started:
        latest = list(instance.fetch_run_status_changes(dg.DagsterEventType.RUN_FAILURE, limit=1).records)
        return [], (latest[0].storage_id if latest else 0)
    records = list(instance.fetch_run_status_changes(
        dg.RunStatusChangeRecordsFilter(event_type=dg.DagsterEventType.RUN_FAILURE,
                                        after_storage_id=state.run_failure_after),
        limit=BATCH, ascending=True).records)
    failures = []
    for record in records:
        run = instance.get_run_by_id(record.run_id)
        stats = instance.get_run_step_stats(record.run_id)
        if not _targets_report(run, [s.step_key for s in stats]):
            continue
        steps = [s.step_key for s in stats if s.status is not None and s.status.value == "FAILURE"]
        failures.append(alerts.RunFailure(
            storage_id=record.storage_id, run_id=record.run_id, job_name=run.job_name,
            partition=run.tags.get("dagster/partition"), timestamp=record.event_log_entry.timestamp,
            failed_steps=steps))
    return failures, (records[-1].storage_id if records else state.run_failure_after)


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def reconciliation_alert_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SkipReason:
    """Post failed runs, red ERROR checks, new and stale drift to RECON_ALERT_WEBHOOK_URL / RECON_ALERT_SMTP_URL."""
    try:
        config = alerts.config_from_env()
    except alerts.AlertConfigError as exc:
        context.log.error(f"alerts misconfigured, nothing sent: {exc}")
        return dg.SkipReason(f"alerts misconfigured: {exc}")
    if not config.configured:
        return dg.SkipReason("alerts not configured (RECON_ALERT_WEBHOOK_URL / RECON_ALERT_SMTP_URL + RECON_ALERT_EMAIL_TO)")
    state = alerts.AlertState.from_cursor(context.cursor)
    first = not state.started
    with postgres.get_engine() as engine:
        materializations = _new_materializations(context.instance, state, engine)
    failures, failures_after = _new_failures(context.instance, state)
    new_state, messages = alerts.evaluate(state, config, materializations, failures, now=time.time(),
                                          latest_storage_ids=(None, failures_after))
    if not first and failures_after is not None:
        new_state.run_failure_after = max(new_state.run_failure_after or 0, failures_after)
    new_state.pending = alerts.deliver([*new_state.pending, *messages], config, context.log)
    context.update_cursor(new_state.to_cursor())
    if first:
        return dg.SkipReason(f"baseline taken: {len(new_state.open)} open problems, "
                             f"{sum(not v for v in new_state.checks.values())} red checks are not news")
    sent = len(messages) + len(state.pending) - len(new_state.pending)
    return dg.SkipReason(f"{len(messages)} new alerts, {sent} delivered, {len(new_state.pending)} waiting for a retry")
