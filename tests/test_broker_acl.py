"""The broker as deployed: mutual TLS, per-agent ACL, shared subscriptions, persistence across a crash.

Every test runs a real mosquitto (see the `broker` fixture); nothing is mocked. Agents connect to the
agents' listener (`broker.port`), the controller to the controllers' listener (`broker.controller_port`);
tests/test_broker_identity.py attacks the identity rules of both.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mqtt import NOT_AUTHORIZED, ConnectRefused, SyncClient, TlsFiles, connect_client

from sekisho.deploy.broker import (
    Broker,
    BrokerError,
    agent_acl_plugin,
    render_agent_acl,
    render_config,
    render_controller_acl,
)
from sekisho.deploy.pki import CONTROLLER_CN, PkiPaths, init_ca, issue_client_cert
from sekisho.protocol import topics

pytestmark = pytest.mark.broker

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
SHARED_EVENTS = topics.all_agents(topics.EVENTS, shared_group=topics.SHARE_GROUP)


@pytest.fixture
def clients() -> Iterator[list[SyncClient]]:
    """Clients registered here are closed after the test, even when it fails."""
    opened: list[SyncClient] = []
    yield opened
    for client in opened:
        client.close()


def _connect(
    clients: list[SyncClient], pki: Path, broker: Broker, client_id: str, identity: str | None = None
) -> SyncClient:
    port = broker.controller_port if identity == CONTROLLER_CN else broker.port
    client = connect_client(pki, port, client_id, identity=identity)
    clients.append(client)
    return client


def test_agent_publishes_own_events_to_shared_controller_subscription(
    pki: Path, broker: Broker, clients: list[SyncClient]
) -> None:
    controller = _connect(clients, pki, broker, "controller-1", CONTROLLER_CN)
    granted = controller.subscribe_wait(SHARED_EVENTS, qos=1)
    assert [r.value for r in granted] == [1]
    agent = _connect(clients, pki, broker, "agent-a")

    reason = agent.publish_wait(topics.topic("agent-a", topics.EVENTS), b"event-1", qos=1)

    assert not reason.is_failure, reason
    message = controller.next_message()
    assert message.topic == "sekisho/v1/agents/agent-a/events"
    assert message.payload == b"event-1"


def test_shared_subscription_spreads_events_over_controllers(
    pki: Path, broker: Broker, clients: list[SyncClient]
) -> None:
    first = _connect(clients, pki, broker, "controller-1", CONTROLLER_CN)
    second = _connect(clients, pki, broker, "controller-2", CONTROLLER_CN)
    for controller in (first, second):
        controller.subscribe_wait(SHARED_EVENTS, qos=1)
    agent = _connect(clients, pki, broker, "agent-b")
    for n in range(10):
        assert not agent.publish_wait(topics.topic("agent-b", topics.EVENTS), f"e{n}".encode()).is_failure

    got: dict[str, list[bytes]] = {"first": [], "second": []}
    deadline = time.monotonic() + 5
    while sum(map(len, got.values())) < 10 and time.monotonic() < deadline:
        got["first"] += [bytes(m.payload) for m in first.received()]
        got["second"] += [bytes(m.payload) for m in second.received()]
        time.sleep(0.02)

    # Each event reaches exactly one member of the group, and both members get some.
    assert sorted(got["first"] + got["second"]) == sorted(f"e{n}".encode() for n in range(10))
    assert got["first"] and got["second"]


def test_controller_heartbeat_and_events_wildcards(pki: Path, broker: Broker, clients: list[SyncClient]) -> None:
    controller = _connect(clients, pki, broker, "controller-1", CONTROLLER_CN)
    controller.subscribe_wait(topics.all_agents(topics.HEARTBEAT), qos=0)
    agent = _connect(clients, pki, broker, "agent-a")
    assert not agent.publish_wait(topics.topic("agent-a", topics.HEARTBEAT), b"hb", qos=1).is_failure
    assert controller.next_message().payload == b"hb"


@pytest.mark.parametrize(
    "target",
    [
        topics.topic("agent-b", topics.EVENTS),
        topics.topic("agent-b", topics.HEARTBEAT),
        topics.topic("agent-a", topics.ACKS),
        topics.topic("agent-a", topics.POLICY),
        topics.topic("agent-a", topics.COMMANDS),
        "sekisho/v1/agents/agent-a",
        "sekisho/v1/agents/agent-a/other",
        "sekisho/v1/other",
        "elsewhere",
    ],
)
def test_agent_cannot_publish_outside_its_outbound_topics(
    pki: Path, broker: Broker, clients: list[SyncClient], target: str
) -> None:
    controller = _connect(clients, pki, broker, "controller-1", CONTROLLER_CN)
    controller.subscribe_wait("sekisho/#", qos=1)
    agent = _connect(clients, pki, broker, "agent-a")

    reason = agent.publish_wait(target, b"forged", qos=1)

    assert reason.value == NOT_AUTHORIZED, reason
    # A permitted publish afterwards is the first thing the controller sees: the forged one was dropped.
    assert not agent.publish_wait(topics.topic("agent-a", topics.EVENTS), b"genuine").is_failure
    assert controller.next_message().payload == b"genuine"


def test_agent_receives_only_its_own_inbound_topics(pki: Path, broker: Broker, clients: list[SyncClient]) -> None:
    controller = _connect(clients, pki, broker, "controller-1", CONTROLLER_CN)
    snoop = _connect(clients, pki, broker, "agent-a")
    owner = _connect(clients, pki, broker, "agent-b")
    # The plugin refuses these subscriptions; the ACL would also withhold every message delivered there.
    assert [r.value for r in snoop.subscribe_wait(topics.topic("agent-b", topics.ACKS))] == [NOT_AUTHORIZED]
    assert [r.value for r in snoop.subscribe_wait("sekisho/#")] == [NOT_AUTHORIZED]
    assert [r.value for r in snoop.subscribe_wait(topics.topic("agent-a", topics.ACKS))] == [1]
    owner.subscribe_wait(topics.topic("agent-b", topics.ACKS))

    assert not controller.publish_wait(topics.topic("agent-b", topics.ACKS), b"for-b").is_failure
    assert not controller.publish_wait(topics.topic("agent-a", topics.ACKS), b"for-a").is_failure

    assert owner.next_message().payload == b"for-b"
    # Deliveries to one client keep their order: "for-a" arriving first proves "for-b" never will.
    # (With overlapping subscriptions mosquitto may deliver "for-a" once per matching subscription.)
    seen = [snoop.next_message(), *snoop.received()]
    assert [(m.topic, m.payload) for m in seen] == [(topics.topic("agent-a", topics.ACKS), b"for-a")]


@pytest.mark.parametrize("channel", [topics.ACKS, topics.POLICY, topics.COMMANDS])
def test_controller_reaches_agent_inbound_channels(
    pki: Path, broker: Broker, clients: list[SyncClient], channel: str
) -> None:
    controller = _connect(clients, pki, broker, "controller-1", CONTROLLER_CN)
    agent = _connect(clients, pki, broker, "agent-a")
    agent.subscribe_wait(topics.topic("agent-a", channel))
    assert not controller.publish_wait(topics.topic("agent-a", channel), b"x", retain=channel == "policy").is_failure
    assert agent.next_message().payload == b"x"


def test_retained_policy_reaches_agent_that_subscribes_later(
    pki: Path, broker: Broker, clients: list[SyncClient]
) -> None:
    controller = _connect(clients, pki, broker, "controller-1", CONTROLLER_CN)
    policy = topics.topic("agent-b", topics.POLICY)
    assert not controller.publish_wait(policy, b"bundle-v1", retain=True).is_failure
    snoop = _connect(clients, pki, broker, "agent-a")
    # A wildcard would match agent-b's retained policy: the subscription is refused.
    assert [r.value for r in snoop.subscribe_wait("sekisho/v1/agents/+/policy")] == [NOT_AUTHORIZED]
    agent = _connect(clients, pki, broker, "agent-b")
    agent.subscribe_wait(policy)
    message = agent.next_message()
    assert (message.payload, message.retain) == (b"bundle-v1", True)
    snoop.subscribe_wait(topics.topic("agent-a", topics.POLICY))
    assert controller.publish_wait(topics.topic("agent-a", topics.POLICY), b"mine").value == 0
    # Retained messages are sent at subscribe time, so bundle-v1 would have arrived before "mine".
    assert [m.payload for m in [snoop.next_message(), *snoop.received()]] == [b"mine"]


LISTENERS = ["agents", "controllers"]


def _listener_port(broker: Broker, listener: str) -> int:
    return broker.port if listener == "agents" else broker.controller_port


@pytest.mark.parametrize("listener", LISTENERS)
def test_client_without_certificate_is_refused(pki: Path, broker: Broker, listener: str) -> None:
    with pytest.raises(ConnectRefused):
        connect_client(TlsFiles(PkiPaths.at(pki).ca_cert), _listener_port(broker, listener), "anonymous")


@pytest.mark.parametrize("listener", LISTENERS)
def test_client_with_certificate_from_another_ca_is_refused(
    pki: Path, broker: Broker, tmp_path: Path, listener: str
) -> None:
    other = init_ca(tmp_path / "other-ca")
    rogue = issue_client_cert(other.directory, CONTROLLER_CN, tmp_path / "rogue")
    with pytest.raises(ConnectRefused):
        connect_client(
            TlsFiles(PkiPaths.at(pki).ca_cert, rogue.cert, rogue.key), _listener_port(broker, listener), "rogue"
        )


def test_each_listener_refuses_the_other_ones_certificates(pki: Path, broker: Broker) -> None:
    # An agent's certificate (site CA) never reaches the controllers' listener, where the controllers'
    # client ids live; the controller's (controller CA) is not an agent's.
    with pytest.raises(ConnectRefused):
        connect_client(pki, broker.controller_port, "controller-1-ingest", identity="agent-a")
    with pytest.raises(ConnectRefused):
        connect_client(pki, broker.port, "agent-b", identity=CONTROLLER_CN)


@pytest.mark.parametrize("listener", LISTENERS)
def test_broker_server_certificate_is_not_a_client_certificate(pki: Path, broker: Broker, listener: str) -> None:
    paths = PkiPaths.at(pki)
    with pytest.raises(ConnectRefused):
        connect_client(
            TlsFiles(paths.ca_cert, paths.broker_cert, paths.broker_key), _listener_port(broker, listener), "broker"
        )


@pytest.mark.parametrize("listener", LISTENERS)
def test_plain_tcp_client_is_refused(broker: Broker, listener: str) -> None:
    with pytest.raises(ConnectRefused):
        connect_client(None, _listener_port(broker, listener), "plain", timeout=3)


def test_tls_with_valid_certificate_is_accepted(pki: Path, broker: Broker, clients: list[SyncClient]) -> None:
    # The positive control for the refusals above: same helper, a certificate from our CA.
    client = _connect(clients, pki, broker, "agent-a")
    assert client.is_connected()


def _durable_controller(pki: Path, broker: Broker) -> SyncClient:
    return connect_client(
        pki,
        broker.controller_port,
        "controller-durable",
        identity=CONTROLLER_CN,
        clean_start=False,
        session_expiry=3600,
    )


@pytest.mark.faults
@pytest.mark.parametrize("subscription", [topics.all_agents(topics.EVENTS), SHARED_EVENTS])
def test_queued_messages_survive_broker_crash(pki: Path, broker: Broker, subscription: str) -> None:
    controller = _durable_controller(pki, broker)
    try:
        assert controller.subscribe_wait(subscription, qos=1)[0].value == 1
    finally:
        controller.close()

    agent = connect_client(pki, broker.port, "agent-a")
    try:
        for n in range(3):
            assert not agent.publish_wait(topics.topic("agent-a", topics.EVENTS), f"queued-{n}".encode()).is_failure
    finally:
        agent.close()
    acknowledged = time.time()
    broker.wait_saved(since=acknowledged)

    broker.kill()
    assert not broker.is_running()
    ports = (broker.port, broker.controller_port)
    broker.start()
    # Same ports: mosquitto finds a persisted session's listener again by its port.
    assert (broker.port, broker.controller_port) == ports

    controller = _durable_controller(pki, broker)
    try:
        assert controller.session_present
        got = [controller.next_message() for _ in range(3)]
        assert [m.payload for m in got] == [b"queued-0", b"queued-1", b"queued-2"]
        assert all(m.qos == 1 for m in got)
    finally:
        controller.close()


@pytest.mark.faults
def test_offline_agent_session_keeps_its_listener_across_a_restart(pki: Path, broker: Broker) -> None:
    # With per-listener ACLs a session is checked against its listener's; after a restart mosquitto finds
    # the listener of a persisted session by its port (a session without one would get nothing queued).
    own = topics.topic("agent-a", topics.COMMANDS)
    agent = connect_client(pki, broker.port, "agent-a", clean_start=False, session_expiry=3600)
    agent.subscribe_wait(own)
    agent.close()
    mark = time.time()
    broker.wait_saved(since=mark)
    broker.restart()

    controller = connect_client(pki, broker.controller_port, "controller-1", identity=CONTROLLER_CN)
    try:
        assert not controller.publish_wait(own, b"while-offline").is_failure
    finally:
        controller.close()
    agent = connect_client(pki, broker.port, "agent-a", clean_start=False, session_expiry=3600)
    try:
        assert agent.session_present
        assert agent.next_message().payload == b"while-offline"
    finally:
        agent.close()


def test_broker_restart_keeps_ports_and_accepts_clients(pki: Path, broker: Broker) -> None:
    ports = (broker.port, broker.controller_port)
    broker.restart()
    assert broker.is_running() and (broker.port, broker.controller_port) == ports
    connect_client(pki, broker.port, "agent-b").close()
    connect_client(pki, broker.controller_port, "controller-1", identity=CONTROLLER_CN).close()


def test_broker_start_failure_reports_log(pki: Path, tmp_path: Path, broker: Broker) -> None:
    # The running fixture broker holds its port, so a second broker on it must fail and say why.
    clash = Broker(pki, tmp_path / "clash", port=broker.port)
    with pytest.raises(RuntimeError, match="Address already in use"):
        clash.start(timeout=5)
    assert not clash.is_running()


def _options(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_examples_match_rendered_files() -> None:
    assert _options((EXAMPLES / "acl-agents.example").read_text()) == _options(render_agent_acl())
    assert _options((EXAMPLES / "acl-controllers.example").read_text()) == _options(render_controller_acl())
    rendered = render_config(
        port=8883,
        controller_port=8884,
        pki_dir=Path("/etc/mosquitto/sekisho"),
        state_dir=Path("/var/lib/mosquitto"),
        agent_acl_path=Path("/etc/mosquitto/sekisho/acl-agents"),
        controller_acl_path=Path("/etc/mosquitto/sekisho/acl-controllers"),
        plugin_path=Path("/usr/local/lib/sekisho/sekisho_agent_acl.so"),
        revocations_path=Path("/var/lib/mosquitto/revocations"),
        bind="0.0.0.0",
        log_path=Path("/var/log/mosquitto/mosquitto.log"),
        user="mosquitto",
    )
    assert _options((EXAMPLES / "mosquitto.conf.example").read_text()) == _options(rendered)


def test_config_rejects_line_breaks_in_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line break"):
        render_config(
            port=1,
            controller_port=2,
            pki_dir=tmp_path,
            state_dir=tmp_path / "x\nlistener 1",
            agent_acl_path=tmp_path,
            controller_acl_path=tmp_path,
            plugin_path=tmp_path,
            revocations_path=tmp_path,
        )


def test_broker_refuses_a_pki_without_the_controller_ca(pki: Path, tmp_path: Path) -> None:
    # A PKI made before the controller CA existed: the broker says how to upgrade it instead of starting
    # a controllers' listener that would trust nothing (or the agents' CA). Made from a copy of the session's.
    paths = PkiPaths.at(Path(shutil.copytree(pki, tmp_path / "pki")))
    paths.controller_ca_cert.unlink()
    with pytest.raises(BrokerError, match="sekisho pki upgrade"):
        Broker(paths.directory, tmp_path / "broker").start()


def test_plugin_is_built_once_per_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEKISHO_MOSQUITTO_PLUGIN", raising=False)
    first = agent_acl_plugin(tmp_path / "cache")
    assert first.is_file() and first.stat().st_size > 0
    assert agent_acl_plugin(tmp_path / "cache") == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]


class _BrokerWithoutIdBinding(Broker):
    """The agents' listener as someone might misconfigure it: without use_username_as_clientid."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        assert "use_username_as_clientid true\n" in text
        self.config_path.write_text(text.replace("use_username_as_clientid true\n", ""))


def test_plugin_fails_closed_for_a_client_id_that_is_not_its_certificate_name(pki: Path, tmp_path: Path) -> None:
    # Without the id binding an agent could pick another's client id; the plugin then grants that
    # connection nothing at all, while an agent whose id is its name keeps working.
    with _BrokerWithoutIdBinding(pki, tmp_path / "broker") as broker:
        honest = connect_client(pki, broker.port, "agent-a")
        impostor = connect_client(pki, broker.port, "agent-x", identity="agent-b")
        try:
            own = topics.topic("agent-b", topics.COMMANDS)
            assert [r.value for r in impostor.subscribe_wait(own)] == [NOT_AUTHORIZED]
            assert impostor.publish_wait(topics.topic("agent-b", topics.EVENTS), b"x").value == NOT_AUTHORIZED
            assert [r.value for r in honest.subscribe_wait(topics.topic("agent-a", topics.COMMANDS))] == [1]
            assert not honest.publish_wait(topics.topic("agent-a", topics.EVENTS), b"y").is_failure
        finally:
            honest.close()
            impostor.close()
