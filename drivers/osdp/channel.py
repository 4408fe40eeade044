"""Byte channels libosdp talks through: a serial device opened by path, an open file descriptor, or any Channel.

libosdp calls ``read``/``write``/``flush`` from inside its refresh and cannot cope with a Python exception
there (the C callback returns -1 with the exception still set), so these never raise: an I/O error is logged
once, reads give no bytes and writes send none until the line works again. Each channel also remembers when
it last received a byte and whether the other end has hung up (so the link stops selecting on a descriptor
that is always "readable"), and hands a copy of every byte received and sent to the link's frame scanners
(``watch``): a byte is no sign of life, a whole reply is (``frames.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import termios
import time
import tty
from collections.abc import Callable
from typing import Any

import serial
from osdp import Channel

from sekisho.drivers.osdp.errors import LinkUnavailable

_LOG = logging.getLogger(__name__)

DEFAULT_BAUD_RATE = 115200


class TrackedChannel(Channel):  # type: ignore[misc]  # libosdp ships no type information
    """A libosdp Channel that never raises, notes the time of the last received byte and line hang-ups."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.last_rx = time.monotonic()
        self.hung_up = False
        # Counts read() calls, so the link can tell whether libosdp is reading the line at all.
        self.read_calls = 0
        self._failing = False
        self._on_rx: Callable[[bytes], None] | None = None
        self._on_tx: Callable[[bytes], None] | None = None

    def watch(self, on_rx: Callable[[bytes], None] | None, on_tx: Callable[[bytes], None] | None) -> None:
        """Pass a copy of every chunk received and sent to these callbacks (None: stop); they must not raise."""
        self._on_rx, self._on_tx = on_rx, on_tx

    def fileno(self) -> int | None:
        """Return a descriptor that becomes readable when bytes arrive, or None if there is none to wait on."""
        return None

    def read(self, max_bytes: int) -> bytes:
        """Return at most ``max_bytes`` received bytes, or none; never blocks, never raises."""
        self.read_calls += 1
        try:
            data = self._read(max_bytes)
        except Exception as err:
            self._failed("read", err)
            return b""
        data = data[:max_bytes]
        if data:
            self.last_rx = time.monotonic()
            self.hung_up = False
            self._recovered()
            on_rx = self._on_rx
            if on_rx is not None:
                on_rx(data)
        return data

    def write(self, buf: bytes) -> int:
        """Send as much of ``buf`` as the line takes now; return how many bytes went out."""
        data = bytes(buf)
        try:
            sent = self._write(data)
        except Exception as err:
            self._failed("write", err)
            return 0
        self._recovered()
        on_tx = self._on_tx
        if on_tx is not None and sent > 0:
            on_tx(data[:sent])
        return sent

    def flush(self) -> None:
        """Discard bytes received but not yet read (libosdp asks for it before resending a command)."""
        try:
            self._flush()
        except Exception as err:
            self._failed("flush", err)

    def close(self) -> None:
        """Release what this channel opened; idempotent."""

    def _read(self, max_bytes: int) -> bytes:
        raise NotImplementedError

    def _write(self, buf: bytes) -> int:
        raise NotImplementedError

    def _flush(self) -> None:
        while self._read(4096):
            pass

    def _failed(self, operation: str, err: Exception) -> None:
        # Log a failure once, and its recovery once: a dead line fails on every 5-10 ms refresh.
        if not self._failing:
            self._failing = True
            _LOG.warning("OSDP line %s: %s failed: %s", self.name, operation, err)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            _LOG.info("OSDP line %s works again", self.name)


class FdChannel(TrackedChannel):
    """An OSDP channel on an open file descriptor (a pty master in tests and the demo); the caller owns the fd."""

    def __init__(self, fd: int, *, raw: bool = True, name: str | None = None) -> None:
        super().__init__(name or f"fd {fd}")
        self._fd = fd
        os.set_blocking(fd, False)
        if raw and os.isatty(fd):
            # Without raw mode a pty echoes what the control panel writes and eats bytes as line editing.
            tty.setraw(fd, termios.TCSANOW)

    def fileno(self) -> int | None:
        """Return the descriptor."""
        return self._fd

    def _read(self, max_bytes: int) -> bytes:
        try:
            data = os.read(self._fd, max_bytes)
        except BlockingIOError:
            return b""
        except OSError as err:
            if err.errno == errno.EIO:
                # A pty master reads EIO while no process holds the slave open: not an error, no reader yet.
                self.hung_up = True
                return b""
            raise
        if not data:
            self.hung_up = True
        return data

    def _write(self, buf: bytes) -> int:
        try:
            return os.write(self._fd, buf)
        except BlockingIOError:
            return 0


class SerialChannel(FdChannel):
    """An OSDP channel on a serial device path (RS-485 adapter, tty or pty slave), 8N1, non-blocking."""

    def __init__(self, device: str, *, baud_rate: int = DEFAULT_BAUD_RATE) -> None:
        try:
            # pyserial sets the line up (speed, 8N1, raw, exclusive lock); the I/O itself is plain non-blocking
            # os.read/os.write on its descriptor, because pyserial's write with write_timeout=0 spins on EAGAIN.
            self._serial: Any = serial.Serial(
                device,
                baudrate=baud_rate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, OSError) as err:
            code = getattr(err, "errno", None)
            raise LinkUnavailable(f"cannot open OSDP line {device}: {err}", errno=code) from err
        super().__init__(self._serial.fileno(), raw=False, name=device)

    def _flush(self) -> None:
        self._serial.reset_input_buffer()

    def close(self) -> None:
        """Close the device; idempotent."""
        self._serial.close()


class ForeignChannel(TrackedChannel):
    """Wraps a libosdp Channel built elsewhere so that it is tracked and cannot raise into libosdp."""

    def __init__(self, inner: Any) -> None:
        super().__init__(type(inner).__name__)
        self._inner = inner

    def fileno(self) -> int | None:
        """Return the wrapped channel's descriptor if it has one."""
        fileno = getattr(self._inner, "fileno", None)
        if fileno is None:
            return None
        try:
            fd = fileno()
        except Exception:
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None

    def _read(self, max_bytes: int) -> bytes:
        return bytes(self._inner.read(max_bytes) or b"")

    def _write(self, buf: bytes) -> int:
        return int(self._inner.write(buf) or 0)

    def _flush(self) -> None:
        self._inner.flush()
