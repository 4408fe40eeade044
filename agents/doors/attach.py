"""Wire the door agent core to a running agent and to the real drivers: reader links in, lock board out.

``DoorAgentCore`` (service.py) is pure logic; this module feeds it. Reader events (OSDP readers through
libosdp, PC/SC readers through pcscd) become card evidence keyed with the site key; board events (door
sensors, key slots, tamper, reboots, stuck relays) become inputs; relay commands go to the board; grants
and refusals light the reader's LED and sound its buzzer. A timer thread drives the core's
deadlines (re-lock, held-open, pending PIN/second person) to within ``tick_s``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sekisho.agents.doors.checks import CardEvidence, PolicyState
from sekisho.agents.doors.service import Clock, DoorAgentCore
from sekisho.agents.runtime.cards import enrolled_cards
from sekisho.agents.runtime.policy_cache import PolicyCache
from sekisho.drivers.locker import (
    BoardOffline,
    BoardOnline,
    BoardRebooted,
    InputChanged,
    LineError,
    LockIO,
    RelayFault,
    RelayTimerExpired,
)
from sekisho.drivers.osdp import CardRead, KeypadInput, ReaderConfig, ReaderFlood, ReaderLink, ReaderStatus
from sekisho.drivers.smartcard import CardError, CardTimeout, Deadline, authenticate, hash_uid, mask_uid
from sekisho.drivers.smartcard.protocol import CardEvent, SmartCardBackend
from sekisho.protocol.policy import Card, SitePolicy

log = logging.getLogger(__name__)

EmitFn = Callable[[str, dict[str, Any]], int]
# A person waits at the door: a PC/SC card's whole check, and its answer to any one command.
DOOR_CARD_TIMEOUT_S = 3.0
DOOR_APDU_TIMEOUT_S = 1.5


def policy_provider(cache: PolicyCache) -> Callable[[], tuple[SitePolicy | None, PolicyState, datetime | None]]:
    """Read the agent's verified policy cache as the door agent core wants it (parsed once per bundle)."""
    parsed: dict[int, SitePolicy | None] = {}

    def provide() -> tuple[SitePolicy | None, PolicyState, datetime | None]:
        bundle = cache.current()
        if bundle is None:
            return None, "none", None
        version = bundle.bundle.version
        if version not in parsed:
            try:
                parsed.clear()
                parsed[version] = SitePolicy.model_validate(bundle.bundle.policy)
            except ValidationError:
                log.error("policy version %d holds no usable site policy: doors fail closed", version)
                parsed[version] = None
        policy = parsed[version]
        if policy is None:
            return None, "none", None
        state = cache.state()
        return policy, "expired" if state == "expired" else "valid", bundle.expires_at

    return provide


def card_evidence(data: bytes, site_key: bytes) -> CardEvidence:
    """Key and mask a card number a reader reported (no challenge-response: weak by nature)."""
    return CardEvidence(card_hash=hash_uid(data, site_key), card_masked=mask_uid(data), weak=True)


