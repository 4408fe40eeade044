"""The door agent behind the real protocols: OSDP reader stub (Secure Channel) and locker board stub, on ptys.

No simulation between the card and the coil: a card presented at the reader stub travels over OSDP to
libosdp in the agent, is decided from a signed policy in the agent's cache, recorded in the outbox, and
switches the coil in the board stub over the framed serial protocol; the reader stub shows the verdict.
Also: `start_doors` from a doors.toml, and a signed remote unlock arriving through the agent's commands.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sekisho.agents.doors.attach import AttachedDoors, attach_doors
from sekisho.agents.doors.run import DoorsSetupError, load_doors_settings, start_doors
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.deploy.pki import AgentCredentials, PkiPaths, issue_agent
from sekisho.drivers.locker import LockerBoardLink
from sekisho.drivers.osdp import OsdpReaderLink, ReaderConfig, ReaderEvent, ReaderStatus
from sekisho.drivers.smartcard import hash_uid
from sekisho.firmware_stubs.locker_board import StubBoardProcess
from sekisho.firmware_stubs.osdp_reader import StubReaderProcess
from sekisho.firmware_stubs.rs485 import Rs485Line
from sekisho.lab import write_toml
from sekisho.protocol import events, messages, signing
from sekisho.protocol.pin import hash_pin
from sekisho.protocol.policy import Card, Door, DoorReader, Person, Site, SitePolicy

pytestmark = pytest.mark.timeout(120)

AGENT = "door-stubs"
SITE_KEY = b"stub-test-site-key-0123456789abc"
SCBK = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
SCBK_2 = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf")
WRONG_KEY = bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf")
ALICE = bytes.fromhex("a11ce0a11ce0")
STRANGER = bytes.fromhex("0000deadbeef")
OSDP_RED, OSDP_GREEN = 1, 2  # OSDP's LED colour codes
PIN = "4321"


def _policy(*, pin: bool = False, second_locker: bool = False) -> dict[str, Any]:
    doors = [
        Door(
            id="locker-1",
            name="locker",
            kind="locker",
            agent=AGENT,
            allowed=["p-alice"],
            readers=[DoorReader(id="rdr-1")],
            relay=1,
            sensor=1,
            pin_required=pin,
            held_open_s=5,
        )
    ]
    if second_locker:
        doors.append(
            Door(
                id="locker-2",
                name="locker 2",
                kind="locker",
                agent=AGENT,
                allowed=["p-alice"],
                readers=[DoorReader(id="rdr-2")],
                relay=0,
                sensor=0,
            )
        )
    return SitePolicy(
        site=Site(name="stubs"),
        people=[Person(id="p-alice", name="Alice", pin_hash=hash_pin(PIN, iterations=10_000) if pin else None)],
        cards=[Card(id="c-alice", person="p-alice", kind="osdp", uid_hash=hash_uid(ALICE, SITE_KEY))],
        doors=doors,
    ).for_agent(AGENT)


@pytest.fixture
def agent(pki: Path, tmp_path: Path) -> Iterator[tuple[Agent, Path]]:
    """An agent (no broker: the controller is unreachable) with the signed door policy in its cache."""
    creds = AgentCredentials.at(pki, AGENT)
    if not creds.tls_cert.exists():  # the session PKI: issued by the first test that needs it
        issue_agent(pki, AGENT)
    config = write_toml(
        tmp_path / "agent" / "agent.toml",
        {
            "agent_id": AGENT,
            "broker_port": 9,  # nothing listens: the door must not care
            "ca_cert": str(creds.ca_cert),
            "tls_cert": str(creds.tls_cert),
            "tls_key": str(creds.tls_key),
            "signing_key": str(creds.signing_key),
            "controller_public_key": str(creds.controller_signing_pub),
            "state_dir": str(tmp_path / "agent" / "state"),
        },
    )
    running = Agent(load_config(config))
    key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
    bundle = messages.build_bundle(key, agent=AGENT, version=1, policy=_policy(), lifetime=timedelta(hours=1))
    assert running.policy.offer(bundle).status == "applied"
    try:
        yield running, pki
    finally:
        running.stop()


def _types(agent: Agent) -> list[str]:
    return [events.decode_event(raw, topic_agent=AGENT).type for _, raw in agent.outbox.pending(limit=10_000)]


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def rig(agent: tuple[Agent, Path]) -> Iterator[tuple[Agent, AttachedDoors, StubReaderProcess, StubBoardProcess]]:
    """The reader stub and the board stub on ptys, wired to the agent's doors."""
    running, _ = agent
    reader = StubReaderProcess(address=1, scbk=SCBK)
    board = StubBoardProcess(relays=2, doors=2, key_slots=0)
    doors = attach_doors(
        emit=running.emit,
        policy=running.policy,
        state_dir=running.config.state_dir,
        readers=[OsdpReaderLink(reader.master_fd, [ReaderConfig(reader_id="rdr-1", address=1, scbk=SCBK)])],
        board=LockerBoardLink(board.host, relays=2, doors=2, key_slots=0),
        site_key=SITE_KEY,
        commands=running.commands,
    )
    running.start()
    doors.start()
    try:
        reader.wait_status(online=True, secure=True, timeout=15)
        # The door's state as the board reports it has settled (the agent knows it is shut): from here an
        # opening without a grant is forced, not "found open at start".
        _wait(lambda: doors.inputs_reported)
        # No timer left: the sensor's first level has outlasted the debounce and is the door's known state.
        _wait(lambda: doors.core.next_deadline() is None)
        yield running, doors, reader, board
    finally:
        doors.stop()
        reader.close()
        board.close()


