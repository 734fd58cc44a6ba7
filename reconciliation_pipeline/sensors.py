"""A sensor that closes reports whose run is no longer alive."""

import dagster as dg

from reconciliation_pipeline.liveness import close_stale_reports
from reconciliation_pipeline.resources import PostgresResource


@dg.sensor(minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING)
def close_stale_reports_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SkipReason:
    """Mark `failed` the reconciliation reports left running by crashed, cancelled or killed runs."""
    with postgres.get_engine() as engine:
        closed = close_stale_reports(engine, context.instance, context.log)
    return dg.SkipReason(f"closed {closed} stale reports" if closed else "no stale reports")
