"""reconciliation_alert_sensor against real runs: materializations of reconciliation_report over real
PostgreSQL and the MongoDB wire server, in a persistent (temporary) Dagster instance, the sensor
evaluated with build_sensor_context, and its messages received by a local HTTP receiver and a local
SMTP server (aiosmtpd) on 127.0.0.1.

Each `tick` builds a fresh context from the stored cursor, as the daemon does after a restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from reconciliation_pipeline import alerts
from reconciliation_pipeline.assets import reconciliation_report
from reconciliation_pipeline.resources import MongoResource, PostgresResource, ReconciliationSettings
from reconciliation_pipeline.sensors import reconciliation_alert_sensor
from reconciliation_pipeline_tests.support.alerts import SMTP_PASSWORD, SmtpServer, WebhookReceiver, smtp_server, webhook_receiver
from reconciliation_pipeline_tests.builders import PARTITION, add_client, add_email, add_outbox, creditor, reply

SPARKASSE = "forderungen@sparkasse-bochum.de"
UI = "http://dagster.example.internal:3000"
CLIENT_NAMES = ("Mustermann", "Nobody", "Musterfrau")
ENV_VARS = (alerts.ENV_WEBHOOK_URL, alerts.ENV_SMTP_URL, alerts.ENV_EMAIL_TO, alerts.ENV_EMAIL_FROM,
            alerts.ENV_STALE_HOURS, alerts.ENV_UI_BASE_URL)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with smtp_server() as s:
        yield s


@pytest.fixture
def alert_env(monkeypatch: pytest.MonkeyPatch, receiver: WebhookReceiver, smtp: SmtpServer) -> dict[str, str]:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    env = {alerts.ENV_WEBHOOK_URL: receiver.url, alerts.ENV_SMTP_URL: smtp.url,
           alerts.ENV_EMAIL_TO: "ops@example.org, oncall@example.org", alerts.ENV_UI_BASE_URL: UI}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


class Sensor:
    """The alert sensor as the daemon runs it: a fresh context per tick, the cursor carried over."""

    def __init__(self, instance: dg.DagsterInstance, pg_url: str):
        self.instance, self.pg_url, self.cursor = instance, pg_url, None
        self.results: list[Any] = []

    def tick(self) -> Any:
        context = dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                          resources={"postgres": PostgresResource(url=self.pg_url)})
        result = reconciliation_alert_sensor(context)
        self.cursor = context.cursor
        self.results.append(result)
        return result


@pytest.fixture
def sensor(instance, pg_url) -> Sensor:
    return Sensor(instance, pg_url)


@pytest.fixture
def materialize(instance, pg, pg_url, mongo_db, service_env):
    """Materialize reconciliation_report for the partition into the test's instance (real services)."""

    def run(partition: str = PARTITION, postgres_url: str | None = None, **settings: Any) -> dg.ExecuteInJobResult:
        resources = {
            "postgres": PostgresResource(url=postgres_url or pg_url),
            "mongo": MongoResource(uri=service_env["RECON_MONGO_URI"], database=mongo_db.name, server_selection_timeout_ms=3000),
            "settings": ReconciliationSettings(repair_lock_wait_seconds=5, **settings),
        }
        return dg.materialize([reconciliation_report], partition_key=partition, resources=resources, instance=instance,
                              raise_on_error=False)

    return run


# ------------------------------------------------------------------------------------------ data


def seed_consistent_client(pg: sa.Engine, mongo_db: Any) -> None:
    add_client(mongo_db, "542900", [creditor(SPARKASSE, 100.0)])
    add_email(pg, from_email=SPARKASSE, extracted=reply(az="542900", amount=100.0))


def seed_unknown_client(pg: sa.Engine, az: str) -> int:
    """An email naming an aktenzeichen no document has: `client_not_found`, reported, stays open."""
    return add_email(pg, from_email=f"inkasso-{az}@example.de", extracted=reply(az=az, amount=10.0, name="Nobody, No"))


def seed_dead_outbox(pg: sa.Engine) -> int:
    return add_outbox(pg, {"client_aktenzeichen": "542900", "creditor_email": "x@y.de", "debt_amount": 1},
                      aggregate_id="542900", retry_count=5, error_message="client not found")


def assert_clean(text: str) -> None:
    """No client name and no credential in what an alert says."""
    for secret in (*CLIENT_NAMES, SMTP_PASSWORD, "s3cr3t-webhook-token"):
        assert secret not in text, f"{secret!r} in alert: {text}"


