"""A door agent keeps deciding with the controller unreachable, and nothing it decided is lost.

Real mosquitto (mTLS + ACL) and a real `sekisho controller serve` process; the door agent runs in the test
with the simulated reader link and lock board (their real drivers are covered over ptys elsewhere). The
broker is stopped, people come and go, a key is taken; the broker comes back and every event reaches the
store exactly once, and the controller's registers show the loan and who is inside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from support.site import Site, wait_for

from sekisho.agents.doors.attach import AttachedDoors, attach_doors
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.controller.doors.projector import DoorProjector
from sekisho.controller.doors.registers import DoorRegisters
from sekisho.drivers.locker import SimulatedLockerBoard
from sekisho.drivers.osdp import ReaderConfig, SimulatedReaderLink
from sekisho.drivers.smartcard import hash_uid
from sekisho.protocol import events

pytestmark = [pytest.mark.broker, pytest.mark.faults]

AGENT = "door-t1"
SITE_KEY = b"doors-offline-test-site-key-0001"
KEY = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
ALICE, BOB = bytes.fromhex("0a11ce01"), bytes.fromhex("0b0b0b02")


def _site_yaml(path: Path) -> Path:
    doc = {
        "site": {"name": "offline test"},
        "people": [{"id": "p-alice", "name": "Alice"}, {"id": "p-bob", "name": "Bob"}],
        "cards": [
            {"id": "c-alice", "person": "p-alice", "kind": "osdp", "uid_hash": hash_uid(ALICE, SITE_KEY)},
            {"id": "c-bob", "person": "p-bob", "kind": "osdp", "uid_hash": hash_uid(BOB, SITE_KEY)},
        ],
        "areas": [{"id": "a-room", "name": "管理区域"}],
        "doors": [
            {
                "id": "room-1",
                "name": "room",
                "kind": "room",
                "agent": AGENT,
                "area": "a-room",
                "allowed": ["p-alice", "p-bob"],
                "readers": [{"id": "rdr-in", "direction": "entry"}, {"id": "rdr-out", "direction": "exit"}],
                "relay": 0,
                "sensor": 0,
            },
            {
                "id": "keys-1",
                "name": "key cabinet",
                "kind": "key_cabinet",
                "agent": AGENT,
                "allowed": ["p-alice"],
                "readers": [{"id": "rdr-keys"}],
                "relay": 1,
                "sensor": 1,
            },
        ],
        "key_cabinets": [{"door": "keys-1", "slots": [{"index": 0, "key": "k-archive", "name": "書庫の鍵"}]}],
    }
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


@pytest.fixture
def door_agent(site: Site) -> Iterator[tuple[Agent, AttachedDoors, SimulatedReaderLink, SimulatedLockerBoard]]:
    """The controller serving, the policy applied, a door agent with simulated readers and board running."""
    site.lab.add_agent(AGENT, resend_after_s=3, heartbeat_interval_s=5, reconnect_max_s=2)
    site.lab.register_agents(AGENT)
    site.lab.spawn_controller(http=True)
    site.wait_ready()
    site.lab.sekisho(
        "policy", "apply", str(_site_yaml(site.lab.root / "site.yaml")), "--config", str(site.lab.controller_config)
    )
    agent = Agent(load_config(site.lab.agent_config(AGENT)))
    readers = SimulatedReaderLink(
        [ReaderConfig(reader_id=r, address=i + 1, scbk=KEY) for i, r in enumerate(("rdr-in", "rdr-out", "rdr-keys"))]
    )
    board = SimulatedLockerBoard(relays=2, doors=2, key_slots=1)
    doors = attach_doors(
        emit=agent.emit,
        policy=agent.policy,
        state_dir=agent.config.state_dir,
        readers=[readers],
        board=board,
        site_key=SITE_KEY,
        commands=agent.commands,
        tick_s=0.02,
    )
    agent.start()
    doors.start()
    try:
        wait_for(lambda: agent.policy.version == 1, 30, "the signed policy to reach the door agent")
        yield agent, doors, readers, board
    finally:
        doors.stop()
        agent.stop()


def _recorded(agent: Agent, type_: str, door: str) -> int:
    """Count the events of ``type_`` at ``door`` still in the agent's outbox (offline: all since the stop)."""
    decoded = [events.decode_event(raw, topic_agent=AGENT) for _, raw in agent.outbox.pending(limit=10_000)]
    return sum(1 for e in decoded if e.type == type_ and e.payload.get("door") == door)


