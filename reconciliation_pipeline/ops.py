"""The ops of one reconciliation run: thin wrappers around the `run` package with resources and the window."""


import dagster as dg
import pandas as pd

from reconciliation_pipeline import audit, faults, ledger
from reconciliation_pipeline.run import cleanup as cleanup_step
from reconciliation_pipeline.run import diff as diff_step
from reconciliation_pipeline.run import extract as extract_step
from reconciliation_pipeline.run import outbox as outbox_step
from reconciliation_pipeline.run import repair as repair_step
from reconciliation_pipeline.run.types import DiffResult, MongoExtract, MongoShard, OutboxResult, RepairResult, RunContext, window_for
from reconciliation_pipeline.io_managers import REPORT_TABLE
from reconciliation_pipeline.liveness import close_stale_reports
from reconciliation_pipeline.partitions import hourly_partitions
from reconciliation_pipeline.report import TABLE_ROWS, audit_check, build_report
from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings
from reconciliation_pipeline.store import postgres as pg

MONGO_WRITER_POOL = "reconciliation_mongo_writer"
READ_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)


def _partition_window(context: dg.OpExecutionContext) -> dg.TimeWindow:
    # the asset's partitions definition, also when the op is invoked on its own (op tests)
    return hourly_partitions.time_window_for_partition_key(context.partition_key)


LOOKBACK_TAG = "reconciliation/lookback_hours"


def _lookback_hours(context: dg.OpExecutionContext, settings: ReconciliationSettings) -> int:
    """settings.lookback_hours, or the run tag that `dagster job backfill --tags` can carry."""
    tag = context.get_tag(LOOKBACK_TAG)
    if tag is None:
        return settings.lookback_hours
    if not tag.isdigit() or not 1 <= int(tag) <= 24 * 366:
        raise dg.Failure(f"run tag {LOOKBACK_TAG}={tag!r} is not a whole number of hours between 1 and 8784")
    return int(tag)


@dg.op
def open_report(context: dg.OpExecutionContext, postgres: PostgresResource, settings: ReconciliationSettings) -> RunContext:
    """Create the run's reconciliation_reports row (status running) for the partition's window."""
    if not context.has_partition_key:
        raise dg.Failure("reconciliation_report is hourly-partitioned: launch it for a partition (e.g. --partition 2026-11-28-10:00)")
    lookback = _lookback_hours(context, settings)
    start, end = window_for(_partition_window(context).end, lookback)
    with postgres.get_engine() as engine:
        closed = close_stale_reports(engine, context.instance, context.log)
        report_id = pg.open_report(engine, context.run_id, context.partition_key, start, end, settings.dry_run)
    faults.checkpoint("after_report_created")
    context.log.info(
        f"report {report_id}: partition {context.partition_key}, window [{start.isoformat()}, {end.isoformat()}), "
        f"lookback {lookback} h, dry_run={settings.dry_run}, stale reports closed: {closed}"
    )
    return RunContext(report_id, context.run_id, context.partition_key, start, end, settings.dry_run)


@dg.op(pool=MONGO_WRITER_POOL)
def retry_outbox(
    context: dg.OpExecutionContext, run: RunContext, postgres: PostgresResource, mongo: MongoResource,
    settings: ReconciliationSettings,
) -> OutboxResult:
    """Deliver pending outbox messages oldest first (poison ones go dead); read back writes killed runs left unverified."""
    with postgres.get_engine() as engine:
        pg.heartbeat(engine, run.report_id)
        return outbox_step.retry_outbox(
            engine, mongo.get_clients_collection, run, mongo_available=mongo.is_available(),
            batch_size=settings.outbox_batch_size, mongo_batch_size=settings.mongo_batch_size,
            lock_wait_seconds=settings.repair_lock_wait_seconds, low_confidence=settings.repair_low_confidence, log=context.log,
        )


@dg.op(retry_policy=READ_RETRY)
def extract_postgres(
    context: dg.OpExecutionContext, run: RunContext, outbox: OutboxResult, postgres: PostgresResource
) -> pd.DataFrame:
    """Read the window's synced emails (and newer ones for the same creditors) from PostgreSQL."""
    with postgres.get_engine() as engine:
        pg.heartbeat(engine, run.report_id)
        return extract_step.extract_postgres(engine, run, log=context.log)


@dg.op(out=dg.DynamicOut(MongoShard), retry_policy=READ_RETRY)
def route_emails(context: dg.OpExecutionContext, emails: pd.DataFrame, mongo: MongoResource, settings: ReconciliationSettings):
    """Route each email to its client's aktenzeichen (name lookup if it has none) and split into shards."""
    if not mongo.is_available():
        context.log.warning("route: MongoDB unreachable; comparison and repair skipped")
        shards = [MongoShard(0, 1, emails.iloc[:0], (), available=False, error="MongoDB unreachable")]
    else:
        with mongo.get_clients_collection() as collection:
            shards = extract_step.route_emails(
                collection, emails, count=settings.mongo_shards, batch_size=settings.mongo_keys_per_query,
                full_scan_ratio=settings.mongo_full_scan_ratio, log=context.log,
            )
    for shard in shards:
        context.log.info(f"shard {shard.index}: {len(shard.emails)} emails, {len(shard.aktenzeichen)} aktenzeichen")
        yield dg.DynamicOutput(shard, mapping_key=f"shard_{shard.index}")


