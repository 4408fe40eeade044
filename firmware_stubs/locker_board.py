"""A locker board firmware stand-in: lock relays with feedback contacts, door sensors, key slots and a tamper switch.

Run it as ``python -m sekisho.firmware_stubs.locker_board --device /dev/pts/N --relays 4 --doors 4 --key-slots 8``.
It opens ``--device`` (the slave side of a pty in tests and the demo; the host holds the master side) in
raw mode, or uses an inherited descriptor given as ``--fd N``, and speaks docs/locker-board-protocol.md.
The framing and payloads are written here again from the document, independently of ``drivers/locker``,
so that a shared misreading of the protocol cannot make the tests pass.

Like real firmware it enforces ``max_on_ms`` itself (a relay is released when its timer runs out, whether
the host is still there or not), starts with every relay off and says so in a BOOT frame, answers a
repeated command (same sequence number and bytes) with the same reply without acting twice, and moves a
relay's feedback contact ``--settle-ms`` after its coil unless the relay is stuck.

Control: JSON lines on stdin, one object per line; an optional "id" is echoed in the answer. Commands:

    {"door": 1, "open": true}                        a door opens (false: closes)
    {"key_slot": 3, "present": false}                a key is taken (true: returned)
    {"tamper": true}                                 the enclosure is opened (false: closed)
    {"fault": "stuck_relay", "relay": 2}             the relay's contacts weld where they are ("stuck": false
                                                     repairs it)
    {"fault": "bounce", "door": 1, "times": 5}       the door sensor flips state ``times`` times, "interval_ms"
                                                     apart (default 2): sensor chatter
    {"fault": "power_loss", "seconds": 1}            power cut: every coil drops, the board is silent (input
                                                     is lost), then it boots: relays off, BOOT frame
    {"fault": "silence", "seconds": 1}               the line goes dead (cable cut): the board keeps working
                                                     (timers run), but nothing is read or sent
    {"fault": "deaf", "frames": 2}                   the next N frames from the host are lost
    {"fault": "garbage", "bytes": 64}                random bytes on the line now (they start like a frame)
    {"state": true}                                  answer with the board's whole state
    {"quit": true}                                   stop and exit (end of stdin does the same)

Each command is answered with ``{"ack": "<what>"}`` or ``{"error": "..."}``. Reports: ``{"ready": true}``
once the line is open; ``{"relay": N, "on": b, "cause": "command|max_on|power_loss"}`` for every change
of a coil; ``{"power": false}`` and ``{"boot": N}`` around a power cut.

``StubBoardProcess`` runs this module as a subprocess on a fresh pty pair for tests, benchmarks and the demo.
"""

from __future__ import annotations

import argparse
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
from typing import Any, Literal, NamedTuple

from sekisho.firmware_stubs.reports import follow_reports, wait_for_report

Report = Callable[[dict[str, Any]], None]

# ---- the wire, from docs/locker-board-protocol.md ----

_STX, _DLE, _XOR = 0x02, 0x10, 0x20
_MAX_PAYLOAD = 96
_VERSION = 1
_HELLO, _STATUS, _SET_RELAY, _PING = 0x01, 0x02, 0x03, 0x04
_ACK, _NAK, _INFO, _STATUS_REPLY = 0x80, 0x81, 0x82, 0x83
_INPUT_CHANGED, _RELAY_EXPIRED, _BOOT = 0x90, 0x91, 0x9F
_DOOR, _KEY_SLOT, _TAMPER, _FEEDBACK = 1, 2, 3, 4
_NAK_BAD_INDEX, _NAK_BAD_LENGTH, _NAK_UNKNOWN, _NAK_BAD_VALUE, _NAK_VERSION = 1, 2, 3, 4, 5
_MAX_ON_LIMIT_MS = 3_600_000
_FIRMWARE = "sekisho-stub-locker 1.0"


