"""Open sessions in the running agent: the registry the PAM helper writes, and the watch that locks them.

The watch runs the real CardRemovalLock on a simulated reader (the real pcscd path of the lock itself is
covered in test_login_lock.py); the registry is the real SQLite file shared with the PAM helper.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_login_lock import Events, _wait, _wait_file, _writer

from sekisho.agents.login.sessions import LoginSessions
from sekisho.agents.login.watch import LoginSessionWatcher, WatchSettings
from sekisho.drivers.smartcard.simulated import SimulatedBackend, SimulatedCard

READER = "Sim Reader 0"
CARD = SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"), uid_only=True)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[LoginSessions]:
    """The registry file in a temp state directory."""
    registry = LoginSessions(tmp_path)
    yield registry
    registry.close()


@pytest.fixture
def backend() -> SimulatedBackend:
    """One simulated reader with the login card in it."""
    sim = SimulatedBackend((READER,))
    sim.insert(CARD, READER)
    return sim


def _watcher(
    backend: SimulatedBackend,
    sessions: LoginSessions,
    events: Events,
    log: Path,
    lock_command: list[str] | None = None,
) -> LoginSessionWatcher:
    settings = WatchSettings(
        terminal="t-hr-01",
        lock_command=lock_command or _writer(log, "locked"),
        end_command=_writer(log, "ended"),
        poll_s=0.05,
    )
    return LoginSessionWatcher(backend, sessions, events, settings, end_after_s=lambda: 30.0)


def test_registry_follows_grant_open_close(sessions: LoginSessions) -> None:
    sessions.granted("alice", "p-alice", READER, "c-alice")
    (granted,) = sessions.active()
    assert (granted.state, granted.person, granted.reader, granted.card) == ("granted", "p-alice", READER, "c-alice")
    opened = sessions.opened("alice", "7")
    assert opened is not None and (opened.state, opened.session_id) == ("open", "7")
    # A screen unlock (auth only) keeps the session open and its id.
    sessions.granted("alice", "p-alice", READER, "c-alice")
    (still,) = sessions.active()
    assert (still.state, still.session_id) == ("open", "7")
    closed = sessions.closed("alice")
    assert closed is not None and closed.user == "alice"
    assert sessions.active() == [] and sessions.closed("alice") is None


def test_open_without_grant_is_nothing(sessions: LoginSessions) -> None:
    assert sessions.opened("mallory", "9") is None
    assert sessions.active() == []


def test_watch_locks_open_session_and_tells_the_usb_guard(
    backend: SimulatedBackend, sessions: LoginSessions, tmp_path: Path
) -> None:
    events, log = Events(), tmp_path / "commands.log"
    seen: list[str | None] = []
    watcher = _watcher(backend, sessions, events, log)
    watcher.subscribe(seen.append)
    watcher.start()
    try:
        sessions.granted("alice", "p-alice", READER, "c-alice")
        watcher.refresh()
        assert watcher.current_person() is None  # granted is not yet a session
        sessions.opened("alice", "7")
        watcher.refresh()
        assert watcher.current_person() == "p-alice"
        backend.remove(READER)
        locked = events.wait_for("session.locked")
        assert (locked["user"], locked["cause"], locked["terminal"]) == ("alice", "card_removed", "t-hr-01")
        _wait_file(log, "locked")
        # Locked counts as nobody: a lent USB medium is blocked while its borrower is away.
        assert watcher.current_person() is None
        backend.insert(CARD, READER)
        events.wait_for("session.unlocked")
        assert watcher.current_person() == "p-alice"
        sessions.closed("alice")
        watcher.refresh()
        assert watcher.current_person() is None
        assert seen == ["p-alice", None, "p-alice", None]
        backend.remove(READER)  # no session any more: no lock
        assert events.types() == ["session.locked", "session.unlocked"]
    finally:
        watcher.stop()


def test_card_gone_before_the_watch_started_locks_at_once(
    backend: SimulatedBackend, sessions: LoginSessions, tmp_path: Path
) -> None:
    events = Events()
    sessions.granted("alice", "p-alice", READER, "c-alice")
    sessions.opened("alice", "7")
    backend.remove(READER)
    watcher = _watcher(backend, sessions, events, tmp_path / "commands.log")
    watcher.start()
    try:
        assert events.wait_for("session.locked")["cause"] == "card_removed"
        assert watcher.current_person() is None
    finally:
        watcher.stop()


def test_failed_lock_command_becomes_an_event(
    backend: SimulatedBackend, sessions: LoginSessions, tmp_path: Path
) -> None:
    events = Events()
    sessions.granted("alice", "p-alice", READER, "c-alice")
    sessions.opened("alice", "7")
    failing = [sys.executable, "-c", "raise SystemExit(4)"]
    watcher = _watcher(backend, sessions, events, tmp_path / "commands.log", lock_command=failing)
    watcher.start()
    try:
        backend.remove(READER)
        failed = events.wait_for("session.lock_failed")
        assert failed["action"] == "lock" and "exited 4" in failed["detail"]
    finally:
        watcher.stop()


def test_background_poll_picks_up_new_sessions(
    backend: SimulatedBackend, sessions: LoginSessions, tmp_path: Path
) -> None:
    events = Events()
    watcher = _watcher(backend, sessions, events, tmp_path / "commands.log")
    watcher.start()
    try:
        other = LoginSessions(tmp_path)  # the PAM helper is another process with its own connection
        other.granted("alice", "p-alice", READER, "c-alice")
        other.opened("alice", "3")
        other.close()
        _wait(lambda: watcher.current_person() == "p-alice")
    finally:
        watcher.stop()
