"""Fault injection against real PostgreSQL and the MongoDB wire server.

1. MongoDB cut mid-run: a cuttable proxy (support.mongo_proxy.MongoCutProxy) between the pipeline and the
   wire server cuts every connection at the outbox write, the repair write, their read-backs, or the
   outbox's first read. Nothing may be marked delivered or repaired without a verified write, the run
   must finish honestly, and the next run through the direct URI converges.
2. The pipeline's PostgreSQL connection terminated (pg_terminate_backend) while the run waits on a
   lock: the run fails cleanly, its report ends `failed` with the error, the next run converges.
3. SIGKILL at every named crash point (faults.POINTS) of `dagster job execute`: the process dies with
   -9, the re-run converges (each outbox message applied once, with the same result), and the stale
   `running` report is closed as `failed` (by the next run, or by the sensor).
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from reconciliation_pipeline import faults
from reconciliation_pipeline.resources import MongoResource, PostgresResource
from reconciliation_pipeline.run.audit_rows import IN_FLIGHT
from reconciliation_pipeline.store.postgres import MONGO_WRITER_LOCK
from reconciliation_pipeline_tests.builders import (
    PARTITION, WINDOW_END, add_client, add_email, add_key, add_outbox, creditor, reply,
)
from reconciliation_pipeline_tests.support import (
    BLACKHOLE, DOWN, DROP, FORWARD_THEN_CUT, UP, CliProcess, CutRule, MongoCutProxy, cli_env, element,
    execute_args, finding_rows, mongo_port, outbox, pipeline_backends, postgres_home, report_rows, rows, run_cli,
    scratch_database, snapshot, sqlite_home, terminate_pipeline_backends, wait_until, write_config,
)

SPARKASSE = "forderungen@sparkasse-bochum.de"
TELEKOM = "mahnwesen@telekom.de"
VODAFONE = "forderung@vodafone.de"
EXPECTED = {("542900", SPARKASSE): 1234.56, ("542900", TELEKOM): 250.0, ("542901", VODAFONE): 77.7}
OUTBOX_CENTS = 7770


# ------------------------------------------------------------------------------------------ data


def seed(pg: sa.Engine, mongo_db: Any) -> dict[str, int]:
    """Repairable drift (a data_mismatch and a missing_in_mongo), one pending outbox message for an
    email whose MongoDB write failed, and expired/unexpired idempotency keys."""
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 999.99), creditor(TELEKOM, name="Telekom Deutschland GmbH")])
    add_client(mongo_db, "542901", [creditor(VODAFONE, 10.0, name="Vodafone GmbH")], first="Erika", last="Musterfrau")
    mismatch = add_email(pg, from_email=SPARKASSE, extracted=reply(amount="1.234,56"))
    missing = add_email(pg, from_email=TELEKOM, extracted=reply(amount=250.0, creditor_name="Telekom Deutschland GmbH"),
                        received_at=WINDOW_END - timedelta(hours=1))
    unsynced = add_email(pg, from_email=VODAFONE, sync_status="failed", extracted=reply(
        az="542901", name="Musterfrau, Erika", amount=77.7, creditor_name="Vodafone GmbH"))
    message = add_outbox(pg, {"client_aktenzeichen": "542901", "client_name": "Musterfrau, Erika", "creditor_email": VODAFONE,
                              "creditor_name": "Vodafone GmbH", "new_debt_amount": 77.7, "response_text": "Restforderung",
                              "reference_numbers": ["V-1"]},
                         aggregate_type="incoming_email", aggregate_id=str(unsynced),
                         created_at=datetime.now(timezone.utc) - timedelta(minutes=5))
    now = datetime.now(timezone.utc)
    for i in range(3):
        add_key(pg, f"expired-{i}", now - timedelta(days=1 + i))
    add_key(pg, "still-valid", now + timedelta(days=1))
    return {"mismatch": mismatch, "missing": missing, "unsynced": unsynced, "message": message}


def amounts(mongo_db: Any) -> dict[tuple[str, str], Any]:
    return {(d["aktenzeichen"], e["sender_email"]): e.get("creditor_response_amount")
            for d in mongo_db.clients.find({}) for e in d["final_creditor_list"]}


def keys_left(pg: sa.Engine) -> list[str]:
    return [r["key"] for r in rows(pg, "SELECT key FROM idempotency_keys ORDER BY key")]


def assert_converged(pg: sa.Engine, mongo_db: Any, ids: dict[str, int]) -> None:
    """MongoDB equals PostgreSQL's expectations; the outbox message is delivered; the email synced."""
    assert amounts(mongo_db) == EXPECTED
    for doc in mongo_db.clients.find({}):
        for el in doc["final_creditor_list"]:
            assert el["claim_amount"] == 1500.0, el  # never overwritten
            assert el["current_debt_amount"] == el["creditor_response_amount"], el
            assert el["amount_source"] == "creditor_response" and el["contact_status"] == "responded", el
    message = outbox(pg)[ids["message"]]
    assert message["processed_at"] is not None and message["error_message"] is None, message
    [email] = rows(pg, "SELECT sync_status, sync_error FROM incoming_emails WHERE id = :i", i=ids["unsynced"])
    assert email == {"sync_status": "synced", "sync_error": None}
    vodafone = element(mongo_db, "542901")
    assert vodafone["creditor_response_text"] == "Restforderung" and vodafone["response_reference_numbers"] == ["V-1"]


