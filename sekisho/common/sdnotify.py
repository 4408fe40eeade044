"""systemd's service notifications (sd_notify(3)) with the standard library only.

The units in deploy/systemd are ``Type=notify`` with a ``WatchdogSec``: systemd counts a service as started
only when it says ``READY=1``, and restarts it when ``WATCHDOG=1`` stops arriving. Without ``NOTIFY_SOCKET``
in the environment (run by hand, from a test, under another supervisor) every call here does nothing.
A failed send is logged once and never raised: a notification must not take the service down.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from sekisho.common.i18n import _

log = logging.getLogger(__name__)

# How long the liveness loop sleeps between checks when no watchdog is configured (systemd's or not).
DEFAULT_TICK_S = 1.0


def _address(value: str) -> str | bytes | None:
    """Return the socket address NOTIFY_SOCKET names: a path, or an abstract name ('@' becomes NUL)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock: and other forms are not used by the units this project ships.
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Return WatchdogSec in seconds if it is meant for this process, else None."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    # WATCHDOG_PID names the main process; a child that inherited the variables must not ping for it.
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


class ServiceNotifier:
    """Tells the service manager this process is ready, alive, stopping, and what it is doing."""

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET %r is not a Unix socket address; service notifications are off", raw)
        self.watchdog_s = _watchdog_interval(env) if self._address is not None else None
        self._clock = clock
        self._last_ping: float | None = None
        self._last_status: str | None = None
        self._failed = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Tell whether a service manager listens."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send one notification of ``KEY=value`` fields; return True if it was handed to the socket."""
        if self._address is None or not fields:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as err:
            with self._lock:
                first, self._failed = not self._failed, True
            if first:
                log.warning("service notification failed (%s); the service manager may restart this process", err)
            return False
        with self._lock:
            recovered, self._failed = self._failed, False
        if recovered:
            log.info("service notifications delivered again")
        return True

    def ready(self, status: str | None = None) -> bool:
        """Say the service is up (systemd then counts the start as done)."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={status}")
            self._last_status = status
        sent = self.send(*fields)
        self._last_ping = self._clock()
        return sent

    def status(self, text: str) -> bool:
        """Show a one-line state in `systemctl status`; sent only when it changed."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        """Say the service is shutting down on purpose (no watchdog restart meanwhile)."""
        return self.send("STOPPING=1")

    def keepalive(self) -> bool:
        """Ping the watchdog if half its interval passed since the last ping; return True if pinged."""
        if self.watchdog_s is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_s / 2:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def tick_s(self) -> float:
        """Return how often a liveness loop should check: often enough to ping at half the interval."""
        if self.watchdog_s is None:
            return DEFAULT_TICK_S
        return max(0.01, min(DEFAULT_TICK_S, self.watchdog_s / 4))


class LivenessCheck:
    """Pings the watchdog while ``alive()`` holds and keeps STATUS current; call ``check()`` from the service's loop.

    A service whose working threads died stops pinging, so systemd restarts it instead of leaving it
    half-alive; the failure is logged once, and a recovery once.
    """

    def __init__(
        self,
        notifier: ServiceNotifier,
        alive: Callable[[], bool],
        status: Callable[[], str] | None = None,
    ) -> None:
        self.notifier = notifier
        self._alive = alive
        self._status = status
        self.healthy = True

    def ready(self) -> bool:
        """Report the started service ready, with its status."""
        return self.notifier.ready(self._status() if self._status is not None else None)

    def check(self) -> None:
        """Prove liveness once: ping if due and healthy, update the status."""
        if self._alive():
            if not self.healthy:
                log.warning("service healthy again: watchdog pings resume")
                self.healthy = True
            self.notifier.keepalive()
            if self._status is not None:
                self.notifier.status(self._status())
        elif self.healthy:
            self.healthy = False
            log.error("a working thread of this service has stopped: no more watchdog pings")
            self.notifier.status(_("unhealthy: a working thread stopped"))


def serve_until(
    stop: threading.Event,
    *,
    alive: Callable[[], bool],
    status: Callable[[], str] | None = None,
    notifier: ServiceNotifier | None = None,
) -> None:
    """Report the started service ready, prove it alive until ``stop`` is set, then report it stopping."""
    check = LivenessCheck(notifier if notifier is not None else ServiceNotifier(), alive, status)
    check.ready()
    try:
        while not stop.wait(check.notifier.tick_s()):
            check.check()
    finally:
        check.notifier.stopping()