class PcscDoorReaders:
    """PC/SC readers serving doors: a card placed on a mapped reader is identified once and reported as a tap.

    A card whose policy entry carries an enrolled public key must prove it by challenge–response (the same
    driver path as the terminal login): proven, it is a strong credential; failing, it is refused as
    ``card_auth_failed`` (a cloned UID or a copied certificate). Cards enrolled without a key are
    recognised by their UID hash and flagged weak.

    Each mapped reader has a thread of its own, and the backend's monitor only hands cards to it: a card that
    stalls holds up its own reader and no other. Its check is over within ``card_timeout_s`` (each command
    within ``apdu_timeout_s``); a card that stops answering is a tap refused as ``card_timeout``. A card
    taken away before its check is over is no tap. The reader serves its next card once the silent one has
    left (pcscd cannot interrupt the transmit that waits for it; see drivers/smartcard/pcsc.py).
    """

    def __init__(
        self,
        backend: SmartCardBackend,
        readers: Mapping[str, str],
        *,
        site_key: bytes,
        cards: Callable[[], Sequence[Card]],
        card_timeout_s: float = DOOR_CARD_TIMEOUT_S,
        apdu_timeout_s: float = DOOR_APDU_TIMEOUT_S,
    ) -> None:
        self._backend = backend
        self._readers = dict(readers)  # PC/SC reader name -> door reader id
        self._site_key = site_key
        self._cards = cards
        self._card_timeout_s = card_timeout_s
        self._apdu_timeout_s = apdu_timeout_s
        self._on_tap: Callable[[str, CardEvidence], None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._queues: dict[str, queue.SimpleQueue[str | None]] = {}
        self._threads: list[threading.Thread] = []

    def start(self, on_tap: Callable[[str, CardEvidence], None]) -> None:
        """Start one thread per mapped reader, then watch the readers."""
        self._on_tap = on_tap
        for pcsc_reader, reader_id in self._readers.items():
            jobs: queue.SimpleQueue[str | None] = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._serve, args=(pcsc_reader, reader_id, jobs), name=f"door-reader {reader_id}", daemon=True
            )
            self._queues[pcsc_reader] = jobs
            self._threads.append(thread)
            thread.start()
        self._unsubscribe = self._backend.subscribe(self._on_cards)

    def stop(self) -> None:
        """Stop watching; a check under way still ends (within its time-out) and reports; idempotent."""
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        for jobs in self._queues.values():
            jobs.put(None)
        for thread in self._threads:
            thread.join(self._card_timeout_s + 1.0)
        self._queues.clear()
        self._threads.clear()
        self._on_tap = None

    def identify(self, pcsc_reader: str) -> CardEvidence | None:
        """Read and check the card in a reader within the time-outs; None when there is no card to speak of."""
        deadline = Deadline.within(self._card_timeout_s, self._apdu_timeout_s)
        try:
            conn = self._backend.connect(pcsc_reader, deadline=deadline)
        except CardTimeout as err:
            log.warning("door reader %s: %s", pcsc_reader, err)
            return CardEvidence(card_hash=hash_uid(b"", self._site_key), card_masked="****", weak=True, timed_out=True)
        except CardError as err:
            log.warning("door reader %s: no card session: %s", pcsc_reader, err)
            return None
        try:
            uid = b""
            with contextlib.suppress(CardError):
                uid = conn.get_uid()  # contact cards may have none: the certificate identifies them
            result = authenticate(conn, enrolled_cards(self._cards()), site_key=self._site_key, allow_uid_only=True)
        finally:
            conn.close()
        if result.reason in ("no_card", "reader_unavailable"):
            log.info("door reader %s: no tap (%s): %s", pcsc_reader, result.reason, result.detail)
            return None
        card_hash = hash_uid(uid, self._site_key)
        if result.card_id is not None and not uid:
            card_hash = next((c.uid_hash for c in self._cards() if c.id == result.card_id), card_hash)
        masked = mask_uid(uid) if uid else "****"
        if result.ok:
            return CardEvidence(card_hash=card_hash, card_masked=masked, weak=result.weak, card_id=result.card_id)
        if result.reason == "card_timeout":
            log.warning("door reader %s: %s", pcsc_reader, result.detail)
            return CardEvidence(
                card_hash=card_hash, card_masked=masked, weak=True, card_id=result.card_id, timed_out=True
            )
        if result.reason == "unknown_card":
            return CardEvidence(card_hash=card_hash, card_masked=masked, weak=True)
        # Matched an enrolled card but could not prove it (or answered garbage): refused, never granted.
        return CardEvidence(
            card_hash=card_hash, card_masked=masked, weak=True, card_id=result.card_id, auth_failed=True
        )

    def _on_cards(self, event: CardEvent) -> None:
        # On the backend's monitor thread: hand each card to its reader's thread and return at once.
        for card in event.added:
            jobs = self._queues.get(card.reader)
            if jobs is not None:
                jobs.put(card.reader)

    def _serve(self, pcsc_reader: str, reader_id: str, jobs: queue.SimpleQueue[str | None]) -> None:
        while jobs.get() is not None:
            try:
                evidence = self.identify(pcsc_reader)
                on_tap = self._on_tap
                if evidence is not None and on_tap is not None:
                    on_tap(reader_id, evidence)
            except Exception:  # the reader's thread must survive any card
                log.exception("door reader %s: identifying a card failed", reader_id)


