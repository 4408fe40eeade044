"""Who has fingerprints enrolled on this terminal: counts per person for the heartbeat, never a template.

The people are the terminal's handlers in the cached policy; each person's OS logins are asked of fprintd
(one bus connection per census) and their finger counts added up. A census runs at most every
``refresh_s`` (fprintd is asked over D-Bus, which costs more than a heartbeat should), and at most
``MAX_FINGERPRINT_PEOPLE`` people are reported (the rest: ``truncated``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sekisho.agents.runtime.policy_cache import PolicyCache
from sekisho.agents.runtime.vitals import error_code
from sekisho.drivers.biometric.errors import BiometricError
from sekisho.drivers.biometric.protocol import EnrolmentCensus
from sekisho.protocol import timefmt
from sekisho.protocol.messages import MAX_FINGERPRINT_PEOPLE, MAX_FINGERS
from sekisho.protocol.policy import SitePolicy

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 300.0


def terminal_logins(policy: SitePolicy, terminal: str) -> dict[str, list[str]]:
    """Return each handler of ``terminal`` with the OS logins they use, ordered by person id."""
    handlers = {h for t in policy.terminals if t.id == terminal for h in t.handlers}
    return {p.id: list(p.logins) for p in sorted(policy.people, key=lambda p: p.id) if p.id in handlers}


class FingerprintCensus:
    """Counts enrolled fingers per person of one terminal, cached for ``refresh_s``."""

    def __init__(
        self,
        backend: EnrolmentCensus,
        policy: PolicyCache,
        terminal: str,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = timefmt.now,
    ) -> None:
        self._backend = backend
        self._policy = policy
        self._terminal = terminal
        self._refresh_s = refresh_s
        self._monotonic = monotonic
        self._now = now
        self._lock = threading.Lock()
        self._cached: dict[str, Any] | None = None
        self._checked: tuple[float, int | None] | None = None  # (when, for which policy version)

    def status(self) -> dict[str, Any] | None:
        """Return the heartbeat's ``fingerprints`` object (refreshed when old or the policy changed)."""
        with self._lock:
            version = self._policy.version
            if self._checked is not None:
                at, seen_version = self._checked
                if seen_version == version and self._monotonic() - at < self._refresh_s:
                    return self._cached
            self._cached = self._count()
            self._checked = (self._monotonic(), version)
            return self._cached

    def _count(self) -> dict[str, Any] | None:
        bundle = self._policy.current()
        if bundle is None:
            return None
        try:
            people = terminal_logins(SitePolicy.model_validate(bundle.bundle.policy), self._terminal)
        except ValueError:
            return None
        truncated = len(people) > MAX_FINGERPRINT_PEOPLE
        people = dict(list(people.items())[:MAX_FINGERPRINT_PEOPLE])
        checked_at = timefmt.fmt(self._now())
        users = sorted({login for logins in people.values() for login in logins})
        try:
            counts = self._backend.enrolled_fingers(users) if users else {}
        except BiometricError as err:
            log.debug("fingerprint census failed: %s", type(err).__name__)
            # NoSensor → no_sensor, DeviceBusy → device_busy: the class says enough, the message stays here.
            code = error_code(re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__))
            return {"checked_at": checked_at, "error": code, "enrolled": {}}
        enrolled = {
            person: min(MAX_FINGERS, sum(max(0, counts.get(login, 0)) for login in logins))
            for person, logins in people.items()
        }
        return {"checked_at": checked_at, "error": None, "enrolled": enrolled, "truncated": truncated}