def assert_nothing_unverified(pg: sa.Engine, mongo_db: Any) -> None:
    """Every delivered message and every `repaired` audit row is backed by what MongoDB holds now."""
    current = {(d["aktenzeichen"], e["sender_email"]): e.get("creditor_response_amount")
               for d in mongo_db.clients.find({}) for e in d["final_creditor_list"]}
    audit = finding_rows(pg)
    for message in outbox(pg).values():
        if message["processed_at"] is None:
            continue
        delivered = [a for a in audit if a["outbox_message_id"] == message["id"] and a["action"] == "repaired"]
        assert delivered, f"outbox message {message['id']} marked processed without a verified write: {audit}"
        assert delivered[-1]["mongo_amount_cents_after"] == OUTBOX_CENTS
        assert current[("542901", VODAFONE)] == 77.7
    for row in audit:
        if row["action"] == "repaired":
            value = current[(row["client_aktenzeichen"], row["creditor_email"])]
            assert value is not None and round(Decimal(str(value)) * 100) == row["mongo_amount_cents_after"], row


def direct_mongo(service_env: dict[str, str], mongo_db: Any) -> MongoResource:
    return MongoResource(uri=service_env["RECON_MONGO_URI"], database=mongo_db.name, server_selection_timeout_ms=3000)


# ============================================================================ 1. MongoDB cut mid-run

# name -> (rule, after the cut, where the cut lands)
CUTS = {
    "outbox_write_answer_lost": (CutRule("update", 1, FORWARD_THEN_CUT), DOWN, "outbox"),
    "outbox_write_never_arrives": (CutRule("update", 1, DROP), DOWN, "outbox"),
    "outbox_write_answer_never_comes": (CutRule("update", 1, BLACKHOLE), DOWN, "outbox"),
    "outbox_read_back_lost": (CutRule("find", 1, DROP, after=("update", 1)), DOWN, "outbox"),
    "outbox_write_answer_lost_then_back": (CutRule("update", 1, FORWARD_THEN_CUT), UP, "outbox"),
    "repair_write_answer_lost": (CutRule("update", 2, FORWARD_THEN_CUT), DOWN, "repair"),
    "repair_write_never_arrives": (CutRule("update", 2, DROP), DOWN, "repair"),
    "repair_read_back_lost": (CutRule("find", 1, DROP, after=("update", 2)), DOWN, "repair"),
    # MongoDB answers the availability ping, then dies before the outbox's first read
    "outbox_first_read": (CutRule("find", 1, DROP), DOWN, "outbox_read"),
}


