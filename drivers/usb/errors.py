"""USB driver errors: sysfs errno and paths translated into project exceptions that keep both."""

from __future__ import annotations

import errno as errno_codes
from pathlib import Path


class UsbError(Exception):
    """Base of the USB driver's errors; keeps the sysfs path and the OS errno when there is one."""

    def __init__(
        self, message: str, *, path: Path | None = None, errno: int | None = None, sys_name: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno
        self.sys_name = sys_name

    def __str__(self) -> str:
        parts = [super().__str__()]
        if self.path is not None:
            parts.append(f"path={self.path}")
        if self.errno is not None:
            parts.append(f"errno={errno_codes.errorcode.get(self.errno, self.errno)}")
        return " ".join(parts)


class UsbDescriptorError(UsbError):
    """A device attribute or descriptor file is missing, unreadable or malformed: treat the device as unknown."""


class UsbAccessError(UsbError):
    """Writing an authorisation file failed for a reason other than the device going away (EACCES, EIO, …)."""


class UsbDeviceGone(UsbError):
    """The device disappeared (unplugged) while it was being read or written (ENOENT, ENODEV)."""
