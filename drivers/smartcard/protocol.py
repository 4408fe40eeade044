"""The smart-card interface the login guard and door readers use; pcsc.py and simulated.py implement it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

GET_UID_APDU = bytes.fromhex("FFCA000000")
# A card's answer to one command: PIV signatures take well under a second on real cards.
DEFAULT_APDU_TIMEOUT_S = 2.0


def mask_uid(uid: bytes) -> str:
    """Return a card UID safe for logs: only its last 4 hex digits (the demo's ``****-XXXX`` form)."""
    digits = uid.hex().upper()
    if len(digits) <= 4:
        # Showing the last four of a two-byte identifier would show all of it.
        return "****"
    return "****-" + digits[-4:]


@dataclass(frozen=True, slots=True)
class CardPresence:
    """A card seen in a reader: the reader's name and the card's ATR in hex (no UID: reading it needs a session)."""

    reader: str
    atr: str
    uid_masked: str | None = None


@dataclass(frozen=True, slots=True)
class CardEvent:
    """Cards that appeared and disappeared since the previous event (pyscard CardMonitor style diff)."""

    added: list[CardPresence] = field(default_factory=list)
    removed: list[CardPresence] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ReaderEvent:
    """Readers that appeared and disappeared since the previous event."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Deadline:
    """How long a card may take: each command (APDU) at most ``apdu_s``, the whole check over by ``at``.

    ``at`` is a ``time.monotonic()`` instant; None bounds each command only. A backend raises CardTimeout
    when either bound passes, and never waits beyond it.
    """

    apdu_s: float = DEFAULT_APDU_TIMEOUT_S
    at: float | None = None

    @classmethod
    def within(cls, check_s: float, apdu_s: float = DEFAULT_APDU_TIMEOUT_S) -> Deadline:
        """Return the bounds for a check that must be over ``check_s`` from now."""
        return cls(apdu_s=apdu_s, at=time.monotonic() + check_s)

    def remaining(self) -> float:
        """Return the seconds left for the whole check (infinite without ``at``, never negative)."""
        if self.at is None:
            return float("inf")
        return max(0.0, self.at - time.monotonic())

    def step_s(self) -> float:
        """Return how long the next command may take: the per-command bound, cut to the time left."""
        return min(self.apdu_s, self.remaining())


CardObserver = Callable[[CardEvent], None]
ReaderObserver = Callable[[ReaderEvent], None]


class CardConnection(Protocol):
    """A session with the card in one reader."""

    reader: str

    def transmit(self, apdu: bytes, *, name: str = "APDU") -> bytes:
        """Send a command APDU, return the response data; raise StatusWordError on anything but 9000."""
        ...

    def get_uid(self) -> bytes:
        """Return the card's UID (GET DATA ``FF CA 00 00 00``); never log it unmasked."""
        ...

    def close(self) -> None:
        """End the session, leaving the card powered; idempotent."""
        ...


class SmartCardBackend(Protocol):
    """A source of readers, card presence diffs and card sessions."""

    def readers(self) -> list[str]:
        """Return the names of the readers present now."""
        ...

    def subscribe(self, observer: CardObserver) -> Callable[[], None]:
        """Deliver card diffs to ``observer`` (the current cards first, as added); return an unsubscriber."""
        ...

    def subscribe_readers(self, observer: ReaderObserver) -> Callable[[], None]:
        """Deliver reader diffs to ``observer`` (the current readers first, as added); return an unsubscriber."""
        ...

    def connect(self, reader: str, *, deadline: Deadline | None = None) -> CardConnection:
        """Open a session with the card in ``reader``; raise CardRemoved if there is none.

        Every exchange of the session (the connect included) keeps to ``deadline`` (the backend's own
        per-command bound when None) and raises CardTimeout rather than wait longer.
        """
        ...

    def close(self) -> None:
        """Stop monitoring and release the backend's resources; idempotent."""
        ...
