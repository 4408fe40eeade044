"""An OSDP card reader firmware stand-in (peripheral device, PD) on a serial line or pseudo-terminal.

Run it as ``python -m sekisho.firmware_stubs.osdp_reader --device /dev/pts/N [--address 1]
[--scbk HEX | --install-mode] [--plaintext]``. It opens ``--device`` (the slave side of a pty in tests and
the demo; the control panel holds the master side) in raw mode and answers the control panel there:

- ``--scbk HEX``: a keyed reader (libosdp PD with that 16-byte Secure Channel Base Key).
- ``--install-mode``: accepts a secure channel opened with the default key SCBK-D, to be keyed by the CP;
  without ``--scbk`` it starts unkeyed (libosdp's install mode), with it it also takes its own key.
- ``--plaintext``: a reader with no secure channel support at all. libosdp's PD always advertises and
  accepts Secure Channel, so this one is a small PD written here from the OSDP specification (ID, CAP,
  POLL, LED, BUZ, TEXT, LSTAT; card data as osdp_RAW, keypad as osdp_KEYPAD), independently of
  libosdp and of drivers/osdp, so that a shared misreading of the protocol cannot make the tests pass.

Control: JSON lines on stdin, one object per line; reports: JSON lines on stdout. Commands:

    {"card": "<hex>", "bits": 26, "format": "wiegand"}   present a card ("bits" defaults to 8 per byte and
                                                        must fit the last byte; "format": "raw" or "wiegand")
    {"keys": "1234#"}                                    press keys (digits, '*', '#')
    {"fault": "silence", "seconds": 2}                   stop answering (input is read and dropped)
    {"fault": "garbage", "bytes": 64}                    noise on the line just before the next reply (it
                                                        starts like a reply, so the CP loses a real one)
    {"fault": "noise", "seconds": 5, "rate": 4000}       a dead reader on a noisy line: stop answering, and
                                                        put random bytes on the line (``rate`` per second)
                                                        until the time is up; then {"noise": "ended"}
    {"fault": "flood", "seconds": 5, "rate": 100,        a faulty reader: present ``card`` ``rate`` times a
     "card": "<hex>", "buffer": 4}                      second (it keeps answering polls). The reader holds
                                                        at most ``buffer`` reads until polled and loses the
                                                        rest, as reader firmware does; without ``buffer``
                                                        it keeps them all (libosdp's PD queue has no bound)
                                                        and hands them over one per poll long after. Then
                                                        {"flood": {"ended": true, "offered": n, "queued": m}}
    {"quit": true}                                       stop and exit (end of stdin does the same)

Each command is answered with ``{"ack": "<card|keys|fault>"}`` or ``{"error": "..."}``. Reports:
``{"ready": true, "address": N}`` once the line is open; ``{"status": {"online": b, "secure": b}}`` when the
reader's view of the link changes; and one line for every command the control panel sends that a tester
may want to assert: ``{"led": {...}}``, ``{"buzzer": {...}}``, ``{"text": {...}}`` (libosdp's command fields)
and ``{"keyset": true}`` (never the key). libosdp's own log goes to stderr.

``StubReaderProcess`` runs this module as a subprocess on a fresh pty pair for tests, benchmarks and the demo.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import select
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from osdp import (
    Capability,
    CardFormat,
    Channel,
    Command,
    Event,
    LibFlag,
    LogLevel,
    PDCapabilities,
    PDInfo,
    PeripheralDevice,
)

from sekisho.firmware_stubs.reports import follow_reports, wait_for_report

Report = Callable[[dict[str, Any]], None]

# No "ascii": libosdp 3.2 drops ASCII card reads (osdp_FMT is deprecated) on both the PD and the CP side.
_FORMATS = {"raw": CardFormat.Unspecified, "wiegand": CardFormat.Wiegand}
# OSDP keypad encoding: ASCII digits, DEL (0x7F) for '*', CR (0x0D) for '#'.
_KEY_BYTES = {**{digit: ord(digit) for digit in "0123456789"}, "*": 0x7F, "#": 0x0D}
_POLL_INTERVAL = 0.005


class _Line(Channel):  # type: ignore[misc]  # libosdp ships no type information
    """The reader's end of the line: raw, non-blocking, with the silence and garbage faults built in."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd, termios.TCSANOW)
        attributes = termios.tcgetattr(self.fd)
        attributes[4] = attributes[5] = termios.B115200
        termios.tcsetattr(self.fd, termios.TCSANOW, attributes)
        self._mute_until = 0.0
        self._noise = b""
        self._write_lock = threading.Lock()
        self._fault_threads: list[threading.Thread] = []
        self.stopping = threading.Event()

    def mute(self, seconds: float) -> None:
        """Stop answering for ``seconds``: input is drained and dropped, output is discarded."""
        self._mute_until = time.monotonic() + seconds

    def garbage(self, count: int, reply_address: int) -> None:
        """Put ``count`` bytes of noise on the line just ahead of the reader's next reply.

        Ahead of a reply, because libosdp flushes its input between exchanges: noise at any other moment is
        thrown away unseen. The noise starts like a reply from this reader (start of message, its address,
        a length longer than the noise), so the control panel takes the real reply as the rest of a bogus
        packet and has to recover from a bad packet, not merely skip bytes that cannot start one.
        """
        length = count + random.randint(8, 64)
        header = bytes([0x53, reply_address]) + length.to_bytes(2, "little")
        with self._write_lock:
            self._noise = (header + random.randbytes(max(count - len(header), 0)))[: max(count, 1)]

    def noise(self, seconds: float, rate: int, report: Report) -> None:
        """Stop answering for ``seconds`` and fill the line with random bytes meanwhile (``rate`` per second).

        The bytes are random: what a floating or badly terminated RS-485 pair picks up. A byte of them may be
        a start-of-message, never a whole packet with a valid check from a reader.
        """
        self.mute(seconds)

        def run() -> None:
            deadline = time.monotonic() + seconds
            chunk = max(1, rate // 100)
            while not self.stopping.is_set() and time.monotonic() < deadline:
                with self._write_lock, contextlib.suppress(OSError):
                    os.write(self.fd, random.randbytes(chunk))
                self.stopping.wait(0.01)
            report({"noise": "ended"})

        self.start_fault(run, "noise")

    def start_fault(self, target: Callable[[], None], name: str) -> None:
        """Run a fault in a thread of its own until it ends or the stub stops."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._fault_threads.append(thread)
        thread.start()

    def stop_faults(self) -> None:
        """End running faults (noise, flood) and wait for their threads."""
        self.stopping.set()
        for thread in self._fault_threads:
            thread.join(timeout=5)

    def read(self, max_bytes: int) -> bytes:
        """Return what the line holds, up to ``max_bytes``; nothing while muted."""
        try:
            data = os.read(self.fd, max_bytes)
        except OSError:
            return b""
        return b"" if time.monotonic() < self._mute_until else data

    def write(self, buf: bytes) -> int:
        """Send ``buf`` (or pretend to, while muted); return how many bytes went out."""
        if time.monotonic() < self._mute_until:
            return len(buf)
        with self._write_lock:
            noise, self._noise = self._noise, b""
            try:
                if noise:
                    os.write(self.fd, noise)
                return os.write(self.fd, bytes(buf))
            except OSError:
                return 0

    def flush(self) -> None:
        """Drop unread input."""
        with contextlib.suppress(OSError):
            while os.read(self.fd, 4096):
                pass

    def wait_readable(self, timeout: float) -> None:
        """Sleep until the line has data or ``timeout`` passes."""
        with contextlib.suppress(OSError, ValueError):
            select.select([self.fd], [], [], timeout)


class _WakingPeripheralDevice(PeripheralDevice):  # type: ignore[misc]  # libosdp ships no type information
    """libosdp's PeripheralDevice, refreshed as soon as the line has data rather than every 20 ms."""

    def __init__(self, *args: Any, line: _Line, on_refresh: Callable[[Any], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._line = line
        self._on_refresh = on_refresh

    def refresh(self, event: threading.Event, lock: Any, ctx: Any) -> None:
        """Run the refresh loop until ``event`` is set."""
        while not event.is_set():
            with lock:
                ctx.refresh()
            self._on_refresh(ctx)
            self._line.wait_readable(_POLL_INTERVAL)


class _LibosdpReader:
    """A reader built on libosdp's PD: keyed, or in install mode."""

    def __init__(self, line: _Line, address: int, scbk: bytes | None, install_mode: bool, report: Report) -> None:
        self._report = report
        self._status: tuple[bool, bool] | None = None
        self._submitted = 0
        self._delivered = 0
        flags = [LibFlag.InstallMode] if install_mode and scbk is not None else []
        capabilities = PDCapabilities(
            [
                (Capability.LEDControl, 1, 1),
                (Capability.AudibleControl, 1, 1),
                (Capability.TextOutput, 1, 1),
            ]
        )
        self._pd = _WakingPeripheralDevice(
            PDInfo(address, line, scbk=scbk, flags=flags),
            capabilities,
            log_level=LogLevel.Warning,
            command_handler=self._on_command,
            event_completion_handler=self._on_event_done,
            line=line,
            on_refresh=self._check_status,
        )

    def start(self) -> None:
        """Start answering the control panel."""
        self._pd.start()

    def stop(self) -> None:
        """Stop answering."""
        self._pd.stop()

    def present_card(self, data: bytes, bits: int, card_format: str) -> bool:
        """Queue a card read for the next poll; return False if libosdp's event queue (4 events) is full."""
        event = {"event": Event.CardRead, "reader_no": 0, "format": _FORMATS[card_format], "direction": 0}
        queued = bool(self._pd.submit_event({**event, "length": bits, "data": data}))
        self._submitted += queued
        return queued

    def backlog(self) -> int:
        """Return how many card reads and keypad entries wait for the control panel's polls."""
        return self._submitted - self._delivered

    def _on_event_done(self, event: dict[str, Any], status: int) -> None:
        self._delivered += 1

    def enter_keys(self, encoded: bytes) -> None:
        """Queue keypad input for the next poll."""
        self._submitted += bool(self._pd.submit_event({"event": Event.KeyPress, "reader_no": 0, "data": encoded}))

    def _on_command(self, command: dict[str, Any]) -> tuple[int, None]:
        kind = command.get("command")
        fields = {key: value for key, value in command.items() if key != "command"}
        if kind == Command.LED:
            self._report({"led": fields})
        elif kind == Command.Buzzer:
            self._report({"buzzer": fields})
        elif kind == Command.Text:
            self._report({"text": fields})
        elif kind == Command.Keyset:
            self._report({"keyset": True})
        else:
            self._report({"command": {"id": kind}})
        return 0, None

    def _check_status(self, ctx: Any) -> None:
        status = (bool(ctx.is_online()), bool(ctx.is_sc_active()))
        if status != self._status:
            self._status = status
            self._report({"status": {"online": status[0], "secure": status[1]}})


# ---- a plaintext reader written from the OSDP specification ----

_SOM = 0x53
_MARK = 0xFF
_CTRL_CRC = 0x04
_CTRL_SCB = 0x08
_BROADCAST = 0x7F
_CMD_POLL, _CMD_ID, _CMD_CAP, _CMD_LSTAT = 0x60, 0x61, 0x62, 0x64
_CMD_LED, _CMD_BUZ, _CMD_TEXT = 0x69, 0x6A, 0x6B
_REPLY_ACK, _REPLY_NAK, _REPLY_PDID, _REPLY_PDCAP, _REPLY_LSTATR = 0x40, 0x41, 0x45, 0x46, 0x48
_REPLY_RAW, _REPLY_KEYPAD = 0x50, 0x53
_NAK_UNKNOWN_COMMAND, _NAK_NO_SECURITY = 0x03, 0x05
# (function code, compliance, number of items): LED, buzzer, text, CRC-16; no communication security.
_PLAINTEXT_CAPABILITIES = [(4, 1, 1), (5, 1, 1), (6, 1, 1), (8, 1, 0), (9, 0, 0), (10, 0x00, 0x01)]
_PLAINTEXT_BUFFER = 16  # card reads and keypad entries a reader holds until polled


def crc16_osdp(data: bytes) -> int:
    """Return OSDP's packet CRC: CRC-16/CCITT (polynomial 0x1021, not reflected) seeded with 0x1D0F."""
    crc = 0x1D0F
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


class _PlaintextReader:
    """A reader with no secure channel: the smallest OSDP PD that a control panel can bring online."""

    def __init__(self, line: _Line, address: int, report: Report) -> None:
        self._line = line
        self._address = address
        self._report = report
        self._buffer = bytearray()
        self._events: collections.deque[tuple[int, bytes]] = collections.deque()
        self._events_lock = threading.Lock()
        self._last: tuple[int, bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plaintext-pd", daemon=True)
        self._last_command = 0.0
        self._online = False

    def start(self) -> None:
        """Start answering the control panel."""
        self._report({"status": {"online": False, "secure": False}})
        self._thread.start()

    def stop(self) -> None:
        """Stop answering."""
        self._stop.set()
        self._thread.join(timeout=5)

    def present_card(self, data: bytes, bits: int, card_format: str) -> bool:
        """Queue a card read for the next poll; return False if the reader's buffer is full."""
        return self._queue(_REPLY_RAW, bytes([0, _FORMATS[card_format]]) + bits.to_bytes(2, "little") + data)

    def enter_keys(self, encoded: bytes) -> None:
        """Queue keypad input for the next poll."""
        self._queue(_REPLY_KEYPAD, bytes([0, len(encoded)]) + encoded)

    def backlog(self) -> int:
        """Return how many card reads and keypad entries wait for the control panel's polls."""
        with self._events_lock:
            return len(self._events)

    def _queue(self, code: int, data: bytes) -> bool:
        with self._events_lock:
            if len(self._events) >= _PLAINTEXT_BUFFER:
                return False
            self._events.append((code, data))
            return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._line.wait_readable(_POLL_INTERVAL)
            self._buffer += self._line.read(1024)
            for frame in self._frames():
                self._answer(frame)
            online = time.monotonic() - self._last_command < 8.0
            if online != self._online:
                self._online = online
                self._report({"status": {"online": online, "secure": False}})

    def _frames(self) -> list[bytes]:
        frames: list[bytes] = []
        while True:
            start = self._buffer.find(_SOM)
            if start < 0:
                self._buffer.clear()
                return frames
            del self._buffer[:start]
            if len(self._buffer) < 6:
                return frames
            length = int.from_bytes(self._buffer[2:4], "little")
            if not 7 <= length <= 1024:
                del self._buffer[0]
                continue
            if len(self._buffer) < length:
                return frames
            frame = bytes(self._buffer[:length])
            if self._valid(frame):
                del self._buffer[:length]
                frames.append(frame)
            else:
                # Not a packet after all: look for the next start-of-message inside it.
                del self._buffer[0]

    @staticmethod
    def _valid(frame: bytes) -> bool:
        if frame[4] & _CTRL_CRC:
            return crc16_osdp(frame[:-2]) == int.from_bytes(frame[-2:], "little")
        return (-sum(frame[:-1])) & 0xFF == frame[-1]

    def _answer(self, frame: bytes) -> None:
        address = frame[1] & 0x7F
        if frame[1] & 0x80 or address not in (self._address, _BROADCAST):
            return  # a reply on the bus, or someone else's command
        self._last_command = time.monotonic()
        control = frame[4]
        sequence = control & 0x03
        use_crc = bool(control & _CTRL_CRC)
        if sequence and self._last is not None and self._last[0] == sequence:
            # The control panel did not get our reply and asks again: resend it, do not pop a new event.
            self._line.write(self._last[1])
            return
        if control & _CTRL_SCB:
            code, data = _REPLY_NAK, bytes([_NAK_NO_SECURITY])
        else:
            body = frame[5 : len(frame) - (2 if use_crc else 1)]
            code, data = self._handle(body[0], body[1:])
        packet = self._packet(sequence, use_crc, code, data)
        self._last = (sequence, packet)
        self._line.write(packet)

    def _handle(self, command: int, data: bytes) -> tuple[int, bytes]:
        if command == _CMD_POLL:
            with self._events_lock:
                if self._events:
                    return self._events.popleft()
            return _REPLY_ACK, b""
        if command == _CMD_ID:
            # vendor code, model, version, serial number (little endian), firmware major/minor/build
            return _REPLY_PDID, bytes([0x5E, 0x4B, 0x15, 1, 1]) + (0x0A5E).to_bytes(4, "little") + bytes([1, 0, 0])
        if command == _CMD_CAP:
            return _REPLY_PDCAP, bytes(value for triple in _PLAINTEXT_CAPABILITIES for value in triple)
        if command == _CMD_LSTAT:
            return _REPLY_LSTATR, bytes([0, 0])
        if command == _CMD_LED:
            for offset in range(0, len(data) - 13, 14):
                self._report({"led": self._led_fields(data[offset : offset + 14])})
            return _REPLY_ACK, b""
        if command == _CMD_BUZ and len(data) >= 5:
            fields = dict(zip(("reader", "control_code", "on_count", "off_count", "rep_count"), data, strict=False))
            self._report({"buzzer": fields})
            return _REPLY_ACK, b""
        if command == _CMD_TEXT and len(data) >= 6:
            text: dict[str, Any] = dict(
                zip(("reader", "control_code", "temp_time", "offset_row", "offset_col"), data, strict=False)
            )
            text["data"] = data[6 : 6 + data[5]].decode("ascii", "replace")
            self._report({"text": text})
            return _REPLY_ACK, b""
        self._report({"command": {"id": command}})
        return _REPLY_NAK, bytes([_NAK_UNKNOWN_COMMAND])

    @staticmethod
    def _led_fields(record: bytes) -> dict[str, Any]:
        reader, led_number, temporary_code = record[0], record[1], record[2]
        if temporary_code:
            on_count, off_count, on_color, off_color = record[3:7]
            return {
                "reader": reader,
                "led_number": led_number,
                "temporary": True,
                "control_code": temporary_code,
                "on_count": on_count,
                "off_count": off_count,
                "on_color": on_color,
                "off_color": off_color,
                "timer_count": int.from_bytes(record[7:9], "little"),
            }
        return {
            "reader": reader,
            "led_number": led_number,
            "temporary": False,
            "control_code": record[9],
            "on_count": record[10],
            "off_count": record[11],
            "on_color": record[12],
            "off_color": record[13],
        }

    def _packet(self, sequence: int, use_crc: bool, code: int, data: bytes) -> bytes:
        length = 6 + len(data) + (2 if use_crc else 1)
        control = sequence | (_CTRL_CRC if use_crc else 0)
        body = bytes([_SOM, self._address | 0x80]) + length.to_bytes(2, "little") + bytes([control, code]) + data
        check = crc16_osdp(body).to_bytes(2, "little") if use_crc else bytes([(-sum(body)) & 0xFF])
        return bytes([_MARK]) + body + check


# ---- the process: control on stdin, reports on stdout ----


class _Reporter:
    """JSON lines to stdout, one per report, from whichever thread makes it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, report: dict[str, Any]) -> None:
        line = json.dumps(report, default=lambda value: value.hex() if isinstance(value, bytes) else str(value))
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._stream.write(line + "\n")
            self._stream.flush()


def _flood(
    reader: _LibosdpReader | _PlaintextReader, line: _Line, request: dict[str, Any], report: Report
) -> dict[str, Any]:
    data = bytes.fromhex(str(request.get("card", "f100d0")))
    seconds = float(request.get("seconds", 5))
    rate = float(request.get("rate", 100))
    buffer = int(request["buffer"]) if request.get("buffer") is not None else None
    if not data or not 0 < seconds <= 600 or not 0 < rate <= 1000 or (buffer is not None and buffer < 1):
        return {"error": "flood needs a card, seconds in (0, 600], a rate in (0, 1000] and a buffer of 1 or more"}

    def run() -> None:
        offered = queued = 0
        started = time.monotonic()
        while not line.stopping.is_set():
            now = time.monotonic()
            if now - started >= seconds:
                break
            if offered <= (now - started) * rate:
                offered += 1
                if buffer is None or reader.backlog() < buffer:
                    queued += reader.present_card(data, len(data) * 8, "raw")
                continue
            line.stopping.wait(min(1 / rate, 0.01))
        report({"flood": {"ended": True, "offered": offered, "queued": queued}})

    line.start_fault(run, "flood")
    return {"ack": "fault"}


def _control(
    reader: _LibosdpReader | _PlaintextReader,
    line: _Line,
    reply_address: int,
    request: dict[str, Any],
    report: Report,
) -> dict[str, Any]:
    if "fault" in request:
        return _fault(reader, line, reply_address, request, report)
    if "card" in request:
        data = bytes.fromhex(request["card"])
        card_format = request.get("format", "raw")
        bits = int(request.get("bits", len(data) * 8))
        if card_format not in _FORMATS or not data or (bits + 7) // 8 != len(data):
            return {"error": "card needs hex data, bits that end in its last byte and a format of raw or wiegand"}
        reader.present_card(data, bits, card_format)
        return {"ack": "card"}
    if "keys" in request:
        keys = str(request["keys"])
        if not keys or any(key not in _KEY_BYTES for key in keys):
            return {"error": "keys must be digits, '*' and '#'"}
        reader.enter_keys(bytes(_KEY_BYTES[key] for key in keys))
        return {"ack": "keys"}
    return {"error": "unknown command"}


def _fault(
    reader: _LibosdpReader | _PlaintextReader,
    line: _Line,
    reply_address: int,
    request: dict[str, Any],
    report: Report,
) -> dict[str, Any]:
    if request.get("fault") == "silence":
        line.mute(float(request.get("seconds", 2)))
        return {"ack": "fault"}
    if request.get("fault") == "garbage":
        line.garbage(int(request.get("bytes", 64)), reply_address)
        return {"ack": "fault"}
    if request.get("fault") == "noise":
        line.noise(float(request.get("seconds", 5)), int(request.get("rate", 4000)), report)
        return {"ack": "fault"}
    if request.get("fault") == "flood":
        return _flood(reader, line, request, report)
    return {"error": "unknown fault"}


def main(argv: list[str] | None = None) -> int:
    """Run the reader stub until {"quit": true} or the end of stdin."""
    parser = argparse.ArgumentParser(
        prog="python -m sekisho.firmware_stubs.osdp_reader", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", required=True, help="serial device or pty slave path")
    parser.add_argument("--address", type=int, default=1, help="OSDP address, 0-126")
    keying = parser.add_mutually_exclusive_group()
    keying.add_argument("--plaintext", action="store_true", help="no secure channel support")
    keying.add_argument("--scbk", help="Secure Channel Base Key, 32 hex digits")
    parser.add_argument("--install-mode", action="store_true", help="accept SCBK-D to be keyed")
    args = parser.parse_args(argv)
    scbk = bytes.fromhex(args.scbk) if args.scbk else None
    if scbk is not None and len(scbk) != 16:
        parser.error("--scbk needs 16 bytes (32 hex digits)")
    if not args.plaintext and scbk is None and not args.install_mode:
        parser.error("a secure reader needs --scbk or --install-mode (or use --plaintext)")

    report = _Reporter(sys.stdout)
    line = _Line(args.device)
    reader: _LibosdpReader | _PlaintextReader
    if args.plaintext:
        reader = _PlaintextReader(line, args.address, report)
    else:
        reader = _LibosdpReader(line, args.address, scbk, args.install_mode, report)
    reader.start()
    report({"ready": True, "address": args.address})
    try:
        for text in sys.stdin:
            if not text.strip():
                continue
            try:
                request = json.loads(text)
                if not isinstance(request, dict):
                    raise ValueError("a command is a JSON object")
                if request.get("quit"):
                    break
                report(_control(reader, line, args.address | 0x80, request, report))
            except (ValueError, TypeError) as err:
                report({"error": str(err)})
    except KeyboardInterrupt:
        pass
    finally:
        line.stop_faults()
        reader.stop()
        os.close(line.fd)
    return 0


class StubReaderProcess:
    """The reader stub as a subprocess on a fresh pty pair: the stub has the slave, the caller the master fd.

    Give ``master_fd`` to ``OsdpReaderLink`` (it builds a channel on it). This object keeps the slave side
    open too, so the master never reads EIO while the stub starts or stops, and the pty stays in raw mode.
    """

    def __init__(
        self,
        *,
        address: int = 1,
        scbk: bytes | None = None,
        install_mode: bool = False,
        plaintext: bool = False,
        stderr_path: str | os.PathLike[str] | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.master_fd, self._slave_fd = os.openpty()
        for fd in (self.master_fd, self._slave_fd):
            tty.setraw(fd, termios.TCSANOW)
        self.slave_path = os.ttyname(self._slave_fd)
        self._stderr = open(stderr_path, "ab") if stderr_path is not None else None  # noqa: SIM115
        self._ready_timeout = ready_timeout
        self._closed = False
        self._spawn(scbk=scbk, install_mode=install_mode, plaintext=plaintext)

    def __enter__(self) -> StubReaderProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """Return the stub process's id."""
        return self._process.pid

    def present_card(self, data: bytes, bits: int | None = None, card_format: str = "raw") -> None:
        """Tap a card at the reader."""
        request: dict[str, Any] = {"card": data.hex(), "format": card_format}
        if bits is not None:
            request["bits"] = bits
        self._send(request)

    def enter_keys(self, keys: str) -> None:
        """Press keys on the reader's keypad."""
        self._send({"keys": keys})

    def fault(
        self,
        kind: str,
        *,
        seconds: float | None = None,
        count: int | None = None,
        rate: float | None = None,
        card: bytes | None = None,
        buffer: int | None = None,
    ) -> None:
        """Inject a fault: "silence" or "noise" for ``seconds``, "garbage" of ``count`` bytes, or a "flood"."""
        request: dict[str, Any] = {"fault": kind}
        if seconds is not None:
            request["seconds"] = seconds
        if count is not None:
            request["bytes"] = count
        if rate is not None:
            request["rate"] = rate
        if card is not None:
            request["card"] = card.hex()
        if buffer is not None:
            request["buffer"] = buffer
        self._send(request)

    def flood(self, card: bytes, *, seconds: float, rate: float = 100, buffer: int | None = None) -> None:
        """Make the reader present ``card`` ``rate`` times a second for ``seconds`` (a faulty or hostile reader).

        ``buffer``: the reads it holds until polled (None: all of them, handed over one per poll).
        """
        self.fault("flood", seconds=seconds, rate=rate, card=card, buffer=buffer)

    def reported(self, key: str) -> list[Any]:
        """Return every report holding ``key`` (e.g. "flood", "noise"), oldest first."""
        with self._changed:
            return [report[key] for report in self._reports if key in report]

    def wait_reported(self, key: str, *, timeout: float = 10.0) -> Any:
        """Wait for the first report holding ``key``; return its value."""
        self._wait_for(lambda report: key in report, timeout, f"a {key} report")
        return self.reported(key)[0]

    def feedback(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Return the LED/buzzer/text/keyset commands the reader got since it (re)started (of ``kind`` if given)."""
        kinds = (kind,) if kind is not None else ("led", "buzzer", "text", "keyset")
        with self._changed:
            return [report[key] for report in self._reports for key in kinds if key in report]

    def wait_feedback(self, kind: str, *, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until the reader has got ``count`` commands of ``kind``; return them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(items := self.feedback(kind)) < count:
                left = deadline - time.monotonic()
                if left <= 0 or not self._process_alive():
                    raise TimeoutError(f"the reader got {len(items)} {kind} commands, not {count}")
                self._changed.wait(left)
            return items

    def wait_status(self, *, online: bool, secure: bool | None = None, timeout: float = 5.0) -> None:
        """Wait until the reader's own view of the link is ``online`` (and ``secure``, if given)."""

        def matches(report: dict[str, Any]) -> bool:
            status = report.get("status")
            return (
                isinstance(status, dict)
                and status["online"] == online
                and (secure is None or status["secure"] == secure)
            )

        self._wait_for(matches, timeout, f"reader status online={online} secure={secure}", latest_status=True)

    def restart(self, *, scbk: bytes | None = None, install_mode: bool = False, plaintext: bool = False) -> None:
        """Power-cycle the reader, or swap it for another one, on the same line (the pty stays open)."""
        self._end_process()
        self._spawn(scbk=scbk, install_mode=install_mode, plaintext=plaintext)

    def close(self) -> None:
        """Stop the stub (politely, then by force) and close the pty; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._end_process()
        if self._stderr is not None:
            self._stderr.close()
        for fd in (self.master_fd, self._slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _spawn(self, *, scbk: bytes | None, install_mode: bool, plaintext: bool) -> None:
        command = [sys.executable, "-m", "sekisho.firmware_stubs.osdp_reader", "--device", self.slave_path]
        command += ["--address", str(self.address)]
        if plaintext:
            command.append("--plaintext")
        if scbk is not None:
            command += ["--scbk", scbk.hex()]
        if install_mode:
            command.append("--install-mode")
        env = dict(os.environ)
        # Run this very source tree's stub, whatever is installed.
        source_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr if self._stderr is not None else subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        self._reports: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_reports, name="osdp-stub-reports", daemon=True)
        self._reader.start()
        try:
            self._wait_for(lambda report: "ready" in report, self._ready_timeout, "the stub to start")
        except BaseException:
            self.close()
            raise

    def _end_process(self) -> None:
        if getattr(self, "_process", None) is None:
            return  # Popen itself failed
        if self._process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._process.stdin.write('{"quit": true}\n')  # type: ignore[union-attr]
                self._process.stdin.flush()  # type: ignore[union-attr]
            try:
                self._process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            self._process.stdin.close()  # type: ignore[union-attr]
        self._reader.join(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            self._process.stdout.close()  # type: ignore[union-attr]

    def _send(self, request: dict[str, Any]) -> None:
        if self._closed or self._process.stdin is None:
            raise RuntimeError("the reader stub is closed")
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()

    def _process_alive(self) -> bool:
        return self._process.poll() is None

    def _read_reports(self) -> None:
        follow_reports(self._process.stdout, self._reports, self._changed)

    def _wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str, *, latest_status: bool = False
    ) -> None:
        def view() -> list[dict[str, Any]]:
            if latest_status:
                return [report for report in self._reports if "status" in report][-1:]
            return self._reports

        wait_for_report(self._changed, view, predicate, timeout=timeout, what=what, alive=self._process_alive)


if __name__ == "__main__":
    sys.exit(main())
