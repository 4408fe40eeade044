"""The door state machine: relay windows, debounced openings, forced and held-open alarms, device faults,
modes and restarts — unit tests, then a hypothesis stateful test of the whole DoorAgentCore.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import tempfile
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sekisho.agents.doors.actions import Action, Emit, Opened, Passage, Secured, SetRelay
from sekisho.agents.doors.checks import CardEvidence
from sekisho.agents.doors.machine import DoorMachine
from sekisho.agents.doors.service import DoorAgentCore, Handler
from sekisho.agents.runtime.schedules import JST
from sekisho.drivers.smartcard.auth import hash_uid
from sekisho.protocol import PROTOCOL_VERSION, messages, timefmt
from sekisho.protocol.door_commands import Selection
from sekisho.protocol.errors import Rejected
from sekisho.protocol.events import build_event
from sekisho.protocol.pin import hash_pin, valid_pin, verify_pin
from sekisho.protocol.policy import Door, Person, SitePolicy

SITE_KEY = b"synthetic-door-machine-site-key"
SIGNING_KEY = Ed25519PrivateKey.generate()
START = datetime(2026, 11, 24, 10, 0, tzinfo=JST)


def make_door(**changes: Any) -> Door:
    doc: dict[str, Any] = {
        "id": "d1",
        "name": "管理区域入口",
        "kind": "room",
        "agent": "door-a",
        "readers": [{"id": "r1"}],
        "relay": 0,
        "sensor": 0,
        "unlock_s": 5,
        "held_open_s": 30,
    }
    doc.update(changes)
    return Door.model_validate(doc)


def events(actions: list[Action]) -> list[tuple[str, dict[str, Any]]]:
    return [(a.type, a.payload) for a in actions if isinstance(a, Emit)]


def kinds(actions: list[Action]) -> list[str]:
    return [a.type for a in actions if isinstance(a, Emit)]


def relays(actions: list[Action]) -> list[tuple[bool, int | None]]:
    return [(a.on, a.max_on_ms) for a in actions if isinstance(a, SetRelay)]


def settle(machine: DoorMachine, now: float, is_open: bool) -> list[Action]:
    """Report a sensor level and let it hold past the debounce time."""
    return machine.sensor(now, is_open) + machine.tick(now + 0.1)


def started(door: Door | None = None) -> DoorMachine:
    machine = DoorMachine(door or make_door())
    machine.restart(0.0)
    settle(machine, 0.0, False)
    return machine


# --- DoorMachine ------------------------------------------------------------------------------


def test_grant_window_passes_unopened() -> None:
    machine = started()
    out = machine.grant(1.0, (Passage("p1"),))
    assert relays(out) == [(True, 5000)] and machine.state == "unlocked"
    assert machine.tick(5.99) == []
    out = machine.tick(6.0)
    assert relays(out) == [(False, None)]
    assert events(out) == [("door.locked", {"door": "d1", "cause": "not_opened"})]
    assert any(isinstance(a, Secured) for a in out) and machine.state == "locked"


def test_opening_releases_the_relay_at_once_and_closing_locks() -> None:
    machine = started()
    machine.grant(1.0, (Passage("p1", "entry"),))
    out = settle(machine, 2.0, True)
    assert events(out) == [("door.opened", {"door": "d1", "forced": False, "person": "p1"})]
    assert relays(out) == [(False, None)]
    assert [a.passages for a in out if isinstance(a, Opened)] == [(Passage("p1", "entry"),)]
    assert machine.state == "open"
    # The window no longer matters once the door opened.
    assert machine.tick(7.0) == []
    out = settle(machine, 12.0, False)
    assert kinds(out) == ["door.closed", "door.locked"]
    assert events(out)[0][1] == {"door": "d1", "open_seconds": 10, "person": "p1"}
    assert events(out)[1][1]["cause"] == "closed"


def test_forced_opening_alarms_until_closed() -> None:
    machine = started()
    out = settle(machine, 1.0, True)
    assert events(out) == [
        ("door.opened", {"door": "d1", "forced": True}),
        ("door.alarm", {"door": "d1", "alarm": "forced_open", "detail": "opened without a grant or unlock"}),
    ]
    out = settle(machine, 3.0, False)
    assert kinds(out) == ["door.closed", "door.alarm_cleared", "door.locked"]


def test_held_open_alarm() -> None:
    machine = started()
    machine.grant(1.0, (Passage("p1"),))
    settle(machine, 1.0, True)
    assert machine.tick(31.0) == []
    out = machine.tick(31.2)
    assert events(out) == [
        ("door.alarm", {"door": "d1", "alarm": "held_open", "detail": "open longer than 30 s", "person": "p1"})
    ]
    assert machine.tick(100.0) == []  # raised once
    out = settle(machine, 120.0, False)
    assert kinds(out) == ["door.closed", "door.alarm_cleared", "door.locked"]


def test_sensor_chatter_gives_one_opening_and_one_closing() -> None:
    machine = started()
    machine.grant(1.0, (Passage("p1"),))
    out: list[Action] = []
    t = 1.5
    for level in (True, False, True, False, True):  # contact bounce while opening
        out += machine.sensor(t, level)
        t += 0.01
    out += machine.tick(t + 0.5)
    t += 5
    for level in (False, True, False, True, False):  # and while shutting
        out += machine.sensor(t, level)
        t += 0.02
    out += machine.tick(t + 0.5)
    assert kinds(out) == ["door.opened", "door.closed", "door.locked"]


def test_glitch_shorter_than_debounce_is_nothing() -> None:
    machine = started()
    out = machine.sensor(1.0, True) + machine.sensor(1.03, False) + machine.tick(2.0)
    assert out == []


def test_opening_started_in_the_window_counts_when_it_settles_after() -> None:
    machine = started()
    machine.grant(1.0, (Passage("p1"),))
    machine.sensor(5.98, True)  # starts moving 20 ms before the window ends
    out = machine.tick(6.0)
    assert relays(out) == [(False, None)] and kinds(out) == []
    out = machine.tick(6.1)
    assert events(out)[0] == ("door.opened", {"door": "d1", "forced": False, "person": "p1"})


def test_opening_that_bounced_back_after_the_window_is_not_opened() -> None:
    machine = started()
    machine.grant(1.0)
    machine.sensor(5.98, True)
    machine.tick(6.0)
    out = machine.sensor(6.01, False)
    assert events(out) == [("door.locked", {"door": "d1", "cause": "not_opened"})]


def test_opening_after_the_window_is_forced() -> None:
    machine = started()
    machine.grant(1.0)
    machine.tick(6.0)
    out = settle(machine, 6.0, True)
    assert events(out)[0][1]["forced"] is True


def test_door_without_sensor() -> None:
    machine = started(make_door(sensor=None))
    machine.grant(1.0)
    assert events(machine.tick(6.0)) == [("door.locked", {"door": "d1", "cause": "unlock_window_ended"})]
    assert machine.sensor(7.0, True) == []


def test_longer_window_is_never_cut_short() -> None:
    machine = started()
    machine.remote_unlock(0.0, 30, command_id="a" * 32, requested_by="p-admin")
    out = machine.grant(10.0)
    assert relays(out) == [(True, 20000)]


def test_device_alarms() -> None:
    machine = started()
    raised = machine.tamper(1.0, True, source="input 7")
    assert events(raised) == [("door.alarm", {"door": "d1", "alarm": "tamper", "detail": "tamper input 7"})]
    assert machine.tamper(1.5, True, source="input 7") == []
    assert kinds(machine.tamper(2.0, False, source="input 7")) == ["door.alarm_cleared"]
    out = machine.reader_status(3.0, "r1", False)
    assert events(out)[0][1]["reader"] == "r1" and events(out)[0][1]["alarm"] == "reader_offline"
    assert kinds(machine.reader_status(4.0, "r1", True)) == ["door.alarm_cleared"]
    out = machine.relay_report(5.0, commanded=False, sensed=True)
    assert events(out)[0][1]["detail"] == "relay 0 commanded off, sensed on"
    assert kinds(machine.relay_report(6.0, commanded=False, sensed=False)) == ["door.alarm_cleared"]


def test_reader_alarms_name_the_reader_and_the_cause() -> None:
    machine = started()

    def summary(out: list[Action]) -> list[tuple[str, str, str | None, str | None]]:
        return [(t, p["alarm"], p.get("reader"), p.get("cause")) for t, p in events(out)]

    # A reader that answers with another key: its own alarm with the cause, not "offline".
    out = machine.reader_status(1.0, "r1", False, "key_mismatch")
    assert summary(out) == [("door.alarm", "reader_sc_failed", "r1", "key_mismatch")]
    assert "another key" in events(out)[0][1]["detail"]
    assert machine.reader_status(1.5, "r1", False, "key_mismatch") == []  # raised once
    # Swapped again, for a plaintext reader: the cause changes, said as a new alarm.
    assert summary(machine.reader_status(2.0, "r1", False, "plaintext_reader")) == [
        ("door.alarm_cleared", "reader_sc_failed", "r1", None),
        ("door.alarm", "reader_sc_failed", "r1", "plaintext_reader"),
    ]
    # It stops answering at all: offline instead.
    assert summary(machine.reader_status(3.0, "r1", False)) == [
        ("door.alarm_cleared", "reader_sc_failed", "r1", None),
        ("door.alarm", "reader_offline", "r1", None),
    ]
    # Back: the clearing names the reader in its own field, not only in the text.
    assert events(machine.reader_status(4.0, "r1", True)) == [
        (
            "door.alarm_cleared",
            {"door": "d1", "alarm": "reader_offline", "detail": "reader r1 back online", "reader": "r1"},
        )
    ]
    assert machine.reader_status(4.5, "r1", True) == []
    # A flood: raised once, cleared once with the count of dropped reads.
    assert summary(machine.reader_flood(5.0, "r1", True, 1, 4.0)) == [("door.alarm", "reader_flood", "r1", None)]
    assert machine.reader_flood(5.5, "r1", True, 9, 4.0) == []
    out = machine.reader_flood(8.0, "r1", False, 40, 4.0)
    assert summary(out) == [("door.alarm_cleared", "reader_flood", "r1", None)]
    assert "40 card reads dropped" in events(out)[0][1]["detail"]
    assert machine.reader_flood(9.0, "r1", False, 0, 4.0) == []


def test_board_offline_then_back_reapplies_the_relay() -> None:
    machine = started()
    machine.grant(1.0)
    assert kinds(machine.board_status(2.0, False)) == ["door.alarm"]
    out = machine.board_status(3.0, True)
    assert kinds(out) == ["door.alarm_cleared"] and relays(out) == [(True, 3000)]


def test_board_reboot_ends_the_window() -> None:
    machine = started()
    machine.grant(1.0)
    out = machine.board_rebooted(2.0)
    assert events(out) == [("door.locked", {"door": "d1", "cause": "restart"})]
    assert relays(out) == [(False, None)] and machine.state == "locked"
    assert kinds(machine.board_rebooted(3.0)) == []  # locked already: only the relay is re-asserted


def test_emergency_unlock_and_reboot() -> None:
    machine = started()
    cid = "c" * 32
    out = machine.set_mode(1.0, "emergency_unlock", command_id=cid, group="fire-1")
    assert kinds(out) == ["door.mode_changed", "door.unlocked"] and relays(out) == [(True, None)]
    assert events(out)[0][1] == {
        "door": "d1",
        "mode": "emergency_unlock",
        "previous": "normal",
        "command_id": cid,
        "group": "fire-1",
    }
    # Open in an emergency: not forced, no held-open alarm, relay stays on.
    out = settle(machine, 2.0, True) + machine.tick(500.0)
    assert events(out) == [("door.opened", {"door": "d1", "forced": False})]
    assert relays(out) == []
    out = machine.board_rebooted(501.0)
    assert events(out) == [("door.unlocked", {"door": "d1", "cause": "restart", "command_id": cid})]
    assert relays(out) == [(True, None)]
    out = machine.set_mode(502.0, "normal", command_id="d" * 32)
    assert relays(out) == [(False, None)] and kinds(out) == ["door.mode_changed"]  # still open: locks on close
    assert kinds(machine.tick(532.1)) == ["door.alarm"]  # held-open counts from the end of the emergency


def test_storage_is_never_released_by_emergency() -> None:
    for kind in ("locker", "key_cabinet"):
        machine = started(make_door(kind=kind))
        with pytest.raises(ValueError):
            machine.set_mode(1.0, "emergency_unlock", command_id="e" * 32)
        # Even a stored emergency mode is not taken by a locker.
        assert DoorMachine(make_door(kind=kind), mode="emergency_unlock").mode == "normal"


def test_lockdown() -> None:
    machine = started()
    machine.grant(1.0)
    out = machine.set_mode(2.0, "lockdown", command_id="f" * 32)
    assert relays(out) == [(False, None)]
    assert kinds(out) == ["door.mode_changed", "door.locked"]
    assert machine.grant(3.0) == [] and not machine.relay_on
    assert machine.remote_unlock(3.0, 5, command_id=None, requested_by=None) == []


def test_next_deadline() -> None:
    machine = started()
    assert machine.next_deadline() is None
    machine.grant(1.0)
    assert machine.next_deadline() == 6.0
    machine.sensor(2.0, True)
    assert machine.next_deadline() == pytest.approx(2.05)


# --- PINs -------------------------------------------------------------------------------------


def test_pin_hash_is_what_the_policy_accepts() -> None:
    pin_hash = hash_pin("2580", iterations=1000)
    assert Person(id="p1", name="A", pin_hash=pin_hash).pin_hash == pin_hash
    assert verify_pin("2580", pin_hash)
    assert not verify_pin("2581", pin_hash)
    assert not verify_pin("258", pin_hash)
    assert hash_pin("2580", iterations=1000) != pin_hash  # salted
    assert hash_pin("12345678").startswith("pbkdf2_sha256$100000$")


@pytest.mark.parametrize("pin", ["123", "123456789", "12a4", "", "１２３４", " 1234", "1234\n"])
def test_bad_pins_refused(pin: str) -> None:
    assert not valid_pin(pin)
    with pytest.raises(ValueError):
        hash_pin(pin, iterations=1000)
    assert not verify_pin(pin, hash_pin("1234", iterations=1000))


def test_pin_iterations_and_hash_shape() -> None:
    with pytest.raises(ValueError):
        hash_pin("1234", iterations=999)
    with pytest.raises(ValueError):
        verify_pin("1234", "sha1$1$00$00")


# --- DoorAgentCore: I/O boundary --------------------------------------------------------------


def card_hash(name: str) -> str:
    return hash_uid(f"SYN-{name}".encode(), SITE_KEY)


def evidence(name: str) -> CardEvidence:
    return CardEvidence(card_hash=card_hash(name), card_masked=f"****-{name[-2:].upper()}", weak=True)


def site_policy() -> SitePolicy:
    return SitePolicy.model_validate(
        {
            "site": {"name": "テスト"},
            "areas": [{"id": "kanri", "name": "管理区域"}],
            "people": [
                {"id": "p1", "name": "One"},
                {"id": "p2", "name": "Two"},
                {"id": "p3", "name": "Three"},
            ],
            "cards": [
                {"id": "c1", "person": "p1", "uid_hash": card_hash("p1")},
                {"id": "c2", "person": "p2", "uid_hash": card_hash("p2")},
                {"id": "c3", "person": "p3", "uid_hash": card_hash("p3")},
            ],
            "doors": [
                {
                    "id": "room",
                    "name": "管理区域入口",
                    "kind": "room",
                    "agent": "door-a",
                    "area": "kanri",
                    "allowed": ["p1", "p2"],
                    "readers": [{"id": "r-room"}],
                    "relay": 0,
                    "sensor": 0,
                    "unlock_s": 5,
                    "held_open_s": 10,
                },
                {
                    "id": "locker",
                    "name": "書類ロッカー",
                    "kind": "locker",
                    "agent": "door-a",
                    "area": "kanri",
                    "allowed": ["p1"],
                    "readers": [{"id": "r-locker"}],
                    "relay": 1,
                    "sensor": 1,
                    "unlock_s": 3,
                    "held_open_s": 30,
                },
            ],
        }
    )


READERS = {"room": "r-room", "locker": "r-locker"}
RELAYS = {0: "room", 1: "locker"}
SENSOR = {"room": 0, "locker": 1}


class Clock:
    """Integer milliseconds, so debounce and window comparisons are exact."""

    def __init__(self) -> None:
        self.ms = 1_000_000

    def now(self) -> datetime:
        return START + timedelta(milliseconds=self.ms - 1_000_000)

    def monotonic(self) -> float:
        return self.ms / 1000


class Dispatcher:
    """Collects the handlers a DoorAgentCore registers, like CommandDispatcher.register."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        assert name not in self.handlers
        self.handlers[name] = handler

    def call(self, name: str, args: dict[str, Any]) -> tuple[str, str | None]:
        command_id = uuid.uuid4().hex
        issued = timefmt.now()
        command = messages.Command(
            v=PROTOCOL_VERSION,
            id=command_id,
            agent="door-a",
            name=name,
            args=args,
            issued_at=timefmt.fmt(issued),
            expires_at=timefmt.fmt(issued + timedelta(seconds=60)),
            nonce=uuid.uuid4().hex,
        )
        verified = messages.VerifiedCommand(command, issued, issued + timedelta(seconds=60))
        return command_id, self.handlers[name](verified)


