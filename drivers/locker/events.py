"""What a lock board reports upward: frozen event dataclasses for observers, and the board's status snapshot."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

InputKind = Literal["door", "key_slot", "tamper"]


@dataclass(frozen=True, slots=True)
class InputChanged:
    """An input changed: ``door`` (active = open), ``key_slot`` (active = key present) or ``tamper`` (index 0)."""

    kind: InputKind
    index: int
    active: bool


@dataclass(frozen=True, slots=True)
class BoardRebooted:
    """The board restarted (power loss, watchdog): every relay is off until the host sets it again."""

    boot_count: int


@dataclass(frozen=True, slots=True)
class BoardOffline:
    """The board stopped answering."""


@dataclass(frozen=True, slots=True)
class BoardOnline:
    """The board answers again (or for the first time after ``start`` found it silent)."""


@dataclass(frozen=True, slots=True)
class RelayFault:
    """A relay's feedback contact disagrees with its command after the settle time, or agrees again.

    ``commanded != sensed``: the relay is stuck (welded contacts, dead coil, broken feedback wire).
    ``commanded == sensed``: a fault reported earlier has cleared.
    """

    index: int
    commanded: bool
    sensed: bool

    @property
    def cleared(self) -> bool:
        """Return whether this report says an earlier fault is over."""
        return self.commanded == self.sensed


@dataclass(frozen=True, slots=True)
class RelayTimerExpired:
    """The board released a relay itself because the command's ``max_on_ms`` ran out."""

    index: int


@dataclass(frozen=True, slots=True)
class LineError:
    """Something on the line was not a good frame (noise, bad checksum, unknown frame, lost reports)."""

    reason: str


BoardEvent = InputChanged | BoardRebooted | BoardOffline | BoardOnline | RelayFault | RelayTimerExpired | LineError
BoardObserver = Callable[[BoardEvent], None]


@dataclass(frozen=True, slots=True)
class BoardStatus:
    """A snapshot of the board: relays as commanded and as sensed by their feedback contacts, inputs, boot count."""

    relays_commanded: tuple[bool, ...]
    relays_sensed: tuple[bool, ...]
    doors_open: tuple[bool, ...]
    keys_present: tuple[bool, ...]
    tamper: bool
    # None for boards that do not count their boots (the USB HID relay).
    boot_count: int | None

    @property
    def relay_mismatches(self) -> tuple[int, ...]:
        """Return the relays whose feedback contact disagrees with the command right now."""
        return tuple(
            index
            for index, (commanded, sensed) in enumerate(zip(self.relays_commanded, self.relays_sensed, strict=True))
            if commanded != sensed
        )
