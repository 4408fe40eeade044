"""Alert rules over real event sequences: signed by the demo site's agents, stored by ingest, read by the engine.

Each case is a sequence of events that should fire a rule, and a near miss that should not. The engine follows
the events table from its cursor as it does in the controller (both backends), and the alerts are read back
from the database. Grouping, clearing, debounce and silences are checked on the same real path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from reports_fixtures import T0, Site
from sqlalchemy import select

from sekisho.controller.alerts import book
from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.store import Store
from sekisho.controller.store.audit import Operator
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import AdminAuditEntry, Alert, AlertEvent

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

GUARD = Operator("user:keibi.hanako", "web", "192.0.2.10")
HASH = "ab" * 16


@pytest.fixture
def site(store: Store, make_agent: MakeAgent) -> Site:
    return Site(store, make_agent)


@pytest.fixture
def engine(site: Site) -> AlertEngine:
    # The cursor starts where the migration put it (the newest event then: none); the clock is the test's.
    return AlertEngine(site.store, clock=site.clock)


def alerts(store: Store) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(*Alert.__table__.columns).order_by(Alert.id)))


def alarm(site: Site, kind: str, at_min: int, *, cleared: bool = False, **extra: Any) -> int:
    payload = {"door": "room-hr", "alarm": kind, **extra}
    return site.send("door.alarm_cleared" if cleared else "door.alarm", payload, T0 + timedelta(minutes=at_min))


def denied_login(
    site: Site, person: str, at_min: float, terminal: str = "t-hr-01", reason: str = "card_auth_failed"
) -> None:
    agent = site.term if terminal == "t-hr-01" else site.acc
    payload = {"terminal": terminal, "user": "mihon.taro", "reason": reason, "person": person}
    site.send("login.denied", payload, T0 + timedelta(minutes=at_min), agent)


def failures(site: Site, person: str, minutes: tuple[float, ...]) -> None:
    for minute in minutes:
        denied_login(site, person, minute)


def by_two_people(site: Site) -> None:
    for i in range(10):
        denied_login(site, f"p-000{1 + i % 2}", i * 0.5)


def door_denied(site: Site, reason: str, person: str | None = "p-0001", at_min: int = 0) -> None:
    payload = {"door": "room-hr", "reason": reason, "card_masked": "****-0001", "person": person}
    site.send("door.access_denied", {k: v for k, v in payload.items() if v is not None}, T0 + timedelta(minutes=at_min))


def usb(site: Site, type_: str, **extra: Any) -> None:
    payload: dict[str, Any] = {"terminal": "t-hr-01", "vendor_product": "0781:5581", "device_hash": HASH, **extra}
    site.send(type_, payload, T0, site.term)


@dataclass(frozen=True)
class Case:
    name: str
    events: Callable[[Site], object]
    rule: str | None  # None: nothing fires
    count: int = 1
    labels: dict[str, str] | None = None


CASES = [
    Case(
        "forced door",
        lambda s: alarm(s, "forced_open", 0),
        "door_forced",
        labels={"door": "room-hr", "area": "a-hr-room"},
    ),
    Case("held open", lambda s: alarm(s, "held_open", 0), "door_held_open"),
    Case(
        "tamper at a reader",
        lambda s: alarm(s, "tamper", 0, reader="rdr-hr-in"),
        "door_tamper",
        labels={"reader": "rdr-hr-in"},
    ),
    Case("reader offline", lambda s: alarm(s, "reader_offline", 0, reader="rdr-hr-in"), "reader_offline"),
    Case("reader flood", lambda s: alarm(s, "reader_flood", 0, reader="rdr-hr-in"), "reader_fault"),
    Case("board offline", lambda s: alarm(s, "board_offline", 0), "board_offline", labels={"agent": "door-hr-01"}),
    Case("stuck relay", lambda s: alarm(s, "relay_fault", 0), "relay_fault"),
    Case("key in the wrong slot", lambda s: alarm(s, "key_wrong_slot", 0, slot=2), "key_misuse"),
    Case("passback alarm", lambda s: alarm(s, "passback", 0, person="p-0001"), "passback"),
    Case("passback denial", lambda s: door_denied(s, "passback"), "passback", labels={"person": "p-0001"}),
    Case("visitor alone", lambda s: door_denied(s, "visitor_without_escort", "p-0006"), "visitor_without_escort"),
    Case("holiday access", lambda s: door_denied(s, "holiday"), "access_outside_schedule"),
    Case("after hours access", lambda s: door_denied(s, "outside_hours"), "access_outside_schedule"),
    Case(
        "after hours login",
        lambda s: denied_login(s, "p-0003", 0, "t-acc-01", "outside_hours"),
        "access_outside_schedule",
        labels={"terminal": "t-acc-01"},
    ),
    Case("near miss: a plain refusal", lambda s: door_denied(s, "not_allowed"), None),
    Case("near miss: a door that opened with a grant", lambda s: s.pass_door("p-0001", "entry", T0), None),
    Case("usb blocked", lambda s: usb(s, "usb.blocked", reason="not_registered"), "usb_blocked"),
    Case("badusb", lambda s: usb(s, "usb.rejected", reason="hid_on_storage"), "usb_rejected"),
    Case(
        "write attempt",
        lambda s: usb(s, "usb.write_attempt", block_device="sdb", detected_by="sectors_written"),
        "usb_write_attempt",
    ),
    Case("near miss: usb allowed", lambda s: usb(s, "usb.allowed", rule="medium m-0001"), None),
    Case(
        "session lock failed",
        lambda s: s.send(
            "session.lock_failed", {"terminal": "t-hr-01", "user": "mihon.taro", "action": "lock"}, T0, s.term
        ),
        "session_lock_failed",
    ),
    Case(
        "five failed logins in ten minutes",
        lambda s: failures(s, "p-0001", (0, 2, 4, 6, 8)),
        "login_failures_person",
        labels={"person": "p-0001"},
    ),
    Case(
        "near miss: four failed logins",
        lambda s: failures(s, "p-0001", (0, 2, 4, 6)),
        None,
    ),
    Case(
        "near miss: five failures spread over twenty minutes",
        lambda s: failures(s, "p-0001", (0, 5, 10, 15, 20)),
        None,
    ),
    Case(
        "ten failures at one terminal by different people",
        lambda s: by_two_people(s),
        "login_failures_terminal",
        labels={"terminal": "t-hr-01"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_fires_on_its_events_and_not_on_a_near_miss(site: Site, engine: AlertEngine, case: Case) -> None:
    case.events(site)
    engine.follow()
    if case.rule is None:
        assert alerts(site.store) == []
        return
    mine = [a for a in alerts(site.store) if a.rule == case.rule]
    assert len(mine) == 1, [a.rule for a in alerts(site.store)]
    assert mine[0].count == case.count
    assert mine[0].state == "open"
    for key, value in (case.labels or {}).items():
        assert mine[0].labels.get(key) == value, mine[0].labels


def test_repeats_group_into_one_alert_and_a_clear_is_not_a_resolution(site: Site, engine: AlertEngine) -> None:
    first = alarm(site, "held_open", 0)
    alarm(site, "held_open", 1)
    alarm(site, "held_open", 2, cleared=True)
    engine.follow()
    (alert,) = alerts(site.store)
    assert (alert.count, alert.state, alert.condition) == (2, "open", "cleared")
    with site.store.engine.connect() as conn:
        kept = conn.execute(select(AlertEvent.event_id).where(AlertEvent.alert_id == alert.id)).scalars().all()
    assert first in kept and len(kept) == 2
    # The condition comes back: the same alert, armed again.
    alarm(site, "held_open", 3)
    engine.follow()
    (alert,) = alerts(site.store)
    assert (alert.count, alert.condition) == (3, "active")


def test_an_active_condition_needs_an_override_to_resolve(site: Site, engine: AlertEngine) -> None:
    alarm(site, "forced_open", 0)
    engine.follow()
    (alert,) = alerts(site.store)
    now = site.clock()
    with pytest.raises(book.AlertRefused, match="still active"), write_transaction(site.store.engine) as conn:
        book.resolve(conn, site.store.signing_key, alert.id, GUARD, "checked", "intrusion", now)
    with pytest.raises(book.AlertRefused, match="comment is required"), write_transaction(site.store.engine) as conn:
        book.acknowledge(conn, site.store.signing_key, engine.policy().settings, alert.id, GUARD, "  ", now)
    with write_transaction(site.store.engine) as conn:
        book.acknowledge(conn, site.store.signing_key, engine.policy().settings, alert.id, GUARD, "向かいます", now)
        book.resolve(
            conn,
            site.store.signing_key,
            alert.id,
            GUARD,
            "扉を確認、施錠済み",
            "false_alarm",
            now,
            override="センサー不良",
        )
    (alert,) = alerts(site.store)
    assert (alert.state, alert.acked_by, alert.resolved_by, alert.override) == (
        "resolved",
        "user:keibi.hanako",
        "user:keibi.hanako",
        "センサー不良",
    )
    with site.store.engine.connect() as conn:
        trail = conn.execute(
            select(AdminAuditEntry.action, AdminAuditEntry.actor)
            .where(AdminAuditEntry.target == f"alert:{alert.id}")
            .order_by(AdminAuditEntry.id)
        ).all()
    assert [tuple(r) for r in trail] == [
        ("alert.opened", "system"),
        ("alert.acknowledged", "user:keibi.hanako"),
        ("alert.resolved", "user:keibi.hanako"),
    ]


def test_a_refire_within_the_debounce_reopens_and_after_it_opens_anew(site: Site, engine: AlertEngine) -> None:
    usb(site, "usb.blocked", reason="not_registered")
    engine.follow()
    (alert,) = alerts(site.store)
    with write_transaction(site.store.engine) as conn:
        book.resolve(conn, site.store.signing_key, alert.id, GUARD, "本人に確認", "operational", site.clock())
    usb(site, "usb.blocked", reason="not_registered")
    site.clock.now += timedelta(seconds=60)
    engine.follow()
    (again,) = alerts(site.store)
    assert (again.id, again.state, again.count) == (alert.id, "open", 2)
    with write_transaction(site.store.engine) as conn:
        book.resolve(conn, site.store.signing_key, alert.id, GUARD, "本人に確認", "operational", site.clock())
    site.clock.now += timedelta(minutes=10)  # past the default 300 s debounce
    usb(site, "usb.blocked", reason="not_registered")
    engine.follow()
    assert [(a.id == alert.id, a.state) for a in alerts(site.store)] == [(True, "resolved"), (False, "open")]


def test_a_silence_records_the_alert_but_stops_its_escalation(site: Site, engine: AlertEngine) -> None:
    now = site.clock()
    with write_transaction(site.store.engine) as conn:
        silence = book.add_silence(
            conn,
            site.store.signing_key,
            GUARD,
            kind="maintenance",
            rule=None,
            matchers={"door": "room-hr"},
            starts_at=now - timedelta(minutes=1),
            ends_at=now + timedelta(hours=1),
            reason="扉の工事",
            now=now,
        )
    alarm(site, "held_open", 0)
    usb(site, "usb.blocked", reason="not_registered")
    engine.follow()
    by_rule = {a.rule: a for a in alerts(site.store)}
    assert by_rule["door_held_open"].silenced_by == silence
    assert by_rule["usb_blocked"].silenced_by is None
    with pytest.raises(book.AlertRefused, match="never everything"), write_transaction(site.store.engine) as conn:
        book.add_silence(
            conn,
            site.store.signing_key,
            GUARD,
            kind="silence",
            rule=None,
            matchers={},
            starts_at=now,
            ends_at=now + timedelta(hours=1),
            reason="全部止めたい",
            now=now,
        )


def test_the_engine_reads_each_event_once_across_rounds(site: Site, store: Store) -> None:
    small = AlertEngine(store, clock=site.clock, batch=2)
    for minute in range(5):
        alarm(site, "held_open", minute)
    assert small.follow() == 5
    assert small.follow() == 0
    (alert,) = alerts(store)
    assert alert.count == 5
