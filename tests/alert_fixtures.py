"""Helpers for the alert escalation tests: policies with an alerts section, a mail server, a webhook receiver.

Real servers only: a mailbox behind aiosmtpd on a free loopback port that keeps every message it accepts,
and a stdlib ThreadingHTTPServer that answers webhooks from a script and checks each request's signature
with the channel's own `verify_webhook`, as a SIEM would. Both record what arrived before they answer,
so whatever a delivery round sent is there when the round returns.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from aiosmtpd.controller import Controller as SmtpController
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import Envelope, Session

from sekisho.controller.alerts.channels import DELIVERY_HEADER, verify_webhook
from sekisho.controller.policy.loader import parse_policy
from sekisho.deploy.broker import find_free_port
from sekisho.protocol.policy import SitePolicy

DEMO = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
SOCKET_TIMEOUT = 5.0
WEBHOOK_SECRET = b"alert-escalation-test-secret-0123"
SENDER = "関所 アラート <alerts@example.invalid>"

# The demo site's alerts section for these tests: a duty roster over the demo's office hours (s-office, weekdays
# 08:00-20:00 JST), a door chain of two steps looped once, and a SIEM chain for USB alerts over a webhook.
ESCALATION_ALERTS = """
alerts:
  contacts:
    - {id: guard-desk, name: 警備室 日勤, email: guard@example.invalid}
    - {id: night-guard, name: 警備室 夜勤, email: night@example.invalid}
    - {id: holiday-guard, name: 休日当番, email: holiday@example.invalid}
    - {id: sec-lead, name: Security lead, email: lead@example.invalid, language: en}
    - {id: soc, name: SOC, webhook: soc}
  rosters:
    - {id: duty, hours: s-office, business: [guard-desk], after_hours: [night-guard], holiday: [holiday-guard]}
  escalations:
    - id: doors
      steps:
        - {after_minutes: 0, notify: ["roster:duty"]}
        - {after_minutes: 10, notify: [sec-lead]}
      repeat: 1
      loop_after_minutes: 15
      ack_timeout_minutes: 120
    - id: siem
      steps:
        - {after_minutes: 0, notify: [soc]}
      repeat: 0
  rules:
    door_forced: {severity: critical, escalation: doors}
    usb_blocked: {escalation: siem}
"""

# A chain of two steps a minute apart, run once: the restart test lasts about a minute.
RESTART_ALERTS = """
alerts:
  contacts:
    - {id: guard-desk, name: 警備室 日勤, email: guard@example.invalid}
    - {id: sec-lead, name: Security lead, email: lead@example.invalid, language: en}
    - {id: area-manager, name: 管理区域 責任者, email: manager@example.invalid}
  escalations:
    - id: doors
      steps:
        - {after_minutes: 0, notify: [guard-desk, sec-lead]}
        - {after_minutes: 1, notify: [sec-lead, area-manager]}
      repeat: 0
  rules:
    door_forced: {severity: critical, escalation: doors}
"""


def policy_text(alerts_yaml: str) -> str:
    """Return the demo site's policy YAML with its alerts section replaced by this one."""
    document = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    document["alerts"] = yaml.safe_load(alerts_yaml)["alerts"]
    return str(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))


def alert_policy(alerts_yaml: str) -> SitePolicy:
    """Parse the demo site's policy with this alerts section, as `sekisho policy apply` would."""
    return parse_policy(policy_text(alerts_yaml))


# --- e-mail --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mail:
    """One message the mail server accepted, for one recipient."""

    to: str
    message_id: str
    notification: int
    kind: str
    subject: str


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts (thread-safe: the server runs its own loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mails: list[Mail] = []

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content
        if not isinstance(content, bytes):
            return "554 5.6.0 no content"
        message = email.message_from_bytes(content, policy=email.policy.default)
        if not isinstance(message, EmailMessage):
            return "554 5.6.0 unreadable message"
        with self._lock:
            for rcpt in envelope.rcpt_tos:
                self._mails.append(
                    Mail(
                        to=rcpt,
                        message_id=str(message["Message-ID"]),
                        notification=int(str(message["X-Sekisho-Notification"])),
                        kind=str(message["X-Sekisho-Kind"]),
                        subject=str(message["Subject"]),
                    )
                )
        return "250 OK"

    @property
    def mails(self) -> list[Mail]:
        """Return a copy of every mail received so far, in arrival order."""
        with self._lock:
            return list(self._mails)

    def take(self) -> list[Mail]:
        """Return the mails received since the last take (and forget them)."""
        with self._lock:
            taken, self._mails = self._mails, []
        return taken


@contextmanager
def smtp_server(mailbox: Mailbox) -> Iterator[int]:
    """Run a real aiosmtpd server on a free loopback port for the block; yield the port."""
    port = find_free_port()
    controller = SmtpController(mailbox, hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


# --- webhooks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One webhook request as the receiver saw it: the delivery id, whether it verified, the answer given."""

    delivery: str
    verified: bool
    notification: int | None
    timestamp: str
    status: int


class HookReceiver:
    """A loopback webhook receiver: verifies each request's HMAC, then answers the next scripted status.

    ``script`` is consumed one status per request; when it is empty, ``then`` answers. A request whose
    signature does not verify is answered 401 whatever the script says (and recorded as not verified).
    ``clock`` is the moment the receiver judges freshness by: the test's clock, which signed the request.
    """

    def __init__(self, secret: bytes, clock: Callable[[], datetime]) -> None:
        self.secret = secret
        self.clock = clock
        self.script: list[int] = []
        self.then = 200
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = dict(self.headers.items())
                verified = verify_webhook(receiver.secret, headers, body, now=receiver.clock())
                try:
                    notification = json.loads(body).get("notification")
                except ValueError:
                    notification = None
                status = receiver._answer(verified)
                with receiver._lock:
                    receiver._deliveries.append(
                        Delivery(
                            delivery=headers.get(DELIVERY_HEADER, ""),
                            verified=verified,
                            notification=notification if isinstance(notification, int) else None,
                            timestamp=headers.get("X-Sekisho-Timestamp", ""),
                            status=status,
                        )
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _answer(self, verified: bool) -> int:
        with self._lock:
            if not verified:
                return 401
            return self.script.pop(0) if self.script else self.then

    @property
    def url(self) -> str:
        """Return the hook's URL (with a token in its query, as real receivers often have)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sekisho?token=t0ken"

    @property
    def deliveries(self) -> list[Delivery]:
        """Return a copy of every request received so far, in arrival order."""
        with self._lock:
            return list(self._deliveries)

    def __enter__(self) -> HookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(SOCKET_TIMEOUT)
