"""Alert channels against real servers on loopback: aiosmtpd, a stdlib HTTP(S) receiver, UDP and TCP syslog sockets.

Nothing here patches the channels: each test starts a server on a free 127.0.0.1 port, sends a notice, and
reads what the server received (or how the channel failed). Every socket the tests open has a timeout.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import os
import re
import socket
import ssl
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from sekisho.controller.alerts.channels import (
    BACKOFF_CAP,
    BOM,
    MAX_RETRIES,
    SD_ID,
    UDP_MAX_BYTES,
    DeliveryError,
    EmailChannel,
    Notice,
    SmtpSettings,
    SyslogChannel,
    SyslogSettings,
    WebhookChannel,
    WebhookSettings,
    backoff,
    format_rfc5424,
    sign_webhook,
    verify_webhook,
)
from sekisho.deploy.pki import init_ca, issue_server_cert

JST = timezone(timedelta(hours=9))
OCCURRED = datetime(2026, 12, 7, 8, 57, 2, 123456, tzinfo=JST)
NOW = datetime(2026, 12, 7, 9, 0, 0, tzinfo=JST)
TITLE = "【重大】扉がこじ開けられました: サーバー室"
BODY = "サーバー室の扉 D-101 が解錠なしで開きました。\n時刻: 2026-12-07 08:57\n担当: 試験 花子"
HOSTILE = 'a"] \\b'  # every character an SD PARAM-VALUE must escape
SECRET = b"0123456789abcdef-test-secret"
PASSWORD = "relay-pass-Zq9"  # a test credential that must never show up in an error
SOCKET_TIMEOUT = 5.0


def make_notice(**changes: Any) -> Notice:
    base = Notice(
        notification_id=41,
        alert_id=7,
        kind="opened",
        rule="door_forced",
        severity="critical",
        title=TITLE,
        body=BODY,
        labels={"site": "本社", "area": "サーバー室", "door": "D-101", "person": "試験 花子", "note": HOSTILE},
        occurred_at=OCCURRED,
        url="https://console.example.invalid/console/alerts/7",
    )
    return replace(base, **changes)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections (in the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


# --- SMTP ----------------------------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """An aiosmtpd handler that keeps what it accepts, or refuses recipients / data with a given reply."""

    rcpt_reply: str | None = None
    data_reply: str | None = None
    received: list[Envelope] = field(default_factory=list)
    helo_names: list[str] = field(default_factory=list)
    logins: list[bytes] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SmtpServer, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        self.received.append(envelope)
        self.helo_names.append(str(session.host_name))
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            self.logins.append(session.auth_data.login)
        return "250 OK"


def check_password(server: SmtpServer, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"sekisho" and data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@contextmanager
def smtp_server(mailbox: Mailbox, **kwargs: Any) -> Iterator[int]:
    """A real aiosmtpd server on a free loopback port, for the length of the block."""
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, ready_timeout=10, **kwargs)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 from the project's own PKI code: (ca, cert, key)."""
    directory = tmp_path_factory.mktemp("alert-tls")
    ca = init_ca(directory / "ca")
    server = issue_server_cert(directory / "ca", ["127.0.0.1"], directory / "server")
    return ca.cert, server.cert, server.key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def smtp_settings(port: int, **changes: Any) -> SmtpSettings:
    base = {"host": "127.0.0.1", "port": port, "sender": "関所 アラート <alerts@example.jp>", "helo": "sekisho.test"}
    return SmtpSettings(**{**base, "timeout_s": SOCKET_TIMEOUT, **changes})