def _then(agent: Agent, type_: str, door: str, act: Callable[[], object]) -> None:
    """Do ``act`` and wait until the door agent has recorded one more ``type_`` at ``door`` (past the debounce)."""
    before = _recorded(agent, type_, door)
    act()
    wait_for(lambda: _recorded(agent, type_, door) > before, 5, f"{type_} at {door}")


def _walk_through(agent: Agent, board: SimulatedLockerBoard, door: int) -> None:
    _then(agent, "door.opened", "room-1", lambda: board.open_door(door))
    _then(agent, "door.closed", "room-1", lambda: board.close_door(door))


def test_decisions_continue_offline_and_arrive_later(site: Site, door_agent: tuple) -> None:
    agent, _, readers, board = door_agent
    wait_for(lambda: agent.stats().outbox_depth == 0, 30, "the start-up events to be stored")
    site.lab.broker.stop()

    # The simulated reader link hands a tap to the door agent before present_card returns: decided at once.
    assert readers.present_card("rdr-in", ALICE)
    assert board.status().relays_commanded[0], "room relay released for Alice (offline)"
    _walk_through(agent, board, 0)
    assert readers.present_card("rdr-in", BOB)
    _walk_through(agent, board, 0)
    assert readers.present_card("rdr-keys", ALICE)
    assert board.status().relays_commanded[1], "key cabinet released for Alice (offline)"
    _then(agent, "door.opened", "keys-1", lambda: board.open_door(1))
    _then(agent, "key.taken", "keys-1", lambda: board.take_key(0))
    _then(agent, "door.closed", "keys-1", lambda: board.close_door(1))
    assert readers.present_card("rdr-out", BOB)
    _walk_through(agent, board, 0)
    denied = _recorded(agent, "door.access_denied", "keys-1")
    assert readers.present_card("rdr-keys", BOB)  # not allowed at the cabinet: refused offline too
    assert _recorded(agent, "door.access_denied", "keys-1") == denied + 1
    assert not board.status().relays_commanded[1]
    assert [c for c in board.relay_log() if c.relay == 1 and c.on] == [(1, True, "command")]  # Alice's only

    pending = agent.stats().outbox_depth
    assert pending >= 12, pending
    total = agent.stats().next_seq - 1
    site.lab.broker.start()
    wait_for(lambda: agent.stats().outbox_depth == 0, 60, "the buffered door events to be acknowledged")
    store = site.store()
    final = agent.stats().next_seq - 1  # timers (re-locks) may have added events since
    assert final >= total
    wait_for(lambda: len(store.event_seqs(AGENT)) >= final, 30, "every event stored")
    assert store.event_seqs(AGENT)[:final] == list(range(1, final + 1))  # every one, once, no gap
    assert store.verify_chains(AGENT, signatures=True) == []

    registers = DoorRegisters(store)
    DoorProjector(store).run()
    [loan] = registers.loans(open_=True)
    assert (loan.key, loan.person, loan.cabinet) == ("k-archive", "p-alice", "keys-1")
    assert [p.person for p in registers.inside("a-room")] == ["p-alice"]  # Bob went out again
    denied = [row for row in registers.log(door="keys-1") if row.type == "door.access_denied"]
    assert [(row.person, row.reason) for row in denied] == [("p-bob", "not_allowed")]
