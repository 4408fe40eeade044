"""The OSDP reader link: sekisho as control panel (CP) to OSDP card readers on one line, through libosdp.

Security rules, all enforced here and not only by libosdp (fail closed):

- A reader configured with a key (``scbk``) gets libosdp's EnforceSecure flag: a reader that cannot or will
  not open a secure channel with that key never comes online.
- Card reads and keypad input from a reader that has a key, or is in install mode, reach observers only
  while libosdp reports the secure channel active *and* the key in use is a real one (never SCBK-D). The
  link checks this itself for every event, so a libosdp fallback (install mode may go online in plaintext)
  cannot leak a forged card into the door logic.
- Only install-mode readers may use SCBK-D. A reader without a key in install mode is driven with SCBK-D
  until ``set_key`` gives it a real key; once a reader is secure with a real key, EnforceSecure is switched
  on for it, so it cannot fall back to SCBK-D or plaintext for the rest of the link's life.
- Card data, keypad input and keys are never logged (reader ids and lengths only). libosdp's own C logger
  writes to stderr; it is kept at warning level, where it prints states and command names, not payloads.

Threads: libosdp's refresh runs in ControlPanel's thread (named ``cp``), here woken by line data instead of
libosdp's fixed 20 ms sleep; observers are called from a separate dispatcher thread, so an observer may call
``led``/``buzz``/``set_key`` and a slow observer does not stall the line.

Link state: libosdp marks a silent reader offline only after about 8 s (8 retries 1 s apart) and then waits
300 s before it tries again. The link therefore (1) reports a reader offline as soon as it has sent no whole,
correctly checked reply for ``silence_timeout`` (``frames.py``: noise and stray bytes are no sign of life,
so a dead reader on a noisy line goes offline as fast as on a silent one), and (2) restarts offline readers
itself (disable/enable) with a backoff from ``reconnect_initial`` to ``reconnect_max`` seconds.

Why a reader is kept out: libosdp's Python API reports only the online and Secure Channel bitmasks, the PD's
capabilities and ID, and (with ``EnableNotification``) an event when a PD's link or Secure Channel state
changes; the reason a handshake failed goes to its C log only. The link follows the handshake on the line
itself (the CP's osdp_CHLNG and osdp_SCRYPT, the reader's osdp_PDCAP, osdp_CCRYPT, osdp_RMAC_I or osdp_NAK)
and judges each attempt when libosdp reports the PD offline: a cryptogram the CP did not accept is
``key_mismatch``; a reader whose capabilities offer no Secure Channel (or that refuses a secure block) is
``plaintext_reader``; a handshake broken off otherwise is ``sc_failed``; a reader that did not answer at all
has no such reason (plain offline). A reader's status is ``settled=False`` until its first attempt has been
judged, it came online, or ``silence_timeout`` has passed since the link started: before that, offline
means "not known yet".

Floods: each reader's card reads go through a ``ReadLimiter`` (``flood.py``) in the refresh thread, before
anything is queued for the observers; a flood is reported once as ``ReaderFlood`` and again when it ends.
While a reader floods, LED and buzzer commands that repeat the last one sent to it within a second are not
sent (a colour or pattern change always is): libosdp resets a reader's 50 ms poll timer on every reply, so a
stream of feedback commands would postpone the polls that bring its card reads in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from osdp import (
    CardFormat,
    Channel,
    Command,
    CommandLEDColor,
    CompletionStatus,
    ControlPanel,
    Event,
    EventNotification,
    LibFlag,
    LogLevel,
    PDInfo,
)

from sekisho.drivers.observers import ObserverList
from sekisho.drivers.osdp.channel import DEFAULT_BAUD_RATE, FdChannel, ForeignChannel, SerialChannel, TrackedChannel
from sekisho.drivers.osdp.errors import KeySetError, LinkUnavailable, OsdpError, UnknownReader
from sekisho.drivers.osdp.flood import DEFAULT_CALM_S, DEFAULT_READ_BURST, DEFAULT_READS_PER_S, ReadLimiter
from sekisho.drivers.osdp.frames import (
    CMD_CHLNG,
    CMD_ID,
    CMD_POLL,
    CMD_SCRYPT,
    NAK_NO_SECURITY,
    REPLY_CCRYPT,
    REPLY_NAK,
    REPLY_PDCAP,
    Frame,
    FrameScanner,
    sc_capable,
)
from sekisho.drivers.osdp.protocol import (
    SCBK_DEFAULT,
    CardRead,
    KeypadInput,
    LedColour,
    ReaderConfig,
    ReaderEvent,
    ReaderFlood,
    ReaderObserver,
    ReaderStatus,
    ScFailure,
    buzz_pattern,
    led_pattern,
    validate_readers,
    validate_scbk,
    validate_text,
)

_LOG = logging.getLogger(__name__)

# libosdp's status bitmasks come back as 32-bit integers from its Python binding.
MAX_READERS_PER_LINE = 32
# Warning: libosdp prints states and command names there; payloads only at debug level.
_LIBOSDP_LOG_LEVEL = LogLevel.Warning

_CARD_FORMATS: dict[int, str] = {
    CardFormat.Unspecified: "raw",
    CardFormat.Wiegand: "wiegand",
    CardFormat.ASCII: "ascii",
}
_LED_CODES: dict[str, int] = {
    "red": CommandLEDColor.Red,
    "green": CommandLEDColor.Green,
    "amber": CommandLEDColor.Amber,
    "blue": CommandLEDColor.Blue,
    "off": CommandLEDColor.Black,
}
# OSDP keypad data: ASCII digits, 0x7F for '*' and 0x0D for '#'; some readers send '*' and '#' as ASCII.
_KEYPAD_BYTES: dict[int, str] = {
    **{ord(digit): digit for digit in "0123456789"},
    0x7F: "*",
    0x0D: "#",
    ord("*"): "*",
    ord("#"): "#",
}
_LED_TEMPORARY_SET = 2  # OSDP temporary LED control code: set the temporary state and start its timer
_BUZZER_DEFAULT_TONE = 2
_TEXT_PERMANENT = 1
_TEXT_TEMPORARY = 3
_KEYSET_TYPE_SCBK = 1
# Secure channel block types of the handshake: the CP's challenge and its cryptogram.
_SCS_CHLNG, _SCS_SCRYPT = 0x11, 0x13
# libosdp polls an online reader once more than OSDP_PD_POLL_TIMEOUT_MS (compile time: 50 ms in the stock
# wheel, 10 ms as sekisho's install builds it, docs/doors.md) have passed since its last reply, counted in whole
# milliseconds. The link learns the period from the line, as the shortest gap seen between a reply and the
# next poll, and wakes just as the next poll falls due instead of up to a poll_interval later.
_POLL_PERIOD_STOCK_S = 0.0513
_POLL_PERIOD_MIN_S = 0.004  # below any build's period: a shorter gap is not a poll timer, so not learned
_POLL_PERIOD_SLOW_S = 0.030  # a period above this makes the card path slow: said once in the log
# The first polls are watched with 1 ms wake-ups: waking every poll_interval would see each poll only at the
# first wake-up after it fell due, always the same phase after a reply, and learn that instead of the period.
_POLL_LEARN_SAMPLES = 16
_POLL_DUE_RETRY_S = 0.001
_POLL_DUE_WINDOW_S = 0.004
# While a reader floods, the same LED or buzzer command is sent to it at most this often.
_FLOOD_FEEDBACK_S = 1.0

# A libosdp Channel is typed Any here (libosdp has no type hints), so it needs no place of its own.
ChannelTarget = str | os.PathLike[str] | int


@dataclass
class _Attempt:
    """One connection attempt of libosdp to a reader (ID, CAP, then the Secure Channel handshake), seen on the line."""

    replies: int = 0
    sc_capable: bool | None = None  # from the reader's osdp_PDCAP
    stage: str = ""  # "challenged" once the CP sent osdp_CHLNG, "verified" once it sent osdp_SCRYPT
    answer: int | None = None  # the reader's first reply code to the command of the current stage
    nak_code: int | None = None

    def verdict(self) -> ScFailure | None:
        """Say why this failed attempt kept the reader out, or None if it simply did not answer."""
        if self.replies == 0:
            return None
        if self.sc_capable is False:
            return "plaintext_reader"
        if not self.stage or self.answer is None:
            return None  # failed before the handshake, or stopped answering in the middle of it
        if self.stage == "challenged":
            if self.answer == REPLY_CCRYPT:
                return "key_mismatch"  # the reader's cryptogram, made with its key, did not match ours
            if self.answer == REPLY_NAK and self.nak_code == NAK_NO_SECURITY:
                return "plaintext_reader"
        return "sc_failed"


@dataclass
class _ReaderState:
    """What the link knows about one reader; written by the refresh thread, read by callers."""

    config: ReaderConfig
    index: int
    key: bytes | None  # the key libosdp uses for this reader now (SCBK-D for an unkeyed install-mode reader)
    enforced: bool  # EnforceSecure set in libosdp for this reader
    backoff: float
    limiter: ReadLimiter[CardRead]
    lib_online: bool = False
    online: bool = False
    secure: bool = False
    settled: bool = False
    sc_failure: ScFailure | None = None  # as last reported
    verdict: ScFailure | None = None  # on the last judged attempt
    last_reply: float | None = None  # monotonic time of its last whole, correctly checked reply
    attempt: _Attempt | None = None
    judged: bool = False  # an attempt has been judged since the link started
    next_restart: float | None = None
    restarting: bool = False
    restarts: int = 0
    drop_logged: bool = False
    last_feedback: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)
    feedback_coalesced: int = 0

    @property
    def key_is_real(self) -> bool:
        return self.key is not None and self.key != SCBK_DEFAULT

    def status(self) -> ReaderStatus:
        return ReaderStatus(
            self.config.reader_id,
            online=self.online,
            secure=self.secure,
            settled=self.settled,
            sc_failure=self.sc_failure,
        )


@dataclass
class _KeysetWait:
    """A set_key call waiting for libosdp to report its KEYSET command complete."""

    key: bytes = field(repr=False)
    done: threading.Event = field(default_factory=threading.Event)
    status: int | None = None


class _WakingControlPanel(ControlPanel):  # type: ignore[misc]  # libosdp ships no type information
    """libosdp's ControlPanel whose refresh thread runs the link's loop instead of a fixed 20 ms sleep."""

    def __init__(self, pd_info_list: list[Any], *, loop: Callable[[threading.Event, Any, Any], None], **kw: Any):
        super().__init__(pd_info_list, **kw)
        self._link_loop = loop

    # ControlPanel.start() runs ``self.refresh(event, lock, ctx)`` in its thread; overriding it is the
    # one extension point that keeps libosdp's own lock, start and stop.
    def refresh(self, event: threading.Event, lock: Any, ctx: Any) -> None:
        """Run the link's refresh loop until ``event`` is set."""
        self._link_loop(event, lock, ctx)