def mail_text(message) -> str:
    return message.get_payload(decode=True).decode() if not message.is_multipart() else message.as_string()


# ------------------------------------------------------------------------------------------ tests


def test_a_noop_until_configured(monkeypatch, sensor, materialize, pg, mongo_db, receiver):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    seed_unknown_client(pg, "999999")
    assert materialize().success
    result = sensor.tick()
    assert isinstance(result, dg.SkipReason) and "not configured" in result.skip_message
    assert sensor.cursor is None and receiver.bodies == []


def test_new_drift_is_sent_once_and_open_drift_at_the_start_is_not_news(alert_env, sensor, materialize, pg, mongo_db,
                                                                       receiver, smtp, instance):
    seed_consistent_client(pg, mongo_db)
    seed_unknown_client(pg, "999999")  # open before the sensor's first tick: the baseline
    assert materialize().success
    first = sensor.tick()
    assert "baseline taken: 1 open problems" in first.skip_message, first.skip_message
    assert receiver.bodies == [] and smtp.messages == []

    # the same problem again: not news
    assert materialize().success
    sensor.tick()
    assert receiver.bodies == [] and smtp.messages == []

    # a new one appears
    seed_unknown_client(pg, "888888")
    result = materialize()
    assert result.success
    sensor.tick()
    [body] = receiver.wait_for(1)
    assert body["event"] == "new_drift" and body["partition"] == PARTITION
    assert body["new_problems"] == 1 and body["kinds"] == {"client_not_found": 1}
    assert body["aktenzeichen"] == ["888888"]
    assert body["run_id"] == result.run_id and body["run_url"] == f"{UI}/runs/{result.run_id}"
    assert body["counts"]["mismatches_found"] == 2 and body["counts"]["unrepaired_findings"] == 2
    assert body["text"].startswith(f"[reconciliation] 1 new drift finding left open in partition {PARTITION}")
    assert f"{UI}/runs/{result.run_id}" in body["text"]
    assert_clean(json.dumps(body))
    assert receiver.paths == ["/services/T000/B000/s3cr3t-webhook-token"]

    [mail] = smtp.wait_for(1)
    assert mail["To"] == "ops@example.org, oncall@example.org"
    assert " ".join(mail["Subject"].split()) == body["text"].splitlines()[0]  # headers fold long lines
    assert mail["X-Reconciliation-Alert"] == "new_drift"
    assert f"{UI}/runs/{result.run_id}" in mail_text(mail)
    assert_clean(mail.as_string())
    assert smtp.logins == [("alerts", SMTP_PASSWORD)]

    # more ticks and another run with the same open problems: nothing more, ever
    sensor.tick()
    assert materialize().success
    sensor.tick()
    sensor.tick()
    assert len(receiver.bodies) == 1 and len(smtp.messages) == 1

    # the problem is solved (a document for 888888 appears), then it comes back: news again
    add_client(mongo_db, "888888", [creditor("inkasso-888888@example.de", 10.0)], first="Erika", last="Musterfrau")
    assert materialize().success
    sensor.tick()
    assert len(receiver.bodies) == 1
    mongo_db.clients.delete_one({"aktenzeichen": "888888"})
    assert materialize().success
    sensor.tick()
    assert [b["event"] for b in receiver.wait_for(2)] == ["new_drift", "new_drift"]
    assert receiver.bodies[1]["aktenzeichen"] == ["888888"]


def test_a_red_error_check_is_sent_once_not_every_hour(alert_env, sensor, materialize, pg, mongo_db, receiver):
    seed_consistent_client(pg, mongo_db)
    assert materialize().success
    sensor.tick()  # baseline: every check green

    seed_dead_outbox(pg)
    result = materialize()
    assert result.success
    sensor.tick()
    [body] = receiver.wait_for(1)
    assert body["event"] == "checks_failed" and body["checks"] == ["no_dead_outbox_messages"]
    assert body["partition"] == PARTITION and body["run_url"] == f"{UI}/runs/{result.run_id}"
    assert body["counts"]["outbox_dead"] == 1
    assert "1 dead outbox messages" in body["check_descriptions"]["no_dead_outbox_messages"]

    # still dead an hour later: no second message
    for _ in range(2):
        assert materialize().success
        sensor.tick()
    assert len(receiver.bodies) == 1

    # fixed, then dead again: a new event
    with pg.begin() as conn:
        conn.execute(sa.text("DELETE FROM outbox_messages"))
    assert materialize().success
    sensor.tick()
    seed_dead_outbox(pg)
    assert materialize().success
    sensor.tick()
    assert [b["event"] for b in receiver.wait_for(2)] == ["checks_failed", "checks_failed"]