def test_card_to_coil_and_back(rig: tuple[Agent, AttachedDoors, StubReaderProcess, StubBoardProcess]) -> None:
    agent, _, reader, board = rig
    reader.present_card(ALICE, bits=48)
    board.wait_relay(1, True)  # the coil the policy names for locker-1, switched over the serial protocol
    # The reader shows the verdict: OSDP colour 2 (green), one beep.
    assert reader.wait_feedback("led")[-1]["on_color"] == OSDP_GREEN
    assert reader.wait_feedback("buzzer")[-1]["rep_count"] == 1
    board.open_door(1)
    board.wait_relay(1, False)  # released at once when the door opens: it re-locks as it closes
    board.close_door(1)
    _wait(lambda: "door.locked" in _types(agent)[-1:])
    types = _types(agent)
    granted = types.index("door.access_granted")
    assert types[granted - 1] == "card.presented"  # the tap, then the decision, then the movement
    assert types[granted + 1 :] == ["door.opened", "door.closed", "door.locked"]


def test_unknown_card_leaves_the_coil_alone(
    rig: tuple[Agent, AttachedDoors, StubReaderProcess, StubBoardProcess],
) -> None:
    agent, _, reader, board = rig
    before = len(board.relay_log())
    reader.present_card(bytes.fromhex("0000deadbeef"), bits=48)
    _wait(lambda: "door.access_denied" in _types(agent))
    assert reader.wait_feedback("led")[-1]["on_color"] == OSDP_RED
    assert reader.wait_feedback("buzzer")[-1]["rep_count"] == 3
    # A second stranger: taps are decided one after the other, each with its relay commands (acknowledged
    # by the board) done before the next, so once this one is refused the first has done all it would do.
    reader.present_card(bytes.fromhex("0000feedface"), bits=48)
    _wait(lambda: _types(agent).count("door.access_denied") == 2)
    board.state()  # a round trip to the stub: every coil change it made before is in its relay log now
    assert [c for c in board.relay_log()[before:] if c.on] == []
    assert "door.access_granted" not in _types(agent)


def _alarms(agent: Agent, type_: str = "door.alarm") -> list[str]:
    decoded = [events.decode_event(raw, topic_agent=AGENT) for _, raw in agent.outbox.pending(limit=10_000)]
    return [e.payload["alarm"] for e in decoded if e.type == type_]


