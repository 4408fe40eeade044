"""Key rotation with history, and ingest and policy for revoked agents (issue 11, items 3 and 4).

The bug this pins down (issue 11, "Why"): after `register-agent --replace`, an event signed with the old key
and still in the agent's outbox was refused as a bad signature and never acknowledged, so the agent re-sent it
every 30 s for ever, and an old-key event stored after the first minutes read `BROKEN … signature invalid` in
`records verify`. Now a rotation signs a grace window into the key line: old-key events received within it
are accepted and marked (a finding), `records verify` checks them against the key that was valid then, and
those received after it are dead letters (`stale_key`), acknowledged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from store_fixtures import MakeAgent
from support.lab import running_site
from support.mqtt import SyncClient, connect_client
from support.site import wait_for

from sekisho.controller.ingest.worker import REPLACED_KEY_FINDING
from sekisho.controller.service import Controller
from sekisho.controller.store.store import Store
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab
from sekisho.protocol import errors, events, messages, signing, timefmt, topics
from sekisho.protocol.revocations import parse_broker_text

T0 = timefmt.parse("2026-01-05T09:00:00.000Z")
GRACE = timedelta(days=4)


# --- the store and `records verify` ------------------------------------------------------------------------


def test_old_key_events_received_within_the_grace_window_verify_clean(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent()
    store.register_agent(agent.agent_id, agent.pem, registered_at=T0)
    old = dataclasses.replace(agent)
    store.store_batch(agent.events(range(1, 4)), [], T0 + timedelta(minutes=1))
    agent.key = signing.generate_key()
    rotated = T0 + timedelta(hours=1)
    store.register_agent(agent.agent_id, agent.pem, replace=True, registered_at=rotated, key_grace=GRACE)
    store.store_batch(agent.events(range(4, 7)), [], rotated + timedelta(minutes=1))
    # Two days later the terminal comes back online and its outbox still holds an event signed before.
    store.store_batch([old.event(7)], [], rotated + timedelta(days=2))

    [register, replace] = store.key_history(agent.agent_id)
    assert (register.action, replace.action) == ("register", "replace")
    assert replace.previous_until == rotated + GRACE
    verification = store.verify_records(signatures=True)
    assert verification.problems == [] and verification.records == 7


def test_old_key_events_after_the_window_are_named(store: Store, make_agent: MakeAgent) -> None:
    agent = make_agent()
    store.register_agent(agent.agent_id, agent.pem, registered_at=T0)
    old = dataclasses.replace(agent)
    agent.key = signing.generate_key()
    store.register_agent(agent.agent_id, agent.pem, replace=True, registered_at=T0, key_grace=GRACE)
    store.store_batch([old.event(1)], [], T0 + GRACE + timedelta(minutes=10))
    [problem] = store.verify_chains(signatures=True)
    assert (problem.seq, problem.problem) == (1, "signature invalid")


def test_a_grace_window_cannot_be_edited_in(store: Store, make_agent: MakeAgent) -> None:
    from sqlalchemy import update

    from sekisho.controller.store.models import AgentKey

    agent = make_agent()
    store.register_agent(agent.agent_id, agent.pem, registered_at=T0)
    agent.key = signing.generate_key()
    store.register_agent(agent.agent_id, agent.pem, replace=True, registered_at=T0)  # no grace
    with store.engine.begin() as conn:
        conn.execute(
            update(AgentKey)
            .where(AgentKey.agent_id == agent.agent_id, AgentKey.version == 2)
            .values(previous_until=T0 + timedelta(days=365))
        )
    [problem] = store.verify_chains(signatures=True)
    assert problem.table == "agent_keys" and "line edited" in problem.problem


def test_revocation_list_names_revoked_agents(store: Store, make_agent: MakeAgent) -> None:
    kept, stolen = make_agent(store), make_agent(store)
    store.revoke_agent(stolen.agent_id)
    revocations = store.revocation_list()
    assert revocations.names == frozenset({stolen.agent_id})
    assert parse_broker_text(revocations.broker_text()).same_entries(revocations)
    assert kept.agent_id not in revocations.broker_text()


# --- ingest through the real broker -----------------------------------------------------------------------

AGENT = "term-k1"
STOLEN = "term-k2"


@pytest.fixture
def site(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    """A site whose controller re-reads keys every second (its broker list is written by the controller)."""
    with running_site(pki, tmp_path / "site", agents=(AGENT, STOLEN), key_refresh_s=1) as running:
        yield running


def _key(lab: Lab, name: str) -> signing.Ed25519PrivateKey:
    return signing.load_private_key(AgentCredentials.at(lab.pki_dir, name).signing_key)


def _acks(client: SyncClient, lab: Lab, name: str, want: set[int], timeout: float = 10.0) -> set[int]:
    """Collect the controller's acks to `name` until every seq in want is acked (bounded)."""
    controller = signing.load_public_key(AgentCredentials.at(lab.pki_dir, name).controller_signing_pub)
    seen: set[int] = set()
    deadline = timefmt.now() + timedelta(seconds=timeout)
    while not want <= seen and timefmt.now() < deadline:
        try:
            msg = client.next_message(timeout=0.5)
        except TimeoutError:
            continue
        ack = messages.open_ack(msg.payload, controller, name)
        for first, last in ack.ranges:
            seen.update(range(first, last + 1))
    return seen