def parsed(envelope: Envelope) -> EmailMessage:
    content = envelope.original_content or envelope.content
    assert isinstance(content, bytes)
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_email_arrives_with_japanese_text_stable_message_id_and_sekisho_headers() -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        channel = EmailChannel(smtp_settings(port))
        channel.send(make_notice(), "guard@example.invalid", "警備室 当番", now=NOW)
        channel.send(make_notice(), "guard@example.invalid", "警備室 当番", now=NOW)  # a resend after a crash

    assert len(mailbox.received) == 2
    first, again = mailbox.received
    assert first.mail_from == "alerts@example.jp"
    assert first.rcpt_tos == ["guard@example.invalid"]
    assert mailbox.helo_names == ["sekisho.test", "sekisho.test"]
    raw = first.original_content or first.content
    assert isinstance(raw, bytes) and raw.isascii()  # encoded for any relay, decoded below
    message = parsed(first)
    assert message["Subject"] == TITLE
    assert message["From"].addresses[0].display_name == "関所 アラート"
    assert message["To"].addresses[0].display_name == "警備室 当番"
    assert message["To"].addresses[0].addr_spec == "guard@example.invalid"
    assert message["Message-ID"] == "<sekisho.notification.41@example.jp>"
    assert parsed(again)["Message-ID"] == message["Message-ID"]
    assert message["X-Sekisho-Alert"] == "7"
    assert message["X-Sekisho-Severity"] == "critical"
    assert message["X-Sekisho-Kind"] == "opened"
    assert message["Auto-Submitted"] == "auto-generated"
    assert parsedate_to_datetime(message["Date"]) == NOW
    text = message.get_content()
    assert "サーバー室の扉 D-101 が解錠なしで開きました。" in text
    assert "担当: 試験 花子" in text
    assert "https://console.example.invalid/console/alerts/7" in text
    assert message.get_content_charset() == "utf-8"


def test_email_header_injection_through_the_title_or_name_stays_in_one_header() -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        EmailChannel(smtp_settings(port)).send(
            make_notice(title="扉\r\nBcc: thief@example.invalid"), "guard@example.invalid", "x\r\nCc: a@example.invalid"
        )
    message = parsed(mailbox.received[0])
    assert mailbox.received[0].rcpt_tos == ["guard@example.invalid"]
    assert message["Bcc"] is None and message["Cc"] is None
    assert message["Subject"] == "扉 Bcc: thief@example.invalid"


def test_email_recipient_refused_550_is_not_retryable() -> None:
    mailbox = Mailbox(rcpt_reply="550 5.1.1 no such mailbox")
    with smtp_server(mailbox) as port, pytest.raises(DeliveryError) as caught:
        EmailChannel(smtp_settings(port)).send(make_notice(), "nobody@example.invalid")
    assert caught.value.retryable is False
    assert caught.value.code == 550
    assert "nobody@example.invalid" in str(caught.value)
    assert mailbox.received == []


def test_email_temporary_refusal_451_is_retryable() -> None:
    mailbox = Mailbox(data_reply="451 4.3.0 mailbox busy, try later")
    with smtp_server(mailbox) as port, pytest.raises(DeliveryError) as caught:
        EmailChannel(smtp_settings(port)).send(make_notice(), "guard@example.invalid")
    assert caught.value.retryable is True
    assert caught.value.code == 451


def test_email_with_nothing_listening_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        EmailChannel(smtp_settings(free_port())).send(make_notice(), "guard@example.invalid")
    assert caught.value.retryable is True
    assert caught.value.code is None


def test_email_to_a_server_that_never_greets_times_out_retryable() -> None:
    with silent_listener() as port, pytest.raises(DeliveryError) as caught:
        EmailChannel(smtp_settings(port, timeout_s=0.5)).send(make_notice(), "guard@example.invalid")
    assert caught.value.retryable is True


def test_email_invalid_recipient_is_not_retryable_and_nothing_is_sent() -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port:
        for bad in ("not-an-address", "guard@example.invalid\r\nRCPT TO:<x@example.invalid>", ""):
            with pytest.raises(DeliveryError) as caught:
                EmailChannel(smtp_settings(port)).send(make_notice(), bad)
            assert caught.value.retryable is False
    assert mailbox.received == []


def test_email_starttls_and_login_reach_the_relay(tls_files: tuple[Path, Path, Path]) -> None:
    ca, cert, key = tls_files
    mailbox = Mailbox()
    with smtp_server(
        mailbox, tls_context=server_context(cert, key), authenticator=check_password, auth_require_tls=True
    ) as port:
        settings = smtp_settings(port, starttls=True, tls_cafile=ca, username="sekisho", password=PASSWORD)
        EmailChannel(settings).send(make_notice(), "guard@example.invalid")
    assert mailbox.logins == [b"sekisho"]
    assert parsed(mailbox.received[0])["Subject"] == TITLE
    assert PASSWORD not in repr(settings)