def test_board_faults_become_alarms(rig: tuple[Agent, AttachedDoors, StubReaderProcess, StubBoardProcess]) -> None:
    agent, _, reader, board = rig
    # Forced open: the sensor opens with no grant.
    board.open_door(1)
    _wait(lambda: "forced_open" in _alarms(agent))
    board.close_door(1)
    _wait(lambda: "forced_open" in _alarms(agent, "door.alarm_cleared"))
    # Held open: granted, opened, not closed within held_open_s (5 s here).
    reader.present_card(ALICE, bits=48)
    board.wait_relay(1, True)
    board.open_door(1)
    _wait(lambda: "held_open" in _alarms(agent), timeout=10)
    board.close_door(1)
    _wait(lambda: "held_open" in _alarms(agent, "door.alarm_cleared"))
    # A welded relay: commanded on, its feedback contact never follows.
    board.stick_relay(1)
    reader.present_card(ALICE, bits=48)
    _wait(lambda: "relay_fault" in _alarms(agent))
    board.stick_relay(1, stuck=False)
    # Power loss: the board goes silent, then boots with every relay off and says so.
    board.power_cycle(1.5)
    _wait(lambda: "board_offline" in _alarms(agent), timeout=10)
    _wait(lambda: "board_offline" in _alarms(agent, "door.alarm_cleared"), timeout=10)


def test_card_and_pin_on_the_reader_keypad(
    rig: tuple[Agent, AttachedDoors, StubReaderProcess, StubBoardProcess], agent: tuple[Agent, Path]
) -> None:
    running, _, reader, board = rig
    key = signing.load_private_key(PkiPaths.at(agent[1]).controller_signing_key)
    bundle = messages.build_bundle(key, agent=AGENT, version=2, policy=_policy(pin=True), lifetime=timedelta(hours=1))
    assert running.policy.offer(bundle).status == "applied"
    reader.present_card(ALICE, bits=48)
    _wait(lambda: "door.access_pending" in _types(running))
    reader.enter_keys("9999#")  # wrong PIN: refused, the coil stays off
    _wait(lambda: "door.access_denied" in _types(running))
    assert [c for c in board.relay_log() if c.on] == []
    reader.present_card(ALICE, bits=48)
    _wait(lambda: _types(running).count("door.access_pending") == 2)
    reader.enter_keys(PIN + "#")  # over the OSDP keypad, inside the Secure Channel
    board.wait_relay(1, True)
    granted = [
        events.decode_event(raw, topic_agent=AGENT).payload
        for _, raw in running.outbox.pending(limit=10_000)
        if events.decode_event(raw, topic_agent=AGENT).type == "door.access_granted"
    ]
    assert granted[-1]["pin_checked"] is True
    assert PIN not in str(granted)  # the PIN itself is never recorded


def test_doors_toml_and_a_signed_remote_unlock(agent: tuple[Agent, Path], tmp_path: Path) -> None:
    running, pki = agent
    board = StubBoardProcess(relays=2, doors=2, key_slots=0, host_end="slave")
    config_dir = Path(running.config.state_dir).parent
    (config_dir / "site.key").write_bytes(SITE_KEY)
    toml = config_dir / "doors.toml"
    toml.write_text(
        f'site_key_file = "site.key"\n[board]\nkind = "serial"\ndevice = "{board.host}"\nrelays = 2\ndoors = 2\n'
    )
    os.chmod(toml, 0o600)
    settings, _ = load_doors_settings(config_dir / "agent.toml")
    assert settings.board.device == board.host
    doors = start_doors(running, config_dir / "agent.toml")
    try:
        key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
        _, raw = messages.build_command(
            key,
            agent=AGENT,
            name="door.unlock",
            args={"door": "locker-1", "seconds": 3},
            lifetime=timedelta(seconds=30),
        )
        outcome = running.commands.handle(raw)
        assert outcome.executed, outcome
        board.wait_relay(1, True)
        assert running.commands.handle(raw).reason == "replay"  # the same signed command never acts twice
        board.wait_relay(1, False, timeout=8)  # the window passes unopened: locked again
    finally:
        doors.stop()
        board.close()