@dg.op(retry_policy=READ_RETRY)
def extract_mongo(
    context: dg.OpExecutionContext, run: RunContext, shard: MongoShard, mongo: MongoResource, settings: ReconciliationSettings
) -> MongoExtract:
    """Read one shard's client documents from MongoDB in batches into narrow frames (clients, creditor elements)."""
    with mongo.get_clients_collection() as collection:
        return extract_step.extract_mongo(collection, shard, run, batch_size=settings.mongo_keys_per_query, log=context.log)


@dg.op
def diff(
    context: dg.OpExecutionContext, run: RunContext, shard: MongoShard, extracted: MongoExtract, settings: ReconciliationSettings
) -> DiffResult:
    """Diff one shard's emails against its client documents (vectorised pandas), part by part as read."""
    options = diff_step.diff_options(
        run, tolerance_cents=settings.amount_tolerance_cents, repair_low_confidence=settings.repair_low_confidence
    )
    return diff_step.diff_shard(shard, extracted, options=options, keys_per_diff=settings.mongo_keys_per_query, log=context.log)


@dg.op
def merge_diffs(context: dg.OpExecutionContext, results: list) -> DiffResult:
    """Combine the shards' findings into the run's diff."""
    merged = diff_step.merge_diffs(results)
    context.log.info(f"diff: {merged.records_checked} pairs compared, {len(merged.findings)} findings")
    return merged


@dg.op(pool=MONGO_WRITER_POOL)
def repair_mongo(
    context: dg.OpExecutionContext, run: RunContext, diff: DiffResult, postgres: PostgresResource,
    mongo: MongoResource, settings: ReconciliationSettings,
) -> RepairResult:
    """Write PostgreSQL's amounts into MongoDB for repairable findings (compare-and-swap, read back)."""
    with postgres.get_engine() as engine:
        pg.heartbeat(engine, run.report_id)
        return repair_step.repair(
            engine, mongo.get_clients_collection, diff, run, max_repairs=settings.max_repairs,
            lock_wait_seconds=settings.repair_lock_wait_seconds, batch_size=settings.mongo_batch_size, log=context.log,
        )


@dg.op(retry_policy=READ_RETRY)
def cleanup(
    context: dg.OpExecutionContext, run: RunContext, outbox: OutboxResult, postgres: PostgresResource,
    settings: ReconciliationSettings,
) -> dict:
    """Delete expired idempotency keys and old processed outbox rows in bounded batches."""
    with postgres.get_engine() as engine:
        pg.heartbeat(engine, run.report_id)
        return cleanup_step.cleanup(
            engine, retention_days=settings.outbox_retention_days, batch_size=settings.cleanup_batch_size, log=context.log
        )


@dg.op(
    out={
        "result": dg.Out(dict, description="The run's reconciliation_reports row: {table, report_id}"),
        **{name: dg.Out(is_required=False) for name in ("reconciliation_report_no_unrepaired_drift", "reconciliation_report_repair_budget_not_exceeded", "reconciliation_report_no_dead_outbox_messages", "reconciliation_report_audit_chain_intact")},
    },
)
def finish_report(
    context: dg.OpExecutionContext, run: RunContext, outbox: OutboxResult, repaired: RepairResult,
    cleaned: dict, postgres: PostgresResource, settings: ReconciliationSettings, io_manager: dg.ResourceParam[dg.IOManager],
):
    """Complete the reconciliation_reports row, materialize the report with metadata and checks, drop the run's files."""
    started = context.instance.get_run_stats(context.run_id).start_time
    report = build_report(run, outbox, repaired, cleaned, settings.findings_in_details, started)
    faults.checkpoint("before_report_finished")
    evidence = ledger.DriftEvidence(run.window_end, run.dry_run, repaired.mongo_available, repaired.findings, repaired.compared)
    with postgres.get_engine() as engine:  # the report row and the drift ledger in one transaction
        drift = pg.finish_report(engine, run.report_id, report.row, evidence)
        chain = audit.verify_since_last(engine)  # the rows added since the last verified point, this report's seal included
        with engine.connect() as conn:
            described = ledger.describe(conn, repaired.findings.head(TABLE_ROWS))
    report = build_report(run, outbox, repaired, cleaned, settings.findings_in_details, started, drift, described)
    context.log.info(f"report {run.report_id}: " + ", ".join(f"{k}={v}" for k, v in report.counts.items()))
    row = {"table": REPORT_TABLE, "report_id": run.report_id}
    yield dg.Output(row, output_name="result", metadata={**report.metadata, "table": dg.MetadataValue.text(REPORT_TABLE)})
    yield from report.check_results
    yield audit_check(chain)
    # The last step and every output handled: the run has succeeded, its stored outputs (email
    # frames with client names) go. A failure before this line keeps them for re-execution.
    drop_run = getattr(io_manager, "drop_run", None)
    if drop_run is None:
        context.log.warning(f"io_manager {type(io_manager).__name__} cannot drop the run's files")
    else:
        context.log.info(f"run files dropped: {drop_run(context.run, context.instance)} run directories")
