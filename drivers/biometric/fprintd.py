"""The real fingerprint backend: fprintd's D-Bus API (``net.reactivated.Fprint``) through jeepney.

fprintd keeps the templates; this backend only ever asks "does this user have prints?" and "did the
finger on the sensor match this user?". It opens one short-lived bus connection per call, so a hung
or restarted fprintd cannot poison later logins, and it always gives the sensor back (VerifyStop +
Release) — a claim left behind would refuse the user's next login with AlreadyInUse. fprintd also
drops a claim when the claiming connection leaves the bus, which covers the case where this process
dies in the middle.

Only ``drivers/`` imports jeepney.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from jeepney import (
    DBusAddress,
    DBusErrorResponse,
    HeaderFields,
    MatchRule,
    Message,
    MessageType,
    message_bus,
    new_method_call,
)
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from sekisho.drivers.biometric.errors import (
    ERROR_ALREADY_IN_USE,
    ERROR_NAME_HAS_NO_OWNER,
    ERROR_NO_ENROLLED_PRINTS,
    ERROR_NO_SUCH_DEVICE,
    ERROR_SERVICE_UNKNOWN,
    BiometricError,
    DeviceBusy,
    NoSensor,
    NotEnrolled,
    VerifyTimeout,
)
from sekisho.drivers.biometric.protocol import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    STATUS_READY,
    StatusObserver,
    VerifyResult,
)
from sekisho.drivers.biometric.session import Step, VerifyTally, notify_status

FPRINT_BUS_NAME = "net.reactivated.Fprint"
MANAGER_PATH = "/net/reactivated/Fprint/Manager"
MANAGER_IFACE = "net.reactivated.Fprint.Manager"
DEVICE_IFACE = "net.reactivated.Fprint.Device"
SYSTEM_BUS = "SYSTEM"
# fprintd answers each method in milliseconds; seconds of silence mean it (or the bus) is hung.
DEFAULT_CALL_TIMEOUT_S = 5.0
# Signals that arrive while a method call is in flight are queued here; a verification produces a
# handful, so this only needs to be larger than any burst.
_SIGNAL_QUEUE = 64

_LOG = logging.getLogger(__name__)
_MANAGER = DBusAddress(MANAGER_PATH, bus_name=FPRINT_BUS_NAME, interface=MANAGER_IFACE)


def translate_dbus_error(err: DBusErrorResponse, action: str) -> BiometricError:
    """Map a D-Bus error reply from fprintd (or the bus) to the project exception that keeps its name."""
    name = str(err.name) if err.name is not None else None
    data = err.data
    message = str(data[0]) if isinstance(data, tuple) and data else None
    cls: type[BiometricError] = BiometricError
    what = f"fprintd refused {action}"
    if name in (ERROR_SERVICE_UNKNOWN, ERROR_NAME_HAS_NO_OWNER):
        cls, what = NoSensor, "fprintd is not running"
    elif name == ERROR_NO_SUCH_DEVICE:
        cls, what = NoSensor, "fprintd has no fingerprint sensor"
    elif name == ERROR_ALREADY_IN_USE:
        cls, what = DeviceBusy, "the fingerprint sensor is in use by another client"
    elif name == ERROR_NO_ENROLLED_PRINTS:
        cls, what = NotEnrolled, "the user has no enrolled fingerprints"
    return cls(what, error_name=name, dbus_message=message)


class FprintdBackend:
    """Fingerprint enrolment status and verification through fprintd on a given bus (default: the system bus)."""

    def __init__(
        self, *, bus_address: str = SYSTEM_BUS, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S, finger: str = "any"
    ) -> None:
        # The address is explicit (a ``unix:path=…`` string, or "SYSTEM") so tests can point one backend at a
        # private bus without changing the process environment for everything else.
        self._bus_address = bus_address
        self._call_timeout_s = call_timeout_s
        self._finger = finger

    # -- public API ------------------------------------------------------------------------------------

    def enrolled(self, user: str) -> bool:
        """Return whether ``user`` has at least one enrolled finger; raise NoSensor/BiometricError if unknown."""
        with self._connect() as conn:
            device = self._default_device(conn)
            try:
                fingers = self._call(conn, device, "ListEnrolledFingers", "s", (user,), action="ListEnrolledFingers")
            except NotEnrolled:
                return False
        # Only the yes/no leaves this function: finger names are not needed upstream.
        return bool(fingers and fingers[0])

    def enrolled_fingers(self, users: Sequence[str]) -> dict[str, int]:
        """Return how many fingers each user has enrolled, over one bus connection; raise NoSensor/BiometricError."""
        counts: dict[str, int] = {}
        with self._connect() as conn:
            device = self._default_device(conn)
            for user in users:
                try:
                    body = self._call(conn, device, "ListEnrolledFingers", "s", (user,), action="ListEnrolledFingers")
                except NotEnrolled:
                    counts[user] = 0
                    continue
                fingers = body[0] if body else []
                # Only the count leaves this function: which fingers they are is nobody's business upstream.
                counts[user] = len(fingers) if isinstance(fingers, list) else 0
        return counts

    def verify(
        self,
        user: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        on_status: StatusObserver | None = None,
    ) -> VerifyResult:
        """Verify any enrolled finger of ``user``; never raise for sensor trouble, report ``unavailable``."""
        # timeout_s bounds the wait for a finger. Setting up and the clean-up (VerifyStop, Release) are
        # bounded separately by call_timeout_s per call, so a timeout still gives the sensor back.
        tally = VerifyTally(max_attempts)
        deadline = time.monotonic() + timeout_s
        try:
            with self._connect() as conn:
                return self._verify_on(conn, user, tally, deadline, on_status)
        except BiometricError as err:
            _LOG.warning("fingerprint verification for %s unavailable: %s", user, err)
            return VerifyResult("unavailable", tally.attempts, str(err), err)

    # -- internals -------------------------------------------------------------------------------------

    def _verify_on(
        self, conn: DBusConnection, user: str, tally: VerifyTally, deadline: float, on_status: StatusObserver | None
    ) -> VerifyResult:
        owner = self._name_owner(conn)
        device = self._default_device(conn)
        # Listen only to fprintd's own connection: any other client on the bus could emit a
        # "verify-match" on the device path, and that must not log anybody in.
        rule = MatchRule(
            type="signal", sender=owner, interface=DEVICE_IFACE, member="VerifyStatus", path=device.object_path
        )
        self._call_bus(conn, message_bus.AddMatch(rule))
        with conn.filter(rule, queue=deque(maxlen=_SIGNAL_QUEUE)) as signals:
            self._call(conn, device, "Claim", "s", (user,), action="Claim")
            started = False
            try:
                while True:
                    self._call(conn, device, "VerifyStart", "s", (self._finger,), action="VerifyStart")
                    started = True
                    notify_status(on_status, STATUS_READY)
                    step = self._follow(conn, signals, tally, deadline, on_status)
                    if step is not Step.RESTART:
                        break
                    self._call(conn, device, "VerifyStop", "", (), action="VerifyStop")
                    started = False
            finally:
                self._give_back(conn, device, started)
        assert tally.result is not None
        return tally.result

    def _follow(
        self,
        conn: DBusConnection,
        signals: deque[Message],
        tally: VerifyTally,
        deadline: float,
        on_status: StatusObserver | None,
    ) -> Step:
        """Feed VerifyStatus signals to the tally until it says restart or finish, or the deadline passes."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tally.timed_out()
                return Step.FINISH
            try:
                msg = conn.recv_until_filtered(signals, timeout=remaining)
            except TimeoutError:
                tally.timed_out()
                return Step.FINISH
            except OSError as err:
                raise NoSensor(f"bus connection lost during verification: {err}") from err
            status, done = _status_of(msg)
            notify_status(on_status, status)
            step = tally.feed(status, done)
            if step is not Step.CONTINUE:
                return step

    def _give_back(self, conn: DBusConnection, device: DBusAddress, started: bool) -> None:
        """Stop the verification and release the sensor, whatever happened before."""
        if started:
            try:
                self._call(conn, device, "VerifyStop", "", (), action="VerifyStop")
            except BiometricError as err:
                # NoActionInProgress after a finished verify is normal; anything else is worth a line.
                _LOG.debug("VerifyStop during clean-up: %s", err)
        try:
            self._call(conn, device, "Release", "", (), action="Release")
        except BiometricError as err:
            _LOG.warning("could not release the fingerprint sensor: %s", err)

    def _connect(self) -> DBusConnection:
        try:
            return open_dbus_connection(bus=self._bus_address, auth_timeout=self._call_timeout_s)
        except (OSError, ValueError, KeyError) as err:
            # OSError: no socket or refused; ValueError: a malformed address or jeepney's AuthenticationError;
            # KeyError: an address without the expected keys.
            raise NoSensor(f"cannot connect to the system bus ({self._bus_address}): {err}") from err

    def _name_owner(self, conn: DBusConnection) -> str:
        """Return fprintd's unique connection name, the only sender whose signals are believed."""
        try:
            body = self._call_bus(conn, message_bus.GetNameOwner(FPRINT_BUS_NAME))
        except BiometricError as err:
            raise NoSensor("fprintd is not running", error_name=err.error_name, dbus_message=err.dbus_message) from err
        return str(body[0])

    def _default_device(self, conn: DBusConnection) -> DBusAddress:
        body = self._call(conn, _MANAGER, "GetDefaultDevice", "", (), action="GetDefaultDevice")
        path = body[0] if body else None
        if not isinstance(path, str) or not path.startswith("/"):
            raise BiometricError(f"fprintd returned a malformed device path {path!r}")
        return DBusAddress(path, bus_name=FPRINT_BUS_NAME, interface=DEVICE_IFACE)

    def _call(
        self,
        conn: DBusConnection,
        address: DBusAddress,
        method: str,
        signature: str,
        body: tuple[Any, ...],
        *,
        action: str,
    ) -> tuple[Any, ...]:
        msg = new_method_call(address, method, signature or None, body)
        return self._send(conn, msg, action)

    def _call_bus(self, conn: DBusConnection, msg: Message) -> tuple[Any, ...]:
        return self._send(conn, msg, str(msg.header.fields.get(HeaderFields.member, "bus call")))

    def _send(self, conn: DBusConnection, msg: Message, action: str) -> tuple[Any, ...]:
        try:
            reply = conn.send_and_get_reply(msg, timeout=self._call_timeout_s)
        except TimeoutError as err:
            raise VerifyTimeout(f"fprintd did not answer {action} within {self._call_timeout_s:g} s") from err
        except OSError as err:
            raise NoSensor(f"bus connection lost during {action}: {err}") from err
        if reply.header.message_type == MessageType.error:
            err_reply = DBusErrorResponse(reply)
            raise translate_dbus_error(err_reply, action) from err_reply
        return tuple(reply.body)


def _status_of(msg: Message) -> tuple[str, bool]:
    """Read (result, done) from a VerifyStatus signal, tolerating a malformed body."""
    body = msg.body
    if isinstance(body, tuple) and len(body) == 2 and isinstance(body[0], str) and isinstance(body[1], bool):
        return body[0], body[1]
    # A body of the wrong shape becomes an unknown, finished status: it fails closed in the tally.
    return f"<malformed VerifyStatus body {body!r}>", True
