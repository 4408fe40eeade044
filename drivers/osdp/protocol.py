"""The OSDP reader interface door agents use: reader config, reader events and the ReaderLink protocol.

``link.py`` (libosdp, real readers) and ``simulated.py`` implement it. Card data and keypad input are secrets
for as long as they live here: their dataclass fields are left out of ``repr`` so that logging an event by
accident does not log a card number or a PIN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# SCBK-D, the default Secure Channel Base Key of the OSDP specification: public, so a secure channel set
# up with it protects nothing. Only install-mode readers may use it, and only to receive their real key.
SCBK_DEFAULT = bytes(range(0x30, 0x40))

SCBK_LENGTH = 16
MAX_ADDRESS = 126  # 0x7F is the broadcast address

LedColour = Literal["red", "green", "amber", "blue", "off"]
LED_COLOURS: tuple[LedColour, ...] = ("red", "green", "amber", "blue", "off")

# What a keypad may send: the digits, '*' and '#'.
KEYPAD_KEYS = frozenset("0123456789*#")


def validate_scbk(scbk: bytes, *, what: str = "scbk") -> bytes:
    """Return ``scbk`` as bytes if it is a usable Secure Channel Base Key; raise ValueError otherwise."""
    if not isinstance(scbk, bytes | bytearray) or len(scbk) != SCBK_LENGTH:
        raise ValueError(f"{what} must be {SCBK_LENGTH} bytes")
    if bytes(scbk) == SCBK_DEFAULT:
        # Everyone knows SCBK-D; a reader "keyed" with it is an unkeyed reader.
        raise ValueError(f"{what} must not be the public default key SCBK-D; use install_mode to key a new reader")
    return bytes(scbk)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReaderConfig:
    """One OSDP reader on a link: sekisho's name for it, its bus address and its secure-channel key."""

    reader_id: str
    address: int
    # The per-reader Secure Channel Base Key; None means the reader has not been keyed.
    scbk: bytes | None = field(default=None, repr=False)
    # Allow the reader to be keyed over a channel opened with SCBK-D (first key set at installation).
    install_mode: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.reader_id, str) or not self.reader_id:
            raise ValueError("reader_id must be a non-empty string")
        if isinstance(self.address, bool) or not isinstance(self.address, int) or not 0 <= self.address <= MAX_ADDRESS:
            raise ValueError(f"address of reader {self.reader_id!r} must be an integer in 0..{MAX_ADDRESS}")
        if self.scbk is not None:
            object.__setattr__(self, "scbk", validate_scbk(self.scbk, what=f"scbk of reader {self.reader_id!r}"))

    @property
    def requires_secure_channel(self) -> bool:
        """Return whether card and keypad data from this reader may only be trusted over a secure channel."""
        return self.scbk is not None or self.install_mode


@dataclass(frozen=True, slots=True)
class CardRead:
    """A card presented at a reader: its raw data, the number of valid bits and libosdp's format name."""

    reader_id: str
    data: bytes = field(repr=False)
    bits: int
    # "raw" (unspecified raw bits) or "wiegand" (raw Wiegand bits); "ascii" only if libosdp ever passes one
    # on (3.2 drops the deprecated osdp_FMT reply).
    format: str


@dataclass(frozen=True, slots=True)
class KeypadInput:
    """Keys pressed on a reader's keypad, in order: digits, ``*`` and ``#``."""

    reader_id: str
    keys: str = field(repr=False)


# Why a reader that answers has no Secure Channel: it answered the challenge with a cryptogram made with
# another key (a swapped reader, a wrong or lost key file); it says it cannot do Secure Channel at all (a
# plaintext reader where a keyed one belongs); or the handshake broke off in another way.
ScFailure = Literal["key_mismatch", "plaintext_reader", "sc_failed"]
SC_FAILURES: tuple[ScFailure, ...] = ("key_mismatch", "plaintext_reader", "sc_failed")


@dataclass(frozen=True, slots=True)
class ReaderStatus:
    """A reader's link state after a change: answering the control panel, and over an active secure channel.

    ``settled`` is False only while the link has not yet had its chance to bring the reader up after it
    started (its first attempt, bounded by the silence timeout): "offline" then means "not known yet", not
    "not answering". ``sc_failure`` says why a reader that answers is kept out (see ``ScFailure``); None for
    a reader that is online, or that does not answer at all.
    """

    reader_id: str
    online: bool
    secure: bool
    settled: bool = True
    sc_failure: ScFailure | None = None


@dataclass(frozen=True, slots=True)
class ReaderFlood:
    """A reader sends card reads faster than its limit (``flooding``), or has calmed down again.

    ``dropped`` counts the reads dropped in this flood so far; ``reads_per_s`` is the reader's limit.
    """

    reader_id: str
    flooding: bool
    dropped: int
    reads_per_s: float


