"""What the tests read back: rows of the pipeline's tables, MongoDB documents, the Dagster instance's records."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from reconciliation_pipeline_tests.support.processes import ASSET, JOB

APP_NAME = "reconciliation_pipeline"  # application_name of the pipeline's PostgreSQL connections
# Every table a test may fill: the application's and the pipeline's (emptied between tests and examples).
DATA_TABLES = ("incoming_emails, outbox_messages, idempotency_keys, reconciliation_findings, "
               "reconciliation_audit_checkpoints, reconciliation_reports")


def partition_end_utc(partition_key: str) -> datetime:
    """Where the hourly Europe/Berlin partition ends, in UTC."""
    from reconciliation_pipeline.partitions import hourly_partitions

    return hourly_partitions.time_window_for_partition_key(partition_key).end.astimezone(timezone.utc)


def pipeline_backends(engine: sa.Engine) -> list[dict]:
    """pg_stat_activity rows of the pipeline's connections in this engine's database."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT pid, state, wait_event_type, wait_event, query FROM pg_stat_activity "
            "WHERE application_name = :app AND datname = current_database() AND pid <> pg_backend_pid()"
        ), {"app": APP_NAME}).mappings()]


def terminate_pipeline_backends(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return len(conn.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :app "
            "AND datname = current_database() AND pid <> pg_backend_pid()"
        ), {"app": APP_NAME}).all())


def snapshot(db: Any) -> dict[str, dict]:
    """Every client document by _id (as str): compare MongoDB before and after a run."""
    return {str(d["_id"]): d for d in db.clients.find({})}


def changed_documents(before: Mapping[str, dict], after: Mapping[str, dict]) -> set[str]:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def element(db: Any, az: str, pos: int = 0) -> dict:
    return db.clients.find_one({"aktenzeichen": az})["final_creditor_list"][pos]


def rows(engine: sa.Engine, sql: str, **params: Any) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


def outbox(engine: sa.Engine) -> dict[int, dict]:
    return {r["id"]: r for r in rows(engine, "SELECT * FROM outbox_messages ORDER BY id")}


def reset_data(engine: sa.Engine, db: Any) -> None:
    """Empty the application's and the pipeline's tables and the clients collection (between examples)."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    db.clients.delete_many({})


class NullLog:
    """A logger that swallows everything (steps functions outside Dagster)."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def mongo_snapshot(db: Any) -> list[dict]:
    """Every client document (sorted), to compare MongoDB before and after a run."""
    return list(db.clients.find({}, sort=[("aktenzeichen", 1)]))


def amounts(db: Any) -> dict[tuple[str, str], Any]:
    """(aktenzeichen, sender_email) -> creditor_response_amount (absent: the string '<absent>')."""
    out = {}
    for doc in db.clients.find({}):
        for element in doc.get("final_creditor_list", []):
            out[(doc["aktenzeichen"], element["sender_email"])] = element.get("creditor_response_amount", "<absent>")
    return out


def report_rows(engine: sa.Engine, partitions: Sequence[str] | None = None) -> list[dict]:
    """Report rows (of these partitions), oldest first."""
    if partitions is None:
        return rows(engine, "SELECT * FROM reconciliation_reports ORDER BY id")
    return rows(engine, "SELECT * FROM reconciliation_reports WHERE partition_key = ANY(:p) ORDER BY id", p=list(partitions))


def finding_rows(engine: sa.Engine, report_id: int | None = None) -> list[dict]:
    """The audit table as it stands (each finding with its latest outcome), of one report or all, oldest first."""
    if report_id is None:
        return rows(engine, "SELECT * FROM reconciliation_findings_current ORDER BY id")
    return rows(engine, "SELECT * FROM reconciliation_findings_current WHERE report_id = :r ORDER BY id", r=report_id)


# --------------------------------------------------------------------------------------- instance


def job_runs(instance: Any) -> list[Any]:
    import dagster as dg

    return list(instance.get_runs(filters=dg.RunsFilter(job_name=JOB)))


def materializations(instance: Any, partitions: Sequence[str]) -> list[Any]:
    """Materialization event records of the report asset for these partitions (newest first)."""
    import dagster as dg

    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(ASSET), asset_partitions=list(partitions)), limit=1000
    )
    return list(result.records)


def check_evaluations(instance: Any, run_id: str) -> dict[str, Any]:
    """check name -> AssetCheckEvaluation recorded by the run."""
    import dagster as dg

    records = instance.get_records_for_run(run_id=run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    out = {}
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        out[evaluation.check_name] = evaluation
    return out


def run_debug(instance: Any, run_ids: Sequence[str] | None = None, max_chars: int = 20_000) -> str:
    """Status of the job's runs plus the error events of the failed ones (for failure messages)."""
    import dagster as dg

    lines = []
    for run in job_runs(instance):
        if run_ids is not None and run.run_id not in run_ids:
            continue
        lines.append(f"run {run.run_id} partition={run.tags.get('dagster/partition')} status={run.status.value}")
        if run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            for entry in instance.all_logs(run.run_id):
                ev = entry.dagster_event
                if entry.level >= 40 or (ev is not None and ev.is_failure):
                    lines.append(f"    {entry.user_message[:2000]}")
                    if ev is not None and getattr(ev.event_specific_data, "error", None) is not None:
                        lines.append("    " + ev.event_specific_data.error.to_string()[:4000])
    return "\n".join(lines)[-max_chars:]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def minutes_before(end: datetime, minutes: int) -> datetime:
    return end - timedelta(minutes=minutes)
