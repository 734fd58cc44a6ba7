"""`python -m reconciliation_pipeline.demo`: a day of drift, reconciled hour by hour, then the latest report.

Seeds every kind of drift, then replays the last 24 hourly partitions: before each hour's run some
creditor amounts in MongoDB drift (a varying number per hour), one outbox message goes dead in one
hour, and one hour's run trips the repair budget. Each hour is a real run of reconciliation_job in
the DAGSTER_HOME instance (so the asset's plots show the day), its Dagster log goes to a file, the
console gets one line per partition, the latest hour's report and the UI's URL.

Needs RECON_POSTGRES_URL, RECON_MONGO_URI, RECON_MONGO_DB and DAGSTER_HOME (see `devservices env`).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pymongo import MongoClient

from reconciliation_pipeline.db import create_app_tables, upgrade
from reconciliation_pipeline.partitions import hourly_partitions
from reconciliation_pipeline.schema import idempotency_keys, incoming_emails, outbox_messages

CREDITORS = [
    ("Sparkasse Bochum", "forderungen@sparkasse-bochum.de"),
    ("Volksbank Rhein-Ruhr", "inkasso@volksbank-rhein-ruhr.de"),
    ("Telekom Deutschland GmbH", "mahnwesen@telekom.de"),
    ("Vodafone GmbH", "forderung@vodafone.de"),
    ("Stadtwerke Essen", "kundenservice@stadtwerke-essen.de"),
    ("Otto GmbH & Co KG", "inkasso@otto.de"),
]
CLIENTS = [
    ("542900", "Max", "Mustermann"), ("542901", "Erika", "Musterfrau"), ("542902", "Jürgen", "Müller"),
    ("542903", "Anna", "Schmidt"), ("542904", "Lukas", "Weber"), ("542905", "Sophie", "Wagner"),
    ("542906", "Leon", "Becker"), ("542907", "Mia", "Hoffmann"), ("542908", "Paul", "Schäfer"),
    ("542909", "Emma", "Koch"),
]


def latest_partition_key() -> str:
    """The newest complete hourly partition."""
    return hourly_partitions.get_last_partition_key()


def _engine() -> sa.Engine:
    return sa.create_engine(os.environ["RECON_POSTGRES_URL"])


def seed(engine: sa.Engine, mongo_db: Any, window_end: datetime, dead_outbox: bool = True) -> dict[str, int]:
    """Replace the demo data: consistent clients plus one case of every kind of drift (dead outbox messages optional)."""
    t = window_end - timedelta(hours=3)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE incoming_emails, outbox_messages, idempotency_keys RESTART IDENTITY"))
    mongo_db.clients.delete_many({})

    docs, emails = [], []
    for i, (az, first, last) in enumerate(CLIENTS):
        creditors = []
        for j, (name, email) in enumerate(CREDITORS[: 3 + i % 3]):
            amount = round(500 + 137.45 * (i + 1) * (j + 1), 2)
            creditors.append({
                "sender_name": name, "sender_email": email, "claim_amount": amount + 100,
                "current_debt_amount": amount, "creditor_response_amount": amount,
                "amount_source": "creditor_response", "response_received_at": t, "contact_status": "responded",
                "last_contacted_at": t, "creditor_response_text": "Forderungsaufstellung anbei",
                "response_reference_numbers": [f"AZ-{az}-{j}"],
            })
            emails.append({"from_email": email, "az": az, "name": f"{last}, {first}", "creditor": name, "amount": amount, "at": t})
        docs.append({"aktenzeichen": az, "firstName": first, "lastName": last, "final_creditor_list": creditors})

    # Drift, one case of each kind
    docs[0]["final_creditor_list"][0]["creditor_response_amount"] = 999.99                    # data_mismatch
    docs[0]["final_creditor_list"][0]["current_debt_amount"] = 999.99
    del docs[1]["final_creditor_list"][1]["creditor_response_amount"]                          # missing_in_mongo
    emails[2]["amount"] = "1.234,56"                                                            # German notation, and a mismatch
    emails.append({"from_email": "x@unknown.de", "az": "999999", "name": "Nobody, No", "creditor": "X", "amount": 10, "at": t})  # client_not_found
    emails.append({"from_email": "post@fremdbank.de", "az": "542903", "name": "", "creditor": "Fremdbank AG", "amount": 10, "at": t})  # creditor_not_found
    emails.append({"from_email": "kundenservice@stadtwerke-essen.de", "az": "542902", "name": "", "creditor": "Stadtwerke Essen", "amount": "1.234", "at": t})  # invalid_pg_amount
    docs[5]["final_creditor_list"][0]["creditor_response_amount"] = "zwölf Euro"              # invalid_mongo_amount
    docs[6]["final_creditor_list"].append({"sender_name": "Inkasso Nord", "sender_email": "nord@inkasso.de", "claim_amount": 80.0,
                                           "creditor_response_amount": 75.0, "amount_source": "creditor_response",
                                           "response_received_at": t, "contact_status": "responded"})  # extra_in_mongo
    docs.append({"aktenzeichen": "542999", "firstName": "Mia", "lastName": "Hoffmann", "final_creditor_list": []})
    emails.append({"from_email": "mahnwesen@telekom.de", "az": None, "name": "Hoffmann, Mia", "creditor": "Telekom", "amount": 50, "at": t})  # ambiguous_client
    docs[8]["final_creditor_list"].append(dict(docs[8]["final_creditor_list"][0]))               # ambiguous_creditor
    mongo_db.clients.insert_many(docs)

    with engine.begin() as conn:
        for n, e in enumerate(emails, start=1):
            conn.execute(incoming_emails.insert().values(
                zendesk_ticket_id=f"ZD-{10000 + n}", from_email=e["from_email"], from_name=e["creditor"],
                subject="Ihre Anfrage", processing_status="completed", match_status="matched",
                extracted_data={"is_creditor_reply": True, "client_name": e["name"], "client_aktenzeichen": e["az"],
                                "creditor_name": e["creditor"], "debt_amount": e["amount"], "confidence": 0.9},
                received_at=e["at"], created_at=e["at"], sync_status="synced",
            ))
        # An email whose MongoDB write failed: the outbox holds it (delivered on the run)
        pending_id = conn.execute(incoming_emails.insert().values(
            zendesk_ticket_id="ZD-20001", from_email="mahnwesen@telekom.de", from_name="Telekom Deutschland GmbH",
            extracted_data={"client_aktenzeichen": "542909", "client_name": "Koch, Emma", "creditor_name": "Telekom Deutschland GmbH", "debt_amount": 321.0},
            received_at=t, created_at=t, sync_status="failed", sync_error="timeout",
        ).returning(incoming_emails.c.id)).scalar_one()
        outbox = [
            dict(aggregate_type="incoming_email", aggregate_id=str(pending_id), payload={
                "client_aktenzeichen": "542909", "client_name": "Koch, Emma", "creditor_email": "mahnwesen@telekom.de",
                "creditor_name": "Telekom Deutschland GmbH", "new_debt_amount": 321.0, "response_text": "Restforderung", "reference_numbers": ["V-1"]}),
            dict(aggregate_type="creditor_debt_update", aggregate_id="542908", payload={
                "client_aktenzeichen": "542908", "creditor_email": "mahnwesen@telekom.de"}),                       # poison: no amount
            dict(aggregate_type="creditor_debt_update", aggregate_id="777777", retry_count=4, payload={
                "client_aktenzeichen": "777777", "creditor_email": "a@b.de", "debt_amount": 12.5}),                # fails, goes dead
            dict(aggregate_type="creditor_debt_update", aggregate_id="542907", retry_count=5, error_message="client not found",
                 payload={"client_aktenzeichen": "542907", "creditor_email": "x@y.de", "debt_amount": 1}),          # already dead
            dict(aggregate_type="creditor_debt_update", aggregate_id="542900", processed_at=t - timedelta(days=40),
                 created_at=t - timedelta(days=40), payload={"client_aktenzeichen": "542900", "debt_amount": 1}),  # old, processed
        ]
        if not dead_outbox:  # only the pending delivery and the old processed row
            outbox = [outbox[0], outbox[-1]]
        for n, row in enumerate(outbox):
            conn.execute(outbox_messages.insert().values(operation="UPDATE", idempotency_key=f"demo-{n}-{uuid.uuid4()}", **row))
        now = datetime.now(timezone.utc)
        conn.execute(idempotency_keys.insert(), [
            {"key": f"expired-{k}", "created_at": now - timedelta(days=2), "expires_at": now - timedelta(days=1)} for k in range(25)
        ] + [{"key": f"live-{k}", "created_at": now, "expires_at": now + timedelta(days=1)} for k in range(5)])
    return {"clients": len(docs), "emails": len(emails) + 1, "outbox": len(outbox)}


def print_report(engine: sa.Engine, partition_key: str) -> None:
    """Print the newest report row of the partition and its findings."""
    with engine.connect() as conn:
        report = conn.execute(sa.text(
            "SELECT * FROM reconciliation_reports WHERE partition_key = :p ORDER BY id DESC LIMIT 1"), {"p": partition_key}
        ).mappings().first()
        if report is None:
            print("no report row found")
            return
        print(f"\nReconciliation report {report['id']} for partition {partition_key}: status={report['status']}")
        for k in ("window_start", "window_end", "mongo_available", "dry_run", "repairs_halted", "records_checked",
                  "mismatches_found", "auto_repaired", "failed_repairs", "outbox_retried", "outbox_succeeded",
                  "outbox_failed", "outbox_deferred", "outbox_dead", "expired_keys_deleted", "old_outbox_deleted",
                  "error_message"):
            print(f"  {k:22} {report[k]}")
        rows = conn.execute(sa.text(
            "SELECT kind, email_id, outbox_message_id, client_aktenzeichen, creditor_email, pg_amount_cents, "
            "mongo_amount_cents_before, mongo_amount_cents_after, action FROM reconciliation_findings_current "
            "WHERE report_id = :r ORDER BY id"), {"r": report["id"]}).all()
        print(f"\n  {'kind':22} {'email':>5} {'outbox':>6} {'aktenzeichen':12} {'creditor':34} {'pg':>9} {'before':>9} {'after':>9} action")
        for r in rows:
            print(f"  {r[0]:22} {r[1] or '':>5} {r[2] or '':>6} {r[3] or '':12} {(r[4] or '')[:34]:34} "
                  f"{r[5] if r[5] is not None else '':>9} {r[6] if r[6] is not None else '':>9} {r[7] if r[7] is not None else '':>9} {r[8]}")


# ------------------------------------------------------------------------------------------ a day of history

HOURS = 24
# MongoDB amounts that drift before each hour's run (oldest hour first): the plots' shape.
DRIFT_PER_HOUR = [1, 2, 0, 3, 1, 4, 2, 0, 1, 3, 2, 5, 1, 0, 2, 3, 1, 6, 2, 1, 0, 3, 2, 1]
DEAD_OUTBOX_HOUR = 9  # before this hour's run an outbox message with one retry left fails for good
BUDGET_HOUR = 17  # this hour's run has max_repairs below its drift: nothing repaired, the check is red
BUDGET_MAX_REPAIRS = 3
DRIFT_CLIENTS = (3, 4, 7)  # indexes into CLIENTS whose creditors the seed leaves consistent (and no outbox message)
ASSET_PATH = "reconciliation_report"
UI_URL = os.environ.get("RECON_UI_BASE_URL", "http://127.0.0.1:3000").rstrip("/")


@dataclass
class HourResult:
    """One replayed hour: its run and the counts of its report row."""

    partition: str
    run_id: str
    success: bool
    report: dict[str, Any]


def history_partitions(last: str | None = None, hours: int = HOURS) -> list[str]:
    """The `hours` hourly partitions ending with `last` (default: the latest complete hour)."""
    keys = hourly_partitions.get_partition_keys()
    end = keys.index(last) + 1 if last else len(keys)
    return keys[max(0, end - hours):end]


def _drift_pairs() -> list[tuple[str, str]]:
    return [(CLIENTS[i][0], email) for i in DRIFT_CLIENTS for _, email in CREDITORS[: 3 + i % 3]]


def drift_mongo(mongo_db: Any, hour: int, count: int) -> list[tuple[str, str]]:
    """Change `count` creditor amounts in MongoDB (a bad write elsewhere); PostgreSQL still has the right ones."""
    pool = _drift_pairs()
    start = sum(DRIFT_PER_HOUR[:hour]) if hour < len(DRIFT_PER_HOUR) else hour
    pairs = [pool[(start + k) % len(pool)] for k in range(count)]
    for k, (az, email) in enumerate(pairs):
        doc = mongo_db.clients.find_one({"aktenzeichen": az})
        for c in doc["final_creditor_list"]:
            if c.get("sender_email") == email:
                wrong = round(float(c["creditor_response_amount"]) + 11.11 * (hour + 1) + k, 2)
                c["creditor_response_amount"] = c["current_debt_amount"] = wrong
        mongo_db.clients.update_one({"_id": doc["_id"]}, {"$set": {"final_creditor_list": doc["final_creditor_list"]}})
    return pairs


def add_dying_outbox_message(engine: sa.Engine) -> None:
    """An outbox message for an aktenzeichen MongoDB does not have, on its last retry: it goes dead."""
    with engine.begin() as conn:
        conn.execute(outbox_messages.insert().values(
            aggregate_type="creditor_debt_update", aggregate_id="777777", operation="UPDATE", retry_count=4,
            idempotency_key=f"demo-dying-{uuid.uuid4()}",
            payload={"client_aktenzeichen": "777777", "creditor_email": "a@b.de", "debt_amount": 12.5}))


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so subprocesses too) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as f, open(path, "a", encoding="utf-8") as text:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with redirect_stdout(text), redirect_stderr(text):  # also when sys.stdout is not fd 1 (pytest)
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def report_for_run(engine: sa.Engine, run_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM reconciliation_reports WHERE run_id = :r"), {"r": run_id}).mappings().first()
    return dict(row) if row else {}


def run_in_process(instance: Any, partition: str, settings: dict[str, Any] | None, log_path: Path) -> tuple[str, bool]:
    """One real run of reconciliation_job for the partition in `instance` (shown in its UI); Dagster's log to log_path."""
    from reconciliation_pipeline.definitions import defs

    job = defs.resolve_job_def("reconciliation_job")
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    if settings:
        run_config["resources"] = {"settings": {"config": settings}}
    with output_to(log_path):
        print(f"==== partition {partition} ====", flush=True)
        result = job.execute_in_process(instance=instance, partition_key=partition, run_config=run_config,
                                        raise_on_error=False, tags={"reconciliation/demo": "history"})
    return result.run_id, result.success