def _agent(lab: Lab, name: str) -> SyncClient:
    client = connect_client(lab.pki_dir, lab.broker.port, name)
    client.subscribe_wait(topics.topic(name, topics.ACKS))
    return client


def _send(client: SyncClient, name: str, key: signing.Ed25519PrivateKey, seq: int) -> None:
    raw = events.build_event(key, agent=name, seq=seq, type="test.synthetic", payload={"n": seq})
    assert not client.publish_wait(topics.topic(name, topics.EVENTS), raw).is_failure


def _ingest_sees(ctl: Controller, name: str, *, rotated: bool = False, revoked: bool = False) -> None:
    """Wait (bounded) until ingest has re-read the keys (it does so when it looks one up, every key_refresh_s)."""
    ring = ctl.worker._keys

    def seen() -> bool:
        ring.get(name)
        return (not rotated or ring.previous(name) is not None) and (not revoked or ring.revoked(name) is not None)

    wait_for(seen, 10, "ingest to re-read the keys")


def _rotate(ctl: Controller, name: str, *, ago: timedelta) -> signing.Ed25519PrivateKey:
    """Replace the agent's key as `register-agent --replace` does, `ago` in the past; return the new key."""
    new = signing.generate_key()
    pem = signing.public_key_pem(new.public_key()).decode()
    ctl.store.register_agent(name, pem, replace=True, registered_at=timefmt.now() - ago, key_grace=GRACE)
    return new


def test_outbox_event_signed_with_the_old_key_is_accepted_and_marked(site: tuple[Lab, Controller]) -> None:
    lab, ctl = site
    old = _key(lab, AGENT)
    client = _agent(lab, AGENT)
    try:
        _send(client, AGENT, old, 1)
        assert _acks(client, lab, AGENT, {1}) >= {1}
        # Rotated two days ago (within the 4-day window): the outbox still held seq 2, signed with the old key.
        new = _rotate(ctl, AGENT, ago=timedelta(days=2))
        _ingest_sees(ctl, AGENT, rotated=True)
        _send(client, AGENT, old, 2)
        _send(client, AGENT, new, 3)
        assert _acks(client, lab, AGENT, {2, 3}) >= {2, 3}
    finally:
        client.close()
    assert ctl.store.event_seqs(AGENT) == [1, 2, 3]
    [finding] = [f for f in ctl.store.list_findings(open_only=True) if f.kind == REPLACED_KEY_FINDING]
    assert (finding.agent_id, finding.first_seq) == (AGENT, 2)
    assert ctl.store.verify_records(signatures=True).problems == []


