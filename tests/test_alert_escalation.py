"""Alert escalation end to end: signed events in, e-mail and webhooks out, minute by minute on a test clock.

The alert engine and the delivery job run as the controller runs them (follow, sweep, escalate, deliver),
on a store holding the demo site's policy with an alerts section (tests/alert_fixtures.py), against a real
aiosmtpd server and a real HTTP receiver on loopback. Both jobs read the same test clock, so a test moves
time a minute at a time and sees exactly which mail left at which minute. The last test runs the real
controller process (`controller serve` on a real broker, the alarm published as the door agent would) and
SIGKILLs it between two steps of a chain.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from alert_fixtures import (
    ESCALATION_ALERTS,
    RESTART_ALERTS,
    SENDER,
    SOCKET_TIMEOUT,
    WEBHOOK_SECRET,
    HookReceiver,
    Mail,
    Mailbox,
    alert_policy,
    policy_text,
    smtp_server,
)
from reports_fixtures import JST, Site
from sqlalchemy import select
from support.mqtt import connect_client
from support.site import Site as PipelineSite
from support.site import wait_for

from sekisho.controller.alerts import book
from sekisho.controller.alerts.channels import (
    EmailChannel,
    SmtpSettings,
    WebhookChannel,
    WebhookSettings,
    backoff,
    message_id,
)
from sekisho.controller.alerts.delivery import Channels, DeliveryJob, dead_letters, replay
from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store
from sekisho.controller.store.audit import Operator
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import AdminAuditEntry, Alert, AlertNotification
from sekisho.deploy.pki import AgentCredentials
from sekisho.protocol import signing, topics
from sekisho.protocol.catalogue import DoorAlarm, UsbBlocked
from sekisho.protocol.events import build_event

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

GUARD = "guard@example.invalid"
NIGHT = "night@example.invalid"
HOLIDAY = "holiday@example.invalid"
LEAD = "lead@example.invalid"
MANAGER = "manager@example.invalid"
# Tuesday 17 November 2026, 10:00 JST: inside the demo's office hours (s-office, weekdays 08:00-20:00).
T = datetime(2026, 11, 17, 10, 0, tzinfo=JST)
KEIBI = Operator("user:keibi.hanako", "web", "192.0.2.10")


@dataclass
class Desk:
    """The demo site's store with the controller's alert jobs on one test clock, and where their output lands."""

    site: Site
    engine: AlertEngine
    delivery: DeliveryJob
    mailbox: Mailbox
    hooks: HookReceiver

    @property
    def store(self) -> Store:
        """Return the site's store."""
        return self.site.store

    def at(self, moment: datetime) -> list[tuple[str, str]]:
        """Run one round of the alert jobs at this moment; return the mail it sent as (recipient, kind)."""
        self.site.clock.now = moment
        self.engine.follow()
        self.engine.sweep()
        self.engine.escalate()
        self.delivery.deliver()
        return [(mail.to, mail.kind) for mail in self.mailbox.take()]

    def timeline(self, start: datetime, minutes: range) -> dict[int, list[tuple[str, str]]]:
        """Run a round at each of these minutes after ``start``; return the minutes that sent mail, and what."""
        sent = {}
        for minute in minutes:
            mail = self.at(start + timedelta(minutes=minute))
            if mail:
                sent[minute] = sorted(mail)
        return sent

    def forced_door(self, at: datetime) -> None:
        """The door agent reports the controlled room's door forced open (a signed event, stored as ingest does)."""
        alarm = DoorAlarm(door="room-hr", alarm="forced_open")
        self.site.send("door.alarm", alarm.model_dump(mode="json", exclude_none=True), at)

    def blocked_stick(self, at: datetime) -> None:
        """The HR terminal blocks an unregistered USB stick (the SIEM chain: one webhook step)."""
        blocked = UsbBlocked(
            terminal="t-hr-01", vendor_product="0781:5581", device_hash="ab" * 16, reason="not_registered"
        )
        self.site.send("usb.blocked", blocked.model_dump(mode="json", exclude_none=True), at, self.site.term)

    def alert(self, rule: str) -> Any:
        """Return the one alert of a rule."""
        with self.store.engine.connect() as conn:
            (row,) = conn.execute(select(*Alert.__table__.columns).where(Alert.rule == rule)).all()
        return row

    def notifications(self, alert_id: int) -> list[Any]:
        """Return an alert's notifications in the order they were written."""
        n = AlertNotification.__table__.c
        with self.store.engine.connect() as conn:
            return list(conn.execute(select(*n).where(n.alert_id == alert_id).order_by(n.id)))

    def acknowledge(self, alert_id: int, at: datetime) -> None:
        """A guard acknowledges the alert (with a comment) and does not resolve it."""
        self.site.clock.now = at
        with write_transaction(self.store.engine) as conn:
            settings = self.engine.policy().settings
            book.acknowledge(conn, self.store.signing_key, settings, alert_id, KEIBI, "現場へ向かいます", at)

    def trail(self, alert_id: int) -> list[Any]:
        """Return the admin trail of one alert, oldest first."""
        a = AdminAuditEntry.__table__.c
        with self.store.engine.connect() as conn:
            return list(
                conn.execute(
                    select(a.action, a.actor, a.new, a.detail).where(a.target == f"alert:{alert_id}").order_by(a.id)
                )
            )


