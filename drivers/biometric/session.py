"""The verification rules shared by every backend: how VerifyStatus results become an outcome.

fprintd reports each scan as a ``VerifyStatus(result, done)`` signal. ``done`` means the current
``VerifyStart`` is over; to give the user another try the client must ``VerifyStop`` and
``VerifyStart`` again. An *attempt* here is any scan the sensor reported on — a mismatch or an
unreadable touch alike — because that is what the user experiences as "I tried N times".
Anything unexpected (an unknown result string, a disconnect) fails closed: never a match.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from sekisho.drivers.biometric.errors import BiometricError, NoSensor
from sekisho.drivers.biometric.protocol import StatusObserver, VerifyOutcome, VerifyResult

VERIFY_MATCH = "verify-match"
VERIFY_NO_MATCH = "verify-no-match"
VERIFY_DISCONNECTED = "verify-disconnected"
VERIFY_UNKNOWN_ERROR = "verify-unknown-error"
# The sensor could not read the finger; fprintd normally keeps the same VerifyStart going (done=False).
RETRY_RESULTS = frozenset(
    {"verify-retry-scan", "verify-swipe-too-short", "verify-finger-not-centered", "verify-remove-and-retry"}
)
KNOWN_RESULTS = RETRY_RESULTS | {VERIFY_MATCH, VERIFY_NO_MATCH, VERIFY_DISCONNECTED, VERIFY_UNKNOWN_ERROR}
# Unknown result strings are quoted in details/logs; cap them so a hostile value cannot flood a log line.
_MAX_QUOTED = 64

_LOG = logging.getLogger(__name__)


class Step(enum.Enum):
    """What the backend should do after a status."""

    CONTINUE = "continue"  # keep waiting for signals from the same VerifyStart
    RESTART = "restart"  # VerifyStop, then VerifyStart again for the next attempt
    FINISH = "finish"  # stop; ``VerifyTally.result`` holds the outcome


def quote_status(result: str) -> str:
    """Return a short, printable quotation of a status string for details and logs."""
    text = repr(result)
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 3] + "..."


@dataclass
class VerifyTally:
    """Count attempts of one verification and decide, status by status, whether it is over."""

    max_attempts: int
    attempts: int = 0
    mismatches: int = 0
    ignored: int = 0
    result: VerifyResult | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def feed(self, status: str, done: bool) -> Step:
        """Take one VerifyStatus and return what to do next."""
        if self.result is not None:
            return Step.FINISH
        if status == VERIFY_MATCH:
            self.attempts += 1
            return self._finish("match", "fingerprint matched")
        if status == VERIFY_NO_MATCH or status in RETRY_RESULTS:
            self.attempts += 1
            if status == VERIFY_NO_MATCH:
                self.mismatches += 1
            if self.attempts >= self.max_attempts:
                # A mismatch anywhere in the run is the security-relevant fact; otherwise the sensor
                # simply never got a readable finger.
                if self.mismatches:
                    return self._finish("no_match", f"no match after {self.attempts} attempt(s)")
                return self._finish("retry_exhausted", f"no readable scan in {self.attempts} attempt(s), last {status}")
            return Step.RESTART if done else Step.CONTINUE
        if status == VERIFY_DISCONNECTED:
            return self._finish(
                "unavailable", "sensor disconnected during verification", NoSensor("sensor disconnected")
            )
        if status == VERIFY_UNKNOWN_ERROR:
            return self._finish(
                "unavailable", "sensor reported an unknown error", BiometricError("sensor reported an unknown error")
            )
        # Not in fprintd's documented list: never treat it as a match.
        if not done:
            self.ignored += 1
            return Step.CONTINUE
        detail = f"unexpected verify status {quote_status(status)}"
        return self._finish("unavailable", detail, BiometricError(detail))

    def timed_out(self) -> VerifyResult:
        """Record that the overall deadline passed and return the result."""
        if self.result is None:
            self._finish("timeout", f"no verification result in time after {self.attempts} attempt(s)")
        assert self.result is not None
        return self.result

    def _finish(self, outcome: VerifyOutcome, detail: str, error: BiometricError | None = None) -> Step:
        self.result = VerifyResult(outcome, self.attempts, detail, error)
        return Step.FINISH


def notify_status(observer: StatusObserver | None, status: str) -> None:
    """Tell the observer about a status; its failure must not break the verification or leave the sensor claimed."""
    if observer is None:
        return
    try:
        observer(status)
    except Exception:
        _LOG.exception("fingerprint status observer failed on %s", quote_status(status))
