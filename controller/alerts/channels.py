"""Notification channels for alerts: e-mail (SMTP), signed webhooks (HTTP POST) and syslog (RFC 5424).

Each channel sends one `Notice` to one destination and either returns (delivered, as far as the channel can
tell) or raises `DeliveryError`, whose ``retryable`` tells the delivery job whether to try again later (after
`backoff`) or to dead-letter the notification. A channel keeps no state between sends and writes no log: the
job that owns the outbox row records the outcome once. Only the standard library is used (the controller's
run-time set has no HTTP client library). Every connect, send and receive is bounded by the settings' timeout;
name resolution is the system resolver's and has its own limits.

Resending after a crash is expected: each wire format carries the notification's id so a receiver can
recognise a repeat (the e-mail Message-ID, the webhook's ``X-Sekisho-Delivery`` header and body, the syslog
structured data's ``notification`` parameter).

Webhook receivers check a request with `verify_webhook`: the signature is HMAC-SHA256 over
``f"{timestamp}.".encode() + body`` with the hook's shared secret, sent as ``X-Sekisho-Signature:
sha256=<hex>`` next to ``X-Sekisho-Timestamp`` (Unix seconds). Redirects are not followed: a 3xx answer is a
failure that is not retried, because the POST carries personal data (names in labels) and a signed body that
must not be replayed to wherever a ``Location`` points; the hook's URL has to be corrected instead.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr, parsedate_to_datetime
from hashlib import sha256
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, get_args
from urllib.parse import urlsplit

from sekisho.common.i18n import M_, _

NoticeKind = Literal["opened", "escalated", "retriggered", "resolved"]
NoticeSeverity = Literal["critical", "high", "medium", "low"]
NOTICE_KINDS: Final[tuple[str, ...]] = get_args(NoticeKind)
NOTICE_SEVERITIES: Final[tuple[str, ...]] = get_args(NoticeSeverity)

# --- retry schedule ----------------------------------------------------------------------------------------

# 30 s, 2 min, 8 min, 32 min, then hourly: a receiver that restarts is caught within a minute, an outage of
# a mail relay or SIEM is ridden out for about 6.7 hours before the notification is dead-lettered (by then
# the escalation chain has long moved on, and a person has to look at why a channel is down).
BACKOFF_FIRST: Final = timedelta(seconds=30)
BACKOFF_FACTOR: Final = 4
BACKOFF_CAP: Final = timedelta(hours=1)
MAX_RETRIES: Final = 10
# A receiver's Retry-After is honoured up to this much (a larger value would stall the notification).
RETRY_AFTER_CAP: Final = timedelta(hours=1)


def backoff(attempt: int) -> timedelta | None:
    """Return the delay before retry number `attempt` (1-based), or None once the retries are used up."""
    if attempt < 1:
        raise ValueError(f"retry numbers start at 1, not {attempt}")
    if attempt > MAX_RETRIES:
        return None
    # Deterministic on purpose (no jitter): the outbox job and its tests can predict the next attempt.
    growth: int = BACKOFF_FACTOR ** (attempt - 1)
    return min(BACKOFF_FIRST * growth, BACKOFF_CAP)


# --- the notice and the error ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """One notification about an alert, already worded in its recipient's language."""

    notification_id: int
    alert_id: int
    kind: NoticeKind
    rule: str
    severity: NoticeSeverity
    title: str
    body: str
    labels: Mapping[str, str]
    occurred_at: datetime
    url: str | None = None

    def __post_init__(self) -> None:
        """Refuse a notice the channels could not render faithfully, and freeze its labels."""
        if self.kind not in NOTICE_KINDS:
            raise ValueError(f"unknown notice kind {self.kind!r}")
        if self.severity not in NOTICE_SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        if self.occurred_at.tzinfo is None or self.occurred_at.utcoffset() is None:
            raise ValueError("occurred_at must be timezone-aware")
        labels = dict(self.labels)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("labels map text to text")
        object.__setattr__(self, "labels", MappingProxyType(labels))


class DeliveryError(Exception):
    """A notice was not delivered; ``retryable`` says whether trying again later may succeed.

    ``code`` keeps the SMTP reply code or HTTP status when there was one; ``retry_after`` is the delay a
    receiver asked for (HTTP Retry-After, capped), for the job to wait at least that long. The text never
    holds a secret: no password, no HMAC key, no webhook path or query (such URLs often embed a token).
    """

    def __init__(
        self, reason: str, *, retryable: bool, code: int | None = None, retry_after: timedelta | None = None
    ) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.code = code
        self.retry_after = retry_after


