"""The common USB HID relay boards (16c0:05df, product string "USBRelay1/2/4/8", V-USB firmware) through pyusb.

The board is driven with HID feature reports over control transfers on interface 0:

- GET_REPORT (feature, report id 0, 8 bytes) answers ``serial[5] . . state``: bytes 0–4 are the board's
  ASCII serial (the USB serial-number string is not unique on these boards), byte 7 the relay bitmap,
  bit n-1 for relay n.
- SET_REPORT (feature, report id 0, 8 bytes): ``FF n`` switches relay n on, ``FD n`` off; ``FE`` switches
  every relay on, ``FC`` every relay off. Relays are numbered from 1 on the board, from 0 here.

On Linux the kernel's usbhid driver holds interface 0; it is detached before the first transfer and given
back on ``stop``. The board has no inputs and no feedback contacts, and no timer of its own: ``max_on_ms`` is
enforced by this host (a dead host leaves a released lock released; prefer the serial locker board where that
matters). A poller reads the state every ``poll_interval_s``: a board that stops answering is reported
offline, and one that comes back has lost power on the way (USB re-plug), so it is reported rebooted with
every relay off; a relay found in a state nobody commanded is reported as a ``RelayFault``.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import usb.core
import usb.util

from sekisho.drivers.locker.errors import BoardError, BoardRefused, BoardTimeout, BoardUnavailable
from sekisho.drivers.locker.events import (
    BoardEvent,
    BoardObserver,
    BoardOffline,
    BoardOnline,
    BoardRebooted,
    BoardStatus,
    RelayFault,
    RelayTimerExpired,
)
from sekisho.drivers.locker.protocol import NAK_REASONS, encode_set_relay
from sekisho.drivers.observers import ObserverList

_LOG = logging.getLogger(__name__)

VENDOR_ID = 0x16C0
PRODUCT_ID = 0x05DF
PRODUCT_PREFIX = "USBRelay"
REPORT_LENGTH = 8
MAX_RELAYS = 8  # one bitmap byte

_HID_GET_REPORT = 0x01
_HID_SET_REPORT = 0x09
_FEATURE_REPORT_ID0 = 0x03 << 8  # wValue: report type "feature" in the high byte, report id 0
_REQUEST_IN = 0xA1  # device-to-host | class | interface
_REQUEST_OUT = 0x21  # host-to-device | class | interface
_INTERFACE = 0
_CMD_ON, _CMD_OFF, _CMD_ALL_ON, _CMD_ALL_OFF = 0xFF, 0xFD, 0xFE, 0xFC
_SERIAL_LENGTH = 5
_STATE_BYTE = 7
_NAK_BAD_INDEX = next(code for code, name in NAK_REASONS.items() if name == "bad_index")
_LIBUSB_ERROR_ACCESS, _LIBUSB_ERROR_NO_DEVICE, _LIBUSB_ERROR_BUSY = -3, -4, -6


class HidRelayNotFound(BoardUnavailable):
    """No HID relay board (or not the one asked for) is on the bus."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="not_found")


class HidRelayAccessDenied(BoardUnavailable):
    """The board is there but this process may not open it (udev permissions); keeps errno and libusb's code."""


@dataclass(frozen=True, slots=True)
class HidRelayInfo:
    """A HID relay board found on the bus."""

    serial: str
    relays: int
    path: str | None  # "bus-port.port", as in /sys/bus/usb/devices
    product: str | None


def usb_path(device: Any) -> str | None:
    """Return a device's bus path ("1-2.3"), or None if the backend does not know its ports."""
    ports = getattr(device, "port_numbers", None)
    if device.bus is None or not ports:
        return None
    return f"{device.bus}-{'.'.join(str(port) for port in ports)}"


def translate_usb_error(err: usb.core.USBError, what: str) -> BoardError:
    """Turn a pyusb error into the project's exception, keeping errno, libusb's code and the error as cause."""
    translated = _translate(err, what)
    # Chained here, not only by ``raise … from``: a translated error may be kept and raised later.
    translated.__cause__ = err
    return translated


def _translate(err: usb.core.USBError, what: str) -> BoardError:
    code = getattr(err, "backend_error_code", None)
    number = err.errno
    if isinstance(err, usb.core.USBTimeoutError):
        return BoardTimeout(f"{what}: the HID relay board did not answer ({err})")
    if number in (errno_codes.EACCES, errno_codes.EPERM) or code == _LIBUSB_ERROR_ACCESS:
        return HidRelayAccessDenied(
            f"{what}: permission denied; allow this user {VENDOR_ID:04x}:{PRODUCT_ID:04x} (udev rule)",
            reason="permission_denied",
            errno=number,
            backend_code=code,
        )
    if number == errno_codes.ENODEV or code == _LIBUSB_ERROR_NO_DEVICE:
        return BoardUnavailable(f"{what}: the HID relay board is gone", reason="gone", errno=number, backend_code=code)
    if number == errno_codes.EBUSY or code == _LIBUSB_ERROR_BUSY:
        return BoardUnavailable(f"{what}: the board is busy: {err}", reason="busy", errno=number, backend_code=code)
    return BoardUnavailable(f"{what}: {err}", reason="usb_error", errno=number, backend_code=code)


