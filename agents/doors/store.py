"""What the door agent must remember across a restart: who is inside an anti-passback area, the keys out
of their cabinets, and each door's mode (an emergency unlock must survive an agent restart).

One small SQLite file in the agent's state directory, WAL with synchronous=FULL like the command nonce
store: a grant or a key loan is on disk before the agent moves on. Times are wall-clock epoch seconds
(UTC), because monotonic time means nothing after a restart.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sekisho.agents.doors.actions import Mode
from sekisho.agents.runtime.durable import open_durable, set_aside

log = logging.getLogger(__name__)

STATE_NAME = "doors.sqlite3"
_SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS passback (area TEXT NOT NULL, person TEXT NOT NULL, door TEXT NOT NULL,"
    " entered_at REAL NOT NULL, PRIMARY KEY (area, person))",
    "CREATE TABLE IF NOT EXISTS key_loans (door TEXT NOT NULL, slot INTEGER NOT NULL, key TEXT NOT NULL,"
    " person TEXT, authorised INTEGER NOT NULL, taken_at REAL NOT NULL, due_at REAL,"
    " PRIMARY KEY (door, slot))",
    "CREATE TABLE IF NOT EXISTS door_modes (door TEXT PRIMARY KEY, mode TEXT NOT NULL, command_id TEXT,"
    " changed_at REAL NOT NULL)",
)


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    return moment.timestamp()


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass(frozen=True, slots=True)
class PassbackEntry:
    """A person recorded inside an anti-passback area (entered through an entry reader)."""

    area: str
    person: str
    door: str
    entered_at: datetime


@dataclass(frozen=True, slots=True)
class KeyLoan:
    """A key out of its cabinet slot: lent (authorised) or missing without a grant (person may be None)."""

    door: str
    slot: int
    key: str
    person: str | None
    authorised: bool
    taken_at: datetime
    due_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoredMode:
    """A door's mode other than normal, and the command that set it."""

    mode: Mode
    command_id: str | None


class DoorStateStore:
    """The SQLite file behind anti-passback, key loans and door modes; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn = self._open(path)
        except sqlite3.OperationalError:
            raise  # cannot open at all (missing directory, permissions): not damage, and not ours to fix
        except sqlite3.DatabaseError as err:
            # A damaged file must not keep doors from working: set it aside (for inspection) and start
            # empty. Anti-passback forgets (fails open for re-entry); key loans are re-learnt from the
            # slot sensors at start, where every empty slot is reported (docs/doors.md).
            aside = set_aside(path)
            log.error("door state %s is damaged (%s); moved to %s, starting empty", path, err, aside)
            self._conn = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        def prepare(conn: sqlite3.Connection) -> None:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version} is newer than this agent's")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

        # A loan or a passage must be on disk before the door moves on, or a crash forgets it.
        return open_durable(path, prepare)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    # --- anti-passback ------------------------------------------------------------------------

    def inside(self, area: str, person: str) -> PassbackEntry | None:
        """Return the entry record of a person inside an area, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT door, entered_at FROM passback WHERE area = ? AND person = ?", (area, person)
            ).fetchone()
        return None if row is None else PassbackEntry(area, person, row[0], _moment(row[1]))

    def record_entry(self, area: str, person: str, door: str, at: datetime) -> None:
        """Record that a person entered an area."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO passback (area, person, door, entered_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (area, person) DO UPDATE SET door = excluded.door, entered_at = excluded.entered_at",
                (area, person, door, _epoch(at)),
            )

    def record_exit(self, area: str, person: str) -> bool:
        """Record that a person left an area; return whether they were recorded inside."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM passback WHERE area = ? AND person = ?", (area, person))
        return cur.rowcount > 0

    def forgive(self, area: str, person: str | None = None) -> list[str]:
        """Forget who is inside an area (everyone, or one person); return the people forgotten."""
        with self._lock:
            if person is None:
                rows = self._conn.execute("SELECT person FROM passback WHERE area = ?", (area,)).fetchall()
                self._conn.execute("DELETE FROM passback WHERE area = ?", (area,))
            else:
                rows = self._conn.execute(
                    "SELECT person FROM passback WHERE area = ? AND person = ?", (area, person)
                ).fetchall()
                self._conn.execute("DELETE FROM passback WHERE area = ? AND person = ?", (area, person))
        return sorted(row[0] for row in rows)

    def expire(self, area: str, older_than: datetime) -> list[str]:
        """Forget entries of an area made before ``older_than``; return the people forgotten."""
        cutoff = _epoch(older_than)
        with self._lock:
            rows = self._conn.execute(
                "SELECT person FROM passback WHERE area = ? AND entered_at < ?", (area, cutoff)
            ).fetchall()
            if rows:
                self._conn.execute("DELETE FROM passback WHERE area = ? AND entered_at < ?", (area, cutoff))
        return sorted(row[0] for row in rows)

    def people_inside(self, area: str) -> list[PassbackEntry]:
        """Return everyone recorded inside an area."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT person, door, entered_at FROM passback WHERE area = ? ORDER BY person", (area,)
            ).fetchall()
        return [PassbackEntry(area, r[0], r[1], _moment(r[2])) for r in rows]

    # --- key loans ----------------------------------------------------------------------------

    def loans(self, door: str) -> dict[int, KeyLoan]:
        """Return the keys out of a cabinet, by slot."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT slot, key, person, authorised, taken_at, due_at FROM key_loans WHERE door = ?", (door,)
            ).fetchall()
        return {
            r[0]: KeyLoan(door, r[0], r[1], r[2], bool(r[3]), _moment(r[4]), None if r[5] is None else _moment(r[5]))
            for r in rows
        }

    def record_loan(self, loan: KeyLoan) -> None:
        """Record a key out of its slot (replacing an older record for the slot)."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO key_loans (door, slot, key, person, authorised, taken_at, due_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    loan.door,
                    loan.slot,
                    loan.key,
                    loan.person,
                    int(loan.authorised),
                    _epoch(loan.taken_at),
                    None if loan.due_at is None else _epoch(loan.due_at),
                ),
            )

    def close_loan(self, door: str, slot: int) -> None:
        """Forget the loan of a slot (its key came back)."""
        with self._lock:
            self._conn.execute("DELETE FROM key_loans WHERE door = ? AND slot = ?", (door, slot))

    # --- modes --------------------------------------------------------------------------------

    def modes(self) -> dict[str, StoredMode]:
        """Return the doors not in normal mode."""
        with self._lock:
            rows = self._conn.execute("SELECT door, mode, command_id FROM door_modes").fetchall()
        return {r[0]: StoredMode(r[1], r[2]) for r in rows if r[1] in ("emergency_unlock", "lockdown")}

    def set_mode(self, door: str, mode: Mode, command_id: str | None) -> None:
        """Remember a door's mode (normal is the absence of a row)."""
        with self._lock:
            if mode == "normal":
                self._conn.execute("DELETE FROM door_modes WHERE door = ?", (door,))
            else:
                self._conn.execute(
                    "INSERT OR REPLACE INTO door_modes (door, mode, command_id, changed_at) VALUES (?, ?, ?, ?)",
                    (door, mode, command_id, time.time()),
                )
