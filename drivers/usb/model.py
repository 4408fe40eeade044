"""Typed snapshots of USB devices as the driver reads them, and USBGuard's device hash.

Device hash (``device_hash``): the value USBGuard's ``hash`` attribute holds, computed the way
usbguard-daemon 1.1.2 computes it (``DevicePrivate::initializeHash`` and ``DeviceBase``), checked
byte for byte against the daemon under umockdev (``tests/test_usb_usbguard.py``)::

    digest = SHA-256( product           # the sysfs `product` file, "" when absent
                    + idVendor          # the sysfs files as read ("0781"), no separator
                    + idProduct
                    + serial            # the sysfs `serial` file, "" when absent
                    + descriptors )     # the raw bytes of the sysfs `descriptors` file; for a Linux root
                                        # hub (1d6b:0001/0002/0003) with bcdDevice set to 0
    device_hash = base64(digest)        # standard alphabet with padding: 44 characters

Every sysfs text is taken as USBGuard reads it: the raw bytes with trailing NUL, LF, CR, TAB and BS
removed (nothing else; leading and inner spaces stay).

``parent_hash`` is the ``device_hash`` of the parent device (a hub or the root hub ``usbN``); a root
hub's ``parent_hash`` is base64(SHA-256) of its parent's sysfs path below the sysfs mount (the host
controller, e.g. ``/devices/pci0000:00/0000:00:14.0``), or ``""`` when the tree is not laid out like
sysfs (a flat test tree) and that path is unknown. ``descriptors_hash`` is base64(SHA-256(descriptors))
alone, useful to tell "same product, different firmware" apart from "different serial".
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Literal

# What the kernel writes in port/connect_type ("hotplug", "hardwired", "not used", "unknown"), kept as
# read; "" when the file is missing and for root hubs, which USBGuard does not read it for.
ConnectType = str
Removable = Literal["removable", "fixed", "unknown"]

# How many trailing serial characters a log line may show: enough to tell two sticks apart on a
# desk, too few to copy a registered medium's serial from the logs.
SERIAL_VISIBLE_CHARS = 4

# Linux root hubs: USBGuard hashes their device descriptor with bcdDevice (the kernel version) zeroed,
# so that a kernel update does not change the hash.
LINUX_FOUNDATION_VENDOR = 0x1D6B
LINUX_ROOT_HUB_PRODUCTS = frozenset({0x0001, 0x0002, 0x0003})
_DEVICE_DESCRIPTOR_LENGTH = 18
_BCD_DEVICE_OFFSET = 12


def usbguard_trim(raw: bytes) -> bytes:
    """Return a sysfs attribute as USBGuard reads it: trailing NUL, LF, CR, TAB and BS removed."""
    return raw.rstrip(b"\x00\n\r\t\b")


def hashed_descriptors(descriptors: bytes) -> bytes:
    """Return the descriptor bytes USBGuard hashes: a Linux root hub's bcdDevice zeroed, else unchanged."""
    if len(descriptors) < _DEVICE_DESCRIPTOR_LENGTH or descriptors[:2] != b"\x12\x01":
        return descriptors
    vendor = int.from_bytes(descriptors[8:10], "little")
    product = int.from_bytes(descriptors[10:12], "little")
    if vendor != LINUX_FOUNDATION_VENDOR or product not in LINUX_ROOT_HUB_PRODUCTS:
        return descriptors
    start = _BCD_DEVICE_OFFSET
    return descriptors[:start] + b"\x00\x00" + descriptors[start + 2 :]


def compute_device_hash(name: bytes, vendor_id: bytes, product_id: bytes, serial: bytes, descriptors: bytes) -> str:
    """Return USBGuard's device hash: base64 SHA-256 over product, idVendor, idProduct, serial, descriptors."""
    digest = hashlib.sha256()
    for part in (name, vendor_id, product_id, serial, hashed_descriptors(descriptors)):
        digest.update(part)
    return base64.b64encode(digest.digest()).decode("ascii")


def compute_path_hash(sysfs_path: str) -> str:
    """Return USBGuard's parent hash of a root hub: base64 SHA-256 of its parent's sysfs path."""
    return base64.b64encode(hashlib.sha256(sysfs_path.encode("utf-8", "surrogateescape")).digest()).decode("ascii")


def compute_descriptors_hash(descriptors: bytes) -> str:
    """Return base64 SHA-256 of the raw descriptor bytes alone."""
    return base64.b64encode(hashlib.sha256(descriptors).digest()).decode("ascii")


def mask_serial(serial: str) -> str:
    """Return the serial with all but its last four characters hidden (all hidden when it is short)."""
    if not serial:
        return ""
    if len(serial) <= SERIAL_VISIBLE_CHARS:
        # Showing the last four of a four-character serial would show all of it.
        return "***"
    return "***" + serial[-SERIAL_VISIBLE_CHARS:]


@dataclass(frozen=True, slots=True)
class UsbInterface:
    """One interface a device declares: number and class/subclass/protocol triple."""

    number: int
    cls: int
    subclass: int
    protocol: int
    authorized: bool = True

    @property
    def type_text(self) -> str:
        """Return the interface type as USBGuard writes it, e.g. ``08:06:50``."""
        return f"{self.cls:02x}:{self.subclass:02x}:{self.protocol:02x}"


@dataclass(frozen=True, slots=True)
class UsbDevice:
    """A USB device as read from sysfs; never shows the full serial in repr/str."""

    sys_name: str
    bus: int
    port_path: str
    vendor_id: str
    product_id: str
    serial: str = field(repr=False)
    manufacturer: str
    product: str
    device_class: int
    device_subclass: int
    device_protocol: int
    interfaces: tuple[UsbInterface, ...]
    parent: str | None
    connect_type: ConnectType
    removable: Removable
    descriptors_hash: str
    device_hash: str
    parent_hash: str
    authorized: bool
    # USBGuard's view of the device, for rule matching: every interface descriptor in descriptor order
    # (an alternate setting or a further configuration counts again, as USBGuard counts it), and the
    # product and serial strings as the raw sysfs bytes (trimmed as USBGuard trims them).
    rule_interfaces: tuple[tuple[int, int, int], ...]
    raw_product: bytes = field(repr=False)
    raw_serial: bytes = field(repr=False)

    @property
    def device_id(self) -> str:
        """Return ``vvvv:pppp`` as used by the rule language."""
        return f"{self.vendor_id}:{self.product_id}"

    @property
    def masked_serial(self) -> str:
        """Return the serial safe for logs: only its last four characters visible."""
        return mask_serial(self.serial)

    @property
    def is_root_hub(self) -> bool:
        """Return whether this is a root hub (``usbN``)."""
        return self.parent is None

    @property
    def interface_types(self) -> tuple[tuple[int, int, int], ...]:
        """Return the distinct (class, subclass, protocol) triples, one per interface, in descriptor order."""
        return tuple((i.cls, i.subclass, i.protocol) for i in self.interfaces)

    def __repr__(self) -> str:
        return (
            f"UsbDevice(sys_name={self.sys_name!r}, id={self.device_id}, serial={self.masked_serial!r}, "
            f"product={self.product!r}, interfaces=[{' '.join(i.type_text for i in self.interfaces)}], "
            f"authorized={self.authorized}, hash={self.device_hash!r})"
        )

    def __str__(self) -> str:
        name = self.product or "?"
        return f"{self.sys_name} {self.device_id} {name!r} serial={self.masked_serial or '-'}"
