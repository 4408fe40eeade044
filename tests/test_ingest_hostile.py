"""Ingest never stalls on one message (issue 10, item 1).

Regression for the attack run: an event or heartbeat from any agent certificate holding a lone surrogate
escape or nested ~985 levels deep made signature verification raise UnicodeEncodeError / RecursionError;
only Rejected was caught, so the batch was retried forever and no agent's events were stored any more.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from support.lab import lab_on, running_site
from support.mqtt import connect_client
from support.site import wait_for

from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import load_config
from sekisho.controller.ingest.worker import IngestWorker, _Incoming
from sekisho.controller.service import Controller
from sekisho.controller.store import Store, make_engine
from sekisho.controller.store.db import upgrade
from sekisho.controller.store.models import DeadLetter, Event
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab
from sekisho.protocol import errors, events, signing, topics

HONEST = "term-h1"
HOSTILE = "term-x1"
SURROGATE_EVENT = (
    b'{"event":{"agent":"term-x1","at":"2026-12-01T00:00:00.000000Z","clock":{"offset_ms":null,"synced":false},'
    b'"id":"0000000000000000000000000000000a","payload":{"n":1,"note":"\\ud800"},"seq":1,"type":"test.synthetic",'
    b'"v":1},"sig":"AAAA"}'
)
DEEP_EVENT = (
    b'{"event":{"agent":"term-x1","at":"2026-12-01T00:00:00.000000Z","clock":{"offset_ms":null,"synced":false},'
    b'"id":"0000000000000000000000000000000b","payload":{"n":' + b"[" * 985 + b"]" * 985 + b'},"seq":2,'
    b'"type":"test.synthetic","v":1},"sig":"AAAA"}'
)
SURROGATE_HEARTBEAT = b'{"heartbeat":{"agent":"term-x1","v":1,"version":"\\udfff"},"sig":"AAAA"}'
DEEP_HEARTBEAT = b'{"heartbeat":{"agent":"term-x1","v":1,"x":' + b"[" * 985 + b"]" * 985 + b'},"sig":"AAAA"}'


def _key(lab: Lab, name: str) -> Ed25519PrivateKey:
    return signing.load_private_key(AgentCredentials.at(lab.pki_dir, name).signing_key)


def _honest(lab: Lab, seq: int) -> bytes:
    return events.build_event(_key(lab, HONEST), agent=HONEST, seq=seq, type="test.synthetic", payload={"n": seq})


@pytest.fixture
def running(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    # Keys re-read every second: the key-swap test waits for ingest to see the swapped database row.
    with running_site(pki, tmp_path / "site", agents=(HONEST, HOSTILE), ingest_stall_s=5, key_refresh_s=1) as site:
        yield site


@pytest.mark.broker
def test_one_hostile_message_never_stops_ingest_for_the_others(running: tuple[Lab, Controller]) -> None:
    lab, ctl = running
    honest = connect_client(lab.pki_dir, lab.broker.port, HONEST)
    hostile = connect_client(lab.pki_dir, lab.broker.port, HOSTILE)
    try:
        honest.publish_wait(topics.topic(HONEST, topics.EVENTS), _honest(lab, 1))
        for raw in (SURROGATE_EVENT, DEEP_EVENT):
            hostile.publish_wait(topics.topic(HOSTILE, topics.EVENTS), raw)
        for raw in (SURROGATE_HEARTBEAT, DEEP_HEARTBEAT):
            hostile.publish_wait(topics.topic(HOSTILE, topics.HEARTBEAT), raw, qos=0)
        for seq in (2, 3):
            honest.publish_wait(topics.topic(HONEST, topics.EVENTS), _honest(lab, seq))
        wait_for(lambda: ctl.store.event_seqs(HONEST) == [1, 2, 3], 15, "the honest agent's events to be stored")
        wait_for(lambda: ctl.worker.stats.dead_lettered >= 2, 10, "the hostile events to be dead-lettered")
    finally:
        honest.close()
        hostile.close()
    letters = ctl.store.list_dead_letters(limit=10)
    assert sorted((d.agent_id, d.reason) for d in letters) == [(HOSTILE, errors.MALFORMED)] * 2
    assert {d.detail for d in letters} >= {"string holds a lone surrogate (not encodable as UTF-8)"}
    assert ctl.worker.stats.store_errors == 0
    assert ctl.worker.stats.reasons["heartbeat_malformed"] == 2
    assert ctl.worker.stats.waiting == 0  # everything released: nothing left for the broker to redeliver
    api = TestClient(create_app(AppState(ctl.config, ctl.store, ctl.worker.stats)))
    assert api.get("/readyz").status_code == 200


def _refuse_rows(lab: Lab, table: str, where: str) -> None:
    """Make the real database refuse some rows (a trigger), as a broken or hostile store would."""
    with sqlite3.connect(lab.root / "controller" / "controller.db") as db:
        db.execute(
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN {where} "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )


def _allow_rows(lab: Lab, table: str) -> None:
    with sqlite3.connect(lab.root / "controller" / "controller.db") as db:
        db.execute(f"DROP TRIGGER refuse_{table}")


@pytest.mark.broker
def test_a_message_the_store_keeps_refusing_is_dead_lettered_and_released(running: tuple[Lab, Controller]) -> None:
    lab, ctl = running
    _refuse_rows(lab, "events", "NEW.seq = 3")
    client = connect_client(lab.pki_dir, lab.broker.port, HONEST)
    try:
        for seq in range(1, 6):
            client.publish_wait(topics.topic(HONEST, topics.EVENTS), _honest(lab, seq))
        # The batch fails, is split, the others are stored, and seq 3 ends as a dead letter.
        wait_for(lambda: ctl.store.event_seqs(HONEST) == [1, 2, 4, 5], 60, "the other events to be stored")
        wait_for(lambda: ctl.worker.stats.reasons[errors.UNPROCESSABLE] == 1, 60, "seq 3 to be given up")
    finally:
        client.close()
    [letter] = ctl.store.list_dead_letters(limit=10)
    assert (letter.reason, letter.agent_id) == (errors.UNPROCESSABLE, HONEST)
    assert json.loads(letter.payload)["event"]["seq"] == 3  # kept whole, for whoever investigates
    assert ctl.worker.stats.waiting == 0


@pytest.mark.broker
def test_readyz_turns_unready_while_ingest_cannot_advance_and_nothing_is_lost(
    running: tuple[Lab, Controller],
) -> None:
    lab, ctl = running
    _refuse_rows(lab, "events", "1")
    _refuse_rows(lab, "dead_letters", "1")  # the store takes nothing at all: no message may be given up
    api = TestClient(create_app(AppState(ctl.config, ctl.store, ctl.worker.stats)))
    client = connect_client(lab.pki_dir, lab.broker.port, HONEST)
    try:
        client.publish_wait(topics.topic(HONEST, topics.EVENTS), _honest(lab, 1))
        wait_for(lambda: api.get("/readyz").status_code == 503, 60, "/readyz to report the stall")
        assert api.get("/readyz").json()["checks"]["ingest"].startswith("stalled")
        assert ctl.store.event_seqs(HONEST) == []
        _allow_rows(lab, "events")
        _allow_rows(lab, "dead_letters")
        wait_for(lambda: ctl.store.event_seqs(HONEST) == [1], 60, "the event to be stored once the store works")
    finally:
        client.close()
    assert ctl.store.list_dead_letters(limit=10) == []
    wait_for(lambda: api.get("/readyz").status_code == 200, 10, "/readyz to recover")


@pytest.mark.broker
def test_a_key_swapped_into_agents_accepts_no_event(running: tuple[Lab, Controller]) -> None:
    """Someone who can write the database but not sign as the controller swaps an agent's key (attack run,
    item 8): `records verify` reports it, and ingest must not accept events signed with the swapped key."""
    lab, ctl = running
    forger = Ed25519PrivateKey.generate()
    swapped = signing.public_key_pem(forger.public_key()).decode()
    with sqlite3.connect(lab.root / "controller" / "controller.db") as db:
        db.execute("UPDATE agents SET public_key_pem = ? WHERE id = ?", (swapped, HOSTILE))
    client = connect_client(lab.pki_dir, lab.broker.port, HOSTILE)
    honest = connect_client(lab.pki_dir, lab.broker.port, HONEST)
    seq = 0

    def forged_refused_as_unknown() -> bool:
        # Each try is signed by the forger; until ingest re-reads the keys it fails the old key's signature.
        nonlocal seq
        seq += 1
        raw = events.build_event(forger, agent=HOSTILE, seq=seq, type="test.synthetic", payload={"n": seq})
        client.publish_wait(topics.topic(HOSTILE, topics.EVENTS), raw)
        return any(d.reason == errors.UNKNOWN_AGENT for d in ctl.store.list_dead_letters(limit=100))

    try:
        wait_for(forged_refused_as_unknown, 20, "ingest to refuse the key no signed key line vouches for")
        honest.publish_wait(topics.topic(HONEST, topics.EVENTS), _honest(lab, 1))
        wait_for(lambda: ctl.store.event_seqs(HONEST) == [1], 15, "the honest agent's event to be stored")
    finally:
        client.close()
        honest.close()
    assert ctl.store.event_seqs(HOSTILE) == []
    assert {d.reason for d in ctl.store.list_dead_letters(limit=100)} <= {errors.BAD_SIGNATURE, errors.UNKNOWN_AGENT}


# --- the real worker's batch step, fed anything ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.characters(codec=None, exclude_categories=())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@pytest.fixture(scope="module")
def worker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestWorker]:
    """A real IngestWorker on a real SQLite store, not connected: process() is exercised directly."""
    root = tmp_path_factory.mktemp("fuzz")
    lab = lab_on(pki, root / "site")
    lab.write_controller_config()
    lab.add_agent(HONEST)
    config = load_config(lab.controller_config)
    engine = make_engine(config.resolved_database_url())
    upgrade(engine)
    store = Store(engine)
    store.register_agent(HONEST, AgentCredentials.at(lab.pki_dir, HONEST).signing_pub.read_text())
    yield IngestWorker(config, store)
    engine.dispose()


def _count(store: Store, table: type[Event] | type[DeadLetter]) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
        json_values.map(lambda v: json.dumps({"event": v, "sig": "AAAA"}).encode()),
        json_values.map(lambda v: json.dumps({"heartbeat": v, "sig": "AAAA"}).encode()),
    ),
    channel=st.sampled_from([topics.EVENTS, topics.HEARTBEAT]),
)
def test_process_never_raises_and_keeps_every_event_message(worker: IngestWorker, payload: bytes, channel: str) -> None:
    """Whatever arrives, process() returns, and an event message is either stored or kept as a dead letter."""
    before = _count(worker.store, Event) + _count(worker.store, DeadLetter)
    worker.process([_Incoming(topics.topic(HONEST, channel), payload, mid=1, qos=0)])
    after = _count(worker.store, Event) + _count(worker.store, DeadLetter)
    assert after == before + (1 if channel == topics.EVENTS else 0)
