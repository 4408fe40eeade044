"""USB HID relay boards through the real pyusb code path, on a backend that emulates the board at libusb's boundary."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from support.hid_relay_backend import EmulatedHidRelay, HidRelayBackend

from sekisho.drivers.locker import (
    BoardError,
    BoardEvent,
    BoardOffline,
    BoardOnline,
    BoardRebooted,
    BoardRefused,
    BoardTimeout,
    BoardUnavailable,
    LockIO,
    RelayFault,
    RelayTimerExpired,
)
from sekisho.drivers.relay.hid import HidRelayAccessDenied, HidRelayBoard, HidRelayNotFound, find_hid_relays

pytestmark = pytest.mark.timeout(60)

GET_FEATURE = (0xA1, 0x01, 0x0300, 0)
SET_FEATURE = (0x21, 0x09, 0x0300, 0)


class Recorder:
    """Board events in arrival order, with bounded waits."""

    def __init__(self) -> None:
        self.events: list[BoardEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: BoardEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, expected: BoardEvent, timeout: float = 5.0) -> None:
        """Wait until ``expected`` has been delivered."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while expected not in self.events:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {expected} within {timeout}s; got {self.events}")
                self._changed.wait(left)


@pytest.fixture
def relay_board() -> EmulatedHidRelay:
    """One emulated two-relay board."""
    return EmulatedHidRelay(serial="QAAMZ", relays=2)


@pytest.fixture
def backend(relay_board: EmulatedHidRelay) -> HidRelayBackend:
    """The emulated libusb with that board plugged in."""
    return HidRelayBackend(relay_board)


@pytest.fixture
def hid(backend: HidRelayBackend) -> Iterator[tuple[HidRelayBoard, Recorder]]:
    """A started HidRelayBoard on the emulated backend, polling quickly."""
    board = HidRelayBoard(backend=backend, poll_interval_s=0.05)
    recorder = Recorder()
    board.subscribe(recorder)
    board.start()
    try:
        yield board, recorder
    finally:
        board.stop()


def feature_requests(board: EmulatedHidRelay, request: tuple[int, int, int, int]) -> list[bytes]:
    """Return the data of the control transfers with this (bmRequestType, bRequest, wValue, wIndex)."""
    return [data for *setup, data in board.transfers if tuple(setup) == request]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until ``condition`` holds or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_switches_relays_with_feature_reports(
    hid: tuple[HidRelayBoard, Recorder], relay_board: EmulatedHidRelay
) -> None:
    board, _ = hid
    assert isinstance(board, LockIO)
    assert board.online and board.relays == 2
    assert not relay_board.kernel_driver, "usbhid must be detached before the interface is used"

    board.set_relay(0, True)
    assert relay_board.state == 0b01
    board.set_relay(1, True)
    assert relay_board.state == 0b11
    board.set_relay(0, False)
    assert relay_board.state == 0b10
    sent = feature_requests(relay_board, SET_FEATURE)
    assert sent == [
        bytes([0xFF, 1, 0, 0, 0, 0, 0, 0]),
        bytes([0xFF, 2, 0, 0, 0, 0, 0, 0]),
        bytes([0xFD, 1, 0, 0, 0, 0, 0, 0]),
    ]
    status = board.status()
    assert status.relays_commanded == status.relays_sensed == (False, True)
    assert status.doors_open == () and status.keys_present == () and status.boot_count is None


def test_state_and_serial_are_read_from_the_feature_report(backend: HidRelayBackend) -> None:
    backend.boards[0].state = 0b10
    with HidRelayBoard(backend=backend) as board:
        assert board.status().relays_commanded == (False, True)
        assert board.info is not None
        assert (board.info.serial, board.info.relays, board.info.path, board.info.product) == (
            "QAAMZ",
            2,
            "1-2",
            "USBRelay2",
        )
        reads = feature_requests(backend.boards[0], GET_FEATURE)
        assert reads and all(len(data) == 8 for data in reads)  # wLength 8: the buffer pyusb passes
    assert backend.boards[0].kernel_driver, "usbhid gets the interface back at stop"
    assert backend.opened == 0


def test_listing_boards_reads_their_serials_and_gives_them_back() -> None:
    first = EmulatedHidRelay(serial="AAAAA", relays=2, ports=(2,))
    second = EmulatedHidRelay(serial="BBBBB", relays=8, ports=(3, 1))
    other = EmulatedHidRelay(serial="ZZZZZ", product="SomeOtherVUSBThing", ports=(4,))
    backend = HidRelayBackend(first, second, other)
    found = find_hid_relays(backend=backend)
    assert [(info.serial, info.relays, info.path) for info in found] == [("AAAAA", 2, "1-2"), ("BBBBB", 8, "1-3.1")]
    assert first.kernel_driver and second.kernel_driver and other.kernel_driver
    assert backend.opened == 0


