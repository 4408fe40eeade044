"""The durable outbox: every event is signed and on disk before `append` returns.

Events leave the outbox only when the controller acknowledges that it stored them. Sequence numbers
come from a counter persisted in the same transaction as the event, so a number is never reused —
not after the outbox was emptied, not after the agent was killed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sekisho.agents.runtime.errors import OutboxError, OutboxFull
from sekisho.protocol import events, topics

SCHEMA_VERSION = 1
ClockFn = Callable[[], tuple[bool, int | None]]

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value ANY NOT NULL) STRICT;
CREATE TABLE events (seq INTEGER PRIMARY KEY, wire BLOB NOT NULL, created_at REAL NOT NULL);
"""


def _unsynced() -> tuple[bool, int | None]:
    return False, None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A read-only look at an outbox (for `sekisho agent status`)."""

    agent: str
    depth: int
    next_seq: int
    oldest_created_at: float | None


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite has already rolled back after some errors (SQLITE_FULL among them); a ROLLBACK then fails with
    # "no transaction is active" and would hide the real error from the caller.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _is_full(err: sqlite3.Error) -> bool:
    # SQLITE_FULL is 13 (the low byte of an extended code); a failed fsync or write shows as I/O error with ENOSPC.
    code = getattr(err, "sqlite_errorcode", None)
    return (isinstance(code, int) and code & 0xFF == 13) or "database or disk is full" in str(err)


def _damaged(path: Path, err: BaseException | str) -> OutboxError:
    return OutboxError(
        f"outbox {path} is unreadable or damaged ({err}); it was left untouched because it may hold "
        "unsent events — copy it aside for recovery before removing it"
    )


class Outbox:
    """A SQLite (WAL) queue of signed events awaiting the controller's acknowledgement."""

    def __init__(
        self,
        path: Path,
        *,
        signing_key: Ed25519PrivateKey,
        agent_id: str,
        clock: ClockFn | None = None,
        sync: Literal["full", "normal"] = "full",
    ) -> None:
        self.path = path
        self.agent_id = topics.check_agent_id(agent_id)
        self._key = signing_key
        self._clock = clock or _unsynced
        self._sync = sync.upper()
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        if path.exists() and not path.is_file():
            raise _damaged(path, "not a regular file")
        try:
            self._conn = self._connect()
            self._next_seq = self._prepare()
            self._reader = self._connect()
        except sqlite3.Error as err:
            self._close_quietly()
            raise _damaged(path, err) from err
        except OutboxError:
            self._close_quietly()
            raise

    # --- opening ----------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) so each one is
        # exactly one fsync; check_same_thread=False because the locks below serialise access.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise _damaged(self.path, f"cannot switch to WAL (journal mode {mode!r})")
        conn.execute(f"PRAGMA synchronous={self._sync}")
        return conn

    def _prepare(self) -> int:
        conn = self._conn
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _damaged(self.path, f"integrity check: {check}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema", SCHEMA_VERSION), ("agent", self.agent_id), ("next_seq", 1)],
            )
            conn.execute("COMMIT")
            return 1
        if not {"meta", "events"} <= tables:
            raise _damaged(self.path, f"unexpected tables {sorted(tables)}")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != SCHEMA_VERSION:
            raise _damaged(self.path, f"schema version {meta.get('schema')!r}, expected {SCHEMA_VERSION}")
        if meta.get("agent") != self.agent_id:
            raise OutboxError(f"outbox {self.path} belongs to agent {meta.get('agent')!r}, not {self.agent_id!r}")
        stored = meta.get("next_seq")
        if not isinstance(stored, int) or stored < 1:
            raise _damaged(self.path, f"next_seq {stored!r}")
        highest = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        # The counter is written with every event, so this only matters after hand repair.
        return max(stored, highest + 1)

    def _close_quietly(self) -> None:
        for name in ("_conn", "_reader"):
            conn = getattr(self, name, None)
            if conn is not None:
                conn.close()

    # --- writing ----------------------------------------------------------------------------------

    def _build(self, seq: int, type: str, payload: dict[str, Any], at: datetime | None) -> bytes:
        synced, offset = self._clock()
        return events.build_event(
            self._key,
            agent=self.agent_id,
            seq=seq,
            type=type,
            payload=payload,
            at=at,
            clock_synced=synced,
            clock_offset_ms=offset,
        )

    def _append(self, items: Sequence[tuple[str, dict[str, Any]]], at: datetime | None) -> list[int]:
        """Number, sign and store events in one transaction.

        The next sequence number is read inside the write lock of the database, not from memory:
        another local process (the PAM login helper) may append to the same outbox while the agent
        runs, and a number must never be handed out twice.
        """
        conn = self._conn
        with self._wlock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    first = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
                    now = time.time()
                    rows = [(first + i, self._build(first + i, t, p, at), now) for i, (t, p) in enumerate(items)]
                    conn.executemany("INSERT INTO events (seq, wire, created_at) VALUES (?, ?, ?)", rows)
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (first + len(rows),))
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
            except sqlite3.Error as err:
                if _is_full(err):
                    # Rolled back whole: the number was not used, so the next event that fits takes it (no gap).
                    raise OutboxFull(
                        f"cannot write to outbox {self.path}: the disk is full; the event was not recorded"
                    ) from err
                raise OutboxError(f"cannot write to outbox {self.path}: {err}") from err
            self._next_seq = first + len(rows)
            return [row[0] for row in rows]

    def append(self, type: str, payload: dict[str, Any], *, at: datetime | None = None) -> int:
        """Sign and durably store one event; return its sequence number (raises Rejected if invalid)."""
        return self._append([(type, payload)], at)[0]

    def append_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Sign and store several events in one transaction; nothing is stored if any is invalid."""
        if not items:
            return []
        return self._append(items, None)

    def remove_ranges(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Delete acknowledged events (inclusive seq ranges) in one transaction; return how many went."""
        params = [(lo, hi) for lo, hi in ranges if lo <= hi]
        if not params:
            return 0
        conn = self._conn
        with self._wlock:
            try:
                # A delete lost to a power cut only causes a resend, which the controller deduplicates,
                # so it need not pay for its own fsync; the next append's fsync covers it anyway.
                if self._sync == "FULL":
                    conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    cur = conn.executemany("DELETE FROM events WHERE seq BETWEEN ? AND ?", params)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
                finally:
                    if self._sync == "FULL":
                        conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as err:
                if _is_full(err):
                    # Even a delete needs new WAL pages: the events stay and are acknowledged again later.
                    raise OutboxFull(
                        f"cannot remove acknowledged events in outbox {self.path}: the disk is full"
                    ) from err
                raise OutboxError(f"cannot remove acknowledged events in outbox {self.path}: {err}") from err
            return max(cur.rowcount, 0)

    # --- reading ----------------------------------------------------------------------------------

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._rlock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as err:
                raise OutboxError(f"cannot read outbox {self.path}: {err}") from err

    def pending(self, after_seq: int = 0, limit: int = 500) -> list[tuple[int, bytes]]:
        """Return up to `limit` stored events with seq > after_seq, in seq order."""
        return [
            (s, bytes(w))
            for s, w in self._read(
                "SELECT seq, wire FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            )
        ]

    def depth(self) -> int:
        """Return how many events await acknowledgement."""
        return int(self._read("SELECT count(*) FROM events")[0][0])

    def oldest_created_at(self) -> float | None:
        """Return the wall-clock time (epoch seconds) the oldest unacknowledged event was stored."""
        rows = self._read("SELECT created_at FROM events ORDER BY seq LIMIT 1")
        return float(rows[0][0]) if rows else None

    @property
    def next_seq(self) -> int:
        """Return the sequence number the next event will get."""
        return self._next_seq

    def close(self) -> None:
        """Close the database connections."""
        with self._wlock, self._rlock:
            self._close_quietly()

    @staticmethod
    def inspect(path: Path) -> OutboxStats:
        """Read an outbox's depth and counters without writing to it (the agent may be running)."""
        if not path.is_file():
            raise OutboxError(f"no outbox at {path}")
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error as err:
            raise _damaged(path, err) from err
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            depth, oldest = conn.execute(
                "SELECT count(*), (SELECT created_at FROM events ORDER BY seq LIMIT 1) FROM events"
            ).fetchone()
            return OutboxStats(str(meta.get("agent")), int(depth), int(meta.get("next_seq", 1)), oldest)
        except sqlite3.Error as err:
            raise _damaged(path, err) from err
        finally:
            conn.close()