@pytest.mark.parametrize("case", list(CUTS))
def test_mongo_cut_mid_run_marks_nothing_unverified_and_the_next_run_converges(case, pg, mongo_db, resources, reconcile, service_env):
    rule, after_cut, where = CUTS[case]
    ids = seed(pg, mongo_db)
    with MongoCutProxy(mongo_port(service_env["RECON_MONGO_URI"]), rule, after_cut=after_cut, max_lifetime=240) as proxy:
        resources["mongo"] = MongoResource(uri=proxy.uri, database=mongo_db.name, server_selection_timeout_ms=1500,
                                           socket_timeout_ms=3000)
        started = time.monotonic()
        result = reconcile(raise_on_error=False)
        took = time.monotonic() - started
    assert proxy.cut_at, f"the cut never happened; commands seen: {proxy.commands}"
    assert took < 120, f"the run took {took:.0f}s after the cut"

    # nothing delivered or repaired without a verified write
    assert_nothing_unverified(pg, mongo_db)
    message = outbox(pg)[ids["message"]]
    if where in ("outbox", "outbox_read"):
        assert message["processed_at"] is None, f"{proxy.cut_at}: message marked delivered without a verified write"
        assert message["retry_count"] == 0, "a lost connection is not the message's fault: no retry consumed"
        [email] = rows(pg, "SELECT sync_status FROM incoming_emails WHERE id = :i", i=ids["unsynced"])
        assert email["sync_status"] == "failed"
    else:
        assert message["processed_at"] is not None  # delivered (and verified) before the repair's cut
        unverified = [a for a in finding_rows(pg) if a["kind"] in ("data_mismatch", "missing_in_mongo")]
        assert unverified and all(a["action"] != "repaired" for a in unverified), unverified
        assert all(a["error"] for a in unverified), unverified

    # the run ends honestly: RULES.md 6 - MongoDB unreachable does not fail the run; outbox and cleanup still run
    [report] = report_rows(pg)
    failure = [step_error(e) for e in result.all_events if e.is_step_failure]
    assert report["status"] == "completed", (
        f"{proxy.cut_at}: report {report['status']} ({report['error_message']}); step failures: {failure}")
    assert result.success, failure
    assert keys_left(pg) == ["still-valid"], "cleanup ran"
    if after_cut == DOWN and where != "repair":
        assert report["mongo_available"] is False or report["outbox_deferred"] >= 1

    # the next run, straight to the wire server, converges
    first = element(mongo_db, "542901")
    resources["mongo"] = direct_mongo(service_env, mongo_db)
    assert reconcile().success
    assert_converged(pg, mongo_db, ids)
    if mode_applied_write(rule) and where == "outbox":
        # the write had gone through: redelivering it does not change the result
        assert element(mongo_db, "542901") == first
    deliveries = [a for a in finding_rows(pg) if a["outbox_message_id"] == ids["message"] and a["action"] == "repaired"]
    assert len(deliveries) == 1, deliveries
    assert report_rows(pg)[-1]["status"] == "completed"


def step_error(event: Any) -> str:
    """The op, the exception and the product frames of a step failure (short)."""
    error = event.event_specific_data.error
    cause = error.cause or error
    frames = [line.strip() for line in cause.stack if "reconciliation_pipeline/" in line]
    return f"{event.step_key}: {cause.cls_name}: {cause.message.strip()[:300]} | " + " | ".join(frames[-4:])


def mode_applied_write(rule: CutRule) -> bool:
    return rule.command == "update" and rule.mode in (FORWARD_THEN_CUT, BLACKHOLE)


# ============================================================== 2. PostgreSQL connection terminated


def _run_in_thread(reconcile, **kwargs: Any) -> tuple[threading.Thread, dict]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = reconcile(raise_on_error=False, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, name="reconcile", daemon=True)
    thread.start()
    return thread, box


def _step_events(instance: dg.DagsterInstance, op: str) -> set[str]:
    kinds: set[str] = set()
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            if entry.dagster_event is not None and entry.step_key and entry.step_key.endswith(f".{op}"):
                kinds.add(entry.dagster_event.event_type_value)
    return kinds


def _running(instance: dg.DagsterInstance, op: str) -> bool:
    kinds = _step_events(instance, op)
    return "STEP_START" in kinds and not kinds & {"STEP_SUCCESS", "STEP_FAILURE"}


def _lock_waiters(pg: sa.Engine) -> list[dict]:
    return [b for b in pipeline_backends(pg) if b["wait_event_type"] == "Lock"]


