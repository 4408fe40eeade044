"""Who is logged in on this terminal: the interface the USB guard reads the session person through.

The login guard's session watch (agents/login/watch.py) provides the person it authenticated by card and
fingerprint (nobody while the session is locked); ``StaticSession`` stands in for tests, the demo and
``python -m sekisho.agents.usb``.
The USB guard only needs the person's policy id and a call whenever it changes (login, logout, switch).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

SessionListener = Callable[[str | None], None]

_LOG = logging.getLogger(__name__)


class SessionProvider(Protocol):
    """The person logged in on this terminal, and notice when that changes."""

    def current_person(self) -> str | None:
        """Return the logged-in person's policy id, or None when nobody is logged in (or locked)."""
        ...

    def subscribe(self, callback: SessionListener) -> Callable[[], None]:
        """Call ``callback(person)`` after every login, logout or switch; return an unsubscribe function."""
        ...


class StaticSession:
    """A settable session: the login watch (agents/login/watch.py) publishes through one; tests and the demo set it."""

    def __init__(self, person: str | None = None) -> None:
        self._person = person
        self._lock = threading.Lock()
        self._listeners: list[SessionListener] = []

    def current_person(self) -> str | None:
        """Return the person set last, or None."""
        with self._lock:
            return self._person

    def subscribe(self, callback: SessionListener) -> Callable[[], None]:
        """Register a listener for changes; return a function that unsubscribes it."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unsubscribe

    def login(self, person: str) -> None:
        """Set the logged-in person (replacing anyone logged in) and notify listeners."""
        self._set(person)

    def logout(self) -> None:
        """Clear the session and notify listeners."""
        self._set(None)

    def _set(self, person: str | None) -> None:
        with self._lock:
            if person == self._person:
                return
            self._person = person
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(person)
            except Exception:  # one broken listener must not keep the others on a stale session
                _LOG.exception("session listener %r failed", listener)
