"""The synthetic data generator produces what it claims, and the real pipeline steps find the planted drift."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from reconciliation_pipeline.run import diff as diff_step
from reconciliation_pipeline.run import extract as extract_step
from reconciliation_pipeline.run.types import RunContext
from benchmarks import datagen
from reconciliation_pipeline_tests.builders import PARTITION, WINDOW_END
from reconciliation_pipeline_tests.support import finding_rows, report_rows

LOG = logging.getLogger("test_datagen")


@pytest.fixture
def generated(pg, mongo_db):
    info = datagen.generate(
        pg, mongo_db, emails=2_000, clients=200, creditors_per_client=10, drift=0.05, outbox=40, keys=20,
        window_end=WINDOW_END, seed=7, name_only=0.01,
    )
    return info


def _scalar(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def test_counts_and_shape(pg, mongo_db, generated):
    info = generated
    assert info["emails"] == 2_000 and _scalar(pg, "SELECT count(*) FROM incoming_emails") == 2_000
    assert _scalar(pg, "SELECT max(id) FROM incoming_emails") == 2_000
    assert mongo_db.clients.count_documents({}) == 200
    assert info["creditor_elements"] == 2_000
    assert all(n > 0 for n in info["planted"].values()), info["planted"]
    assert info["emails_name_only"] > 0 and info["pairs_with_several_emails"] > 0
    assert set(info["match_levels"]) == {"1", "2", "3"}
    # every email lies in [window_end - 48h, window_end), created at or after it was received
    start, end = WINDOW_END - timedelta(hours=48), WINDOW_END
    with pg.connect() as conn:
        lo_c, hi_c, lo_r, hi_r, bad = conn.execute(sa.text(
            "SELECT min(created_at), max(created_at), min(received_at), max(received_at), "
            "count(*) FILTER (WHERE created_at < received_at) FROM incoming_emails"
        )).one()
        statuses = dict(conn.execute(sa.text("SELECT sync_status, count(*) FROM incoming_emails GROUP BY 1")).all())
        number_amounts = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE json_typeof(extracted_data->'debt_amount') = 'number'), "
            "count(*) FILTER (WHERE json_typeof(extracted_data->'debt_amount') = 'string') FROM incoming_emails"
        )).one()
        outbox = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE processed_at IS NULL), count(*) FILTER (WHERE processed_at IS NOT NULL) "
            "FROM outbox_messages"
        )).one()
        expired = conn.execute(sa.text("SELECT count(*) FILTER (WHERE expires_at < now()), count(*) FROM idempotency_keys")).one()
    assert start <= lo_c and hi_c < end and start <= lo_r and hi_r < end and bad == 0
    assert statuses["pending"] >= info["outbox_deliverable"] and statuses["synced"] > 1_800
    assert number_amounts[0] > number_amounts[1] > 0
    assert tuple(outbox) == (info["outbox_pending"], info["outbox_processed_old"])
    assert tuple(expired) == (10, 20)
    doc = mongo_db.clients.find_one({"aktenzeichen": "100000"})
    assert {"aktenzeichen", "firstName", "lastName", "final_creditor_list"} <= set(doc)
    assert len(doc["final_creditor_list"]) == 10
    answered = [e for e in doc["final_creditor_list"] if e.get("amount_source") == "creditor_response"]
    assert all(isinstance(e["creditor_response_amount"], (float, type(None), str)) for e in answered)
    assert len({e["sender_email"] for e in doc["final_creditor_list"]}) == 10


def test_the_job_finds_exactly_the_planted_drift(pg, mongo_db, generated, reconcile):
    """The graph itself (the asset's ops in their order), not a copy of the step order: outbox, extract,
    compare, repair, cleanup counted in the report row and the audit table; a second run repairs nothing."""
    info = generated
    assert reconcile(PARTITION, max_repairs=10_000, outbox_batch_size=200).success
    [report] = report_rows(pg)
    assert (report["status"], report["window_start"], report["window_end"]) == ("completed", info["window_start"], info["window_end"])
    assert report["outbox_succeeded"] == info["outbox_deliverable"]
    assert report["outbox_dead"] == info["outbox_poison"]
    assert report["outbox_failed"] == info["outbox_poison"] + info["outbox_undeliverable"]
    assert report["records_checked"] == info["expected_records_checked"]
    ctx = RunContext(report["id"], report["run_id"], None, report["window_start"], report["window_end"], False)
    assert int(extract_step.extract_postgres(pg, ctx, log=LOG)["in_window"].sum()) == info["emails_regular"]  # after the outbox
    findings = findings_of(pg, report["id"])
    assert Counter(f["kind"] for f in findings) == {k: n for k, n in info["planted"].items() if n}
    assert report["auto_repaired"] == info["expected_repairs"]
    # every repairable finding was repaired; the rest only reported
    assert Counter(f["action"] for f in findings if f["kind"] in datagen.REPAIRABLE) == {"repaired": info["expected_repairs"]}
    assert {f["action"] for f in findings if f["kind"] not in datagen.REPAIRABLE} == {"reported"}
    assert (report["expired_keys_deleted"], report["old_outbox_deleted"]) == (info["keys_expired"], info["outbox_processed_old"])

    # a second run finds only what is never repaired automatically, and writes nothing
    assert reconcile(PARTITION, max_repairs=10_000).success
    second = report_rows(pg)[-1]
    left = findings_of(pg, second["id"])
    assert Counter(f["kind"] for f in left) == {k: n for k, n in info["planted"].items() if n and k not in datagen.REPAIRABLE}
    assert second["auto_repaired"] == 0 and {f["action"] for f in left} == {"reported"}


def findings_of(engine, report_id):
    """The report's findings in the audit table (outbox deliveries are writes, not findings)."""
    return [r for r in finding_rows(engine, report_id) if r["kind"] != "outbox_delivery"]


@pytest.mark.parametrize(
    ("batch_size", "full_scan_ratio", "shards"),
    [(1, 2.0, 1), (7, 2.0, 1), (7, 0.0, 1), (13, 0.0, 1), (50, 2.0, 3), (3, 2.0, 2)],
    ids=["keys-1", "keys-7", "scan-7", "scan-13", "3-shards", "2-shards-3"],
)
def test_findings_do_not_depend_on_batches_scan_or_shards(pg, mongo_db, generated, batch_size, full_scan_ratio, shards):
    """Same findings and pairs whether documents come by `$in` or one sorted pass, in any batch size and shard count."""
    info = generated
    ctx = RunContext(0, "batching-test", None, info["window_start"], info["window_end"], True)
    emails = extract_step.extract_postgres(pg, ctx, log=LOG)
    options = diff_step.diff_options(ctx, tolerance_cents=0, repair_low_confidence=False)

    def keyed(result):
        f = result.findings[["kind", "email_id", "client_id", "pos", "repairable"]].astype(object)
        return sorted((tuple(None if pd.isna(v) else v for v in row) for row in f.itertuples(index=False)), key=repr)

    reference = diff_step.compare(mongo_db.clients, emails, ctx, options=options, batch_size=10_000, log=LOG, shards=1, full_scan_ratio=2.0)
    other = diff_step.compare(
        mongo_db.clients, emails, ctx, options=options, batch_size=batch_size, log=LOG, shards=shards, full_scan_ratio=full_scan_ratio
    )
    assert reference.records_checked > 0 and len(reference.findings) > 0
    assert other.records_checked == reference.records_checked
    assert keyed(other) == keyed(reference)
