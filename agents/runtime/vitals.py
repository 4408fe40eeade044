"""What an agent knows about its own health besides the outbox: its last error and its certificate's expiry.

The last error is a short code and a time, never a message: heartbeats leave the device and are kept by
the controller, and a message could quote a card number, a path with a user name, or key material.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from sekisho.protocol import timefmt

_CODE_CHARS = re.compile(r"[^a-z0-9_.:-]")


def error_code(text: str) -> str:
    """Turn a name into a heartbeat error code (lower case, at most 64 characters of [a-z0-9_.:-])."""
    code = _CODE_CHARS.sub("_", text.lower()).lstrip("_.:-0123456789")
    return (code or "error")[:64]


class ErrorNote:
    """The most recent error of this agent and how many there were since it started (thread-safe)."""

    def __init__(self, clock: Callable[[], datetime] = timefmt.now) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._code: str | None = None
        self._at: datetime | None = None
        self._count = 0

    def note(self, code: str) -> None:
        """Remember an error by its code."""
        with self._lock:
            self._code = error_code(code)
            self._at = self._clock()
            self._count += 1

    def last(self) -> dict[str, Any] | None:
        """Return ``{"code", "at", "count"}`` for the heartbeat, or None if nothing went wrong yet."""
        with self._lock:
            if self._code is None or self._at is None:
                return None
            return {"code": self._code, "at": timefmt.fmt(self._at), "count": self._count}


class ErrorLogHandler(logging.Handler):
    """Notes every ERROR logged under ``sekisho.`` as ``log:<module>`` (the message itself is not kept)."""

    def __init__(self, note: ErrorNote) -> None:
        super().__init__(level=logging.ERROR)
        self._note = note

    def emit(self, record: logging.LogRecord) -> None:
        """Note the record's module as the last error."""
        name = record.name.removeprefix("sekisho.").removeprefix("agents.")
        self._note.note(f"log:{name}")


class CertificateExpiry:
    """Reads notAfter from the agent's TLS certificate, again whenever the file changes (renewal)."""

    def __init__(self, path: Path, note: ErrorNote | None = None) -> None:
        self._path = path
        self._note = note
        self._seen: tuple[int, int] | None = None
        self._not_after: datetime | None = None

    def not_after(self) -> datetime | None:
        """Return the certificate's notAfter (UTC), or None if the file cannot be read or parsed."""
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._seen:
                cert = x509.load_pem_x509_certificate(self._path.read_bytes())
                self._not_after = cert.not_valid_after_utc.astimezone(UTC)
                self._seen = stamp
        except (OSError, ValueError):
            self._seen, self._not_after = None, None
            if self._note is not None:
                self._note.note("cert_unreadable")
        return self._not_after
