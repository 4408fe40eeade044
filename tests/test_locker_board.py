"""The serial locker board: LockerBoardLink against the firmware stub over a real pty, the simulator, the decoder.

Every stub runs as a real subprocess on a fresh pty pair and is stopped by its fixture; every wait is bounded.
The scenarios that both boards support run on the stub and on ``SimulatedLockerBoard`` alike (parity).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import serial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sekisho.drivers.locker import (
    BoardError,
    BoardEvent,
    BoardOffline,
    BoardOnline,
    BoardRebooted,
    BoardRefused,
    BoardTimeout,
    InputChanged,
    LineError,
    LockerBoardLink,
    LockIO,
    RelayFault,
    RelayTimerExpired,
    SimulatedLockerBoard,
)
from sekisho.drivers.locker.line import LineTarget
from sekisho.drivers.locker.protocol import (
    MAX_PAYLOAD,
    Command,
    Frame,
    FrameDecoder,
    InputCode,
    Noise,
    Reply,
    Report,
    WireInput,
    WireStatus,
    crc16_ccitt,
    encode_frame,
    encode_input,
    encode_set_relay,
    encode_status,
    parse_index,
    parse_info,
    parse_input,
    parse_nak,
    parse_status,
)
from sekisho.firmware_stubs.locker_board import StubBoardProcess

pytestmark = pytest.mark.timeout(60)

RELAYS, DOORS, KEY_SLOTS = 4, 4, 8
WAIT = 5.0


class Recorder:
    """Board events in arrival order, with bounded waits."""

    def __init__(self) -> None:
        self.events: list[BoardEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: BoardEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, kind: type) -> list[Any]:
        """Return the events of one type so far."""
        with self._changed:
            return [event for event in self.events if isinstance(event, kind)]

    def wait(self, predicate: Callable[[BoardEvent], bool], *, count: int = 1, timeout: float = WAIT) -> list[Any]:
        """Wait until ``count`` events match; return the matching events."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matching = [event for event in self.events if predicate(event)]
                if len(matching) >= count:
                    return matching
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"waited {timeout}s for {count} matching events; got {self.events}")
                self._changed.wait(left)

    def wait_for(self, expected: BoardEvent, timeout: float = WAIT) -> None:
        """Wait until ``expected`` has been delivered."""
        self.wait(lambda event: event == expected, timeout=timeout)

    def index(self, expected: BoardEvent) -> int:
        """Return the position of the first event equal to ``expected``."""
        with self._changed:
            return self.events.index(expected)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``condition`` until it holds, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---- fixtures ----


def make_link(host: LineTarget, **kwargs: Any) -> LockerBoardLink:
    """A link with quick supervision, as tests want it."""
    options: dict[str, Any] = {"heartbeat_s": 0.1, "offline_after_s": 0.5, **kwargs}
    return LockerBoardLink(host, relays=RELAYS, doors=DOORS, key_slots=KEY_SLOTS, **options)


@pytest.fixture
def stub() -> Iterator[StubBoardProcess]:
    """The firmware stub as a subprocess on a pty."""
    with StubBoardProcess(relays=RELAYS, doors=DOORS, key_slots=KEY_SLOTS) as board:
        yield board


@pytest.fixture
def link(stub: StubBoardProcess) -> Iterator[LockerBoardLink]:
    """A started link to the stub (over the pty master)."""
    board = make_link(stub.host)
    board.start()
    try:
        yield board
    finally:
        board.stop()


@pytest.fixture
def events(link: LockerBoardLink) -> Recorder:
    """Everything the link reports from now on."""
    recorder = Recorder()
    link.subscribe(recorder)
    return recorder


@dataclass
class Rig:
    """A board under test (``io``), the hand that works its doors and faults (``hand``) and its event record."""

    kind: str
    io: LockIO
    hand: Any  # StubBoardProcess or SimulatedLockerBoard: same test controls
    events: Recorder

    def power_cycle(self) -> None:
        """Cut the power long enough for the host to notice, then give it back."""
        if isinstance(self.hand, StubBoardProcess):
            self.hand.power_cycle(seconds=1.0)
        else:
            self.hand.power_cycle()

    def relay_log(self) -> list[tuple[int, bool, str]]:
        """Return the coil changes as (relay, on, cause)."""
        return [tuple(change) for change in self.hand.relay_log()]


