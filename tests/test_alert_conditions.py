"""Condition rules: the fleet (heartbeats, clock, outbox, policy) and the records (gaps, refused messages, chains).

Heartbeats are recorded as ingest records them, events and dead letters are stored as ingest stores them, and
the engine's sweep judges them at the test clock's moment; a condition that ends clears its alert (which stays
until a person resolves it). Near misses stay silent. Both backends.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from reports_fixtures import T0, Site
from sqlalchemy import select, update

from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.store import Store
from sekisho.controller.store.events import DeadLetterIn
from sekisho.controller.store.models import Alert, VerifiedPoint
from sekisho.protocol import timefmt

if TYPE_CHECKING:
    from store_fixtures import MakeAgent


@pytest.fixture
def site(store: Store, make_agent: MakeAgent) -> Site:
    return Site(store, make_agent)


@pytest.fixture
def engine(site: Site) -> AlertEngine:
    return AlertEngine(site.store, clock=site.clock)


def live(store: Store) -> dict[tuple[str, str], Any]:
    """The alerts by (rule, agent or subject), latest row per key."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(*Alert.__table__.columns).order_by(Alert.id)).all()
    return {(r.rule, str(r.labels.get("agent") or r.labels.get("chain") or "")): r for r in rows}


def beat(site: Site, agent: str, age_s: float, **fields: Any) -> None:
    """A heartbeat from ``agent`` received ``age_s`` seconds before the test clock's now."""
    seen = site.clock() - timedelta(seconds=age_s)
    info = {"v": 1, "agent": agent, "at": timefmt.fmt(seen), "version": "1.0", "outbox_depth": 0}
    info |= {"interval_s": 30, "policy_state": "valid", "policy_version": 1, **fields}
    assert site.store.record_heartbeat(agent, info, seen)


def everyone_fresh(site: Site, **fields: Any) -> None:
    for agent in ("door-hr-01", "term-hr-01", "term-acc-01"):
        beat(site, agent, 5, **fields)


def test_a_silent_agent_goes_stale_then_offline_and_clears_when_it_is_back(site: Site, engine: AlertEngine) -> None:
    everyone_fresh(site)
    engine.sweep()
    assert live(site.store) == {}  # near miss: every heartbeat within its interval and grace

    def later(seconds: int) -> None:
        """Time passes; the terminals keep beating, the door agent is silent."""
        site.clock.now += timedelta(seconds=seconds)
        for agent in ("term-hr-01", "term-acc-01"):
            beat(site, agent, 1)
        engine.sweep()

    later(45)  # the door agent's last beat is 50 s old: past interval 30 + grace 15
    assert live(site.store)[("agent_stale", "door-hr-01")].condition == "active"
    later(37)  # 87 s: the door agent that still showed active; stale, not yet offline (3 × 30 + 15)
    assert ("agent_offline", "door-hr-01") not in live(site.store)
    later(60)
    alerts = live(site.store)
    assert alerts[("agent_offline", "door-hr-01")].condition == "active"
    assert alerts[("agent_stale", "door-hr-01")].condition == "cleared"  # offline is not also stale
    beat(site, "door-hr-01", 1)
    engine.sweep()
    alerts = live(site.store)
    assert alerts[("agent_offline", "door-hr-01")].condition == "cleared"
    assert alerts[("agent_offline", "door-hr-01")].state == "open"  # a person resolves it


def test_an_agent_last_seen_long_ago_is_offline(site: Site, engine: AlertEngine) -> None:
    beat(site, "term-acc-01", 6 * 365 * 24 * 3600, clock_offset_ms=-90_000)  # last seen years ago, -90 s
    for agent in ("door-hr-01", "term-hr-01"):
        beat(site, agent, 5)
    engine.sweep()
    alerts = live(site.store)
    assert alerts[("agent_offline", "term-acc-01")].severity == "high"
    assert ("clock_skew", "term-acc-01") not in alerts  # what an offline agent last said is history


@pytest.mark.parametrize(
    ("fields", "rule", "fires"),
    [
        ({"clock_offset_ms": -90_000}, "clock_skew", True),
        ({"clock_offset_ms": 59_000}, "clock_skew", False),
        ({"outbox_depth": 1500}, "outbox_backlog", True),
        ({"outbox_depth": 999}, "outbox_backlog", False),
        ({"oldest_unacked_age_s": 300}, "ingest_stalled", True),
        ({"oldest_unacked_age_s": 60}, "ingest_stalled", False),
    ],
)
def test_fleet_conditions_fire_past_their_limit_only(
    site: Site, engine: AlertEngine, fields: dict[str, Any], rule: str, fires: bool
) -> None:
    everyone_fresh(site)
    beat(site, "term-hr-01", 5, **fields)
    engine.sweep()
    found = [key for key in live(site.store) if key[0] == rule]
    assert bool(found) is fires, live(site.store).keys()
    if fires:
        beat(site, "term-hr-01", 1)  # back to normal
        engine.sweep()
        (alert,) = [a for k, a in live(site.store).items() if k[0] == rule]
        assert alert.condition == "cleared"


