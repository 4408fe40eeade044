"""Fingerprint driver: fprintd over D-Bus and a simulated sensor. Only this package imports jeepney.

Templates stay in fprintd on the terminal; the interface answers only "enrolled?" and "matched?".
"""

from typing import TYPE_CHECKING, Any

from sekisho.drivers.biometric.errors import BiometricError, DeviceBusy, NoSensor, NotEnrolled, VerifyTimeout
from sekisho.drivers.biometric.protocol import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    STATUS_READY,
    EnrolmentCensus,
    FingerprintBackend,
    StatusObserver,
    VerifyOutcome,
    VerifyResult,
)
from sekisho.drivers.biometric.simulated import RawStatus, SimulatedFingerprint, Touch

if TYPE_CHECKING:
    from sekisho.drivers.biometric.fprintd import FprintdBackend


def __getattr__(name: str) -> Any:
    """Import the fprintd backend (and with it jeepney, an ``agent`` extra) only when it is asked for."""
    if name == "FprintdBackend":
        from sekisho.drivers.biometric.fprintd import FprintdBackend

        return FprintdBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT_S",
    "STATUS_READY",
    "BiometricError",
    "DeviceBusy",
    "EnrolmentCensus",
    "FingerprintBackend",
    "FprintdBackend",
    "NoSensor",
    "NotEnrolled",
    "RawStatus",
    "SimulatedFingerprint",
    "StatusObserver",
    "Touch",
    "VerifyOutcome",
    "VerifyResult",
    "VerifyTimeout",
]
