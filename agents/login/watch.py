"""The running agent's side of the login guard: lock each open session when its card leaves the reader.

The watcher follows the session registry the PAM helper writes (agents/login/sessions.py), runs one
``CardRemovalLock`` per open session that has a reader, and tells the USB guard who is logged in
(a locked session counts as nobody: a lent medium is blocked while its borrower is away).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sekisho.agents.login.lock import DEFAULT_END_COMMAND, DEFAULT_LOCK_COMMAND, CardRemovalLock
from sekisho.agents.login.sessions import LoginSession, LoginSessions
from sekisho.agents.usb.session import SessionListener, StaticSession
from sekisho.drivers.smartcard import CardError
from sekisho.drivers.smartcard.protocol import SmartCardBackend

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchSettings:
    """How sessions are locked and ended (the end delay comes from the policy's login settings)."""

    terminal: str
    lock_command: Sequence[str] = DEFAULT_LOCK_COMMAND
    end_command: Sequence[str] | None = DEFAULT_END_COMMAND
    poll_s: float = 0.5


class LoginSessionWatcher:
    """Follows the registry: a lock per open session, and the logged-in person for the USB guard."""

    def __init__(
        self,
        backend: SmartCardBackend,
        sessions: LoginSessions,
        emit: Emit,
        settings: WatchSettings,
        end_after_s: Callable[[], float],
    ) -> None:
        self._backend = backend
        self._sessions = sessions
        self._emit = emit
        self._settings = settings
        self._end_after_s = end_after_s
        self._mutex = threading.Lock()
        self._watched: dict[str, tuple[LoginSession, CardRemovalLock]] = {}
        self._locked: set[str] = set()
        # The USB guard's view: who is logged in and not locked; it notifies only on a change.
        self._session = StaticSession()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- SessionProvider (the USB guard reads this) ----------------------------------------------------

    def current_person(self) -> str | None:
        """Return the person of the open, unlocked session (None when nobody is, or it is locked)."""
        return self._session.current_person()

    def subscribe(self, callback: SessionListener) -> Callable[[], None]:
        """Call ``callback(person)`` after every login, logout, lock or unlock; return an unsubscriber."""
        return self._session.subscribe(callback)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the registry now, then follow it in the background."""
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="login-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following and stop every lock; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._mutex:
            watched = list(self._watched.values())
            self._watched.clear()
        for _, lock in watched:
            lock.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._settings.poll_s):
            try:
                self.refresh()
            except Exception:  # a locked or damaged registry must not end the watch
                log.exception("login session watch failed")

    def refresh(self) -> None:
        """Start locks for new open sessions and stop those whose session closed."""
        wanted = {s.user: s for s in self._sessions.active() if s.state == "open"}
        with self._mutex:
            gone = [user for user, (s, _) in self._watched.items() if wanted.get(user) != s]
            stopped = [self._watched.pop(user)[1] for user in gone]
            self._locked -= set(gone)
            new = [s for user, s in wanted.items() if user not in self._watched]
        for lock in stopped:
            lock.stop()
        for session in new:
            self._watch(session)
        self._publish()

    def _watch(self, session: LoginSession) -> None:
        user = session.user

        def on_change(locked: bool) -> None:
            with self._mutex:
                (self._locked.add if locked else self._locked.discard)(user)
            self._publish()

        lock = CardRemovalLock(
            self._backend,
            reader=session.reader or "",
            terminal=self._settings.terminal,
            user=user,
            emit=self._emit,
            end_after_s=self._end_after_s(),
            lock_command=self._settings.lock_command,
            end_command=self._settings.end_command,
            session=session.session_id or "",
            on_change=on_change,
        )
        with self._mutex:
            self._watched[user] = (session, lock)
        if session.reader is None:
            return  # no reader known (a login that did not use one): nothing to watch
        lock.start(card_present=self._card_present(session.reader))

    def _card_present(self, reader: str) -> bool:
        try:
            self._backend.connect(reader).close()
        except CardError:
            return False
        return True

    def _publish(self) -> None:
        with self._mutex:
            open_people = [s.person for user, (s, _) in sorted(self._watched.items()) if user not in self._locked]
        if open_people:
            self._session.login(open_people[0])
        else:
            self._session.logout()