class Harness:
    """A DoorAgentCore whose outbox, relay board and reader LEDs are recorded in one ordered log."""

    def __init__(self, state_dir: Path, policy: SitePolicy | None = None) -> None:
        self.clock = Clock()
        self.log: list[tuple[Any, ...]] = []
        self.fail_relay_on = 0
        self.fail_emit: set[str] = set()
        self.dispatcher = Dispatcher()
        self.policy = policy or site_policy()
        self.ctl = DoorAgentCore(
            policy=lambda: (self.policy, "valid", None),
            emit=self._emit,
            set_relay=self._set_relay,
            feedback=self._feedback,
            state_dir=state_dir,
            clock=self.clock,
        )
        self.ctl.register_commands(self.dispatcher)
        self.ctl.start()

    def _emit(self, type_: str, payload: dict[str, Any]) -> int:
        if type_ in self.fail_emit:
            raise OSError("disk full")
        build_event(SIGNING_KEY, agent="door-a", seq=len(self.log) + 1, type=type_, payload=payload)
        self.log.append(("event", self.clock.ms, type_, payload))
        return len(self.log)

    def _set_relay(self, index: int, on: bool, max_on_ms: int | None) -> None:
        if on and self.fail_relay_on:
            self.fail_relay_on -= 1
            self.log.append(("relay", self.clock.ms, index, on, max_on_ms, False))
            raise OSError("serial write timed out")
        self.log.append(("relay", self.clock.ms, index, on, max_on_ms, True))

    def _feedback(self, reader: str, ok: bool) -> None:
        raise OSError("reader LED line down")  # best effort: must never matter

    def events(self, *types: str, since: int = 0) -> list[dict[str, Any]]:
        return [e[3] for e in self.log[since:] if e[0] == "event" and (not types or e[2] in types)]

    def relay_calls(self, since: int = 0) -> list[tuple[int, bool, int | None]]:
        return [(e[2], e[3], e[4]) for e in self.log[since:] if e[0] == "relay"]

    def advance(self, ms: int) -> None:
        self.clock.ms += ms
        self.ctl.tick()

    def sensor(self, door: str, is_open: bool) -> None:
        self.ctl.input_changed("door", SENSOR[door], is_open)


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = Harness(tmp_path)
    for door in SENSOR:
        h.sensor(door, False)
    h.advance(100)
    yield h
    h.ctl.close()


