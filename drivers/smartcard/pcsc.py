"""The real backend: pcscd through pyscard's low-level ``scard`` API.

Monitoring is our own ``SCardGetStatusChange`` loop rather than pyscard's ``CardMonitor``: both block in
pcscd until a change, but the loop here also reports readers, survives a pcscd restart (CardMonitor stops
on SCARD_E_NO_SERVICE and prints a traceback), keeps PC/SC codes, and never opens a session just to build a
``Card`` object. Removal latency is bounded by pcscd's own polling of the reader driver.

Sessions are bounded in time (``Deadline``: per command and per check). ``SCardTransmit`` has no timeout,
and nothing in pcsc-lite interrupts one whose card stopped answering (tried with pcscd 1.9.9 and vpcd):
``SCardCancel`` returns at once but only ends ``SCardGetStatusChange``; ``SCardDisconnect`` and
``SCardReleaseContext`` from another thread wait on the client library's lock of that context; a second
context's ``SCardConnect`` or ``SCardStatus`` on the reader waits on pcscd's lock of the reader. The transmit
returns when the card answers or leaves (or a real reader's driver gives up). So each session makes all its
PC/SC calls on a thread of its own; the caller waits for each call only as long as the deadline allows, then
gets ``CardTimeout`` and walks away; the session's disconnect is queued behind the stuck call. Other readers
are not affected (pcscd locks per reader, or per slot when the driver says its slots are independent, as
vpcd does), and the stuck reader serves the next card once the silent one has left.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from smartcard import scard

from sekisho.drivers.observers import ObserverList
from sekisho.drivers.smartcard.apdu import transmit_apdu
from sekisho.drivers.smartcard.errors import (
    CardError,
    CardRemoved,
    CardTimeout,
    MalformedResponse,
    ReaderUnavailable,
)
from sekisho.drivers.smartcard.protocol import (
    DEFAULT_APDU_TIMEOUT_S,
    GET_UID_APDU,
    CardEvent,
    CardObserver,
    CardPresence,
    Deadline,
    ReaderEvent,
    ReaderObserver,
)

T = TypeVar("T")

_LOG = logging.getLogger(__name__)

_PNP_READER = "\\\\?PnP?\\Notification"
# Upper bound on how long stop() waits for pcscd; SCardCancel normally wakes the loop at once.
_WAIT_MS = 1000
_RETRY_SECONDS = 1.0
# pcsc-lite's SCardStatus "no card" bit; pyscard does not export the SCardStatus state constants.
_SCARD_ABSENT = 0x0002
# How long to let pcscd confirm a removal after a command came back empty or failed: it polls the reader
# driver every 400 ms, and only then does SCardStatus say the card has gone.
_CONFIRM_REMOVAL_S = 1.0
_CONFIRM_POLL_S = 0.05

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


class _SessionThread:
    """One daemon thread that makes every PC/SC call of one session, so its caller can stop waiting.

    A daemon, not an executor worker: a call stuck in pcscd must not keep the process (the PAM helper) from
    exiting, and a process exit is a clean end for pcscd too.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[[], T]) -> Future[T]:
        """Queue a call; its future holds the result or the exception."""
        future: Future[T] = Future()
        self._jobs.put((function, future))
        return future

    def finish(self) -> None:
        """End the thread once the calls queued so far have run."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, future = job
            try:
                future.set_result(function())
            except Exception as err:  # handed to the caller through the future
                future.set_exception(err)


class PcscConnection:
    """A shared session with the card in one reader, every call bounded by the session's deadline."""

    def __init__(self, reader: str, deadline: Deadline) -> None:
        self.reader = reader
        self._deadline = deadline
        self._context: int | None = None
        self._card: int | None = None
        self._protocol = 0
        self._closed = False
        # The call that did not come back in time: the session is over, its handles wait on that call.
        self._stuck: str | None = None
        self._thread = _SessionThread(f"pcsc {reader}")
        try:
            self._call("SCardConnect", self._open)
        except CardError:
            self.close()
            raise

    # --- on the session thread -----------------------------------------------------------------

    def _open(self) -> None:
        code, context = _call("SCardEstablishContext", scard.SCardEstablishContext, scard.SCARD_SCOPE_USER)
        raise_for_pcsc(code, "SCardEstablishContext")
        self._context = context
        code, card, protocol = _call(
            "SCardConnect",
            scard.SCardConnect,
            context,
            self.reader,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        raise_for_pcsc(code, "SCardConnect", self.reader)
        self._card, self._protocol = card, protocol

    def _transmit_now(self, apdu: bytes) -> tuple[int, list[int]]:
        code, response = _call("SCardTransmit", scard.SCardTransmit, self._card, self._protocol, list(apdu))
        return int(code), list(response)

    def _card_left(self, wait_s: float) -> bool:
        """Ask pcscd whether the card has left, for up to ``wait_s`` while it still says present."""
        give_up = time.monotonic() + wait_s
        while True:
            status = _call("SCardStatus", scard.SCardStatus, self._card)
            code, state = status[0], status[2]
            if code in _REMOVED_CODES:
                return True
            raise_for_pcsc(code, "SCardStatus", self.reader)
            if state & _SCARD_ABSENT:
                return True
            if time.monotonic() >= give_up:
                return False
            time.sleep(_CONFIRM_POLL_S)

    def _release(self) -> None:
        card, self._card = self._card, None
        context, self._context = self._context, None
        # The card may already be gone; the session is over either way.
        if card is not None:
            with contextlib.suppress(scard.error):
                scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        if context is not None:
            with contextlib.suppress(scard.error):
                scard.SCardReleaseContext(context)

    # --- the caller's side ---------------------------------------------------------------------

    def _call(self, action: str, function: Callable[[], T], *, extra_s: float = 0.0) -> T:
        """Run ``function`` on the session thread; wait for it no longer than the deadline allows."""
        if self._stuck is not None:
            raise CardTimeout(f"{action} on {self.reader!r}: the card never answered {self._stuck}")
        wait = min(self._deadline.step_s() + extra_s, self._deadline.remaining())
        if wait <= 0:
            raise CardTimeout(f"{action} on {self.reader!r}: the time for this card check is up")
        future = self._thread.submit(function)
        try:
            return future.result(timeout=wait)
        except TimeoutError:
            self._stuck = action
            raise CardTimeout(f"{action} on {self.reader!r}: no answer within {wait:.2f} s") from None

    def _raw_transmit(self, apdu: bytes) -> bytes:
        if self._closed:
            raise CardRemoved("transmit on a closed connection")
        code, response = self._call("SCardTransmit", lambda: self._transmit_now(apdu))
        if code != scard.SCARD_S_SUCCESS:
            if code not in _REMOVED_CODES | _READER_CODES:
                # A reader may report a card pulled mid-command as a failed transmission: ask before blaming it.
                self._raise_if_left(_CONFIRM_REMOVAL_S)
            raise_for_pcsc(code, "SCardTransmit", self.reader)
        if len(response) < 2:
            # vpcd (and some reader drivers) report a card pulled mid-command as an empty answer, and pcscd
            # notices the removal only on its next poll of the reader: give it that long before blaming the card.
            self._raise_if_left(0.0 if response else _CONFIRM_REMOVAL_S)
        return bytes(response)

    def _raise_if_left(self, wait_s: float) -> None:
        wait = min(wait_s, self._deadline.remaining())
        if self._call("SCardStatus", lambda: self._card_left(wait), extra_s=wait):
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
        """End the session, leaving the card powered; idempotent, and never waits on a card that stalled."""
        if self._closed:
            return
        self._closed = True
        released = self._thread.submit(self._release)
        self._thread.finish()
        if self._stuck is None:
            # Normally immediate; bounded all the same, so a reader that stalls now cannot hold the caller.
            with contextlib.suppress(TimeoutError):
                released.result(timeout=self._deadline.apdu_s)

    def __enter__(self) -> PcscConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PcscBackend:
    """Readers and cards through pcscd; monitoring starts on the first subscription."""

    def __init__(self, *, apdu_timeout_s: float = DEFAULT_APDU_TIMEOUT_S) -> None:
        self._apdu_timeout_s = apdu_timeout_s
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

    def connect(self, reader: str, *, deadline: Deadline | None = None) -> PcscConnection:
        """Open a session with the card in ``reader``; raise CardRemoved if there is none.

        Every call of the session keeps to ``deadline`` (default: this backend's per-command bound only) and
        raises CardTimeout past it; see the module docstring for why the stuck call is left behind.
        """
        return PcscConnection(reader, deadline if deadline is not None else Deadline(apdu_s=self._apdu_timeout_s))

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
