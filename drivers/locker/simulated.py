"""A simulated locker board in-process: the ``LockIO`` interface plus test controls for doors, keys and faults.

Behaves like ``LockerBoardLink`` on a healthy line: NAK (``BoardRefused``) for a relay it does not have,
``BoardTimeout`` while powered off, the board's own ``max_on_ms`` timer, ``RelayFault`` for a stuck relay
once ``settle_s`` has passed (and its clearing), ``BoardOffline``/``BoardRebooted``/``BoardOnline`` around
a power cut with every relay off afterwards. Inputs changed by the test controls are delivered synchronously
in the caller's thread; what the board does by itself (timer expiry, relay checks) comes from its timer
thread, as it would from the link's worker. ``relay_log()`` lists every coil change with its cause.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from sekisho.drivers.locker.errors import BoardError, BoardRefused, BoardTimeout
from sekisho.drivers.locker.events import (
    BoardEvent,
    BoardObserver,
    BoardOffline,
    BoardOnline,
    BoardRebooted,
    BoardStatus,
    InputChanged,
    InputKind,
    RelayFault,
    RelayTimerExpired,
)
from sekisho.drivers.locker.protocol import NAK_REASONS, encode_set_relay
from sekisho.drivers.observers import ObserverList

_NAK_BAD_INDEX = next(code for code, name in NAK_REASONS.items() if name == "bad_index")


class RelayChange(NamedTuple):
    """A coil change the board made: ``cause`` is ``command``, ``max_on`` or ``power_loss``."""

    relay: int
    on: bool
    cause: str


class SimulatedLockerBoard:
    """An in-process locker board with lock relays, door sensors, key slots and a tamper switch."""

    def __init__(self, *, relays: int = 4, doors: int = 4, key_slots: int = 0, settle_s: float = 0.02) -> None:
        for name, value in (("relays", relays), ("doors", doors), ("key_slots", key_slots)):
            if not 0 <= value <= 255:
                raise ValueError(f"{name} must be in 0..255")
        self._commanded = [False] * relays
        self._sensed = [False] * relays
        self._stuck: set[int] = set()
        self._faulted: set[int] = set()
        self._doors = [False] * doors
        self._keys = [True] * key_slots  # a key cabinet starts full
        self._tamper = False
        self._settle_s = settle_s
        self._boot_count = 1
        self._powered = True
        self._snapshot: tuple[list[bool], list[bool], bool] | None = None  # inputs when the power went
        self._max_on: dict[int, float] = {}
        self._checks: dict[int, float] = {}
        self._log: list[RelayChange] = []
        self._observers: ObserverList[BoardEvent] = ObserverList("simulated lock board")
        self._lock = threading.Condition(threading.RLock())
        self._started = False
        self._thread: threading.Thread | None = None

    # ---- LockIO ----------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Return whether the board answers (started and powered)."""
        return self._started and self._powered

    @property
    def line_errors(self) -> int:
        """Return 0: an in-process board has no line to garble."""
        return 0

    def start(self) -> None:
        """Start the board's timer thread; idempotent."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._thread = threading.Thread(target=self._run_timers, name="sim-locker-board", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the timer thread (joined); idempotent. Relays stay as they are, as on a real board."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._started = False
            self._lock.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def subscribe(self, observer: BoardObserver) -> Callable[[], None]:
        """Deliver board events to ``observer``; return an unsubscriber. Only changes are delivered."""
        return self._observers.add(observer)

    def set_relay(self, index: int, on: bool, max_on_ms: int | None = None, timeout_s: float = 0.5) -> None:
        """Switch a lock relay; raise BoardRefused for a relay the board lacks, BoardTimeout while powered off."""
        encode_set_relay(index, on, max_on_ms)  # the same argument checks as the real link
        with self._lock:
            self._check_answering()
            if index >= len(self._commanded):
                message = "SET_RELAY: the board refused it (bad_index)"
                raise BoardRefused(message, reason="bad_index", nak_code=_NAK_BAD_INDEX)
            self._drive(index, on, "command")
            if on and max_on_ms is not None:
                self._max_on[index] = time.monotonic() + max_on_ms / 1000
            else:
                self._max_on.pop(index, None)
            self._lock.notify_all()

    def status(self, timeout_s: float = 0.5) -> BoardStatus:
        """Return the board's status; raise BoardTimeout while powered off."""
        with self._lock:
            self._check_answering()
            return BoardStatus(
                relays_commanded=tuple(self._commanded),
                relays_sensed=tuple(self._sensed),
                doors_open=tuple(self._doors),
                keys_present=tuple(self._keys),
                tamper=self._tamper,
                boot_count=self._boot_count,
            )

    # ---- test controls ---------------------------------------------------------------------------

    def open_door(self, index: int) -> None:
        """Open a door (its sensor goes active)."""
        self._set_input("door", index, True)

    def close_door(self, index: int) -> None:
        """Close a door."""
        self._set_input("door", index, False)

    def take_key(self, slot: int) -> None:
        """Take the key out of a slot."""
        self._set_input("key_slot", slot, False)

    def return_key(self, slot: int) -> None:
        """Put a key back into a slot."""
        self._set_input("key_slot", slot, True)

    def tamper(self, on: bool) -> None:
        """Open (True) or close (False) the enclosure's tamper switch."""
        self._set_input("tamper", 0, on)

    def stick_relay(self, index: int, stuck: bool = True) -> None:
        """Weld a relay's contacts where they are now (``stuck=False`` repairs it and lets them follow the coil)."""
        with self._lock:
            if not 0 <= index < len(self._commanded):
                raise IndexError(f"no relay {index}")
            if stuck:
                self._stuck.add(index)
                return
            self._stuck.discard(index)
            self._sensed[index] = self._commanded[index]
            self._checks[index] = time.monotonic()
            self._lock.notify_all()

    def power_loss(self) -> None:
        """Cut the board's power: every coil drops, the board stops answering (BoardOffline)."""
        with self._lock:
            if not self._powered:
                return
            for index, on in enumerate(self._commanded):
                if on:
                    self._drive(index, False, "power_loss")
            self._max_on.clear()
            self._powered = False
            self._snapshot = (list(self._doors), list(self._keys), self._tamper)
            started = self._started
        if started:
            self._observers.deliver(BoardOffline())

    def power_restore(self) -> None:
        """Give the power back: the board boots (counter + 1) with every relay off; inputs changed meanwhile follow."""
        events: list[BoardEvent] = []
        with self._lock:
            if self._powered:
                return
            self._powered = True
            self._boot_count += 1
            doors, keys, tamper = self._snapshot or (self._doors, self._keys, self._tamper)
            self._snapshot = None
            events += _changes("door", doors, self._doors)
            events += _changes("key_slot", keys, self._keys)
            if tamper != self._tamper:
                events.append(InputChanged("tamper", 0, self._tamper))
            events += [BoardRebooted(self._boot_count), BoardOnline()]
            started = self._started
            for index in range(len(self._commanded)):
                self._checks[index] = time.monotonic() + self._settle_s
            self._lock.notify_all()
        if started:
            for event in events:
                self._observers.deliver(event)

    def power_cycle(self) -> None:
        """Cut the power and give it back at once."""
        self.power_loss()
        self.power_restore()

    def relay_log(self) -> list[RelayChange]:
        """Return every coil change so far, oldest first."""
        with self._lock:
            return list(self._log)

    # ---- internals -------------------------------------------------------------------------------

    def _check_answering(self) -> None:
        if not self._started:
            raise BoardError("the simulated lock board is not started", reason="not_started")
        if not self._powered:
            raise BoardTimeout("no answer from the board (powered off)")

    def _drive(self, index: int, on: bool, cause: str) -> None:
        """Move a coil (caller holds the lock) and let its contacts follow unless they are stuck."""
        if self._commanded[index] != on:
            self._log.append(RelayChange(index, on, cause))
        self._commanded[index] = on
        if index not in self._stuck:
            self._sensed[index] = on
        self._checks[index] = time.monotonic() + self._settle_s

    def _set_input(self, kind: InputKind, index: int, active: bool) -> None:
        with self._lock:
            values = self._doors if kind == "door" else self._keys
            if kind == "tamper":
                changed = self._tamper != active
                self._tamper = active
            else:
                if not 0 <= index < len(values):
                    raise IndexError(f"no {kind} input {index}")
                changed = values[index] != active
                values[index] = active
            report = changed and self._started and self._powered
        if report:
            self._observers.deliver(InputChanged(kind, index, active))

    def _run_timers(self) -> None:
        while True:
            events: list[BoardEvent] = []
            with self._lock:
                if not self._started:
                    return
                now = time.monotonic()
                for index, deadline in list(self._max_on.items()):
                    if deadline <= now:
                        del self._max_on[index]
                        self._drive(index, False, "max_on")
                        events.append(RelayTimerExpired(index))
                if self._powered:
                    events += self._due_checks(now)
                deadlines = list(self._max_on.values()) + (list(self._checks.values()) if self._powered else [])
                if not events:
                    self._lock.wait(max(min(deadlines) - now, 0.001) if deadlines else None)
                    continue
            for event in events:
                self._observers.deliver(event)

    def _due_checks(self, now: float) -> list[BoardEvent]:
        events: list[BoardEvent] = []
        for index, deadline in list(self._checks.items()):
            if deadline > now:
                continue
            del self._checks[index]
            commanded, sensed = self._commanded[index], self._sensed[index]
            if commanded != sensed and index not in self._faulted:
                self._faulted.add(index)
                events.append(RelayFault(index, commanded, sensed))
            elif commanded == sensed and index in self._faulted:
                self._faulted.discard(index)
                events.append(RelayFault(index, commanded, sensed))
        return events


def _changes(kind: InputKind, before: list[bool], after: list[bool]) -> list[BoardEvent]:
    return [InputChanged(kind, i, now) for i, (was, now) in enumerate(zip(before, after, strict=True)) if was != now]
