"""Lock the desktop when the login card leaves its reader, and end the session if it stays away."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sekisho.drivers.smartcard.protocol import CardEvent, SmartCardBackend

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], object]

DEFAULT_LOCK_COMMAND = ("loginctl", "lock-session", "{session}")
DEFAULT_END_COMMAND = ("loginctl", "terminate-session", "{session}")
COMMAND_TIMEOUT_S = 10.0


class EndTimer(Protocol):
    """The session-end timer: started once, cancelled when the card returns or the watch stops."""

    def start(self) -> None: ...

    def cancel(self) -> None: ...


def daemon_timer(interval_s: float, function: Callable[[], None]) -> EndTimer:
    """Return a (not yet started) daemon ``threading.Timer``: the default end timer."""
    timer = threading.Timer(interval_s, function)
    timer.daemon = True
    return timer


class CardRemovalLock:
    """Watch one reader: removal locks and arms an end timer, a returning card cancels it."""

    def __init__(
        self,
        backend: SmartCardBackend,
        *,
        reader: str,
        terminal: str,
        user: str,
        emit: Emit,
        end_after_s: float,
        lock_command: Sequence[str] = DEFAULT_LOCK_COMMAND,
        end_command: Sequence[str] | None = DEFAULT_END_COMMAND,
        session: str | None = None,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[float, Callable[[], None]], EndTimer] = daemon_timer,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._backend = backend
        self._reader = reader
        self._terminal = terminal
        self._user = user
        self._emit = emit
        self._end_after_s = end_after_s
        # Placeholders are substituted per argument, never through a shell, so a user name cannot inject.
        values = {"session": session if session is not None else os.environ.get("XDG_SESSION_ID", ""), "user": user}
        self._lock_command = [arg.format_map(values) for arg in lock_command]
        self._end_command = [arg.format_map(values) for arg in end_command] if end_command is not None else None
        self._command_timeout_s = command_timeout_s
        self._clock = clock
        self._make_timer = timer
        self._on_change = on_change
        self._mutex = threading.Lock()
        self._unsubscribe: Callable[[], None] | None = None
        self._timer: EndTimer | None = None
        self._locked = False
        self.last_removal_at: float | None = None
        self.last_lock_started_at: float | None = None
        self.last_lock_latency_s: float | None = None
        self.errors: list[str] = []

    @property
    def locked(self) -> bool:
        """Tell whether the session is locked and waiting for the card."""
        with self._mutex:
            return self._locked

    def start(self, *, card_present: bool = True) -> None:
        """Subscribe to the backend's card events; lock at once if the card already left (card_present=False)."""
        with self._mutex:
            if self._unsubscribe is not None:
                return
        unsubscribe = self._backend.subscribe(self._on_cards)
        with self._mutex:
            self._unsubscribe = unsubscribe
        if not card_present:
            # The card left between the login and this watch: no removal event will ever come for it.
            self._card_removed(self._clock())

    def stop(self) -> None:
        """Unsubscribe and cancel a pending end timer; idempotent."""
        with self._mutex:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if unsubscribe is not None:
            unsubscribe()

    def _on_cards(self, event: CardEvent) -> None:
        # Runs on the backend's monitor thread: nothing may raise back into it.
        try:
            if any(card.reader == self._reader for card in event.removed):
                self._card_removed(self._clock())
            if any(card.reader == self._reader for card in event.added):
                self._card_returned()
        except Exception:
            log.exception("card removal lock: handling a card event failed")

    def _card_removed(self, removed_at: float) -> None:
        with self._mutex:
            if self._locked or self._unsubscribe is None:
                return
            self._locked = True
            self.last_removal_at = removed_at
            timer = self._make_timer(self._end_after_s, self._end_timer_fired)
            self._timer = timer
        # The record comes first so an audit trail exists even if the lock command hangs or fails.
        self._record("session.locked", "card_removed")
        self._changed(True)
        started = self._run(self._lock_command, "lock")
        with self._mutex:
            self.last_lock_started_at = started
            self.last_lock_latency_s = started - removed_at
        timer.start()

    def _card_returned(self) -> None:
        with self._mutex:
            if not self._locked:
                return
            self._locked = False
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        # Only the end timer is cancelled: the desktop stays locked and still asks for the unlock.
        self._record("session.unlocked", "card_returned")
        self._changed(False)

    def _end_timer_fired(self) -> None:
        try:
            with self._mutex:
                if not self._locked or self._timer is None:
                    return
                self._timer = None
                self._locked = False
            self._record("session.ended", "card_absent")
            if self._end_command is not None:
                self._run(self._end_command, "end")
        except Exception:
            log.exception("card removal lock: ending the session failed")

    def _changed(self, locked: bool) -> None:
        if self._on_change is not None:
            try:
                self._on_change(locked)
            except Exception:
                log.exception("card removal lock: change listener failed")

    def _record(self, type_: str, cause: str) -> None:
        try:
            self._emit(type_, {"terminal": self._terminal, "user": self._user, "cause": cause})
        except Exception as exc:
            self._fail(f"recording {type_} failed: {exc!r}")

    def _run(self, argv: list[str], what: str) -> float:
        """Start ``argv`` and reap it in the background; return when it was started (clock seconds)."""
        started = self._clock()
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self._fail(f"{what} command {argv[0]!r} could not start: {exc}", action=what)
            return started
        # Waiting happens off the monitor thread so a slow loginctl does not delay the next card event.
        threading.Thread(target=self._reap, args=(process, what), name=f"lock-{what}", daemon=True).start()
        return started

    def _reap(self, process: subprocess.Popen[bytes], what: str) -> None:
        try:
            _, err = process.communicate(timeout=self._command_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            self._fail(f"{what} command timed out after {self._command_timeout_s} s", action=what)
            return
        if process.returncode != 0:
            self._fail(
                f"{what} command exited {process.returncode}: {err.decode(errors='replace')[-200:].strip()}",
                action=what,
            )

    def _fail(self, message: str, *, action: str | None = None) -> None:
        log.warning("card removal lock: %s", message)
        with self._mutex:
            self.errors.append(message)
        if action is None:
            return
        # A lock that did not happen is a security finding: it goes to the controller, not only the log.
        try:
            self._emit(
                "session.lock_failed",
                {"terminal": self._terminal, "user": self._user, "action": action, "detail": message[:300]},
            )
        except Exception:
            log.exception("card removal lock: recording the failure failed")
