"""Site brokers bridged to a central broker: events stored once, acks back, sites confined, partitions healed.

Everything is real: a central mosquitto (agents', controllers' and sites listeners), one mosquitto per site
bridging to it over mutual TLS through a cuttable loopback proxy (sekisho.lab.sites), agent processes on
the site brokers, and `controller serve` storing the events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.x509.oid import NameOID
from support.mqtt import ConnectRefused, SyncClient, TlsFiles, connect_client
from support.site import Site, wait_for

from sekisho.deploy.broker import (
    BridgeSpec,
    render_bridge,
    render_bridge_limits,
    render_sites_acl,
    render_sites_listener,
)
from sekisho.deploy.emqx import render_acl as render_emqx_acl
from sekisho.deploy.pki import SITE_CA_DIR, PkiError, PkiPaths, SiteCredentials, issue_site, load_cert
from sekisho.lab.sites import Federation
from sekisho.protocol import topics

pytestmark = pytest.mark.broker

# The partition of the fault test, in seconds. CI keeps it short; SEKISHO_PARTITION_S=600 runs the
# 10-minute one (as does `sekisho bench scale --partition-s 600`).
PARTITION_S = float(os.environ.get("SEKISHO_PARTITION_S", "4"))
SHARED_EVENTS = topics.all_agents(topics.EVENTS, shared_group=topics.SHARE_GROUP)


def _start(fed: Federation, *, resend_after_s: float = 5) -> Site:
    fed.start({"resend_after_s": resend_after_s, "heartbeat_interval_s": 60})
    lab = fed.lab
    lab.write_controller_config(batch_wait_ms=5)
    lab.register_agents(*fed.agents())
    lab.spawn_controller(http=True)
    site = Site(lab)
    site.wait_ready(timeout=90)
    return site


def _simulate(
    fed: Federation, agent: str, count: int, *, rate: float | None = None, timeout: float = 120
) -> subprocess.Popen[bytes]:
    args = ["agent", "simulate", "--config", str(fed.lab.agent_config(agent)), "--count", str(count)]
    if rate is not None:
        args += ["--rate", str(rate)]
    args += ["--exit-when-drained", "--timeout", str(timeout)]
    return fed.lab.spawn(*args, log_name=agent)


def _summary(fed: Federation, agent: str) -> dict[str, object]:
    lines = (fed.lab.root / "logs" / f"{agent}.log").read_text().splitlines()
    summary: dict[str, object] = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    return summary


def _verify(fed: Federation) -> str:
    result = fed.lab.sekisho("records", "verify", "--config", str(fed.lab.controller_config), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """Two sites (tokyo: 2 agents, osaka: 1) bridged to a central broker, and one agent connected directly."""
    fed = Federation(tmp_path / "fed", sites={"tokyo": ["tk-1", "tk-2"], "osaka": ["os-1"]}, direct=["dc-1"])
    try:
        yield fed
    finally:
        fed.stop()


def test_bridged_events_are_stored_once_and_acks_empty_the_outboxes(federation: Federation) -> None:
    site = _start(federation)
    count = 200
    procs = {agent: _simulate(federation, agent, count) for agent in federation.agents()}

    for agent, proc in procs.items():
        # --exit-when-drained: 0 only once the controller's signed acks came back (through the bridge).
        assert proc.wait(timeout=180) == 0, (federation.lab.root / "logs" / f"{agent}.log").read_text()[-2000:]
    for agent in federation.agents():
        assert site.synthetic_seqs(agent) == list(range(count)), agent
        assert site.outbox_depth(agent) == 0, agent
    assert "OK" in _verify(federation)
    # The bridged agents really went through their site broker and its bridge, not the centre directly.
    for name in ("tokyo", "osaka"):
        assert federation.site_brokers[name].link.connections >= 1
    centre_log = federation.lab.broker.log_path.read_text()
    assert "as site.tokyo" in centre_log and "as site.osaka" in centre_log


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Federation]:
    """A central broker with sites tokyo (tk-1) and osaka (os-1), site brokers running, no controller."""
    fed = Federation(tmp_path / "fed", sites={"tokyo": ["tk-1"], "osaka": ["os-1"]})
    fed.start()
    try:
        yield fed
    finally:
        fed.stop()


def _site_client(fed: Federation, site: str, client_id: str) -> SyncClient:
    creds = SiteCredentials.at(fed.lab.pki_dir, site)
    return connect_client(
        TlsFiles(creds.ca_cert, creds.tls_cert, creds.tls_key),
        fed.lab.broker.site_port,
        client_id,
        identity=creds.common_name,
    )


def test_a_site_cannot_speak_or_listen_for_another_sites_agent(central: Federation) -> None:
    pki = PkiPaths.at(central.lab.pki_dir)
    controller = connect_client(
        TlsFiles(pki.ca_cert, pki.controller_cert, pki.controller_key),
        central.lab.broker.controller_port,
        "controller-test",
    )
    # Stop tokyo's bridge: the test takes its identity on the sites listener (its client id is its CN).
    central.site_brokers["tokyo"].broker.stop()
    tokyo = _site_client(central, "tokyo", "anything")
    try:
        assert [r.value for r in controller.subscribe_wait("sekisho/#")] == [1]
        assert [r.value for r in tokyo.subscribe_wait(topics.topic("os-1", topics.ACKS))] == [1]
        assert [r.value for r in tokyo.subscribe_wait(topics.topic("tk-1", topics.ACKS))] == [1]

        forged = tokyo.publish_wait(topics.topic("os-1", topics.EVENTS), b"forged")
        assert forged.value == 135, forged  # not authorised
        assert not tokyo.publish_wait(topics.topic("tk-1", topics.EVENTS), b"genuine").is_failure
        # The forged message never reached the controller: the genuine one is the first thing it sees.
        first = controller.next_message()
        assert (first.topic, first.payload) == (topics.topic("tk-1", topics.EVENTS), b"genuine")

        # Downstream: tokyo receives its own agent's acks, never osaka's (the subscription is granted by
        # mosquitto's acl_file, the delivery is not).
        controller.publish_wait(topics.topic("os-1", topics.ACKS), b"for-osaka")
        controller.publish_wait(topics.topic("tk-1", topics.ACKS), b"for-tokyo")
        got = tokyo.next_message()
        assert (got.topic, got.payload) == (topics.topic("tk-1", topics.ACKS), b"for-tokyo")
        time.sleep(0.3)
        assert tokyo.received() == []
    finally:
        tokyo.close()
        controller.close()


def _settled(count: Callable[[], int], *, quiet_s: float, bound_s: float) -> int:
    """Return count() once it has not changed for quiet_s, or its value when bound_s has passed."""
    deadline = time.monotonic() + bound_s
    value, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return value


def _next_other_than(client: SyncClient, payload: bytes, timeout: float = 10) -> mqtt.MQTTMessage:
    """Return the next message whose payload is not ``payload`` (bounded: each wait is ``timeout``)."""
    for _ in range(1000):
        message = client.next_message(timeout)
        if message.payload != payload:
            return message
    raise AssertionError(f"only {payload!r} arrived")


def test_acks_and_policy_reach_the_site_and_the_retained_policy_stays_current(central: Federation) -> None:
    """Downstream through the bridge: an ack reaches the agent; a policy retained at the centre is retained at
    the site too, and a later one replaces it there (the bridge keeps the retain flag of live messages)."""
    pki = PkiPaths.at(central.lab.pki_dir)
    controller = connect_client(
        TlsFiles(pki.ca_cert, pki.controller_cert, pki.controller_key),
        central.lab.broker.controller_port,
        "controller-test",
    )
    site_port = central.site_brokers["tokyo"].broker.port
    policy = topics.topic("tk-1", topics.POLICY)
    agent = connect_client(central.lab.pki_dir, site_port, "tk-1")
    try:
        assert [r.value for r in agent.subscribe_wait(topics.topic("tk-1", topics.ACKS))] == [1]
        assert [r.value for r in agent.subscribe_wait(policy)] == [1]
        # The bridge's subscriptions at the centre may still be on their way: publish until the ack arrives.
        wait_for(
            lambda: (
                not controller.publish_wait(topics.topic("tk-1", topics.ACKS), b"ack").is_failure
                and any(m.payload == b"ack" for m in agent.received())
            ),
            30,
            "an ack through the bridge",
        )
        controller.publish_wait(policy, b"policy-1", retain=True)
        # Acks published by earlier rounds of the wait may still be crossing the bridge: pass over them.
        assert _next_other_than(agent, b"ack").payload == b"policy-1"
        controller.publish_wait(policy, b"policy-2", retain=True)
        assert _next_other_than(agent, b"ack").payload == b"policy-2"
    finally:
        agent.close()
        controller.close()
    # A later subscriber at the site (an agent restarting) is handed the current policy by its site broker.
    again = connect_client(central.lab.pki_dir, site_port, "tk-1")
    try:
        again.subscribe_wait(policy)
        message = again.next_message(10)
        assert (message.payload, message.retain) == (b"policy-2", True)
    finally:
        again.close()


def test_a_site_cannot_join_the_controllers_shared_subscription(central: Federation) -> None:
    # mosquitto's acl_file grants every SUBSCRIBE: without the plugin in sites mode on the sites listener, a
    # site certificate joined $share/controllers and took a share of every site's events (dropped at delivery).
    central.site_brokers["tokyo"].broker.stop()
    tokyo = _site_client(central, "tokyo", "anything")
    try:
        for refused in (SHARED_EVENTS, topics.all_agents(topics.EVENTS), "$SYS/#"):
            granted = tokyo.subscribe_wait(refused)
            assert all(r.value >= 128 for r in granted), (refused, granted)
        # Its own agent's exact topic is still the acl_file's to decide (granted), as the bridge needs.
        granted = tokyo.subscribe_wait(topics.topic("tk-1", topics.ACKS))
        assert all(r.value < 128 for r in granted), granted
    finally:
        tokyo.close()


def test_sites_listener_refuses_agent_and_controller_certificates(central: Federation) -> None:
    port = central.lab.broker.site_port
    pki = PkiPaths.at(central.lab.pki_dir)
    agent = central.lab.pki_dir / "agents" / "tk-1"
    for tls in (
        TlsFiles(pki.ca_cert, agent / "tls.crt", agent / "tls.key"),
        TlsFiles(pki.ca_cert, pki.controller_cert, pki.controller_key),
    ):
        with pytest.raises(ConnectRefused):
            connect_client(tls, port, "intruder", identity="tk-1").close()
    # …and a site's certificate does not open the agents' listener either.
    creds = SiteCredentials.at(central.lab.pki_dir, "tokyo")
    with pytest.raises(ConnectRefused):
        connect_client(
            TlsFiles(creds.ca_cert, creds.tls_cert, creds.tls_key), central.lab.broker.port, "site.tokyo"
        ).close()


@pytest.mark.parametrize("queue_limit", [None, 20], ids=["default-queue", "queue-overflow"])
def test_partition_behind_a_bridge_loses_and_duplicates_nothing(tmp_path: Path, queue_limit: int | None) -> None:
    """Cut the site's link to the centre while its agents keep producing; heal; every event stored once.

    With queue-overflow the site broker may queue only 20 messages for the centre, far fewer than the
    partition produces: mosquitto drops the rest (eclipse/mosquitto#2256 is a bridge that never recovers
    after that), and the agents' resends must still bring every event in.
    """
    fed = Federation(tmp_path / "fed", sites={"tokyo": ["tk-1", "tk-2", "tk-3"]}, max_queued_messages=queue_limit)
    try:
        site = _start(fed, resend_after_s=3)
        link = fed.site_brokers["tokyo"].link
        rate = 20.0
        count = int(rate * (PARTITION_S + 6))
        procs = {agent: _simulate(fed, agent, count, rate=rate, timeout=PARTITION_S + 180) for agent in fed.agents()}
        wait_for(lambda: site.count_events() > 0, 60, "the first events through the bridge")
        link.cut()
        started = time.monotonic()
        # What reached the centre before the cut may still be on its way into the store (a cold controller can
        # lag by more than a batch): count from when the store stops growing, within half the partition.
        cut_at = _settled(site.count_events, quiet_s=1.0, bound_s=PARTITION_S / 2)
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - started)))
        # Nothing crossed a cut link (a few events may still have been in the controller's batch).
        during = site.count_events()
        link.heal()

        for agent, proc in procs.items():
            assert proc.wait(timeout=PARTITION_S + 200) == 0, (fed.lab.root / "logs" / f"{agent}.log").read_text()[
                -2000:
            ]
        expected = list(range(count))
        for agent in fed.agents():
            seqs = site.synthetic_seqs(agent)
            assert len(seqs) == len(set(seqs)), f"{agent}: duplicates stored"
            assert seqs == expected, f"{agent}: lost {sorted(set(expected) - set(seqs))[:10]}"
            assert site.outbox_depth(agent) == 0
        assert "OK" in _verify(fed)
        # The partition was real and produced a backlog: events were made while the centre saw none,
        # and the bridge came back on a new connection.
        assert during - cut_at < 3 * len(fed.agents())
        assert site.count_events() - during > rate * PARTITION_S
        assert link.connections >= 2
        site_log = fed.site_brokers["tokyo"].broker.log_path.read_text()
        if queue_limit is not None:
            # The site broker's queue for the centre really overflowed (and the bridge recovered anyway).
            assert "Outgoing messages are being dropped for client local.site.tokyo" in site_log
        # Agents published again what the cut left unacknowledged: duplicates reached the controller,
        # which stored each event once (idempotent on (agent, seq)).
        assert sum(int(str(_summary(fed, a)["resent"])) for a in fed.agents()) > 0
    finally:
        fed.stop()


def test_sites_acl_gives_each_agent_to_one_site_only() -> None:
    text = render_sites_acl({"tokyo": ["tk-1"], "osaka": ["os-1"]})
    tokyo = text.split("user site.tokyo", 1)[1]
    assert "sekisho/v1/agents/tk-1/events" in tokyo and "os-1" not in tokyo
    with pytest.raises(ValueError, match="tk-1"):
        render_sites_acl({"tokyo": ["tk-1"], "osaka": ["tk-1"]})


def test_bridge_config_is_persistent_bounded_and_per_agent(tmp_path: Path, pki: Path) -> None:
    spec = BridgeSpec.for_site(pki, "nagoya", "central.example", 8885, ["ng-1"])
    text = render_bridge(spec)
    options = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "cleansession false" in options
    assert "address central.example:8885" in options
    assert "remote_clientid site.nagoya" in options
    assert "topic sekisho/v1/agents/ng-1/events out 1" in options
    assert "topic sekisho/v1/agents/ng-1/acks in 1" in options
    assert not any("#" in line or "+" in line for line in options if line.startswith("topic "))
    with pytest.raises(ValueError):
        render_bridge(dataclasses.replace(spec, central_host="evil\nlistener 1"))


def test_issue_site_names_the_certificate_site_dot_name(tmp_path: Path, pki: Path) -> None:
    own = tmp_path / "pki"
    shutil.copytree(pki, own)
    creds = issue_site(own, "kobe")

    cert = load_cert(creds.tls_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site.kobe"
    # Signed by the site bridge CA, not by the agents' CA: the agents' listener does not trust it.
    assert cert.issuer == load_cert(own / SITE_CA_DIR / "ca.crt").subject
    assert creds.ca_cert.read_bytes() == PkiPaths.at(own).ca_cert.read_bytes()
    with pytest.raises(PkiError):
        issue_site(own, "kobe")
    with pytest.raises(PkiError):
        issue_site(own, "Bad.Name")


def _options(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_examples_match_rendered_files() -> None:
    examples = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
    etc = Path("/etc/mosquitto/sekisho")
    central = render_sites_listener(
        port=8885,
        pki_dir=etc,
        sites_acl_path=etc / "acl-sites",
        plugin_path=Path("/usr/local/lib/sekisho/sekisho_agent_acl.so"),
        bind="0.0.0.0",
    )
    assert _options((examples / "central-sites.conf.example").read_text()) == _options(central)
    acl = render_sites_acl({"tokyo": ["tokyo-pc-01", "tokyo-door-01"], "osaka": ["osaka-pc-01"]})
    assert _options((examples / "acl-sites.example").read_text()) == _options(acl)
    spec = BridgeSpec(
        site="tokyo",
        central_host="central.example.jp",
        central_port=8885,
        agents=("tokyo-pc-01", "tokyo-door-01"),
        cert=etc / "site" / "tls.crt",
        key=etc / "site" / "tls.key",
        cafile=etc / "site" / "ca.crt",
    )
    site = render_bridge_limits() + render_bridge(spec)
    assert _options((examples / "site-bridge.conf.example").read_text()) == _options(site)


def test_emqx_acl_grants_what_the_mosquitto_acls_grant() -> None:
    sites = {"tokyo": ["tokyo-pc-01", "tokyo-door-01"], "osaka": ["osaka-pc-01"]}
    text = render_emqx_acl(sites)
    example = Path(__file__).resolve().parent.parent / "deploy" / "emqx" / "acl.conf.example"
    assert _options(example.read_text()) == _options(text)
    rules = [line for line in text.splitlines() if line.startswith("{")]
    # Everything not granted is refused, and the controllers' rule comes from the controller CN only.
    assert rules[-1] == "{deny, all}."
    assert rules[0] == '{allow, {username, "controller"}, all, ["sekisho/v1/agents/#"]}.'
    tokyo = [rule for rule in rules if '"site.tokyo"' in rule]
    assert len(tokyo) == 2 and all("osaka-pc-01" not in rule for rule in tokyo)
    assert "sekisho/v1/agents/tokyo-pc-01/events" in tokyo[0] and "/acks" in tokyo[1]
    with pytest.raises(ValueError):
        render_emqx_acl({"tokyo": ["tk-1"], "osaka": ["tk-1"]})
