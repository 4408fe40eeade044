"""Tell a store that is out of space from a store that refuses one message.

A full disk (SQLite: SQLITE_FULL, "database or disk is full"; PostgreSQL: SQLSTATE 53100 disk_full; the OS:
ENOSPC, EDQUOT) is an outage of the store, not any message's fault:
ingest must not count it towards giving a message up as a dead letter, which would either fail the same way
or, if a small dead letter still fits, turn a real event into an `unprocessable` one.
"""

from __future__ import annotations

import errno
import sqlite3

_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"
_OS_FULL = {errno.ENOSPC, errno.EDQUOT}


def storage_full(exc: BaseException) -> str | None:
    """Return a short reason if ``exc`` (or what caused it) says the database's storage is full, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = _one(current)
        if reason is not None:
            return reason
        # SQLAlchemy keeps the driver's exception in .orig; Python's chaining in __cause__/__context__.
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException) and id(orig) not in seen:
            reason = _one(orig)
            if reason is not None:
                return reason
        current = current.__cause__ or current.__context__
    return None


def _one(exc: BaseException) -> str | None:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        # The primary result code is the low byte (extended codes carry more in the high bits).
        if (isinstance(code, int) and code & 0xFF == _SQLITE_FULL) or "database or disk is full" in str(exc):
            return "database or disk is full (SQLITE_FULL)"
        return None
    if getattr(exc, "sqlstate", None) == _PG_DISK_FULL:
        return "PostgreSQL: could not extend a file, no space left on device (53100)"
    if isinstance(exc, OSError) and exc.errno in _OS_FULL:
        return f"no space left on device ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    return None
