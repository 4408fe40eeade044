"""A pyusb backend that emulates USB HID relay boards (16c0:05df "USBRelayN") at the libusb boundary.

pyusb's own ``usb.core.find(..., backend=...)``, ``Device``, string descriptors and ``ctrl_transfer`` run
unmodified on top of it; only what libusb would do is emulated: enumeration, descriptors, open/claim with
the kernel's usbhid driver holding interface 0 (claiming it without detaching fails with BUSY, as on Linux),
and the board's firmware answering GET_REPORT/SET_REPORT feature requests. Errors are raised the way
pyusb's libusb1 backend raises them: ``USBError(strerror, libusb_code, errno)``.
"""

from __future__ import annotations

import array
import errno
import threading
from dataclasses import dataclass, field
from typing import Any

import usb.backend
import usb.core

LIBUSB_ERROR_IO, LIBUSB_ERROR_ACCESS, LIBUSB_ERROR_NO_DEVICE = -1, -3, -4
LIBUSB_ERROR_BUSY, LIBUSB_ERROR_TIMEOUT, LIBUSB_ERROR_PIPE = -6, -7, -9
_ERRORS = {
    LIBUSB_ERROR_IO: ("Input/Output Error", errno.EIO),
    LIBUSB_ERROR_ACCESS: ("Access denied (insufficient permissions)", errno.EACCES),
    LIBUSB_ERROR_NO_DEVICE: ("No such device (it may have been disconnected)", errno.ENODEV),
    LIBUSB_ERROR_BUSY: ("Resource busy", errno.EBUSY),
    LIBUSB_ERROR_TIMEOUT: ("Operation timed out", errno.ETIMEDOUT),
    LIBUSB_ERROR_PIPE: ("Pipe error", errno.EPIPE),
}


def usb_error(code: int) -> usb.core.USBError:
    """Return the exception pyusb's libusb1 backend raises for a libusb error code."""
    text, number = _ERRORS[code]
    if code == LIBUSB_ERROR_TIMEOUT:
        return usb.core.USBTimeoutError(text, code, number)
    return usb.core.USBError(text, code, number)


