"""Lock board errors: NAKs, silence, unusable devices and bad frames as project exceptions that keep the cause."""

from __future__ import annotations

import errno as errno_codes


class BoardError(Exception):
    """Base of the lock board drivers' errors; ``reason`` is a short machine-readable word (``bad_index``, …)."""

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class BoardTimeout(BoardError):
    """The board did not answer a command within its time budget, retries included."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(message, reason="timeout")
        self.attempts = attempts


class BoardRefused(BoardError):
    """The board answered a command with NAK; ``nak_code`` is the wire code, ``reason`` its name."""

    def __init__(self, message: str, *, reason: str, nak_code: int) -> None:
        super().__init__(message, reason=reason)
        self.nak_code = nak_code


class BoardUnavailable(BoardError):
    """The device cannot be opened or used (missing, permission denied, unplugged); keeps errno and driver code."""

    def __init__(
        self, message: str, *, reason: str = "unavailable", errno: int | None = None, backend_code: int | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.errno = errno
        self.backend_code = backend_code

    def __str__(self) -> str:
        text = super().__str__()
        if self.errno is not None:
            text += f" (errno={errno_codes.errorcode.get(self.errno, self.errno)})"
        return text


class MalformedFrame(BoardError):
    """A frame passed its checksum but its payload does not parse (wrong length, impossible value)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="malformed")