def _advisory_waiter(pg: sa.Engine, instance: dg.DagsterInstance, op: str) -> list[dict]:
    # the writer polls pg_try_advisory_lock once a second on one connection that stays open in between
    if not _running(instance, op):
        return []
    time.sleep(1.5)
    return pipeline_backends(pg) if _running(instance, op) else []


PG_KILLS = {
    # the outbox claim waits for a table lock the test holds (the op has no retry policy)
    "outbox_claim": dict(block="incoming_emails", op="retry_outbox", expect_success=False, settings={}),
    # the first MongoDB writer (the outbox step) waits for the writer advisory lock the test holds
    "writer_lock_wait": dict(block="advisory", op="retry_outbox", expect_success=False,
                             settings={"repair_lock_wait_seconds": 90}),
    # the repair wrote MongoDB and waits to record the outcome in its audit rows (the test locks the table
    # when the repair's update command, the run's second, reaches MongoDB through a proxy)
    "repair_audit_insert": dict(block="findings_at_repair_write", op="repair_mongo", expect_success=False, settings={}),
    # the PostgreSQL extract (dry run: the outbox step does not read incoming_emails) is retried by its policy
    "extract_read": dict(block="incoming_emails", op="extract_postgres", expect_success=True, settings={"dry_run": True}),
}


@pytest.mark.parametrize("case", list(PG_KILLS))
def test_postgres_connection_terminated_mid_run(case, pg, mongo_db, resources, service_env, reconcile):
    spec = PG_KILLS[case]
    ids = seed(pg, mongo_db)
    before = snapshot(mongo_db)
    instance = reconcile.instance
    blocker = pg.connect()
    thread = None
    proxy = None
    direct_mongo = resources["mongo"]
    try:
        if spec["block"] == "incoming_emails":
            blocker.execute(sa.text("LOCK TABLE incoming_emails IN ACCESS EXCLUSIVE MODE"))
            thread, box = _run_in_thread(reconcile, **spec["settings"])
            waiting = lambda: _lock_waiters(pg)  # noqa: E731
        elif spec["block"] == "advisory":
            blocker.execute(sa.select(sa.func.pg_advisory_lock(MONGO_WRITER_LOCK)))
            blocker.commit()
            thread, box = _run_in_thread(reconcile, **spec["settings"])
            waiting = lambda: _advisory_waiter(pg, instance, spec["op"])  # noqa: E731
        else:
            def lock_findings_at_the_repair_write(command: str, count: int) -> None:
                if command == "update" and count == 2:  # the outbox delivery sent the first
                    blocker.execute(sa.text("LOCK TABLE reconciliation_findings IN EXCLUSIVE MODE"))

            proxy = MongoCutProxy(mongo_port(service_env["RECON_MONGO_URI"]), on_command=lock_findings_at_the_repair_write,
                                  max_lifetime=240).__enter__()
            resources["mongo"] = MongoResource(uri=proxy.uri, database=mongo_db.name, server_selection_timeout_ms=3000)
            thread, box = _run_in_thread(reconcile, **spec["settings"])
            waiting = lambda: _lock_waiters(pg)  # noqa: E731
        waiters = wait_until(waiting, timeout=90, what=f"the run to wait on {spec['block']}",
                             on_timeout=lambda: str(pipeline_backends(pg)))
        assert _running(instance, spec["op"]), f"{spec['op']} is not the step that waits: {waiters}"
        assert terminate_pipeline_backends(pg) >= 1, waiters
    finally:
        if spec["block"] == "advisory":
            blocker.execute(sa.select(sa.func.pg_advisory_unlock(MONGO_WRITER_LOCK)))
            blocker.commit()
        else:
            blocker.rollback()
        blocker.close()
        if thread is not None:
            thread.join(timeout=180)
        if proxy is not None:
            proxy.__exit__(None, None, None)
        resources["mongo"] = direct_mongo
    assert not thread.is_alive(), "the run did not finish within 180s after its connection was terminated"
    assert "error" not in box, box.get("error")
    result = box["result"]
    [report] = report_rows(pg)
    if spec["expect_success"]:
        assert result.success and report["status"] == "completed", report
        retried = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        assert [e.step_key.split(".")[-1] for e in retried] == [spec["op"]]
    else:
        assert not result.success
        failed_steps = [e.step_key.split(".")[-1] for e in result.all_events if e.is_step_failure]
        assert failed_steps == [spec["op"]], failed_steps
        assert report["status"] == "failed" and report["completed_at"] is not None, report
        assert spec["op"] in report["error_message"], report["error_message"]
        assert "terminat" in report["error_message"].lower(), report["error_message"]
        if spec["op"] == "retry_outbox":
            assert snapshot(mongo_db) == before
    assert_nothing_unverified(pg, mongo_db)

    # the next run converges
    assert reconcile().success
    assert_converged(pg, mongo_db, ids)
    assert report_rows(pg)[-1]["status"] == "completed"


