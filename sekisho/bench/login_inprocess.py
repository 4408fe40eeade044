"""The login benchmark's hardware, and its baseline: a PAM call decided in a process of its own.

``python -I .../sekisho/bench/login_inprocess.py --config agent.toml --terminal T`` is what ``pam-auth`` was
before it asked the terminal agent. It runs as a script, not with ``-m``: the ``sekisho.bench`` package loads
the whole bench command line (SQLAlchemy, the controller's store), which the old entry never imported. It
imports what that entry imported (the login guard's typer CLI, hence typer and rich, and the helper with
pydantic, the event catalogue, cryptography, pyscard) and runs ``PamHelper`` in this process, with the same
hardware the benchmark gives the agent: the real card through pcscd, and a stand-in sensor that matches as
soon as it is asked. It prints the finger step's duration on stderr (``FINGER_MARK<seconds>``) so that the
benchmark can take it out, as it does for the agent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from sekisho.agents.login.pam import Hardware, HardwareFactory, LoginAgentSettings
from sekisho.drivers.biometric import SimulatedFingerprint
from sekisho.drivers.biometric.protocol import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S, StatusObserver, VerifyResult

FINGER_MARK = "bench-finger-s="
_FINGER = "bench-finger"


class InstantFinger:
    """A sensor the person touches the moment it is asked; reports how long each finger step took."""

    def __init__(self, report: Callable[[float], None]) -> None:
        self._sensor = SimulatedFingerprint()
        self._report = report
        self._began: float | None = None

    def enrolled(self, user: str) -> bool:
        """Enrol ``user`` on first sight (the stand-in knows everyone) and start timing the finger step."""
        self._began = time.perf_counter()
        self._sensor.enroll(user, _FINGER)
        return True

    def verify(
        self,
        user: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        on_status: StatusObserver | None = None,
    ) -> VerifyResult:
        """Match at once; report the time since ``enrolled`` (the whole finger step)."""
        self._sensor.touch(_FINGER)
        try:
            return self._sensor.verify(user, timeout_s=timeout_s, max_attempts=max_attempts, on_status=on_status)
        finally:
            began = self._began if self._began is not None else time.perf_counter()
            self._report(time.perf_counter() - began)


def bench_hardware(report: Callable[[float], None]) -> HardwareFactory:
    """Return a hardware factory: pcscd's readers (login.toml's reader) and an ``InstantFinger``."""

    def make(user: str, settings: LoginAgentSettings) -> Hardware:
        from sekisho.drivers.smartcard import pcsc_backend

        return Hardware(pcsc_backend(), InstantFinger(report), reader=settings.reader)

    return make


def main(argv: list[str]) -> int:
    """Decide the PAM call in this process (PAM_USER, PAM_TYPE from the environment); the exit code."""
    import logging
    import os

    import sekisho.agents.login.cli  # noqa: F401  what the old entry imported before deciding
    from sekisho.agents.login.pam import PamHelper

    options = dict(zip(argv[::2], argv[1::2], strict=True))
    logging.basicConfig(level=logging.WARNING)
    fingers: list[float] = []
    helper = PamHelper(
        Path(options["--config"]), options["--terminal"], os.environ, hardware=bench_hardware(fingers.append)
    )
    code = helper.run()
    print(f"{FINGER_MARK}{sum(fingers)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
