"""Signed heartbeats: liveness and health every interval, and at once after each connect."""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sekisho.agents.runtime.receipts import FORMAT as RECEIPTS_FORMAT
from sekisho.protocol import messages, timefmt

log = logging.getLogger(__name__)


def package_version() -> str:
    """Return the installed sekisho version ("0.0.0" when running from an uninstalled tree)."""
    try:
        return importlib.metadata.version("sekisho")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True, slots=True)
class Health:
    """What a heartbeat reports about the agent right now."""

    outbox_depth: int
    oldest_unacked_age_s: int | None
    next_seq: int
    clock_offset_ms: int | None
    policy_version: int | None
    policy_state: str
    # Added for the fleet view (issue 11); all optional, so older callers and tests need not set them.
    kind: str | None = None
    cert_not_after: datetime | None = None
    last_error: dict[str, Any] | None = None
    fingerprints: dict[str, Any] | None = None
    # Not sent: for the node_exporter textfile only.
    extra: dict[str, Any] = field(default_factory=dict)


class Heartbeater:
    """A thread that publishes heartbeats and runs the agent's other timed checks on the same wake-ups."""

    def __init__(
        self,
        *,
        agent_id: str,
        signing_key: Ed25519PrivateKey,
        interval_s: float,
        health: Callable[[], Health],
        publish: Callable[[bytes], bool],
        housekeeping: Callable[[], float | None] | None = None,
        after_beat: Callable[[Health], None] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.boot_id = uuid.uuid4().hex
        self.version = package_version()
        self.sent = 0
        self._key = signing_key
        self._interval = interval_s
        self._health = health
        self._publish = publish
        self._housekeeping = housekeeping
        self._after_beat = after_beat
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def build(self, health: Health | None = None) -> bytes:
        """Sign a heartbeat describing the agent now (or as ``health`` says)."""
        h = health if health is not None else self._health()
        return messages.build_heartbeat(
            self._key,
            agent=self.agent_id,
            at=timefmt.fmt(timefmt.now()),
            version=self.version[:32],
            boot_id=self.boot_id,
            outbox_depth=h.outbox_depth,
            oldest_unacked_age_s=h.oldest_unacked_age_s,
            next_seq=h.next_seq,
            clock_offset_ms=h.clock_offset_ms,
            policy_version=h.policy_version,
            policy_state=h.policy_state,
            kind=h.kind,
            interval_s=max(1, min(3600, round(self._interval))),
            cert_not_after=timefmt.fmt(h.cert_not_after) if h.cert_not_after is not None else None,
            last_error=h.last_error,
            fingerprints=h.fingerprints,
            # This agent keeps the controller's receipts (agents/runtime/receipts.py): acks may carry them.
            receipts=RECEIPTS_FORMAT,
        )

    @property
    def running(self) -> bool:
        """Tell whether the heartbeat thread is alive (the service watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def beat_now(self) -> None:
        """Send a heartbeat as soon as possible (after a connect or a policy change)."""
        self._wake.set()

    def start(self) -> None:
        """Start the heartbeat thread."""
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the heartbeat thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.is_set():
            wait = max(0.0, next_beat - time.monotonic())
            extra = self._run_housekeeping()
            if extra is not None:
                # Wake just after the deadline (e.g. a policy expiry) rather than up to an interval late.
                wait = min(wait, max(extra, 0.0) + 0.05)
            woken = self._wake.wait(wait)
            if self._stop.is_set():
                return
            if woken:
                self._wake.clear()
            if woken or time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self._interval

    def _run_housekeeping(self) -> float | None:
        if self._housekeeping is None:
            return None
        try:
            return self._housekeeping()
        except Exception:  # a failing check must not stop the heartbeats
            log.exception("housekeeping failed")
            return None

    def _beat(self) -> None:
        health: Health | None = None
        try:
            health = self._health()
            if self._publish(self.build(health)):
                self.sent += 1
        except Exception:  # a heartbeat is best effort; the next one will try again
            log.exception("heartbeat failed")
        if health is not None and self._after_beat is not None:
            try:
                self._after_beat(health)
            except Exception:  # e.g. the metrics textfile's disk is full: the heartbeats go on
                log.exception("after-heartbeat step failed")