def test_unsafe_doors_toml_is_refused(agent: tuple[Agent, Path]) -> None:
    running, _ = agent
    config_dir = Path(running.config.state_dir).parent
    toml = config_dir / "doors.toml"
    toml.write_text('site_key_file = "site.key"\n')
    os.chmod(toml, 0o666)
    with pytest.raises(DoorsSetupError, match="writable"):
        load_doors_settings(config_dir / "agent.toml")
    os.chmod(toml, 0o600)
    toml.write_text('site_key_file = "site.key"\nmystery = 1\n')
    with pytest.raises(DoorsSetupError, match="mystery"):
        load_doors_settings(config_dir / "agent.toml")
    # The OSDP readers' flood limit is a setting, held to values that still let a person's taps through.
    toml.write_text('site_key_file = "site.key"\nosdp_card_reads_per_s = 2.5\nosdp_card_read_burst = 5\n')
    settings, _ = load_doors_settings(config_dir / "agent.toml")
    assert (settings.osdp_card_reads_per_s, settings.osdp_card_read_burst) == (2.5, 5)
    toml.write_text('site_key_file = "site.key"\nosdp_card_reads_per_s = 0\n')
    with pytest.raises(DoorsSetupError, match="osdp_card_reads_per_s"):
        load_doors_settings(config_dir / "agent.toml")
    # A board that cannot be opened is a clear set-up error, and nothing is left running.
    (config_dir / "site.key").write_bytes(SITE_KEY)
    toml.write_text('site_key_file = "site.key"\n[board]\nkind = "serial"\ndevice = "/nonexistent/ttyX"\n')
    with pytest.raises(DoorsSetupError, match="door devices"):
        start_doors(running, config_dir / "agent.toml")


def test_new_reader_gets_its_own_key(tmp_path: Path) -> None:
    from sekisho.agents.doors.keys import install_reader_key
    from sekisho.drivers.osdp import CardRead
    from sekisho.drivers.osdp.errors import KeySetError

    reader = StubReaderProcess(address=1, install_mode=True)
    key_file = tmp_path / "keys" / "rdr-new.scbk"
    link = OsdpReaderLink(reader.master_fd, [ReaderConfig(reader_id="rdr-new", address=1, install_mode=True)])
    try:
        link.start()
        install_reader_key(link, "rdr-new", key_file)
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = bytes.fromhex(key_file.read_text())
        assert len(key) == 16 and link.secure("rdr-new")
        with pytest.raises(KeySetError, match="exists"):  # a key in use is never overwritten
            install_reader_key(link, "rdr-new", key_file)
        link.stop()
        # The door agent restarts with the saved key: the reader is secure and its cards count.
        cards: list[object] = []
        keyed = OsdpReaderLink(reader.master_fd, [ReaderConfig(reader_id="rdr-new", address=1, scbk=key)])
        keyed.subscribe(cards.append)
        keyed.start()
        try:
            _wait(lambda: keyed.secure("rdr-new"), timeout=15)
            reader.present_card(ALICE, bits=48)
            _wait(lambda: any(isinstance(c, CardRead) and c.data == ALICE for c in cards))
        finally:
            keyed.stop()
    finally:
        link.stop()
        reader.close()


# ---- a door box with two readers on one OSDP line ----


def _payloads(agent: Agent) -> list[tuple[str, dict[str, Any]]]:
    decoded = [events.decode_event(raw, topic_agent=AGENT) for _, raw in agent.outbox.pending(limit=10_000)]
    return [(e.type, e.payload) for e in decoded]


def _index(records: list[tuple[str, dict[str, Any]]], type_: str, **fields: Any) -> int:
    """Return the position of the first record of ``type_`` whose payload has these fields."""
    for position, (kind, payload) in enumerate(records):
        if kind == type_ and all(payload.get(key) == value for key, value in fields.items()):
            return position
    raise AssertionError(f"no {type_} with {fields}")