# --- shared helpers ----------------------------------------------------------------------------------------

# Bytes of a receiver's answer kept for the error text, and characters of it shown.
_REPLY_READ: Final = 1024
_REPLY_SHOWN: Final = 200


def _printable(text: str, limit: int = _REPLY_SHOWN) -> str:
    """One line of shown text: control characters become spaces, runs of blanks one space, then cut."""
    cleaned = "".join(" " if (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0) else ch for ch in text)
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _aware_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now


def _tls_context(cafile: Path | None) -> ssl.SSLContext:
    # The system's trust store, or only the given CA (an internal relay or receiver); hostnames checked.
    return ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)


def _host_ok(host: str) -> bool:
    return bool(host) and all(0x21 <= ord(ch) < 0x7F for ch in host)


def _port_ok(port: int) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536


def _network_error_text(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return _printable(f"{type(err).__name__}: {err.strerror}")
    return _printable(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


# --- e-mail ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    """Where and how alert e-mail is handed to a mail relay."""

    host: str
    port: int
    sender: str  # the From address, optionally with a display name: "Sekisho <alerts@example.jp>"
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0
    helo: str | None = None  # the EHLO name; None: this host's fully qualified name (smtplib's default)
    tls_cafile: Path | None = None  # trust only this CA for STARTTLS; None: the system's trust store

    def __post_init__(self) -> None:
        """Refuse settings that could not work, or that would send a password in clear text."""
        if not _host_ok(self.host) or not _port_ok(self.port):
            raise ValueError(_("the SMTP server needs a host name and a port between 1 and 65535"))
        if not _sender_domain(self.sender):
            raise ValueError(
                _("the alert e-mail sender must be an address with a domain, not %(sender)s", sender=repr(self.sender))
            )
        if (self.username is None) != (self.password is None):
            raise ValueError(_("the SMTP user name and password go together: set both or neither"))
        if self.username is not None and not self.starttls:
            raise ValueError(_("SMTP login needs starttls: the password would cross the network in clear text"))
        if not self.timeout_s > 0:
            raise ValueError(_("timeouts must be positive"))


def _sender_domain(sender: str) -> str:
    """Return the domain of the sender's address ('' if it has none), as ASCII (IDNA) for the Message-ID."""
    _name, addr = parseaddr(sender)
    local, at, domain = addr.rpartition("@")
    if not (local and at and domain) or not all(ch.isalnum() or ch in ".-" for ch in domain):
        return ""
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return ""


def message_id(notification_id: int, sender: str) -> str:
    """Return the Message-ID of a notification's e-mail: the same on every resend, so a repeat is recognisable."""
    return f"<sekisho.notification.{notification_id}@{_sender_domain(sender)}>"


def _one_line(text: str) -> str:
    # A header value never carries a line break (no header injection from alert text or contact names).
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def compose_email(
    notice: Notice, settings: SmtpSettings, to: str, name: str | None = None, *, now: datetime | None = None
) -> EmailMessage:
    """Build the e-mail for a notice: UTF-8 subject and body, stable Message-ID, sekisho headers."""
    domain = _sender_domain(settings.sender)
    sender_name, sender_addr = parseaddr(settings.sender)
    try:
        recipient = Address(display_name=_one_line(name or ""), addr_spec=to)
        sender = Address(display_name=_one_line(sender_name), addr_spec=sender_addr)
    except (HeaderParseError, ValueError, IndexError) as err:
        raise DeliveryError(M_("invalid e-mail address %(to)s", to=repr(to)), retryable=False) from err
    if recipient.addr_spec != to or not recipient.domain:
        raise DeliveryError(M_("invalid e-mail address %(to)s", to=repr(to)), retryable=False)
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = _one_line(notice.title)
    message["Date"] = format_datetime(_aware_now(now))
    message["Message-ID"] = message_id(notice.notification_id, settings.sender)
    # Every notice about one alert points at the same (virtual) thread root, so mail clients group them.
    message["References"] = f"<sekisho.alert.{notice.alert_id}@{domain}>"
    # RFC 3834: vacation responders and auto-replies stay quiet.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Sekisho-Alert"] = str(notice.alert_id)
    message["X-Sekisho-Notification"] = str(notice.notification_id)
    message["X-Sekisho-Severity"] = notice.severity
    message["X-Sekisho-Kind"] = notice.kind
    message["X-Sekisho-Rule"] = _one_line(notice.rule)
    text = notice.body.rstrip("\n") + "\n"
    if notice.url:
        text += "\n" + notice.url + "\n"
    # base64 for non-ASCII text: an old relay without 8BITMIME would otherwise mangle Japanese.
    message.set_content(text, charset="utf-8", cte=None if text.isascii() else "base64")
    return message


class EmailChannel:
    """Send notices by e-mail through one SMTP relay, one recipient per message."""

    def __init__(self, settings: SmtpSettings) -> None:
        """Keep the relay's settings and prepare the TLS context once."""
        self._settings = settings
        self._tls = _tls_context(settings.tls_cafile) if settings.starttls else None

    @property
    def server(self) -> str:
        """Return host:port of the relay, for messages."""
        return f"{self._settings.host}:{self._settings.port}"

    def send(self, notice: Notice, to: str, name: str | None = None, *, now: datetime | None = None) -> None:
        """Hand the notice's e-mail to the relay for one recipient; raise DeliveryError if it was not accepted."""
        settings = self._settings
        message = compose_email(notice, settings, to, name, now=now)
        _sender_name, envelope_from = parseaddr(settings.sender)
        client: smtplib.SMTP | None = None
        try:
            client = smtplib.SMTP(
                settings.host, settings.port, local_hostname=settings.helo, timeout=settings.timeout_s
            )
            client.ehlo()
            if self._tls is not None:
                client.starttls(context=self._tls)
                client.ehlo()
            if settings.username is not None and settings.password is not None:
                self._login(client, settings.username, settings.password)
            client.send_message(message, from_addr=envelope_from, to_addrs=[to])
        except DeliveryError:
            raise
        except smtplib.SMTPRecipientsRefused as err:
            code, reply = next(iter(err.recipients.values()), (0, b""))
            raise DeliveryError(
                M_(
                    "SMTP %(server)s refused the recipient %(to)s: %(code)s %(reply)s",
                    server=self.server,
                    to=to,
                    code=code,
                    reply=self._shown(reply),
                ),
                retryable=_smtp_retryable(code),
                code=code,
            ) from err
        except smtplib.SMTPResponseException as err:
            raise DeliveryError(
                M_(
                    "SMTP %(server)s answered %(code)s %(reply)s",
                    server=self.server,
                    code=err.smtp_code,
                    reply=self._shown(err.smtp_error),
                ),
                retryable=_smtp_retryable(err.smtp_code),
                code=err.smtp_code,
            ) from err
        except smtplib.SMTPServerDisconnected as err:
            raise self._network_error(err) from err
        except smtplib.SMTPException as err:
            # Missing STARTTLS or AUTH support, no common AUTH mechanism: the relay or the settings must change.
            raise DeliveryError(
                M_("SMTP %(server)s: %(error)s", server=self.server, error=self._shown(str(err))), retryable=False
            ) from err
        except ssl.SSLCertVerificationError as err:
            raise DeliveryError(
                M_(
                    "%(server)s: certificate not trusted (%(error)s)",
                    server=self.server,
                    error=_printable(err.verify_message or str(err)),
                ),
                retryable=False,
            ) from err
        except OSError as err:  # refused, unreachable, timed out, name not resolved, TLS cut short
            raise self._network_error(err) from err
        finally:
            if client is not None:
                _quit_quietly(client)

    def _login(self, client: smtplib.SMTP, username: str, password: str) -> None:
        try:
            client.login(username, password)
        except smtplib.SMTPAuthenticationError as err:
            # Neither the server's reply nor the original exception is kept: a server may echo what it was sent.
            raise DeliveryError(
                M_("SMTP %(server)s refused the login (%(code)s)", server=self.server, code=err.smtp_code),
                retryable=_smtp_retryable(err.smtp_code),
                code=err.smtp_code,
            ) from None

    def _shown(self, reply: bytes | str) -> str:
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
        if self._settings.password:
            text = text.replace(self._settings.password, "[redacted]")
        return _printable(text)

    def _network_error(self, err: BaseException) -> DeliveryError:
        return DeliveryError(
            M_(
                "%(server)s: no connection or the connection failed (%(error)s)",
                server=self.server,
                error=_network_error_text(err),
            ),
            retryable=True,
        )


def _smtp_retryable(code: int) -> bool:
    # RFC 5321: 5yz is a permanent refusal, 4yz a transient one; anything else (smtplib's -1) is treated
    # as a broken conversation, which a later attempt may not have.
    return not 500 <= code <= 599


def _quit_quietly(client: smtplib.SMTP) -> None:
    # After the relay accepted the message, a failing QUIT must not turn delivery into a failure (and a resend).
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


# --- webhooks ----------------------------------------------------------------------------------------------

WEBHOOK_VERSION: Final = 1
# A shorter HMAC key could be guessed offline from one signed request.
MIN_WEBHOOK_SECRET: Final = 16
DELIVERY_HEADER: Final = "X-Sekisho-Delivery"
TIMESTAMP_HEADER: Final = "X-Sekisho-Timestamp"
SIGNATURE_HEADER: Final = "X-Sekisho-Signature"
USER_AGENT: Final = "sekisho-alerts/1"


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """One named webhook receiver: its URL and the shared secret that signs every request."""

    url: str = field(repr=False)  # often holds a token in its path: kept out of repr and error texts
    secret: bytes = field(repr=False)
    timeout_s: float = 10.0
    tls_cafile: Path | None = None  # trust only this CA for https; None: the system's trust store

    def __post_init__(self) -> None:
        """Refuse a URL that is not plain http(s) to a host, a short secret or a non-positive timeout."""
        try:
            parts = urlsplit(self.url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or not _host_ok(parts.hostname)
            or parts.username is not None
            or parts.password is not None
            or (port is not None and not _port_ok(port))
        ):
            raise ValueError(_("a webhook URL must be http:// or https:// with a host and no user name or password"))
        if len(self.secret) < MIN_WEBHOOK_SECRET:
            raise ValueError(_("a webhook secret must be at least %(size)s bytes", size=MIN_WEBHOOK_SECRET))
        if not self.timeout_s > 0:
            raise ValueError(_("timeouts must be positive"))

    @property
    def origin(self) -> str:
        """Return scheme://host:port of the URL, the part safe to show."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"


def webhook_body(notice: Notice) -> bytes:
    """Return the webhook's JSON body for a notice: compact UTF-8, keys in a fixed order."""
    payload = {
        "v": WEBHOOK_VERSION,
        "notification": notice.notification_id,
        "alert": notice.alert_id,
        "kind": notice.kind,
        "rule": notice.rule,
        "severity": notice.severity,
        "title": notice.title,
        "body": notice.body,
        "labels": dict(notice.labels),
        "occurred_at": notice.occurred_at.isoformat(),
        "url": notice.url,
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sign_webhook(secret: bytes, timestamp: int, body: bytes) -> str:
    """Return the X-Sekisho-Signature value: "sha256=" and the hex HMAC-SHA256 of "<timestamp>." + body."""
    return "sha256=" + hmac.new(secret, f"{timestamp}.".encode("ascii") + body, sha256).hexdigest()


def verify_webhook(
    secret: bytes, headers: Mapping[str, str], body: bytes, *, now: datetime, tolerance_s: int = 300
) -> bool:
    """Tell whether a received webhook request is genuine, fresh and names the notification its body holds.

    For receivers. Header names are matched without regard to case; a header that is missing or given twice,
    a timestamp further than `tolerance_s` from `now` (either way), a signature that does not match (compared
    in constant time), or an X-Sekisho-Delivery that differs from the body's notification id: False.
    Dedupe on the delivery id (a resend carries the same id), which also stops a replay within the window.
    """
    if tolerance_s <= 0:
        raise ValueError("tolerance_s must be positive")
    seen: dict[str, list[str]] = {}
    for key, value in headers.items():
        seen.setdefault(key.lower(), []).append(value)
    wanted = {}
    for name in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
        values = seen.get(name.lower(), [])
        if len(values) != 1:
            return False
        wanted[name] = values[0].strip()
    stamp = wanted[TIMESTAMP_HEADER]
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        return False
    if abs(_aware_now(now).timestamp() - int(stamp)) > tolerance_s:
        return False
    given = wanted[SIGNATURE_HEADER]
    if not given.isascii():
        return False
    expected = sign_webhook(secret, int(stamp), body)
    if not hmac.compare_digest(expected.encode("ascii"), given.encode("ascii")):
        return False
    # The delivery header is not signed: tie it to the signed body, or a replay under a new id slips past dedupe.
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    notification = payload.get("notification") if isinstance(payload, dict) else None
    return isinstance(notification, int) and wanted[DELIVERY_HEADER] == str(notification)


def _retry_after(value: str | None, now: datetime) -> timedelta | None:
    """Read Retry-After (seconds or an HTTP date), capped; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        delay = timedelta(seconds=int(value[:7]))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delay = max(when - now, timedelta(0))
    return min(delay, RETRY_AFTER_CAP)


def _webhook_retryable(status: int) -> bool:
    # 408 and 429 ask to come back later, 5xx is the receiver's trouble; other 4xx will not change by waiting.
    return status in (408, 429) or 500 <= status <= 599


class WebhookChannel:
    """POST signed notices to named webhook receivers."""

    def __init__(self, hooks: Mapping[str, WebhookSettings]) -> None:
        """Keep the named receivers and prepare a TLS context for each https one."""
        self._hooks = dict(hooks)
        self._tls = {
            name: _tls_context(hook.tls_cafile)
            for name, hook in self._hooks.items()
            if urlsplit(hook.url).scheme == "https"
        }

    def send(self, notice: Notice, hook: str, *, now: datetime | None = None) -> None:
        """POST the notice to the named hook; return on 2xx, raise DeliveryError otherwise."""
        settings = self._hooks.get(hook)
        if settings is None:
            raise DeliveryError(M_("no webhook named %(hook)s is configured", hook=repr(hook)), retryable=False)
        moment = _aware_now(now)
        timestamp = int(moment.timestamp())
        body = webhook_body(notice)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            DELIVERY_HEADER: str(notice.notification_id),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign_webhook(settings.secret, timestamp, body),
            "Connection": "close",
        }
        parts = urlsplit(settings.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        where = f"{hook!r} ({settings.origin})"
        # The port always explicit: http.client would read the last group of a bare IPv6 address as one.
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=settings.timeout_s, context=self._tls[hook])
        else:
            connection = http.client.HTTPConnection(host, port, timeout=settings.timeout_s)
        try:
            connection.request("POST", target, body=body, headers=headers)
            response = connection.getresponse()
            status = response.status
            if 200 <= status <= 299:
                return  # the body is not needed: it is not read, so a slow or endless answer cannot hold us
            reply = _read_reply(response)
            if 300 <= status <= 399:
                raise DeliveryError(
                    M_(
                        "webhook %(hook)s redirects to %(location)s (HTTP %(status)s): not followed, correct its URL",
                        hook=where,
                        status=status,
                        location=_location_origin(response.getheader("Location"), settings.origin),
                    ),
                    retryable=False,
                    code=status,
                )
            retryable = _webhook_retryable(status)
            raise DeliveryError(
                M_("webhook %(hook)s answered HTTP %(status)s %(reply)s", hook=where, status=status, reply=reply),
                retryable=retryable,
                code=status,
                retry_after=_retry_after(response.getheader("Retry-After"), moment) if retryable else None,
            )
        except DeliveryError:
            raise
        except ssl.SSLCertVerificationError as err:
            raise DeliveryError(
                M_(
                    "%(server)s: certificate not trusted (%(error)s)",
                    server=where,
                    error=_printable(err.verify_message or str(err)),
                ),
                retryable=False,
            ) from err
        except (OSError, http.client.HTTPException) as err:  # refused, timed out, cut off, not HTTP
            raise DeliveryError(
                M_(
                    "%(server)s: no connection or the connection failed (%(error)s)",
                    server=where,
                    error=_network_error_text(err),
                ),
                retryable=True,
            ) from err
        finally:
            connection.close()


def _read_reply(response: http.client.HTTPResponse) -> str:
    """Return the start of an error answer's body for the error text; never wait past the socket timeout."""
    try:
        data = response.read(_REPLY_READ)
    except (OSError, http.client.HTTPException):
        return ""
    return _printable(data.decode("utf-8", "replace"))


def _location_origin(location: str | None, own_origin: str) -> str:
    # Only the origin: a Location's path may hold a token as much as the hook's own URL does.
    if not location:
        return "?"
    parts = urlsplit(location.strip())
    if not parts.netloc:
        return own_origin
    return _printable(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", 100)


# --- syslog ------------------------------------------------------------------------------------------------

# RFC 5424 severities: critical -> 2 (crit), high -> 3 (err), medium -> 4 (warning), low -> 5 (notice).
SYSLOG_SEVERITY: Final[Mapping[str, int]] = MappingProxyType({"critical": 2, "high": 3, "medium": 4, "low": 5})
# authpriv (10), "security/authorization messages" like auth (4), but for messages that name people:
# classic syslog set-ups keep authpriv in a restricted file (RHEL: /var/log/secure only) whereas auth also
# lands in the general log. Alerts carry person names in their labels.
FACILITY_AUTHPRIV: Final = 10
# The SD-ID's enterprise number is 32473, the one RFC 5612 reserves for documentation and examples; a site
# that registers its own Private Enterprise Number should put it here.
SD_ID: Final = "sekisho@32473"
BOM: Final = b"\xef\xbb\xbf"
# RFC 5426: every receiver takes 2048-byte datagrams (480 is the floor; bigger may be fragmented or dropped).
UDP_MAX_BYTES: Final = 2048
# rsyslog's default maxMessageSize; syslog-ng takes more, but a longer frame could be cut by the receiver.
TCP_MAX_BYTES: Final = 8192
# RFC 5424, section 6: field lengths.
_HEADER_LIMITS: Final = {"hostname": 255, "app_name": 48, "procid": 128, "msgid": 32}
_SD_NAME_MAX: Final = 32
_FIXED_PARAMS: Final = ("alert", "notification", "rule", "severity", "kind")


@dataclass(frozen=True, kw_only=True)
class SyslogSettings:
    """A syslog receiver (a SIEM or a relay) and how to label the messages sent to it."""

    host: str
    port: int
    transport: Literal["udp", "tcp"] = "udp"
    app_name: str = "sekisho"
    hostname: str | None = None  # None: this host's name
    facility: int = FACILITY_AUTHPRIV
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        """Refuse settings a receiver could not take."""
        if not _host_ok(self.host) or not _port_ok(self.port):
            raise ValueError(_("the syslog receiver needs a host name and a port between 1 and 65535"))
        if self.transport not in ("udp", "tcp"):
            raise ValueError(_("the syslog transport is udp or tcp, not %(transport)s", transport=repr(self.transport)))
        if not (isinstance(self.facility, int) and 0 <= self.facility <= 23):
            raise ValueError(_("a syslog facility is a number from 0 to 23"))
        if not (_host_ok(self.app_name) and len(self.app_name) <= _HEADER_LIMITS["app_name"]):
            raise ValueError(_("the syslog app name must be 1 to 48 printable ASCII characters"))
        if not self.timeout_s > 0:
            raise ValueError(_("timeouts must be positive"))


def _header_field(value: str, limit: int) -> str:
    """A header field: printable ASCII only (others become '_'), at most `limit` characters, '-' if empty."""
    cleaned = "".join(ch if 0x21 <= ord(ch) <= 0x7E else "_" for ch in value)[:limit]
    return cleaned or "-"


def _sd_name(key: str) -> str:
    """An SD-NAME: printable ASCII except '=', space, ']' and '"', 1 to 32 characters."""
    cleaned = "".join(ch if 0x21 <= ord(ch) <= 0x7E and ch not in '= ]"' else "_" for ch in key)[:_SD_NAME_MAX]
    return cleaned or "_"


def _sd_value(value: str) -> str:
    """A PARAM-VALUE: '\\', '"' and ']' escaped; control characters (line breaks) become spaces."""
    text = "".join(" " if (ord(ch) < 0x20 or ord(ch) == 0x7F) else ch for ch in value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _label_params(labels: Mapping[str, str]) -> list[tuple[str, str]]:
    """Label keys made SD-NAMEs; a key that collides with another (or a fixed parameter) gets a suffix."""
    taken = set(_FIXED_PARAMS)
    params = []
    for key, value in labels.items():
        name = _sd_name(key)
        if name in taken:
            stem, n = name, 2
            while name in taken:
                suffix = f"_{n}"
                name = stem[: _SD_NAME_MAX - len(suffix)] + suffix
                n += 1
        taken.add(name)
        params.append((name, value))
    return params


def _rfc3339(moment: datetime) -> str:
    offset = moment.utcoffset()
    if offset is None or offset % timedelta(minutes=1):
        moment = moment.astimezone(UTC)  # RFC 3339 offsets are whole minutes
    return moment.isoformat()


def _cut_utf8(data: bytes, size: int) -> bytes:
    """The longest prefix of at most `size` bytes that does not split a UTF-8 character."""
    if len(data) <= size:
        return data
    cut = max(size, 0)
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut]


def _message_text(notice: Notice) -> str:
    lines = [notice.title, *(line.strip() for line in notice.body.splitlines())]
    if notice.url:
        lines.append(notice.url)
    # One line: a receiver splitting on newlines would otherwise make several records of one message.
    return " | ".join(_one_line(line) for line in lines if line.strip())


def format_rfc5424(
    notice: Notice, settings: SyslogSettings, *, hostname: str, procid: str, max_bytes: int | None = None
) -> bytes:
    """Render a notice as one RFC 5424 message; with max_bytes, drop labels from the end, then cut the text."""
    pri = settings.facility * 8 + SYSLOG_SEVERITY[notice.severity]
    header = " ".join(
        (
            f"<{pri}>1",
            _rfc3339(notice.occurred_at),
            _header_field(hostname, _HEADER_LIMITS["hostname"]),
            _header_field(settings.app_name, _HEADER_LIMITS["app_name"]),
            _header_field(procid, _HEADER_LIMITS["procid"]),
            _header_field(f"alert.{notice.kind}", _HEADER_LIMITS["msgid"]),
        )
    ).encode("ascii")
    fixed = [
        ("alert", str(notice.alert_id)),
        ("notification", str(notice.notification_id)),
        ("rule", notice.rule),
        ("severity", notice.severity),
        ("kind", notice.kind),
    ]
    labels = _label_params(notice.labels)
    text = BOM + _message_text(notice).encode("utf-8", "replace")

    def element(params: list[tuple[str, str]]) -> bytes:
        inner = " ".join(f'{name}="{_sd_value(value)}"' for name, value in params)
        return f"[{SD_ID} {inner}]".encode("utf-8", "replace")

    sd = element(fixed + labels)
    if max_bytes is not None:
        # Keep the structured data a SIEM parses, and at least the BOM and a little text, before the labels.
        room_for_text = len(BOM) + 64
        while labels and len(header) + len(sd) + 2 + room_for_text > max_bytes:
            labels.pop()
            sd = element(fixed + labels)
        text = _cut_utf8(text, max_bytes - len(header) - len(sd) - 2)
        if len(text) < len(BOM):
            text = b""
    return header + b" " + sd + (b" " + text if text else b"")


class SyslogChannel:
    """Send notices to a syslog receiver as RFC 5424 messages over UDP or TCP (octet-counted frames)."""

    def __init__(self, settings: SyslogSettings) -> None:
        """Keep the receiver's settings."""
        self._settings = settings

    def send(self, notice: Notice) -> None:
        """Send one message; over UDP "sent" is all that can be known, over TCP the frame reached the socket."""
        settings = self._settings
        hostname = settings.hostname or socket.gethostname()
        where = f"syslog {settings.transport}://{settings.host}:{settings.port}"
        try:
            if settings.transport == "udp":
                message = format_rfc5424(
                    notice, settings, hostname=hostname, procid=str(os.getpid()), max_bytes=UDP_MAX_BYTES
                )
                self._send_udp(message)
            else:
                message = format_rfc5424(
                    notice, settings, hostname=hostname, procid=str(os.getpid()), max_bytes=TCP_MAX_BYTES
                )
                # RFC 6587 octet counting (as RFC 5425 frames it over TLS): "LEN SP MSG", no trailer.
                self._send_tcp(str(len(message)).encode("ascii") + b" " + message)
        except OSError as err:
            raise DeliveryError(
                M_(
                    "%(server)s: no connection or the connection failed (%(error)s)",
                    server=where,
                    error=_network_error_text(err),
                ),
                retryable=True,
            ) from err

    def _send_udp(self, message: bytes) -> None:
        settings = self._settings
        family, kind, proto, _name, address = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_DGRAM)[
            0
        ]
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(settings.timeout_s)
            sock.sendto(message, address)

    def _send_tcp(self, frame: bytes) -> None:
        settings = self._settings
        with socket.create_connection((settings.host, settings.port), timeout=settings.timeout_s) as sock:
            sock.sendall(frame)