@pytest.fixture(params=["stub", "simulated"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """The same scenario on the stub over a pty and on the in-process simulator."""
    recorder = Recorder()
    if request.param == "stub":
        with StubBoardProcess(relays=RELAYS, doors=DOORS, key_slots=KEY_SLOTS) as board:
            link = make_link(board.host)
            link.subscribe(recorder)
            link.start()
            try:
                yield Rig("stub", link, board, recorder)
            finally:
                link.stop()
    else:
        sim = SimulatedLockerBoard(relays=RELAYS, doors=DOORS, key_slots=KEY_SLOTS)
        sim.subscribe(recorder)
        sim.start()
        try:
            yield Rig("simulated", sim, sim, recorder)
        finally:
            sim.stop()


# ---- parity scenarios: stub over a pty and simulator ----


def test_both_boards_are_lock_io(rig: Rig) -> None:
    assert isinstance(rig.io, LockIO)
    assert rig.io.online


def test_unlock_then_relock_drives_the_coil(rig: Rig) -> None:
    rig.io.set_relay(0, True)
    wait_until(lambda: (0, True, "command") in rig.relay_log(), what="the coil on")
    wait_until(lambda: rig.io.status().relays_sensed[0], what="the feedback contact closed")
    assert rig.io.status().relays_commanded == (True, False, False, False)

    rig.io.set_relay(0, False)
    wait_until(lambda: (0, False, "command") in rig.relay_log(), what="the coil off")
    wait_until(lambda: not rig.io.status().relays_sensed[0], what="the feedback contact open")
    # A welded relay switched after it: its settle time ends after relay 0's, and the board judges relays
    # in deadline order, so its fault arrives only once relay 0 has been judged. A healthy relay raises none.
    rig.hand.stick_relay(1)
    rig.io.set_relay(1, True)
    rig.events.wait(lambda event: isinstance(event, RelayFault))
    assert rig.events.of(RelayFault) == [RelayFault(1, True, False)]


def test_door_sensor_changes_reach_observers(rig: Rig) -> None:
    rig.hand.open_door(1)
    rig.events.wait_for(InputChanged("door", 1, True))
    rig.hand.close_door(1)
    rig.events.wait_for(InputChanged("door", 1, False))
    assert rig.io.status().doors_open == (False, False, False, False)


def test_key_slot_changes_reach_observers(rig: Rig) -> None:
    assert all(rig.io.status().keys_present)  # a cabinet starts full
    rig.hand.take_key(3)
    rig.events.wait_for(InputChanged("key_slot", 3, False))
    rig.hand.return_key(3)
    rig.events.wait_for(InputChanged("key_slot", 3, True))


def test_tamper_reaches_observers(rig: Rig) -> None:
    rig.hand.tamper(True)
    rig.events.wait_for(InputChanged("tamper", 0, True))
    assert rig.io.status().tamper
    rig.hand.tamper(False)
    rig.events.wait_for(InputChanged("tamper", 0, False))


def test_bad_relay_index_is_refused_with_its_reason(rig: Rig) -> None:
    with pytest.raises(BoardError) as caught:
        rig.io.set_relay(RELAYS + 5, True)
    assert isinstance(caught.value, BoardRefused)
    assert caught.value.reason == "bad_index"
    assert caught.value.nak_code == 1
    with pytest.raises(ValueError, match="max_on_ms"):
        rig.io.set_relay(0, True, max_on_ms=0)


def test_board_releases_the_relay_when_max_on_runs_out(rig: Rig) -> None:
    started = time.monotonic()
    rig.io.set_relay(2, True, max_on_ms=300)
    rig.events.wait_for(RelayTimerExpired(2))
    assert time.monotonic() - started >= 0.28
    # The stub's own report of the coil travels on another pipe: it may arrive just after the frame.
    wait_until(lambda: (2, False, "max_on") in rig.relay_log(), what="the coil released by the timer")
    wait_until(lambda: rig.io.status().relays_commanded[2] is False, what="relay 2 off")


def test_stuck_relay_is_reported_then_cleared(rig: Rig) -> None:
    rig.hand.stick_relay(1)
    rig.io.set_relay(1, True)
    rig.events.wait_for(RelayFault(1, commanded=True, sensed=False))
    fault = rig.events.of(RelayFault)[0]
    assert not fault.cleared
    rig.hand.stick_relay(1, stuck=False)
    rig.events.wait_for(RelayFault(1, commanded=True, sensed=True))
    assert rig.events.of(RelayFault)[-1].cleared


def test_power_loss_reports_offline_reboot_and_online_with_relays_off(rig: Rig) -> None:
    rig.io.set_relay(0, True)
    rig.io.set_relay(3, True)
    wait_until(lambda: rig.io.status().relays_sensed[3], what="relay 3 closed")
    rig.power_cycle()
    rig.events.wait_for(BoardOffline())
    rig.events.wait_for(BoardRebooted(2))
    rig.events.wait_for(BoardOnline())
    assert rig.events.index(BoardOffline()) < rig.events.index(BoardRebooted(2)) < rig.events.index(BoardOnline())
    assert rig.io.online
    status = rig.io.status()
    assert status.boot_count == 2
    assert status.relays_commanded == (False,) * RELAYS
    wait_until(lambda: {(0, False, "power_loss"), (3, False, "power_loss")} <= set(rig.relay_log()))
    # The door agent re-applies what it wants after the reboot: the board takes it.
    rig.io.set_relay(3, True)
    wait_until(lambda: rig.io.status().relays_commanded[3], what="relay 3 set again")


def test_commands_fail_while_not_started() -> None:
    sim = SimulatedLockerBoard()
    with pytest.raises(BoardError) as caught:
        sim.set_relay(0, True)
    assert caught.value.reason == "not_started"
    link = LockerBoardLink(0, relays=1, doors=0, key_slots=0)
    with pytest.raises(BoardError) as caught:
        link.set_relay(0, True)
    assert caught.value.reason == "not_started"


# ---- the serial link over the pty only ----


def test_max_on_expires_on_the_board_after_the_host_is_gone(stub: StubBoardProcess) -> None:
    link = make_link(stub.host)
    link.start()
    started = time.monotonic()
    link.set_relay(2, True, max_on_ms=400)
    stub.wait_relay(2, True, cause="command")
    link.stop()  # the host dies with the lock released
    change = stub.wait_relay(2, False, timeout=5)
    assert change.cause == "max_on"
    assert time.monotonic() - started >= 0.38


def test_sensor_bounce_is_delivered_transition_by_transition_in_order(
    stub: StubBoardProcess, link: LockerBoardLink, events: Recorder
) -> None:
    stub.fault("bounce", door=1, times=9, interval_ms=1)
    changes = events.wait(lambda e: isinstance(e, InputChanged) and e.kind == "door", count=9)
    assert [change.active for change in changes] == [True, False] * 4 + [True]
    assert link.status().doors_open[1] is True
    assert events.of(LineError) == []


def test_garbage_is_counted_and_the_link_keeps_working(
    stub: StubBoardProcess, link: LockerBoardLink, events: Recorder
) -> None:
    stub.fault("garbage", bytes=64)
    events.wait(lambda e: isinstance(e, LineError))
    assert link.line_errors >= 1
    link.set_relay(1, True)
    stub.wait_relay(1, True)
    stub.open_door(0)
    events.wait_for(InputChanged("door", 0, True))
    assert link.online
    assert events.of(BoardOffline) == []


def test_lost_command_frame_is_retried(stub: StubBoardProcess, link: LockerBoardLink) -> None:
    stub.fault("deaf", frames=1)
    link.set_relay(0, True, timeout_s=0.6)
    assert stub.wait_relay(0, True).cause == "command"
    assert [change for change in stub.relay_log() if change.relay == 0] == [(0, True, "command")]


def test_silent_board_times_out_then_comes_back_without_a_reboot(
    stub: StubBoardProcess, link: LockerBoardLink, events: Recorder
) -> None:
    link.set_relay(0, True)
    stub.fault("silence", seconds=1.5)
    started = time.monotonic()
    with pytest.raises(BoardTimeout) as caught:
        link.set_relay(1, True, timeout_s=0.3)
    assert caught.value.attempts == 3
    assert time.monotonic() - started < 1.0
    events.wait_for(BoardOffline())
    assert not link.online
    events.wait_for(BoardOnline(), timeout=WAIT)
    assert events.of(BoardRebooted) == []
    assert link.status().relays_commanded[0] is True  # a line cut is not a power cut


def test_inputs_changed_during_a_power_cut_are_reported_after_it(
    stub: StubBoardProcess, link: LockerBoardLink, events: Recorder
) -> None:
    stub.power_cycle(seconds=1.0)
    events.wait_for(BoardOffline())
    stub.open_door(2)  # no power: no report now
    stub.take_key(5)
    events.wait_for(BoardOnline())
    events.wait_for(InputChanged("door", 2, True))
    events.wait_for(InputChanged("key_slot", 5, False))


def test_link_opens_a_device_path_with_pyserial() -> None:
    with StubBoardProcess(relays=RELAYS, doors=DOORS, key_slots=KEY_SLOTS, host_end="slave") as stub:
        assert isinstance(stub.host, str) and stub.host.startswith("/dev/")
        recorder = Recorder()
        with make_link(stub.host) as link:
            link.subscribe(recorder)
            assert link.online
            assert link.info is not None and link.info.relays == RELAYS
            link.set_relay(3, True, max_on_ms=1000)
            stub.wait_relay(3, True)
            stub.open_door(3)
            recorder.wait_for(InputChanged("door", 3, True))


def test_link_takes_an_open_serial_object() -> None:
    with StubBoardProcess(relays=RELAYS, doors=DOORS, key_slots=KEY_SLOTS, host_end="slave") as stub:
        port = serial.Serial(str(stub.host), baudrate=115200, timeout=0)
        try:
            with make_link(port) as link:
                link.set_relay(1, True)
                stub.wait_relay(1, True)
            assert port.is_open, "a serial object passed in stays the caller's to close"
        finally:
            port.close()


def test_missing_device_path_is_a_clear_error(tmp_path: Any) -> None:
    link = make_link(str(tmp_path / "ttyUSB9"))
    with pytest.raises(BoardError) as caught:
        link.start()
    assert caught.value.reason == "unavailable"
    assert "ttyUSB9" in str(caught.value)


def test_silent_line_at_start_is_reported_offline_later() -> None:
    master, slave = os.openpty()
    try:
        recorder = Recorder()
        link = make_link(master)
        link.start()  # nobody on the line: start does not fail, the board is just not there yet
        link.subscribe(recorder)  # in time: offline is reported offline_after_s after start returns
        try:
            assert not link.online
            recorder.wait_for(BoardOffline(), timeout=3)
            with pytest.raises(BoardTimeout):
                link.set_relay(0, True, timeout_s=0.2)
        finally:
            link.stop()
    finally:
        os.close(master)
        os.close(slave)


def test_start_and_stop_are_idempotent_and_stop_joins_threads(stub: StubBoardProcess) -> None:
    link = make_link(stub.host)
    link.start()
    link.start()
    assert link.online
    link.stop()
    link.stop()
    names = {thread.name for thread in threading.enumerate()}
    assert "locker-board" not in names and "locker-board-rx" not in names
    link.start()  # and it can start again
    link.set_relay(0, False)
    link.stop()


def test_concurrent_callers_each_get_their_answer(stub: StubBoardProcess, link: LockerBoardLink) -> None:
    failures: list[BaseException] = []

    def toggle(relay: int) -> None:
        try:
            for round_ in range(25):
                link.set_relay(relay, round_ % 2 == 0)
                link.status()
        except BaseException as err:  # collected for the assertion below
            failures.append(err)

    threads = [threading.Thread(target=toggle, args=(relay,)) for relay in range(RELAYS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    wait_until(lambda: stub.state()["coils"] == [True] * RELAYS, what="every coil on after an odd number of rounds")


# ---- a scripted board: exact frames the stub would never send ----


class ScriptedBoard:
    """The board end of a pty driven frame by frame by the test (answers HELLO and STATUS itself)."""

    def __init__(self) -> None:
        self.host_fd, self.fd = os.openpty()
        tty.setraw(self.host_fd)
        tty.setraw(self.fd)
        self.status = WireStatus(1, 0, False, (False,) * 2, (False,) * 2, (False,) * 2, ())
        # Held while the test changes the status and sends the report that goes with it, as one step.
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        """Put raw bytes on the line."""
        os.write(self.fd, data)

    def _answer(self) -> None:
        decoder = FrameDecoder()
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            for item in decoder.feed(os.read(self.fd, 4096)):
                if isinstance(item, Frame):
                    with self.lock:
                        self._reply(item)

    def _reply(self, item: Frame) -> None:
        if item.cmd == Command.HELLO:
            info = bytes([1, 2, 2, 0]) + (1).to_bytes(4, "big") + b"scripted"
            self.send(encode_frame(item.seq, Reply.INFO, info))
        elif item.cmd == Command.STATUS:
            self.send(encode_frame(item.seq, Reply.STATUS, encode_status(self.status)))
        else:
            self.send(encode_frame(item.seq, Reply.ACK))

    def close(self) -> None:
        """Stop answering and close both ends."""
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.fd)
        os.close(self.host_fd)


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedBoard, LockerBoardLink, Recorder]]:
    """A link to a scripted board."""
    board = ScriptedBoard()
    link = LockerBoardLink(board.host_fd, relays=2, doors=2, key_slots=0, heartbeat_s=0.1, offline_after_s=0.5)
    recorder = Recorder()
    link.subscribe(recorder)
    link.start()
    try:
        yield board, link, recorder
    finally:
        link.stop()
        board.close()


def test_unknown_frame_is_a_line_error(scripted: tuple[ScriptedBoard, LockerBoardLink, Recorder]) -> None:
    board, link, events = scripted
    board.send(encode_frame(7, 0xEE, b"\x01"))
    events.wait(lambda e: isinstance(e, LineError) and "unknown frame 0xEE" in e.reason)
    board.send(encode_frame(1, Report.INPUT_CHANGED, b"\x09\x00\x01"))  # a kind nobody defined
    events.wait(lambda e: isinstance(e, LineError) and "unknown kind" in e.reason)
    link.set_relay(0, True)


def test_a_lost_report_is_noticed_and_the_inputs_are_reread(
    scripted: tuple[ScriptedBoard, LockerBoardLink, Recorder],
) -> None:
    board, _, events = scripted
    with board.lock:
        board.status = WireStatus(1, 1, False, (False,) * 2, (False,) * 2, (True, False), ())
        board.send(encode_frame(1, Report.INPUT_CHANGED, encode_input(WireInput(InputCode.DOOR, 0, True))))
    events.wait_for(InputChanged("door", 0, True))
    # Report 2 (door 1 opened) is lost on the line; the board's status has it, report 3 reveals the gap.
    with board.lock:
        board.status = WireStatus(1, 3, False, (False,) * 2, (False,) * 2, (False, True), ())
        board.send(encode_frame(3, Report.INPUT_CHANGED, encode_input(WireInput(InputCode.DOOR, 0, False))))
    events.wait(lambda e: isinstance(e, LineError) and "lost 1" in e.reason)
    events.wait_for(InputChanged("door", 0, False))
    events.wait_for(InputChanged("door", 1, True))


def test_a_missed_boot_frame_is_noticed_from_the_boot_counter(
    scripted: tuple[ScriptedBoard, LockerBoardLink, Recorder],
) -> None:
    board, _, events = scripted
    board.status = WireStatus(7, 0, False, (False,) * 2, (False,) * 2, (False,) * 2, ())
    events.wait_for(BoardRebooted(7))  # the heartbeat's STATUS carries the new counter


# ---- the frame decoder: corpus and fuzzing ----


def test_crc_is_ccitt_false() -> None:
    assert crc16_ccitt(b"123456789") == 0x29B1


def test_stuffing_keeps_stx_out_of_the_body() -> None:
    frame = encode_frame(0x02, 0x10, bytes([0x02, 0x10, 0x00]))
    assert frame[0] == 0x02 and 0x02 not in frame[1:]
    assert FrameDecoder().feed(frame) == [Frame(0x02, 0x10, bytes([0x02, 0x10, 0x00]))]


@pytest.mark.parametrize(
    ("wire", "seq", "cmd", "payload"),
    [
        ("02 01 01 01 01 E6 54", 1, Command.HELLO, bytes([1])),
        ("02 0A 01 82 01 04 04 08 00 00 00 10 22 66 77 2D 0A", 1, Reply.INFO, bytes([1, 4, 4, 8, 0, 0, 0, 2]) + b"fw"),
        ("02 06 05 03 01 01 00 00 0B B8 C7 1E", 5, Command.SET_RELAY, encode_set_relay(1, True, 3000)),
        ("02 00 05 80 A2 E1", 5, Reply.ACK, b""),
        ("02 01 06 81 01 78 5C", 6, Reply.NAK, bytes([1])),
        ("02 00 07 10 22 75 49", 7, Command.STATUS, b""),
        ("02 03 04 90 01 10 22 01 CE 1A", 4, Report.INPUT_CHANGED, bytes([1, 2, 1])),
        ("02 01 05 91 01 22 7F", 5, Report.RELAY_EXPIRED, bytes([1])),
        ("02 08 00 9F 01 04 04 08 00 00 00 03 B0 63", 0, Report.BOOT, bytes([1, 4, 4, 8, 0, 0, 0, 3])),
        ("02 00 10 22 04 EA 7A", 2, Command.PING, b""),
    ],
)
def test_example_frames_in_the_protocol_document(wire: str, seq: int, cmd: int, payload: bytes) -> None:
    assert encode_frame(seq, cmd, payload) == bytes.fromhex(wire)
    assert FrameDecoder().feed(bytes.fromhex(wire)) == [Frame(seq, cmd, payload)]


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x00\xff\x13", "noise outside a frame"),
        (b"\x02\x01\x05\x80\xaa\x00\x00", "bad checksum"),
        (b"\x02\xf0", "oversized frame"),
        (b"\x02\x01\x10\x41", "bad escape"),
        (b"\x02\x01\x05" + encode_frame(1, Reply.ACK), "truncated frame"),
    ],
)
def test_bad_wire_input_is_reported_as_noise(wire: bytes, reason: str) -> None:
    items = FrameDecoder().feed(wire)
    assert any(isinstance(item, Noise) and item.reason == reason for item in items)