def test_start_takes_control_of_every_relay(harness: Harness) -> None:
    assert harness.events("door.locked") == [
        {"door": "room", "cause": "restart"},
        {"door": "locker", "cause": "restart"},
    ]
    assert harness.relay_calls() == [(0, False, None), (1, False, None)]


def test_emergency_releases_room_doors_only_and_survives_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    command_id, result = h.dispatcher.call("door.emergency_unlock", {"all": True, "group": "fire-1"})
    assert result == "emergency_unlock: 1 door(s) changed, 0 already; storage stays secure: locker"
    assert [e["door"] for e in h.events("door.mode_changed")] == ["room"]
    assert h.relay_calls()[-1] == (0, True, None)
    h.ctl.close()
    again = Harness(tmp_path)  # the agent restarts mid-emergency: the fire exit stays free
    assert again.events("door.unlocked") == [{"door": "room", "cause": "restart", "command_id": command_id}]
    assert (0, True, None) in again.relay_calls() and (1, False, None) in again.relay_calls()
    assert again.ctl.door_states() == {"room": ("released", "emergency_unlock"), "locker": ("locked", "normal")}
    again.dispatcher.call("door.normal", {"doors": ["room"]})
    assert again.relay_calls()[-1] == (0, False, None)
    again.ctl.close()


