"""Clock jumps of ±1 h, on an agent and on the controller, tested at the components' injected clocks.

Neither process has a whole-process time offset, so the jumps are made where the code takes its time: the
agent's ClockEstimate (wall clock and boot clock injected), the policy cache and command dispatcher that an
Agent wires to it, the outbox's clock field, and the store's received_at.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from reports_fixtures import Site as ReportsSite
from sqlalchemy import select
from store_fixtures import MakeAgent

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.outbox import Outbox
from sekisho.agents.runtime.sender import ClockEstimate
from sekisho.bench.offline import offline_agent
from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.store import Store
from sekisho.controller.store.models import Alert as AlertRow
from sekisho.deploy.pki import PkiPaths
from sekisho.protocol import errors, events, messages, signing, timefmt

HOUR = 3600.0
AGENT = "term-clock"


class Clocks:
    """A wall clock that can be set (jump) and a boot clock that only runs forward, like CLOCK_BOOTTIME."""

    def __init__(self) -> None:
        self.wall = time.time()
        self.boot = 1000.0

    def run(self, seconds: float) -> None:
        """Time passes: both clocks move."""
        self.wall += seconds
        self.boot += seconds

    def jump(self, seconds: float) -> None:
        """Someone (or a bad NTP step) sets the wall clock; the boot clock does not notice."""
        self.wall += seconds

    def estimate(self) -> ClockEstimate:
        """A ClockEstimate on these clocks."""
        return ClockEstimate(wall=lambda: self.wall, boot=lambda: self.boot)


def synced(clocks: Clocks) -> ClockEstimate:
    """An estimate that has seen one fresh ack from a controller whose clock agrees with ours."""
    estimate = clocks.estimate()
    estimate.observe(timefmt.fmt(timefmt.now()), clocks.wall)
    return estimate


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_a_local_jump_shows_at_once_as_offset_without_another_ack(jump: float) -> None:
    clocks = Clocks()
    estimate = synced(clocks)
    assert estimate.state()[0] is True
    assert abs(estimate.offset_ms or 0) < 100
    controller_before = estimate.controller_now()
    clocks.run(30)
    clocks.jump(jump)
    synced_now, offset = estimate.state()
    assert synced_now is False
    assert offset is not None and abs(offset + jump * 1000) < 100  # controller minus ours: the opposite sign
    assert controller_before is not None
    assert estimate.controller_now() == controller_before + timedelta(seconds=30), "the jump moved the controller"


def test_before_any_ack_the_agent_knows_no_offset_and_uses_its_own_clock() -> None:
    clocks = Clocks()
    estimate = clocks.estimate()
    assert estimate.state() == (False, None)
    assert estimate.controller_now() is None
    assert estimate.reference_now() == estimate.wall_now() == estimate.fail_closed_now()


def test_events_keep_their_order_by_seq_and_say_the_clock_is_off(tmp_path: Path) -> None:
    clocks = Clocks()
    estimate = synced(clocks)
    outbox = Outbox(
        tmp_path / "outbox.sqlite3", signing_key=signing.generate_key(), agent_id=AGENT, clock=estimate.state
    )
    try:
        outbox.append("test.synthetic", {"n": 0})
        clocks.run(1)
        clocks.jump(-HOUR)
        outbox.append("test.synthetic", {"n": 1})
        clocks.run(1)
        clocks.jump(2 * HOUR)
        outbox.append("test.synthetic", {"n": 2})
        decoded = [events.decode_event(raw) for _, raw in outbox.pending()]
    finally:
        outbox.close()
    assert [(e.seq, e.payload["n"]) for e in decoded] == [(1, 0), (2, 1), (3, 2)]
    clock = [(e.clock_synced, round((e.clock_offset_ms or 0) / 1000)) for e in decoded]
    assert clock == [(True, 0), (False, 3600), (False, -3600)]


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    """An Agent (not started, no broker) with its real policy cache and command dispatcher."""
    built = offline_agent(tmp_path, AGENT, {})
    try:
        yield built
    finally:
        built.stop()


def _controller_key(tmp_path: Path) -> Any:
    return signing.load_private_key(PkiPaths.at(tmp_path / "pki").controller_signing_key)


def _short_bundle(agent: Agent, tmp_path: Path, minutes: int) -> None:
    raw = messages.build_bundle(
        _controller_key(tmp_path), agent=AGENT, version=2, policy={}, lifetime=timedelta(minutes=minutes)
    )
    assert agent.policy.offer(raw).status == "applied"


def test_policy_expiry_is_not_missed_when_the_agent_clock_is_set_back(agent: Agent, tmp_path: Path) -> None:
    """Fail closed: the bundle (a revoked card in it may still be allowed) ends when the controller's clock says."""
    clocks = Clocks()
    agent.clock = synced(clocks)
    _short_bundle(agent, tmp_path, 10)
    clocks.run(5 * 60)
    assert agent.policy.state() == "valid"
    clocks.jump(-HOUR)
    clocks.run(6 * 60)  # 11 min after issue by the controller's clock; 49 min before it by the local one
    assert agent.policy.state() == "expired"
    change = agent.policy.check_expiry()
    assert change is not None and change.kind == "expired"


