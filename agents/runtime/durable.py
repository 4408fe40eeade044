"""Small SQLite files an agent must not lose a write from (nonces, door state): opened the same careful way."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path


def open_durable(path: Path, prepare: Callable[[sqlite3.Connection], object]) -> sqlite3.Connection:
    """Open with WAL and synchronous=FULL, check integrity, run ``prepare``; raise DatabaseError if damaged."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # What is written here must be on disk before the agent acts on it, or a crash could undo it.
        conn.execute("PRAGMA synchronous=FULL")
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("integrity check failed")
        prepare(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def set_aside(path: Path) -> Path:
    """Move a damaged database (and its WAL files) out of the way for inspection; return where it went."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return aside
