"""Agent reconnection: exponential back-off with full jitter, bounded, so a site's agents do not return in lock-step
after a broker restart (paho's own delay doubles with no randomness)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from sekisho.agents.runtime.backoff import ReconnectBackoff
from sekisho.agents.runtime.link import MqttLink
from sekisho.deploy.broker import Broker

if TYPE_CHECKING:
    from agent_fixtures import AgentSetup

WAIT = 30.0


def draws(*values: float) -> Callable[[], float]:
    """Return an injected random source that yields the given numbers in turn."""
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def test_delays_double_their_ceiling_up_to_the_bound_and_draw_within_it() -> None:
    backoff = ReconnectBackoff(0.5, 30, rng=draws(1.0, 0.5, 0.0, 1.0, 0.25, 1.0, 1.0, 0.5))
    delays = [backoff.next_delay() for _ in range(8)]
    # ceilings 0.5, 1, 2, 4, 8, 16, 30 (bounded), 30; each delay = ceiling × the draw
    assert delays == [0.5, 0.5, 0.0, 4.0, 2.0, 16.0, 30.0, 15.0]
    assert backoff.ceiling() == 30


def test_a_successful_connection_starts_again_from_the_minimum() -> None:
    backoff = ReconnectBackoff(1, 60, rng=draws(1.0, 1.0, 1.0, 1.0))
    assert [backoff.next_delay() for _ in range(3)] == [1.0, 2.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_a_random_source_out_of_range_cannot_push_a_delay_past_the_bound() -> None:
    backoff = ReconnectBackoff(2, 5, rng=draws(7.0, -3.0))
    assert backoff.next_delay() == 2.0
    assert backoff.next_delay() == 0.0


def test_agents_that_failed_together_spread_over_the_window() -> None:
    # A thousand agents, one broker restart: with real randomness the first retry is spread, not one instant.
    delays = [ReconnectBackoff(0.5, 30).next_delay() for _ in range(1000)]
    assert all(0 <= d <= 0.5 for d in delays)
    buckets = {int(d / 0.05) for d in delays}
    assert len(buckets) >= 9  # every 50 ms slice of the 0.5 s window gets some (a fixed delay would fill one)


def test_many_failed_attempts_stay_bounded() -> None:
    backoff = ReconnectBackoff(0.1, 30, rng=lambda: 1.0)
    assert max(backoff.next_delay() for _ in range(10_000)) == 30.0


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_s"):
        ReconnectBackoff(5, 1)
    with pytest.raises(ValueError, match="min_s"):
        ReconnectBackoff(0, 1)


@pytest.mark.broker
def test_the_link_reconnects_after_the_broker_restarts_with_the_jittered_delays(
    broker: Broker, agent_setup: Callable[..., AgentSetup]
) -> None:
    setup = agent_setup(reconnect_min_s=0.2, reconnect_max_s=2)
    connects: list[bool] = []
    connected = threading.Event()

    def on_connected(session_present: bool) -> None:
        connects.append(session_present)
        connected.set()

    backoff = ReconnectBackoff(0.2, 2, rng=lambda: 0.5)
    link = MqttLink(
        setup.config,
        on_connected=on_connected,
        on_disconnected=lambda: None,
        on_message=lambda channel, raw: None,
        backoff=backoff,
    )
    link.start()
    try:
        assert link.wait_connected(WAIT)
        connected.clear()
        broker.stop()
        deadline = time.monotonic() + WAIT
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not link.connected
        # Let a few attempts fail against the stopped broker, so the schedule shows its doubling.
        while len(link.recent_reconnect_delays) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        broker.start()
        assert connected.wait(WAIT), "the link did not reconnect after the broker came back"
        assert link.connected and len(connects) == 2
        delays = link.recent_reconnect_delays
        # Drawn by our back-off (paho's own would be 0.2, 0.4, 0.8 exactly): ceiling 0.2, 0.4, 0.8, … × 0.5.
        assert delays[:3] == [0.1, 0.2, 0.4]
        assert all(d <= 1.0 for d in delays)
        assert backoff.ceiling() == 0.2  # reset by the accepted connection
    finally:
        link.stop()
