"""Alerts: which events are news, the messages about them, and their delivery (webhook, e-mail).

Plain Python, no Dagster: the sensor (`sensors.reconciliation_alert_sensor`) turns the instance's
runs, materializations and check evaluations into the facts below, calls `evaluate`, and stores
the returned state as its cursor (so a daemon restart keeps its place). Messages that could not be
delivered stay in the state and are sent again on the next tick.

Events, one message each:
  * `run_failed`: a run of the job failed;
  * `checks_failed`: an ERROR check of a materialization turned red (it was green, or unknown,
    at the previous materialization: a check that stays red is not news every hour);
  * `new_drift`: a materialization left problems (unrepaired findings) that were not open before;
  * `stale_drift`: problems still open past RECON_ALERT_STALE_HOURS (once per problem).
What was already open or red when the sensor first ran is the baseline, not news.

Messages carry partition, counts, kinds, aktenzeichen and the run's link, never a client name or
a credential; the webhook and SMTP URLs are never logged (only their host).
"""

from __future__ import annotations

import hashlib
import json
import os
import smtplib
import ssl
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import unquote, urlsplit

STATE_VERSION = 2  # 2: problems keyed by the drift ledger's problem_key
MAX_PENDING = 200  # undelivered messages kept in the cursor; older ones are dropped (and logged)
MAX_OPEN = 20_000  # open problems remembered (digests); beyond, the oldest are forgotten
SAMPLE_AKTENZEICHEN = 10
TIMEOUT_SECONDS = 10.0
WEBHOOK, EMAIL = "webhook", "email"

ENV_WEBHOOK_URL = "RECON_ALERT_WEBHOOK_URL"
ENV_SMTP_URL = "RECON_ALERT_SMTP_URL"
ENV_EMAIL_TO = "RECON_ALERT_EMAIL_TO"
ENV_EMAIL_FROM = "RECON_ALERT_EMAIL_FROM"
ENV_STALE_HOURS = "RECON_ALERT_STALE_HOURS"
ENV_UI_BASE_URL = "RECON_UI_BASE_URL"


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class AlertConfig:
    """Where alerts go; read from the environment at every evaluation."""

    webhook_url: str | None = None
    smtp_url: str | None = None
    email_to: tuple[str, ...] = ()
    email_from: str = "reconciliation-alerts@localhost"
    stale_hours: float = 24.0
    ui_base_url: str = "http://127.0.0.1:3000"

    @property
    def channels(self) -> list[str]:
        out = []
        if self.webhook_url:
            out.append(WEBHOOK)
        if self.smtp_url and self.email_to:
            out.append(EMAIL)
        return out

    @property
    def configured(self) -> bool:
        return bool(self.channels)

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_base_url.rstrip('/')}/runs/{run_id}"

    def __repr__(self) -> str:  # the URLs hold credentials
        return f"AlertConfig(channels={self.channels}, email_to={list(self.email_to)}, stale_hours={self.stale_hours})"


class AlertConfigError(ValueError):
    pass


def config_from_env(environ: Mapping[str, str] | None = None) -> AlertConfig:
    """The alert configuration from RECON_ALERT_* and RECON_UI_BASE_URL (unset: no channel)."""
    env = os.environ if environ is None else environ
    smtp_url = env.get(ENV_SMTP_URL, "").strip() or None
    if smtp_url and urlsplit(smtp_url).scheme not in ("smtp", "smtps"):
        raise AlertConfigError(f"{ENV_SMTP_URL} must start with smtp:// or smtps://")
    webhook = env.get(ENV_WEBHOOK_URL, "").strip() or None
    if webhook and urlsplit(webhook).scheme not in ("http", "https"):
        raise AlertConfigError(f"{ENV_WEBHOOK_URL} must be an http(s) URL")
    stale = env.get(ENV_STALE_HOURS, "").strip() or "24"
    try:
        stale_hours = float(stale)
    except ValueError:
        raise AlertConfigError(f"{ENV_STALE_HOURS} must be a number of hours, got {stale!r}") from None
    to = tuple(a.strip() for a in env.get(ENV_EMAIL_TO, "").split(",") if a.strip())
    if smtp_url and not to:
        raise AlertConfigError(f"{ENV_SMTP_URL} is set but {ENV_EMAIL_TO} is empty")
    return AlertConfig(
        webhook_url=webhook, smtp_url=smtp_url, email_to=to,
        email_from=env.get(ENV_EMAIL_FROM, "").strip() or AlertConfig.email_from,
        stale_hours=stale_hours, ui_base_url=env.get(ENV_UI_BASE_URL, "").strip() or AlertConfig.ui_base_url,
    )


