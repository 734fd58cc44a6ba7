"""The hourly-partitioned `reconciliation_report` asset, built from the run's ops."""

import dagster as dg

from reconciliation_pipeline import ops
from reconciliation_pipeline.hooks import mark_report_failed
from reconciliation_pipeline.partitions import hourly_partitions
from reconciliation_pipeline.report import CHECK_SPECS


@dg.graph_asset(
    partitions_def=hourly_partitions,
    check_specs=CHECK_SPECS,
    hooks={mark_report_failed},
    group_name="reconciliation",
    kinds={"postgres", "mongodb", "pandas"},
    owners=["team:operations"],
    description=(
        "Hourly PostgreSQL -> MongoDB reconciliation of creditor debt amounts: outbox retry, diff, "
        "repair, cleanup and the report (counts as plottable metadata, findings as a table)."
    ),
)
def reconciliation_report():
    """Hourly PostgreSQL -> MongoDB reconciliation: outbox retry, diff, repair, cleanup, report."""
    run = ops.open_report()
    outbox = ops.retry_outbox(run)
    emails = ops.extract_postgres(run, outbox)
    shards = ops.route_emails(emails)
    diff = ops.merge_diffs(shards.map(lambda shard: ops.diff(run, shard, ops.extract_mongo(run, shard))).collect())
    repaired = ops.repair_mongo(run, diff)
    cleaned = ops.cleanup(run, outbox)
    return ops.finish_report(run, outbox, repaired, cleaned)
