"""Concurrency: two reconciliations of one partition at once, and the application writing mid-repair.

* Two `dagster job execute` processes for the same partition with repairable drift: every finding is
  repaired exactly once overall (audit table), the other run waited or skipped with a clear log line,
  MongoDB ends correct. Once with the PostgreSQL advisory lock alone (sqlite instance: no Dagster pool
  limits; the test holds the lock until both runs wait for it), once with the repo's dagster.yaml
  (PostgreSQL storage, the one-slot `reconciliation_mongo_writer` pool).
* The job's tags and the instance's run-queue limit for `reconciliation/mongo-writer`.
* The application writes a creditor between the pipeline's read and its write, inside the real bulk
  path (a proxy hook applies the write just before the pipeline's `update` command reaches the server):
  the application's value survives, the finding is skipped_concurrent_change, the next run converges.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from pymongo import MongoClient

from reconciliation_pipeline.jobs import reconciliation_job
from reconciliation_pipeline.ops import MONGO_WRITER_POOL
from reconciliation_pipeline.resources import MongoResource
from reconciliation_pipeline_tests.builders import (
    PARTITION, WINDOW_END, add_client, add_email, add_outbox, creditor, reply,
)
from reconciliation_pipeline_tests.support import (
    REPO, CliProcess, MongoCutProxy, cli_env, execute_args, finding_rows, mongo_port, outbox, postgres_home,
    report_rows, run_cli, scratch_database, sqlite_home, wait_until, write_config,
)

SPARKASSE = "forderungen@sparkasse-bochum.de"
TELEKOM = "mahnwesen@telekom.de"
VODAFONE = "forderung@vodafone.de"
EXPECTED = {("542900", SPARKASSE): 1234.56, ("542900", TELEKOM): 250.0, ("542901", VODAFONE): 99.0}


def amounts(mongo_db: Any) -> dict[tuple[str, str], Any]:
    return {(d["aktenzeichen"], e["sender_email"]): e.get("creditor_response_amount")
            for d in mongo_db.clients.find({}) for e in d["final_creditor_list"]}


def seed_drift(pg: sa.Engine, mongo_db: Any) -> list[int]:
    """Three repairable findings on two client documents; returns their email ids."""
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 999.99), creditor(TELEKOM, name="Telekom Deutschland GmbH")])
    add_client(mongo_db, "542901", [creditor(VODAFONE, 10.0, name="Vodafone GmbH")], first="Erika", last="Musterfrau")
    return [
        add_email(pg, from_email=SPARKASSE, extracted=reply(amount="1.234,56")),
        add_email(pg, from_email=TELEKOM, extracted=reply(amount=250.0, creditor_name="Telekom Deutschland GmbH")),
        add_email(pg, from_email=VODAFONE, extracted=reply(az="542901", name="Musterfrau, Erika", amount=99,
                                                           creditor_name="Vodafone GmbH")),
    ]


def assert_each_finding_repaired_once(pg: sa.Engine, email_ids: list[int]) -> dict[int, list[dict]]:
    by_email: dict[int, list[dict]] = {}
    for row in finding_rows(pg):
        by_email.setdefault(row["email_id"], []).append(row)
    for email_id in email_ids:
        actions = [(r["report_id"], r["action"]) for r in by_email.get(email_id, [])]
        assert [a for _, a in actions].count("repaired") == 1, f"email {email_id}: {actions}"
        others = [a for _, a in actions if a != "repaired"]
        assert set(others) <= {"skipped_concurrent_change"}, f"email {email_id}: {actions}"
    return by_email


def _steps(instance: dg.DagsterInstance, run_id: str, op: str) -> list[tuple[str, float]]:
    out = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and entry.step_key and entry.step_key.endswith(f".{op}"):
            out.append((event.event_type_value, entry.timestamp))
    return out


def _interval(instance: dg.DagsterInstance, run_id: str, op: str) -> tuple[float, float] | None:
    events = _steps(instance, run_id, op)
    starts = [t for kind, t in events if kind == "STEP_START"]
    ends = [t for kind, t in events if kind in ("STEP_SUCCESS", "STEP_FAILURE")]
    return (min(starts), max(ends)) if starts and ends else None


def _run_ids(instance: dg.DagsterInstance) -> list[str]:
    return [r.run_id for r in instance.get_runs(filters=dg.RunsFilter(job_name="reconciliation_job"))]


def _all_succeed(processes: list[CliProcess], timeout: float = 240) -> list:
    """Wait for the CLI runs (killing any left), each must exit 0; their results."""
    try:
        results = [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for result in results:
        assert result.returncode == 0, result.describe()
    return results


class HoldFirstRepairRead:
    """Proxy hook: holds the first repair re-read of the client documents (the run then holds the
    writer lock and the pool slot) until `gate` is set."""

    def __init__(self) -> None:
        self.reached, self.gate = threading.Event(), threading.Event()

    def __call__(self, name: str, command: dict | None) -> None:
        # the repair's re-read by _id (the compare step's reads by _id project the names too)
        repair_read = command and "_id" in command.get("filter", {}) and "firstName" not in command.get("projection", {})
        if name == "find" and repair_read and not self.reached.is_set():
            self.reached.set()
            self.gate.wait(timeout=150)


# ================================================================== two runs at once (advisory lock)


def test_two_cli_runs_at_once_repair_each_finding_once_under_the_advisory_lock(pg, pg_url, mongo_db, service_env, tmp_path):
    """sqlite instance (no Dagster pool limits): only the PostgreSQL advisory lock keeps the runs apart.
    Both runs reach their repair with the same drift: the proxy holds the first run's re-read of the
    documents (it holds the writer lock then) until the other run's repair step has started too."""
    email_ids = seed_drift(pg, mongo_db)
    home = sqlite_home(tmp_path / "dagster_home")
    with dg.DagsterInstance.from_config(str(home)):
        pass  # create the sqlite storage first: two processes creating it at once race on its alembic stamp
    hold = HoldFirstRepairRead()
    reached, gate = hold.reached, hold.gate

    processes: list[CliProcess] = []
    with MongoCutProxy(mongo_port(service_env["RECON_MONGO_URI"]), on_request=hold, max_lifetime=400) as proxy:
        env = cli_env(pg_url=pg_url, mongo_uri=proxy.uri, mongo_db=mongo_db.name, dagster_home=home)
        config = write_config(tmp_path / "run_config.yaml", repair_lock_wait_seconds=180)
        try:
            processes = [CliProcess(execute_args(PARTITION, config), env, tmp_path / "logs", name=f"run{i}") for i in (1, 2)]

            def both_in_repair() -> bool:
                if not reached.is_set():
                    return False
                with dg.DagsterInstance.from_config(str(home)) as instance:
                    started = [r for r in _run_ids(instance)
                               if any(k == "STEP_START" for k, _ in _steps(instance, r, "repair_mongo"))]
                return len(started) == 2

            wait_until(both_in_repair, timeout=200, interval=1, what="both runs to reach their repair",
                       on_timeout=lambda: "\n".join(p.result().describe(1500) for p in processes))
            time.sleep(3)  # the second run polls for the writer lock
        finally:
            gate.set()
        results = _all_succeed(processes)

    assert amounts(mongo_db) == EXPECTED
    reports = report_rows(pg)
    assert [r["status"] for r in reports] == ["completed", "completed"], reports
    by_email = assert_each_finding_repaired_once(pg, email_ids)
    winners = {r["report_id"] for rows in by_email.values() for r in rows if r["action"] == "repaired"}
    assert len(winners) == 1, "the repairs were split between the runs although both saw the same drift"
    [loser] = [r for r in reports if r["id"] not in winners]
    skipped = [r for rows in by_email.values() for r in rows if r["report_id"] == loser["id"]]
    assert len(skipped) == len(email_ids) and all(r["action"] == "skipped_concurrent_change" and r["error"] for r in skipped), skipped
    assert loser["auto_repaired"] == 0
    loser_log = next(r for r in results if loser["run_id"] in r.stderr).stderr
    assert "skipped_concurrent_change" in loser_log, "the run that did not repair says nothing about it in its log"