def _parse_any(frame: Frame) -> None:
    """Parse a frame's payload as the link would for its code."""
    parsers: dict[int, Callable[[bytes], object]] = {
        Reply.NAK: parse_nak,
        Reply.INFO: parse_info,
        Reply.STATUS: parse_status,
        Report.INPUT_CHANGED: parse_input,
        Report.RELAY_EXPIRED: parse_index,
        Report.BOOT: parse_info,
    }
    parser = parsers.get(frame.cmd)
    if parser is not None:
        parser(frame.payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(max_size=64), max_size=12))
def test_decoder_never_raises_on_arbitrary_bytes(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        for item in decoder.feed(chunk):
            assert isinstance(item, Frame | Noise)
            if isinstance(item, Frame):
                with contextlib.suppress(BoardError):  # the project's own error is the only one allowed
                    _parse_any(item)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.binary(max_size=80),
    suffix=st.binary(max_size=40),
    seq=st.integers(0, 255),
    cmd=st.integers(0, 255),
    payload=st.binary(max_size=MAX_PAYLOAD),
    cut=st.integers(1, 17),
)
def test_a_valid_frame_is_found_inside_garbage(
    prefix: bytes, suffix: bytes, seq: int, cmd: int, payload: bytes, cut: int
) -> None:
    wire = prefix + encode_frame(seq, cmd, payload) + suffix
    decoder = FrameDecoder()
    items = [item for start in range(0, len(wire), cut) for item in decoder.feed(wire[start : start + cut])]
    assert Frame(seq, cmd, payload) in items


@given(
    relays=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=64),
    doors=st.lists(st.booleans(), max_size=64),
    keys=st.lists(st.booleans(), max_size=255),
    tamper=st.booleans(),
    boot=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 255),
)
def test_status_payload_round_trips(
    relays: list[tuple[bool, bool]], doors: list[bool], keys: list[bool], tamper: bool, boot: int, seq: int
) -> None:
    status = WireStatus(
        boot, seq, tamper, tuple(c for c, _ in relays), tuple(s for _, s in relays), tuple(doors), tuple(keys)
    )
    assert parse_status(encode_status(status)) == status


def test_set_relay_payload_rejects_impossible_arguments() -> None:
    assert encode_set_relay(1, True, 250) == bytes([1, 1, 0, 0, 0, 250])
    assert encode_set_relay(1, False, 250) == bytes([1, 0, 0, 0, 0, 0])  # a timer means nothing when off
    for index, max_on in ((-1, None), (256, None), (True, None), (0, 0), (0, 3_600_001)):
        with pytest.raises(ValueError):
            encode_set_relay(index, True, max_on)