def _product(device: Any) -> str | None:
    try:
        return str(usb.util.get_string(device, device.iProduct)) if device.iProduct else None
    except (usb.core.USBError, ValueError):
        # No permission to open the device (pyusb then has no language ids), or no string at all.
        return None


def _read_report(device: Any, timeout_ms: int) -> bytes:
    data = device.ctrl_transfer(
        _REQUEST_IN, _HID_GET_REPORT, _FEATURE_REPORT_ID0, _INTERFACE, REPORT_LENGTH, timeout_ms
    )
    if len(data) < REPORT_LENGTH:
        raise BoardError(f"the HID relay board sent a {len(data)}-byte feature report", reason="malformed")
    return bytes(data)


def _take_interface(device: Any) -> bool:
    """Detach the kernel's HID driver from interface 0 if it holds it; return whether it was detached."""
    try:
        if device.is_kernel_driver_active(_INTERFACE):
            device.detach_kernel_driver(_INTERFACE)
            return True
    except NotImplementedError:
        pass  # not Linux: no kernel driver to take the interface from
    return False


def _give_back(device: Any, detached: bool) -> None:
    """Release the device and, if it was taken from the kernel's HID driver, return it; never raises."""
    try:
        usb.util.dispose_resources(device)
        if detached:
            device.attach_kernel_driver(_INTERFACE)
    except (usb.core.USBError, NotImplementedError) as err:
        _LOG.debug("giving the HID relay board back failed: %s", err)
    finally:
        usb.util.dispose_resources(device)


def _open_and_read(device: Any, timeout_ms: int) -> tuple[bytes, bool]:
    """Take interface 0 and read the feature report; return it and whether the kernel driver was detached."""
    detached = False
    try:
        detached = _take_interface(device)
        return _read_report(device, timeout_ms), detached
    except BaseException:
        _give_back(device, detached)
        raise


def _serial_of(report: bytes) -> str:
    return report[:_SERIAL_LENGTH].decode("ascii", "replace").rstrip("\x00")


def find_hid_relays(*, backend: Any = None, timeout_ms: int = 500) -> list[HidRelayInfo]:
    """List the HID relay boards on the bus (each is opened briefly to read its serial)."""
    found: list[HidRelayInfo] = []
    for device in _devices(backend):
        product = _product(device)
        if product is not None and not product.startswith(PRODUCT_PREFIX):
            continue
        try:
            report, detached = _open_and_read(device, timeout_ms)
        except (usb.core.USBError, BoardError) as err:
            _LOG.debug("HID relay at %s unreadable: %s", usb_path(device), err)
            continue
        _give_back(device, detached)
        found.append(HidRelayInfo(_serial_of(report), _relay_count(product, None), usb_path(device), product))
    return found


def _devices(backend: Any) -> list[Any]:
    try:
        return list(usb.core.find(find_all=True, idVendor=VENDOR_ID, idProduct=PRODUCT_ID, backend=backend))
    except usb.core.NoBackendError as err:
        raise BoardUnavailable("no libusb backend: install libusb-1.0", reason="no_backend") from err
    except usb.core.USBError as err:
        raise translate_usb_error(err, "listing USB devices") from err


def _relay_count(product: str | None, configured: int | None) -> int:
    if product is not None and product[len(PRODUCT_PREFIX) :].isdigit():
        return min(int(product[len(PRODUCT_PREFIX) :]), MAX_RELAYS)
    return configured if configured is not None else MAX_RELAYS


