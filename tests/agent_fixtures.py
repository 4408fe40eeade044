"""Fixtures for the agent runtime tests: agent identities and configs, and a small acking controller.

Registered for every test module by tests/conftest.py (pytest_plugins).
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from support.mqtt import SyncClient, connect_client

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import AgentConfig, load_config
from sekisho.deploy.broker import Broker
from sekisho.deploy.pki import CONTROLLER_CN, AgentCredentials, PkiPaths, issue_agent
from sekisho.protocol import errors, events, messages, signing, topics

WAIT = 30.0


def new_agent_name() -> str:
    """Return a fresh agent id, so every test has its own broker session and ACL identity."""
    return f"rt-{secrets.token_hex(4)}"


def write_agent_config(path: Path, creds: AgentCredentials, port: int, **overrides: Any) -> Path:
    """Write an agent TOML that points at an issued agent's files (relative to the TOML where possible)."""
    values: dict[str, Any] = {
        "agent_id": creds.name,
        "broker_host": "127.0.0.1",
        "broker_port": port,
        "ca_cert": str(creds.ca_cert),
        "tls_cert": str(creds.tls_cert),
        "tls_key": str(creds.tls_key),
        "signing_key": str(creds.signing_key),
        "controller_public_key": str(creds.controller_signing_pub),
        "state_dir": "state",
        "heartbeat_interval_s": 30,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 1,
    }
    values.update(overrides)
    lines = []
    for key, value in values.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        else:
            lines.append(f"{key} = {value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class AgentSetup:
    """An issued agent identity with its TOML and state directory."""

    name: str
    creds: AgentCredentials
    config_path: Path

    @property
    def config(self) -> AgentConfig:
        """Load the TOML as the agent would."""
        return load_config(self.config_path)

    @property
    def public_key(self) -> Ed25519PublicKey:
        """Return the agent's event-signing public key."""
        return signing.load_public_key(self.creds.signing_pub)


@pytest.fixture
def agent_setup(pki: Path, broker: Broker, tmp_path: Path) -> Callable[..., AgentSetup]:
    """Issue a new agent identity and write its config for this test's broker."""

    def make(name: str | None = None, **overrides: Any) -> AgentSetup:
        name = name or new_agent_name()
        creds = issue_agent(pki, name)
        path = write_agent_config(tmp_path / name / "agent.toml", creds, broker.port, **overrides)
        return AgentSetup(name, creds, path)

    return make


@pytest.fixture
def run_agent(broker: Broker) -> Iterator[Callable[[AgentConfig], Agent]]:
    """Start in-process agents; every one still running is stopped after the test (before the broker)."""
    running: list[Agent] = []

    def start(config: AgentConfig) -> Agent:
        agent = Agent(config)
        running.append(agent)
        agent.start()
        return agent

    yield start
    for agent in running:
        agent.stop()


@dataclass(frozen=True)
class Received:
    """One verified event as the test controller saw it."""

    seq: int
    type: str
    payload: dict[str, Any]
    clock_synced: bool
    clock_offset_ms: int | None


class AckingController:
    """A stand-in for the controller's ingest: verify each event with the agent's key, then ack in batches."""

    def __init__(self, pki: Path, port: int, *, ack: bool = True, batch_max: int = 500, batch_wait_s: float = 0.01):
        self.pki = pki
        self.ack = ack
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.signing_key: Ed25519PrivateKey = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
        self.events: dict[str, dict[int, Received]] = defaultdict(dict)
        self.deliveries = 0
        self.rejected: list[tuple[str, str]] = []
        self.acks_sent = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.client: SyncClient = connect_client(pki, port, f"ctl-{secrets.token_hex(3)}", identity=CONTROLLER_CN)
        self.client.subscribe_wait(topics.all_agents(topics.EVENTS, shared_group=topics.SHARE_GROUP), qos=1)
        self._thread = threading.Thread(target=self._run, name="test-controller", daemon=True)
        self._thread.start()

    def _key(self, agent: str) -> Ed25519PublicKey:
        if agent not in self._keys:
            self._keys[agent] = signing.load_public_key(AgentCredentials.at(self.pki, agent).signing_pub)
        return self._keys[agent]

    def _collect(self) -> list[mqtt.MQTTMessage]:
        try:
            batch = [self.client.messages.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self.client.messages.get(timeout=max(remaining, 0))
                    if remaining > 0
                    else self.client.messages.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            to_ack: dict[str, list[int]] = defaultdict(list)
            with self._cond:
                for msg in batch:
                    try:
                        agent, _channel = topics.parse(msg.topic)
                        decoded = events.decode_event(msg.payload, topic_agent=agent)
                        decoded.verify(self._key(agent))
                    except errors.Rejected as err:
                        self.rejected.append((msg.topic, err.reason))
                        continue
                    self.deliveries += 1
                    self.events[agent][decoded.seq] = Received(
                        decoded.seq, decoded.type, decoded.payload, decoded.clock_synced, decoded.clock_offset_ms
                    )
                    to_ack[agent].append(decoded.seq)
                now = time.monotonic()
                self.first_at = self.first_at or now
                self.last_at = now
                self._cond.notify_all()
            if self.ack:
                for agent, seqs in to_ack.items():
                    self.send_ack(agent, seqs)

    def send_ack(self, agent: str, seqs: list[int], *, key: Ed25519PrivateKey | None = None) -> None:
        """Publish a signed ack (with another key to forge one)."""
        raw = messages.build_ack(key or self.signing_key, agent, seqs)
        self.client.publish(topics.topic(agent, topics.ACKS), raw, qos=1)
        self.acks_sent += 1

    def seqs(self, agent: str) -> set[int]:
        """Return the sequence numbers received from an agent."""
        with self._cond:
            return set(self.events[agent])

    def of_type(self, agent: str, type_: str) -> list[Received]:
        """Return the received events of one type, in seq order."""
        with self._cond:
            return [e for _s, e in sorted(self.events[agent].items()) if e.type == type_]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Wait until predicate() holds (re-checked after every batch); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.2))
        return True

    def publish_policy(
        self,
        agent: str,
        version: int,
        policy: dict[str, Any] | None = None,
        *,
        lifetime: timedelta = timedelta(days=1),
        key: Ed25519PrivateKey | None = None,
    ) -> bytes:
        """Publish a signed, retained policy bundle for an agent; return the bytes."""
        raw = messages.build_bundle(
            key or self.signing_key, agent=agent, version=version, policy=policy or {"doors": []}, lifetime=lifetime
        )
        self.client.publish_wait(topics.topic(agent, topics.POLICY), raw, qos=1, retain=True)
        return raw

    def publish_command(self, agent: str, name: str, args: dict[str, Any] | None = None) -> str:
        """Publish a signed command; return its id."""
        command_id, raw = messages.build_command(self.signing_key, agent=agent, name=name, args=args)
        self.client.publish_wait(topics.topic(agent, topics.COMMANDS), raw, qos=1)
        return command_id

    def close(self) -> None:
        """Stop acking and disconnect (twice is harmless)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        self.client.close()


@pytest.fixture
def make_controller(pki: Path, broker: Broker) -> Iterator[Callable[..., AckingController]]:
    """Start test controllers on this test's broker (options as AckingController); closed after the test."""
    made: list[AckingController] = []

    def make(**kw: Any) -> AckingController:
        ctl = AckingController(pki, broker.controller_port, **kw)
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        ctl.close()


@pytest.fixture
def controller(make_controller: Callable[..., AckingController]) -> AckingController:
    """A test controller on this test's broker that verifies and acknowledges every event."""
    return make_controller()
