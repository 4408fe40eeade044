"""Signed commands from the controller: verify, refuse replays, run the named handler, record the outcome.

Every command that reaches the agent ends as exactly one event, `agent.command_executed` or
`agent.command_rejected` with a reason code from `protocol.errors`, so the controller's record shows
what happened to it.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sekisho.agents.runtime.durable import open_durable, set_aside
from sekisho.protocol import errors, messages, timefmt
from sekisho.protocol.canonical import loads_strict

log = logging.getLogger(__name__)

# Local reason code for a verified command whose handler failed (not a wire rejection).
HANDLER_FAILED = "handler_failed"
# A nonce must be remembered until its command can no longer pass the expiry check, whatever the skew.
_NONCE_KEEP_S = (messages.MAX_COMMAND_LIFETIME + messages.CLOCK_SKEW).total_seconds()
_PRUNE_EVERY_S = 60.0
_COMMAND_ID = re.compile(r"^[0-9a-f]{32}$")
_COMMAND_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")

Handler = Callable[[messages.VerifiedCommand], str | None]
Emit = Callable[[str, dict[str, Any]], int]


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """The result of one command message: executed (with the handler's result) or rejected (with why)."""

    executed: bool
    command_id: str | None
    name: str | None
    result: str = ""
    reason: str | None = None
    detail: str = ""


class NonceStore:
    """Nonces of accepted commands, on disk so a replay is refused even after a restart."""

    def __init__(self, path: Path, now: Callable[[], datetime] = timefmt.now) -> None:
        self.path = path
        # The clock commands are judged by: nonces must be kept as long as that clock accepts their command.
        self._now = now
        self._lock = threading.Lock()
        self._last_prune = 0.0
        # If the store had to be reset, no command is accepted until every command that could have
        # been recorded in it has expired: then no replay can slip through the gap.
        self.quarantined_until: float | None = None
        try:
            self._conn = self._open(path)
        except sqlite3.DatabaseError as err:
            aside = set_aside(path)
            log.error(
                "nonce store %s is damaged (%s); moved to %s, commands refused for %.0f s",
                path,
                err,
                aside,
                _NONCE_KEEP_S,
            )
            self._conn = self._open(path)
            self.quarantined_until = time.monotonic() + _NONCE_KEEP_S

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        return open_durable(
            path,
            lambda conn: conn.execute(
                "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, command_id TEXT NOT NULL,"
                " expires_at REAL NOT NULL)"
            ),
        )

    def remember(self, nonce: str, command_id: str, expires_at: datetime) -> bool:
        """Record a nonce; return False if it was seen before (a replay)."""
        with self._lock:
            self._prune()
            try:
                self._conn.execute(
                    "INSERT INTO nonces (nonce, command_id, expires_at) VALUES (?, ?, ?)",
                    (nonce, command_id, expires_at.timestamp()),
                )
            except sqlite3.IntegrityError:
                return False
            return True

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        self._conn.execute("DELETE FROM nonces WHERE expires_at < ?", (self._now().timestamp() - _NONCE_KEEP_S,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM nonces").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()


def _claimed(raw: bytes) -> tuple[str | None, str | None]:
    # For a refused command, the claimed id and name help the controller match the refusal to what
    # it sent; they are only copied if they have the shape the controller itself produces.
    try:
        body = loads_strict(raw, max_size=messages.MAX_CONTROL_BYTES)["command"]
        cid, name = body.get("id"), body.get("name")
    except (errors.Rejected, KeyError, TypeError, AttributeError):
        return None, None
    return (
        cid if isinstance(cid, str) and _COMMAND_ID.match(cid) else None,
        name if isinstance(name, str) and _COMMAND_NAME.match(name) else None,
    )


class CommandDispatcher:
    """Runs verified, fresh, single-use commands through the handlers registered by name."""

    def __init__(
        self,
        *,
        agent_id: str,
        controller_key: Ed25519PublicKey,
        nonce_path: Path,
        emit: Emit,
        on_resend: Callable[[], None] | None = None,
        now: Callable[[], datetime] = timefmt.now,
    ) -> None:
        self._agent = agent_id
        self._key = controller_key
        self._emit = emit
        self._now = now
        self._handlers: dict[str, Handler] = {}
        self.nonces = NonceStore(nonce_path, now)
        self.register("agent.ping", lambda command: "pong")
        if on_resend is not None:
            resend = on_resend

            def _resend(command: messages.VerifiedCommand) -> str:
                resend()
                return "resending unacknowledged events"

            self.register("agent.resend", _resend)

    def register(self, name: str, handler: Handler) -> None:
        """Add the handler for a command name (capabilities call this at start)."""
        if not _COMMAND_NAME.match(name):
            raise ValueError(f"invalid command name {name!r}")
        if name in self._handlers:
            raise ValueError(f"command {name!r} registered twice")
        self._handlers[name] = handler

    @property
    def names(self) -> list[str]:
        """Return the registered command names."""
        return sorted(self._handlers)

    def handle(self, raw: bytes) -> CommandOutcome:
        """Verify and run one command message, emit the matching event and return the outcome."""
        outcome = self._decide(raw)
        self._record(outcome)
        return outcome

    def _decide(self, raw: bytes) -> CommandOutcome:
        try:
            verified = messages.open_command(raw, self._key, self._agent, now=self._now())
        except errors.Rejected as err:
            cid, name = _claimed(raw)
            return CommandOutcome(False, cid, name, reason=err.reason, detail=err.detail)
        cmd = verified.command
        until = self.nonces.quarantined_until
        if until is not None and time.monotonic() < until:
            return CommandOutcome(
                False,
                cmd.id,
                cmd.name,
                reason=errors.REPLAY,
                detail="nonce store was reset; commands refused until it covers the window",
            )
        # The nonce is recorded before the handler runs: a crash mid-command must not let a replay
        # perform it again (at most once is right for an unlock).
        if not self.nonces.remember(cmd.nonce, cmd.id, verified.expires_at):
            return CommandOutcome(False, cmd.id, cmd.name, reason=errors.REPLAY, detail="nonce already used")
        handler = self._handlers.get(cmd.name)
        if handler is None:
            return CommandOutcome(
                False, cmd.id, cmd.name, reason=errors.UNKNOWN_TYPE, detail=f"no handler for command {cmd.name!r}"
            )
        try:
            result = handler(verified)
        except errors.Rejected as err:
            return CommandOutcome(False, cmd.id, cmd.name, reason=err.reason, detail=err.detail)
        except Exception as err:  # a failing handler is recorded, never allowed to stop the agent
            log.exception("command %s (%s) failed", cmd.name, cmd.id)
            return CommandOutcome(False, cmd.id, cmd.name, reason=HANDLER_FAILED, detail=type(err).__name__)
        return CommandOutcome(True, cmd.id, cmd.name, result=(result or "ok")[:200])

    def _record(self, outcome: CommandOutcome) -> None:
        if outcome.executed:
            log.info("command %s (%s) executed", outcome.name, outcome.command_id)
            self._emit(
                "agent.command_executed",
                {"command_id": outcome.command_id, "name": outcome.name, "result": outcome.result},
            )
            return
        log.warning("command %s (%s) rejected: %s", outcome.name, outcome.command_id, outcome.reason)
        payload: dict[str, Any] = {"reason": outcome.reason, "detail": outcome.detail[:300]}
        if outcome.command_id is not None:
            payload["command_id"] = outcome.command_id
        if outcome.name is not None:
            payload["name"] = outcome.name
        try:
            self._emit("agent.command_rejected", payload)
        except errors.Rejected:
            # Claimed fields of a forged command could trip the event guard; the refusal is still recorded.
            self._emit("agent.command_rejected", {"reason": outcome.reason or errors.MALFORMED})

    def close(self) -> None:
        """Close the nonce store."""
        self.nonces.close()
