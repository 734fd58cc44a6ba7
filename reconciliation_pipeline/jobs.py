"""The partitioned `reconciliation_job` and its hourly schedule."""

import dagster as dg

from reconciliation_pipeline.assets import reconciliation_report

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
# (settings.mongo_shards > 1) and want the shards in parallel; k8s/celery executors slot in here.
reconciliation_parallel_job = dg.define_asset_job(
    "reconciliation_parallel_job",
    selection=SELECTION,
    description="reconciliation_job with one process per op, so that MongoDB extract shards run in parallel.",
    tags=JOB_TAGS,
    executor_def=dg.multiprocess_executor,
)

reconciliation_hourly_schedule = dg.build_schedule_from_partitioned_job(
    reconciliation_job,
    name="reconciliation_hourly_schedule",
    minute_of_hour=5,  # a few minutes after the hour closes, so late writes of the hour are in
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