ReaderEvent = CardRead | KeypadInput | ReaderStatus | ReaderFlood
ReaderObserver = Callable[[ReaderEvent], None]


class ReaderLink(Protocol):
    """Card readers seen from a door agent: their events, their LEDs and buzzers, their link state."""

    def start(self) -> None:
        """Start talking to the readers; idempotent."""
        ...

    def stop(self) -> None:
        """Stop talking to the readers and join the link's threads; idempotent."""
        ...

    def subscribe(self, observer: ReaderObserver) -> Callable[[], None]:
        """Deliver reader events to ``observer`` (each reader's current status first); return an unsubscriber."""
        ...

    def led(self, reader_id: str, colour: LedColour, *, on_ms: int = 1000, off_ms: int = 0, count: int = 1) -> bool:
        """Show ``colour`` on the reader's LED for ``count`` on/off cycles; return whether it was sent to it."""
        ...

    def buzz(self, reader_id: str, *, times: int = 1, on_ms: int = 200, off_ms: int = 200) -> bool:
        """Sound the reader's buzzer ``times`` times; return whether the command was sent to it."""
        ...

    def online(self, reader_id: str) -> bool:
        """Return whether the reader is answering the control panel."""
        ...

    def secure(self, reader_id: str) -> bool:
        """Return whether the reader is online over a secure channel opened with its own (non-default) key."""
        ...


TEXT_MAX_LENGTH = 32


@dataclass(frozen=True, slots=True)
class LedPattern:
    """A temporary LED pattern in OSDP's 100 ms units: on and off times, and the total time it runs."""

    on_tenths: int
    off_tenths: int
    timer_tenths: int


def led_pattern(colour: str, *, on_ms: int, off_ms: int, count: int) -> LedPattern:
    """Validate an LED request and return it in OSDP units; raise ValueError if a reader could not show it."""
    if colour not in LED_COLOURS:
        raise ValueError(f"colour must be one of {', '.join(LED_COLOURS)}")
    on = ms_to_tenths(on_ms, name="on_ms", minimum=1)
    off = ms_to_tenths(off_ms, name="off_ms")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    timer = count * (on + off)
    if timer > 255:
        # libosdp's Python binding keeps only 8 bits of OSDP's 16-bit temporary-LED timer.
        raise ValueError("count * (on_ms + off_ms) must be at most 25500 ms")
    return LedPattern(on, off, timer)


def buzz_pattern(*, times: int, on_ms: int, off_ms: int) -> tuple[int, int, int]:
    """Validate a buzzer request and return (on, off, repeat count) in OSDP units; raise ValueError otherwise."""
    if isinstance(times, bool) or not isinstance(times, int) or not 1 <= times <= 255:
        # OSDP reads a count of 0 as "until told otherwise": not something a door should do by accident.
        raise ValueError("times must be an integer in 1..255")
    return ms_to_tenths(on_ms, name="on_ms", minimum=1), ms_to_tenths(off_ms, name="off_ms"), times


def validate_text(message: str, seconds: int | None) -> None:
    """Raise ValueError unless ``message`` fits a reader display and ``seconds`` is a valid display time."""
    if not message.isascii() or not message.isprintable() or len(message) > TEXT_MAX_LENGTH:
        raise ValueError(f"message must be at most {TEXT_MAX_LENGTH} printable ASCII characters")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= 255):
        raise ValueError("seconds must be an integer in 1..255")


def validate_readers(readers: Sequence[ReaderConfig], *, max_readers: int = 32) -> None:
    """Raise ValueError unless ``readers`` can share one line: at least one, unique ids and addresses."""
    if not readers:
        raise ValueError("an OSDP link needs at least one reader")
    if len(readers) > max_readers:
        raise ValueError(f"at most {max_readers} readers per OSDP line")
    ids = [reader.reader_id for reader in readers]
    addresses = [reader.address for reader in readers]
    if len(set(ids)) != len(ids):
        raise ValueError("reader ids on a link must be unique")
    if len(set(addresses)) != len(addresses):
        raise ValueError("reader addresses on a line must be unique")


def ms_to_tenths(value: int, *, name: str, minimum: int = 0, maximum: int = 255) -> int:
    """Convert milliseconds to OSDP's 100 ms units, rounding; raise ValueError outside ``minimum..maximum`` units."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer number of milliseconds")
    tenths = (value + 50) // 100
    if not minimum <= tenths <= maximum:
        raise ValueError(f"{name} must be between {minimum * 100} and {maximum * 100} ms")
    return tenths
