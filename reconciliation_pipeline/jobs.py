"""The partitioned `reconciliation_job` and its hourly schedule."""

import dagster as dg

from reconciliation_pipeline.assets import reconciliation_report

MONGO_WRITER_TAG = "reconciliation/mongo-writer"

reconciliation_job = dg.define_asset_job(
    "reconciliation_job",
    selection=dg.AssetSelection.assets(reconciliation_report).without_checks() | dg.AssetSelection.checks_for_assets(reconciliation_report),
    description="Reconcile one hour: outbox retry, extract, diff, repair, cleanup, report.",
    tags={
        MONGO_WRITER_TAG: "1",  # dagster.yaml limits runs with this tag to one at a time
        "dagster/max_runtime": "3600",  # run monitoring ends a hung run after an hour
        "dagster/max_retries": "1",  # run retries (daemon) for crashed runs; re-running converges
        "dagster/retry_strategy": "FROM_FAILURE",
    },
    # One process by default (starting a process per op costs seconds); a run that shards the MongoDB
    # extract sets `execution: {config: {multiprocess: {max_concurrent: N}}}` to run shards in parallel.
    executor_def=dg.multi_or_in_process_executor,
    config={"execution": {"config": {"in_process": {}}}},
)

reconciliation_hourly_schedule = dg.build_schedule_from_partitioned_job(
    reconciliation_job,
    name="reconciliation_hourly_schedule",
    minute_of_hour=5,  # a few minutes after the hour closes, so late writes of the hour are in
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