# ======================================================================== 3. SIGKILL at named points


def _in_process(tmp_path: Path) -> Path:
    return write_config(tmp_path / "run_config.yaml")


def _kill_and_rerun_env(pg_url: str, service_env: dict[str, str], mongo_db: Any, home: Path, fault: str | None,
                        dagster_pg: str | None = None) -> dict[str, str]:
    return cli_env(pg_url=pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db.name, dagster_home=home,
                   fault=fault, dagster_postgres_url=dagster_pg)


def _state_at_kill(point: str, pg: sa.Engine, mongo_db: Any, ids: dict[str, int]) -> None:
    """What a kill at `point` leaves behind (checked before the re-run)."""
    message = outbox(pg)[ids["message"]]
    current = amounts(mongo_db)
    if point == "after_report_created":
        assert current[("542901", VODAFONE)] == 10.0 and current[("542900", SPARKASSE)] == 999.99
        assert message["processed_at"] is None
    elif point == "after_outbox_mongo_write":
        # the write reached MongoDB; the transaction that would mark it delivered died with the process
        assert current[("542901", VODAFONE)] == 77.7
        assert message["processed_at"] is None and message["retry_count"] == 0
        assert current[("542900", SPARKASSE)] == 999.99
    elif point == "after_repair_mongo_write":
        assert message["processed_at"] is not None
        assert current == EXPECTED
    elif point == "mid_cleanup":
        # cleanup depends only on the outbox step, so the repair may or may not have run before it
        assert message["processed_at"] is not None
        assert keys_left(pg) == ["still-valid"]  # the first batch was committed before the kill


@pytest.mark.parametrize("point", faults.POINTS)
def test_sigkill_at_each_named_point_then_rerun_converges(point, pg, pg_url, mongo_db, service_env, tmp_path):
    ids = seed(pg, mongo_db)
    home = sqlite_home(tmp_path / "dagster_home")
    killed = run_cli(execute_args(PARTITION, _in_process(tmp_path)), _kill_and_rerun_env(pg_url, service_env, mongo_db, home, point),
                     tmp_path / "logs", timeout=240, name="killed")
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    [stale] = report_rows(pg)
    assert stale["status"] == "running"
    _state_at_kill(point, pg, mongo_db, ids)
    after_kill = element(mongo_db, "542901")

    rerun = run_cli(execute_args(PARTITION, _in_process(tmp_path)), _kill_and_rerun_env(pg_url, service_env, mongo_db, home, None),
                    tmp_path / "logs", timeout=240, name="rerun")
    assert rerun.returncode == 0, rerun.describe()
    assert_converged(pg, mongo_db, ids)
    reports = report_rows(pg)
    assert [r["status"] for r in reports] == ["failed", "completed"], reports
    assert reports[0]["run_id"] == stale["run_id"] and reports[0]["completed_at"] is not None
    assert "killed" in reports[0]["error_message"] or "gone" in reports[0]["error_message"], reports[0]["error_message"]

    # each outbox message applied with one result; a redelivery changed nothing
    deliveries = [a for a in finding_rows(pg) if a["outbox_message_id"] == ids["message"] and a["action"] == "repaired"]
    assert deliveries and all(d["mongo_amount_cents_after"] == OUTBOX_CENTS for d in deliveries), deliveries
    if point != "after_report_created":
        assert element(mongo_db, "542901") == after_kill
    if point == "after_outbox_mongo_write":
        # the killed run's write, read back by the re-run, then delivered again in its order: it found it applied
        killed_write, redelivery = deliveries
        assert killed_write["report_id"] == stale["id"] and "read back by a later run: applied" in killed_write["error"], deliveries
        assert redelivery["mongo_amount_cents_before"] == OUTBOX_CENTS, deliveries
    else:
        assert len(deliveries) == 1, deliveries
    # no write is left "not verified": the re-run read back what the killed run sent
    audit = finding_rows(pg)
    assert not [a for a in audit if a["error"] == IN_FLIGHT], audit
    if point == "after_repair_mongo_write":
        killed_repairs = [a for a in audit if a["report_id"] == stale["id"] and a["kind"] != "outbox_delivery" and a["pg_amount_cents"]]
        assert killed_repairs and all(a["action"] == "repaired" and a["mongo_amount_cents_after"] == a["pg_amount_cents"]
                                      for a in killed_repairs if a["kind"] in ("data_mismatch", "missing_in_mongo")), killed_repairs
    # a repair is never done twice: every finding of the window is repaired at most once
    repaired = [a["email_id"] for a in finding_rows(pg) if a["action"] == "repaired" and a["kind"] != "outbox_delivery"]
    assert len(repaired) == len(set(repaired)), repaired

    # the killed Dagster run is marked failed too
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(stale["run_id"]).status == dg.DagsterRunStatus.FAILURE