class OsdpReaderLink:
    """OSDP card readers on one line (serial device, fd or libosdp Channel), with sekisho as control panel."""

    def __init__(
        self,
        channel_or_device: ChannelTarget | Any,
        readers: Sequence[ReaderConfig],
        *,
        baud_rate: int = DEFAULT_BAUD_RATE,
        poll_interval: float = 0.005,
        silence_timeout: float | None = 1.5,
        reconnect_initial: float = 1.0,
        reconnect_max: float = 10.0,
        card_reads_per_s: float = DEFAULT_READS_PER_S,
        card_read_burst: int = DEFAULT_READ_BURST,
        flood_calm_s: float = DEFAULT_CALM_S,
    ) -> None:
        validate_readers(readers, max_readers=MAX_READERS_PER_LINE)
        if poll_interval <= 0 or poll_interval > 0.02:
            # libosdp needs a refresh at least every 50 ms; more than 20 ms would be slower than its own loop.
            raise ValueError("poll_interval must be in (0, 0.02] seconds")
        self._target = channel_or_device
        self._baud_rate = baud_rate
        self._poll_interval = poll_interval
        self._silence_timeout = silence_timeout
        # How long the first verdict on a reader may wait: as long as a running reader may stay silent.
        self._start_grace = silence_timeout if silence_timeout is not None else 8.0
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._states: dict[str, _ReaderState] = {}
        self._by_index: list[_ReaderState] = []
        self._by_address: dict[int, _ReaderState] = {}
        for index, config in enumerate(readers):
            key = config.scbk if config.scbk is not None else (SCBK_DEFAULT if config.install_mode else None)
            state = _ReaderState(
                config=config,
                index=index,
                key=key,
                enforced=config.scbk is not None and not config.install_mode,
                backoff=reconnect_initial,
                limiter=ReadLimiter(card_reads_per_s, card_read_burst, flood_calm_s),
            )
            self._states[config.reader_id] = state
            self._by_index.append(state)
            self._by_address[config.address] = state
        addresses = list(self._by_address)
        self._replies = FrameScanner(replies=True, addresses=addresses)
        self._commands = FrameScanner(replies=False, addresses=addresses)
        self._started_at = 0.0
        self._poll_due: float | None = None
        self._poll_period = _POLL_PERIOD_STOCK_S
        self._poll_period_told = False
        self._poll_samples = 0
        self._observers: ObserverList[ReaderEvent] = ObserverList("OSDP reader")
        self._queue: queue.SimpleQueue[tuple[ReaderObserver | None, ReaderEvent] | None] = queue.SimpleQueue()
        self._lifecycle = threading.Lock()
        # Guards reader states, and orders status events with subscription snapshots.
        self._state_lock = threading.RLock()
        self._keyset_lock = threading.Lock()
        self._keyset_waits: dict[int, _KeysetWait] = {}
        self._cp: Any = None
        self._ctx: Any = None
        self._channel: TrackedChannel | None = None
        self._owns_channel = False
        self._dispatcher: threading.Thread | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._fd_woke = False
        self._read_calls_seen = -1
        self._started = False
        self._stopped = False

    @property
    def readers(self) -> tuple[ReaderConfig, ...]:
        """Return the configured readers."""
        return tuple(state.config for state in self._by_index)

    def start(self) -> None:
        """Open the line and start polling the readers; idempotent. Raises LinkUnavailable if the line fails.

        libosdp's refresh thread is not a daemon thread: call ``stop()`` before the process exits.
        """
        with self._lifecycle:
            if self._started:
                return
            if self._stopped:
                raise OsdpError("a stopped OSDP link cannot be restarted; build a new one")
            channel, owned = self._open_channel()
            infos = [self._pd_info(state, channel) for state in self._by_index]
            try:
                cp = _WakingControlPanel(
                    infos,
                    loop=self._run,
                    log_level=_LIBOSDP_LOG_LEVEL,
                    event_handler=self._on_event,
                    command_completion_handler=self._on_command_done,
                )
            except Exception as err:
                if owned:
                    channel.close()
                raise LinkUnavailable(f"libosdp refused the reader configuration: {err}") from err
            self._channel, self._owns_channel, self._cp = channel, owned, cp
            self._started_at = time.monotonic()
            channel.watch(self._on_rx, self._on_tx)
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._dispatcher = threading.Thread(target=self._dispatch, name="osdp-dispatch", daemon=True)
            self._dispatcher.start()
            cp.start()
            self._started = True
            _LOG.info(
                "OSDP link on %s started with readers %s", channel.name, ", ".join(r.reader_id for r in self.readers)
            )
            for state in self._by_index:
                if not state.config.requires_secure_channel:
                    _LOG.warning("OSDP reader %s has no key: it runs without a secure channel", state.config.reader_id)

    def stop(self) -> None:
        """Stop polling, join the link's threads and close what the link opened; idempotent."""
        with self._lifecycle:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
            cp, self._cp = self._cp, None
            cp.stop()
            self._ctx = None
            self._queue.put(None)
            if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
                self._dispatcher.join(timeout=5)
            for wait in list(self._keyset_waits.values()):
                wait.done.set()
            if self._channel is not None:
                self._channel.watch(None, None)
            if self._owns_channel and self._channel is not None:
                self._channel.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
            with self._state_lock:
                for state in self._by_index:
                    state.online = state.secure = state.lib_online = False
            _LOG.info("OSDP link stopped")

    def subscribe(self, observer: ReaderObserver) -> Callable[[], None]:
        """Deliver reader events to ``observer`` (each reader's current status first); return an unsubscriber."""
        with self._state_lock:
            unsubscribe = self._observers.add(observer)
            snapshot = [state.status() for state in self._by_index]
            if self._started and not self._stopped:
                for status in snapshot:
                    self._queue.put((observer, status))
                return unsubscribe
        for status in snapshot:
            self._observers.deliver_to(observer, status)
        return unsubscribe

    def online(self, reader_id: str) -> bool:
        """Return whether the reader is answering the control panel."""
        return self._state(reader_id).online

    def secure(self, reader_id: str) -> bool:
        """Return whether the reader is online over a secure channel opened with its own (non-default) key."""
        return self._state(reader_id).secure

    def restarts(self, reader_id: str) -> int:
        """Return how often the link restarted the reader after libosdp gave up on it (each a fresh attempt)."""
        return self._state(reader_id).restarts

    def status(self, reader_id: str) -> ReaderStatus:
        """Return the reader's current status (as its last ReaderStatus event said)."""
        with self._state_lock:
            return self._state(reader_id).status()

    def flooding(self, reader_id: str) -> bool:
        """Return whether the reader sends card reads beyond its limit now."""
        with self._state_lock:
            return self._state(reader_id).limiter.flooding

    def feedback_coalesced(self, reader_id: str) -> int:
        """Return how many LED/buzzer commands were not sent because they repeated one during a flood."""
        return self._state(reader_id).feedback_coalesced

    def led(self, reader_id: str, colour: LedColour, *, on_ms: int = 1000, off_ms: int = 0, count: int = 1) -> bool:
        """Show ``colour`` on the reader's LED for ``count`` on/off cycles; return whether it was sent to it."""
        pattern = led_pattern(colour, on_ms=on_ms, off_ms=off_ms, count=count)
        if self._coalesced(reader_id, "led", (_LED_CODES[colour], on_ms, off_ms, count)):
            return False
        command = {
            "command": Command.LED,
            "reader": 0,
            "led_number": 0,
            "temporary": True,
            "control_code": _LED_TEMPORARY_SET,
            "on_color": _LED_CODES[colour],
            "off_color": CommandLEDColor.Black,
            "on_count": pattern.on_tenths,
            "off_count": pattern.off_tenths,
            "timer_count": pattern.timer_tenths,
        }
        return self._submit(reader_id, command, "LED")

    def buzz(self, reader_id: str, *, times: int = 1, on_ms: int = 200, off_ms: int = 200) -> bool:
        """Sound the reader's buzzer ``times`` times; return whether the command was sent to it."""
        on, off, repeat = buzz_pattern(times=times, on_ms=on_ms, off_ms=off_ms)
        if self._coalesced(reader_id, "buzzer", (on, off, repeat)):
            return False
        command = {
            "command": Command.Buzzer,
            "reader": 0,
            "control_code": _BUZZER_DEFAULT_TONE,
            "on_count": on,
            "off_count": off,
            "rep_count": repeat,
        }
        return self._submit(reader_id, command, "buzzer")

    def text(self, reader_id: str, message: str, *, seconds: int | None = None) -> bool:
        """Show ``message`` (up to 32 printable ASCII characters) on the reader's display; return whether sent."""
        validate_text(message, seconds)
        command = {
            "command": Command.Text,
            "reader": 0,
            "control_code": _TEXT_PERMANENT if seconds is None else _TEXT_TEMPORARY,
            "temp_time": seconds or 0,
            "offset_row": 1,
            "offset_col": 1,
            "data": message,
        }
        return self._submit(reader_id, command, "text")

    def set_key(self, reader_id: str, new_scbk: bytes, *, timeout: float = 5.0) -> None:
        """Install ``new_scbk`` on the reader over its secure channel and wait until the channel is back with it."""
        key = validate_scbk(new_scbk, what="new_scbk")
        state = self._state(reader_id)
        address = state.config.address
        with self._keyset_lock:
            cp = self._cp
            if cp is None:
                raise KeySetError("the OSDP link is not running")
            if not state.lib_online or not cp.is_sc_active(address):
                raise KeySetError(f"reader {reader_id} has no active secure channel to send a key over")
            wait = _KeysetWait(key=key)
            self._keyset_waits[address] = wait
            try:
                command = {"command": Command.Keyset, "type": _KEYSET_TYPE_SCBK, "data": key}
                if not cp.submit_command(address, command):
                    raise KeySetError(f"libosdp refused the KEYSET command for reader {reader_id}")
                self._wake()
                deadline = time.monotonic() + timeout
                if not wait.done.wait(timeout) or wait.status is None:
                    raise KeySetError(f"reader {reader_id} did not acknowledge the new key in time")
                if wait.status != CompletionStatus.Ok:
                    raise KeySetError(f"reader {reader_id} did not take the new key", completion_status=wait.status)
            finally:
                self._keyset_waits.pop(address, None)
        _LOG.info("OSDP reader %s acknowledged a new secure-channel key; reopening the channel with it", reader_id)
        # libosdp now restarts the secure channel with the new key; only a channel opened with it proves it.
        while time.monotonic() < deadline:
            if state.secure:
                _LOG.info("OSDP reader %s is secure with its new key", reader_id)
                return
            time.sleep(0.01)
        raise KeySetError(f"reader {reader_id} took the new key but no secure channel came up with it")

    # ---- libosdp side (refresh thread) ----

    def _pd_info(self, state: _ReaderState, channel: TrackedChannel) -> Any:
        # Notifications: libosdp says when a PD goes offline, the moment to judge its connection attempt.
        flags = [LibFlag.EnableNotification]
        if state.enforced:
            flags.append(LibFlag.EnforceSecure)
        if state.config.install_mode:
            flags.append(LibFlag.InstallMode)
        # libosdp keeps 15 characters of a PD name for its own log lines.
        return PDInfo(state.config.address, channel, scbk=state.key, name=state.config.reader_id[:15], flags=flags)

    def _open_channel(self) -> tuple[TrackedChannel, bool]:
        target = self._target
        if isinstance(target, TrackedChannel):
            return target, False
        if isinstance(target, bool):
            raise TypeError("channel_or_device must be a device path, a file descriptor or a libosdp Channel")
        if isinstance(target, int):
            return FdChannel(target), False
        if isinstance(target, str | os.PathLike):
            return SerialChannel(os.fspath(target), baud_rate=self._baud_rate), True
        if isinstance(target, Channel):
            return ForeignChannel(target), False
        raise TypeError("channel_or_device must be a device path, a file descriptor or a libosdp Channel")

    def _run(self, stop: threading.Event, lock: Any, ctx: Any) -> None:
        self._ctx = ctx
        failing = False
        while not stop.is_set():
            try:
                with lock:
                    ctx.refresh()
                    online_mask, sc_mask = ctx.status(), ctx.sc_status()
            except Exception:
                if not failing:
                    failing = True
                    _LOG.exception("libosdp refresh failed")
                self._wait()
                continue
            if failing:
                failing = False
                _LOG.info("libosdp refresh works again")
            try:
                self._update_states(online_mask, sc_mask)
                self._keep_reconnecting()
                self._release_reads()
            except Exception:
                _LOG.exception("OSDP link state update failed")
            self._wait()

    def _timeout(self) -> float:
        """Return how long the loop may sleep: ``poll_interval``, or less to refresh just as a poll falls due."""
        due = self._poll_due
        if due is None:
            return self._poll_interval
        if self._poll_samples < _POLL_LEARN_SAMPLES:
            return min(self._poll_interval, _POLL_DUE_RETRY_S)
        left = due - time.monotonic()
        if left > 0:
            return min(self._poll_interval, left)
        # libosdp counts whole milliseconds: if it did not poll yet, look again very soon, for a moment.
        return _POLL_DUE_RETRY_S if -left < _POLL_DUE_WINDOW_S else self._poll_interval

    def _wait(self) -> None:
        """Sleep until line data, a submitted command, a poll falling due or ``poll_interval``."""
        channel = self._channel
        fds = [self._wake_r]
        fd = channel.fileno() if channel is not None and not channel.hung_up else None
        if fd is not None and channel is not None:
            # libosdp reads the line only while it waits for a reply; bytes arriving at other times stay
            # readable, and selecting on them again would spin. Skip the fd once if nothing was read since.
            if not (self._fd_woke and channel.read_calls == self._read_calls_seen):
                fds.append(fd)
            self._read_calls_seen = channel.read_calls
        timeout = self._timeout()
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):
            time.sleep(timeout)
            return
        self._fd_woke = fd is not None and fd in ready
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)

    def _wake(self) -> None:
        if self._wake_w >= 0:
            # A full pipe already wakes the loop; a closed one means the link is stopping.
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def _update_states(self, online_mask: int, sc_mask: int) -> None:
        now = time.monotonic()
        to_enforce = []
        poll_due: float | None = None
        with self._state_lock:
            for state in self._by_index:
                bit = 1 << state.index
                state.lib_online = bool(online_mask & bit)
                if state.lib_online:
                    state.attempt = None  # this attempt succeeded; a later offline is no handshake failure
                    if state.last_reply is not None:
                        due = state.last_reply + self._poll_period
                        poll_due = due if poll_due is None else min(poll_due, due)
                silent = self._silence_timeout is not None and (
                    state.last_reply is None or now - state.last_reply > self._silence_timeout
                )
                online = state.lib_online and not silent
                secure = online and bool(sc_mask & bit) and state.key_is_real
                if online:
                    state.verdict = None
                sc_failure = state.verdict
                settled = state.settled or online or state.judged or now - self._started_at >= self._start_grace
                previous = (state.online, state.secure, state.settled, state.sc_failure)
                if (online, secure, settled, sc_failure) == previous:
                    continue
                state.online, state.secure, state.settled, state.sc_failure = online, secure, settled, sc_failure
                if secure:
                    state.drop_logged = False
                    if not state.enforced:
                        to_enforce.append(state)
                if settled:
                    self._log_status(state, silent)
                self._queue.put((None, state.status()))
        self._poll_due = poll_due
        for state in to_enforce:
            self._enforce_secure(state)

    def _log_status(self, state: _ReaderState, silent: bool) -> None:
        reader_id = state.config.reader_id
        if not state.online:
            if state.sc_failure is not None:
                reason = f"secure channel failed: {state.sc_failure}"
            elif silent and state.lib_online:
                reason = f"no valid reply for {self._silence_timeout} s"
            else:
                reason = "not answering"
            _LOG.warning("OSDP reader %s offline (%s)", reader_id, reason)
        elif state.secure or not state.config.requires_secure_channel:
            _LOG.info("OSDP reader %s online (secure channel: %s)", reader_id, "yes" if state.secure else "no")
        else:
            _LOG.warning(
                "OSDP reader %s online without a secure channel under its own key: its cards are refused", reader_id
            )

    def _enforce_secure(self, state: _ReaderState) -> None:
        cp = self._cp
        if cp is None:
            return
        address = state.config.address
        # A keyed reader must not fall back to SCBK-D or plaintext later: from now on libosdp refuses both.
        if cp.set_flag(address, LibFlag.EnforceSecure):
            cp.clear_flag(address, LibFlag.InstallMode)
            state.enforced = True
            _LOG.info("OSDP reader %s keyed: secure channel now enforced", state.config.reader_id)

    def _keep_reconnecting(self) -> None:
        cp = self._cp
        if cp is None:
            return
        now = time.monotonic()
        for state in self._by_index:
            address = state.config.address
            if state.lib_online:
                state.next_restart = None
                state.restarting = False
                state.backoff = self._reconnect_initial
                continue
            if state.restarting:
                # libosdp applies a disable request only between exchanges; enable once it has.
                if not cp.is_pd_enabled(address):
                    cp.enable_pd(address)
                    state.restarts += 1
                    state.restarting = False
                    state.next_restart = now + state.backoff
                    state.backoff = min(state.backoff * 2, self._reconnect_max)
                continue
            if state.next_restart is None:
                state.next_restart = now + state.backoff
            elif now >= state.next_restart:
                # libosdp would wait 300 s before trying an offline reader again; restart it sooner.
                state.restarting = bool(cp.disable_pd(address))
                if not state.restarting:
                    state.next_restart = now + state.backoff

    def _on_event(self, pd: int, event: dict[str, Any]) -> int:
        """Handle one libosdp event; runs inside libosdp's refresh, holding its lock."""
        try:
            state = self._by_index[pd]
            cp = self._cp
            if cp is not None:
                # ControlPanel also queues every event for get_event(); drain it or it grows without bound.
                cp.get_event(state.config.address, timeout=-1)
            kind = event.get("event")
            if kind == Event.CardRead:
                self._on_card(state, event)
            elif kind == Event.KeyPress:
                self._on_keys(state, event)
            elif (
                kind == Event.Notification
                and event.get("type") == EventNotification.PeripheralDeviceStatus
                and not event.get("arg0")
            ):
                self._judge_attempt(state)
        except Exception:
            # Never raise into libosdp; the message names the reader only, never the event's data.
            _LOG.exception("OSDP event from reader #%d could not be handled", pd)
        return 0

    def _judge_attempt(self, state: _ReaderState) -> None:
        """libosdp took the reader offline: say why its connection attempt failed (refresh thread)."""
        attempt, state.attempt = state.attempt, None
        if attempt is None:
            return  # a restart's disable, or a reader that was online: nothing to judge
        verdict = attempt.verdict() if state.enforced else None
        with self._state_lock:
            state.judged = True
            state.verdict = verdict

    # ---- the line as the frame scanners see it (refresh thread, inside libosdp's channel calls) ----

    def _on_rx(self, data: bytes) -> None:
        try:
            now = time.monotonic()
            for frame in self._replies.feed(data):
                state = self._by_address.get(frame.address)
                if state is not None:
                    state.last_reply = now
                    self._follow_reply(state, frame)
        except Exception:  # never raise into libosdp's read
            _LOG.exception("OSDP frame scanner failed on received data")

    def _on_tx(self, data: bytes) -> None:
        try:
            now = time.monotonic()
            for frame in self._commands.feed(data):
                state = self._by_address.get(frame.address)
                if state is not None:
                    if frame.code == CMD_POLL and state.last_reply is not None:
                        self._learn_poll_period(now - state.last_reply)
                    self._follow_command(state, frame)
        except Exception:
            _LOG.exception("OSDP frame scanner failed on sent data")

    def _learn_poll_period(self, gap: float) -> None:
        """Take a reply → poll gap as libosdp's poll period when it is the shortest seen."""
        # libosdp never polls sooner than its period after a reply, so the shortest gap is the period (plus
        # under a millisecond); a late wake-up only lengthens a gap and is never learned.
        if gap < _POLL_PERIOD_MIN_S:
            return
        self._poll_samples += 1
        self._poll_period = min(self._poll_period, gap)
        if not self._poll_period_told and self._poll_samples >= _POLL_LEARN_SAMPLES:
            self._poll_period_told = True
            if self._poll_period > _POLL_PERIOD_SLOW_S:
                _LOG.warning(
                    "OSDP: libosdp polls each reader only every %.0f ms (a stock build); a card waits that long "
                    "at the reader. sekisho's install builds libosdp with a 10 ms period (docs/doors.md)",
                    self._poll_period * 1000,
                )

    @property
    def poll_period_ms(self) -> float:
        """Return libosdp's poll period as learned from the line (the stock 51.3 ms until a poll is seen)."""
        return round(self._poll_period * 1000, 2)

    @staticmethod
    def _follow_command(state: _ReaderState, frame: Frame) -> None:
        if frame.code == CMD_ID and frame.scb_type is None:
            state.attempt = _Attempt()  # libosdp starts (again) from the beginning
            return
        attempt = state.attempt
        if attempt is None:
            return
        if frame.code == CMD_CHLNG and frame.scb_type == _SCS_CHLNG:
            attempt.stage, attempt.answer, attempt.nak_code = "challenged", None, None
        elif frame.code == CMD_SCRYPT and frame.scb_type == _SCS_SCRYPT:
            # Sent only once the CP has verified the reader's cryptogram: the keys match.
            attempt.stage, attempt.answer, attempt.nak_code = "verified", None, None

    @staticmethod
    def _follow_reply(state: _ReaderState, frame: Frame) -> None:
        attempt = state.attempt
        if attempt is None:
            return
        attempt.replies += 1
        if frame.code == REPLY_PDCAP and frame.plaintext:
            attempt.sc_capable = sc_capable(frame.data)
        if attempt.stage and attempt.answer is None:
            attempt.answer = frame.code
            if frame.code == REPLY_NAK and frame.plaintext and frame.data:
                attempt.nak_code = frame.data[0]

    def _trusted(self, state: _ReaderState) -> bool:
        if not state.config.requires_secure_channel:
            return True
        ctx = self._ctx
        if ctx is None or not state.key_is_real:
            return False
        # Asked of libosdp at the moment of the event (not the last refresh's snapshot): fail closed.
        return bool(ctx.sc_status() & (1 << state.index))

    def _dropped(self, state: _ReaderState, what: str, length: int) -> None:
        if not state.drop_logged:
            state.drop_logged = True
            _LOG.warning(
                "OSDP reader %s: %s (%d bytes) refused, no secure channel under its own key",
                state.config.reader_id,
                what,
                length,
            )
        else:
            _LOG.debug("OSDP reader %s: %s (%d bytes) refused", state.config.reader_id, what, length)

    def _on_card(self, state: _ReaderState, event: dict[str, Any]) -> None:
        data = bytes(event.get("data") or b"")
        if not self._trusted(state):
            self._dropped(state, "card read", len(data))
            return
        card_format = _CARD_FORMATS.get(event.get("format", -1), "unknown")
        bits = int(event["length"]) if "length" in event else len(data) * 8
        _LOG.debug("OSDP reader %s: card read, %s, %d bits", state.config.reader_id, card_format, bits)
        read = CardRead(state.config.reader_id, data, bits, card_format)
        with self._state_lock:
            passed, change = state.limiter.offer(time.monotonic(), read)
        self._pass_on(state, passed, change)

    def _release_reads(self) -> None:
        """Pass on reads that waited for a token, and end floods that have calmed down (refresh thread)."""
        now = time.monotonic()
        for state in self._by_index:
            due = state.limiter.next_due()
            if due is None or due > now:
                continue
            with self._state_lock:
                passed, change = state.limiter.poll(now)
            self._pass_on(state, passed, change)

    def _pass_on(self, state: _ReaderState, passed: list[CardRead], change: Any) -> None:
        for read in passed:
            self._queue.put((None, read))
        if change is None:
            return
        reader_id, limit = state.config.reader_id, state.limiter.rate
        if change.flooding:
            _LOG.warning("OSDP reader %s floods: card reads beyond %.1f/s are dropped", reader_id, limit)
        else:
            _LOG.warning("OSDP reader %s calm again; %d card reads dropped", reader_id, change.dropped)
        self._queue.put((None, ReaderFlood(reader_id, change.flooding, change.dropped, limit)))

    def _on_keys(self, state: _ReaderState, event: dict[str, Any]) -> None:
        data = bytes(event.get("data") or b"")
        if not self._trusted(state):
            self._dropped(state, "keypad input", len(data))
            return
        keys = "".join(_KEYPAD_BYTES.get(byte, "") for byte in data)
        if len(keys) != len(data):
            unknown = len(data) - len(keys)
            _LOG.warning("OSDP reader %s: %d keypad bytes not understood", state.config.reader_id, unknown)
        if keys:
            self._queue.put((None, KeypadInput(state.config.reader_id, keys)))

    def _on_command_done(self, address: int, command: dict[str, Any], status: int) -> None:
        """Note a command's completion; runs inside libosdp's refresh, holding its lock."""
        try:
            if command.get("command") == Command.Keyset:
                wait = self._keyset_waits.get(address)
                if wait is not None:
                    wait.status = status
                    if status == CompletionStatus.Ok:
                        # libosdp has committed the key for this reader; secure() must judge by it from now on.
                        for state in self._by_index:
                            if state.config.address == address:
                                with self._state_lock:
                                    state.key = wait.key
                    wait.done.set()
            elif status != CompletionStatus.Ok:
                _LOG.debug(
                    "OSDP command %s to address %d ended with status %d", command.get("command"), address, status
                )
        except Exception:
            _LOG.exception("OSDP command completion could not be handled")

    # ---- callers' side ----

    def _state(self, reader_id: str) -> _ReaderState:
        try:
            return self._states[reader_id]
        except KeyError:
            raise UnknownReader(f"no OSDP reader {reader_id!r} on this link") from None

    def _coalesced(self, reader_id: str, kind: str, signature: tuple[int, ...]) -> bool:
        """Tell whether to skip this LED/buzzer command: the same one went to a flooding reader within a second."""
        state = self._state(reader_id)
        now = time.monotonic()
        with self._state_lock:
            last = state.last_feedback.get(kind)
            if (
                state.limiter.flooding
                and last is not None
                and last[0] == signature
                and now - last[1] < _FLOOD_FEEDBACK_S
            ):
                state.feedback_coalesced += 1
                return True
            state.last_feedback[kind] = (signature, now)
        return False

    def _submit(self, reader_id: str, command: dict[str, Any], what: str) -> bool:
        state = self._state(reader_id)
        cp = self._cp
        if cp is None or not state.online:
            return False
        accepted = bool(cp.submit_command(state.config.address, command))
        if accepted:
            self._wake()
        else:
            _LOG.debug("OSDP reader %s: libosdp refused the %s command", reader_id, what)
        return accepted

    def _dispatch(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            target, event = item
            if target is None:
                self._observers.deliver(event)
            else:
                self._observers.deliver_to(target, event)
