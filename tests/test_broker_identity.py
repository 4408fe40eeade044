"""Identity at the broker, attacked the way the attack run on a real site did (issue 10, items 3 and 4).

Every test runs a real mosquitto with the production configuration (deploy.broker.Broker) and one attack
while honest traffic goes on, and checks that the honest side lost nothing:

- an agent's certificate with another agent's client id neither disconnects that agent nor gets what is
  queued for it (the broker makes the client id the certificate's name);
- an agent's certificate with the controller's client id does not knock the controller's ingest off (the
  agents' listener renames it; the controllers' listener does not take an agent's certificate at all);
- an agent cannot join the controllers' shared subscription, so the controller's ingest stores every
  event (the plugin refuses the subscription);
- an agent's wildcard subscriptions are refused and yield nothing of other agents.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.lab import running_site
from support.mqtt import NOT_AUTHORIZED, ConnectRefused, SyncClient, connect_client
from support.site import wait_for

from sekisho.controller.service import Controller
from sekisho.deploy.broker import Broker
from sekisho.deploy.pki import CONTROLLER_CN, AgentCredentials
from sekisho.lab import Lab
from sekisho.protocol import events, signing, topics

pytestmark = pytest.mark.broker

ATTACKER = "term-a"
HONEST = "term-b"
# The agents of the session-wide PKI (tests/conftest.py), for the tests on the bare broker.
VICTIM = "agent-b"
INTRUDER = "agent-a"


@pytest.fixture
def clients() -> Iterator[list[SyncClient]]:
    """Clients registered here are closed after the test, even when it fails."""
    opened: list[SyncClient] = []
    yield opened
    for client in opened:
        client.close()


def _keep(clients: list[SyncClient], client: SyncClient) -> SyncClient:
    clients.append(client)
    return client


def _connections(broker: Broker, client_id: str) -> int:
    """How many times the broker accepted a connection under this client id (its log says so)."""
    return broker.log_path.read_text(errors="replace").count(f" as {client_id} (")


def _taken_over(broker: Broker, client_id: str) -> bool:
    """Whether the broker closed a connection because another one came with the same client id."""
    return f"Client {client_id} already connected, closing old connection" in broker.log_path.read_text(
        errors="replace"
    )


# --- a controller and an honest agent on a whole site --------------------------------------------------


class HonestAgent:
    """An agent publishing signed events (QoS 1) in the background until stopped, as a real one would."""

    def __init__(self, lab: Lab, name: str, interval: float = 0.02) -> None:
        self.name = name
        self.interval = interval
        self.sent = 0
        self.client = connect_client(lab.pki_dir, lab.broker.port, name)
        self._key = signing.load_private_key(AgentCredentials.at(lab.pki_dir, name).signing_key)
        self._topic = topics.topic(name, topics.EVENTS)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"honest-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                seq = self.sent + 1
                raw = events.build_event(self._key, agent=self.name, seq=seq, type="test.synthetic", payload={"n": seq})
                reason = self.client.publish_wait(self._topic, raw)
                if reason.is_failure:
                    raise AssertionError(f"honest event {seq} refused: {reason}")
                self.sent = seq
                time.sleep(self.interval)
        except BaseException as err:  # handed to the test by stop()
            self._error = err

    def stop(self) -> int:
        """Stop publishing; return how many events the broker accepted (raise what went wrong)."""
        self._stop.set()
        self._thread.join(10)
        self.client.close()
        if self._error is not None:
            raise self._error
        return self.sent


@pytest.fixture
def site(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    """A site with the real controller (ingest worker `controller-1-ingest`) and agents term-a, term-b."""
    with running_site(pki, tmp_path / "site", agents=(ATTACKER, HONEST)) as running:
        yield running


def _wait_stored(ctl: Controller, sent: int) -> None:
    wait_for(lambda: ctl.store.event_seqs(HONEST) == list(range(1, sent + 1)), 15, f"{sent} honest events stored")


def test_agent_cannot_knock_the_controller_off_with_its_client_id(site: tuple[Lab, Controller]) -> None:
    lab, ctl = site
    ingest_id = f"{ctl.config.worker_id}-ingest"
    assert ctl.worker.stats.connected and _connections(lab.broker, ingest_id) == 1
    honest = HonestAgent(lab, HONEST)

    for _round in range(3):
        # On the agents' listener the client id becomes the certificate's name (term-a) …
        intruder = connect_client(
            lab.pki_dir, lab.broker.port, ingest_id, identity=ATTACKER, clean_start=False, session_expiry=3600
        )
        time.sleep(0.5)
        intruder.close()
        # … and the controllers' listener does not take an agent's certificate at all.
        with pytest.raises(ConnectRefused):
            connect_client(lab.pki_dir, lab.broker.controller_port, ingest_id, identity=ATTACKER)

    sent = honest.stop()
    _wait_stored(ctl, sent)
    assert sent > 20
    assert not _taken_over(lab.broker, ingest_id)
    assert _connections(lab.broker, ingest_id) == 1, "the controller's ingest was disconnected and came back"
    assert ctl.worker.stats.connected


def test_agent_cannot_join_the_controllers_shared_subscription(site: tuple[Lab, Controller]) -> None:
    lab, ctl = site
    group = ctl.config.share_group
    intruder = connect_client(lab.pki_dir, lab.broker.port, ATTACKER)
    try:
        refused = [
            intruder.subscribe_wait(topics.all_agents(channel, shared_group=group), qos=1)[0].value
            for channel in (topics.EVENTS, topics.HEARTBEAT)
        ]
        honest = HonestAgent(lab, HONEST, interval=0.005)
        time.sleep(2)
        sent = honest.stop()
        # Every event reached the controller's ingest; none was handed to the intruder (and dropped).
        _wait_stored(ctl, sent)
        assert sent > 40
        assert ctl.worker.stats.received == sent
        assert intruder.received() == []
        assert refused == [NOT_AUTHORIZED, NOT_AUTHORIZED]
    finally:
        intruder.close()


# --- agents' sessions, on the bare broker ---------------------------------------------------------------


def _controller(clients: list[SyncClient], pki: Path, broker: Broker) -> SyncClient:
    controller = _keep(clients, connect_client(pki, broker.controller_port, "controller-test", identity=CONTROLLER_CN))
    controller.subscribe_wait(topics.all_agents(topics.EVENTS, shared_group=topics.SHARE_GROUP), qos=1)
    return controller


def _victim(clients: list[SyncClient], pki: Path, broker: Broker) -> SyncClient:
    victim = _keep(clients, connect_client(pki, broker.port, VICTIM, clean_start=False, session_expiry=3600))
    assert victim.subscribe_wait(topics.topic(VICTIM, topics.COMMANDS))[0].value == 1
    return victim


def _send_events(agent: SyncClient, name: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        assert not agent.publish_wait(topics.topic(name, topics.EVENTS), payload).is_failure


def _events_seen(controller: SyncClient, count: int) -> list[bytes]:
    return [bytes(controller.next_message().payload) for _ in range(count)]


def test_agent_cannot_disconnect_another_agent_with_its_client_id(
    pki: Path, broker: Broker, clients: list[SyncClient]
) -> None:
    controller = _controller(clients, pki, broker)
    victim = _victim(clients, pki, broker)
    _send_events(victim, VICTIM, [b"before"])

    intruder = _keep(
        clients,
        connect_client(pki, broker.port, VICTIM, identity=INTRUDER, clean_start=False, session_expiry=3600),
    )
    intruder.subscribe_wait(topics.topic(VICTIM, topics.COMMANDS))
    _send_events(victim, VICTIM, [b"during"])
    assert not controller.publish_wait(topics.topic(VICTIM, topics.COMMANDS), b"command").is_failure

    assert victim.next_message().payload == b"command"
    assert victim.is_connected()
    assert not _taken_over(broker, VICTIM)
    _send_events(victim, VICTIM, [b"after"])
    assert _events_seen(controller, 3) == [b"before", b"during", b"after"]
    assert intruder.received() == []


def test_agent_cannot_take_the_command_queued_for_another_agent(
    pki: Path, broker: Broker, clients: list[SyncClient]
) -> None:
    controller = _controller(clients, pki, broker)
    victim = _victim(clients, pki, broker)
    _send_events(victim, VICTIM, [b"before"])
    victim.close()  # offline: its persistent session keeps what comes meanwhile
    clients.remove(victim)
    assert not controller.publish_wait(topics.topic(VICTIM, topics.COMMANDS), b"queued-command").is_failure

    # The intruder asks for the victim's persistent session under the victim's client id.
    intruder = _keep(
        clients,
        connect_client(pki, broker.port, VICTIM, identity=INTRUDER, clean_start=False, session_expiry=3600),
    )
    intruder.subscribe_wait(topics.topic(VICTIM, topics.COMMANDS))
    # A marker on the intruder's own command topic, sent after it connected and subscribed: the victim's
    # queued command, had the broker handed the intruder that session, would have reached it first.
    intruder.subscribe_wait(topics.topic(INTRUDER, topics.COMMANDS))
    assert not controller.publish_wait(topics.topic(INTRUDER, topics.COMMANDS), b"marker").is_failure
    assert intruder.next_message().payload == b"marker"
    assert intruder.received() == []

    victim = _keep(clients, connect_client(pki, broker.port, VICTIM, clean_start=False, session_expiry=3600))
    assert victim.session_present
    message = victim.next_message()
    assert (message.topic, message.payload, message.qos) == (
        topics.topic(VICTIM, topics.COMMANDS),
        b"queued-command",
        1,
    )
    _send_events(victim, VICTIM, [b"after"])
    assert _events_seen(controller, 2) == [b"before", b"after"]
    assert intruder.received() == []


WILDCARDS = [
    "#",
    "sekisho/#",
    "sekisho/v1/agents/+/commands",
    "sekisho/v1/agents/+/acks",
    "sekisho/v1/agents/+/policy",
    "+/+/+/+/+",
    f"sekisho/v1/agents/{VICTIM}/#",
    "$share/snoop/sekisho/v1/agents/+/commands",
    f"$share/controllers/sekisho/v1/agents/{VICTIM}/commands",
    topics.topic(VICTIM, topics.COMMANDS),
    # Its own topics, but not an inbound channel, or under a wildcard.
    topics.topic(INTRUDER, topics.EVENTS),
    f"sekisho/v1/agents/{INTRUDER}/+",
]


def test_agent_wildcard_subscriptions_yield_nothing_of_other_agents(
    pki: Path, broker: Broker, clients: list[SyncClient]
) -> None:
    controller = _controller(clients, pki, broker)
    victim = _keep(clients, connect_client(pki, broker.port, VICTIM))
    for channel in (topics.ACKS, topics.POLICY, topics.COMMANDS):
        victim.subscribe_wait(topics.topic(VICTIM, channel))
    intruder = _keep(clients, connect_client(pki, broker.port, INTRUDER))
    codes = {topic: intruder.subscribe_wait(topic)[0].value for topic in WILDCARDS}
    assert intruder.subscribe_wait(topics.topic(INTRUDER, topics.COMMANDS))[0].value == 1

    for channel in (topics.ACKS, topics.POLICY, topics.COMMANDS):
        payload = f"for-{VICTIM}-{channel}".encode()
        retain = channel == topics.POLICY
        assert not controller.publish_wait(topics.topic(VICTIM, channel), payload, retain=retain).is_failure
        assert victim.next_message().payload == payload
    _send_events(victim, VICTIM, [b"victim-event"])
    assert controller.next_message().payload == b"victim-event"
    assert not controller.publish_wait(topics.topic(INTRUDER, topics.COMMANDS), b"for-intruder").is_failure

    # Deliveries keep their order: the intruder's own command arriving first (and alone) proves that
    # nothing of the victim's reached it.
    seen = [intruder.next_message(), *intruder.received()]
    assert [(m.topic, m.payload) for m in seen] == [(topics.topic(INTRUDER, topics.COMMANDS), b"for-intruder")]
    assert codes == dict.fromkeys(WILDCARDS, NOT_AUTHORIZED)