def test_sensor_closes_the_report_of_a_killed_run(pg, pg_url, mongo_db, service_env, tmp_path):
    from reconciliation_pipeline.sensors import close_stale_reports_sensor

    ids = seed(pg, mongo_db)
    home = sqlite_home(tmp_path / "dagster_home")
    killed = run_cli(execute_args(PARTITION, _in_process(tmp_path)),
                     _kill_and_rerun_env(pg_url, service_env, mongo_db, home, "after_repair_mongo_write"),
                     tmp_path / "logs", timeout=240, name="killed")
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        context = dg.build_sensor_context(instance=instance, resources={"postgres": PostgresResource(url=pg_url)})
        skip = close_stale_reports_sensor(context)
        assert "closed 1" in str(getattr(skip, "skip_message", skip)), skip
        [report] = report_rows(pg)
        assert report["status"] == "failed" and "killed" in report["error_message"], report
        assert instance.get_run_by_id(report["run_id"]).status == dg.DagsterRunStatus.FAILURE
        again = close_stale_reports_sensor(dg.build_sensor_context(instance=instance, resources={"postgres": PostgresResource(url=pg_url)}))
        assert "no stale" in str(getattr(again, "skip_message", again))
    rerun = run_cli(execute_args(PARTITION, _in_process(tmp_path)), _kill_and_rerun_env(pg_url, service_env, mongo_db, home, None),
                    tmp_path / "logs", timeout=240, name="rerun")
    assert rerun.returncode == 0, rerun.describe()
    assert_converged(pg, mongo_db, ids)


def test_a_repair_write_of_a_killed_run_is_in_the_audit_table(pg, pg_url, mongo_db, service_env, tmp_path):
    """RULES.md 4: every write is recorded in the audit table with before and after. A run killed right
    after its MongoDB repair write must not leave a write nobody recorded: the audit row goes in before the
    write (target amount, before), marked not verified until the read-back confirms it."""
    ids = seed(pg, mongo_db)
    home = sqlite_home(tmp_path / "dagster_home")
    killed = run_cli(execute_args(PARTITION, _in_process(tmp_path)),
                     _kill_and_rerun_env(pg_url, service_env, mongo_db, home, "after_repair_mongo_write"),
                     tmp_path / "logs", timeout=240, name="killed")
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    rerun = run_cli(execute_args(PARTITION, _in_process(tmp_path)), _kill_and_rerun_env(pg_url, service_env, mongo_db, home, None),
                    tmp_path / "logs", timeout=240, name="rerun")
    assert rerun.returncode == 0, rerun.describe()
    assert amounts(mongo_db) == EXPECTED
    audit = finding_rows(pg)
    for email_id, cents in ((ids["mismatch"], 123456), (ids["missing"], 25000)):
        recorded = [
            a for a in audit
            if a["email_id"] == email_id and a["pg_amount_cents"] == cents and a["mongo_amount_cents_before"] is not None
            or a["email_id"] == email_id and a["kind"] == "missing_in_mongo" and a["pg_amount_cents"] == cents
        ]
        recorded = [a for a in recorded if a["mongo_amount_cents_after"] == cents
                    or (a["action"] == "repair_failed" and "not verified" in (a["error"] or ""))]
        assert recorded, (
            f"MongoDB holds the repair of email {email_id} ({cents} cents) written by the killed run, but no audit row "
            f"records that write: {[(a['email_id'], a['kind'], a['action']) for a in audit]}")