@pytest.fixture
def desk(store: Store, make_agent: MakeAgent) -> Iterator[Desk]:
    site = Site(store, make_agent)
    # The demo policy with its alerts section, applied as a new version the way an administrator would.
    PolicyService(store, signing.generate_key()).apply(
        alert_policy(ESCALATION_ALERTS), source_sha256="1" * 64, created_by="test"
    )
    mailbox = Mailbox()
    with smtp_server(mailbox) as port, HookReceiver(WEBHOOK_SECRET, site.clock) as hooks:
        smtp = SmtpSettings(host="127.0.0.1", port=port, sender=SENDER, helo="sekisho.test", timeout_s=SOCKET_TIMEOUT)
        hook = WebhookSettings(url=hooks.url, secret=WEBHOOK_SECRET, timeout_s=SOCKET_TIMEOUT)
        channels = Channels(email=EmailChannel(smtp), webhooks=WebhookChannel({"soc": hook}))
        yield Desk(
            site,
            AlertEngine(store, clock=site.clock),
            DeliveryJob(store, channels, clock=site.clock),
            mailbox,
            hooks,
        )


# --- e-mail escalation ---------------------------------------------------------------------------------------


def test_nobody_acknowledges_each_step_mails_on_its_minute_the_chain_loops_then_stops(desk: Desk) -> None:
    desk.forced_door(T)
    # The roster's business-hours contact at once; nobody else during the next nine minutes.
    assert desk.timeline(T, range(0, 10)) == {0: [(GUARD, "opened")]}
    assert desk.at(T + timedelta(minutes=10) - timedelta(seconds=1)) == []
    # Step 2 on its minute; the loop starts 15 minutes after the last step (10 + 15 = 25) and runs once more.
    assert desk.timeline(T, range(10, 90)) == {
        10: [(LEAD, "escalated")],
        25: [(GUARD, "escalated")],
        35: [(LEAD, "escalated")],
    }
    assert desk.at(T + timedelta(days=3)) == []

    alert = desk.alert("door_forced")
    assert (alert.state, alert.esc_round, alert.esc_step, alert.esc_next_at) == ("open", 1, 1, None)
    rows = desk.notifications(alert.id)
    assert [(r.round, r.step, r.kind, r.target, r.state, r.attempts) for r in rows] == [
        (0, 0, "opened", GUARD, "sent", 1),
        (0, 1, "escalated", LEAD, "sent", 1),
        (1, 0, "escalated", GUARD, "sent", 1),
        (1, 1, "escalated", LEAD, "sent", 1),
    ]


