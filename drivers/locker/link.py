"""The serial locker board link: commands with ACK and retries, unsolicited reports, link supervision.

Threads: a reader thread owns the line's input. It decodes frames in line order, keeps the model of the
board (relays as commanded and sensed, inputs, boot counter, report sequence) and resolves waiting commands;
everything observers should hear goes, in that same order, onto a queue. A worker thread delivers the queue
to observers, sends heartbeats, declares the board offline after ``offline_after_s`` of silence, re-reads the
board after a reboot, a gap in its report sequence or a return from silence, and checks relay feedback once
a command's settle time has passed. Observers therefore run on the worker thread and may call ``set_relay``.

Callers on any thread may call ``set_relay`` and ``status`` concurrently: each command has its own sequence
number, and a retry resends the same frame (same sequence), which the board answers again without acting
twice. See docs/locker-board-protocol.md for the wire format and timing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
from sekisho.drivers.locker.line import Line, LineTarget
from sekisho.drivers.locker.protocol import (
    BAUD_RATE,
    PROTOCOL_VERSION,
    BoardInfo,
    Command,
    Frame,
    FrameDecoder,
    InputCode,
    Noise,
    Reply,
    Report,
    WireStatus,
    encode_frame,
    encode_hello,
    encode_set_relay,
    parse_index,
    parse_info,
    parse_input,
    parse_nak,
    parse_status,
)
from sekisho.drivers.observers import ObserverList

_LOG = logging.getLogger(__name__)

_READ_WAIT_S = 0.05
_REOPEN_EVERY_S = 1.0
_INTERNAL_TIMEOUT_S = 0.3  # status queries the worker makes for itself


@dataclass(eq=False)
class _Pending:
    """A command waiting for its answer."""

    expect: int
    on_reply: Callable[[], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    reply: Frame | None = None


@dataclass
class _Model:
    """The host's picture of the board, written by the reader thread in line order."""

    commanded: list[bool]
    sensed: list[bool]
    doors: list[bool]
    keys: list[bool]
    tamper: bool = False
    known: bool = False  # a STATUS has been read since start
    boot_count: int | None = None
    event_seq: int | None = None
    settle: dict[int, float] = field(default_factory=dict)  # relay -> when its feedback must agree
    faulted: set[int] = field(default_factory=set)


def _resize(values: list[bool], size: int) -> list[bool]:
    return (values + [False] * size)[:size]


def _input_changes(kind: InputKind, old: list[bool], new: tuple[bool, ...]) -> list[BoardEvent]:
    return [
        InputChanged(kind, index, active)
        for index, active in enumerate(new)
        if index >= len(old) or old[index] != active
    ]


