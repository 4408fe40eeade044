"""The real backend: pcscd through pyscard's low-level ``scard`` API.

Monitoring is our own ``SCardGetStatusChange`` loop rather than pyscard's ``CardMonitor``: both block in
pcscd until a change, but the loop here also reports readers, survives a pcscd restart (CardMonitor stops
on SCARD_E_NO_SERVICE and prints a traceback), keeps PC/SC codes, and never opens a session just to build a
``Card`` object. Removal latency is bounded by pcscd's own polling of the reader driver.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from smartcard import scard

from sekisho.drivers.observers import ObserverList
from sekisho.drivers.smartcard.apdu import transmit_apdu
from sekisho.drivers.smartcard.errors import CardError, CardRemoved, MalformedResponse, ReaderUnavailable
from sekisho.drivers.smartcard.protocol import (
    GET_UID_APDU,
    CardEvent,
    CardObserver,
    CardPresence,
    ReaderEvent,
    ReaderObserver,
)

_LOG = logging.getLogger(__name__)

_PNP_READER = "\\\\?PnP?\\Notification"
# Upper bound on how long stop() waits for pcscd; SCardCancel normally wakes the loop at once.
_WAIT_MS = 1000
_RETRY_SECONDS = 1.0
# pcsc-lite's SCardStatus "no card" bit; pyscard does not export the SCardStatus state constants.
_SCARD_ABSENT = 0x0002

_REMOVED_CODES = frozenset(
    {scard.SCARD_W_REMOVED_CARD, scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_RESET_CARD, scard.SCARD_W_UNPOWERED_CARD}
)
_READER_CODES = frozenset(
    {
        scard.SCARD_E_NO_READERS_AVAILABLE,
        scard.SCARD_E_UNKNOWN_READER,
        scard.SCARD_E_READER_UNAVAILABLE,
        scard.SCARD_E_NO_SERVICE,
        scard.SCARD_E_SERVICE_STOPPED,
        scard.SCARD_E_INVALID_HANDLE,
    }
)


def _pcsc_message(code: int) -> str:
    """Return pcsc-lite's text for a return code."""
    try:
        return str(scard.SCardGetErrorMessage(code))
    except (scard.error, TypeError):
        return "unknown PC/SC error"


def raise_for_pcsc(code: int, action: str, reader: str | None = None) -> None:
    """Raise the project exception for a non-success PC/SC return code, keeping the code."""
    if code == scard.SCARD_S_SUCCESS:
        return
    where = f" on {reader!r}" if reader else ""
    message = f"{action}{where}: {_pcsc_message(code)}"
    if code in _REMOVED_CODES:
        raise CardRemoved(message, pcsc_code=code)
    if code in _READER_CODES:
        raise ReaderUnavailable(message, pcsc_code=code)
    raise CardError(message, pcsc_code=code)


def _call(action: str, function: Callable[..., Any], *args: Any) -> Any:
    """Call a pyscard ``scard`` function, turning its own exceptions into ours (chained, code kept if any)."""
    try:
        return function(*args)
    except scard.error as err:
        raise ReaderUnavailable(f"{action}: {err}", pcsc_code=getattr(err, "hresult", None)) from err


def _list_readers(context: int) -> list[str]:
    code, names = _call("SCardListReaders", scard.SCardListReaders, context, [])
    if code == scard.SCARD_E_NO_READERS_AVAILABLE:
        return []
    raise_for_pcsc(code, "SCardListReaders")
    return list(names)


def _states_for(readers: list[str], states: dict[str, int]) -> dict[str, int]:
    """Return the query states for a new reader list, keeping what is known and the PnP entry."""
    kept = {_PNP_READER: states.get(_PNP_READER, scard.SCARD_STATE_UNAWARE)}
    kept.update({name: states.get(name, scard.SCARD_STATE_UNAWARE) for name in readers})
    return kept


