"""Prometheus metrics of the controller, served at ``/metrics`` (read scope, like every /api route).

Each app gets its own CollectorRegistry holding one collector that reads, at scrape time, this process's
ingest counters and the store (so the agents' states and the dead letters are the site's, whichever
worker stored them). Series (docs/operations.md lists them with their meaning):

process-local (one controller process; several workers are summed with PromQL ``sum``):
  sekisho_ingest_messages_total{outcome}, sekisho_ingest_dead_letters_total{reason},
  sekisho_ingest_waiting, sekisho_ingest_connected, sekisho_ingest_last_batch_age_seconds,
  sekisho_ingest_lag_seconds (histogram), sekisho_policy_publications_total,
  sekisho_policy_last_published_version, sekisho_policy_last_published_timestamp_seconds
site-wide (from the store):
  sekisho_agents{state}, sekisho_agent_outbox_depth{agent}, sekisho_agent_last_seen_age_seconds{agent},
  sekisho_agent_clock_offset_seconds{agent}, sekisho_agent_policy_version{agent},
  sekisho_agent_cert_not_after_timestamp_seconds{agent}, sekisho_agents_policy_behind,
  sekisho_policy_current_version, sekisho_dead_letters_stored{reason}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from sekisho.controller.fleet.health import STATES, Thresholds, count_states, fleet_health
from sekisho.controller.store.models import DeadLetter

if TYPE_CHECKING:
    from sekisho.controller.ingest.worker import IngestStats
    from sekisho.controller.store.store import Store

log = logging.getLogger(__name__)


@dataclass
class PublicationStats:
    """How often this process published policy bundles, and the last version and time (thread-safe)."""

    count: int = 0
    last_version: int | None = None
    last_at: float | None = None  # Unix time
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def published(self, version: int, at: float | None = None) -> None:
        """Count one publication of ``version``."""
        with self._lock:
            self.count += 1
            self.last_version = version
            self.last_at = time.time() if at is None else at


class ControllerCollector(Collector):
    """Builds every series afresh on each scrape."""

    def __init__(
        self,
        store: Store,
        thresholds: Thresholds,
        *,
        ingest: IngestStats | None,
        publications: PublicationStats | None,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._thresholds = thresholds
        self._ingest = ingest
        self._publications = publications
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        """Yield the ingest, publication, fleet and dead-letter series."""
        yield from self._ingest_series()
        yield from self._publication_series()
        yield from self._fleet_series()
        yield from self._dead_letter_series()

    def _ingest_series(self) -> Iterator[Metric]:
        stats = self._ingest
        if stats is None:
            return
        messages = CounterMetricFamily(
            "sekisho_ingest_messages", "Messages handled by this ingest worker, by outcome.", labels=["outcome"]
        )
        for outcome, value in (
            ("received", stats.received),
            ("stored", stats.stored),
            ("duplicate", stats.duplicates),
            ("dead_lettered", stats.dead_lettered),
            ("heartbeat", stats.heartbeats),
            ("store_error", stats.store_errors),
        ):
            messages.add_metric([outcome], value)
        yield messages
        reasons = CounterMetricFamily(
            "sekisho_ingest_dead_letters",
            "Messages refused by this worker, by reason (heartbeat_* refusals are not stored).",
            labels=["reason"],
        )
        for reason, value in sorted(dict(stats.reasons).items()):
            reasons.add_metric([reason], value)
        yield reasons
        yield GaugeMetricFamily("sekisho_ingest_waiting", "Messages received and not yet finished.", stats.waiting)
        yield GaugeMetricFamily("sekisho_ingest_connected", "1 while connected to the broker.", int(stats.connected))
        if stats.last_batch_at is not None:
            yield GaugeMetricFamily(
                "sekisho_ingest_last_batch_age_seconds",
                "Seconds since this worker finished its last batch.",
                max(0.0, time.time() - stats.last_batch_at),
            )
        buckets, total, _ = stats.lag.snapshot()
        lag = HistogramMetricFamily(
            "sekisho_ingest_lag_seconds", "From the agent recording an event to this worker storing it."
        )
        lag.add_metric([], buckets, total)
        yield lag

    def _publication_series(self) -> Iterator[Metric]:
        pub = self._publications
        if pub is None:
            return
        yield CounterMetricFamily(
            "sekisho_policy_publications", "Policy bundle publications by this process.", value=pub.count
        )
        if pub.last_version is not None:
            yield GaugeMetricFamily(
                "sekisho_policy_last_published_version", "Policy version last published.", pub.last_version
            )
        if pub.last_at is not None:
            yield GaugeMetricFamily(
                "sekisho_policy_last_published_timestamp_seconds", "When policy was last published.", pub.last_at
            )

    def _fleet_series(self) -> Iterator[Metric]:
        agents = fleet_health(self._store, self._thresholds, self._clock())
        by_state = GaugeMetricFamily("sekisho_agents", "Registered agents by state.", labels=["state"])
        for state, count in count_states(agents).items():
            by_state.add_metric([state], count)
        yield by_state
        depth = GaugeMetricFamily(
            "sekisho_agent_outbox_depth", "Outbox depth an agent last reported.", labels=["agent"]
        )
        age = GaugeMetricFamily(
            "sekisho_agent_last_seen_age_seconds", "Seconds since an agent's last heartbeat.", labels=["agent"]
        )
        skew = GaugeMetricFamily(
            "sekisho_agent_clock_offset_seconds", "An agent's clock offset against the controller.", labels=["agent"]
        )
        version = GaugeMetricFamily(
            "sekisho_agent_policy_version", "Policy version an agent applied.", labels=["agent"]
        )
        expiry = GaugeMetricFamily(
            "sekisho_agent_cert_not_after_timestamp_seconds",
            "notAfter of an agent's TLS certificate (Unix time).",
            labels=["agent"],
        )
        behind = 0
        current = None
        for agent in agents:
            current = agent.current_policy_version
            if agent.state == "revoked":
                continue
            if agent.outbox_depth is not None:
                depth.add_metric([agent.id], agent.outbox_depth)
            if agent.last_seen_age_s is not None:
                age.add_metric([agent.id], agent.last_seen_age_s)
            if agent.clock_offset_ms is not None:
                skew.add_metric([agent.id], agent.clock_offset_ms / 1000)
            if agent.policy_version is not None:
                version.add_metric([agent.id], agent.policy_version)
            if agent.cert_not_after is not None:
                expiry.add_metric([agent.id], agent.cert_not_after.timestamp())
            if agent.policy_current is False:
                behind += 1
        yield from (depth, age, skew, version, expiry)
        yield GaugeMetricFamily(
            "sekisho_agents_policy_behind", "Agents (not revoked) not on the current policy version.", behind
        )
        if current is None:
            row = self._store.current_policy_version()
            current = row.version if row is not None else None
        if current is not None:
            yield GaugeMetricFamily("sekisho_policy_current_version", "The policy version in force.", current)

    def _dead_letter_series(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sekisho_dead_letters_stored", "Dead letters kept in the store, by reason.", labels=["reason"]
        )
        stmt = select(DeadLetter.reason, func.count()).group_by(DeadLetter.reason)
        with self._store.engine.connect() as conn:
            for reason, count in conn.execute(stmt):
                family.add_metric([str(reason)], int(count))
        yield family


def controller_registry(
    store: Store,
    thresholds: Thresholds,
    *,
    ingest: IngestStats | None,
    publications: PublicationStats | None,
    clock: Callable[[], datetime],
) -> CollectorRegistry:
    """Return a new registry (one per app: nothing is shared between apps or tests) with the collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(store, thresholds, ingest=ingest, publications=publications, clock=clock))
    return registry


__all__ = ["STATES", "ControllerCollector", "PublicationStats", "controller_registry"]