def _crc(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _frame(seq: int, cmd: int, payload: bytes = b"") -> bytes:
    body = bytes([len(payload), seq, cmd]) + payload
    body += _crc(body).to_bytes(2, "big")
    out = bytearray([_STX])
    for byte in body:
        out += bytes([_DLE, byte ^ _XOR]) if byte in (_STX, _DLE) else bytes([byte])
    return bytes(out)


def _bits(values: list[bool]) -> bytes:
    out = bytearray((len(values) + 7) // 8)
    for index, value in enumerate(values):
        out[index // 8] |= (1 << (index % 8)) if value else 0
    return bytes(out)


class _Unstuffer:
    """Host frames out of the byte stream: whole bodies (LEN SEQ CMD PAYLOAD) whose CRC checks out."""

    def __init__(self) -> None:
        self.body: bytearray | None = None
        self.escaped = False

    def feed(self, data: bytes) -> list[bytes]:
        bodies: list[bytes] = []
        for byte in data:
            if byte == _STX:
                self.body, self.escaped = bytearray(), False
                continue
            if self.body is None:
                continue  # noise between frames: real firmware ignores it
            if self.escaped:
                self.escaped = False
                if byte not in (_STX ^ _XOR, _DLE ^ _XOR):
                    self.body = None
                    continue
                byte ^= _XOR
            elif byte == _DLE:
                self.escaped = True
                continue
            self.body.append(byte)
            if self.body[0] > _MAX_PAYLOAD:
                self.body = None
            elif len(self.body) == 5 + self.body[0]:
                body, self.body = bytes(self.body), None
                if _crc(body[:-2]) == int.from_bytes(body[-2:], "big"):
                    bodies.append(body[:-2])
        return bodies


# ---- the board ----


class _Board:
    """The board's logic; ``tick`` runs its timers, ``on_line`` its command handling."""

    def __init__(
        self, fd: int, relays: int, doors: int, key_slots: int, boot_count: int, settle_s: float, report: Report
    ) -> None:
        self.fd = fd
        self.report = report
        self.settle_s = settle_s
        self.coils = [False] * relays
        self.contacts = [False] * relays
        self.stuck: set[int] = set()
        self.doors = [False] * doors
        self.keys = [True] * key_slots  # a key cabinet starts full
        self.tamper = False
        self.boot_count = boot_count
        self.event_seq = 0
        self.max_on: dict[int, float] = {}
        self.contact_due: dict[int, float] = {}
        self.bounces: list[tuple[float, int]] = []
        self.powered = True
        self.power_back: float | None = None
        self.silent_until = 0.0
        self.deaf_frames = 0
        self.unstuffer = _Unstuffer()
        self.last: tuple[bytes, bytes] | None = None  # (request body, reply frame) for repeated commands

    # -- line --

    def send(self, frame: bytes) -> None:
        if not self.powered or time.monotonic() < self.silent_until:
            return
        # A UART without flow control: bytes the host does not take are lost, never waited for.
        with contextlib.suppress(OSError):
            os.write(self.fd, frame)

    def boot(self) -> None:
        self.powered, self.power_back = True, None
        self.coils = [False] * len(self.coils)
        self.contacts = [c if i in self.stuck else False for i, c in enumerate(self.contacts)]
        self.max_on.clear()
        self.contact_due.clear()
        self.event_seq = 0
        self.last = None
        self.unstuffer = _Unstuffer()
        self.send(_frame(0, _BOOT, self._info()))
        self.report({"boot": self.boot_count})

    def _info(self) -> bytes:
        head = bytes([_VERSION, len(self.coils), len(self.doors), len(self.keys)])
        return head + self.boot_count.to_bytes(4, "big") + _FIRMWARE.encode()

    def _status(self) -> bytes:
        head = bytes([len(self.coils), len(self.doors), len(self.keys), 1 if self.tamper else 0])
        head += self.boot_count.to_bytes(4, "big") + bytes([self.event_seq])
        return head + _bits(self.coils) + _bits(self.contacts) + _bits(self.doors) + _bits(self.keys)

    def emit(self, cmd: int, payload: bytes) -> None:
        """Send an unsolicited report with the next report sequence number."""
        if not self.powered:
            return
        self.event_seq = (self.event_seq + 1) & 0xFF
        self.send(_frame(self.event_seq, cmd, payload))

    def on_line(self, data: bytes) -> None:
        if not self.powered or time.monotonic() < self.silent_until:
            return  # no power, or a cut cable: the bytes never arrive
        for body in self.unstuffer.feed(data):
            if self.deaf_frames:
                self.deaf_frames -= 1
                continue
            if self.last is not None and self.last[0] == body:
                self.send(self.last[1])  # the host missed our reply and asks again: same answer, no action
                continue
            seq, cmd, payload = body[1], body[2], body[3:]
            if cmd >= 0x80:
                continue  # a board-to-host code: not meant for us
            reply = _frame(seq, *self.handle(cmd, payload))
            self.last = (body, reply)
            self.send(reply)

    def handle(self, cmd: int, payload: bytes) -> tuple[int, bytes]:
        if cmd == _HELLO:
            if len(payload) != 1:
                return _NAK, bytes([_NAK_BAD_LENGTH])
            if payload[0] != _VERSION:
                return _NAK, bytes([_NAK_VERSION])
            return _INFO, self._info()
        if cmd == _STATUS:
            return (_STATUS_REPLY, self._status()) if not payload else (_NAK, bytes([_NAK_BAD_LENGTH]))
        if cmd == _PING:
            return (_ACK, b"") if not payload else (_NAK, bytes([_NAK_BAD_LENGTH]))
        if cmd == _SET_RELAY:
            if len(payload) != 6:
                return _NAK, bytes([_NAK_BAD_LENGTH])
            index, state, max_on_ms = payload[0], payload[1], int.from_bytes(payload[2:6], "big")
            if index >= len(self.coils):
                return _NAK, bytes([_NAK_BAD_INDEX])
            if state > 1 or max_on_ms > _MAX_ON_LIMIT_MS:
                return _NAK, bytes([_NAK_BAD_VALUE])
            self.drive(index, bool(state), "command")
            if state and max_on_ms:
                self.max_on[index] = time.monotonic() + max_on_ms / 1000
            else:
                self.max_on.pop(index, None)
            return _ACK, b""
        return _NAK, bytes([_NAK_UNKNOWN])

    # -- hardware --

    def drive(self, index: int, on: bool, cause: str) -> None:
        if self.coils[index] != on:
            self.coils[index] = on
            self.report({"relay": index, "on": on, "cause": cause})
        if index not in self.stuck:
            self.contact_due[index] = time.monotonic() + self.settle_s

    def set_input(self, code: int, index: int, active: bool) -> None:
        values = self.doors if code == _DOOR else self.keys
        if code == _TAMPER:
            changed, self.tamper = self.tamper != active, active
        else:
            changed, values[index] = values[index] != active, active
        if changed:
            self.emit(_INPUT_CHANGED, bytes([code, index, 1 if active else 0]))

    def power_loss(self, seconds: float) -> None:
        for index, on in enumerate(self.coils):
            if on:
                self.drive(index, False, "power_loss")
        self.report({"power": False})
        self.powered = False
        self.power_back = time.monotonic() + seconds
        self.max_on.clear()
        for index in self.contact_due:
            self.contacts[index] = self.coils[index]
        self.contact_due.clear()

    def garbage(self, count: int) -> None:
        # Starts like a frame (STX and a plausible length) so the host has to throw a frame away, not just bytes.
        noise = (bytes([_STX, random.randint(1, 20)]) + random.randbytes(max(count - 2, 0)))[: max(count, 1)]
        if self.powered:
            with contextlib.suppress(OSError):
                os.write(self.fd, noise)

    def next_timer(self) -> float | None:
        times = [*self.max_on.values(), *self.contact_due.values(), *(when for when, _ in self.bounces)]
        if self.power_back is not None:
            times.append(self.power_back)
        return min(times) if times else None

    def tick(self) -> None:
        now = time.monotonic()
        if self.power_back is not None and now >= self.power_back:
            self.boot_count += 1
            self.boot()
        for index, deadline in list(self.max_on.items()):
            if deadline <= now:
                del self.max_on[index]
                self.drive(index, False, "max_on")
                self.emit(_RELAY_EXPIRED, bytes([index]))
        for index, deadline in list(self.contact_due.items()):
            if deadline <= now:
                del self.contact_due[index]
                if index not in self.stuck and self.contacts[index] != self.coils[index]:
                    self.contacts[index] = self.coils[index]
                    self.emit(_INPUT_CHANGED, bytes([_FEEDBACK, index, 1 if self.coils[index] else 0]))
        due = [(when, door) for when, door in self.bounces if when <= now]
        self.bounces = [(when, door) for when, door in self.bounces if when > now]
        for _, door in sorted(due):
            self.set_input(_DOOR, door, not self.doors[door])

    def state(self) -> dict[str, Any]:
        return {
            "coils": self.coils,
            "contacts": self.contacts,
            "stuck": sorted(self.stuck),
            "doors": self.doors,
            "keys": self.keys,
            "tamper": self.tamper,
            "boot_count": self.boot_count,
            "powered": self.powered,
            "event_seq": self.event_seq,
        }


def _index(request: dict[str, Any], key: str, size: int) -> int:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{key} must be an integer in 0..{size - 1}")
    return value


def _control(board: _Board, request: dict[str, Any]) -> dict[str, Any]:
    if "door" in request and "fault" not in request:
        board.set_input(_DOOR, _index(request, "door", len(board.doors)), bool(request.get("open", True)))
        return {"ack": "door"}
    if "key_slot" in request:
        board.set_input(_KEY_SLOT, _index(request, "key_slot", len(board.keys)), bool(request.get("present", True)))
        return {"ack": "key_slot"}
    if "tamper" in request:
        board.set_input(_TAMPER, 0, bool(request["tamper"]))
        return {"ack": "tamper"}
    if "state" in request:
        return {"ack": "state", "state": board.state()}
    fault = request.get("fault")
    if fault == "stuck_relay":
        index = _index(request, "relay", len(board.coils))
        if request.get("stuck", True):
            board.stuck.add(index)
            board.contact_due.pop(index, None)
        else:
            board.stuck.discard(index)
            board.contact_due[index] = time.monotonic()
    elif fault == "bounce":
        door = _index(request, "door", len(board.doors))
        interval = float(request.get("interval_ms", 2)) / 1000
        start = time.monotonic()
        board.bounces += [(start + step * interval, door) for step in range(1, int(request.get("times", 5)) + 1)]
    elif fault == "power_loss":
        board.power_loss(float(request.get("seconds", 1)))
    elif fault == "silence":
        board.silent_until = time.monotonic() + float(request.get("seconds", 1))
    elif fault == "deaf":
        board.deaf_frames += int(request.get("frames", 1))
    elif fault == "garbage":
        board.garbage(int(request.get("bytes", 64)))
    else:
        return {"error": "unknown command"}
    return {"ack": "fault"}


class _Reporter:
    """JSON lines to stdout, one per report."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __call__(self, report: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(json.dumps(report) + "\n")
            self._stream.flush()


def _open_line(device: str | None, fd: int | None) -> int:
    line = fd if fd is not None else os.open(device or "", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    os.set_blocking(line, False)
    tty.setraw(line, termios.TCSANOW)
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the board until {"quit": true} or the end of stdin."""
    parser = argparse.ArgumentParser(
        prog="python -m sekisho.firmware_stubs.locker_board", description=__doc__.split("\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="serial device or pty slave path")
    where.add_argument("--fd", type=int, help="an inherited, already open descriptor of the line")
    parser.add_argument("--relays", type=int, default=4)
    parser.add_argument("--doors", type=int, default=4)
    parser.add_argument("--key-slots", type=int, default=8)
    parser.add_argument("--boot-count", type=int, default=1, help="the boot counter at start")
    parser.add_argument("--settle-ms", type=float, default=10.0, help="feedback contact delay after the coil")
    args = parser.parse_args(argv)
    for name in ("relays", "doors", "key_slots"):
        if not 0 <= getattr(args, name) <= 255:
            parser.error(f"--{name.replace('_', '-')} must be in 0..255")

    report = _Reporter(sys.stdout)
    fd = _open_line(args.device, args.fd)
    board = _Board(fd, args.relays, args.doors, args.key_slots, args.boot_count, args.settle_ms / 1000, report)
    board.boot()
    report({"ready": True, "relays": args.relays, "doors": args.doors, "key_slots": args.key_slots})
    stdin = sys.stdin.fileno()
    pending = b""
    try:
        while True:
            deadline = board.next_timer()
            wait = 0.5 if deadline is None else min(max(deadline - time.monotonic(), 0.0), 0.5)
            ready, _, _ = select.select([fd, stdin], [], [], wait)
            if fd in ready:
                try:
                    board.on_line(os.read(fd, 4096))
                except BlockingIOError:
                    pass
                except OSError:
                    time.sleep(0.05)  # the host side is closed: wait for it (or for quit)
            if stdin in ready:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if _run_controls(board, report, lines):
                    break
            board.tick()
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return 0


def _run_controls(board: _Board, report: Report, lines: list[bytes]) -> bool:
    """Carry out control lines; return True on quit."""
    for text in lines:
        if not text.strip():
            continue
        answer: dict[str, Any]
        request: Any = None
        try:
            request = json.loads(text)
            if not isinstance(request, dict):
                raise ValueError("a command is a JSON object")
            if request.get("quit"):
                return True
            answer = _control(board, request)
        except (ValueError, TypeError, KeyError) as err:
            answer = {"error": str(err)}
        if isinstance(request, dict) and "id" in request:
            answer["id"] = request["id"]
        report(answer)
    return False


# ---- the stub as a subprocess, for tests, benchmarks and the demo ----


class RelayChange(NamedTuple):
    """A coil change the stub applied: ``cause`` is ``command``, ``max_on`` or ``power_loss``."""

    relay: int
    on: bool
    cause: str


class StubBoardProcess:
    """The board stub as a subprocess on a fresh pty pair; ``host`` is what to give ``LockerBoardLink``.

    ``host_end="master"`` (default): the stub opens the slave path, ``host`` is the master descriptor.
    ``host_end="slave"``: the stub inherits the master descriptor, ``host`` is the slave path (the link opens
    it with pyserial, as it would a real device). This object keeps both ends open until ``close``, so neither
    side reads EIO while the stub starts, reboots or stops.
    """

    def __init__(
        self,
        *,
        relays: int = 4,
        doors: int = 4,
        key_slots: int = 8,
        boot_count: int = 1,
        settle_ms: float = 10.0,
        host_end: Literal["master", "slave"] = "master",
        stderr_path: str | os.PathLike[str] | None = None,
        ready_timeout: float = 10.0,
        control_timeout: float = 5.0,
    ) -> None:
        self.relays, self.doors, self.key_slots = relays, doors, key_slots
        self.master_fd, self._slave_fd = os.openpty()
        for fd in (self.master_fd, self._slave_fd):
            tty.setraw(fd, termios.TCSANOW)
        self.slave_path = os.ttyname(self._slave_fd)
        self.host: int | str = self.master_fd if host_end == "master" else self.slave_path
        self._control_timeout = control_timeout
        self._reports: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._next_id = 0
        self._closed = False
        self._stderr = open(stderr_path, "ab") if stderr_path is not None else None  # noqa: SIM115
        command = [sys.executable, "-m", "sekisho.firmware_stubs.locker_board"]
        command += ["--fd", str(self.master_fd)] if host_end == "slave" else ["--device", self.slave_path]
        command += ["--relays", str(relays), "--doors", str(doors), "--key-slots", str(key_slots)]
        command += ["--boot-count", str(boot_count), "--settle-ms", str(settle_ms)]
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
            pass_fds=(self.master_fd,) if host_end == "slave" else (),
        )
        self._reader = threading.Thread(target=self._read_reports, name="locker-stub-reports", daemon=True)
        self._reader.start()
        try:
            self._wait_for(lambda report: "ready" in report, ready_timeout, "the stub to start")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> StubBoardProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """Return the stub process's id."""
        return self._process.pid

    # -- inputs --

    def open_door(self, index: int) -> None:
        """Open a door."""
        self.control({"door": index, "open": True})

    def close_door(self, index: int) -> None:
        """Close a door."""
        self.control({"door": index, "open": False})

    def take_key(self, slot: int) -> None:
        """Take the key out of a slot."""
        self.control({"key_slot": slot, "present": False})

    def return_key(self, slot: int) -> None:
        """Put the key back into a slot."""
        self.control({"key_slot": slot, "present": True})

    def tamper(self, on: bool) -> None:
        """Open (True) or close (False) the enclosure."""
        self.control({"tamper": on})

    # -- faults --

    def fault(self, kind: str, **fields: Any) -> None:
        """Inject a fault (``stuck_relay``, ``bounce``, ``power_loss``, ``silence``, ``deaf``, ``garbage``)."""
        self.control({"fault": kind, **fields})

    def stick_relay(self, index: int, stuck: bool = True) -> None:
        """Weld a relay's contacts where they are (``stuck=False`` repairs it)."""
        self.fault("stuck_relay", relay=index, stuck=stuck)

    def power_cycle(self, seconds: float = 1.0) -> None:
        """Cut the power for ``seconds``; the board then boots with every relay off."""
        self.fault("power_loss", seconds=seconds)

    def state(self) -> dict[str, Any]:
        """Return the board's whole state as the stub sees it (coils, contacts, inputs, boot counter)."""
        return dict(self.control({"state": True})["state"])

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one control command and wait for its answer; raise RuntimeError if the stub refuses it."""
        with self._changed:
            self._next_id += 1
            ident = self._next_id
        self._send({**request, "id": ident})
        answer: dict[str, Any] = {}

        def answered(report: dict[str, Any]) -> bool:
            if report.get("id") == ident:
                answer.update(report)
                return True
            return False

        self._wait_for(answered, self._control_timeout, f"the stub to answer {request}")
        if "error" in answer:
            raise RuntimeError(f"the stub refused {request}: {answer['error']}")
        return answer

    # -- what the board did --

    def relay_log(self) -> list[RelayChange]:
        """Return every coil change the stub applied, oldest first."""
        with self._changed:
            return [RelayChange(r["relay"], r["on"], r["cause"]) for r in self._reports if "relay" in r and "on" in r]

    def wait_relay(
        self, relay: int, on: bool, *, cause: str | None = None, after: int = 0, timeout: float = 5.0
    ) -> RelayChange:
        """Wait for a change of ``relay`` to ``on`` (``cause`` if given) past ``relay_log()[:after]``; return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for change in self.relay_log()[after:]:
                    if change.relay == relay and change.on == on and cause in (None, change.cause):
                        return change
                left = deadline - time.monotonic()
                if left <= 0 or self._process.poll() is not None:
                    raise TimeoutError(f"timed out waiting for relay {relay} {'on' if on else 'off'}")
                self._changed.wait(left)

    def wait_boot(self, boot_count: int, timeout: float = 5.0) -> None:
        """Wait until the stub has booted with ``boot_count``."""
        self._wait_for(lambda report: report.get("boot") == boot_count, timeout, f"boot {boot_count}")

    def close(self) -> None:
        """Stop the stub (politely, then by force) and close the pty; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._process.stdin.write(b'{"quit": true}\n')  # type: ignore[union-attr]
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
        if self._stderr is not None:
            self._stderr.close()
        for fd in (self.master_fd, self._slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _send(self, request: dict[str, Any]) -> None:
        if self._closed or self._process.stdin is None:
            raise RuntimeError("the board stub is closed")
        self._process.stdin.write((json.dumps(request) + "\n").encode())
        self._process.stdin.flush()

    def _read_reports(self) -> None:
        follow_reports(self._process.stdout, self._reports, self._changed)

    def _wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> None:
        wait_for_report(
            self._changed,
            lambda: self._reports,
            predicate,
            timeout=timeout,
            what=what,
            alive=lambda: self._process.poll() is None,
        )


if __name__ == "__main__":
    sys.exit(main())