def redact_url(url: str) -> str:
    """scheme://host[:port] only: the path of a Slack/Teams webhook and an SMTP URL's userinfo are secrets."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


# ------------------------------------------------------------------------------------------ facts


@dataclass(frozen=True)
class Problem:
    """One open problem: a finding left in MongoDB (never a name: aktenzeichen and address only)."""

    kind: str
    aktenzeichen: str | None
    creditor_email: str | None
    email_id: int | None = None
    key: str | None = None  # the drift ledger's problem_key: one problem, whichever email shows it

    @property
    def digest(self) -> str:
        key = self.key if self.key is not None else json.dumps([self.kind, self.aktenzeichen, self.creditor_email, self.email_id])
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Materialization:
    """What the sensor read about one materialization of the report asset."""

    storage_id: int
    run_id: str
    partition: str | None
    timestamp: float
    counts: Mapping[str, int]
    failed_error_checks: Mapping[str, str]  # check name -> description (red, severity ERROR)
    passed_checks: Sequence[str]
    problems: Sequence[Problem]  # the unrepaired findings of its report
    compared: bool = True  # false: dry run or MongoDB unreachable, its findings say nothing about what is open


@dataclass(frozen=True)
class RunFailure:
    storage_id: int
    run_id: str
    job_name: str
    partition: str | None
    timestamp: float
    failed_steps: Sequence[str] = ()


@dataclass
class Message:
    """One alert, with the channels it still has to reach."""

    id: str
    event: str
    text: str
    fields: dict[str, Any]
    todo: list[str] = field(default_factory=list)
    attempts: int = 0

    @property
    def subject(self) -> str:
        return self.text.splitlines()[0][:200]

    def webhook_payload(self) -> dict[str, Any]:
        """Slack / Teams incoming-webhook shape: `text`, plus the structured fields beside it."""
        return {"text": self.text, "event": self.event, "alert_id": self.id, **self.fields}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.event, "text": self.text, "fields": self.fields, "todo": self.todo,
                "attempts": self.attempts}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Message:
        return cls(id=d["id"], event=d["event"], text=d["text"], fields=dict(d["fields"]), todo=list(d["todo"]),
                   attempts=int(d.get("attempts", 0)))


# ------------------------------------------------------------------------------------------ state


@dataclass
class AlertState:
    """The sensor cursor: how far it has read, what is open/red, and what is still to deliver."""

    materialization_after: int | None = None  # storage id of the last materialization evaluated
    run_failure_after: int | None = None  # storage id of the last RUN_FAILURE event evaluated
    checks: dict[str, bool] = field(default_factory=dict)  # check name -> passed, at the last materialization
    open: dict[str, list] = field(default_factory=dict)  # problem digest -> [first seen (epoch s), stale alerted]
    pending: list[Message] = field(default_factory=list)

    @property
    def started(self) -> bool:
        return self.materialization_after is not None

    def to_cursor(self) -> str:
        return json.dumps({
            "v": STATE_VERSION, "mat": self.materialization_after, "runs": self.run_failure_after,
            "checks": self.checks, "open": self.open, "pending": [m.to_json() for m in self.pending],
        }, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_cursor(cls, cursor: str | None) -> AlertState:
        if not cursor:
            return cls()
        d = json.loads(cursor)
        if d.get("v") != STATE_VERSION:
            return cls()
        return cls(materialization_after=d.get("mat"), run_failure_after=d.get("runs"), checks=dict(d.get("checks", {})),
                   open={k: list(v) for k, v in d.get("open", {}).items()},
                   pending=[Message.from_json(m) for m in d.get("pending", [])])


def open_problems(state: AlertState) -> set[str]:
    """The problems open before the materialization being evaluated (digests).

    The unrepaired findings of the last materialization that compared (kept in the cursor), keyed
    by the drift ledger's problem_key (aktenzeichen, creditor address, kind), so a problem that a
    newer email of the same creditor shows again is not news.
    """
    return set(state.open)


# ------------------------------------------------------------------------------------------ evaluation


def _kinds(problems: Iterable[Problem]) -> dict[str, int]:
    return dict(sorted(Counter(p.kind for p in problems).items()))


def _kinds_text(kinds: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in kinds.items())


def _sample(problems: Iterable[Problem]) -> list[str]:
    return sorted({p.aktenzeichen for p in problems if p.aktenzeichen})[:SAMPLE_AKTENZEICHEN]


def _counts_text(counts: Mapping[str, int]) -> str:
    keys = ("records_checked", "mismatches_found", "auto_repaired", "failed_repairs", "outbox_dead")
    return ", ".join(f"{k}={counts[k]}" for k in keys if k in counts)


def run_failed_message(failure: RunFailure, config: AlertConfig) -> Message:
    url = config.run_url(failure.run_id)
    steps = f" (failed step: {', '.join(failure.failed_steps)})" if failure.failed_steps else ""
    text = (f"[reconciliation] run of {failure.job_name} failed for partition {failure.partition or '-'}{steps}\n"
            f"Run: {url}")
    return Message(id=f"run_failed:{failure.run_id}", event="run_failed", text=text, fields={
        "partition": failure.partition, "run_id": failure.run_id, "run_url": url, "job": failure.job_name,
        "failed_steps": list(failure.failed_steps)})


def checks_failed_message(m: Materialization, names: Sequence[str], config: AlertConfig) -> Message:
    url = config.run_url(m.run_id)
    lines = [f"[reconciliation] check{'s' if len(names) > 1 else ''} failed for partition {m.partition or '-'}: "
             f"{', '.join(names)}"]
    lines += [f"- {n}: {m.failed_error_checks[n]}" for n in names]
    lines += [f"Counts: {_counts_text(m.counts)}", f"Run: {url}"]
    return Message(id=f"checks_failed:{m.run_id}:{m.storage_id}", event="checks_failed", text="\n".join(lines), fields={
        "partition": m.partition, "run_id": m.run_id, "run_url": url, "checks": list(names),
        "check_descriptions": {n: m.failed_error_checks[n] for n in names}, "counts": dict(m.counts)})


def new_drift_message(m: Materialization, new: Sequence[Problem], config: AlertConfig) -> Message:
    url = config.run_url(m.run_id)
    kinds = _kinds(new)
    sample = _sample(new)
    text = (f"[reconciliation] {len(new)} new drift finding{'s' if len(new) != 1 else ''} left open in partition "
            f"{m.partition or '-'}: {_kinds_text(kinds)}\n"
            f"Aktenzeichen: {', '.join(sample) or '-'}{' ...' if len({p.aktenzeichen for p in new}) > len(sample) else ''}\n"
            f"Counts: {_counts_text(m.counts)}\nRun: {url}")
    return Message(id=f"new_drift:{m.run_id}:{m.storage_id}", event="new_drift", text=text, fields={
        "partition": m.partition, "run_id": m.run_id, "run_url": url, "new_problems": len(new), "kinds": kinds,
        "aktenzeichen": sample, "counts": dict(m.counts)})


def stale_drift_message(latest: Materialization | None, stale: Sequence[tuple[Problem | None, float]], hours: float,
                        config: AlertConfig, now: float, run_id: str | None) -> Message:
    problems = [p for p, _ in stale if p is not None]
    kinds = _kinds(problems)
    oldest = min(first for _, first in stale)
    url = config.run_url(run_id) if run_id else None
    partition = latest.partition if latest else None
    text = (f"[reconciliation] {len(stale)} drift finding{'s' if len(stale) != 1 else ''} open for more than "
            f"{hours:g} h (oldest {(now - oldest) / 3600:.1f} h), latest partition {partition or '-'}"
            f"{': ' + _kinds_text(kinds) if kinds else ''}\n"
            f"Aktenzeichen: {', '.join(_sample(problems)) or '-'}" + (f"\nRun: {url}" if url else ""))
    return Message(id=f"stale_drift:{int(now)}:{len(stale)}", event="stale_drift", text=text, fields={
        "partition": partition, "run_id": run_id, "run_url": url, "stale_problems": len(stale), "kinds": kinds,
        "aktenzeichen": _sample(problems), "open_hours": round((now - oldest) / 3600, 1), "stale_hours": hours})


def evaluate(state: AlertState, config: AlertConfig, materializations: Sequence[Materialization],
             failures: Sequence[RunFailure], now: float, latest_storage_ids: tuple[int | None, int | None] = (None, None),
             ) -> tuple[AlertState, list[Message]]:
    """The next state and the new messages, from what happened since the state's place.

    `materializations` and `failures` are in storage order and after the state's place. On the
    first evaluation (`state.started` false) they are the baseline: the latest materialization's
    open problems and check results are remembered, nothing is news; `latest_storage_ids`
    (materialization, run failure) then sets the place.
    """
    messages: list[Message] = []
    if not state.started:
        latest = materializations[-1] if materializations else None
        new_state = AlertState(
            materialization_after=latest.storage_id if latest else (latest_storage_ids[0] or 0),
            run_failure_after=failures[-1].storage_id if failures else (latest_storage_ids[1] or 0),
            checks=_check_states(latest) if latest else {},
            open={p.digest: [latest.timestamp, 0] for p in latest.problems} if latest else {},
            pending=list(state.pending),
        )
        return new_state, messages

    new_state = AlertState(state.materialization_after, state.run_failure_after, dict(state.checks),
                           {k: list(v) for k, v in state.open.items()}, list(state.pending))
    for failure in failures:
        messages.append(run_failed_message(failure, config))
        new_state.run_failure_after = failure.storage_id

    problems_by_digest: dict[str, Problem] = {}
    last_run_id: str | None = None
    for m in materializations:
        turned_red = [n for n in sorted(m.failed_error_checks) if new_state.checks.get(n, True)]
        if turned_red:
            messages.append(checks_failed_message(m, turned_red, config))
        new_state.checks = {**new_state.checks, **_check_states(m)}

        new_state.materialization_after = m.storage_id
        last_run_id = m.run_id
        if not m.compared:  # absence of evidence is not a fix (as in the drift ledger)
            continue
        before = open_problems(new_state)
        current = {p.digest: p for p in m.problems}
        new = [p for d, p in current.items() if d not in before]
        if new:
            messages.append(new_drift_message(m, new, config))
        new_state.open = {d: new_state.open.get(d, [m.timestamp, 0]) for d in current}
        problems_by_digest = current

    limit = now - config.stale_hours * 3600
    stale = [(d, v) for d, v in new_state.open.items() if not v[1] and v[0] <= limit]
    if stale:
        latest = materializations[-1] if materializations else None
        messages.append(stale_drift_message(latest, [(problems_by_digest.get(d), v[0]) for d, v in stale],
                                            config.stale_hours, config, now, last_run_id))
        for d, v in stale:
            v[1] = 1
    if len(new_state.open) > MAX_OPEN:
        keep = sorted(new_state.open.items(), key=lambda kv: kv[1][0])[-MAX_OPEN:]
        new_state.open = dict(keep)
    for message in messages:
        message.todo = list(config.channels)
    return new_state, messages


def _check_states(m: Materialization) -> dict[str, bool]:
    return {**{n: True for n in m.passed_checks}, **{n: False for n in m.failed_error_checks}}


# ------------------------------------------------------------------------------------------ delivery


def send_webhook(url: str, payload: Mapping[str, Any], timeout: float = TIMEOUT_SECONDS) -> None:
    """POST the JSON payload; raises on a non-2xx answer or a network error."""
    body = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "reconciliation-alerts"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URL from the operator's config
        if not 200 <= resp.status < 300:
            raise OSError(f"webhook answered HTTP {resp.status}")


def send_email(smtp_url: str, sender: str, to: Sequence[str], message: Message, timeout: float = TIMEOUT_SECONDS) -> None:
    """Send the message through smtp:// (STARTTLS when offered) or smtps:// (TLS), logging in if the URL has a user."""
    parts = urlsplit(smtp_url)
    host = parts.hostname or "localhost"
    mail = EmailMessage()
    mail["Subject"] = message.subject
    mail["From"] = sender
    mail["To"] = ", ".join(to)
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(idstring=hashlib.sha256(message.id.encode()).hexdigest()[:16], domain="reconciliation")
    mail["X-Reconciliation-Alert"] = message.event
    mail.set_content(message.text + "\n\n" + json.dumps(message.fields, indent=2, sort_keys=True, default=str) + "\n")
    context = ssl.create_default_context()
    if parts.scheme == "smtps":
        client: smtplib.SMTP = smtplib.SMTP_SSL(host, parts.port or 465, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(host, parts.port or 25, timeout=timeout)
    with client:
        client.ehlo()
        if parts.scheme == "smtp" and client.has_extn("starttls"):
            client.starttls(context=context)
            client.ehlo()
        if parts.username:
            client.login(unquote(parts.username), unquote(parts.password or ""))
        client.send_message(mail)


def deliver(pending: Sequence[Message], config: AlertConfig, log: Any) -> list[Message]:
    """Try every channel each message still needs; returns the messages not fully delivered.

    Failures are logged (without URLs' secrets) and left for the next tick; nothing raises.
    """
    left: list[Message] = []
    for message in pending:
        for channel in list(message.todo):
            if channel not in config.channels:  # a channel removed from the config since
                message.todo.remove(channel)
                continue
            try:
                if channel == WEBHOOK:
                    send_webhook(config.webhook_url or "", message.webhook_payload())
                else:
                    send_email(config.smtp_url or "", config.email_from, config.email_to, message)
            except Exception as exc:  # noqa: BLE001 - any failure: retry next tick, never crash the daemon
                target = redact_url(config.webhook_url if channel == WEBHOOK else config.smtp_url or "")
                log.warning(f"alert {message.id} via {channel} to {target} failed (retried next tick): "
                            f"{type(exc).__name__}: {_safe_error(exc, config)}")
            else:
                message.todo.remove(channel)
                log.info(f"alert {message.id} sent via {channel}")
        message.attempts += 1
        if message.todo:
            left.append(message)
    if len(left) > MAX_PENDING:
        dropped = left[:-MAX_PENDING]
        log.error(f"{len(dropped)} undeliverable alerts dropped (kept the newest {MAX_PENDING}): "
                  f"{', '.join(m.id for m in dropped[:20])}")
        left = left[-MAX_PENDING:]
    return left


def _safe_error(exc: Exception, config: AlertConfig) -> str:
    """The error text without the configured URLs or the SMTP password."""
    text = str(exc)[:500]
    secrets = [config.webhook_url, config.smtp_url]
    if config.smtp_url:
        parts = urlsplit(config.smtp_url)
        secrets += [parts.password, unquote(parts.password or "") or None, parts.path]
    if config.webhook_url:
        secrets.append(urlsplit(config.webhook_url).path)
    for secret in secrets:
        if secret and len(secret) > 1:
            text = text.replace(secret, "***")
    return text