class PcscConnection:
    """A shared session with the card in one reader."""

    def __init__(self, reader: str) -> None:
        self.reader = reader
        self._card: int | None = None
        code, self._context = _call("SCardEstablishContext", scard.SCardEstablishContext, scard.SCARD_SCOPE_USER)
        raise_for_pcsc(code, "SCardEstablishContext")
        try:
            code, card, self._protocol = _call(
                "SCardConnect",
                scard.SCardConnect,
                self._context,
                reader,
                scard.SCARD_SHARE_SHARED,
                scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
            )
            raise_for_pcsc(code, "SCardConnect", reader)
            self._card = card
        except CardError:
            scard.SCardReleaseContext(self._context)
            raise

    def _raw_transmit(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise CardRemoved("transmit on a closed connection")
        code, response = _call("SCardTransmit", scard.SCardTransmit, self._card, self._protocol, list(apdu))
        raise_for_pcsc(code, "SCardTransmit", self.reader)
        if len(response) < 2:
            # Some reader drivers (vpcd among them) report a card pulled mid-command as an empty answer;
            # ask pcscd before blaming the card, so a removal is reported as one.
            self._raise_if_removed()
        return bytes(response)

    def _raise_if_removed(self) -> None:
        if self._card is None:
            raise CardRemoved("transmit on a closed connection")
        status = _call("SCardStatus", scard.SCardStatus, self._card)
        code, state = status[0], status[2]
        if code != scard.SCARD_S_SUCCESS:
            raise_for_pcsc(code, "SCardStatus", self.reader)
        if state & _SCARD_ABSENT:
            raise CardRemoved(f"card left {self.reader!r} during the command", pcsc_code=scard.SCARD_W_REMOVED_CARD)

    def transmit(self, apdu: bytes, *, name: str = "APDU") -> bytes:
        """Send a command APDU, return the response data; raise StatusWordError on anything but 9000."""
        return transmit_apdu(self._raw_transmit, apdu, name=name)

    def get_uid(self) -> bytes:
        """Return the card's UID (GET DATA ``FF CA 00 00 00``); never log it unmasked."""
        uid = self.transmit(GET_UID_APDU, name="GET DATA UID")
        if not uid:
            raise MalformedResponse("GET DATA UID returned no bytes")
        return uid

    def close(self) -> None:
        """End the session, leaving the card powered; idempotent."""
        if self._card is not None:
            card, self._card = self._card, None
            # The card may already be gone; the session is over either way.
            scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
            scard.SCardReleaseContext(self._context)

    def __enter__(self) -> PcscConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PcscBackend:
    """Readers and cards through pcscd; monitoring starts on the first subscription."""

    def __init__(self) -> None:
        self._cards_observers: ObserverList[CardEvent] = ObserverList("smart-card card")
        self._reader_observers: ObserverList[ReaderEvent] = ObserverList("smart-card reader")
        self._cards: dict[str, CardPresence] = {}
        self._known_readers: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: int | None = None
        self._context_lock = threading.Lock()
        self._first_pass = threading.Event()

    def readers(self) -> list[str]:
        """Return the names of the readers present now."""
        code, context = _call("SCardEstablishContext", scard.SCardEstablishContext, scard.SCARD_SCOPE_USER)
        raise_for_pcsc(code, "SCardEstablishContext")
        try:
            return _list_readers(context)
        finally:
            scard.SCardReleaseContext(context)

    def subscribe(self, observer: CardObserver) -> Callable[[], None]:
        """Deliver card diffs to ``observer`` (the current cards first, as added); return an unsubscriber."""
        with self._cards_observers.lock:
            unsubscribe = self._cards_observers.add(observer)
            if self._cards:
                self._cards_observers.deliver_to(observer, CardEvent(added=list(self._cards.values())))
        self._ensure_monitor()
        return unsubscribe

    def subscribe_readers(self, observer: ReaderObserver) -> Callable[[], None]:
        """Deliver reader diffs to ``observer`` (the current readers first, as added); return an unsubscriber."""
        with self._cards_observers.lock:
            unsubscribe = self._reader_observers.add(observer)
            if self._known_readers:
                self._reader_observers.deliver_to(observer, ReaderEvent(added=list(self._known_readers)))
        self._ensure_monitor()
        return unsubscribe

    def wait_until_monitoring(self, timeout: float) -> bool:
        """Wait until the monitor has seen pcscd's state once; return whether it has."""
        self._ensure_monitor()
        return self._first_pass.wait(timeout)

    def connect(self, reader: str) -> PcscConnection:
        """Open a session with the card in ``reader``; raise CardRemoved if there is none."""
        return PcscConnection(reader)

    def close(self) -> None:
        """Stop monitoring and release the backend's resources; idempotent."""
        self._stop.set()
        with self._context_lock:
            if self._context is not None:
                scard.SCardCancel(self._context)
        if self._thread is not None:
            self._thread.join(timeout=_WAIT_MS / 1000 + 2)
            self._thread = None

    def __enter__(self) -> PcscBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_monitor(self) -> None:
        with self._context_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._monitor, name="pcsc-monitor", daemon=True)
                self._thread.start()

    def _monitor(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self._watch()
                return
            except CardError as err:
                if not failing:
                    _LOG.warning("smart-card monitor lost pcscd: %s; retrying every %.0f s", err, _RETRY_SECONDS)
                    failing = True
            finally:
                with self._context_lock:
                    if self._context is not None:
                        scard.SCardReleaseContext(self._context)
                        self._context = None
            # Cards and readers cannot be vouched for while pcscd is away: report them gone once.
            self._apply({}, [])
            self._first_pass.set()
            self._stop.wait(_RETRY_SECONDS)
        if failing:
            _LOG.info("smart-card monitor stopped while pcscd was unreachable")

    def _watch(self) -> None:
        code, context = _call("SCardEstablishContext", scard.SCardEstablishContext, scard.SCARD_SCOPE_USER)
        raise_for_pcsc(code, "SCardEstablishContext")
        with self._context_lock:
            self._context = context
        if self._stop.is_set():
            return
        _LOG.info("smart-card monitor connected to pcscd")
        readers = _list_readers(context)
        states: dict[str, int] = {_PNP_READER: scard.SCARD_STATE_UNAWARE}
        states.update({name: scard.SCARD_STATE_UNAWARE for name in readers})
        while not self._stop.is_set():
            query = [(name, state) for name, state in states.items()]
            code, result = _call("SCardGetStatusChange", scard.SCardGetStatusChange, context, _WAIT_MS, query)
            if code == scard.SCARD_E_TIMEOUT:
                continue
            if code == scard.SCARD_E_CANCELLED:
                return
            if code == scard.SCARD_E_UNKNOWN_READER:
                readers = _list_readers(context)
                states = _states_for(readers, states)
                continue
            raise_for_pcsc(code, "SCardGetStatusChange")
            relist = False
            cards: dict[str, CardPresence] = {}
            changed_serial: list[str] = []
            for name, event, atr in result:
                previous = states.get(name, scard.SCARD_STATE_UNAWARE)
                states[name] = event & ~scard.SCARD_STATE_CHANGED
                if name == _PNP_READER:
                    relist = relist or bool(event & scard.SCARD_STATE_CHANGED)
                    continue
                if event & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE):
                    relist = True
                    continue
                if event & scard.SCARD_STATE_PRESENT and not event & scard.SCARD_STATE_MUTE:
                    cards[name] = CardPresence(reader=name, atr=bytes(atr).hex().upper())
                    # pcsc-lite counts card events in the upper 16 bits: a remove + insert between two
                    # wake-ups shows as the same "present" state with a new count.
                    if previous != scard.SCARD_STATE_UNAWARE and (previous >> 16) != (event >> 16):
                        changed_serial.append(name)
            if relist:
                readers = _list_readers(context)
                states = _states_for(readers, states)
                cards = {name: card for name, card in cards.items() if name in readers}
            self._apply(cards, readers, swapped=changed_serial)
            self._first_pass.set()

    def _apply(self, cards: dict[str, CardPresence], readers: list[str], *, swapped: list[str] | None = None) -> None:
        with self._cards_observers.lock:
            # A reader whose card changed (new ATR, or pcsc-lite's event count moved) reports removed + added.
            changed = set(swapped or []) | {name for name in cards if self._cards.get(name) != cards[name]}
            removed = [card for name, card in self._cards.items() if name not in cards or name in changed]
            added = [card for name, card in cards.items() if name in changed]
            readers_added = [name for name in readers if name not in self._known_readers]
            readers_removed = [name for name in self._known_readers if name not in readers]
            self._cards = dict(cards)
            self._known_readers = list(readers)
            if readers_added or readers_removed:
                self._reader_observers.deliver(ReaderEvent(added=readers_added, removed=readers_removed))
            if added or removed:
                self._cards_observers.deliver(CardEvent(added=added, removed=removed))
