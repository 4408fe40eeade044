"""The card-removal lock: simulated cards for the logic, and one run through the real pcscd and vpcd."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sekisho.agents.login.lock import CardRemovalLock
from sekisho.drivers.smartcard.protocol import CardEvent
from sekisho.drivers.smartcard.simulated import SimulatedBackend, SimulatedCard
from sekisho.lab.pcscd import VPCD_READER
from sekisho.protocol.events import EVENT_TYPES

READER = "Simulated Reader 0"
OTHER = "Simulated Reader 1"


class Events:
    """Collects emitted (type, payload) pairs, validating each payload against its registered schema."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._changed = threading.Condition()

    def __call__(self, type_: str, payload: dict[str, Any]) -> None:
        EVENT_TYPES[type_].model_validate(payload)
        with self._changed:
            self.items.append((type_, payload))
            self._changed.notify_all()

    def types(self) -> list[str]:
        """Return the event types in order."""
        with self._changed:
            return [t for t, _ in self.items]

    def wait_for(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """Return the payload of the first event of ``type_``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for t, payload in self.items:
                    if t == type_:
                        return payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {type_} within {timeout} s; saw {self.items}")
                self._changed.wait(remaining)


class ManualTimer:
    """An end timer the test fires by hand: no test waits for the end delay to pass on the wall clock."""

    def __init__(self, interval_s: float, function: Callable[[], None]) -> None:
        self.interval_s = interval_s
        self.function = function
        self.started = False
        self.cancelled = False

    def start(self) -> None:
        self.started = True

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        """Run the callback, cancelled or not: a real timer may fire just as it is cancelled."""
        self.function()


class ManualTimers:
    """Builds ManualTimers for the lock and keeps them in order."""

    def __init__(self) -> None:
        self.made: list[ManualTimer] = []

    def __call__(self, interval_s: float, function: Callable[[], None]) -> ManualTimer:
        timer = ManualTimer(interval_s, function)
        self.made.append(timer)
        return timer


class SteppingClock:
    """A monotonic clock that moves on by ``step`` seconds each time it is read."""

    def __init__(self, start: float = 100.0, step: float = 0.25) -> None:
        self.now = start - step
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _writer(path: Path, word: str) -> list[str]:
    return [sys.executable, "-c", f"open({str(path)!r}, 'a').write({word + chr(10)!r})"]


def _wait_file(path: Path, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never contained {text!r}")


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def backend() -> SimulatedBackend:
    """Two simulated readers, a card in the first."""
    sim = SimulatedBackend((READER, OTHER))
    sim.insert(SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"), uid_only=True), READER)
    return sim


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    """Where the test commands write what they did."""
    return tmp_path / "commands.log"


def _lock(backend: Any, events: Events, log_file: Path, reader: str = READER, **kwargs: Any) -> CardRemovalLock:
    options: dict[str, Any] = {
        "lock_command": _writer(log_file, "locked"),
        "end_command": _writer(log_file, "ended"),
        "end_after_s": 0.3,
    }
    options.update(kwargs)
    return CardRemovalLock(backend, reader=reader, terminal="term-1", user="tanaka", emit=events, **options)


@pytest.fixture
def events() -> Events:
    """The emitted events."""
    return Events()


@pytest.fixture
def timers() -> ManualTimers:
    """End timers fired by the test."""
    return ManualTimers()


def test_removal_records_then_locks(backend: SimulatedBackend, events: Events, log_file: Path) -> None:
    # Read once at the removal and once as the lock command starts: the latency is the clock's difference.
    lock = _lock(backend, events, log_file, end_after_s=30, clock=SteppingClock(start=100.0, step=0.25))
    seen_before_command: list[bool] = []
    original = events.__call__

    def emit(type_: str, payload: dict[str, Any]) -> None:
        # The command must not have run yet when the event is recorded.
        seen_before_command.append(not log_file.exists())
        original(type_, payload)

    lock._emit = emit
    lock.start()
    try:
        assert events.items == []
        backend.remove(READER)
        assert events.items == [("session.locked", {"terminal": "term-1", "user": "tanaka", "cause": "card_removed"})]
        assert seen_before_command == [True]
        _wait_file(log_file, "locked")
        assert lock.locked
        assert (lock.last_removal_at, lock.last_lock_started_at, lock.last_lock_latency_s) == (100.0, 100.25, 0.25)
        assert lock.errors == []
    finally:
        lock.stop()


def test_reinsert_cancels_end(backend: SimulatedBackend, events: Events, log_file: Path, timers: ManualTimers) -> None:
    lock = _lock(backend, events, log_file, timer=timers)
    lock.start()
    try:
        backend.remove(READER)
        [end] = timers.made
        assert end.started and end.interval_s == 0.3 and not end.cancelled
        backend.insert(SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"), uid_only=True), READER)
        assert events.types() == ["session.locked", "session.unlocked"]
        assert events.items[1][1]["cause"] == "card_returned"
        assert not lock.locked
        assert end.cancelled
        end.fire()  # a timer that fired as the card came back ends nothing
        assert events.types() == ["session.locked", "session.unlocked"]
        assert not lock.locked
        _wait_file(log_file, "locked")
        assert "ended" not in log_file.read_text()
    finally:
        lock.stop()


def test_absence_ends_session(backend: SimulatedBackend, events: Events, log_file: Path, timers: ManualTimers) -> None:
    lock = _lock(backend, events, log_file, timer=timers)
    lock.start()
    try:
        backend.remove(READER)
        [end] = timers.made
        assert end.started and end.interval_s == 0.3  # end_after_s
        assert events.types() == ["session.locked"]  # nothing ends before the timer does
        end.fire()
        assert events.types() == ["session.locked", "session.ended"]
        assert events.items[1][1]["cause"] == "card_absent"
        _wait_file(log_file, "ended")
        assert not lock.locked
        end.fire()  # once ended, a second firing changes nothing
        assert events.types() == ["session.locked", "session.ended"]
    finally:
        lock.stop()


def test_failing_lock_command_is_recorded(backend: SimulatedBackend, events: Events, log_file: Path) -> None:
    lock = _lock(backend, events, log_file, lock_command=["/nonexistent/sekisho-lock"], end_command=None)
    lock.start()
    try:
        backend.remove(READER)
        # The failed lock reaches the controller as an event, not only the log.
        assert events.types() == ["session.locked", "session.lock_failed"]
        failed = events.items[1][1]
        assert failed["action"] == "lock" and "could not start" in failed["detail"]
        assert len(lock.errors) == 1 and "could not start" in lock.errors[0]
        events.wait_for("session.ended")  # the default end timer: a real daemon threading.Timer
    finally:
        lock.stop()


def test_failing_exit_status_is_recorded(backend: SimulatedBackend, events: Events, log_file: Path) -> None:
    lock = _lock(backend, events, log_file, lock_command=[sys.executable, "-c", "raise SystemExit(3)"], end_after_s=30)
    lock.start()
    try:
        backend.remove(READER)
        _wait(lambda: bool(lock.errors))
        assert "exited 3" in lock.errors[0]
        events.wait_for("session.lock_failed")
    finally:
        lock.stop()


def test_other_reader_ignored(backend: SimulatedBackend, events: Events, log_file: Path, timers: ManualTimers) -> None:
    backend.insert(SimulatedCard(uid=bytes.fromhex("04FFFFFFFFFFFF"), uid_only=True), OTHER)
    lock = _lock(backend, events, log_file, timer=timers)
    lock.start()
    try:
        # The simulated backend calls its observers before remove() returns: the lock has seen the removal.
        backend.remove(OTHER)
        assert events.items == [] and not lock.locked and timers.made == []
        assert not log_file.exists()  # the lock command runs only after session.locked is recorded
        backend.remove(READER)  # the watched reader still locks
        assert events.types() == ["session.locked"]
        _wait_file(log_file, "locked")
    finally:
        lock.stop()


def test_stop_cancels_timer(backend: SimulatedBackend, events: Events, log_file: Path, timers: ManualTimers) -> None:
    lock = _lock(backend, events, log_file, timer=timers)
    lock.start()
    backend.remove(READER)
    [end] = timers.made
    lock.stop()
    assert end.cancelled
    end.fire()  # a timer that fired as the watch stopped ends nothing
    assert events.types() == ["session.locked"]
    backend.insert(SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"), uid_only=True), READER)
    assert events.types() == ["session.locked"]


# -- the real pcscd --------------------------------------------------------------------------------------


def test_pcsc_removal_locks(pcscd: object, events: Events, log_file: Path) -> None:
    from sekisho.drivers.smartcard.pcsc import PcscBackend
    from sekisho.firmware_stubs.piv_card import VirtualCard

    card = VirtualCard(uid=bytes.fromhex("04A1B2C3D4E5F6"))
    inserted = threading.Event()

    def watch(event: CardEvent) -> None:
        if any(c.reader == VPCD_READER for c in event.added):
            inserted.set()

    with PcscBackend() as backend:
        assert backend.wait_until_monitoring(5)
        lock = _lock(backend, events, log_file, reader=VPCD_READER, end_after_s=30)
        lock.start()
        # Subscribed after the lock: the backend calls its observers in order, in one delivery, so once
        # this one has seen the card arrive the lock has handled that event too.
        unsubscribe = backend.subscribe(watch)
        try:
            card.insert()
            assert inserted.wait(10), "pcscd never reported the card"
            assert events.items == []  # a card arriving locks nothing
            card.remove()
            events.wait_for("session.locked")
            _wait_file(log_file, "locked")
            assert lock.errors == []
        finally:
            unsubscribe()
            lock.stop()
            card.remove()