def _delivered(link: OsdpReaderLink) -> None:
    """Return once every reader event the link queued so far has reached its observers (the door core too)."""
    got = threading.Event()

    def late(event: ReaderEvent) -> None:
        if isinstance(event, ReaderStatus):
            got.set()

    unsubscribe = link.subscribe(late)
    try:
        assert got.wait(5), "the link's events were not delivered"
    finally:
        unsubscribe()


@dataclass
class Box:
    """The agent's doors behind two OSDP readers on one line (stubs by address) and the board stub."""

    agent: Agent
    doors: AttachedDoors
    link: OsdpReaderLink
    readers: dict[str, StubReaderProcess]
    board: StubBoardProcess
    line: Rs485Line
    extra: list[object] = field(default_factory=list)


@pytest.fixture
def box(agent: tuple[Agent, Path]) -> Iterator[Callable[..., Box]]:
    """Build the box: ``stubs`` overrides what each reader stub is (``{"rdr-1": {"scbk": WRONG_KEY}}``)."""
    made: list[Box] = []
    running, pki = agent

    def build(stubs: dict[str, dict[str, Any]] | None = None) -> Box:
        key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
        policy = _policy(second_locker=True)
        bundle = messages.build_bundle(key, agent=AGENT, version=2, policy=policy, lifetime=timedelta(hours=1))
        assert running.policy.offer(bundle).status == "applied"
        wanted = {"rdr-1": {"scbk": SCBK}, "rdr-2": {"scbk": SCBK_2}, **(stubs or {})}
        readers = {
            reader_id: StubReaderProcess(address=address, **wanted[reader_id])
            for address, reader_id in ((1, "rdr-1"), (2, "rdr-2"))
        }
        line = Rs485Line({1: readers["rdr-1"].master_fd, 2: readers["rdr-2"].master_fd})
        link = OsdpReaderLink(
            line.master_fd,
            [
                ReaderConfig(reader_id="rdr-1", address=1, scbk=SCBK),
                ReaderConfig(reader_id="rdr-2", address=2, scbk=SCBK_2),
            ],
            reconnect_initial=0.5,
            reconnect_max=1.0,
        )
        board = StubBoardProcess(relays=2, doors=2, key_slots=0)
        doors = attach_doors(
            emit=running.emit,
            policy=running.policy,
            state_dir=running.config.state_dir,
            readers=[link],
            board=LockerBoardLink(board.host, relays=2, doors=2, key_slots=0),
            site_key=SITE_KEY,
            commands=running.commands,
        )
        built = Box(running, doors, link, readers, board, line)
        made.append(built)
        running.start()
        doors.start()
        _wait(lambda: doors.inputs_reported)
        _wait(lambda: doors.core.next_deadline() is None)
        return built

    yield build
    for built in made:
        built.doors.stop()
        built.line.close()
        for reader in built.readers.values():
            reader.close()
        built.board.close()


