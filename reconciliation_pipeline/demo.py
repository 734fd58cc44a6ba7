"""`python -m reconciliation_pipeline.demo`: seed realistic drift, run the latest partition, print the report.

Needs RECON_POSTGRES_URL, RECON_MONGO_URI, RECON_MONGO_DB and DAGSTER_HOME (see `devservices env`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
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


def seed(engine: sa.Engine, mongo_db: Any, window_end: datetime) -> dict[str, int]:
    """Replace the demo data: consistent clients plus one case of every kind of drift."""
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
            zendesk_ticket_id="ZD-20001", from_email="forderung@vodafone.de", from_name="Vodafone GmbH",
            extracted_data={"client_aktenzeichen": "542909", "client_name": "Koch, Emma", "creditor_name": "Vodafone GmbH", "debt_amount": 321.0},
            received_at=t, created_at=t, sync_status="failed", sync_error="timeout",
        ).returning(incoming_emails.c.id)).scalar_one()
        outbox = [
            dict(aggregate_type="incoming_email", aggregate_id=str(pending_id), payload={
                "client_aktenzeichen": "542909", "client_name": "Koch, Emma", "creditor_email": "forderung@vodafone.de",
                "creditor_name": "Vodafone GmbH", "new_debt_amount": 321.0, "response_text": "Restforderung", "reference_numbers": ["V-1"]}),
            dict(aggregate_type="creditor_debt_update", aggregate_id="542908", payload={
                "client_aktenzeichen": "542908", "creditor_email": "mahnwesen@telekom.de"}),                       # poison: no amount
            dict(aggregate_type="creditor_debt_update", aggregate_id="777777", retry_count=4, payload={
                "client_aktenzeichen": "777777", "creditor_email": "a@b.de", "debt_amount": 12.5}),                # fails, goes dead
            dict(aggregate_type="creditor_debt_update", aggregate_id="542907", retry_count=5, error_message="client not found",
                 payload={"client_aktenzeichen": "542907", "creditor_email": "x@y.de", "debt_amount": 1}),          # already dead
            dict(aggregate_type="creditor_debt_update", aggregate_id="542900", processed_at=t - timedelta(days=40),
                 created_at=t - timedelta(days=40), payload={"client_aktenzeichen": "542900", "debt_amount": 1}),  # old, processed
        ]
        for n, row in enumerate(outbox):
            conn.execute(outbox_messages.insert().values(operation="UPDATE", idempotency_key=f"demo-{n}-{uuid.uuid4()}", **row))
        now = datetime.now(timezone.utc)
        conn.execute(idempotency_keys.insert(), [
            {"key": f"expired-{k}", "created_at": now - timedelta(days=2), "expires_at": now - timedelta(days=1)} for k in range(25)
        ] + [{"key": f"live-{k}", "created_at": now, "expires_at": now + timedelta(days=1)} for k in range(5)])
    return {"clients": len(docs), "emails": len(emails) + 1, "outbox": len(outbox)}


def run_partition(partition_key: str, extra_args: list[str] | None = None) -> int:
    """Run reconciliation_job for one partition through the dagster CLI."""
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "reconciliation_pipeline.definitions",
           "-j", "reconciliation_job", "--tags", json.dumps({"dagster/partition": partition_key}), *(extra_args or [])]
    print("$ " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd).returncode


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
            "mongo_amount_cents_before, mongo_amount_cents_after, action FROM reconciliation_findings "
            "WHERE report_id = :r ORDER BY id"), {"r": report["id"]}).all()
        print(f"\n  {'kind':22} {'email':>5} {'outbox':>6} {'aktenzeichen':12} {'creditor':34} {'pg':>9} {'before':>9} {'after':>9} action")
        for r in rows:
            print(f"  {r[0]:22} {r[1] or '':>5} {r[2] or '':>6} {r[3] or '':12} {(r[4] or '')[:34]:34} "
                  f"{r[5] if r[5] is not None else '':>9} {r[6] if r[6] is not None else '':>9} {r[7] if r[7] is not None else '':>9} {r[8]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciliation_pipeline.demo", description=__doc__)
    parser.add_argument("--partition", help="partition key to run (default: the latest complete hour)")
    parser.add_argument("--no-run", action="store_true", help="only seed the data")
    args = parser.parse_args(argv)
    partition = args.partition or latest_partition_key()
    window_end = hourly_partitions.time_window_for_partition_key(partition).end.astimezone(timezone.utc)
    create_app_tables()
    upgrade()
    engine = _engine()
    mongo = MongoClient(os.environ["RECON_MONGO_URI"], tz_aware=True)
    counts = seed(engine, mongo[os.environ["RECON_MONGO_DB"]], window_end)
    print(f"seeded {counts} for partition {partition}", file=sys.stderr)
    if args.no_run:
        return 0
    code = run_partition(partition)
    print_report(engine, partition)
    print(f"\nOpen the UI with `make ui` and look at asset reconciliation_report, partition {partition}.")
    return code


if __name__ == "__main__":
    sys.exit(main())