# ================================================================== two runs at once (shipped dagster.yaml)


def test_second_cli_run_waits_for_the_pool_slot_with_the_shipped_dagster_yaml(pg, pg_url, mongo_db, service_env, tmp_path, monkeypatch):
    """PostgreSQL instance with the repo's dagster.yaml: while the first run repairs (held inside its
    repair step), a second run's MongoDB-writing steps wait for the one slot of the
    `reconciliation_mongo_writer` pool and start only after the first run's repair ended.

    The second run is started once the first holds the slot: two claims in the same instant can both
    win in Dagster 1.13 on PostgreSQL (the slot is claimed in autocommit statements, see
    dagster-io/dagster#34092's review), which is why the advisory lock, tested above, is the guarantee
    and the pool an addition."""
    email_ids = seed_drift(pg, mongo_db)
    with scratch_database(pg_url) as dagster_pg:
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_pg)  # the test reads the same instance
        home = postgres_home(tmp_path / "dagster_home")
        hold = HoldFirstRepairRead()
        processes: list[CliProcess] = []
        with MongoCutProxy(mongo_port(service_env["RECON_MONGO_URI"]), on_request=hold, max_lifetime=400) as proxy, \
                dg.DagsterInstance.from_config(str(home)) as instance:
            env = cli_env(pg_url=pg_url, mongo_uri=proxy.uri, mongo_db=mongo_db.name,
                          dagster_home=home, dagster_postgres_url=dagster_pg)
            config = write_config(tmp_path / "run_config.yaml", repair_lock_wait_seconds=180)
            # the deployment step of the README: two first runs at once would otherwise both create the pool's slots
            pool = run_cli(["instance", "concurrency", "set", MONGO_WRITER_POOL, "1"], env, tmp_path / "logs", name="pool")
            assert pool.returncode == 0, pool.describe()

            def waiting_steps() -> list[str]:
                info = instance.event_log_storage.get_concurrency_info(MONGO_WRITER_POOL)
                return [p.step_key for p in info.pending_steps if p.assigned_timestamp is None]

            try:
                processes.append(CliProcess(execute_args(PARTITION, config), env, tmp_path / "logs", name="run1"))
                wait_until(hold.reached.is_set, timeout=120, interval=0.5, what="the first run's repair",
                           on_timeout=lambda: processes[0].result().describe(1500))
                processes.append(CliProcess(execute_args(PARTITION, config), env, tmp_path / "logs", name="run2"))
                waiting = wait_until(waiting_steps, timeout=120, interval=0.5, what="the second run to wait for the pool slot",
                                     on_timeout=lambda: processes[1].result().describe(1500))
                assert [k.split(".")[-1] for k in waiting] == ["retry_outbox"], waiting
                time.sleep(2)
            finally:
                hold.gate.set()
            _all_succeed(processes)
            first, second = sorted(_run_ids(instance), key=lambda r: instance.get_run_record_by_id(r).create_timestamp)
            intervals = [_interval(instance, run, op) for run in (first, second) for op in ("retry_outbox", "repair_mongo")]
            assert all(intervals), intervals
            for (_, end_a), (start_b, _) in zip(intervals, intervals[1:]):
                assert end_a <= start_b, f"two MongoDB-writing steps overlapped: {intervals}"
    assert amounts(mongo_db) == EXPECTED
    assert [r["status"] for r in report_rows(pg)] == ["completed", "completed"]
    assert_each_finding_repaired_once(pg, email_ids)


