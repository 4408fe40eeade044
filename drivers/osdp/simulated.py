"""A simulated OSDP reader link: in-process readers that tests and the demo drive programmatically.

Same interface and same rules as ``OsdpReaderLink``: readers come online on ``start``; card and keypad data
from a reader that has a key (or is in install mode) are delivered only while it is secure with a real key;
feedback to an offline reader is refused; ``set_key`` needs a secure channel (SCBK-D counts, as for a real
install-mode reader) and makes the reader secure with the new key. Observers are called synchronously.
Every LED, buzzer and text command a reader took is recorded in ``feedback``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sekisho.drivers.observers import ObserverList
from sekisho.drivers.osdp.errors import KeySetError, OsdpError, UnknownReader
from sekisho.drivers.osdp.protocol import (
    KEYPAD_KEYS,
    SCBK_DEFAULT,
    CardRead,
    KeypadInput,
    LedColour,
    ReaderConfig,
    ReaderEvent,
    ReaderObserver,
    ReaderStatus,
    buzz_pattern,
    led_pattern,
    validate_readers,
    validate_scbk,
    validate_text,
)

CARD_FORMATS = ("raw", "wiegand")


@dataclass(frozen=True, slots=True)
class LedFeedback:
    """An LED command a simulated reader took."""

    reader_id: str
    colour: LedColour
    on_ms: int
    off_ms: int
    count: int


@dataclass(frozen=True, slots=True)
class BuzzerFeedback:
    """A buzzer command a simulated reader took."""

    reader_id: str
    times: int
    on_ms: int
    off_ms: int


@dataclass(frozen=True, slots=True)
class TextFeedback:
    """A text command a simulated reader took."""

    reader_id: str
    message: str
    seconds: int | None


Feedback = LedFeedback | BuzzerFeedback | TextFeedback


@dataclass
class _SimulatedReader:
    config: ReaderConfig
    key: bytes | None = field(repr=False)
    connected: bool = True
    online: bool = False
    secure: bool = False

    def status(self) -> ReaderStatus:
        return ReaderStatus(self.config.reader_id, online=self.online, secure=self.secure)


class SimulatedReaderLink:
    """In-process OSDP readers with the same interface as OsdpReaderLink, plus cards, keys and faults to inject."""

    def __init__(self, readers: Sequence[ReaderConfig]) -> None:
        validate_readers(readers)
        self._readers: dict[str, _SimulatedReader] = {}
        for config in readers:
            key = config.scbk if config.scbk is not None else (SCBK_DEFAULT if config.install_mode else None)
            self._readers[config.reader_id] = _SimulatedReader(config=config, key=key)
        self._lock = threading.RLock()
        self._observers: ObserverList[ReaderEvent] = ObserverList("simulated OSDP reader")
        self._started = False
        self._stopped = False
        self.feedback: list[Feedback] = []

    @property
    def readers(self) -> tuple[ReaderConfig, ...]:
        """Return the configured readers."""
        return tuple(reader.config for reader in self._readers.values())

    def start(self) -> None:
        """Bring the connected readers online; idempotent."""
        with self._lock:
            if self._started:
                return
            if self._stopped:
                raise OsdpError("a stopped OSDP link cannot be restarted; build a new one")
            self._started = True
            for reader in self._readers.values():
                self._refresh(reader)

    def stop(self) -> None:
        """Take every reader offline without events, as the real link does; idempotent."""
        with self._lock:
            self._stopped = True
            for reader in self._readers.values():
                reader.online = reader.secure = False

    def subscribe(self, observer: ReaderObserver) -> Callable[[], None]:
        """Deliver reader events to ``observer`` (each reader's current status first); return an unsubscriber."""
        with self._lock:
            unsubscribe = self._observers.add(observer)
            for reader in self._readers.values():
                self._observers.deliver_to(observer, reader.status())
        return unsubscribe

    def online(self, reader_id: str) -> bool:
        """Return whether the reader is answering the control panel."""
        return self._reader(reader_id).online

    def secure(self, reader_id: str) -> bool:
        """Return whether the reader is online over a secure channel opened with its own (non-default) key."""
        return self._reader(reader_id).secure

    def led(self, reader_id: str, colour: LedColour, *, on_ms: int = 1000, off_ms: int = 0, count: int = 1) -> bool:
        """Record an LED command if the reader is online; return whether it took it."""
        led_pattern(colour, on_ms=on_ms, off_ms=off_ms, count=count)
        return self._record(reader_id, LedFeedback(reader_id, colour, on_ms, off_ms, count))

    def buzz(self, reader_id: str, *, times: int = 1, on_ms: int = 200, off_ms: int = 200) -> bool:
        """Record a buzzer command if the reader is online; return whether it took it."""
        buzz_pattern(times=times, on_ms=on_ms, off_ms=off_ms)
        return self._record(reader_id, BuzzerFeedback(reader_id, times, on_ms, off_ms))

    def text(self, reader_id: str, message: str, *, seconds: int | None = None) -> bool:
        """Record a text command if the reader is online; return whether it took it."""
        validate_text(message, seconds)
        return self._record(reader_id, TextFeedback(reader_id, message, seconds))

    def set_key(self, reader_id: str, new_scbk: bytes, *, timeout: float = 5.0) -> None:
        """Give the reader a new key over its (simulated) secure channel; it is then secure with it."""
        key = validate_scbk(new_scbk, what="new_scbk")
        with self._lock:
            reader = self._reader(reader_id)
            if not reader.online or reader.key is None:
                raise KeySetError(f"reader {reader_id} has no active secure channel to send a key over")
            reader.key = key
            self._refresh(reader)

    def set_online(self, reader_id: str, online: bool) -> None:
        """Connect or disconnect a reader (a cut cable, a reader back after a power cut)."""
        with self._lock:
            reader = self._reader(reader_id)
            reader.connected = online
            self._refresh(reader)

    def present_card(self, reader_id: str, data: bytes, bits: int | None = None, card_format: str = "raw") -> bool:
        """Tap a card at the reader; return whether a CardRead reached the observers."""
        if card_format not in CARD_FORMATS:
            raise ValueError(f"card_format must be one of {', '.join(CARD_FORMATS)}")
        if bits is None:
            bits = len(data) * 8
        if not data or (bits + 7) // 8 != len(data):
            raise ValueError("bits must end in the last byte of data, as OSDP carries them")
        with self._lock:
            reader = self._reader(reader_id)
            if not self._trusted(reader):
                return False
            self._observers.deliver(CardRead(reader_id, bytes(data), bits, card_format))
            return True

    def enter_keys(self, reader_id: str, keys: str) -> bool:
        """Press keys on the reader's keypad; return whether a KeypadInput reached the observers."""
        if not keys or not set(keys) <= KEYPAD_KEYS:
            raise ValueError("keys must be digits, '*' and '#'")
        with self._lock:
            reader = self._reader(reader_id)
            if not self._trusted(reader):
                return False
            self._observers.deliver(KeypadInput(reader_id, keys))
            return True

    def _reader(self, reader_id: str) -> _SimulatedReader:
        try:
            return self._readers[reader_id]
        except KeyError:
            raise UnknownReader(f"no OSDP reader {reader_id!r} on this link") from None

    def _trusted(self, reader: _SimulatedReader) -> bool:
        if not reader.online:
            return False
        return reader.secure or not reader.config.requires_secure_channel

    def _refresh(self, reader: _SimulatedReader) -> None:
        online = self._started and not self._stopped and reader.connected
        secure = online and reader.key is not None and reader.key != SCBK_DEFAULT
        if (online, secure) != (reader.online, reader.secure):
            reader.online, reader.secure = online, secure
            self._observers.deliver(reader.status())

    def _record(self, reader_id: str, item: Feedback) -> bool:
        with self._lock:
            if not self._reader(reader_id).online:
                return False
            self.feedback.append(item)
            return True