@dataclass(eq=False)
class EmulatedHidRelay:
    """One board: its serial (report bytes 0–4), relay count, bus position and the relay bitmap."""

    serial: str = "QAAMZ"
    relays: int = 2
    bus: int = 1
    ports: tuple[int, ...] = (2,)
    address: int = 5
    product: str | None = None
    manufacturer: str = "www.dcttech.com"
    state: int = 0
    kernel_driver: bool = True  # usbhid holds interface 0 until someone detaches it
    plugged: bool = True
    access_denied: bool = False  # the device node is not ours (no udev rule)
    stalled: bool = False  # the firmware stopped answering control transfers (timeouts)
    ignores_commands: bool = False  # acknowledges SET_REPORT but does not switch (a broken board)
    vendor_id: int = 0x16C0
    product_id: int = 0x05DF
    transfers: list[tuple[int, int, int, int, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.product is None:
            self.product = f"USBRelay{self.relays}"

    def feature_report(self) -> bytes:
        """Return the 8-byte feature report the firmware answers GET_REPORT with."""
        return self.serial.encode("ascii")[:5].ljust(5, b"\x00") + b"\x00\x00" + bytes([self.state])

    def set_report(self, data: bytes) -> None:
        """Act on a SET_REPORT feature report as the firmware does (unknown commands are ignored)."""
        if self.ignores_commands or not data:
            return
        mask = (1 << self.relays) - 1
        command = data[0]
        number = data[1] if len(data) > 1 else 0
        if command == 0xFE:
            self.state |= mask
        elif command == 0xFC:
            self.state &= ~mask & 0xFF
        elif command in (0xFF, 0xFD) and 1 <= number <= self.relays:
            bit = 1 << (number - 1)
            self.state = self.state | bit if command == 0xFF else self.state & ~bit & 0xFF

    def unplug(self) -> None:
        """Pull the board out of the USB port."""
        self.plugged = False

    def plug(self) -> None:
        """Plug it back in: a V-USB board starts with every relay off and usbhid bound again."""
        self.plugged = True
        self.state = 0
        self.kernel_driver = True


@dataclass
class _DeviceDescriptor:
    bLength: int
    bDescriptorType: int
    bcdUSB: int
    bDeviceClass: int
    bDeviceSubClass: int
    bDeviceProtocol: int
    bMaxPacketSize0: int
    idVendor: int
    idProduct: int
    bcdDevice: int
    iManufacturer: int
    iProduct: int
    iSerialNumber: int
    bNumConfigurations: int
    address: int
    bus: int
    port_number: int
    port_numbers: tuple[int, ...]
    speed: int


@dataclass
class _ConfigDescriptor:
    bLength: int = 9
    bDescriptorType: int = 2
    wTotalLength: int = 34
    bNumInterfaces: int = 1
    bConfigurationValue: int = 1
    iConfiguration: int = 0
    bmAttributes: int = 0x80
    bMaxPower: int = 10
    extra_descriptors: list[int] = field(default_factory=list)


@dataclass
class _InterfaceDescriptor:
    bLength: int = 9
    bDescriptorType: int = 4
    bInterfaceNumber: int = 0
    bAlternateSetting: int = 0
    bNumEndpoints: int = 1
    bInterfaceClass: int = 3  # HID
    bInterfaceSubClass: int = 0
    bInterfaceProtocol: int = 0
    iInterface: int = 0
    extra_descriptors: list[int] = field(default_factory=list)


@dataclass
class _EndpointDescriptor:
    bLength: int = 7
    bDescriptorType: int = 5
    bEndpointAddress: int = 0x81
    bmAttributes: int = 0x03  # interrupt
    wMaxPacketSize: int = 8
    bInterval: int = 20
    bRefresh: int = 0
    bSynchAddress: int = 0
    extra_descriptors: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Handle:
    board: EmulatedHidRelay
    claimed: set[int] = field(default_factory=set)


class HidRelayBackend(usb.backend.IBackend):
    """Emulated libusb for a set of HID relay boards (and, for contrast, other devices sharing the id)."""

    def __init__(self, *boards: EmulatedHidRelay) -> None:
        self.boards = list(boards)
        self.lock = threading.Lock()
        self.opened = 0

    def _alive(self, board: EmulatedHidRelay) -> None:
        if not board.plugged:
            raise usb_error(LIBUSB_ERROR_NO_DEVICE)

    # -- enumeration and descriptors --

    def enumerate_devices(self) -> list[EmulatedHidRelay]:
        """List the plugged boards."""
        with self.lock:
            return [board for board in self.boards if board.plugged]

    def get_device_descriptor(self, dev: EmulatedHidRelay) -> _DeviceDescriptor:
        """Return the board's device descriptor (low speed, V-USB's shared HID ids)."""
        return _DeviceDescriptor(
            bLength=18,
            bDescriptorType=1,
            bcdUSB=0x0110,
            bDeviceClass=0,
            bDeviceSubClass=0,
            bDeviceProtocol=0,
            bMaxPacketSize0=8,
            idVendor=dev.vendor_id,
            idProduct=dev.product_id,
            bcdDevice=0x0100,
            iManufacturer=1,
            iProduct=2,
            iSerialNumber=0,
            bNumConfigurations=1,
            address=dev.address,
            bus=dev.bus,
            port_number=dev.ports[-1],
            port_numbers=dev.ports,
            speed=1,  # low speed
        )

    def get_configuration_descriptor(self, dev: EmulatedHidRelay, config: int) -> _ConfigDescriptor:
        """Return the single configuration."""
        if config != 0:
            raise IndexError("no such configuration")
        return _ConfigDescriptor()

    def get_interface_descriptor(self, dev: EmulatedHidRelay, intf: int, alt: int, config: int) -> _InterfaceDescriptor:
        """Return the HID interface."""
        if (intf, alt, config) != (0, 0, 0):
            raise IndexError("no such interface")
        return _InterfaceDescriptor()

    def get_endpoint_descriptor(
        self, dev: EmulatedHidRelay, ep: int, intf: int, alt: int, config: int
    ) -> _EndpointDescriptor:
        """Return the interrupt IN endpoint."""
        if (ep, intf, alt, config) != (0, 0, 0, 0):
            raise IndexError("no such endpoint")
        return _EndpointDescriptor()

    # -- handles --

    def open_device(self, dev: EmulatedHidRelay) -> _Handle:
        """Open the board: fails with ACCESS without permission, NO_DEVICE once unplugged."""
        self._alive(dev)
        if dev.access_denied:
            raise usb_error(LIBUSB_ERROR_ACCESS)
        with self.lock:
            self.opened += 1
        return _Handle(dev)

    def close_device(self, dev_handle: _Handle) -> None:
        """Close a handle."""
        with self.lock:
            self.opened -= 1

    def get_configuration(self, dev_handle: _Handle) -> int:
        """Return the active configuration value."""
        self._alive(dev_handle.board)
        return 1

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        """Accept configuration 1."""
        self._alive(dev_handle.board)

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        """Claim an interface: BUSY while the kernel's usbhid driver still holds it."""
        self._alive(dev_handle.board)
        if dev_handle.board.kernel_driver:
            raise usb_error(LIBUSB_ERROR_BUSY)
        dev_handle.claimed.add(intf)

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        """Release an interface."""
        dev_handle.claimed.discard(intf)
        self._alive(dev_handle.board)

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        """Return whether usbhid holds the interface."""
        self._alive(dev_handle.board)
        return dev_handle.board.kernel_driver

    def detach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        """Take the interface from usbhid."""
        self._alive(dev_handle.board)
        dev_handle.board.kernel_driver = False

    def attach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        """Give the interface back to usbhid."""
        self._alive(dev_handle.board)
        dev_handle.board.kernel_driver = True

    # -- control transfers --

    def ctrl_transfer(
        self, dev_handle: _Handle, bmRequestType: int, bRequest: int, wValue: int, wIndex: int, data: Any, timeout: int
    ) -> int:
        """Answer a control transfer as the board's USB stack and firmware would."""
        board = dev_handle.board
        self._alive(board)
        if board.stalled:
            raise usb_error(LIBUSB_ERROR_TIMEOUT)
        board.transfers.append((bmRequestType, bRequest, wValue, wIndex, bytes(data)))
        kind = bmRequestType & 0x60
        device_to_host = bool(bmRequestType & 0x80)
        if kind == 0x00 and bRequest == 0x06 and device_to_host:
            return _fill(data, self._descriptor(board, wValue))
        if kind == 0x20 and (wValue >> 8) == 0x03:  # class request on the feature report
            if bRequest == 0x01 and device_to_host:
                return _fill(data, board.feature_report())
            if bRequest == 0x09 and not device_to_host:
                board.set_report(bytes(data))
                return len(data)
        raise usb_error(LIBUSB_ERROR_PIPE)  # a request the firmware does not know: the device stalls

    def _descriptor(self, board: EmulatedHidRelay, w_value: int) -> bytes:
        kind, index = w_value >> 8, w_value & 0xFF
        if kind != 0x03:
            raise usb_error(LIBUSB_ERROR_PIPE)
        if index == 0:
            return bytes([4, 3, 0x09, 0x04])  # language ids: en-US
        strings = {1: board.manufacturer, 2: board.product or ""}
        if index not in strings:
            raise usb_error(LIBUSB_ERROR_PIPE)
        encoded = strings[index].encode("utf-16-le")
        return bytes([2 + len(encoded), 3]) + encoded


def _fill(buffer: array.array[int], payload: bytes) -> int:
    # libusb writes into the caller's buffer and returns how many bytes it wrote.
    count = min(len(buffer), len(payload))
    buffer[:count] = array.array("B", payload[:count])
    return count
