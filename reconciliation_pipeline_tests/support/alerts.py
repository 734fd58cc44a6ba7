"""Local alert receivers for the tests: an HTTP webhook receiver and an SMTP server (aiosmtpd), on 127.0.0.1."""

from __future__ import annotations

import email
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from reconciliation_pipeline_tests.support.processes import free_port


@dataclass
class WebhookReceiver:
    """Records every JSON body POSTed to it; `fail_next` makes the next answers HTTP 500."""

    server: ThreadingHTTPServer
    bodies: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    fail_next: int = 0
    failed: int = 0

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/services/T000/B000/s3cr3t-webhook-token"

    def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return list(self.bodies)


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    holder: dict[str, WebhookReceiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            receiver = holder["r"]
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if receiver.fail_next > 0:
                receiver.fail_next -= 1
                receiver.failed += 1
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"boom")
                return
            assert self.headers.get("Content-Type") == "application/json"
            receiver.bodies.append(json.loads(body))
            receiver.paths.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = WebhookReceiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder["r"]
    finally:
        server.shutdown()
        server.server_close()


SMTP_USER, SMTP_PASSWORD = "alerts", "smtp-pa55word"


@dataclass
class SmtpServer:
    controller: Controller
    port: int
    messages: list[email.message.Message] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{self.port}"

    def wait_for(self, count: int, timeout: float = 30) -> list[email.message.Message]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return list(self.messages)


@contextmanager
def smtp_server() -> Iterator[SmtpServer]:
    """aiosmtpd on a free loopback port, AUTH LOGIN/PLAIN with SMTP_USER/SMTP_PASSWORD (no TLS: loopback)."""
    holder: dict[str, SmtpServer] = {}

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
            holder["s"].messages.append(email.message_from_bytes(envelope.content))
            return "250 OK"

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            holder["s"].logins.append((login, password))
            if (login, password) == (SMTP_USER, SMTP_PASSWORD):
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False, auth_required=True)
    controller.start()
    holder["s"] = SmtpServer(controller, port)
    try:
        yield holder["s"]
    finally:
        controller.stop()