def test_repair_budget_trip_is_one_check_alert_and_one_drift_alert(alert_env, sensor, materialize, pg, mongo_db, receiver):
    seed_consistent_client(pg, mongo_db)
    assert materialize().success
    sensor.tick()
    add_client(mongo_db, "542901", [creditor(SPARKASSE, 1.0)], first="Erika", last="Musterfrau")
    add_email(pg, from_email=SPARKASSE, extracted=reply(az="542901", amount=5.0, name="Musterfrau, Erika"))
    result = materialize(max_repairs=0)
    assert result.success
    sensor.tick()
    bodies = receiver.wait_for(2)
    assert sorted(b["event"] for b in bodies) == ["checks_failed", "new_drift"], bodies
    check = next(b for b in bodies if b["event"] == "checks_failed")
    assert check["checks"] == ["no_unrepaired_drift", "repair_budget_not_exceeded"]
    drift = next(b for b in bodies if b["event"] == "new_drift")
    assert drift["kinds"] == {"data_mismatch": 1} and drift["aktenzeichen"] == ["542901"]
    for b in bodies:
        assert_clean(json.dumps(b))


def test_a_failed_run_is_sent_once(alert_env, sensor, materialize, pg, mongo_db, receiver, instance, pg_url):
    seed_consistent_client(pg, mongo_db)
    assert materialize().success
    sensor.tick()
    broken = sa.make_url(pg_url).set(database="recon_no_such_database").render_as_string(hide_password=False)
    failed = materialize(postgres_url=broken)
    assert not failed.success
    assert instance.get_run_by_id(failed.run_id).status == dg.DagsterRunStatus.FAILURE
    sensor.tick()
    [body] = receiver.wait_for(1)
    assert body["event"] == "run_failed" and body["run_id"] == failed.run_id
    assert body["partition"] == PARTITION and body["run_url"] == f"{UI}/runs/{failed.run_id}"
    assert "open_report" in " ".join(body["failed_steps"]), body
    assert "recon_no_such_database" not in json.dumps(body)  # no error text: it could carry a URL
    sensor.tick()
    assert len(receiver.bodies) == 1


def test_drift_open_past_the_stale_hours_is_sent_once(alert_env, monkeypatch, sensor, materialize, pg, mongo_db, receiver):
    monkeypatch.setenv(alerts.ENV_STALE_HOURS, str(3 / 3600))  # three seconds
    seed_unknown_client(pg, "999999")
    assert materialize().success
    sensor.tick()  # baseline: open, not news
    sensor.tick()
    assert receiver.bodies == []
    time.sleep(3.5)
    result = materialize()
    assert result.success
    sensor.tick()
    [body] = receiver.wait_for(1)
    assert body["event"] == "stale_drift" and body["stale_problems"] == 1
    assert body["kinds"] == {"client_not_found": 1} and body["aktenzeichen"] == ["999999"]
    assert body["run_url"] == f"{UI}/runs/{result.run_id}" and body["open_hours"] >= 0
    for _ in range(2):
        assert materialize().success
        sensor.tick()
    assert len(receiver.bodies) == 1