def test_a_flooding_reader_does_not_starve_the_door_box(box: Callable[..., Box]) -> None:
    b = box()
    flooder, other = b.readers["rdr-1"], b.readers["rdr-2"]
    flooder.wait_status(online=True, secure=True, timeout=15)
    other.wait_status(online=True, secure=True, timeout=15)
    # A faulty reader: 100 card reads a second (a stranger's card), holding a few until polled.
    flooder.flood(STRANGER, seconds=8, rate=100, buffer=4)
    _wait(lambda: any(t == "door.alarm" and p["alarm"] == "reader_flood" for t, p in _payloads(b.agent)))
    # A valid card at the other reader of the box is decided while the flood goes on.
    other.present_card(ALICE, bits=48)
    b.board.wait_relay(0, True)
    assert flooder.reported("flood") == []  # the flooding reader is still at it
    flood = flooder.wait_reported("flood", timeout=20)
    # Once it stops, a valid card at the reader that flooded is decided too (the newest read gets through).
    flooder.present_card(ALICE, bits=48)
    b.board.wait_relay(1, True)
    _wait(lambda: any(t == "door.alarm_cleared" and p["alarm"] == "reader_flood" for t, p in _payloads(b.agent)))
    records = _payloads(b.agent)
    raised = _index(records, "door.alarm", alarm="reader_flood", door="locker-1", reader="rdr-1")
    granted_other = _index(records, "door.access_granted", door="locker-2", reader="rdr-2")
    granted_flooder = _index(records, "door.access_granted", door="locker-1", reader="rdr-1")
    cleared = _index(records, "door.alarm_cleared", alarm="reader_flood", door="locker-1", reader="rdr-1")
    assert raised < granted_other < granted_flooder
    assert raised < cleared
    assert [t for t, p in records if p.get("alarm") == "reader_flood"] == ["door.alarm", "door.alarm_cleared"]
    # Reads beyond the limit were dropped before any card check: far fewer decisions than reads sent.
    taps = [p for t, p in records if t == "card.presented" and p["reader"] == "rdr-1"]
    assert 0 < len(taps) - 1 < flood["queued"]
    assert not any(p.get("alarm") == "reader_offline" for t, p in records)  # the flooder never dropped offline


def test_secure_channel_failures_are_named_with_their_cause(box: Callable[..., Box]) -> None:
    # A swapped reader (another key) and a plaintext reader where keyed ones belong.
    b = box({"rdr-1": {"scbk": WRONG_KEY}, "rdr-2": {"plaintext": True}})

    def sc_alarms() -> set[tuple[str, str]]:
        return {(p["reader"], p["cause"]) for t, p in _payloads(b.agent) if p.get("alarm") == "reader_sc_failed"}

    _wait(lambda: sc_alarms() == {("rdr-1", "key_mismatch"), ("rdr-2", "plaintext_reader")}, timeout=10)
    records = _payloads(b.agent)
    assert not any(p.get("alarm") == "reader_offline" for t, p in records)  # not "offline": why, said once
    assert [t for t, p in records if p.get("alarm") == "reader_sc_failed"] == ["door.alarm", "door.alarm"]
    # The right reader is put back: the alarm is cleared, naming the reader in its own field.
    b.readers["rdr-1"].restart(scbk=SCBK)
    _wait(
        lambda: any(
            t == "door.alarm_cleared" and p["alarm"] == "reader_sc_failed" and p.get("reader") == "rdr-1"
            for t, p in _payloads(b.agent)
        ),
        timeout=10,
    )


def test_a_healthy_start_records_no_reader_alarm(box: Callable[..., Box]) -> None:
    b = box()
    for reader in b.readers.values():
        reader.wait_status(online=True, secure=True, timeout=15)
    _wait(lambda: b.link.online("rdr-1") and b.link.online("rdr-2"))
    _delivered(b.link)  # the readers' online status has reached the door core
    records = _payloads(b.agent)
    assert [t for t, p in records if t in ("door.alarm", "door.alarm_cleared")] == []


@pytest.mark.faults
def test_noise_on_the_line_does_not_hide_a_dead_reader(
    rig: tuple[Agent, AttachedDoors, StubReaderProcess, StubBoardProcess],
) -> None:
    agent, _, reader, _ = rig
    reader.fault("noise", seconds=6)  # the reader is gone; the line keeps picking up noise
    _wait(lambda: "reader_offline" in _alarms(agent), timeout=6)
    assert reader.reported("noise") == []  # raised while the noise goes on
    reader.wait_reported("noise", timeout=10)
    _wait(lambda: "reader_offline" in _alarms(agent, "door.alarm_cleared"), timeout=15)
    (cleared,) = [p for t, p in _payloads(agent) if t == "door.alarm_cleared" and p["alarm"] == "reader_offline"]
    assert cleared["reader"] == "rdr-1"