def test_an_acknowledgement_stops_the_chain(desk: Desk) -> None:
    desk.forced_door(T)
    assert desk.timeline(T, range(0, 3)) == {0: [(GUARD, "opened")]}
    alert = desk.alert("door_forced")
    desk.acknowledge(alert.id, T + timedelta(minutes=3))
    # Past step 2 (minute 10), the loop (25, 35) and up to just before the ack timeout: nobody more is told.
    assert desk.timeline(T, range(3, 123)) == {}
    alert = desk.alert("door_forced")
    assert (alert.state, alert.esc_next_at) == ("acknowledged", None)
    assert len(desk.notifications(alert.id)) == 1


def test_an_ack_without_resolution_retriggers_after_the_ack_timeout(desk: Desk) -> None:
    desk.forced_door(T)
    assert desk.at(T) == [(GUARD, "opened")]
    alert = desk.alert("door_forced")
    desk.acknowledge(alert.id, T + timedelta(minutes=3))
    assert desk.timeline(T, range(3, 123)) == {}
    # ack_timeout_minutes 120 after the ack at minute 3: open again, the first step's contacts told at once.
    assert desk.at(T + timedelta(minutes=123)) == [(GUARD, "retriggered")]
    alert = desk.alert("door_forced")
    assert (alert.state, alert.esc_epoch, alert.retrigger_at) == ("open", 1, None)
    # The chain runs again from its start: step 2 ten minutes after the re-trigger.
    assert desk.timeline(T, range(124, 134)) == {133: [(LEAD, "escalated")]}


@pytest.mark.parametrize(
    ("moment", "on_duty"),
    [
        (datetime(2026, 11, 17, 10, 0, tzinfo=JST), GUARD),
        (datetime(2026, 11, 17, 22, 0, tzinfo=JST), NIGHT),
        # Monday 23 November 2026, 勤労感謝の日: a weekday inside office hours, but a public holiday.
        (datetime(2026, 11, 23, 10, 0, tzinfo=JST), HOLIDAY),
    ],
    ids=["weekday office hours", "weekday night", "labour thanksgiving day"],
)
def test_the_roster_step_reaches_whoever_is_on_duty(desk: Desk, moment: datetime, on_duty: str) -> None:
    desk.forced_door(moment)
    assert desk.at(moment) == [(on_duty, "opened")]
    # A step naming a contact (not the roster) reaches them whatever the shift.
    assert desk.at(moment + timedelta(minutes=10)) == [(LEAD, "escalated")]


def test_a_maintenance_window_mutes_an_alert_and_its_end_starts_the_escalation(desk: Desk) -> None:
    start, end = T - timedelta(minutes=5), T + timedelta(minutes=30)
    with write_transaction(desk.store.engine) as conn:
        window = book.add_silence(
            conn,
            desk.store.signing_key,
            KEIBI,
            kind="maintenance",
            rule=None,
            matchers={"door": "room-hr"},
            starts_at=start,
            ends_at=end,
            reason="扉の電気錠交換工事",
            now=start,
        )
    desk.forced_door(T)
    assert desk.timeline(T, range(0, 30)) == {}
    alert = desk.alert("door_forced")
    assert (alert.state, alert.silenced_by) == ("open", window)
    assert desk.notifications(alert.id) == []
    # The window ends with the alert still open: its chain starts then, from the first step.
    assert desk.timeline(T, range(30, 45)) == {30: [(GUARD, "opened")], 40: [(LEAD, "escalated")]}
    assert desk.alert("door_forced").silenced_by is None
    # The window's end is a transition of the alert like any other: in the trail, before the first step.
    trail = desk.trail(alert.id)
    assert [row.action for row in trail] == [
        "alert.opened",
        "alert.unsilenced",
        "alert.opened",
        "alert.notified",
        "alert.escalated",
        "alert.notified",
    ]
    assert trail[0].new["silenced_by"] == window
    assert trail[1].detail == {"silence": window}