def test_board_is_chosen_by_serial_or_path_and_never_guessed() -> None:
    first = EmulatedHidRelay(serial="AAAAA", ports=(2,))
    second = EmulatedHidRelay(serial="BBBBB", ports=(3,))
    backend = HidRelayBackend(first, second)
    with pytest.raises(BoardUnavailable) as caught:
        HidRelayBoard(backend=backend).start()
    assert caught.value.reason == "ambiguous"
    assert first.kernel_driver and second.kernel_driver
    with HidRelayBoard(serial="BBBBB", backend=backend) as board:
        board.set_relay(0, True)
    assert (first.state, second.state) == (0, 1)
    with HidRelayBoard(path="1-2", backend=backend) as board:
        board.set_relay(1, True)
    assert (first.state, second.state) == (2, 1)


def test_missing_board_is_a_clear_error() -> None:
    with pytest.raises(HidRelayNotFound) as caught:
        HidRelayBoard(backend=HidRelayBackend()).start()
    assert isinstance(caught.value, BoardUnavailable)
    assert caught.value.reason == "not_found"
    assert "16c0:05df" in str(caught.value)
    with pytest.raises(HidRelayNotFound, match="serial=NOPE0"):
        HidRelayBoard(serial="NOPE0", backend=HidRelayBackend(EmulatedHidRelay())).start()
    # A V-USB device of another kind that shares the id is not a relay board.
    with pytest.raises(HidRelayNotFound):
        HidRelayBoard(backend=HidRelayBackend(EmulatedHidRelay(product="LedMatrix"))).start()


def test_permission_denied_keeps_errno_and_libusb_code() -> None:
    board = EmulatedHidRelay(access_denied=True)
    with pytest.raises(HidRelayAccessDenied) as caught:
        HidRelayBoard(backend=HidRelayBackend(board)).start()
    assert caught.value.reason == "permission_denied"
    assert caught.value.errno == errno.EACCES
    assert caught.value.backend_code == -3
    assert "udev" in str(caught.value)
    assert isinstance(caught.value.__cause__, Exception)  # pyusb's USBError, chained


def test_real_libusb_lookup_fails_cleanly_on_this_machine() -> None:
    # No backend given: pyusb looks for libusb itself. This machine has no USB bus, so either libusb is
    # missing or it finds nothing; both must be the project's error, never a pyusb exception.
    with pytest.raises(BoardUnavailable) as caught:
        HidRelayBoard(serial="QAAMZ").start()
    assert caught.value.reason in ("not_found", "no_backend")


def test_bad_relay_index_is_refused(hid: tuple[HidRelayBoard, Recorder]) -> None:
    board, _ = hid
    with pytest.raises(BoardRefused) as caught:
        board.set_relay(2, True)
    assert caught.value.reason == "bad_index"


def test_relay_that_does_not_switch_is_an_error_and_a_fault(
    hid: tuple[HidRelayBoard, Recorder], relay_board: EmulatedHidRelay
) -> None:
    board, events = hid
    relay_board.ignores_commands = True
    with pytest.raises(BoardError) as caught:
        board.set_relay(0, True)
    assert caught.value.reason == "not_applied"
    events.wait_for(RelayFault(0, commanded=True, sensed=False))
    relay_board.ignores_commands = False
    board.set_relay(0, True)
    events.wait_for(RelayFault(0, commanded=True, sensed=True))


def test_relay_switched_behind_our_back_is_a_fault(
    hid: tuple[HidRelayBoard, Recorder], relay_board: EmulatedHidRelay
) -> None:
    _, events = hid
    relay_board.state = 0b10
    events.wait_for(RelayFault(1, commanded=False, sensed=True))


def test_max_on_is_enforced_by_the_host(hid: tuple[HidRelayBoard, Recorder], relay_board: EmulatedHidRelay) -> None:
    board, events = hid
    started = time.monotonic()
    board.set_relay(0, True, max_on_ms=150)
    assert relay_board.state == 0b01
    events.wait_for(RelayTimerExpired(0))
    assert time.monotonic() - started >= 0.14
    assert relay_board.state == 0


def test_stop_releases_relays_still_waiting_for_their_timer(backend: HidRelayBackend) -> None:
    board = HidRelayBoard(backend=backend)
    board.start()
    board.set_relay(0, True, max_on_ms=60_000)
    board.set_relay(1, True)  # no timer: an emergency release stays released
    board.stop()
    board.stop()
    assert backend.boards[0].state == 0b10


def test_unplug_and_replug_report_offline_reboot_online(
    hid: tuple[HidRelayBoard, Recorder], relay_board: EmulatedHidRelay
) -> None:
    board, events = hid
    board.set_relay(1, True)
    relay_board.unplug()
    events.wait_for(BoardOffline())
    assert not board.online
    with pytest.raises(BoardUnavailable) as caught:
        board.set_relay(0, True)
    assert caught.value.reason == "gone"
    relay_board.plug()
    events.wait_for(BoardRebooted(1))
    events.wait_for(BoardOnline())
    assert events.events.index(BoardRebooted(1)) < events.events.index(BoardOnline())
    assert board.online
    assert board.status().relays_commanded == (False, False)
    board.set_relay(1, True)
    wait_until(lambda: relay_board.state == 0b10)


def test_stalled_board_times_out(hid: tuple[HidRelayBoard, Recorder], relay_board: EmulatedHidRelay) -> None:
    board, _ = hid
    relay_board.stalled = True
    with pytest.raises(BoardTimeout):
        board.set_relay(0, True)
    relay_board.stalled = False