def progress_line(n: int, total: int, hour: HourResult) -> str:
    r = hour.report
    flags = [f for f, on in (("REPAIR BUDGET TRIPPED", r.get("repairs_halted")), ("run FAILED", not hour.success)) if on]
    return (f"[{n:2}/{total}] {hour.partition}  checked={r.get('records_checked')} findings={r.get('mismatches_found')} "
            f"repaired={r.get('auto_repaired')} outbox_dead={r.get('outbox_dead')}  {' '.join(flags)}").rstrip()


def replay_history(engine: sa.Engine, mongo_db: Any, instance: Any, partitions: list[str], log_path: Path,
                   out: Any = None) -> list[HourResult]:
    """Seed every kind of drift, then for each partition: drift MongoDB a little, run the hour, print a line."""
    out = out or sys.stdout
    first_end = hourly_partitions.time_window_for_partition_key(partitions[0]).end.astimezone(timezone.utc)
    seed(engine, mongo_db, first_end, dead_outbox=False)
    results = []
    for i, partition in enumerate(partitions):
        drift_mongo(mongo_db, i, DRIFT_PER_HOUR[i % len(DRIFT_PER_HOUR)])
        if i == DEAD_OUTBOX_HOUR:
            add_dying_outbox_message(engine)
        settings = {"max_repairs": BUDGET_MAX_REPAIRS} if i == BUDGET_HOUR else None
        run_id, success = run_in_process(instance, partition, settings, log_path)
        hour = HourResult(partition, run_id, success, report_for_run(engine, run_id))
        results.append(hour)
        print(progress_line(i + 1, len(partitions), hour), file=out, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciliation_pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partition", help="the last hour to replay (default: the latest complete hour)")
    parser.add_argument("--hours", type=int, default=HOURS, help=f"hours of history to replay (default {HOURS})")
    parser.add_argument("--no-run", action="store_true", help="only seed the data (every kind of drift) for --partition")
    parser.add_argument("--log", help="file for the runs' Dagster log (default: $DAGSTER_HOME/demo-runs.log)")
    args = parser.parse_args(argv)
    create_app_tables()
    upgrade()
    engine = _engine()
    mongo = MongoClient(os.environ["RECON_MONGO_URI"], tz_aware=True)
    mongo_db = mongo[os.environ["RECON_MONGO_DB"]]
    if args.no_run:
        partition = args.partition or latest_partition_key()
        window_end = hourly_partitions.time_window_for_partition_key(partition).end.astimezone(timezone.utc)
        print(f"seeded {seed(engine, mongo_db, window_end)} for partition {partition}")
        return 0

    import dagster as dg

    partitions = history_partitions(args.partition, args.hours)
    log_path = Path(args.log or os.path.join(os.environ["DAGSTER_HOME"], "demo-runs.log"))
    print(f"Replaying {len(partitions)} hours ({partitions[0]} .. {partitions[-1]}, Europe/Berlin); "
          f"the runs' Dagster log goes to {log_path}", flush=True)
    with dg.DagsterInstance.get() as instance:
        results = replay_history(engine, mongo_db, instance, partitions, log_path)
    latest = results[-1]
    print_report(engine, latest.partition)
    print(f"\nDagster UI (start it with `make ui`): {UI_URL}/assets/{ASSET_PATH}"
          f"\n  plots: {UI_URL}/assets/{ASSET_PATH}?view=plots   latest run: {UI_URL}/runs/{latest.run_id}")
    return 0 if all(h.success for h in results) else 1


if __name__ == "__main__":
    sys.exit(main())