def test_every_escalation_and_notification_is_in_the_admin_trail(desk: Desk) -> None:
    desk.forced_door(T)
    assert desk.timeline(T, range(0, 12)) == {0: [(GUARD, "opened")], 10: [(LEAD, "escalated")]}
    alert = desk.alert("door_forced")
    desk.acknowledge(alert.id, T + timedelta(minutes=12))
    assert desk.at(T + timedelta(minutes=132)) == [(GUARD, "retriggered")]
    with write_transaction(desk.store.engine) as conn:
        book.resolve(
            conn,
            desk.store.signing_key,
            alert.id,
            KEIBI,
            "こじ開けの痕跡なし、扉を施錠",
            "false_alarm",
            T + timedelta(minutes=133),
            override="センサーの誤検知",
        )
    assert desk.timeline(T, range(133, 200)) == {}

    trail = desk.trail(alert.id)
    assert [(row.action, row.actor) for row in trail] == [
        ("alert.opened", "system"),  # the alert book
        ("alert.opened", "system"),  # the chain's first step
        ("alert.notified", "system"),
        ("alert.escalated", "system"),
        ("alert.notified", "system"),
        ("alert.acknowledged", "user:keibi.hanako"),
        ("alert.retriggered", "system"),  # the alert book: open again
        ("alert.retriggered", "system"),  # the chain's first step again
        ("alert.notified", "system"),
        ("alert.resolved", "user:keibi.hanako"),
    ]
    steps = [row.detail for row in trail if row.detail and "step" in row.detail]
    assert [(d["epoch"], d["round"], d["step"], d["contacts"]) for d in steps] == [
        (0, 0, 0, ["guard-desk"]),
        (0, 0, 1, ["sec-lead"]),
        (1, 0, 0, ["guard-desk"]),
    ]
    # Each notification sent is in the trail once, with its contact and channel.
    notified = [row.detail for row in trail if row.action == "alert.notified"]
    sent = desk.notifications(alert.id)
    assert [(d["notification"], d["contact"], d["channel"], d["attempts"]) for d in notified] == [
        (r.id, r.contact, "email", 1) for r in sent
    ]


# --- webhooks ------------------------------------------------------------------------------------------------


def test_a_webhook_that_fails_twice_is_retried_at_the_backoff_times_and_delivered_once(desk: Desk) -> None:
    desk.hooks.script = [503, 503]
    desk.blocked_stick(T)
    desk.at(T)
    (first,) = desk.hooks.deliveries
    assert (first.status, first.verified) == (503, True)
    alert = desk.alert("usb_blocked")
    (row,) = desk.notifications(alert.id)
    first_delay, second_delay = backoff(1), backoff(2)
    assert first_delay is not None and second_delay is not None
    retry_1, retry_2 = T + first_delay, T + first_delay + second_delay
    assert (row.state, row.attempts, row.next_at) == ("pending", 1, retry_1)

    desk.at(retry_1 - timedelta(seconds=1))
    assert len(desk.hooks.deliveries) == 1  # not before its time
    desk.at(retry_1)
    assert [d.status for d in desk.hooks.deliveries] == [503, 503]
    desk.at(retry_2 - timedelta(seconds=1))
    assert len(desk.hooks.deliveries) == 2
    desk.at(retry_2)
    desk.at(retry_2 + timedelta(hours=2))

    deliveries = desk.hooks.deliveries
    assert [d.status for d in deliveries] == [503, 503, 200]
    assert all(d.verified for d in deliveries)  # the receiver checked every request's HMAC
    assert {d.delivery for d in deliveries} == {str(row.id)}  # the same delivery id each time
    assert {d.notification for d in deliveries} == {row.id}
    # Each attempt is signed at its own moment (the signature covers the timestamp).
    assert [int(d.timestamp) for d in deliveries] == [int(m.timestamp()) for m in (T, retry_1, retry_2)]
    (row,) = desk.notifications(alert.id)
    assert (row.state, row.attempts, row.sent_at) == ("sent", 3, retry_2)
    notified = [r.detail for r in desk.trail(alert.id) if r.action == "alert.notified"]
    assert [(d["notification"], d["channel"], d["attempts"]) for d in notified] == [(row.id, "webhook", 3)]