def test_email_login_refused_is_not_retryable_and_never_shows_the_password(tls_files: tuple[Path, Path, Path]) -> None:
    ca, cert, key = tls_files
    mailbox = Mailbox()
    wrong = PASSWORD + "-wrong"
    with (
        smtp_server(mailbox, tls_context=server_context(cert, key), authenticator=check_password) as port,
        pytest.raises(DeliveryError) as caught,
    ):
        settings = smtp_settings(port, starttls=True, tls_cafile=ca, username="sekisho", password=wrong)
        EmailChannel(settings).send(make_notice(), "guard@example.invalid")
    assert caught.value.retryable is False
    assert caught.value.code == 535
    shown = "".join(traceback.format_exception(caught.value))
    assert wrong not in shown and PASSWORD not in shown
    assert mailbox.received == []


def test_email_starttls_with_an_untrusted_certificate_is_not_retryable(tls_files: tuple[Path, Path, Path]) -> None:
    _ca, cert, key = tls_files
    mailbox = Mailbox()
    with smtp_server(mailbox, tls_context=server_context(cert, key)) as port, pytest.raises(DeliveryError) as caught:
        EmailChannel(smtp_settings(port, starttls=True)).send(make_notice(), "guard@example.invalid")
    assert caught.value.retryable is False
    assert mailbox.received == []


def test_email_starttls_asked_but_not_offered_is_not_sent_in_clear() -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port, pytest.raises(DeliveryError) as caught:
        EmailChannel(smtp_settings(port, starttls=True)).send(make_notice(), "guard@example.invalid")
    assert caught.value.retryable is False
    assert mailbox.received == []