def test_a_failing_webhook_is_logged_and_retried_next_tick(alert_env, monkeypatch, sensor, materialize, pg, mongo_db,
                                                         receiver, smtp, capsys):
    seed_consistent_client(pg, mongo_db)
    assert materialize().success
    sensor.tick()
    seed_unknown_client(pg, "777777")
    assert materialize().success

    # two events: no_unrepaired_drift turned red, and the new drift
    receiver.fail_next = 4
    capsys.readouterr()
    for _ in range(2):
        result = sensor.tick()  # never raises
        assert "2 waiting for a retry" in result.skip_message, result.skip_message
    assert receiver.failed == 4 and receiver.bodies == []
    assert len(smtp.wait_for(2)) == 2  # the mails went out on the first tick and are not sent again
    logged = capsys.readouterr()  # the sensor's context.log writes to the console
    warnings = [line for line in (logged.err + logged.out).splitlines() if "failed (retried next tick)" in line]
    assert len(warnings) == 4, logged.err[-3000:]
    assert all("HTTPError" in w and "s3cr3t" not in w for w in warnings), warnings

    result = sensor.tick()
    assert "0 waiting" in result.skip_message
    bodies = receiver.wait_for(2)
    assert sorted(b["event"] for b in bodies) == ["checks_failed", "new_drift"]
    assert next(b for b in bodies if b["event"] == "new_drift")["aktenzeichen"] == ["777777"]
    sensor.tick()
    assert len(receiver.bodies) == 2 and len(smtp.messages) == 2

    # a mail server that is gone: logged without its password, the tick still succeeds
    monkeypatch.setenv(alerts.ENV_SMTP_URL, f"smtps://alerts:{SMTP_PASSWORD}@127.0.0.1:1")
    seed_unknown_client(pg, "666666")
    assert materialize().success
    capsys.readouterr()
    result = sensor.tick()
    assert "1 waiting for a retry" in result.skip_message
    assert len(receiver.wait_for(3)) == 3  # the webhook still got it
    out = capsys.readouterr()
    logged = out.err + out.out
    assert "via email to smtps://127.0.0.1:1 failed" in logged and SMTP_PASSWORD not in logged


def test_bad_configuration_is_reported_not_raised(monkeypatch, sensor):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(alerts.ENV_SMTP_URL, "http://mail.example.org")
    monkeypatch.setenv(alerts.ENV_EMAIL_TO, "ops@example.org")
    result = sensor.tick()
    assert "must start with smtp:// or smtps://" in result.skip_message and sensor.cursor is None


def test_config_repr_and_redaction_hide_credentials() -> None:
    config = alerts.config_from_env({alerts.ENV_WEBHOOK_URL: "https://hooks.slack.com/services/T1/B2/tok",
                                     alerts.ENV_SMTP_URL: "smtps://u:pw@mail.example.org:465", alerts.ENV_EMAIL_TO: "a@b.c"})
    assert config.channels == ["webhook", "email"] and "tok" not in repr(config) and "pw" not in repr(config)
    assert alerts.redact_url(config.smtp_url) == "smtps://mail.example.org:465"
    assert alerts.redact_url(config.webhook_url) == "https://hooks.slack.com"
    with pytest.raises(alerts.AlertConfigError, match="RECON_ALERT_EMAIL_TO"):
        alerts.config_from_env({alerts.ENV_SMTP_URL: "smtp://mail.example.org"})
    with pytest.raises(alerts.AlertConfigError, match="STALE_HOURS"):
        alerts.config_from_env({alerts.ENV_WEBHOOK_URL: "https://x.example", alerts.ENV_STALE_HOURS: "a day"})


def test_open_problems_are_the_ledger_s_problems_and_a_run_that_compared_nothing_closes_none(
        alert_env, sensor, materialize, pg, pg_url, mongo_db, receiver, instance):
    """A problem is keyed as the drift ledger keys it (aktenzeichen, creditor, kind): a newer email of the
    same creditor showing it again is not news. A run with MongoDB unreachable says nothing about what
    is open: the problem is not forgotten (and then re-sent as new) after it."""
    seed_unknown_client(pg, "777777")
    assert materialize().success
    sensor.tick()  # baseline: 777777 open
    add_email(pg, from_email="inkasso-777777@example.de", extracted=reply(az="777777", amount=12.0, name="Nobody, No"))
    assert materialize().success
    sensor.tick()
    assert receiver.bodies == [], receiver.bodies  # the same problem, shown by another email
    resources_down = {"postgres": PostgresResource(url=pg_url),
                      "mongo": MongoResource(uri="mongodb://127.0.0.1:1/?directConnection=true", database=mongo_db.name,
                                             server_selection_timeout_ms=500),
                      "settings": ReconciliationSettings(repair_lock_wait_seconds=5)}
    assert dg.materialize([reconciliation_report], partition_key=PARTITION, resources=resources_down,
                          instance=instance).success
    sensor.tick()
    assert materialize().success
    sensor.tick()
    assert receiver.bodies == [], receiver.bodies
    seed_unknown_client(pg, "666666")  # and a new problem is still news
    assert materialize().success
    sensor.tick()
    [body] = receiver.wait_for(1)
    assert body["event"] == "new_drift" and body["aktenzeichen"] == ["666666"], body
