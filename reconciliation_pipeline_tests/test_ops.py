"""Op-level tests with build_op_context against the real databases."""

from datetime import datetime, timezone

import dagster as dg
import pandas as pd
import pytest

from reconciliation_pipeline import ops
from reconciliation_pipeline.run.types import OutboxResult
from reconciliation_pipeline.report import build_report
from reconciliation_pipeline.resources import ReconciliationSettings
from reconciliation_pipeline.store.postgres import finish_report
from reconciliation_pipeline_tests.builders import PARTITION, add_client, add_email, creditor, reply, reports

SPARKASSE = "forderungen@sparkasse-bochum.de"


def context(resources, partition=PARTITION, **settings):
    res = {**resources, "settings": ReconciliationSettings(**settings)}
    return dg.build_op_context(resources=res, partition_key=partition, instance=dg.DagsterInstance.ephemeral())


def test_open_report_uses_the_partition_window_in_utc(resources, pg):
    run = ops.open_report(context(resources, lookback_hours=3))
    assert run.window_end == datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)  # 11:00 Berlin
    assert run.window_start == datetime(2026, 11, 28, 7, 0, tzinfo=timezone.utc)
    [row] = reports(pg)
    assert row["status"] == "running" and row["partition_key"] == PARTITION and row["id"] == run.report_id


def test_open_report_needs_a_partition(resources, pg):
    ctx = dg.build_op_context(resources={**resources}, instance=dg.DagsterInstance.ephemeral())
    with pytest.raises(dg.Failure, match="partitioned"):
        ops.open_report(ctx)


def test_extract_diff_and_report_ops(resources, pg, mongo_db):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(amount=12.5))
    ctx = context(resources)
    run = ops.open_report(ctx)
    outbox = OutboxResult()
    emails = ops.extract_postgres(ctx, run, outbox)
    assert isinstance(emails, pd.DataFrame) and emails["in_window"].sum() == 1
    [shard] = [o.value for o in ops.route_emails(ctx, emails)]
    assert shard.aktenzeichen == ("542900",) and len(shard.emails) == 1
    extracted = ops.extract_mongo(ctx, run, shard)
    clients, elements = extracted.clients.concat(), extracted.elements.concat()
    assert list(clients["aktenzeichen"]) == ["542900"] and len(elements) == 1 == extracted.elements.rows
    assert set(clients) == {"client_id", "aktenzeichen", "az_key", "name_key"}  # narrow: keys, no names
    assert list(extracted.parts["kind"]) == ["routed", "rest"] and len(extracted.clients) == 2  # a part per batch, then the rest
    diff = ops.merge_diffs(ctx, [ops.diff(ctx, run, shard, extracted)])
    assert list(diff.findings["kind"]) == ["data_mismatch"] and diff.records_checked == 1
    repaired = ops.repair_mongo(ctx, run, diff)
    assert list(repaired.findings["action"]) == ["repaired"]
    # finish_report's check results need the asset around it: its report is built and stored here
    report = build_report(run, outbox, repaired, {"expired_keys_deleted": 0, "old_outbox_deleted": 0}, 200, None)
    assert report.summary["auto_repaired"] == 1
    assert {c.check_name: c.passed for c in report.check_results} == {
        "no_unrepaired_drift": True, "repair_budget_not_exceeded": True, "no_dead_outbox_messages": True}
    assert isinstance(report.metadata["records_checked"], dg.IntMetadataValue)
    with resources["postgres"].get_engine() as engine:
        finish_report(engine, run.report_id, report.row)
    [row] = reports(pg)
    assert row["status"] == "completed" and row["auto_repaired"] == 1 and row["details"]["by_kind"] == {"data_mismatch": 1}
