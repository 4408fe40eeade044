"""Logging set-up shared by agents and the controller: text, JSON lines, or journald's native protocol.

``--log-format json`` writes one JSON object per line: ``time`` (ISO 8601 with the UTC offset), ``level``,
``logger``, ``message``, ``fields`` (the ``extra={"fields": {...}}`` of the call) and, for exceptions,
``exception``. ``--log-format journald`` sends each record as one datagram to journald's socket (the
native protocol of systemd.journal-fields(7)), with the fields as ``SEKISHO_<NAME>`` journal fields, so
``journalctl SEKISHO_DOOR=d-1`` finds a door's decisions. Only the standard library is used.

Fields whose names say they hold a secret (pin, password, token, secret, key material, a card's UID) are
replaced by ``[redacted]`` whatever the caller passed: a log line must never carry one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO, get_args

LogFormat = Literal["text", "json", "journald"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A journald datagram stays well under the socket's default buffer; longer messages are cut, marked.
MAX_JOURNAL_VALUE = 16 * 1024
_SECRET_NAME = re.compile(r"(^|_)(pin|password|passwd|token|secret|private_key|key_pem|scbk|uid|card_uid)($|_)", re.I)
_REDACTED = "[redacted]"
# Marks the handlers installed here, so a second set-up replaces them and leaves others' (pytest's) alone.
_OURS = "_sekisho_handler"
# journald: syslog priorities by logging level.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_FIELD_NAME = re.compile(r"[^A-Z0-9_]")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the structured fields of a record (``extra={"fields": {...}}``), secrets redacted."""
    raw = getattr(record, "fields", None)
    if not isinstance(raw, dict):
        return {}
    return {str(k): (_REDACTED if _SECRET_NAME.search(str(k)) else v) for k, v in raw.items()}


def _iso(created: float) -> str:
    # Local time with its offset: readable on the host and unambiguous anywhere else.
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single-line JSON object."""
        doc: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "fields": record_fields(record),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str, separators=(",", ":"))


def _journal_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if len(data) > MAX_JOURNAL_VALUE:
        data = data[:MAX_JOURNAL_VALUE] + " …[cut]".encode()
    key = name.encode("ascii")
    if b"\n" in data:
        # Binary-safe form: the name, a newline, the length as 64-bit little endian, the value, a newline.
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def journal_name(name: str) -> str:
    """Turn a field name into a journal field name (upper case, A-Z 0-9 _, not starting with _ or a digit)."""
    cleaned = _FIELD_NAME.sub("_", name.upper()).lstrip("_")
    return f"SEKISHO_{cleaned}"[:64]


class JournaldHandler(logging.Handler):
    """Send records to journald over its native datagram socket."""

    def __init__(self, identifier: str, socket_path: Path = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(1.0)  # journald under pressure must not hold a door decision for long

    def encode(self, record: logging.LogRecord) -> bytes:
        """Return the datagram for one record."""
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
        parts = [
            _journal_field("MESSAGE", message),
            _journal_field("PRIORITY", str(_PRIORITY.get(record.levelno, 6 if record.levelno < 30 else 3))),
            _journal_field("SYSLOG_IDENTIFIER", self.identifier),
            _journal_field("LOGGER", record.name),
            _journal_field("CODE_FILE", record.pathname),
            _journal_field("CODE_LINE", str(record.lineno)),
            _journal_field("CODE_FUNC", record.funcName),
        ]
        for key, value in record_fields(record).items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            parts.append(_journal_field(journal_name(key), text))
        return b"".join(parts)

    def emit(self, record: logging.LogRecord) -> None:
        """Send one record; a failure goes to logging's own error path, never to the caller."""
        try:
            self._sock.sendto(self.encode(record), str(self.socket_path))
        except Exception:  # logging must never break the program that logs
            self.handleError(record)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
        super().close()


def setup_logging(
    level: str = "INFO",
    log_format: str = "text",
    *,
    identifier: str = "sekisho",
    stream: TextIO | None = None,
    journal_socket: Path | None = None,
) -> str:
    """Configure the root logger; return the format in use (journald falls back to text, saying why)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    out = stream if stream is not None else sys.stderr
    handler: logging.Handler
    used = log_format
    fallback_note: str | None = None
    if log_format == "journald":
        path = journal_socket or Path(os.environ.get("SEKISHO_JOURNAL_SOCKET", str(JOURNAL_SOCKET)))
        if path.is_socket():
            handler = JournaldHandler(identifier, path)
        else:
            used = "text"
            fallback_note = (
                f"journald のソケット {path} がありません。標準エラーにテキストで記録します / "
                f"journald socket {path} not found; logging as text to stderr"
            )
    if used == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonLineFormatter())
    elif used == "text":
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if fallback_note is not None:
        logging.getLogger("sekisho.logs").warning(fallback_note)
    return used
