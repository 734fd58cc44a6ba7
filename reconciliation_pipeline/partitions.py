"""The hourly partitions (Europe/Berlin) shared by the job, the report asset and the schedule."""

import os

import dagster as dg

PARTITIONS_START = os.environ.get("RECON_PARTITIONS_START", "2025-01-01-00:00")
PARTITIONS_TIMEZONE = "Europe/Berlin"

hourly_partitions = dg.HourlyPartitionsDefinition(
    start_date=PARTITIONS_START, timezone=PARTITIONS_TIMEZONE, fmt="%Y-%m-%d-%H:%M"
)