def test_a_policy_not_applied_after_its_grace_fires(site: Site, engine: AlertEngine) -> None:
    everyone_fresh(site)
    beat(site, "door-hr-01", 5, policy_version=0)  # still on an older version than the one in force (1)
    engine.sweep()
    assert ("policy_not_applied", "door-hr-01") not in live(site.store)  # the policy is new: give it time
    site.clock.now += timedelta(days=365)  # the clock is far past the policy's 15-minute grace
    everyone_fresh(site)
    beat(site, "door-hr-01", 5, policy_version=0)
    engine.sweep()
    assert live(site.store)[("policy_not_applied", "door-hr-01")].params == {"reported": 0, "current": 1}


def test_a_sequence_gap_is_possible_tampering_until_the_missing_events_arrive(site: Site, engine: AlertEngine) -> None:
    everyone_fresh(site)
    agent = site.door
    first, third = agent.event(1, at=T0), agent.event(3, at=T0)
    site.store.store_batch([first, third])
    engine.sweep()
    gap = live(site.store)[("sequence_gap", "door-hr-01")]
    assert (gap.severity, gap.condition) == ("critical", "active")
    site.store.store_batch([agent.event(2, at=T0)])
    engine.sweep()
    assert live(site.store)[("sequence_gap", "door-hr-01")].condition == "cleared"


def test_refused_messages_that_mean_tampering_raise_one_alert_per_agent(site: Site, engine: AlertEngine) -> None:
    everyone_fresh(site)
    letters = [
        DeadLetterIn("sekisho/v1/agents/term-hr-01/events", b"{}", "bad_signature", "signature", "term-hr-01"),
        DeadLetterIn("sekisho/v1/agents/term-hr-01/events", b"{}", "revoked_agent", "revoked", "term-hr-01"),
        DeadLetterIn("sekisho/v1/agents/term-acc-01/events", b"{", "malformed", "not JSON", "term-acc-01"),
    ]
    site.store.store_batch([], letters)
    engine.sweep()
    alerts = live(site.store)
    assert alerts[("signature_failure", "term-hr-01")].count == 2
    assert ("signature_failure", "term-acc-01") not in alerts  # a malformed message is a bug, not forgery
    engine.sweep()  # each dead letter is read once
    assert live(site.store)[("signature_failure", "term-hr-01")].count == 2


def test_a_broken_chain_found_by_the_background_walk_is_critical(site: Site, engine: AlertEngine) -> None:
    everyone_fresh(site)
    site.store.store_batch([site.door.event(1, at=T0)])
    from sekisho.controller.reports.verify import ChainCheck

    ChainCheck(site.store, clock=site.clock).refresh_points("test")
    engine.sweep()
    assert not [k for k in live(site.store) if k[0] == "chain_broken"]  # near miss: the walk found nothing
    with site.store.engine.begin() as conn:
        conn.execute(update(VerifiedPoint).where(VerifiedPoint.chain == "door-hr-01").values(problem="row 1 edited"))
    engine.sweep()
    (alert,) = [a for k, a in live(site.store).items() if k[0] == "chain_broken"]
    assert (alert.severity, alert.labels["chain"]) == ("critical", "agent:door-hr-01")


def test_an_offline_door_agent_mutes_its_own_devices_offline_alarms(site: Site, engine: AlertEngine) -> None:
    everyone_fresh(site)
    site.clock.now += timedelta(minutes=5)
    for agent in ("term-hr-01", "term-acc-01"):
        beat(site, agent, 5)
    engine.sweep()  # door-hr-01 offline
    site.send("door.alarm", {"door": "room-hr", "alarm": "reader_offline", "reader": "rdr-hr-in"}, T0)
    site.send("door.alarm", {"door": "room-hr", "alarm": "forced_open"}, T0)
    engine.follow()
    alerts = {a.rule: a for a in live(site.store).values()}
    assert alerts["reader_offline"].inhibited_by == "agent_offline|agent=door-hr-01"
    assert alerts["reader_offline"].esc_next_at is None  # recorded, nobody told
    assert alerts["door_forced"].inhibited_by is None  # a forced door is never muted
    beat(site, "door-hr-01", 1)
    engine.sweep()
    alerts = {a.rule: a for a in live(site.store).values()}
    assert alerts["reader_offline"].inhibited_by is None and alerts["reader_offline"].esc_next_at is not None
