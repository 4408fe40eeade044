"""Delivery: the job that drains the notification outbox through the channels, with retries and a dead-letter list.

A round claims due notifications (``pending``, due, no live lease) by setting a short lease in its own
transaction, sends each one outside any transaction (an SMTP server or a webhook may take seconds), and
records the outcome: ``sent``, a retry at the channel's back-off, or ``dead`` once the retries are used up or
the failure is permanent. A controller killed between sending and recording sends that notification again
when the lease runs out: at least once, with the same e-mail Message-ID and webhook delivery id, so a
receiver recognises the repeat. Dead notifications stay listed (console, API) and can be replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from sekisho.common.i18n import as_lang
from sekisho.controller.alerts import book, texts
from sekisho.controller.alerts.channels import (
    DeliveryError,
    EmailChannel,
    Notice,
    SmtpSettings,
    SyslogChannel,
    SyslogSettings,
    WebhookChannel,
    WebhookSettings,
    backoff,
)
from sekisho.controller.alerts.escalate import NOTIFICATIONS
from sekisho.controller.config import AlertsConfig
from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.store.audit import SYSTEM, Operator, append_admin
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=120)
CLAIM_LIMIT = 50
_ALERTS = book.ALERTS


@dataclass
class Channels:
    """The configured channels; a notification for one that is not configured fails permanently."""

    email: EmailChannel | None = None
    webhooks: WebhookChannel | None = None
    syslog: SyslogChannel | None = None

    @classmethod
    def from_config(cls, config: AlertsConfig) -> Channels:
        """Build the channels of ``[alerts]`` (secrets read from their files now, never logged)."""
        email = None
        if config.smtp is not None:
            smtp = config.smtp
            password = smtp.password_file.read_text(encoding="utf-8").strip() if smtp.password_file else None
            email = EmailChannel(
                SmtpSettings(
                    host=smtp.host,
                    port=smtp.port,
                    sender=smtp.sender,
                    starttls=smtp.starttls,
                    username=smtp.username,
                    password=password,
                    timeout_s=smtp.timeout_s,
                    tls_cafile=smtp.tls_cafile,
                )
            )
        hooks = {
            name: WebhookSettings(
                url=hook.url,
                secret=hook.secret_file.read_bytes().strip(),
                timeout_s=hook.timeout_s,
                tls_cafile=hook.tls_cafile,
            )
            for name, hook in config.webhooks.items()
        }
        syslog = None
        if config.syslog is not None:
            s = config.syslog
            syslog = SyslogChannel(
                SyslogSettings(
                    host=s.host, port=s.port, transport=s.transport, facility=s.facility, app_name=s.app_name
                )
            )
        return cls(email, WebhookChannel(hooks) if hooks else None, syslog)


def _notice(row: Any, alert: Any, console_url: str | None) -> Notice:
    lang = as_lang(row.language)
    labels = {str(k): str(v) for k, v in dict(alert.labels or {}).items()}
    url = f"{console_url.rstrip('/')}/console/alerts/{alert.id}" if console_url else None
    subject, body = texts.notification_text(
        lang, row.kind, alert.rule, alert.severity, labels, int(alert.n), alert.first_at, url
    )
    return Notice(
        notification_id=int(row.id),
        alert_id=int(alert.id),
        kind=row.kind,
        rule=alert.rule,
        severity=alert.severity,
        title=subject,
        body=body,
        labels=labels,
        occurred_at=alert.first_at,
        url=url,
    )


class DeliveryJob(PeriodicJob):
    """Sends what the outbox holds, every ``every_s`` seconds."""

    name = "alert delivery"
    # Not leader-only: a notification is claimed under a lease (FOR UPDATE SKIP LOCKED on PostgreSQL, the
    # writer lock on SQLite) before it is sent, so several senders never send one twice, and a slow channel
    # in one process does not hold the others back. A sender that dies mid-send leaves its claim to expire.
    leader_only = False

    def __init__(
        self,
        store: Store,
        channels: Channels,
        *,
        console_url: str | None = None,
        every_s: float = 0.5,
        clock: Callable[[], datetime] = timefmt.now,
    ) -> None:
        """Drain ``store``'s notification outbox through ``channels``."""
        self.store = store
        self.channels = channels
        self.console_url = console_url
        self.every_s = every_s
        self.clock = clock
        super().__init__()

    def run_once(self) -> None:
        """Send every notification due now (several rounds in one when there are many)."""
        while self.deliver() == CLAIM_LIMIT and not self._stop.is_set():
            pass

    def deliver(self) -> int:
        """Claim, send and record one batch of due notifications; return how many were claimed."""
        claimed = self._claim()
        for row, alert in claimed:
            outcome: DeliveryError | None = None
            try:
                self._send(row, alert)
            except DeliveryError as err:
                outcome = err
            except Exception as err:  # a channel bug must not stop the others: recorded and retried
                log.exception("alert notification %s failed unexpectedly", row.id)
                outcome = DeliveryError(f"unexpected: {type(err).__name__}", retryable=True)
            self._record(row, outcome)
        return len(claimed)

    def _claim(self) -> list[tuple[Any, Any]]:
        now = self.clock()
        n, a = NOTIFICATIONS.c, _ALERTS.c
        due = (n.state == "pending", n.next_at <= now, or_(n.lease_until.is_(None), n.lease_until <= now))
        with self.store.engine.connect() as conn:
            # Usually nothing is due: a read says so without SQLite's writer lock (ingest needs it).
            if conn.execute(select(n.id).where(*due).limit(1)).first() is None:
                return []
        with write_transaction(self.store.engine) as conn:
            rows = conn.execute(
                select(*NOTIFICATIONS.columns)
                .where(*due)
                .order_by(n.next_at, n.id)
                .limit(CLAIM_LIMIT)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            ids = [r.id for r in rows]
            conn.execute(update(NOTIFICATIONS).where(n.id.in_(ids)).values(lease_until=now + LEASE))
            alerts = {
                r.id: r
                for r in conn.execute(
                    select(a.id, a.rule, a.severity, a.labels, a.count.label("n"), a.first_at).where(
                        a.id.in_({r.alert_id for r in rows})
                    )
                )
            }
        return [(r, alerts[r.alert_id]) for r in rows]

    def _send(self, row: Any, alert: Any) -> None:
        notice = _notice(row, alert, self.console_url)
        if row.channel == "email":
            if self.channels.email is None:
                raise DeliveryError("no SMTP relay is configured ([alerts.smtp])", retryable=False)
            self.channels.email.send(notice, row.target, now=self.clock())
        elif row.channel == "webhook":
            if self.channels.webhooks is None:
                raise DeliveryError("no webhook is configured ([alerts.webhooks])", retryable=False)
            self.channels.webhooks.send(notice, row.target, now=self.clock())
        elif row.channel == "syslog":
            if self.channels.syslog is None:
                raise DeliveryError("no syslog receiver is configured ([alerts.syslog])", retryable=False)
            self.channels.syslog.send(notice)
        else:
            raise DeliveryError(f"unknown channel {row.channel!r}", retryable=False)

    def _record(self, row: Any, error: DeliveryError | None) -> None:
        now = self.clock()
        n = NOTIFICATIONS.c
        attempts = int(row.attempts) + 1
        values: dict[str, Any] = {"attempts": attempts, "lease_until": None}
        action = None
        if error is None:
            values |= {"state": "sent", "sent_at": now, "last_error": None}
            action = "alert.notified"
        else:
            delay = backoff(attempts) if error.retryable else None
            if delay is not None and error.retry_after is not None:
                delay = max(delay, error.retry_after)
            if delay is None:
                values |= {"state": "dead", "last_error": str(error)[:500]}
                action = "alert.notification_dead"
            else:
                values |= {"next_at": now + delay, "last_error": str(error)[:500]}
        with write_transaction(self.store.engine) as conn:
            conn.execute(update(NOTIFICATIONS).where(n.id == row.id, n.state == "pending").values(**values))
            if action is not None:
                detail = {"notification": row.id, "channel": row.channel, "contact": row.contact, "kind": row.kind}
                detail |= {"attempts": attempts, "error": values.get("last_error")}
                append_admin(
                    conn, self.store.signing_key, SYSTEM.action(action, f"alert:{row.alert_id}", detail=detail), now
                )


def replay(store: Store, notification_id: int, who: Operator, now: datetime | None = None) -> None:
    """Put a dead notification back in the outbox (recorded); it is sent at the next delivery round."""
    moment = now or timefmt.now()
    n = NOTIFICATIONS.c
    with write_transaction(store.engine) as conn:
        row = conn.execute(select(n.alert_id, n.state).where(n.id == notification_id).with_for_update()).first()
        if row is None or row.state != "dead":
            raise book.AlertRefused(f"notification {notification_id} is not in the dead-letter list", "not_dead")
        conn.execute(
            update(NOTIFICATIONS)
            .where(n.id == notification_id)
            .values(state="pending", attempts=0, next_at=moment, lease_until=None)
        )
        entry = who.action(
            "alert.notification_replayed", f"alert:{row.alert_id}", detail={"notification": notification_id}
        )
        append_admin(conn, store.signing_key, entry, moment)


def dead_letters(store: Store, limit: int = 200) -> list[Any]:
    """Return the notifications that could not be delivered, newest first."""
    n = NOTIFICATIONS.c
    with store.engine.connect() as conn:
        return list(
            conn.execute(select(*NOTIFICATIONS.columns).where(n.state == "dead").order_by(n.id.desc()).limit(limit))
        )
