"""A simulated fingerprint sensor with fprintd's behaviour, for the demo and login-logic tests.

Enrolments are finger identifiers per user; touches are queued with ``touch`` (a finger identifier,
compared with the user's enrolment) or ``report`` (any raw VerifyStatus, including nonsense). The
same ``VerifyTally`` as the fprintd backend turns them into an outcome, so attempts, retries and
fail-closed handling behave identically.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sekisho.drivers.biometric.errors import BiometricError, DeviceBusy, NoSensor, NotEnrolled
from sekisho.drivers.biometric.protocol import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    STATUS_READY,
    StatusObserver,
    VerifyResult,
)
from sekisho.drivers.biometric.session import VERIFY_MATCH, VERIFY_NO_MATCH, Step, VerifyTally, notify_status


@dataclass(frozen=True, slots=True)
class RawStatus:
    """A VerifyStatus exactly as the sensor service would emit it (for retry, error and garbage cases)."""

    result: str
    done: bool = True


@dataclass(frozen=True, slots=True)
class Touch:
    """A finger placed on the simulated sensor."""

    finger_id: str


class SimulatedFingerprint:
    """An in-memory fingerprint sensor implementing ``FingerprintBackend``."""

    def __init__(self, enrolments: Mapping[str, Iterable[str]] | None = None) -> None:
        self._enrolments: dict[str, set[str]] = {user: set(fingers) for user, fingers in (enrolments or {}).items()}
        self._pending: deque[Touch | RawStatus] = deque()
        self._cond = threading.Condition()
        self._claimed_by: str | None = None
        self.available = True
        self.unavailable_reason = "simulated sensor switched off"

    # -- set-up and scripting --------------------------------------------------------------------------

    def enroll(self, user: str, finger_id: str) -> None:
        """Enrol ``finger_id`` for ``user``."""
        with self._cond:
            self._enrolments.setdefault(user, set()).add(finger_id)

    def delete_enrolment(self, user: str) -> None:
        """Forget every finger of ``user``."""
        with self._cond:
            self._enrolments.pop(user, None)

    def touch(self, finger_id: str) -> None:
        """Queue one touch of the sensor by the finger called ``finger_id``."""
        self._push(Touch(finger_id))

    def report(self, result: str, done: bool = True) -> None:
        """Queue a raw VerifyStatus (a retry, an error, or a value fprintd never sends)."""
        self._push(RawStatus(result, done))

    def hold_claim(self, client: str = "another client") -> None:
        """Claim the sensor for someone else, so the next verify finds it busy."""
        with self._cond:
            self._claimed_by = client

    def release_claim(self) -> None:
        """Drop a claim made with ``hold_claim``."""
        with self._cond:
            self._claimed_by = None

    @property
    def claimed(self) -> bool:
        """Return whether the sensor is claimed right now (it must not be after a verify returns)."""
        with self._cond:
            return self._claimed_by is not None

    @property
    def pending_touches(self) -> int:
        """Return how many queued touches no verification has consumed yet."""
        with self._cond:
            return len(self._pending)

    # -- FingerprintBackend ----------------------------------------------------------------------------

    def enrolled(self, user: str) -> bool:
        """Return whether ``user`` has at least one enrolled finger; raise NoSensor when switched off."""
        with self._cond:
            if not self.available:
                raise NoSensor(self.unavailable_reason)
            return bool(self._enrolments.get(user))

    def enrolled_fingers(self, users: Sequence[str]) -> dict[str, int]:
        """Return how many fingers each user has enrolled; raise NoSensor when switched off."""
        with self._cond:
            if not self.available:
                raise NoSensor(self.unavailable_reason)
            return {user: len(self._enrolments.get(user, ())) for user in users}

    def verify(
        self,
        user: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        on_status: StatusObserver | None = None,
    ) -> VerifyResult:
        """Verify any enrolled finger of ``user``; never raise for sensor trouble, report ``unavailable``."""
        tally = VerifyTally(max_attempts)
        deadline = time.monotonic() + timeout_s
        try:
            self._claim(user)
        except BiometricError as err:
            return VerifyResult("unavailable", 0, str(err), err)
        try:
            while True:
                notify_status(on_status, STATUS_READY)
                step = self._follow(user, tally, deadline, on_status)
                if step is not Step.RESTART:
                    break
        finally:
            with self._cond:
                self._claimed_by = None
        assert tally.result is not None
        return tally.result

    # -- internals -------------------------------------------------------------------------------------

    def _push(self, item: Touch | RawStatus) -> None:
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()

    def _claim(self, user: str) -> None:
        """Mirror fprintd: Claim fails when off or busy, VerifyStart fails without enrolled prints."""
        with self._cond:
            if not self.available:
                raise NoSensor(self.unavailable_reason)
            if self._claimed_by is not None:
                raise DeviceBusy("the fingerprint sensor is in use by another client")
            if not self._enrolments.get(user):
                raise NotEnrolled("the user has no enrolled fingerprints")
            self._claimed_by = user

    def _follow(self, user: str, tally: VerifyTally, deadline: float, on_status: StatusObserver | None) -> Step:
        while True:
            with self._cond:
                while not self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        tally.timed_out()
                        return Step.FINISH
                    self._cond.wait(remaining)
                item = self._pending.popleft()
                enrolled = self._enrolments.get(user, set())
            if isinstance(item, Touch):
                status, done = (VERIFY_MATCH if item.finger_id in enrolled else VERIFY_NO_MATCH), True
            else:
                status, done = item.result, item.done
            notify_status(on_status, status)
            step = tally.feed(status, done)
            if step is not Step.CONTINUE:
                return step
