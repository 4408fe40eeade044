"""The byte line to a locker board: a serial device opened by path (pyserial), an open descriptor, or a Serial object.

Reads wait with ``select`` on the descriptor so the reader thread wakes on the first byte; writes are
non-blocking with a deadline, so a board that stopped reading (a full pty or UART buffer) makes a command
fail instead of hanging the caller. Every failure is raised as ``BoardUnavailable`` keeping the errno.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import select
import time
from typing import Any

import serial

from sekisho.drivers.locker.errors import BoardUnavailable
from sekisho.drivers.locker.protocol import BAUD_RATE

LineTarget = str | os.PathLike[str] | int | serial.SerialBase

_WRITE_DEADLINE_S = 0.5
_READ_CHUNK = 4096


class Line:
    """One open line; ``reopen`` works only for lines opened by path (a passed-in descriptor is the caller's)."""

    def __init__(self, target: LineTarget, *, baud_rate: int = BAUD_RATE) -> None:
        self._target = target
        self._baud_rate = baud_rate
        self._serial: serial.SerialBase | None = None
        self._fd: int | None = None
        self._open()

    @property
    def name(self) -> str:
        """Return a printable name of the line."""
        if isinstance(self._target, int):
            return f"fd {self._target}"
        if isinstance(self._target, serial.SerialBase):
            return str(self._target.port or "serial object")
        return os.fspath(self._target)

    @property
    def reopenable(self) -> bool:
        """Return whether ``reopen`` can open the device again (only for a path)."""
        return isinstance(self._target, str | os.PathLike)

    def _open(self) -> None:
        target = self._target
        if isinstance(target, int):
            try:
                os.set_blocking(target, False)
            except OSError as err:
                raise BoardUnavailable(f"line fd {target}: {err.strerror}", errno=err.errno) from err
            self._fd = target
            return
        if isinstance(target, serial.SerialBase):
            self._serial = target
            self._fd = _fileno(target)
            if self._fd is None:
                # A serial object with no descriptor (pyserial URL handlers): poll it with a short timeout.
                target.timeout = 0.02
                target.write_timeout = _WRITE_DEADLINE_S
            return
        path = os.fspath(target)
        try:
            # exclusive: a second process driving the same lock board would fight over its relays.
            port = serial.Serial(path, baudrate=self._baud_rate, timeout=0, write_timeout=0, exclusive=True)
        except serial.SerialException as err:
            code = getattr(err, "errno", None)
            reason = "permission_denied" if code == errno_codes.EACCES else "unavailable"
            raise BoardUnavailable(f"cannot open {path}: {err}", reason=reason, errno=code) from err
        self._serial = port
        self._fd = _fileno(port)

    def reopen(self) -> None:
        """Close and open the device again (a USB serial adapter that was re-plugged)."""
        self.close()
        self._open()

    def fileno(self) -> int | None:
        """Return the descriptor to wait on, if there is one."""
        return self._fd

    def read(self, timeout: float) -> bytes:
        """Wait up to ``timeout`` seconds for bytes; return what arrived (b"" if nothing did)."""
        fd = self._fd
        try:
            if fd is None:
                if self._serial is None:
                    raise BoardUnavailable("line is closed")
                return bytes(self._serial.read(max(1, int(getattr(self._serial, "in_waiting", 0)))))
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return b""
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return b""
        except (OSError, ValueError, serial.SerialException) as err:
            raise _unavailable("read", err) from err
        if not data:
            # Readable with no bytes: the other end hung up (a pty whose slave closed, an unplugged adapter).
            raise BoardUnavailable("line hung up", reason="hung_up")
        return data

    def write(self, data: bytes) -> None:
        """Send every byte of ``data`` within the write deadline or raise BoardUnavailable."""
        fd = self._fd
        try:
            if fd is None:
                if self._serial is None:
                    raise BoardUnavailable("line is closed")
                self._serial.write(data)
                return
            deadline = time.monotonic() + _WRITE_DEADLINE_S
            view = memoryview(data)
            while view:
                try:
                    sent = os.write(fd, view)
                except BlockingIOError:
                    sent = 0
                view = view[sent:]
                if view:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BoardUnavailable("line write blocked: the board is not reading", reason="blocked")
                    select.select([], [fd], [], left)
        except (OSError, ValueError, serial.SerialException) as err:
            raise _unavailable("write", err) from err

    def close(self) -> None:
        """Close what this line opened; a descriptor passed in by the caller stays open. Idempotent."""
        if self._serial is not None and not isinstance(self._target, serial.SerialBase):
            with contextlib.suppress(Exception):
                self._serial.close()
        self._serial = None
        self._fd = None


def _fileno(port: Any) -> int | None:
    try:
        fd = port.fileno()
    except (AttributeError, NotImplementedError, ValueError, OSError, serial.SerialException):
        return None
    return fd if isinstance(fd, int) else None


def _unavailable(what: str, err: BaseException) -> BoardUnavailable:
    code = getattr(err, "errno", None)
    return BoardUnavailable(f"line {what} failed: {err}", errno=code if isinstance(code, int) else None)