def test_remote_unlock(harness: Harness) -> None:
    command_id, result = harness.dispatcher.call("door.unlock", {"door": "locker", "seconds": 12, "requested_by": "p1"})
    assert result == "door locker unlocked for 12 s"
    assert harness.events("door.unlocked")[-1] == {
        "door": "locker",
        "cause": "command",
        "command_id": command_id,
        "requested_by": "p1",
    }
    assert harness.relay_calls()[-1] == (1, True, 12000)
    harness.advance(12_000)
    assert harness.events("door.locked")[-1] == {"door": "locker", "cause": "not_opened"}


@pytest.mark.parametrize(
    ("name", "args", "reason"),
    [
        ("door.unlock", {"door": "room", "seconds": 61}, "bad_args"),
        ("door.unlock", {"door": "room", "seconds": 0}, "bad_args"),
        ("door.unlock", {"door": "room", "seconds": True}, "bad_args"),
        ("door.unlock", {"door": "room", "seconds": 5.0}, "bad_args"),
        ("door.unlock", {"door": "room", "open": True}, "bad_args"),
        ("door.unlock", {"door": "../etc"}, "bad_args"),
        ("door.unlock", {}, "bad_args"),
        ("door.unlock", {"door": "attic"}, "unknown_door"),
        ("door.lockdown", {}, "bad_args"),
        ("door.lockdown", {"all": True, "area": "kanri"}, "bad_args"),
        ("door.lockdown", {"all": False}, "bad_args"),
        ("door.lockdown", {"doors": []}, "bad_args"),
        ("door.lockdown", {"doors": ["room", "room"]}, "bad_args"),
        ("door.lockdown", {"doors": ["room", "attic"]}, "unknown_door"),
        ("door.emergency_unlock", {"area": "roof"}, "unknown_area"),
        ("door.forgive_passback", {"area": "kanri", "person": 7}, "bad_args"),
        ("door.forgive_passback", {"area": "kanri"}, "unknown_area"),  # no anti-passback door there
    ],
)
def test_command_arguments_are_checked(harness: Harness, name: str, args: dict[str, Any], reason: str) -> None:
    before = len(harness.log)
    with pytest.raises(Rejected) as err:
        harness.dispatcher.call(name, args)
    assert err.value.reason == reason
    assert harness.log[before:] == []