def test_old_key_event_after_the_window_is_dead_lettered_and_acked(site: tuple[Lab, Controller]) -> None:
    lab, ctl = site
    old = _key(lab, AGENT)
    _rotate(ctl, AGENT, ago=GRACE + timedelta(hours=1))
    _ingest_sees(ctl, AGENT, rotated=True)
    client = _agent(lab, AGENT)
    try:
        _send(client, AGENT, old, 1)
        # Acknowledged: the agent drops it from its outbox instead of re-sending it every 30 s for ever.
        assert 1 in _acks(client, lab, AGENT, {1})
    finally:
        client.close()
    assert ctl.store.event_seqs(AGENT) == []
    [letter] = ctl.store.list_dead_letters(limit=10)
    assert (letter.reason, letter.agent_id, letter.seq) == (errors.STALE_KEY, AGENT, 1)
    assert "grace window" in letter.detail


def test_a_forged_event_is_still_not_acked_after_a_rotation(site: tuple[Lab, Controller]) -> None:
    lab, ctl = site
    _rotate(ctl, AGENT, ago=timedelta(days=1))
    _ingest_sees(ctl, AGENT, rotated=True)
    client = _agent(lab, AGENT)
    try:
        _send(client, AGENT, signing.generate_key(), 1)  # neither the new key nor the replaced one
        assert _acks(client, lab, AGENT, {1}, timeout=3) == set()
    finally:
        client.close()
    [letter] = ctl.store.list_dead_letters(limit=10)
    assert letter.reason == errors.BAD_SIGNATURE