def test_a_webhook_refused_with_400_is_dead_at_once_and_replay_delivers_it(desk: Desk) -> None:
    desk.hooks.then = 400
    desk.blocked_stick(T)
    desk.at(T)
    desk.at(T + timedelta(hours=1))  # no retry: waiting does not mend a 400
    assert [d.status for d in desk.hooks.deliveries] == [400]
    alert = desk.alert("usb_blocked")
    (row,) = desk.notifications(alert.id)
    assert (row.state, row.attempts) == ("dead", 1)
    assert "HTTP 400" in row.last_error
    assert [d.id for d in dead_letters(desk.store)] == [row.id]

    # The receiver is fixed; an operator replays the dead notification: it goes out once more, and only once.
    desk.hooks.then = 200
    replay(desk.store, row.id, KEIBI, now=T + timedelta(hours=2))
    desk.at(T + timedelta(hours=2))
    desk.at(T + timedelta(hours=4))
    deliveries = desk.hooks.deliveries
    assert [(d.status, d.verified, d.delivery) for d in deliveries] == [
        (400, True, str(row.id)),
        (200, True, str(row.id)),
    ]
    (row,) = desk.notifications(alert.id)
    assert row.state == "sent"
    assert dead_letters(desk.store) == []
    actions = [r.action for r in desk.trail(alert.id)]
    assert actions[-3:] == ["alert.notification_dead", "alert.notification_replayed", "alert.notified"]


def test_an_acknowledgement_cancels_notifications_still_waiting_for_a_retry(desk: Desk) -> None:
    desk.hooks.script = [503]
    desk.blocked_stick(T)
    desk.at(T)
    alert = desk.alert("usb_blocked")
    (row,) = desk.notifications(alert.id)
    assert (row.state, row.attempts) == ("pending", 1)
    desk.acknowledge(alert.id, T + timedelta(seconds=10))
    first_delay = backoff(1)
    assert first_delay is not None
    desk.at(T + first_delay)
    desk.at(T + first_delay + timedelta(minutes=10))  # before the ack timeout re-triggers the chain
    assert [d.status for d in desk.hooks.deliveries] == [503]  # the retry never went out: a person has it
    (row,) = desk.notifications(alert.id)
    assert (row.state, row.last_error) == ("cancelled", "acknowledged before delivery")
    (acked,) = [r.new for r in desk.trail(alert.id) if r.action == "alert.acknowledged"]
    assert acked["cancelled_notifications"] == 1


# --- restart safety ------------------------------------------------------------------------------------------

DOOR_AGENT = "door-hr-01"
WAIT_S = 120.0


def alerts_config(smtp_port: int) -> dict[str, object]:
    """The [alerts] table of controller.toml: quick rounds, e-mail through the test's SMTP server."""
    smtp = {"host": "127.0.0.1", "port": smtp_port, "sender": "Sekisho <alerts@example.invalid>", "timeout_s": 5.0}
    return {"every_s": 0.2, "delivery_every_s": 0.2, "smtp": smtp}