def test_lockdown_refuses_remote_unlock(harness: Harness) -> None:
    harness.dispatcher.call("door.lockdown", {"area": "kanri"})
    with pytest.raises(Rejected) as err:
        harness.dispatcher.call("door.unlock", {"door": "room"})
    assert err.value.reason == "lockdown"
    assert harness.ctl.door_states()["room"] == ("locked", "lockdown")


def test_tap_events_and_decision(harness: Harness) -> None:
    mark = len(harness.log)
    harness.ctl.card_presented("r-room", evidence("p1"))
    assert [e[2] for e in harness.log[mark:] if e[0] == "event"] == ["card.presented", "door.access_granted"]
    assert harness.log[-1][:5] == ("relay", harness.clock.ms, 0, True, 5000)


def test_relay_failure_is_an_alarm_and_retried(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.fail_relay_on = 1
    with caplog.at_level(logging.ERROR):
        harness.ctl.card_presented("r-room", evidence("p1"))
    alarm = harness.events("door.alarm")[-1]
    assert alarm["alarm"] == "relay_fault" and "OSError: serial write timed out" in alarm["detail"]
    mark = len(harness.log)
    harness.advance(1000)
    assert harness.relay_calls(mark) == [(0, True, 4000)]
    assert harness.events("door.alarm_cleared", since=mark) == [
        {"door": "room", "alarm": "relay_fault", "detail": "relay 0 commands go through again"}
    ]


def test_no_release_without_its_record(harness: Harness) -> None:
    harness.fail_emit = {"door.access_granted"}
    mark = len(harness.log)
    harness.ctl.card_presented("r-room", evidence("p1"))
    assert harness.relay_calls(mark) == []
    harness.fail_emit = {"door.unlocked"}
    with pytest.raises(Rejected) as err:
        harness.dispatcher.call("door.unlock", {"door": "room"})
    assert err.value.reason == "not_recorded"
    assert all(not on for _, on, _ in harness.relay_calls(mark))


def test_emergency_release_goes_ahead_unrecorded(harness: Harness) -> None:
    harness.fail_emit = {"door.mode_changed", "door.unlocked"}
    harness.dispatcher.call("door.emergency_unlock", {"doors": ["room"]})
    assert harness.relay_calls()[-1] == (0, True, None)


def test_policy_change_retires_a_door(harness: Harness) -> None:
    doc = site_policy().model_dump(mode="json")
    doc["doors"] = doc["doors"][:1]
    harness.policy = SitePolicy.model_validate(doc)
    harness.ctl.policy_changed()
    assert harness.events("door.locked")[-1] == {"door": "locker", "cause": "removed_from_policy"}
    assert set(harness.ctl.door_states()) == {"room"}


def test_reader_alarms_are_recorded_and_follow_a_reader_into_a_new_door(harness: Harness) -> None:
    harness.ctl.reader_status("r-room", False, "plaintext_reader")
    harness.ctl.reader_flood("r-room", True, 1, 4.0)
    # Recorded through the catalogue's schemas (the harness builds every event it records).
    raised = harness.events("door.alarm")
    assert [(p["alarm"], p["reader"], p.get("cause")) for p in raised] == [
        ("reader_sc_failed", "r-room", "plaintext_reader"),
        ("reader_flood", "r-room", None),
    ]
    harness.ctl.reader_flood("r-room", False, 12, 4.0)
    assert harness.events("door.alarm_cleared")[-1]["reader"] == "r-room"
    # A reader that said it is offline before any door had it: its new door raises the alarm on arrival.
    harness.ctl.reader_status("r-new", False)
    assert len(harness.events("door.alarm")) == 2
    doc = site_policy().model_dump(mode="json")
    doc["doors"].append({**doc["doors"][1], "id": "locker-2", "readers": [{"id": "r-new"}], "relay": 2, "sensor": 2})
    harness.policy = SitePolicy.model_validate(doc)
    harness.ctl.policy_changed()
    assert harness.events("door.alarm")[-1] == {
        "door": "locker-2",
        "alarm": "reader_offline",
        "detail": "reader r-new offline",
        "reader": "r-new",
    }


def test_next_deadline_for_a_timer(harness: Harness) -> None:
    assert harness.ctl.next_deadline() is None
    harness.ctl.card_presented("r-room", evidence("p1"))
    assert harness.ctl.next_deadline() == pytest.approx(harness.clock.monotonic() + 5)


def test_selection_rejects_unknown_mode_target(harness: Harness) -> None:
    with pytest.raises(Rejected):
        harness.ctl.set_mode("lockdown", Selection(doors=("nowhere",)), command_id=None)


# --- the stateful test ------------------------------------------------------------------------

DEBOUNCE_MS = 50
UNLOCK_S = {"room": 5, "locker": 3}


class DoorAgentCoreMachine(RuleBasedStateMachine):
    """Random taps, bouncing sensors, time, reboots, board outages, relay failures and mode commands.

    After every step the ordered log (events, relay commands, raw sensor edges) is replayed into an
    independent model and these must hold:

    - a relay is commanded on only while a grant, a remote unlock or an emergency (each recorded before
      it, with a policy rule or a command id) is in force, and with a board timer no longer than what
      is left of that window (no timer only in emergency unlock); the relay as the board really drives
      it (commands plus its own timer) is never on outside those windows, in particular not after the
      door opened from the grant and never in lock-down;
    - each debounced opening yields exactly one ``door.opened`` and each debounced closing one
      ``door.closed``;
    - an opening is reported forced exactly when no grant, unlock or emergency was in force when the
      door started to move, and each forced opening raises ``forced_open``;
    - each tap yields ``card.presented`` followed at once by one decision for that card.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="doors-stateful-"))
        self.h = Harness(self.dir)
        self.seen = 0
        self.mode = {"room": "normal", "locker": "normal"}
        self.auth = {"room": -math.inf, "locker": -math.inf}
        self.raw: dict[str, list[tuple[int, bool, bool]]] = {"room": [], "locker": []}  # (ms, level, authorised)
        self.physical: dict[int, tuple[bool, int, int | None]] = {0: (False, 0, None), 1: (False, 0, None)}
        self.opened = {"room": 0, "locker": 0}
        self.closed = {"room": 0, "locker": 0}
        self.forced = {"room": 0, "locker": 0}
        self.forced_alarms = {"room": 0, "locker": 0}
        self.unlock_seconds = 0

    @initialize()
    def report_inputs(self) -> None:
        for door in SENSOR:
            self._raw(door, False)
        self.h.advance(100)

    def teardown(self) -> None:
        self.h.ctl.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- rules --------------------------------------------------------------------------------

    @rule(door=st.sampled_from(["room", "locker"]), card=st.sampled_from(["p1", "p2", "p3", "nobody"]))
    def tap(self, door: str, card: str) -> None:
        mark = len(self.h.log)
        self.h.ctl.card_presented(READERS[door], evidence(card))
        events = [e for e in self.h.log[mark:] if e[0] == "event"]
        index = next(i for i, e in enumerate(events) if e[2] == "card.presented")
        decision = events[index + 1]
        assert decision[2] in ("door.access_granted", "door.access_denied", "door.access_pending")
        assert decision[3]["card_masked"] == evidence(card).card_masked

    @rule(ms=st.integers(min_value=100, max_value=40_000))
    def advance(self, ms: int) -> None:
        self.h.advance(ms)

    @rule(
        door=st.sampled_from(["room", "locker"]),
        level=st.booleans(),
        bounces=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), max_size=3),
    )
    def sensor(self, door: str, level: bool, bounces: list[tuple[int, int]]) -> None:
        self._raw(door, level)
        for away, back in bounces:
            self.h.clock.ms += away
            self._raw(door, not level)
            self.h.clock.ms += back
            self._raw(door, level)

    @rule()
    def board_reboot(self) -> None:
        self.h.ctl.board_rebooted()

    @rule(online=st.booleans())
    def board_online(self, online: bool) -> None:
        self.h.ctl.board_online(online)

    @rule()
    def relay_fails_once(self) -> None:
        self.h.fail_relay_on = 1

    @rule(mode=st.sampled_from(["door.emergency_unlock", "door.lockdown", "door.normal"]))
    def mode_command(self, mode: str) -> None:
        self.h.dispatcher.call(mode, {"all": True})

    @rule(door=st.sampled_from(["room", "locker"]), seconds=st.integers(1, 10))
    def remote_unlock(self, door: str, seconds: int) -> None:
        self.unlock_seconds = seconds
        try:
            self.h.dispatcher.call("door.unlock", {"door": door, "seconds": seconds})
        except Rejected as err:
            assert err.reason == "lockdown" and self.mode[door] == "lockdown"

    @precondition(lambda self: self.h.ctl.next_deadline() is not None)
    @rule()
    def sleep_until_next_deadline(self) -> None:
        deadline = self.h.ctl.next_deadline()
        assert deadline is not None
        self.h.clock.ms = max(self.h.clock.ms, math.ceil(deadline * 1000))
        self.h.ctl.tick()

    # --- the model ----------------------------------------------------------------------------

    def _raw(self, door: str, level: bool) -> None:
        self.h.sensor(door, level)
        self._replay()  # events emitted before the edge was taken in (timers) come first
        history = self.raw[door]
        if history and history[-1][1] == level:
            return
        now_s = self.h.clock.ms / 1000
        authorised = self.mode[door] == "emergency_unlock" or now_s < self.auth[door]
        history.append((self.h.clock.ms, level, authorised))

    def _replay(self) -> None:
        for entry in self.h.log[self.seen :]:
            if entry[0] == "relay":
                self._relay(*entry[1:])
            else:
                self._event(entry[1], entry[2], entry[3])
        self.seen = len(self.h.log)

    def _relay(self, ms: int, index: int, on: bool, max_on: int | None, ok: bool) -> None:
        door = RELAYS[index]
        t = ms / 1000
        if on:
            if self.mode[door] == "emergency_unlock":
                assert max_on is None
            else:
                assert self.mode[door] == "normal", f"{door} released in {self.mode[door]}"
                assert max_on is not None, "only an emergency release may go without the board's timer"
                assert t < self.auth[door], f"{door} released with no grant or unlock in force"
                assert max_on / 1000 <= self.auth[door] - t + 1e-6, "board timer longer than the window"
        if ok:
            self.physical[index] = (on, ms, max_on)

    def _event(self, ms: int, type_: str, payload: dict[str, Any]) -> None:
        door: str = payload.get("door") or ""
        t = ms / 1000
        if type_ == "door.access_granted":
            assert payload["rule"]
            if self.mode[door] == "normal":
                self.auth[door] = max(self.auth[door], t + UNLOCK_S[door])
        elif type_ == "door.unlocked":
            assert payload.get("command_id"), "an unlock always cites its command"
            if payload["cause"] == "command":
                self.auth[door] = max(self.auth[door], t + self.unlock_seconds)
            else:
                assert self.mode[door] == "emergency_unlock"
        elif type_ == "door.mode_changed":
            assert payload.get("command_id")
            assert payload["previous"] == self.mode[door]
            self.mode[door] = payload["mode"]
            assert door == "room" or payload["mode"] != "emergency_unlock"
            self.auth[door] = math.inf if payload["mode"] == "emergency_unlock" else -math.inf
        elif type_ == "door.opened":
            self.opened[door] += 1
            start = [r for r in self.raw[door] if r[1]][-1]
            assert payload["forced"] == (not start[2]), f"forced={payload['forced']} for {start}"
            self.forced[door] += payload["forced"]
            if self.mode[door] != "emergency_unlock":
                self.auth[door] = -math.inf
        elif type_ == "door.closed":
            self.closed[door] += 1
        elif type_ == "door.locked":
            if self.mode[door] != "emergency_unlock":
                self.auth[door] = -math.inf
        elif type_ == "door.alarm" and payload["alarm"] == "forced_open":
            self.forced_alarms[door] += 1

    def _debounced(self, door: str) -> tuple[int, int]:
        """Count stable openings and closings in the raw history (a level counts once it held 50 ms)."""
        now = self.h.clock.ms
        history = self.raw[door]
        stable: list[bool] = []
        for i, (ms, level, _) in enumerate(history):
            end = history[i + 1][0] if i + 1 < len(history) else now
            held = end - ms >= DEBOUNCE_MS
            if held and (not stable or stable[-1] != level):
                stable.append(level)
        openings = sum(1 for a, b in itertools.pairwise(stable) if not a and b)
        closings = sum(1 for a, b in itertools.pairwise(stable) if a and not b)
        return openings, closings

    @invariant()
    def model_agrees(self) -> None:
        self._replay()
        t = self.h.clock.ms / 1000
        for index, (on, since, max_on) in self.physical.items():
            door = RELAYS[index]
            driven = on and (max_on is None or self.h.clock.ms < since + max_on)
            if driven:
                assert self.mode[door] == "emergency_unlock" or t < self.auth[door], f"{door} relay on out of window"
        for door in SENSOR:
            assert (self.opened[door], self.closed[door]) == self._debounced(door), door
            assert self.forced[door] == self.forced_alarms[door]


TestDoorAgentCoreStateful = DoorAgentCoreMachine.TestCase
TestDoorAgentCoreStateful.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