def test_killed_run_does_not_block_later_runs_with_the_shipped_dagster_yaml(pg, pg_url, mongo_db, service_env, tmp_path):
    """With the repo's dagster.yaml (PostgreSQL storage, pool `reconciliation_mongo_writer` limited to one
    slot) a run SIGKILLed inside a pool-limited op must not hold the slot forever: the next run must finish."""
    ids = seed(pg, mongo_db)
    with scratch_database(pg_url) as dagster_pg:
        home = postgres_home(tmp_path / "dagster_home")
        killed = run_cli(execute_args(PARTITION, _in_process(tmp_path)),
                         _kill_and_rerun_env(pg_url, service_env, mongo_db, home, "after_repair_mongo_write", dagster_pg),
                         tmp_path / "logs", timeout=240, name="killed")
        assert killed.returncode == -signal.SIGKILL, killed.describe()
        rerun = CliProcess(execute_args(PARTITION, _in_process(tmp_path)), _kill_and_rerun_env(pg_url, service_env, mongo_db, home, None, dagster_pg),
                           tmp_path / "logs", name="rerun")
        try:
            deadline = time.monotonic() + 120
            while rerun.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(1)
            result = rerun.result()
            blocked = "blocked by limit for pool" in result.stderr
            assert rerun.proc.poll() is not None, (
                "the re-run did not finish within 120s"
                + (": its step is 'blocked by limit for pool reconciliation_mongo_writer' - the killed run still holds the "
                   "only slot (nothing frees the concurrency slots of a run that was closed as failed)" if blocked else "")
                + f"\n{result.describe(3000)}")
            assert result.returncode == 0, result.describe()
        finally:
            rerun.kill()
    reports = report_rows(pg)
    assert reports[0]["status"] == "failed"
    assert_converged(pg, mongo_db, ids)


def test_documented_cli_command_runs_in_one_process_and_a_kill_still_converges(pg, pg_url, mongo_db, service_env, tmp_path):
    """The README's `dagster job execute ... --tags '{"dagster/partition": ...}'` (no run config). The job
    declares the in-process executor as its default; a SIGKILL at a crash point must kill the run's process.
    Convergence and the stale report are checked first, whichever executor ran."""
    ids = seed(pg, mongo_db)
    home = sqlite_home(tmp_path / "dagster_home")
    killed = run_cli(execute_args(PARTITION), _kill_and_rerun_env(pg_url, service_env, mongo_db, home, "after_repair_mongo_write"),
                     tmp_path / "logs", timeout=240, name="killed")
    assert killed.returncode != 0, killed.describe()
    rerun = run_cli(execute_args(PARTITION), _kill_and_rerun_env(pg_url, service_env, mongo_db, home, None),
                    tmp_path / "logs", timeout=240, name="rerun")
    assert rerun.returncode == 0, rerun.describe()
    assert_converged(pg, mongo_db, ids)
    reports = report_rows(pg)
    assert [r["status"] for r in reports] == ["failed", "completed"], reports
    multiprocess = "multiprocess executor" in killed.stderr
    assert killed.returncode == -signal.SIGKILL and not multiprocess, (
        f"exit {killed.returncode}: `dagster job execute` without -c ran the "
        f"{'multiprocess' if multiprocess else 'unknown'} executor, not the job's in-process one; "
        f"the crash killed only a step's child process")
