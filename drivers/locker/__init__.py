"""Lock boards: the serial locker board (framed protocol, docs/locker-board-protocol.md) and its simulator.

Door agents talk to a ``LockIO``: the serial ``LockerBoardLink``, the in-process ``SimulatedLockerBoard`` and
the USB HID relay board (``drivers.relay.hid.HidRelayBoard``, relays only) all satisfy it. Only
``drivers.locker.line`` imports pyserial, and only when the serial link is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sekisho.drivers.locker.errors import BoardError, BoardRefused, BoardTimeout, BoardUnavailable, MalformedFrame
from sekisho.drivers.locker.events import (
    BoardEvent,
    BoardObserver,
    BoardOffline,
    BoardOnline,
    BoardRebooted,
    BoardStatus,
    InputChanged,
    InputKind,
    LineError,
    RelayFault,
    RelayTimerExpired,
)
from sekisho.drivers.locker.simulated import SimulatedLockerBoard

if TYPE_CHECKING:
    from sekisho.drivers.locker.link import LockerBoardLink


@runtime_checkable
class LockIO(Protocol):
    """A board of lock relays (and, where it has them, door sensors, key slots and a tamper switch)."""

    def start(self) -> None:
        """Open the device and start reporting; idempotent."""

    def stop(self) -> None:
        """Stop reporting and release the device; idempotent."""

    def subscribe(self, observer: BoardObserver) -> Callable[[], None]:
        """Deliver board events to ``observer``; return a function that unsubscribes it."""

    def set_relay(self, index: int, on: bool, max_on_ms: int | None = None, timeout_s: float = 0.5) -> None:
        """Switch a lock relay (on = released); with ``max_on_ms`` it is switched off again after that long."""

    def status(self) -> BoardStatus:
        """Return the board's current status."""

    @property
    def online(self) -> bool:
        """Return whether the board answers."""


def __getattr__(name: str) -> Any:
    """Import the pyserial-backed link on first use (``drivers.locker.LockerBoardLink``)."""
    if name == "LockerBoardLink":
        from sekisho.drivers.locker.link import LockerBoardLink

        return LockerBoardLink
    raise AttributeError(f"module 'sekisho.drivers.locker' has no attribute {name!r}")


__all__ = [
    "BoardError",
    "BoardEvent",
    "BoardObserver",
    "BoardOffline",
    "BoardOnline",
    "BoardRebooted",
    "BoardRefused",
    "BoardStatus",
    "BoardTimeout",
    "BoardUnavailable",
    "InputChanged",
    "InputKind",
    "LineError",
    "LockIO",
    "LockerBoardLink",
    "MalformedFrame",
    "RelayFault",
    "RelayTimerExpired",
    "SimulatedLockerBoard",
]