class LockerBoardLink:
    """A locker board (lock relays, door sensors, key slots, tamper) on a serial line, a pty or an open descriptor."""

    def __init__(
        self,
        device: LineTarget,
        *,
        relays: int,
        doors: int,
        key_slots: int,
        baud_rate: int = BAUD_RATE,
        retries: int = 2,
        heartbeat_s: float = 0.25,
        offline_after_s: float = 1.0,
        settle_s: float = 0.1,
    ) -> None:
        for name, value in (("relays", relays), ("doors", doors), ("key_slots", key_slots)):
            if not 0 <= value <= 255:
                raise ValueError(f"{name} must be in 0..255")
        if retries < 0 or heartbeat_s <= 0 or offline_after_s <= heartbeat_s or settle_s < 0:
            raise ValueError("need retries >= 0, heartbeat_s > 0, offline_after_s > heartbeat_s, settle_s >= 0")
        self._target = device
        self._baud_rate = baud_rate
        self._configured = (relays, doors, key_slots)
        self._retries = retries
        self._heartbeat_s = heartbeat_s
        self._offline_after_s = offline_after_s
        self._settle_s = settle_s
        self._observers: ObserverList[BoardEvent] = ObserverList("lock board")
        self._events: queue.SimpleQueue[BoardEvent | None] = queue.SimpleQueue()
        self._lifecycle = threading.Lock()
        self._state = threading.Lock()
        self._model = self._fresh_model()
        self._online = False
        self._reported_online: bool | None = None
        self._resync_needed = False
        self._reboot_pending: int | None = None
        self._last_rx = 0.0
        self._last_probe = 0.0
        self._started_at = 0.0
        self._line_errors = 0
        self._info: BoardInfo | None = None
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._next_seq = 1
        self._write_lock = threading.Lock()
        self._line: Line | None = None
        self._line_failed = False
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._worker: threading.Thread | None = None

    def _fresh_model(self) -> _Model:
        relays, doors, keys = self._configured
        return _Model([False] * relays, [False] * relays, [False] * doors, [False] * keys)

    # ---- public interface ----------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Return whether the board answers."""
        return self._online

    @property
    def line_errors(self) -> int:
        """Return how many LineError reports this link has made since it was built."""
        return self._line_errors

    @property
    def info(self) -> BoardInfo | None:
        """Return what the board said about itself at the last HELLO (None before it answered one)."""
        return self._info

    def start(self) -> None:
        """Open the line, start the threads and greet the board; a silent board is reported offline later.

        Raises BoardUnavailable if the device cannot be opened and BoardRefused if the board does not speak
        this protocol version. Idempotent.
        """
        with self._lifecycle:
            if self._reader is not None:
                return
            self._line = Line(self._target, baud_rate=self._baud_rate)
            self._line_failed = False
            self._stop.clear()
            self._model = self._fresh_model()
            self._online = False
            self._reported_online = None
            self._resync_needed = False
            self._reboot_pending = None
            self._started_at = self._last_probe = time.monotonic()
            self._last_rx = 0.0
            self._reader = threading.Thread(target=self._read_loop, name="locker-board-rx", daemon=True)
            self._worker = threading.Thread(target=self._work_loop, name="locker-board", daemon=True)
            self._reader.start()
        try:
            self._greet()
        except BoardRefused:
            self.stop()
            raise
        # A board silent at start is reported offline_after_s from now: time for the owner to subscribe.
        self._started_at = self._last_probe = time.monotonic()
        self._worker.start()

    def stop(self) -> None:
        """Stop the threads (joined) and close the line; commands still waiting fail. Idempotent."""
        with self._lifecycle:
            reader, worker = self._reader, self._worker
            if reader is None:
                return
            self._stop.set()
            self._events.put(None)
            with self._pending_lock:
                waiting = list(self._pending.values())
            for pending in waiting:
                pending.done.set()
            for thread in (reader, worker):
                if thread is not None and thread.ident is not None and thread is not threading.current_thread():
                    thread.join(timeout=5)
            if self._line is not None:
                self._line.close()
            self._line = None
            self._reader = self._worker = None
            self._online = False

    def subscribe(self, observer: BoardObserver) -> Callable[[], None]:
        """Deliver board events to ``observer`` (on the link's worker thread); return an unsubscriber.

        Only changes are delivered: the state at the time of subscribing is ``status()``.
        """
        return self._observers.add(observer)

    def set_relay(self, index: int, on: bool, max_on_ms: int | None = None, timeout_s: float = 0.5) -> None:
        """Switch a lock relay and wait for the board's ACK; with ``max_on_ms`` the board releases it by itself.

        Raises ValueError for impossible arguments, BoardRefused (a BoardError) on NAK, BoardTimeout when no
        answer came within ``timeout_s`` (retries included) and BoardUnavailable when the line is broken.
        """
        payload = encode_set_relay(index, on, max_on_ms)

        def acknowledged() -> None:
            # Runs on the reader thread as the ACK is decoded, before any later frame: feedback reports that
            # follow the ACK are judged against this command, never against the one before it.
            with self._state:
                model = self._model
                if index < len(model.commanded):
                    model.commanded[index] = on
                    model.settle[index] = time.monotonic() + self._settle_s

        self._request(Command.SET_RELAY, payload, Reply.ACK, timeout_s, on_reply=acknowledged)

    def status(self, timeout_s: float = 0.5) -> BoardStatus:
        """Ask the board for its status (relays commanded and sensed, inputs, boot counter)."""
        reply = self._request(Command.STATUS, b"", Reply.STATUS, timeout_s)
        wire = parse_status(reply.payload)
        return BoardStatus(
            relays_commanded=wire.relays_commanded,
            relays_sensed=wire.relays_sensed,
            doors_open=wire.doors_open,
            keys_present=wire.keys_present,
            tamper=wire.tamper,
            boot_count=wire.boot_count,
        )

    def ping(self, timeout_s: float = 0.5) -> None:
        """Check that the board answers; raise BoardTimeout if it does not."""
        self._request(Command.PING, b"", Reply.ACK, timeout_s)

    def __enter__(self) -> LockerBoardLink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- commands ------------------------------------------------------------------------------

    def _greet(self) -> None:
        try:
            reply = self._request(Command.HELLO, encode_hello(), Reply.INFO, 0.5)
            self._request(Command.STATUS, b"", Reply.STATUS, 0.5)
        except BoardRefused:
            raise
        except BoardError as err:
            _LOG.warning("lock board on %s does not answer (%s): reported offline until it does", self._name, err)
            return
        info = parse_info(reply.payload)
        if info.version != PROTOCOL_VERSION:
            _LOG.warning("lock board speaks protocol version %d, this host %d", info.version, PROTOCOL_VERSION)
        with self._state:
            self._online = True
            self._reported_online = True
            self._resync_needed = False
        _LOG.info("lock board on %s online: %s, boot %d", self._name, info.firmware or "firmware", info.boot_count)

    @property
    def _name(self) -> str:
        line = self._line
        return line.name if line is not None else str(self._target)

    def _allocate(self, pending: _Pending | None) -> int:
        with self._pending_lock:
            for _ in range(255):
                seq = self._next_seq
                self._next_seq = seq % 255 + 1  # 1..255: 0 is never a host sequence number
                if seq not in self._pending:
                    if pending is not None:
                        self._pending[seq] = pending
                    return seq
        raise BoardError("255 commands are already waiting for the board", reason="busy")

    def _request(
        self,
        command: Command,
        payload: bytes,
        expect: Reply,
        timeout_s: float,
        *,
        on_reply: Callable[[], None] | None = None,
    ) -> Frame:
        if self._reader is None or self._stop.is_set():
            raise BoardError("the lock board link is not started", reason="not_started")
        attempts = 1 + self._retries
        per_attempt = max(timeout_s, 0.001) / attempts
        pending = _Pending(expect=expect, on_reply=on_reply)
        seq = self._allocate(pending)
        frame = encode_frame(seq, command, payload)
        write_error: BoardUnavailable | None = None
        try:
            for _ in range(attempts):
                try:
                    self._write(frame)
                    write_error = None
                except BoardUnavailable as err:
                    write_error = err
                if pending.done.wait(per_attempt):
                    break
        finally:
            with self._pending_lock:
                self._pending.pop(seq, None)
        reply = pending.reply
        if reply is None:
            if self._stop.is_set():
                raise BoardError(f"{command.name}: the link was stopped", reason="stopped")
            if write_error is not None:
                raise write_error
            raise BoardTimeout(f"{command.name}: no answer from the board after {attempts} attempts", attempts=attempts)
        if reply.cmd == Reply.NAK:
            code, reason = parse_nak(reply.payload)
            raise BoardRefused(f"{command.name}: the board refused it ({reason})", reason=reason, nak_code=code)
        return reply

    def _write(self, frame: bytes) -> None:
        line = self._line
        if line is None or self._line_failed:
            raise BoardUnavailable(f"line {self._name} is not usable", reason="line_down")
        with self._write_lock:
            line.write(frame)

    def _probe(self) -> None:
        """Send a STATUS query nobody waits for: the reader takes in the answer like any other."""
        try:
            self._write(encode_frame(self._allocate(None), Command.STATUS))
        except BoardError as err:
            _LOG.debug("heartbeat not sent: %s", err)

    # ---- reader thread -------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        while not self._stop.is_set():
            line = self._line
            if line is None:
                return
            try:
                data = line.read(_READ_WAIT_S)
            except BoardUnavailable as err:
                self._line_down(line, err)
                decoder = FrameDecoder()
                continue
            if self._line_failed:
                self._line_failed = False
                _LOG.info("lock board line %s works again", line.name)
            if not data:
                continue
            for item in decoder.feed(data):
                if isinstance(item, Noise):
                    self._line_error(f"{item.reason} ({item.dropped} bytes)")
                    continue
                try:
                    self._take_frame(item)
                except MalformedFrame as err:
                    self._line_error(f"frame 0x{item.cmd:02X}: {err}")
                except Exception:  # a bug here must not silence the board: log it, keep reading
                    _LOG.exception("lock board frame 0x%02X not handled", item.cmd)
                    self._line_error(f"frame 0x{item.cmd:02X} not handled")

    def _line_down(self, line: Line, err: BoardUnavailable) -> None:
        if not self._line_failed:
            self._line_failed = True
            _LOG.warning("lock board line %s failed: %s", line.name, err)
        if not line.reopenable:
            self._stop.wait(0.2)
            return
        self._stop.wait(_REOPEN_EVERY_S)
        if self._stop.is_set():
            return
        try:
            line.reopen()
        except BoardUnavailable as reopen_err:
            _LOG.debug("reopening %s failed: %s", line.name, reopen_err)

    def _line_error(self, reason: str) -> None:
        self._line_errors += 1
        _LOG.debug("lock board line error: %s", reason)
        self._events.put(LineError(reason))

    def _take_frame(self, frame: Frame) -> None:
        with self._state:
            self._last_rx = time.monotonic()
            if not self._online:
                self._resync_needed = True
        if frame.cmd in (Reply.ACK, Reply.NAK, Reply.INFO, Reply.STATUS):
            if frame.cmd == Reply.INFO:
                self._take_info(parse_info(frame.payload))
            elif frame.cmd == Reply.STATUS:
                self._take_status(parse_status(frame.payload))
            self._resolve(frame)
        elif frame.cmd == Report.INPUT_CHANGED:
            report = parse_input(frame.payload)
            self._take_report_seq(frame.seq)
            self._take_input(report.code, report.index, report.active)
        elif frame.cmd == Report.RELAY_EXPIRED:
            index = parse_index(frame.payload)
            self._take_report_seq(frame.seq)
            with self._state:
                model = self._model
                if index < len(model.commanded):
                    model.commanded[index] = False
                    model.settle[index] = time.monotonic() + self._settle_s
            self._events.put(RelayTimerExpired(index))
        elif frame.cmd == Report.BOOT:
            info = parse_info(frame.payload)
            with self._state:
                model = self._model
                self._mark_reboot(info.boot_count, always=True)
                model.event_seq = frame.seq
                # The board starts with every relay off; what the host asked for before is gone.
                deadline = time.monotonic() + self._settle_s
                for index in range(len(model.commanded)):
                    model.commanded[index] = False
                    model.settle[index] = deadline
        else:
            self._line_error(f"unknown frame 0x{frame.cmd:02X}")
            return
        self._events.put(None)  # wake the worker: something may be due

    def _resolve(self, frame: Frame) -> None:
        with self._pending_lock:
            pending = self._pending.get(frame.seq)
        if pending is None or pending.done.is_set():
            return  # an answer to a heartbeat, or a repeated answer to a retried command
        if frame.cmd not in (pending.expect, Reply.NAK):
            self._line_error(f"reply 0x{frame.cmd:02X} to seq {frame.seq} where 0x{pending.expect:02X} was expected")
            return
        if frame.cmd == pending.expect and pending.on_reply is not None:
            pending.on_reply()
        pending.reply = frame
        pending.done.set()

    def _mark_reboot(self, boot_count: int, *, always: bool) -> None:
        """Note a reboot (caller holds ``_state``); ``always``: a BOOT frame, not only a changed counter."""
        model = self._model
        known = model.boot_count is not None or model.known
        if known and (always or boot_count != model.boot_count):
            self._reboot_pending = boot_count
            self._resync_needed = True
        model.boot_count = boot_count

    def _take_info(self, info: BoardInfo) -> None:
        sizes = (info.relays, info.doors, info.key_slots)
        if self._info is None and sizes != self._configured:
            self._line_error(f"board reports relays/doors/key slots {sizes}, configured {self._configured}")
            _LOG.error("lock board has relays/doors/key slots %s, configuration says %s", sizes, self._configured)
        self._info = info
        with self._state:
            self._mark_reboot(info.boot_count, always=False)

    def _take_report_seq(self, seq: int) -> None:
        lost = 0
        with self._state:
            model = self._model
            if model.event_seq is not None:
                lost = (seq - model.event_seq - 1) & 0xFF
            model.event_seq = seq
            if lost:
                self._resync_needed = True
        if lost > 0x7F:
            # Behind what we have seen: a repeated or reordered report. The board's status settles it.
            self._line_error(f"board report {seq} out of order: re-reading the board")
        elif lost:
            self._line_error(f"lost {lost} board report(s): re-reading the board")

    def _take_input(self, code: InputCode, index: int, active: bool) -> None:
        event: BoardEvent | None = None
        with self._state:
            model = self._model
            now = time.monotonic()
            if code == InputCode.RELAY_FEEDBACK:
                if index < len(model.sensed):
                    model.sensed[index] = active
                    # Judge at once unless a command is still settling (then its deadline judges).
                    model.settle.setdefault(index, now)
            elif code == InputCode.TAMPER:
                model.tamper = active
                event = InputChanged("tamper", 0, active)
            else:
                values = model.doors if code == InputCode.DOOR else model.keys
                if index < len(values):
                    values[index] = active
                event = InputChanged("door" if code == InputCode.DOOR else "key_slot", index, active)
        if event is not None:
            self._events.put(event)

    def _take_status(self, wire: WireStatus) -> None:
        changes: list[BoardEvent] = []
        lost = False
        with self._state:
            model = self._model
            first = not model.known
            if first:
                # The first snapshot since start is the baseline: nothing "changed" for observers.
                model.doors, model.keys = list(wire.doors_open), list(wire.keys_present)
                model.tamper = wire.tamper
            else:
                lost = model.event_seq is not None and wire.event_seq != model.event_seq
                changes += _input_changes("door", model.doors, wire.doors_open)
                changes += _input_changes("key_slot", model.keys, wire.keys_present)
                if model.tamper != wire.tamper:
                    changes.append(InputChanged("tamper", 0, wire.tamper))
                model.doors, model.keys, model.tamper = list(wire.doors_open), list(wire.keys_present), wire.tamper
            self._mark_reboot(wire.boot_count, always=False)
            model.known = True
            model.event_seq = wire.event_seq
            now = time.monotonic()
            relays = len(wire.relays_commanded)
            model.commanded = _resize(model.commanded, relays)
            model.sensed = _resize(model.sensed, relays)
            for index, (commanded, sensed) in enumerate(zip(wire.relays_commanded, wire.relays_sensed, strict=True)):
                if first or model.commanded[index] != commanded or model.sensed[index] != sensed:
                    # Something moved (or this is the baseline): judge this relay on the next check.
                    model.settle.setdefault(index, now)
                model.commanded[index], model.sensed[index] = commanded, sensed
        if lost:
            self._line_error("lost board report(s): inputs taken from the board's status")
        for change in changes:
            self._events.put(change)

    # ---- worker thread -------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            self._observers.deliver_queued(self._events, self._next_wait())
            if self._stop.is_set():
                return
            try:
                self._supervise()
                self._check_relays()
            except Exception:  # the worker must outlive any surprise: it is the board's supervisor
                _LOG.exception("lock board supervision failed")

    def _next_wait(self) -> float:
        now = time.monotonic()
        with self._state:
            wake = [self._last_probe + self._heartbeat_s, *self._model.settle.values()]
            if self._online:
                wake.append(self._last_rx + self._offline_after_s)
            elif self._reported_online is None:
                wake.append(self._started_at + self._offline_after_s)
        return min(max(min(wake) - now, 0.005), self._heartbeat_s)

    def _emit(self, event: BoardEvent) -> None:
        self._events.put(event)

    def _supervise(self) -> None:
        now = time.monotonic()
        with self._state:
            resync = self._resync_needed or self._reboot_pending is not None
            silent_for = now - self._last_rx
            online = self._online
        if resync:
            self._resync()
            return
        if online and silent_for > self._offline_after_s:
            with self._state:
                self._online = False
            self._report_online(False)
        elif not online and self._reported_online is None and now - self._started_at > self._offline_after_s:
            self._report_online(False)
        if silent_for >= self._heartbeat_s and now - self._last_probe >= self._heartbeat_s:
            self._last_probe = now
            self._probe()

    def _resync(self) -> None:
        """Re-read the board after a reboot, lost reports or silence; then report what happened."""
        try:
            self._request(Command.STATUS, b"", Reply.STATUS, _INTERNAL_TIMEOUT_S)
        except BoardError as err:
            _LOG.debug("re-reading the lock board failed: %s", err)
            with self._state:
                # The next frame from the board asks again (a pending reboot keeps asking by itself).
                self._resync_needed = False
                self._last_probe = time.monotonic()
            return
        with self._state:
            reboot, self._reboot_pending = self._reboot_pending, None
            self._resync_needed = False
            self._online = True
        # Queued after the input changes the status produced, so observers hear them first.
        if reboot is not None:
            _LOG.warning("lock board rebooted (boot %d): every relay is off until set again", reboot)
            self._emit(BoardRebooted(reboot))
        self._report_online(True)

    def _report_online(self, online: bool) -> None:
        if self._reported_online == online or (online and self._reported_online is None):
            self._reported_online = online
            return
        self._reported_online = online
        if online:
            _LOG.info("lock board on %s answers again", self._name)
            self._emit(BoardOnline())
        else:
            _LOG.warning("lock board on %s is not answering", self._name)
            self._emit(BoardOffline())

    def _due_relays(self, now: float) -> list[int]:
        """Settle deadlines that passed: clear recovered faults; return relays that look stuck."""
        suspects: list[int] = []
        with self._state:
            model = self._model
            for index, deadline in list(model.settle.items()):
                if deadline > now:
                    continue
                del model.settle[index]
                if index >= len(model.commanded):
                    continue
                commanded, sensed = model.commanded[index], model.sensed[index]
                if commanded != sensed and index not in model.faulted:
                    suspects.append(index)
                elif commanded == sensed and index in model.faulted:
                    model.faulted.discard(index)
                    self._emit(RelayFault(index, commanded, sensed))
        return suspects

    def _check_relays(self) -> None:
        suspects = self._due_relays(time.monotonic())
        if not suspects:
            return
        # A lost feedback report must not look like a stuck relay: confirm with the board's own status.
        try:
            self._request(Command.STATUS, b"", Reply.STATUS, _INTERNAL_TIMEOUT_S)
        except BoardError as err:
            _LOG.debug("relay check postponed: %s", err)
            with self._state:
                retry_at = time.monotonic() + self._heartbeat_s
                for index in suspects:
                    self._model.settle.setdefault(index, retry_at)
            return
        with self._state:
            model = self._model
            for index in suspects:
                if index in model.settle or index in model.faulted or index >= len(model.commanded):
                    continue  # commanded again meanwhile: its own deadline will judge it
                commanded, sensed = model.commanded[index], model.sensed[index]
                if commanded != sensed:
                    model.faulted.add(index)
                    _LOG.error("lock relay %d: commanded %s, feedback says %s", index, commanded, sensed)
                    self._emit(RelayFault(index, commanded, sensed))
