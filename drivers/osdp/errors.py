"""OSDP reader link errors: device and libosdp failures translated into project exceptions that keep their codes."""

from __future__ import annotations


class OsdpError(Exception):
    """Base of the OSDP driver's errors."""


class UnknownReader(OsdpError, LookupError):
    """A reader id that is not configured on this link."""


class LinkUnavailable(OsdpError):
    """The serial device could not be opened or libosdp refused the configuration; keeps the errno if any."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KeySetError(OsdpError):
    """A new secure-channel key was not installed; keeps libosdp's completion status when it gave one."""

    def __init__(self, message: str, *, completion_status: int | None = None) -> None:
        super().__init__(message)
        self.completion_status = completion_status