@pytest.fixture
def unsynced(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    """A site whose broker has not learnt of revocations yet (as on another host before the next sync)."""
    with running_site(pki, tmp_path / "site", agents=(AGENT, STOLEN), key_refresh_s=1, revocation_list=None) as running:
        yield running


def test_ingest_refuses_a_revoked_agent_and_acks_so_it_stops_resending(unsynced: tuple[Lab, Controller]) -> None:
    lab, ctl = unsynced
    ctl.store.revoke_agent(STOLEN)
    _ingest_sees(ctl, STOLEN, revoked=True)
    client = _agent(lab, STOLEN)
    try:
        _send(client, STOLEN, _key(lab, STOLEN), 1)
        assert 1 in _acks(client, lab, STOLEN, {1})
    finally:
        client.close()
    assert ctl.store.event_seqs(STOLEN) == []
    [letter] = ctl.store.list_dead_letters(limit=10)
    assert (letter.reason, letter.agent_id, letter.seq) == (errors.REVOKED_AGENT, STOLEN, 1)


DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
IN_POLICY = "term-acc-01"  # a terminal the demo policy names


@pytest.fixture
def policy_site(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    """A site with the demo policy, so that every terminal has a retained bundle."""
    with running_site(
        pki, tmp_path / "site", agents=("term-hr-01", IN_POLICY), policy=DEMO_POLICY, key_refresh_s=1
    ) as running:
        yield running


def test_revoked_agent_gets_no_policy(policy_site: tuple[Lab, Controller]) -> None:
    lab, ctl = policy_site
    policy = topics.topic(IN_POLICY, topics.POLICY)
    assert ctl.keeper is not None
    keeper = ctl.keeper
    # The keeper's own first publication runs on its thread: let it finish before the test calls check() too,
    # or a bundle it computed before the revocation may be published after the test's clear.
    wait_for(lambda: keeper.publications.last_version is not None, timeout=10, what="the keeper's first publication")
    # What the broker holds for the agent, seen from the controllers' side (the agent itself is refused).
    watcher = connect_client(lab.pki_dir, lab.broker.controller_port, "controller-watch", identity="controller")
    try:
        watcher.subscribe_wait(policy)
        assert watcher.next_message(timeout=10).payload != b"", "no retained bundle before the revocation"
        ctl.store.revoke_agent(IN_POLICY)
        assert ctl.keeper is not None
        ctl.keeper.check()
        assert IN_POLICY not in ctl.keeper.service.bundles() and "term-hr-01" in ctl.keeper.service.bundles()
        # The retained bundle is deleted (an empty retained message), so no later subscriber gets it.
        assert watcher.next_message(timeout=10).payload == b""
    finally:
        watcher.close()
    later = connect_client(lab.pki_dir, lab.broker.controller_port, "controller-late", identity="controller")
    try:
        later.subscribe_wait(policy)
        with pytest.raises(TimeoutError):
            later.next_message(timeout=1.0)
    finally:
        later.close()
    # The controller also wrote the broker's list (its revocation_list is the lab broker's file).
    assert ctl.revocations is not None
    ctl.revocations.run_once()
    assert IN_POLICY in parse_broker_text(lab.broker.revocations_path.read_text()).names


def _heartbeat(agent: str, policy_version: int | None) -> messages.Heartbeat:
    """A heartbeat as ingest hands it to the policy keeper (only agent and policy version matter to it)."""
    return messages.Heartbeat(
        v=messages.PROTOCOL_VERSION, agent=agent, at=timefmt.fmt(timefmt.now()), version="1.0",
        boot_id="0" * 32, outbox_depth=0, next_seq=1, policy_version=policy_version, policy_state="stale",
    )  # fmt: skip


def test_a_stale_agent_gets_the_published_bundle_without_re_signing_the_fleet(
    policy_site: tuple[Lab, Controller], monkeypatch: pytest.MonkeyPatch
) -> None:
    # on_heartbeat runs on the ingest thread for every heartbeat: it once re-signed every agent's bundle for
    # each stale agent, which stalled ingest for minutes on a 1,000-agent site (sekisho bench fleet).
    lab, ctl = policy_site
    keeper = ctl.keeper
    assert keeper is not None
    wait_for(lambda: keeper.publications.last_version is not None, timeout=10, what="the keeper's first publication")
    published = keeper._published
    assert published is not None and IN_POLICY in published.bundles

    def no_fleet_signing() -> dict[str, bytes]:
        raise AssertionError("the whole fleet's bundles were signed again for one stale agent")

    monkeypatch.setattr(keeper.service, "bundles", no_fleet_signing)
    watcher = connect_client(lab.pki_dir, lab.broker.controller_port, "controller-watch", identity="controller")
    try:
        watcher.subscribe_wait(topics.topic(IN_POLICY, topics.POLICY))
        assert watcher.next_message(timeout=10).payload == published.bundles[IN_POLICY]  # the retained one
        keeper.on_heartbeat(_heartbeat(IN_POLICY, published.version - 1))
        # Sent again as it was signed at publication: same bytes, same signature.
        assert watcher.next_message(timeout=10).payload == published.bundles[IN_POLICY]
        # Within the cool-down a second stale heartbeat sends nothing more.
        keeper.on_heartbeat(_heartbeat(IN_POLICY, published.version - 1))
        with pytest.raises(TimeoutError):
            watcher.next_message(timeout=0.5)
    finally:
        watcher.close()
    # An agent registered after the publication gets a bundle signed for it alone.
    newcomer = "term-new-01"
    ctl.store.register_agent(newcomer, signing.public_key_pem(signing.generate_key().public_key()).decode())
    watcher = connect_client(lab.pki_dir, lab.broker.controller_port, "controller-watch2", identity="controller")
    try:
        watcher.subscribe_wait(topics.topic(newcomer, topics.POLICY))
        keeper.on_heartbeat(_heartbeat(newcomer, None))
        raw = watcher.next_message(timeout=10).payload
        bundle = messages.open_bundle(raw, keeper.service.key.public_key(), newcomer)
        assert bundle.bundle.version == published.version and bundle.bundle.agent == newcomer
    finally:
        watcher.close()
