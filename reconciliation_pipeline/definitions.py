"""The code location: asset, job, schedule, sensor and resources configured from the environment."""

import dagster as dg

from reconciliation_pipeline.assets import reconciliation_report
from reconciliation_pipeline.io_managers import RunFilesIOManager
from reconciliation_pipeline.jobs import (
    reconciliation_hourly_schedule,
    reconciliation_celery_job,
    reconciliation_job,
    reconciliation_parallel_job,
    reconciliation_preflight_job,
)
from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings
from reconciliation_pipeline.sensors import close_stale_reports_sensor, reconciliation_alert_sensor

defs = dg.Definitions(
    assets=[reconciliation_report],
    jobs=[reconciliation_job, reconciliation_parallel_job, reconciliation_celery_job, reconciliation_preflight_job],
    schedules=[reconciliation_hourly_schedule],
    sensors=[close_stale_reports_sensor, reconciliation_alert_sensor],
    # Runs the UI and `dg launch` start from the asset (Materialize, Partitions-tab backfills) run in one
    # process like reconciliation_job: a process per op costs seconds, and a crash kills the whole run.
    # (liveness.why_dead trusts a recorded pid only when it is the run's own process.)
    executor=dg.in_process_executor,
    resources={
        "postgres": PostgresResource(url=dg.EnvVar("RECON_POSTGRES_URL")),
        "mongo": MongoResource(uri=dg.EnvVar("RECON_MONGO_URI"), database=dg.EnvVar("RECON_MONGO_DB")),
        "settings": ReconciliationSettings(),
        "io_manager": RunFilesIOManager(),  # run-scoped Parquet/BSON/JSON, dropped when the run succeeds
    },
)
