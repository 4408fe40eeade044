"""Biometric driver errors: fprintd's D-Bus error names translated into project exceptions that keep them."""

from __future__ import annotations

FPRINT_ERROR_PREFIX = "net.reactivated.Fprint.Error."
ERROR_PERMISSION_DENIED = FPRINT_ERROR_PREFIX + "PermissionDenied"
ERROR_ALREADY_IN_USE = FPRINT_ERROR_PREFIX + "AlreadyInUse"
ERROR_NO_ENROLLED_PRINTS = FPRINT_ERROR_PREFIX + "NoEnrolledPrints"
ERROR_CLAIM_DEVICE = FPRINT_ERROR_PREFIX + "ClaimDevice"
ERROR_INTERNAL = FPRINT_ERROR_PREFIX + "Internal"
ERROR_NO_SUCH_DEVICE = FPRINT_ERROR_PREFIX + "NoSuchDevice"
ERROR_NO_ACTION_IN_PROGRESS = FPRINT_ERROR_PREFIX + "NoActionInProgress"
# Bus-level errors meaning "nobody is there to answer": fprintd is not running (and not activatable).
ERROR_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
ERROR_NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
ERROR_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"


class BiometricError(Exception):
    """Base of the biometric driver's errors; keeps fprintd's (or the bus's) error name and message."""

    def __init__(self, message: str, *, error_name: str | None = None, dbus_message: str | None = None) -> None:
        super().__init__(message)
        self.error_name = error_name
        self.dbus_message = dbus_message

    def __str__(self) -> str:
        text = super().__str__()
        if self.error_name is not None:
            text += f" [{self.error_name}"
            text += f": {self.dbus_message}]" if self.dbus_message else "]"
        return text


class NoSensor(BiometricError):
    """No fingerprint service or sensor: the bus is unreachable, fprintd is not running, or it has no device."""


class DeviceBusy(BiometricError):
    """The sensor is claimed by another client (fprintd AlreadyInUse); try again later."""


class NotEnrolled(BiometricError):
    """The user has no enrolled fingerprints (fprintd NoEnrolledPrints)."""


class VerifyTimeout(BiometricError):
    """fprintd did not answer a call within the allowed time (the daemon or the bus is hung)."""
