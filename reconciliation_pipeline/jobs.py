"""The partitioned `reconciliation_job` and its hourly schedule."""

import os

import dagster as dg
from dagster_celery import celery_executor

from reconciliation_pipeline import doctor
from reconciliation_pipeline.assets import reconciliation_report
from reconciliation_pipeline.resources import MongoResource, PostgresResource

MONGO_WRITER_TAG = "reconciliation/mongo-writer"

JOB_TAGS = {
    MONGO_WRITER_TAG: "1",  # dagster.yaml limits runs with this tag to one at a time
    "dagster/max_runtime": "3600",  # run monitoring ends a hung run after an hour
    "dagster/max_retries": "1",  # run retries (daemon) for crashed runs; re-running converges
    "dagster/retry_strategy": "FROM_FAILURE",
}
SELECTION = dg.AssetSelection.assets(reconciliation_report).without_checks() | dg.AssetSelection.checks_for_assets(reconciliation_report)

# One process: starting a process per op costs seconds, and a crash kills the whole run, not a child.
reconciliation_job = dg.define_asset_job(
    "reconciliation_job",
    selection=SELECTION,
    description="Reconcile one hour: outbox retry, extract, diff, repair, cleanup, report.",
    tags=JOB_TAGS,
    executor_def=dg.in_process_executor,
)

# The same asset with the multiprocess executor, for runs that shard the MongoDB extract
# (settings.mongo_shards > 1) and want the shards in parallel on one machine.
reconciliation_parallel_job = dg.define_asset_job(
    "reconciliation_parallel_job",
    selection=SELECTION,
    description="reconciliation_job with one process per op, so that MongoDB extract shards run in parallel.",
    tags=JOB_TAGS,
    executor_def=dg.multiprocess_executor,
)


@dg.configured(
    celery_executor,
    config_schema={
        "queue": dg.Field(str, default_value="dagster", description="Celery queue the workers listen on (`-q`)"),
        "backend": dg.Field(str, default_value="rpc://", description="Celery result backend (with a Redis broker: the same redis:// URL)"),
    },
)
def reconciliation_celery_executor(config: dict) -> dict:
    """dagster-celery's executor with the broker from RECON_CELERY_BROKER_URL."""
    return {
        "broker": {"env": "RECON_CELERY_BROKER_URL"},
        "backend": config["backend"],
        "config_source": {"task_default_queue": config["queue"]},
    }


# The same asset on Celery workers: every op is a task any worker (machine) may run, so compare
# shards spread over workers. Needs storage every worker reaches (dagster.yaml: PostgreSQL) and,
# across machines, an IO manager on shared storage.
reconciliation_celery_job = dg.define_asset_job(
    "reconciliation_celery_job",
    selection=SELECTION,
    description="reconciliation_job with each op a Celery task (dagster-celery workers; broker RECON_CELERY_BROKER_URL).",
    tags=JOB_TAGS,
    executor_def=reconciliation_celery_executor,
)

reconciliation_hourly_schedule = dg.build_schedule_from_partitioned_job(
    reconciliation_job,
    name="reconciliation_hourly_schedule",
    minute_of_hour=5,  # a few minutes after the hour closes, so late writes of the hour are in
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


@dg.op(description="Run the doctor's preflight checks; fail with its table when any check fails.")
def preflight_checks(context: dg.OpExecutionContext, postgres: PostgresResource, mongo: MongoResource) -> None:
    """The doctor's checks against the job's resources (same table as `python -m reconciliation_pipeline.doctor`)."""
    checks = doctor.run_checks(postgres.url, mongo, os.environ.get("DAGSTER_HOME"))
    table = doctor.format_table(checks)
    context.log.info("preflight:\n" + table)
    bad = doctor.failed(checks)
    metadata = {"checks": dg.MetadataValue.md("```\n" + table + "\n```"), "failed": len(bad)}
    if bad:
        raise dg.Failure(description=f"{len(bad)} preflight check(s) failed:\n{table}", metadata=metadata)
    context.log.info(f"preflight passed: {len(checks)} checks, 0 FAIL")


@dg.job(description="Preflight: the doctor's checks of PostgreSQL, MongoDB, the semantics self-test and the Dagster instance.")
def reconciliation_preflight_job() -> None:
    """The preflight job (one op)."""
    preflight_checks()
