"""Who is logged in on this terminal, with which card in which reader: shared by the PAM helper and the agent.

The PAM helper is a short process per PAM call; the running agent is long-lived. They meet in a small
SQLite file in the agent's state directory: ``auth`` records a grant (user, person, reader, card),
``open_session`` marks it open with logind's session id, ``close_session`` removes it. The agent's
watcher (agents/login/watch.py) reads the open sessions and locks each one when its card leaves.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SESSIONS_NAME = "login-sessions.db"
# A grant never followed by open_session (a failed session start) stops counting after this long.
GRANT_TTL_S = 120.0


@dataclass(frozen=True, slots=True)
class LoginSession:
    """One login on this terminal: the OS user, the person, the card's reader and logind's session id."""

    user: str
    person: str
    reader: str | None
    card: str | None
    session_id: str | None
    state: str  # "granted" (auth passed) or "open" (open_session ran)
    granted_at: float


class LoginSessions:
    """The registry of logins on this terminal (one row per OS user)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SESSIONS_NAME
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS sessions (user TEXT PRIMARY KEY, person TEXT NOT NULL, reader TEXT,"
                " card TEXT, session_id TEXT, state TEXT NOT NULL, granted_at REAL NOT NULL)"
            )
        except BaseException:
            self._conn.close()
            raise

    def granted(self, user: str, person: str, reader: str | None, card: str | None) -> None:
        """Record a granted login; an open session of the same user (a screen unlock) stays open."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO sessions (user, person, reader, card, session_id, state, granted_at)"
                " VALUES (?, ?, ?, ?, NULL, 'granted', ?)"
                " ON CONFLICT(user) DO UPDATE SET person = excluded.person, reader = excluded.reader,"
                " card = excluded.card, granted_at = excluded.granted_at",
                (user, person, reader, card, time.time()),
            )

    def opened(self, user: str, session_id: str | None) -> LoginSession | None:
        """Mark the user's granted login open (with logind's session id); None if no login was granted."""
        with self._lock:
            self._conn.execute(
                "UPDATE sessions SET state = 'open', session_id = COALESCE(?, session_id) WHERE user = ?",
                (session_id, user),
            )
            return self._get(user)

    def closed(self, user: str) -> LoginSession | None:
        """Remove the user's login and return what it was (None if there was none)."""
        with self._lock:
            found = self._get(user)
            self._conn.execute("DELETE FROM sessions WHERE user = ?", (user,))
            return found

    def active(self) -> list[LoginSession]:
        """Return open sessions (and grants young enough that their session may still open)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT user, person, reader, card, session_id, state, granted_at FROM sessions"
                " WHERE state = 'open' OR granted_at > ? ORDER BY user",
                (time.time() - GRANT_TTL_S,),
            ).fetchall()
        return [LoginSession(*row) for row in rows]

    def _get(self, user: str) -> LoginSession | None:
        row = self._conn.execute(
            "SELECT user, person, reader, card, session_id, state, granted_at FROM sessions WHERE user = ?", (user,)
        ).fetchone()
        return LoginSession(*row) if row else None

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()
