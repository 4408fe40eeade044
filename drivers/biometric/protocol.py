"""The fingerprint interface the login guard uses: yes/no facts only, never a template."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from sekisho.drivers.biometric.errors import BiometricError

VerifyOutcome = Literal["match", "no_match", "timeout", "retry_exhausted", "unavailable"]

# Called with "ready" once the sensor waits for a finger, then with each VerifyStatus result string, so a
# login prompt can say "touch the sensor" / "try again". It runs on the verifying thread: keep it short.
StatusObserver = Callable[[str], None]

STATUS_READY = "ready"

DEFAULT_TIMEOUT_S = 15.0
DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """How one verification ended: the outcome, how many scans it took, and why (for events and logs).

    ``error`` is set only for ``unavailable`` and keeps fprintd's error name (``NoSensor``,
    ``DeviceBusy``, ``NotEnrolled`` or a plain ``BiometricError``). ``detail`` never contains biometric data.
    """

    outcome: VerifyOutcome
    attempts: int
    detail: str
    error: BiometricError | None = None

    @property
    def matched(self) -> bool:
        """Return True only for a verified match."""
        return self.outcome == "match"


class FingerprintBackend(Protocol):
    """A fingerprint sensor service: enrolment status per user, and verification with a bounded wait."""

    def enrolled(self, user: str) -> bool:
        """Return whether ``user`` has at least one enrolled finger; raise NoSensor/BiometricError if unknown."""
        ...

    def verify(
        self,
        user: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        on_status: StatusObserver | None = None,
    ) -> VerifyResult:
        """Verify any enrolled finger of ``user``; never raise for sensor trouble, report ``unavailable``."""
        ...


class EnrolmentCensus(Protocol):
    """Counts of enrolled fingers per user (the terminal's heartbeat reports them per person)."""

    def enrolled_fingers(self, users: Sequence[str]) -> dict[str, int]:
        """Return how many fingers each user has enrolled; raise NoSensor/BiometricError if unknown."""
        ...
