"""Failure hook: a run that fails still leaves an honest `failed` report."""

import dagster as dg

from reconciliation_pipeline.store import postgres as pg


@dg.failure_hook(required_resource_keys={"postgres"})
def mark_report_failed(context: dg.HookContext) -> None:
    """Mark the run's reconciliation_reports row failed with the failing op and its error."""
    error = context.op_exception
    message = f"op {context.op.name} failed: {type(error).__name__}: {error}" if error else f"op {context.op.name} failed"
    with context.resources.postgres.get_engine() as engine:
        pg.fail_report(engine, context.run_id, message)
    context.log.error(f"report of run {context.run_id} marked failed: {message[:500]}")