@dataclass
class AttachedDoors:
    """The door agent core with the threads and subscriptions that feed it; stop() undoes start()."""

    core: DoorAgentCore
    readers: Sequence[ReaderLink]
    board: LockIO
    site_key: bytes
    pcsc: PcscDoorReaders | None = None
    tick_s: float = 0.05
    line_errors: int = 0
    _unsubscribers: list[Callable[[], None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _reader_links: dict[str, ReaderLink] = field(default_factory=dict)
    _inputs_reported: bool = False

    def start(self) -> None:
        """Start the board and the readers, then the core (which takes every relay) and the timer."""
        self.board.start()
        self._unsubscribers.append(self.board.subscribe(self._on_board))
        for link in self.readers:
            link.start()
            for reader_id in _reader_ids(link):
                self._reader_links[reader_id] = link
            self._unsubscribers.append(link.subscribe(self._on_reader))
        self.core.start()
        self._report_inputs()
        if self.pcsc is not None:
            self.pcsc.start(self._present)
        self._thread = threading.Thread(target=self._run_timer, name="door-timer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer, the subscriptions, the readers and the board; close the core's store."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.pcsc is not None:
            self.pcsc.stop()
        for unsubscribe in self._unsubscribers:
            with contextlib.suppress(Exception):
                unsubscribe()
        for link in self.readers:
            link.stop()
        self.board.stop()
        self.core.close()

    @property
    def running(self) -> bool:
        """Tell whether the door timer (relock, held-open, alarms) still runs (the service watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def inputs_reported(self) -> bool:
        """Tell whether the board's current inputs have reached the core since start."""
        return self._inputs_reported

    # --- inputs ----------------------------------------------------------------------------------

    def policy_changed(self) -> None:
        """Apply a new policy, then report the inputs as they are (doors it names may be new to the core)."""
        self.core.policy_changed()
        self._report_inputs()

    def _report_inputs(self) -> None:
        # A board reports changes only: the doors and key slots as they are now come from its status, so a
        # door left open or a key missing while the agent was down is judged at once.
        if not self.board.online:
            # The board's own offline event may have reached a core that had no doors yet; the
            # timer reports the inputs once the board answers (a board first heard after start sends no
            # "online" event).
            self.core.board_online(False)
            return
        try:
            status = self.board.status()
        except Exception as err:  # an unreachable board is reported by its own offline event
            log.warning("lock board status unavailable: %s", err)
            return
        for index, is_open in enumerate(status.doors_open):
            self.core.input_changed("door", index, is_open)
        for index, present in enumerate(status.keys_present):
            self.core.input_changed("key_slot", index, present)
        if status.tamper:
            self.core.input_changed("tamper", 0, True)
        self._inputs_reported = True

    def _tap(self, reader_id: str, data: bytes) -> None:
        self._present(reader_id, card_evidence(data, self.site_key))

    def _present(self, reader_id: str, evidence: CardEvidence) -> None:
        self.core.card_presented(reader_id, evidence)
        self._wake.set()

    def _on_reader(self, event: object) -> None:
        try:
            if isinstance(event, CardRead):
                self._tap(event.reader_id, event.data)
            elif isinstance(event, KeypadInput):
                self.core.keys_entered(event.reader_id, event.keys)
                self._wake.set()
            elif isinstance(event, ReaderStatus) and event.settled:
                # Unsettled: the link has not had its chance to bring the reader up yet; no verdict, no alarm.
                self.core.reader_status(event.reader_id, event.online, event.sc_failure)
            elif isinstance(event, ReaderFlood):
                self.core.reader_flood(event.reader_id, event.flooding, event.dropped, event.reads_per_s)
        except Exception:  # one bad event must not silence the reader thread
            log.exception("door reader event %s failed", type(event).__name__)

    def _on_board(self, event: object) -> None:
        try:
            if isinstance(event, InputChanged):
                self.core.input_changed(event.kind, event.index, event.active)
                self._wake.set()
            elif isinstance(event, BoardRebooted):
                self.core.board_rebooted()
            elif isinstance(event, BoardOnline):
                self.core.board_online(True)
                self._report_inputs()
            elif isinstance(event, BoardOffline):
                self.core.board_online(False)
            elif isinstance(event, RelayFault):
                self.core.relay_fault(event.index, event.commanded, event.sensed)
            elif isinstance(event, RelayTimerExpired):
                # The board's own safety timer ended a release; the core's window ends on its clock.
                log.debug("lock board released relay %d on its own timer", event.index)
            elif isinstance(event, LineError):
                self.line_errors += 1
                log.warning("lock board line error: %s", event.reason)
        except Exception:
            log.exception("lock board event %s failed", type(event).__name__)

    # --- outputs ---------------------------------------------------------------------------------

    def set_relay(self, index: int, on: bool, max_on_ms: int | None) -> None:
        """Command a lock relay (the core calls this; a failure is raised back to it as relay_fault)."""
        self.board.set_relay(index, on, max_on_ms=max_on_ms)

    def feedback(self, reader_id: str, ok: bool) -> None:
        """Green and one beep for a grant, red and three beeps for a refusal; best effort."""
        link = self._reader_links.get(reader_id)
        if link is None:
            return
        try:
            link.led(reader_id, "green" if ok else "red", on_ms=1500 if ok else 1000)
            link.buzz(reader_id, times=1 if ok else 3, on_ms=100 if ok else 150, off_ms=100)
        except Exception as err:
            log.warning("reader %s feedback failed: %s", reader_id, err)

    def _run_timer(self) -> None:
        while not self._stop.is_set():
            deadline = self.core.next_deadline()
            wait = self.tick_s
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if not self._inputs_reported and self.board.online:
                    self.core.board_online(True)
                    self._report_inputs()
                self.core.tick()
            except Exception:
                log.exception("door timer tick failed")


def _reader_ids(link: ReaderLink) -> list[str]:
    # Both OSDP links expose their ReaderConfigs; a link type without them gets no feedback routing.
    configs: Sequence[ReaderConfig] = getattr(link, "readers", ())
    return [config.reader_id for config in configs]


def attach_doors(
    *,
    emit: EmitFn,
    policy: PolicyCache,
    state_dir: Path,
    readers: Sequence[ReaderLink],
    board: LockIO,
    site_key: bytes,
    pcsc: PcscDoorReaders | None = None,
    commands: Any = None,
    clock: Clock | None = None,
    tick_s: float = 0.05,
) -> AttachedDoors:
    """Build the door agent core on an agent's emit, policy cache and commands; the caller starts it."""
    holder: dict[str, AttachedDoors] = {}
    core = DoorAgentCore(
        policy=policy_provider(policy),
        emit=emit,
        set_relay=lambda index, on, max_on_ms: holder["doors"].set_relay(index, on, max_on_ms),
        feedback=lambda reader_id, ok: holder["doors"].feedback(reader_id, ok),
        state_dir=state_dir,
        clock=clock,
    )
    attached = AttachedDoors(core, readers, board, site_key, pcsc, tick_s)
    holder["doors"] = attached
    policy.subscribe(lambda change: attached.policy_changed())
    if commands is not None:
        core.register_commands(commands)
    return attached
