"""A fact only from its owner (issue 10, item 2), against the real broker, controller and store.

Regression for the attack run: a terminal agent that drives no door signed "p-0001 left room-1" and
"k-archive returned", and who-is-inside and the key-lending register changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.lab import running_site
from support.mqtt import SyncClient, connect_client

from sekisho.controller.ingest.worker import NOT_OWNER_FINDING
from sekisho.controller.service import Controller
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab
from sekisho.protocol import errors, events, messages, signing, topics

pytestmark = pytest.mark.broker
DOOR_AGENT, TERMINAL_AGENT = "door-o1", "term-o1"


def _policy(path: Path) -> Path:
    doc = {
        "site": {"name": "ownership test"},
        "people": [{"id": "p-0001", "name": "見本 太郎"}],
        "areas": [{"id": "a-room", "name": "管理区域"}],
        "terminals": [{"id": "t-1", "name": "端末", "agent": TERMINAL_AGENT, "handlers": ["p-0001"]}],
        "doors": [
            {"id": "room-1", "name": "扉", "kind": "room", "agent": DOOR_AGENT, "area": "a-room",
             "allowed": ["p-0001"], "readers": [{"id": "rdr-in", "direction": "entry"}], "relay": 0, "sensor": 0},
            {"id": "keys-1", "name": "鍵保管庫", "kind": "key_cabinet", "agent": DOOR_AGENT, "allowed": ["p-0001"],
             "readers": [{"id": "rdr-keys"}], "relay": 1, "sensor": 1},
        ],
        "key_cabinets": [{"door": "keys-1", "slots": [{"index": 0, "key": "k-archive", "name": "書庫の鍵"}]}],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


@pytest.fixture
def running(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    policy = _policy(tmp_path / "site.yaml")
    with running_site(pki, tmp_path / "site", agents=(DOOR_AGENT, TERMINAL_AGENT), policy=policy) as site:
        yield site


class Sender:
    """One agent's certificate and signing key: publishes its own signed events in sequence."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.name = name
        creds = AgentCredentials.at(lab.pki_dir, name)
        self.key: Ed25519PrivateKey = signing.load_private_key(creds.signing_key)
        self.controller = signing.load_public_key(creds.controller_signing_pub)
        self.client: SyncClient = connect_client(lab.pki_dir, lab.broker.port, name)
        self.client.subscribe_wait(topics.topic(name, topics.ACKS))
        self.seq = 0

    def send(self, type_: str, payload: dict[str, Any]) -> int:
        self.seq += 1
        raw = events.build_event(self.key, agent=self.name, seq=self.seq, type=type_, payload=payload)
        self.client.publish_wait(topics.topic(self.name, topics.EVENTS), raw)
        return self.seq

    def acked(self, want: set[int]) -> set[int]:
        seqs: set[int] = set()
        while not want <= seqs:
            ack = messages.open_ack(self.client.next_message(timeout=10).payload, self.controller, self.name)
            for first, last in ack.ranges:
                seqs.update(range(first, last + 1))
        return seqs


FORGED = [
    ("door.opened", {"door": "room-1", "person": "p-0001"}),
    ("key.returned", {"door": "keys-1", "slot": 0, "key": "k-archive", "person": "p-0001"}),
    ("door.passback_forgiven", {"area": "a-room", "person": "p-0001", "cause": "command"}),
    ("door.access_granted", {"door": "room-1", "person": "p-0001", "card_masked": "****0001", "rule": "allowed",
                             "area": "a-room", "direction": "exit", "reader": "rdr-in"}),
]  # fmt: skip


def test_a_terminal_agent_cannot_state_door_key_or_area_facts(running: tuple[Lab, Controller]) -> None:
    lab, ctl = running
    door, terminal = Sender(lab, DOOR_AGENT), Sender(lab, TERMINAL_AGENT)
    try:
        honest_before = door.send("door.opened", {"door": "room-1"})
        forged = [terminal.send(type_, payload) for type_, payload in FORGED]
        # The door agent may not state a terminal's facts either.
        login = door.send("login.granted", {"terminal": "t-1", "person": "p-0001", "user": "taro", "methods": ["card"]})
        honest_after = door.send("door.closed", {"door": "room-1", "open_seconds": 3})
        own_login = terminal.send(
            "login.granted", {"terminal": "t-1", "person": "p-0001", "user": "taro", "methods": ["card"]}
        )
        # Refused facts are acked (signed: resending changes nothing), so neither agent resends forever.
        assert terminal.acked({*forged, own_login}) >= {*forged, own_login}
        assert door.acked({honest_before, login, honest_after}) >= {honest_before, login, honest_after}
    finally:
        door.client.close()
        terminal.client.close()

    assert ctl.store.event_seqs(DOOR_AGENT) == [honest_before, honest_after]
    assert ctl.store.event_seqs(TERMINAL_AGENT) == [own_login]
    letters = ctl.store.list_dead_letters(limit=20)
    assert sorted((d.agent_id, d.seq) for d in letters if d.reason == errors.NOT_OWNER) == sorted(
        [(TERMINAL_AGENT, s) for s in forged] + [(DOOR_AGENT, login)]
    )
    assert all("not driven by" in d.detail or "not served by" in d.detail or "has no door" in d.detail
               for d in letters)  # fmt: skip
    # Raised as possible tampering: one open finding per agent, counting its refused facts.
    found = {f.agent_id: f for f in ctl.store.list_findings(open_only=True, kind=NOT_OWNER_FINDING)}
    assert set(found) == {TERMINAL_AGENT, DOOR_AGENT}
    assert found[TERMINAL_AGENT].detail["count"] == len(FORGED)
    assert found[TERMINAL_AGENT].detail["reason"] == "possible tampering"
    # The registers never saw the forged facts: no key came back, nobody moved.
    with ctl.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM key_loans").scalar_one() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM area_presence").scalar_one() == 0