def test_policy_expiry_with_the_agent_clock_set_ahead_comes_early_which_fails_closed(
    agent: Agent, tmp_path: Path
) -> None:
    clocks = Clocks()
    agent.clock = synced(clocks)
    _short_bundle(agent, tmp_path, 30)
    assert agent.policy.state() == "valid"
    clocks.jump(HOUR)
    assert agent.policy.state() == "expired", "the local clock says it is over: refuse rather than trust it"
    clocks.jump(-HOUR)  # NTP puts it right: the bundle is valid again until its real end
    assert agent.policy.state() == "valid"


@pytest.mark.parametrize("ahead", [HOUR, -HOUR])
def test_commands_are_judged_by_the_controller_clock_not_a_jumped_local_one(
    agent: Agent, tmp_path: Path, ahead: float
) -> None:
    """The agent's clock jumped by -ahead since its last ack: the controller's is ``ahead`` of it now.

    The local clock here is the machine's own (the command check reads it as any agent would), so the
    jump is the controller's time in the ack and in the commands: the same difference seen from the agent.
    """
    clocks = Clocks()
    estimate = clocks.estimate()
    estimate.observe(timefmt.fmt(timefmt.now() + timedelta(seconds=ahead)), clocks.wall)
    agent.clock = estimate
    key = _controller_key(tmp_path)
    controller_now = timefmt.now() + timedelta(seconds=ahead)
    _, fresh = messages.build_command(key, agent=AGENT, name="agent.ping", issued_at=controller_now)
    outcome = agent.commands.handle(fresh)
    assert outcome.executed, outcome
    replay = agent.commands.handle(fresh)
    assert (replay.executed, replay.reason) == (False, errors.REPLAY)
    # Expired by the controller's clock, whatever the local clock would call it.
    stale_at = controller_now - timedelta(minutes=20)
    _, stale = messages.build_command(key, agent=AGENT, name="agent.ping", issued_at=stale_at)
    refused = agent.commands.handle(stale)
    assert (refused.executed, refused.reason) == (False, errors.EXPIRED)


@pytest.mark.parametrize("jump", [-HOUR, HOUR])
def test_controller_clock_jump_stores_in_seq_order_and_chains_verify(
    store: Store, make_agent: MakeAgent, jump: float
) -> None:
    """received_at going back (or ahead) an hour is recorded as it is; the chain's order is its index."""
    agent = make_agent(store)
    start = timefmt.now()
    store.store_batch(agent.events([1, 2]), [], start)
    store.store_batch(agent.events([3, 4]), [], start + timedelta(seconds=jump))
    store.store_batch(agent.events([5]), [], start + timedelta(seconds=jump + 1))
    assert store.event_seqs(agent.agent_id) == [1, 2, 3, 4, 5]
    assert store.verify_chains(agent.agent_id, signatures=True) == []
    assert store.verify_records(signatures=True).problems == []


def test_heartbeats_are_recorded_again_right_after_the_controller_clock_steps_back(
    store: Store, make_agent: MakeAgent
) -> None:
    agent = make_agent(store)
    start = timefmt.now()
    assert store.record_heartbeat(agent.agent_id, {"outbox_depth": 1}, start)
    # Two workers a second apart, out of order: the older one is not taken (a reordering, not a step).
    assert not store.record_heartbeat(agent.agent_id, {"outbox_depth": 2}, start - timedelta(seconds=1))
    # The controller's clock steps back an hour: the next heartbeats are taken at once, not in an hour.
    assert store.record_heartbeat(
        agent.agent_id, {"outbox_depth": 3}, start - timedelta(hours=1) + timedelta(seconds=5)
    )
    assert store.record_heartbeat(
        agent.agent_id, {"outbox_depth": 4}, start - timedelta(hours=1) + timedelta(seconds=35)
    )
    [row] = [a for a in store.list_agents() if a.id == agent.agent_id]
    assert row.outbox_depth == 4


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_an_agent_clock_jump_raises_clock_skew_at_the_controller_from_its_next_heartbeat(
    agent: Agent, store: Store, make_agent: MakeAgent, jump: float
) -> None:
    """The agent's own health() (what its next heartbeat sends) carries the jump; the controller alerts on it."""
    clocks = Clocks()
    agent.clock = synced(clocks)
    clocks.run(10)
    clocks.jump(jump)
    offset = agent.health().clock_offset_ms  # no ack since the jump
    assert offset is not None and abs(offset + jump * 1000) < 100
    site = ReportsSite(store, make_agent)
    seen = site.clock()
    for name in ("door-hr-01", "term-hr-01", "term-acc-01"):
        info = {"v": 1, "agent": name, "at": timefmt.fmt(seen), "version": "1.0", "outbox_depth": 0}
        info |= {"interval_s": 30, "policy_state": "valid", "policy_version": 1}
        info["clock_offset_ms"] = offset if name == "term-hr-01" else 0
        assert site.store.record_heartbeat(name, info, seen)
    AlertEngine(site.store, clock=site.clock).sweep()
    with store.engine.connect() as conn:
        rows = conn.execute(select(AlertRow.labels, AlertRow.params).where(AlertRow.rule == "clock_skew")).all()
    assert [(r.labels.get("agent"), r.params.get("offset_ms")) for r in rows] == [("term-hr-01", offset)]
