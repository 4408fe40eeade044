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
300 s before it tries again. The link therefore (1) reports a reader offline as soon as the whole line has
been silent for ``silence_timeout`` while readers were online, and (2) restarts offline readers itself
(disable/enable) with a backoff from ``reconnect_initial`` to ``reconnect_max`` seconds.
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
    LibFlag,
    LogLevel,
    PDInfo,
)

from sekisho.drivers.observers import ObserverList
from sekisho.drivers.osdp.channel import DEFAULT_BAUD_RATE, FdChannel, ForeignChannel, SerialChannel, TrackedChannel
from sekisho.drivers.osdp.errors import KeySetError, LinkUnavailable, OsdpError, UnknownReader
from sekisho.drivers.osdp.protocol import (
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

# A libosdp Channel is typed Any here (libosdp has no type hints), so it needs no place of its own.
ChannelTarget = str | os.PathLike[str] | int


@dataclass
class _ReaderState:
    """What the link knows about one reader; written by the refresh thread, read by callers."""

    config: ReaderConfig
    index: int
    key: bytes | None  # the key libosdp uses for this reader now (SCBK-D for an unkeyed install-mode reader)
    enforced: bool  # EnforceSecure set in libosdp for this reader
    backoff: float
    lib_online: bool = False
    online: bool = False
    secure: bool = False
    next_restart: float | None = None
    restarting: bool = False
    restarts: int = 0
    drop_logged: bool = False

    @property
    def key_is_real(self) -> bool:
        return self.key is not None and self.key != SCBK_DEFAULT

    def status(self) -> ReaderStatus:
        return ReaderStatus(self.config.reader_id, online=self.online, secure=self.secure)


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
    ) -> None:
        validate_readers(readers, max_readers=MAX_READERS_PER_LINE)
        if poll_interval <= 0 or poll_interval > 0.02:
            # libosdp needs a refresh at least every 50 ms; more than 20 ms would be slower than its own loop.
            raise ValueError("poll_interval must be in (0, 0.02] seconds")
        self._target = channel_or_device
        self._baud_rate = baud_rate
        self._poll_interval = poll_interval
        self._silence_timeout = silence_timeout
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._states: dict[str, _ReaderState] = {}
        self._by_index: list[_ReaderState] = []
        for index, config in enumerate(readers):
            key = config.scbk if config.scbk is not None else (SCBK_DEFAULT if config.install_mode else None)
            state = _ReaderState(
                config=config,
                index=index,
                key=key,
                enforced=config.scbk is not None and not config.install_mode,
                backoff=reconnect_initial,
            )
            self._states[config.reader_id] = state
            self._by_index.append(state)
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

    def led(self, reader_id: str, colour: LedColour, *, on_ms: int = 1000, off_ms: int = 0, count: int = 1) -> bool:
        """Show ``colour`` on the reader's LED for ``count`` on/off cycles; return whether it was sent to it."""
        pattern = led_pattern(colour, on_ms=on_ms, off_ms=off_ms, count=count)
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
        flags = []
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
            except Exception:
                _LOG.exception("OSDP link state update failed")
            self._wait()

    def _wait(self) -> None:
        """Sleep until line data, a submitted command or ``poll_interval``, whichever comes first."""
        channel = self._channel
        fds = [self._wake_r]
        fd = channel.fileno() if channel is not None and not channel.hung_up else None
        if fd is not None and channel is not None:
            # libosdp reads the line only while it waits for a reply; bytes arriving at other times stay
            # readable, and selecting on them again would spin. Skip the fd once if nothing was read since.
            if not (self._fd_woke and channel.read_calls == self._read_calls_seen):
                fds.append(fd)
            self._read_calls_seen = channel.read_calls
        try:
            ready, _, _ = select.select(fds, [], [], self._poll_interval)
        except (OSError, ValueError):
            time.sleep(self._poll_interval)
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
        channel = self._channel
        now = time.monotonic()
        line_silent = (
            self._silence_timeout is not None and channel is not None and now - channel.last_rx > self._silence_timeout
        )
        to_enforce = []
        with self._state_lock:
            for state in self._by_index:
                bit = 1 << state.index
                state.lib_online = bool(online_mask & bit)
                online = state.lib_online and not line_silent
                secure = online and bool(sc_mask & bit) and state.key_is_real
                if (online, secure) == (state.online, state.secure):
                    continue
                state.online, state.secure = online, secure
                if secure:
                    state.drop_logged = False
                    if not state.enforced:
                        to_enforce.append(state)
                self._log_status(state, line_silent)
                self._queue.put((None, state.status()))
        for state in to_enforce:
            self._enforce_secure(state)

    def _log_status(self, state: _ReaderState, line_silent: bool) -> None:
        reader_id = state.config.reader_id
        if not state.online:
            reason = "line silent" if line_silent and state.lib_online else "not answering or refused"
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
        except Exception:
            # Never raise into libosdp; the message names the reader only, never the event's data.
            _LOG.exception("OSDP event from reader #%d could not be handled", pd)
        return 0

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
        self._queue.put((None, CardRead(state.config.reader_id, data, bits, card_format)))

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
