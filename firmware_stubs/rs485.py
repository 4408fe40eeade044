"""An RS-485 multi-drop line between pseudo-terminals: one control panel, several reader stubs on one pair.

OSDP readers share a line by address: every reader hears every command and answers only its own, and the
control panel hears every reply. ``Rs485Line`` gives the control panel a pty of its own (``master_fd``, for
``OsdpReaderLink``) and copies bytes between it and the stubs' ptys (``StubReaderProcess.master_fd``): what a
stub sends reaches the control panel as it is (noise included), and each command reaches the stub it is
addressed to (or every stub, if broadcast).

Why commands are sorted by address instead of copied to every stub: libosdp's peripheral (3.2.9) drops a
command for itself that it reads in the same chunk as a command for another address (the control panel
sends the next reader's poll a fraction of a millisecond after the last reply, so this happens within
seconds); it would show as a reader that misses a poll now and then, a fault of the stub, not of the line
or of the control panel. No timing and no collisions are modelled: the control panel talks to one reader at
a time, as OSDP requires.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import tty
from collections.abc import Mapping

_SOM = 0x53
_MARK = 0xFF
_BROADCAST = 0x7F
_MAX_PACKET = 1440


class Rs485Line:
    """A line joining a control panel to reader stubs by address; ``master_fd`` is the control panel's end."""

    def __init__(self, drops: Mapping[int, int]) -> None:
        """``drops`` maps each reader's OSDP address to its stub's pty master descriptor."""
        if not drops:
            raise ValueError("a line needs at least one reader")
        self._drops = dict(drops)
        self.master_fd, self._panel = os.openpty()
        for fd in (self.master_fd, self._panel):
            tty.setraw(fd, termios.TCSANOW)
        self._pending = bytearray()  # command bytes from the panel not yet a whole packet
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="rs485-line", daemon=True)
        self._thread.start()

    def __enter__(self) -> Rs485Line:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop copying and close the control panel's pty; idempotent (the stubs close their own)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        self._thread.join(timeout=5)
        for fd in (self.master_fd, self._panel, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        sources = [self._panel, *self._drops.values(), self._wake_r]
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(sources, [], [], 0.5)
            except (OSError, ValueError):
                return  # a pty closed under us: the line is being taken down
            for fd in ready:
                if fd == self._wake_r:
                    continue
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue  # EIO while a stub restarts on its pty
                if fd == self._panel:
                    self._commands(data)
                else:
                    self._send(self._panel, data)

    def _commands(self, data: bytes) -> None:
        buffer = self._pending
        buffer += data
        while True:
            start = buffer.find(_SOM)
            if start < 0:
                buffer.clear()
                return
            if start > 0:
                # Keep the mark byte that may precede the start of a packet; drop anything else.
                keep = start - 1 if buffer[start - 1] == _MARK else start
                del buffer[:keep]
                start -= keep
            if len(buffer) < start + 4:
                return
            length = buffer[start + 2] | buffer[start + 3] << 8
            if not 7 <= length <= _MAX_PACKET:
                del buffer[: start + 1]
                continue
            if len(buffer) < start + length:
                return
            packet = bytes(buffer[: start + length])
            del buffer[: start + length]
            address = packet[start + 1] & 0x7F
            for drop_address, fd in self._drops.items():
                if address in (drop_address, _BROADCAST):
                    self._send(fd, packet)

    @staticmethod
    def _send(fd: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, data)