def publish_forced_door(site: PipelineSite) -> None:
    """Publish a signed door.alarm (forced_open) as the door agent, over the real broker, and wait for PUBACK."""
    creds = AgentCredentials.at(site.lab.pki_dir, DOOR_AGENT)
    alarm = DoorAlarm(door="room-hr", alarm="forced_open").model_dump(mode="json", exclude_none=True)
    raw = build_event(
        signing.load_private_key(creds.signing_key), agent=DOOR_AGENT, seq=1, type="door.alarm", payload=alarm
    )
    client = connect_client(site.lab.pki_dir, site.lab.broker.port, DOOR_AGENT)
    try:
        assert not client.publish_wait(topics.topic(DOOR_AGENT, topics.EVENTS), raw).is_failure
    finally:
        client.close()


def notification_rows(store: Store) -> list[Any]:
    """Return every notification in the outbox: id, step, target, state, attempts."""
    n = AlertNotification.__table__.c
    with store.engine.connect() as conn:
        return list(conn.execute(select(n.id, n.step, n.target, n.state, n.attempts).order_by(n.id)))


@pytest.mark.broker
@pytest.mark.faults
@pytest.mark.timeout(400)
def test_a_controller_sigkilled_mid_escalation_resumes_without_a_lost_or_doubled_mail(
    site: PipelineSite, tmp_path: Path
) -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as smtp_port:
        lab = site.lab
        lab.write_controller_config(alerts=alerts_config(smtp_port))
        lab.add_agent(DOOR_AGENT)
        lab.register_agents(DOOR_AGENT)
        policy = tmp_path / "site.yaml"
        policy.write_text(policy_text(RESTART_ALERTS), encoding="utf-8")
        lab.sekisho("policy", "apply", str(policy), "--config", str(lab.controller_config))
        controller = lab.spawn_controller(http=True)
        site.wait_ready()
        store = site.store()

        publish_forced_door(site)
        # The first step (minute 0): both its contacts mailed, and recorded as sent before the kill.
        wait_for(lambda: len(mailbox.mails) >= 2, 30, "the first step's mail")
        wait_for(
            lambda: [(r.step, r.state) for r in notification_rows(store)] == [(0, "sent"), (0, "sent")],
            30,
            "the first step's notifications recorded as sent",
        )
        controller.send_signal(signal.SIGKILL)
        assert controller.wait(timeout=30) == -signal.SIGKILL
        # The kill landed between the steps: the second one (minute 1) was not taken yet.
        assert [r.step for r in notification_rows(store)] == [0, 0]

        restarted = lab.spawn_controller(http=True)
        site.wait_ready()
        wait_for(lambda: len(mailbox.mails) >= 4, WAIT_S, "the second step's mail after the restart")

        def chain_done() -> bool:
            rows = notification_rows(store)
            with store.engine.connect() as conn:
                alert = conn.execute(select(Alert.esc_step, Alert.esc_next_at).where(Alert.rule == "door_forced")).one()
            return alert.esc_step == 1 and alert.esc_next_at is None and all(r.state == "sent" for r in rows)

        wait_for(chain_done, 30, "the chain to end with every notification sent")
        # Stopped cleanly: whatever it could still send has gone, so the mailbox below is final.
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=60) == 0

    rows = notification_rows(store)
    mails: list[Mail] = mailbox.mails
    step_of = {r.id: r.step for r in rows}
    per_contact_step: dict[tuple[str, int], int] = {}
    for mail in mails:
        key = (mail.to, step_of[mail.notification])
        per_contact_step[key] = per_contact_step.get(key, 0) + 1
    assert per_contact_step == {(GUARD, 0): 1, (LEAD, 0): 1, (LEAD, 1): 1, (MANAGER, 1): 1}
    ids = [mail.message_id for mail in mails]
    assert len(ids) == len(set(ids)) == 4
    assert set(ids) == {message_id(r.id, "alerts@example.invalid") for r in rows}
    assert [(r.step, r.target, r.state, r.attempts) for r in rows] == [
        (0, GUARD, "sent", 1),
        (0, LEAD, "sent", 1),
        (1, LEAD, "sent", 1),
        (1, MANAGER, "sent", 1),
    ]
