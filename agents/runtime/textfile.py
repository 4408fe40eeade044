"""The agent's metrics for node_exporter's textfile collector, rewritten atomically after each heartbeat.

Set ``metrics_textfile`` in agent.toml to a ``*.prom`` path inside node_exporter's
``--collector.textfile.directory``. The file is replaced whole (write, fsync, rename), so the collector
never reads half of it. Metric names (docs/operations.md):

- ``sekisho_agent_outbox_depth``: events recorded and not yet acknowledged by the controller
- ``sekisho_agent_oldest_unacked_age_seconds``: age of the oldest of them (absent when the outbox is empty)
- ``sekisho_agent_last_ack_age_seconds``: since the controller last acknowledged anything (absent before that)
- ``sekisho_agent_policy_version``: the policy version applied (absent without a policy)
- ``sekisho_agent_cert_not_after_timestamp_seconds``: the TLS certificate's notAfter, Unix time
- ``sekisho_agent_heartbeats_sent_total``: heartbeats published since the agent started
- ``sekisho_agent_errors_total``: errors noted since the agent started
- ``sekisho_agent_connected``: 1 while the broker connection is up

Every series carries the labels ``agent`` and ``kind``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from sekisho.common.files import write_atomically


@dataclass(frozen=True, slots=True)
class AgentVitals:
    """One snapshot of what the textfile reports."""

    agent: str
    kind: str
    outbox_depth: int
    oldest_unacked_age_s: float | None
    last_ack_age_s: float | None
    policy_version: int | None
    cert_not_after: datetime | None
    heartbeats_sent: int
    errors: int
    connected: bool


def render(vitals: AgentVitals) -> bytes:
    """Return the Prometheus text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    labels = {"agent": vitals.agent, "kind": vitals.kind}
    names = list(labels)

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            Gauge(name, doc, names, registry=registry).labels(**labels).set(value)

    gauge("sekisho_agent_outbox_depth", "Events recorded and not yet acknowledged.", vitals.outbox_depth)
    gauge(
        "sekisho_agent_oldest_unacked_age_seconds",
        "Age of the oldest unacknowledged event.",
        vitals.oldest_unacked_age_s,
    )
    gauge("sekisho_agent_last_ack_age_seconds", "Seconds since the last acknowledgement.", vitals.last_ack_age_s)
    gauge("sekisho_agent_policy_version", "Policy version applied.", vitals.policy_version)
    gauge(
        "sekisho_agent_cert_not_after_timestamp_seconds",
        "notAfter of the agent's TLS certificate (Unix time).",
        vitals.cert_not_after.timestamp() if vitals.cert_not_after is not None else None,
    )
    gauge("sekisho_agent_connected", "1 while connected to the broker.", 1 if vitals.connected else 0)
    # Counters expose name_total; they are set from the agent's own counts (they restart with the agent).
    sent = Counter("sekisho_agent_heartbeats_sent", "Heartbeats published.", names, registry=registry)
    sent.labels(**labels).inc(vitals.heartbeats_sent)
    errors = Counter("sekisho_agent_errors", "Errors noted since the agent started.", names, registry=registry)
    errors.labels(**labels).inc(vitals.errors)
    return generate_latest(registry)


def write_textfile(path: Path, vitals: AgentVitals) -> None:
    """Replace the textfile with a new snapshot (world-readable: node_exporter runs as another user)."""
    write_atomically(path, render(vitals), mode=0o644)