class HidRelayBoard:
    """A USB HID relay board as a lock board: relays only, no door sensors, key slots or tamper switch."""

    def __init__(
        self,
        *,
        serial: str | None = None,
        path: str | None = None,
        relays: int | None = None,
        backend: Any = None,
        poll_interval_s: float = 1.0,
        timeout_ms: int = 500,
    ) -> None:
        if relays is not None and not 1 <= relays <= MAX_RELAYS:
            raise ValueError(f"relays must be in 1..{MAX_RELAYS}")
        if poll_interval_s <= 0 or timeout_ms <= 0:
            raise ValueError("poll_interval_s and timeout_ms must be positive")
        self._serial_wanted = serial
        self._path_wanted = path
        self._relays_configured = relays
        self._backend = backend
        self._poll_interval_s = poll_interval_s
        self._timeout_ms = timeout_ms
        self._io = threading.RLock()  # one USB conversation at a time, and the state that goes with it
        self._device: Any = None
        self._detached = False
        self._info: HidRelayInfo | None = None
        self._commanded: list[bool] = []
        self._faulted: set[int] = set()
        self._timers: dict[int, float] = {}  # relay -> monotonic time to release it
        self._online = False
        self._reconnects = 0
        self._observers: ObserverList[BoardEvent] = ObserverList("HID relay board")
        self._events: queue.SimpleQueue[BoardEvent | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- LockIO ----------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Return whether the board answers."""
        return self._online

    @property
    def info(self) -> HidRelayInfo | None:
        """Return the board in use (serial, relay count, bus path), once started."""
        return self._info

    @property
    def relays(self) -> int:
        """Return the number of relays (0 before start)."""
        return len(self._commanded)

    def start(self) -> None:
        """Find and open the board, detaching the kernel's HID driver; raise BoardUnavailable if that fails."""
        with self._io:
            if self._thread is not None:
                return
            state = self._connect()
            self._commanded = [bool(state >> index & 1) for index in range(len(self._commanded))]
            self._online = True
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="hid-relay", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the poller; release relays still waiting for their timer; give the device back. Idempotent."""
        with self._io:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._stop.set()
            self._events.put(None)
        if thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._io:
            # Their max_on_ms was this host's promise; with the host's timer gone, keep it now.
            for index in list(self._timers):
                try:
                    self._switch(index, False)
                except BoardError as err:
                    _LOG.error("relay %d not released at stop: %s", index, err)
            self._timers.clear()
            self._disconnect()
            self._online = False

    def subscribe(self, observer: BoardObserver) -> Callable[[], None]:
        """Deliver board events to ``observer`` (on the poller thread); return an unsubscriber."""
        return self._observers.add(observer)

    def set_relay(self, index: int, on: bool, max_on_ms: int | None = None, timeout_s: float = 0.5) -> None:
        """Switch a relay and read it back; with ``max_on_ms`` this host switches it off again after that long."""
        encode_set_relay(index, on, max_on_ms)  # the same argument checks as the serial board
        with self._io:
            if self._thread is None:
                raise BoardError("the HID relay board is not started", reason="not_started")
            if index >= len(self._commanded):
                message = f"relay {index}: the board has {len(self._commanded)} relays"
                raise BoardRefused(message, reason="bad_index", nak_code=_NAK_BAD_INDEX)
            self._switch(index, on, timeout_ms=max(1, int(timeout_s * 1000 / 2)))
            if on and max_on_ms is not None:
                self._timers[index] = time.monotonic() + max_on_ms / 1000
            else:
                self._timers.pop(index, None)
        self._events.put(None)  # the poller's next deadline may have moved

    def status(self, timeout_s: float = 0.5) -> BoardStatus:
        """Read the relay bitmap (the board has no feedback contacts: commanded and sensed are the same bits)."""
        with self._io:
            state = self._read_state(max(1, int(timeout_s * 1000)))
            bits = tuple(bool(state >> index & 1) for index in range(len(self._commanded)))
        return BoardStatus(bits, bits, (), (), tamper=False, boot_count=None)

    def __enter__(self) -> HidRelayBoard:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- USB -------------------------------------------------------------------------------------

    def _connect(self) -> int:
        """Find, take and read the board (caller holds ``_io``); return the relay bitmap."""
        device, product, report, detached = self._find()
        self._device, self._detached = device, detached
        relays = _relay_count(product, self._relays_configured)
        if self._relays_configured is not None and relays != self._relays_configured:
            _LOG.warning("HID relay board says %s; configured for %d relays", product, self._relays_configured)
        self._info = HidRelayInfo(_serial_of(report), relays, usb_path(device), product)
        if len(self._commanded) != relays:
            self._commanded = [False] * relays
        _LOG.info("HID relay board %s (%d relays) at %s", self._info.serial, relays, self._info.path)
        return report[_STATE_BYTE]

    def _find(self) -> tuple[Any, str | None, bytes, bool]:
        matches: list[tuple[Any, str | None, bytes, bool]] = []
        failure: BoardError | None = None
        for device in _devices(self._backend):
            if self._path_wanted is not None and usb_path(device) != self._path_wanted:
                continue
            product = _product(device)
            if product is not None and not product.startswith(PRODUCT_PREFIX):
                continue  # 16c0:05df is V-USB's shared HID id: other hobby devices use it too
            try:
                report, detached = _open_and_read(device, self._timeout_ms)
            except usb.core.USBError as err:
                failure = translate_usb_error(err, f"opening the HID relay board at {usb_path(device)}")
                continue
            except BoardError as err:
                failure = err
                continue
            if self._serial_wanted is not None and _serial_of(report) != self._serial_wanted:
                _give_back(device, detached)
                continue
            matches.append((device, product, report, detached))
        wanted = " ".join(
            f"{key}={value}" for key, value in (("serial", self._serial_wanted), ("path", self._path_wanted)) if value
        )
        if not matches:
            if failure is not None:
                raise failure
            raise HidRelayNotFound(f"no HID relay board {VENDOR_ID:04x}:{PRODUCT_ID:04x} {wanted}".rstrip())
        if len(matches) > 1:
            for device, _, _, detached in matches:
                _give_back(device, detached)
            serials = ", ".join(_serial_of(report) for _, _, report, _ in matches)
            raise BoardUnavailable(
                f"several HID relay boards ({serials}): choose one by serial or path", reason="ambiguous"
            )
        return matches[0]

    def _disconnect(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            _give_back(device, self._detached)
        self._detached = False

    def _read_state(self, timeout_ms: int | None = None) -> int:
        if self._device is None:
            raise BoardUnavailable("the HID relay board is not connected", reason="gone")
        try:
            return _read_report(self._device, timeout_ms or self._timeout_ms)[_STATE_BYTE]
        except usb.core.USBError as err:
            raise translate_usb_error(err, "reading the relay state") from err

    def _switch(self, index: int, on: bool, *, timeout_ms: int | None = None) -> None:
        """Send the feature report for one relay and check the board's bitmap took it (caller holds ``_io``)."""
        if self._device is None:
            raise BoardUnavailable("the HID relay board is not connected", reason="gone")
        report = bytes([_CMD_ON if on else _CMD_OFF, index + 1]).ljust(REPORT_LENGTH, b"\x00")
        try:
            self._device.ctrl_transfer(
                _REQUEST_OUT, _HID_SET_REPORT, _FEATURE_REPORT_ID0, _INTERFACE, report, timeout_ms or self._timeout_ms
            )
        except usb.core.USBError as err:
            raise translate_usb_error(err, f"switching relay {index}") from err
        state = self._read_state(timeout_ms)
        self._commanded[index] = on
        if bool(state >> index & 1) != on:
            raise BoardError(f"relay {index} did not switch {'on' if on else 'off'}", reason="not_applied")

    # ---- poller ----------------------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic() + self._poll_interval_s
        while not self._stop.is_set():
            with self._io:
                deadlines = [next_poll, *self._timers.values()]
            self._observers.deliver_queued(self._events, min(deadlines) - time.monotonic())
            if self._stop.is_set():
                return
            try:
                self._release_expired()
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self._poll_interval_s
                    self._poll()
            except Exception:  # the poller is the board's only supervisor: it must survive
                _LOG.exception("HID relay poll failed")

    def _release_expired(self) -> None:
        now = time.monotonic()
        with self._io:
            for index, deadline in list(self._timers.items()):
                if deadline > now or not self._online:
                    continue  # an offline board is retried when it is back (it lost its relays anyway)
                try:
                    self._switch(index, False)
                except BoardError as err:
                    _LOG.error("relay %d not released at the end of its max_on time: %s", index, err)
                    continue
                del self._timers[index]
                self._events.put(RelayTimerExpired(index))

    def _poll(self) -> None:
        with self._io:
            if self._device is None:
                self._reconnect()
                return
            try:
                state = self._read_state()
            except BoardError as err:
                if self._online:
                    _LOG.warning("HID relay board stopped answering: %s", err)
                    self._online = False
                    self._events.put(BoardOffline())
                self._disconnect()
                return
            for index, commanded in enumerate(self._commanded):
                sensed = bool(state >> index & 1)
                if sensed != commanded and index not in self._faulted:
                    self._faulted.add(index)
                    self._events.put(RelayFault(index, commanded, sensed))
                elif sensed == commanded and index in self._faulted:
                    self._faulted.discard(index)
                    self._events.put(RelayFault(index, commanded, sensed))

    def _reconnect(self) -> None:
        try:
            state = self._connect()
        except BoardError as err:
            _LOG.debug("HID relay board not back yet: %s", err)
            return
        # Coming back means it was unplugged or lost power: V-USB boards start with every relay off.
        self._commanded = [bool(state >> index & 1) for index in range(len(self._commanded))]
        self._faulted.clear()
        self._timers.clear()
        self._reconnects += 1
        self._online = True
        _LOG.info("HID relay board is back")
        self._events.put(BoardRebooted(self._reconnects))
        self._events.put(BoardOnline())