@pytest.mark.parametrize(
    "changes",
    [
        {"sender": "no-domain"},
        {"port": 0},
        {"username": "sekisho", "password": PASSWORD},  # a password in clear text: starttls missing
        {"username": "sekisho"},
        {"timeout_s": 0},
    ],
)
def test_smtp_settings_refuse_what_cannot_work_or_would_leak(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        smtp_settings(**{"port": 25, **changes})


# --- webhooks ------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    hold_after: int | None = None  # announce this Content-Length, send `body`, then hold the connection


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A stdlib ThreadingHTTPServer on loopback that records each request and answers with `reply`."""

    def __init__(self, context: ssl.SSLContext | None = None, *, host: str = "127.0.0.1") -> None:
        self.reply = Reply()
        self.requests: list[Received] = []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                receiver.requests.append(
                    Received("POST", self.path, dict(self.headers.items()), self.rfile.read(length))
                )
                reply = receiver.reply
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                announced = reply.hold_after if reply.hold_after is not None else len(reply.body)
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                self.wfile.write(reply.body)
                self.wfile.flush()
                if reply.hold_after is not None:
                    receiver.release.wait(SOCKET_TIMEOUT)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": socket.getaddrinfo(host, 0)[0][0]})
        self.server = server_class((host, 0), Handler)
        self.host = f"[{host}]" if ":" in host else host
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if context is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.server.server_address[1]}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(SOCKET_TIMEOUT)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def hook(url: str, **changes: Any) -> WebhookSettings:
    return WebhookSettings(**{"url": url, "secret": SECRET, "timeout_s": SOCKET_TIMEOUT, **changes})


def send_to(receiver: Receiver, path: str = "/hooks/sekisho?token=t0ken") -> None:
    WebhookChannel({"soc": hook(receiver.origin + path)}).send(make_notice(), "soc", now=NOW)


def test_webhook_posts_signed_compact_json_that_the_receiver_can_verify(receiver: Receiver) -> None:
    send_to(receiver)

    (request,) = receiver.requests
    assert request.path == "/hooks/sekisho?token=t0ken"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Sekisho-Delivery"] == "41"
    assert request.headers["X-Sekisho-Timestamp"] == str(int(NOW.timestamp()))
    assert request.headers["X-Sekisho-Signature"] == sign_webhook(SECRET, int(NOW.timestamp()), request.body)
    assert b" " not in request.body.split(b'"title"')[0]  # compact separators
    assert "扉がこじ開けられました".encode() in request.body  # UTF-8, not \u escapes
    assert json.loads(request.body) == {
        "v": 1,
        "notification": 41,
        "alert": 7,
        "kind": "opened",
        "rule": "door_forced",
        "severity": "critical",
        "title": TITLE,
        "body": BODY,
        "labels": {"site": "本社", "area": "サーバー室", "door": "D-101", "person": "試験 花子", "note": HOSTILE},
        "occurred_at": "2026-12-07T08:57:02.123456+09:00",
        "url": "https://console.example.invalid/console/alerts/7",
    }

    headers, body = request.headers, request.body
    assert verify_webhook(SECRET, headers, body, now=NOW + timedelta(seconds=3))
    assert verify_webhook(SECRET, {k.lower(): v for k, v in headers.items()}, body, now=NOW)
    assert not verify_webhook(SECRET, headers, body.replace(b'"critical"', b'"low"'), now=NOW)
    assert not verify_webhook(b"another-secret-of-16+bytes", headers, body, now=NOW)
    assert not verify_webhook(SECRET, headers, body, now=NOW + timedelta(seconds=301))  # stale
    assert not verify_webhook(SECRET, headers, body, now=NOW - timedelta(seconds=301))  # from the future
    assert not verify_webhook(SECRET, {**headers, "X-Sekisho-Delivery": "42"}, body, now=NOW)  # replay, new id
    without = {k: v for k, v in headers.items() if k != "X-Sekisho-Signature"}
    assert not verify_webhook(SECRET, without, body, now=NOW)
    assert not verify_webhook(SECRET, {**headers, "X-Sekisho-Timestamp": "-1"}, body, now=NOW)


def test_webhook_signature_covers_the_timestamp() -> None:
    body = b'{"notification":1}'
    assert sign_webhook(SECRET, 100, body) != sign_webhook(SECRET, 101, body)
    headers = {"X-Sekisho-Delivery": "1", "X-Sekisho-Timestamp": "101", "X-Sekisho-Signature": ""}
    headers["X-Sekisho-Signature"] = sign_webhook(SECRET, 100, body)  # signed for another moment
    assert not verify_webhook(SECRET, headers, body, now=datetime.fromtimestamp(101, UTC))


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True), (408, True), (400, False)])
def test_webhook_error_answers_are_sorted_by_whether_waiting_helps(
    receiver: Receiver, status: int, retryable: bool
) -> None:
    receiver.reply = Reply(status=status, body="受信側の説明".encode())
    with pytest.raises(DeliveryError) as caught:
        send_to(receiver)
    assert caught.value.retryable is retryable
    assert caught.value.code == status
    assert "t0ken" not in str(caught.value)  # the URL's path and query stay out of the error


def test_webhook_429_passes_on_the_receivers_retry_after(receiver: Receiver) -> None:
    receiver.reply = Reply(status=429, headers={"Retry-After": "120"})
    with pytest.raises(DeliveryError) as caught:
        send_to(receiver)
    assert caught.value.retryable is True
    assert caught.value.retry_after == timedelta(seconds=120)


def test_webhook_redirect_is_not_followed_and_not_retried(receiver: Receiver) -> None:
    with Receiver() as elsewhere:
        receiver.reply = Reply(status=307, headers={"Location": elsewhere.origin + "/stolen?k=secret-path"})
        with pytest.raises(DeliveryError) as caught:
            send_to(receiver)
        assert elsewhere.requests == []
    assert caught.value.retryable is False
    assert caught.value.code == 307
    assert len(receiver.requests) == 1
    assert "secret-path" not in str(caught.value)


def test_webhook_2xx_is_delivered_without_reading_an_endless_answer(receiver: Receiver) -> None:
    receiver.reply = Reply(status=202, body=b"accepted", hold_after=10**9)
    send_to(receiver)  # would time out if the channel read the announced gigabyte
    assert len(receiver.requests) == 1


def test_webhook_to_an_ipv6_address() -> None:
    with Receiver(host="::1") as receiver:
        send_to(receiver, "/in")
    assert [request.path for request in receiver.requests] == ["/in"]


def test_webhook_unknown_hook_is_not_retryable(receiver: Receiver) -> None:
    with pytest.raises(DeliveryError) as caught:
        WebhookChannel({"soc": hook(receiver.origin)}).send(make_notice(), "noc", now=NOW)
    assert caught.value.retryable is False
    assert receiver.requests == []


def test_webhook_with_nothing_listening_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        WebhookChannel({"soc": hook(f"http://127.0.0.1:{free_port()}/")}).send(make_notice(), "soc", now=NOW)
    assert caught.value.retryable is True


def test_webhook_to_a_receiver_that_never_answers_times_out_retryable() -> None:
    with silent_listener() as port, pytest.raises(DeliveryError) as caught:
        url = f"http://127.0.0.1:{port}/"
        WebhookChannel({"soc": hook(url, timeout_s=0.5)}).send(make_notice(), "soc", now=NOW)
    assert caught.value.retryable is True


def test_webhook_over_https_with_the_sites_ca(tls_files: tuple[Path, Path, Path]) -> None:
    ca, cert, key = tls_files
    with Receiver(server_context(cert, key)) as secure:
        WebhookChannel({"soc": hook(secure.origin + "/in", tls_cafile=ca)}).send(make_notice(), "soc", now=NOW)
        assert verify_webhook(SECRET, secure.requests[0].headers, secure.requests[0].body, now=NOW)
        with pytest.raises(DeliveryError) as caught:  # the system's trust store does not know the site CA
            WebhookChannel({"soc": hook(secure.origin + "/in")}).send(make_notice(), "soc", now=NOW)
    assert caught.value.retryable is False
    assert len(secure.requests) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"url": "ftp://127.0.0.1/x"},
        {"url": "file:///etc/passwd"},
        {"url": "http://user:pw@127.0.0.1/x"},
        {"url": "http:///no-host"},
        {"url": "http://127.0.0.1:99999/"},
        {"secret": b"short"},
        {"timeout_s": -1},
    ],
)
def test_webhook_settings_refuse_what_cannot_work_or_would_leak(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        hook(**{"url": "https://hooks.example.invalid/in", **changes})


def test_webhook_settings_repr_shows_no_secret_or_url() -> None:
    shown = repr(hook("https://hooks.example.invalid/T0KEN"))
    assert "T0KEN" not in shown and SECRET.decode() not in shown


# --- syslog --------------------------------------------------------------------------------------------------

HEADER = re.compile(rb"<(\d{1,3})>(\d) (\S+) (\S+) (\S+) (\S+) (\S+) ")


@dataclass
class Syslog:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd_id: str
    params: list[tuple[str, str]]
    msg: bytes


def parse_rfc5424(data: bytes) -> Syslog:
    """A strict reader of the messages the channel writes: one SD element, escapes undone, MSG kept as bytes."""
    match = HEADER.match(data)
    assert match, data[:80]
    pri, version, timestamp, hostname, app_name, procid, msgid = match.groups()
    rest = data[match.end() :]
    assert rest.startswith(b"[")
    i = 1
    end_of_id = rest.index(b" ", i)
    sd_id = rest[i:end_of_id].decode()
    i = end_of_id
    params: list[tuple[str, str]] = []
    while rest[i : i + 1] == b" ":
        eq = rest.index(b'="', i)
        name = rest[i + 1 : eq].decode("ascii")
        i = eq + 2
        value = bytearray()
        while rest[i : i + 1] != b'"':
            if rest[i : i + 1] == b"\\":
                assert rest[i + 1 : i + 2] in (b'"', b"\\", b"]"), rest[i : i + 2]
                i += 1
            else:
                assert rest[i : i + 1] != b"]", "an unescaped ] inside a value"
            value += rest[i : i + 1]
            i += 1
        params.append((name, value.decode("utf-8")))
        i += 1
    assert rest[i : i + 1] == b"]"
    tail = rest[i + 1 :]
    assert tail == b"" or tail.startswith(b" ")
    return Syslog(
        int(pri),
        int(version),
        timestamp.decode(),
        hostname.decode(),
        app_name.decode(),
        procid.decode(),
        msgid.decode(),
        sd_id,
        params,
        tail[1:],
    )


def syslog_settings(port: int, **changes: Any) -> SyslogSettings:
    return replace(
        SyslogSettings(host="127.0.0.1", port=port, hostname="door-box 1", timeout_s=SOCKET_TIMEOUT), **changes
    )


@pytest.fixture
def udp_receiver() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(SOCKET_TIMEOUT)
        yield sock


def test_syslog_udp_sends_one_rfc5424_datagram(udp_receiver: socket.socket) -> None:
    SyslogChannel(syslog_settings(udp_receiver.getsockname()[1])).send(make_notice())
    data, _sender = udp_receiver.recvfrom(65535)

    message = parse_rfc5424(data)
    assert message.pri == 10 * 8 + 2  # authpriv, crit
    assert message.version == 1
    assert datetime.fromisoformat(message.timestamp) == OCCURRED
    assert message.timestamp.endswith("+09:00")
    assert message.hostname == "door-box_1"  # the space is not allowed in a header field
    assert message.app_name == "sekisho"
    assert message.procid == str(os.getpid())
    assert message.msgid == "alert.opened"
    assert message.sd_id == SD_ID == "sekisho@32473"
    assert dict(message.params) == {
        "alert": "7",
        "notification": "41",
        "rule": "door_forced",
        "severity": "critical",
        "kind": "opened",
        "site": "本社",
        "area": "サーバー室",
        "door": "D-101",
        "person": "試験 花子",
        "note": HOSTILE,
    }
    assert message.msg.startswith(BOM)
    text = message.msg[len(BOM) :].decode("utf-8")
    assert text.startswith(TITLE)
    assert "\n" not in text and "担当: 試験 花子" in text


@pytest.mark.parametrize(("severity", "code"), [("critical", 2), ("high", 3), ("medium", 4), ("low", 5)])
def test_syslog_pri_is_facility_and_mapped_severity(severity: str, code: int) -> None:
    settings = syslog_settings(514, facility=4)
    data = format_rfc5424(make_notice(severity=severity), settings, hostname="h", procid="1")
    assert parse_rfc5424(data).pri == 4 * 8 + code


def test_syslog_tcp_sends_one_octet_counted_frame() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(SOCKET_TIMEOUT)
        notice = make_notice(kind="escalated", severity="high")
        # The kernel completes the handshake from the backlog, so the send needs no accepting thread.
        SyslogChannel(syslog_settings(server.getsockname()[1], transport="tcp")).send(notice)
        connection, _peer = server.accept()
        with connection:
            connection.settimeout(SOCKET_TIMEOUT)
            stream = b""
            while chunk := connection.recv(65536):
                stream += chunk
    length, _space, frame = stream.partition(b" ")
    assert length.isdigit() and int(length) == len(frame)
    message = parse_rfc5424(frame)
    assert message.pri == 10 * 8 + 3
    assert message.msgid == "alert.escalated"
    assert ("note", HOSTILE) in message.params
    assert message.msg[len(BOM) :].decode("utf-8").startswith(TITLE)


def test_syslog_tcp_with_nothing_listening_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        SyslogChannel(syslog_settings(free_port(), transport="tcp")).send(make_notice())
    assert caught.value.retryable is True


def test_syslog_udp_cuts_a_long_message_on_a_character_boundary(udp_receiver: socket.socket) -> None:
    long_body = "\n".join(f"{n}行目: 扉の状態が変わりました" for n in range(400))
    SyslogChannel(syslog_settings(udp_receiver.getsockname()[1])).send(make_notice(body=long_body))
    data, _sender = udp_receiver.recvfrom(65535)
    assert len(data) <= UDP_MAX_BYTES
    assert len(data) > UDP_MAX_BYTES - 4  # cut, not dropped: at most one UTF-8 character short
    message = parse_rfc5424(data)
    assert ("note", HOSTILE) in message.params  # the structured data survives whole
    assert message.msg[len(BOM) :].decode("utf-8").startswith(TITLE)  # strict decode: no split character


def test_syslog_drops_labels_from_the_end_when_they_alone_exceed_the_size() -> None:
    labels = {f"k{n}": "値" * 60 for n in range(40)}
    data = format_rfc5424(make_notice(labels=labels), syslog_settings(514), hostname="h", procid="1", max_bytes=2048)
    message = parse_rfc5424(data)
    assert len(data) <= 2048
    names = [name for name, _value in message.params]
    assert names[:5] == ["alert", "notification", "rule", "severity", "kind"]
    kept = names[5:]
    assert kept and kept == [f"k{n}" for n in range(len(kept))] and len(kept) < 40
    assert message.msg.startswith(BOM)


def test_syslog_header_fields_respect_rfc5424_limits_and_printable_ascii() -> None:
    data = format_rfc5424(
        make_notice(), syslog_settings(514, app_name="a" * 48), hostname="関所-" + "h" * 300, procid="p\x00" * 100
    )
    message = parse_rfc5424(data)
    assert len(message.hostname) == 255 and message.hostname.startswith("__-hhh")
    assert message.app_name == "a" * 48
    assert len(message.procid) == 128 and set(message.procid) == {"p", "_"}
    assert format_rfc5424(make_notice(), syslog_settings(514), hostname="", procid="").split(b" ")[2:5] == [
        b"-",
        b"sekisho",
        b"-",
    ]
    with pytest.raises(ValueError):
        syslog_settings(514, app_name="a" * 49)
    with pytest.raises(ValueError):
        syslog_settings(514, facility=24)


def test_syslog_label_keys_become_valid_sd_names_without_clobbering_the_fixed_ones() -> None:
    labels = {"rule": "label rule", "door id=1": "D-1", 'x"]y': "q", "端末": "T-1", "k" * 40: "long"}
    message = parse_rfc5424(format_rfc5424(make_notice(labels=labels), syslog_settings(514), hostname="h", procid="1"))
    params = dict(message.params)
    assert params["rule"] == "door_forced"
    assert params["rule_2"] == "label rule"
    assert params["door_id_1"] == "D-1"
    assert params["x__y"] == "q"
    assert params["__"] == "T-1"
    assert params["k" * 32] == "long"
    assert all(1 <= len(name) <= 32 for name in params)


def test_syslog_timestamp_keeps_the_offset_or_falls_back_to_utc() -> None:
    odd = timezone(timedelta(hours=5, minutes=30, seconds=15))  # RFC 3339 has no seconds in offsets
    data = format_rfc5424(
        make_notice(occurred_at=OCCURRED.astimezone(odd)), syslog_settings(514), hostname="h", procid="1"
    )
    stamp = parse_rfc5424(data).timestamp
    assert stamp.endswith("+00:00") and datetime.fromisoformat(stamp) == OCCURRED


# --- backoff and the notice ----------------------------------------------------------------------------------


def test_backoff_grows_is_capped_and_ends() -> None:
    delays = [backoff(n) for n in range(1, MAX_RETRIES + 1)]
    assert all(delay is not None for delay in delays)
    assert delays[:3] == [timedelta(seconds=30), timedelta(minutes=2), timedelta(minutes=8)]
    assert all(a is not None and b is not None and a <= b for a, b in itertools.pairwise(delays))
    assert max(d for d in delays if d is not None) == BACKOFF_CAP == timedelta(hours=1)
    assert backoff(MAX_RETRIES + 1) is None
    assert backoff(1000) is None
    assert [backoff(n) for n in range(1, MAX_RETRIES + 2)] == [*delays, None]  # deterministic
    with pytest.raises(ValueError):
        backoff(0)


@pytest.mark.parametrize(
    "changes",
    [{"occurred_at": datetime(2026, 12, 7, 8, 57)}, {"kind": "reopened"}, {"severity": "urgent"}],
)
def test_notice_refuses_what_the_channels_cannot_render(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_notice(**changes)


def test_notice_labels_are_frozen() -> None:
    labels = {"door": "D-1"}
    notice = make_notice(labels=labels)
    labels["door"] = "D-2"
    assert notice.labels["door"] == "D-1"
    with pytest.raises(TypeError):
        notice.labels["door"] = "D-3"  # type: ignore[index]
