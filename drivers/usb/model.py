"""Typed snapshots of USB devices as the driver reads them, and the device hash.

Device hash recipe (``device_hash``), chosen to use the same inputs USBGuard documents for its
``hash`` attribute — the device ID, the serial number and the USB descriptor data::

    digest = SHA-256( "vvvv:pppp"            # idVendor ':' idProduct, 4 lowercase hex digits each, ASCII
                    + serial                 # the `serial` attribute, UTF-8, "" when the device has none
                    + descriptors )          # the raw bytes of the sysfs `descriptors` file
    device_hash = base64(digest)             # standard alphabet with padding: 44 characters

``parent_hash`` is the ``device_hash`` of the parent device (a hub or the root hub ``usbN``); a root
hub has no USB parent and its ``parent_hash`` is ``""``. ``descriptors_hash`` is base64(SHA-256(descriptors))
alone, useful to tell "same product, different firmware" apart from "different serial".

The recipe has not been checked byte for byte against USBGuard's; a hash pinned in an imported
USBGuard rule should be re-pinned from a sekisho reading of the device.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Literal

ConnectType = Literal["hotplug", "hardwired", "not used", "unknown"]
Removable = Literal["removable", "fixed", "unknown"]

# How many trailing serial characters a log line may show: enough to tell two sticks apart on a
# desk, too few to copy a registered medium's serial from the logs.
SERIAL_VISIBLE_CHARS = 4


def compute_device_hash(vendor_id: str, product_id: str, serial: str, descriptors: bytes) -> str:
    """Return the device hash (base64 SHA-256 over "vvvv:pppp" + serial + descriptors)."""
    digest = hashlib.sha256()
    digest.update(f"{vendor_id.lower()}:{product_id.lower()}".encode("ascii"))
    digest.update(serial.encode("utf-8"))
    digest.update(descriptors)
    return base64.b64encode(digest.digest()).decode("ascii")


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
        """Return the (class, subclass, protocol) triples in descriptor order."""
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