# ================================================================== configuration


def test_job_tags_and_the_run_queue_limit(pg_url, monkeypatch, tmp_path):
    tags = reconciliation_job.tags
    assert tags.get("dagster/max_runtime", "").isdigit() and int(tags["dagster/max_runtime"]) > 0, tags
    assert tags.get("reconciliation/mongo-writer") is not None, tags
    with scratch_database(pg_url) as dagster_pg:
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_pg)
        home = postgres_home(tmp_path / "dagster_home")
        assert (home / "dagster.yaml").read_bytes() == (REPO / "dagster.yaml").read_bytes()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            config = instance.get_concurrency_config()
            limits = config.run_queue_config.tag_concurrency_limits
            assert {"key": "reconciliation/mongo-writer", "limit": 1} in [dict(x) for x in limits], limits
            assert config.pool_config.default_pool_limit == 1
            assert instance.run_monitoring_enabled
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


# ================================================================== application write inside the bulk path


class ApplicationWriter:
    """What the application does when a creditor's reply arrives: a synced email in PostgreSQL and the
    answer on the creditor's element in MongoDB (run from the proxy, before the pipeline's update)."""

    def __init__(self, pg: sa.Engine, uri: str, db_name: str, az: str, sender: str, amount: float, name: str,
                 on_update: int = 1):
        self.pg, self.uri, self.db_name = pg, uri, db_name
        self.az, self.sender, self.amount, self.name = az, sender, amount, name
        self.on_update = on_update
        self.done = False
        self.error: BaseException | None = None

    def __call__(self, command: str, count: int) -> None:
        if command != "update" or count != self.on_update or self.done:
            return
        self.done = True
        try:
            received = WINDOW_END - timedelta(minutes=30)
            add_email(self.pg, from_email=self.sender, received_at=received,
                      extracted=reply(az=self.az, amount=self.amount, creditor_name=self.name))
            with MongoClient(self.uri, tz_aware=True, serverSelectionTimeoutMS=5000) as client:
                clients = client[self.db_name].clients
                doc = clients.find_one({"aktenzeichen": self.az})
                creditors = doc["final_creditor_list"]
                pos = next(i for i, e in enumerate(creditors) if e["sender_email"] == self.sender)
                creditors[pos].update(
                    creditor_response_amount=self.amount, current_debt_amount=self.amount, amount_source="creditor_response",
                    response_received_at=received, contact_status="responded", last_contacted_at=received,
                )
                # the whole list: the wire server does not apply `final_creditor_list.<n>.<field>` paths
                clients.update_one({"_id": doc["_id"]}, {"$set": {"final_creditor_list": creditors}})
                after = clients.find_one({"_id": doc["_id"]})["final_creditor_list"][pos]
                assert after["creditor_response_amount"] == self.amount, after
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc


@pytest.mark.parametrize("same_element", [True, False], ids=["same_creditor", "other_creditor_same_document"])
def test_application_write_between_read_and_bulk_write_wins(same_element, pg, mongo_db, resources, reconcile, service_env):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 1.0), creditor(TELEKOM, 2.0, name="Telekom Deutschland GmbH")])
    email_id = add_email(pg, from_email=SPARKASSE, extracted=reply(amount=100))
    app = (ApplicationWriter(pg, service_env["RECON_MONGO_URI"], mongo_db.name, "542900", SPARKASSE, 777.0, "Sparkasse Bochum")
           if same_element else
           ApplicationWriter(pg, service_env["RECON_MONGO_URI"], mongo_db.name, "542900", TELEKOM, 555.0, "Telekom Deutschland GmbH"))
    with MongoCutProxy(mongo_port(service_env["RECON_MONGO_URI"]), on_command=app, max_lifetime=240) as proxy:
        resources["mongo"] = MongoResource(uri=proxy.uri, database=mongo_db.name, server_selection_timeout_ms=3000)
        result = reconcile()
    assert app.done and app.error is None, (proxy.commands, app.error)
    assert result.success
    current = amounts(mongo_db)
    if same_element:
        assert current[("542900", SPARKASSE)] == 777.0, "the application's write was overwritten"
    else:
        assert current == {("542900", SPARKASSE): 1.0, ("542900", TELEKOM): 555.0}, current
    [finding] = [a for a in finding_rows(pg) if a["email_id"] == email_id]
    assert finding["action"] == "skipped_concurrent_change" and finding["error"], finding
    assert report_rows(pg)[0]["status"] == "completed"

    # checked again next run: the application's newer email is the expectation now; nothing is lost
    resources["mongo"] = MongoResource(uri=service_env["RECON_MONGO_URI"], database=mongo_db.name, server_selection_timeout_ms=3000)
    assert reconcile().success
    final = amounts(mongo_db)
    if same_element:
        assert final == {("542900", SPARKASSE): 777.0, ("542900", TELEKOM): 2.0}, final
    else:
        assert final == {("542900", SPARKASSE): 100.0, ("542900", TELEKOM): 555.0}, final


def test_application_write_during_outbox_delivery_wins(pg, mongo_db, resources, reconcile, service_env):
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 100.0)])
    message_id = add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": SPARKASSE, "creditor_name": "Sparkasse Bochum",
                                 "new_debt_amount": 321.5}, created_at=WINDOW_END - timedelta(hours=3))  # older than the app's write
    app = ApplicationWriter(pg, service_env["RECON_MONGO_URI"], mongo_db.name, "542900", SPARKASSE, 888.0, "Sparkasse Bochum")
    with MongoCutProxy(mongo_port(service_env["RECON_MONGO_URI"]), on_command=app, max_lifetime=240) as proxy:
        resources["mongo"] = MongoResource(uri=proxy.uri, database=mongo_db.name, server_selection_timeout_ms=3000)
        result = reconcile()
    assert app.done and app.error is None, (proxy.commands, app.error)
    assert result.success
    assert amounts(mongo_db)[("542900", SPARKASSE)] == 888.0, "the application's write was overwritten"
    message = outbox(pg)[message_id]
    assert message["processed_at"] is None and message["retry_count"] == 0, message
    [delivery] = [a for a in finding_rows(pg) if a["outbox_message_id"] == message_id]
    assert delivery["action"] == "skipped_concurrent_change", delivery
    assert report_rows(pg)[0]["outbox_deferred"] == 1

    resources["mongo"] = MongoResource(uri=service_env["RECON_MONGO_URI"], database=mongo_db.name, server_selection_timeout_ms=3000)
    assert reconcile().success
    # the newest synced email (the application's 888) is what MongoDB ends with
    assert amounts(mongo_db)[("542900", SPARKASSE)] == 888.0
    assert outbox(pg)[message_id]["processed_at"] is not None
