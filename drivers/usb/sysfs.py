"""Read USB devices from a sysfs tree and write their ``authorized`` files.

The root is a directory laid out like ``/sys/bus/usb/devices``: one entry per device (``usb1`` for a
root hub, ``1-2``, ``1-2.3`` behind hubs) and one per interface (``1-2:1.0``). Tests and the demo
point it at a temporary tree (``drivers.usb.fake.FakeSysfsTree``); umockdev redirects the real path.

Every read failure becomes ``UsbDescriptorError`` (path and errno kept) or ``UsbDeviceGone``, so a
caller can always fall back to "unknown device: blocked" instead of crashing.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sekisho.drivers.usb.descriptors import DescriptorFormatError, parse_descriptors
from sekisho.drivers.usb.errors import UsbAccessError, UsbDescriptorError, UsbDeviceGone
from sekisho.drivers.usb.model import (
    ConnectType,
    Removable,
    UsbDevice,
    UsbInterface,
    compute_descriptors_hash,
    compute_device_hash,
    compute_path_hash,
    usbguard_trim,
)

DEFAULT_SYSFS_ROOT = Path("/sys/bus/usb/devices")

_ROOT_HUB = re.compile(r"usb(\d+)")
_DEVICE = re.compile(r"(\d+)-(\d+(?:\.\d+)*)")
_INTERFACE = re.compile(r"(\d+)-(\d+(?:\.\d+)*):(\d+)\.(\d+)")
# Attribute files are a few bytes; descriptors at most ~512 KiB. Reading more means the tree is wrong.
_MAX_ATTRIBUTE_SIZE = 4096
_MAX_DESCRIPTORS_FILE = 600 * 1024
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO})
_REMOVABLE: frozenset[str] = frozenset({"removable", "fixed", "unknown"})

_LOG = logging.getLogger(__name__)


def is_device_name(name: str) -> bool:
    """Return whether a sysfs entry name is a USB device (``usbN`` or ``B-P[.P…]``), not an interface."""
    return bool(_ROOT_HUB.fullmatch(name) or _DEVICE.fullmatch(name))


def parent_of(sys_name: str) -> str | None:
    """Return the parent device's sys name by the kernel's naming rule (``1-2.3`` → ``1-2`` → ``usb1``)."""
    if _ROOT_HUB.fullmatch(sys_name):
        return None
    match = _DEVICE.fullmatch(sys_name)
    if match is None:
        raise ValueError(f"not a USB device name: {sys_name!r}")
    bus, ports = match.groups()
    if "." in ports:
        return f"{bus}-{ports.rsplit('.', 1)[0]}"
    return f"usb{int(bus)}"


def _bus_and_ports(sys_name: str) -> tuple[int, str]:
    hub = _ROOT_HUB.fullmatch(sys_name)
    if hub:
        return int(hub.group(1)), ""
    match = _DEVICE.fullmatch(sys_name)
    if match is None:
        raise ValueError(f"not a USB device name: {sys_name!r}")
    return int(match.group(1)), match.group(2)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Devices present in the tree: those read, and those that could not be read (to be blocked)."""

    devices: tuple[UsbDevice, ...]
    unreadable: tuple[UsbDescriptorError, ...]


class SysfsUsb:
    """USB devices under a sysfs root: enumerate, read, authorise and deauthorise."""

    def __init__(self, root: Path = DEFAULT_SYSFS_ROOT) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        """Return the directory laid out like /sys/bus/usb/devices."""
        return self._root

    # --- reading -------------------------------------------------------------------------------

    def list_devices(self) -> list[str]:
        """Return device sys names, root hubs first and parents before children."""
        try:
            names = [entry.name for entry in os.scandir(self._root) if is_device_name(entry.name)]
        except OSError as err:
            raise UsbDescriptorError("cannot list USB devices", path=self._root, errno=err.errno) from err
        return sorted(names, key=_topology_key)

    def list_root_hubs(self) -> list[str]:
        """Return the root hubs' sys names (``usb1``, ``usb2``, …)."""
        return [name for name in self.list_devices() if _ROOT_HUB.fullmatch(name)]

    def scan(self) -> ScanResult:
        """Read every device present; unreadable ones are returned separately, vanished ones skipped."""
        devices: list[UsbDevice] = []
        unreadable: list[UsbDescriptorError] = []
        for name in self.list_devices():
            try:
                devices.append(self.read_device(name))
            except UsbDeviceGone:
                continue
            except UsbDescriptorError as err:
                unreadable.append(err)
        return ScanResult(devices=tuple(devices), unreadable=tuple(unreadable))

    def read_device(self, sys_name: str) -> UsbDevice:
        """Read one device; raise UsbDescriptorError if malformed, UsbDeviceGone if it is not there."""
        try:
            bus, port_path = _bus_and_ports(sys_name)
        except ValueError as err:
            raise UsbDescriptorError(str(err), sys_name=sys_name) from err
        device_dir = self._root / sys_name
        if not device_dir.is_dir():
            raise UsbDeviceGone("device not present", path=device_dir, errno=errno.ENOENT, sys_name=sys_name)
        vendor_id = self._read_hex(sys_name, "idVendor", 4)
        product_id = self._read_hex(sys_name, "idProduct", 4)
        raw_serial = self._read_raw_text(sys_name, "serial", optional=True)
        raw_product = self._read_raw_text(sys_name, "product", optional=True)
        device_class = int(self._read_hex(sys_name, "bDeviceClass", 2), 16)
        device_subclass = int(self._read_hex(sys_name, "bDeviceSubClass", 2), 16)
        device_protocol = int(self._read_hex(sys_name, "bDeviceProtocol", 2), 16)
        manufacturer = self._read_text(sys_name, "manufacturer", optional=True)
        authorized = self._read_flag(sys_name, "authorized")
        self._check_num_interfaces(sys_name)
        descriptors = self._read_bytes(sys_name, "descriptors", limit=_MAX_DESCRIPTORS_FILE)
        path = device_dir / "descriptors"
        try:
            parsed = parse_descriptors(descriptors)
        except DescriptorFormatError as err:
            raise UsbDescriptorError(f"malformed descriptors: {err}", path=path, sys_name=sys_name) from err
        # The attribute files and the descriptor stream come from the same kernel read; disagreement
        # means a corrupted or forged tree, and the device is not judged on half-true data.
        if (parsed.vendor_id, parsed.product_id) != (int(vendor_id, 16), int(product_id, 16)):
            raise UsbDescriptorError("descriptors disagree with idVendor/idProduct", path=path, sys_name=sys_name)
        if (parsed.device_class, parsed.device_subclass, parsed.device_protocol) != (
            device_class,
            device_subclass,
            device_protocol,
        ):
            raise UsbDescriptorError("descriptors disagree with bDeviceClass", path=path, sys_name=sys_name)
        interfaces = self._merge_interfaces(sys_name, parsed.interfaces, self._read_interface_dirs(sys_name))
        # USBGuard's with-interface list is every interface descriptor; an interface seen only in sysfs
        # (never on a real kernel) is appended so that no rule can overlook it.
        extras = tuple((i.cls, i.subclass, i.protocol) for i in interfaces[len(parsed.interfaces) :])
        parent = parent_of(sys_name)
        return UsbDevice(
            sys_name=sys_name,
            bus=bus,
            port_path=port_path,
            # The kernel writes lowercase hex; the hash takes the files as read, as USBGuard does.
            vendor_id=vendor_id.lower(),
            product_id=product_id.lower(),
            serial=_display(raw_serial),
            manufacturer=manufacturer,
            product=_display(raw_product),
            device_class=device_class,
            device_subclass=device_subclass,
            device_protocol=device_protocol,
            interfaces=interfaces,
            parent=parent,
            connect_type=self._read_connect_type(sys_name),
            removable=self._read_removable(sys_name),
            descriptors_hash=compute_descriptors_hash(descriptors),
            device_hash=compute_device_hash(
                raw_product, vendor_id.encode("ascii"), product_id.encode("ascii"), raw_serial, descriptors
            ),
            parent_hash=self._parent_hash(sys_name, parent),
            authorized=authorized,
            rule_interfaces=parsed.interface_types + extras,
            raw_product=raw_product,
            raw_serial=raw_serial,
        )

    def device_hash(self, sys_name: str) -> str:
        """Return a device's USBGuard hash from its product, ID, serial and descriptor files."""
        _check_device_name(sys_name)
        vendor_id = self._read_hex(sys_name, "idVendor", 4)
        product_id = self._read_hex(sys_name, "idProduct", 4)
        serial = self._read_raw_text(sys_name, "serial", optional=True)
        product = self._read_raw_text(sys_name, "product", optional=True)
        descriptors = self._read_bytes(sys_name, "descriptors", limit=_MAX_DESCRIPTORS_FILE)
        return compute_device_hash(product, vendor_id.encode("ascii"), product_id.encode("ascii"), serial, descriptors)

    def sysfs_path(self, sys_name: str) -> str | None:
        """Return the device's path below the sysfs mount (``/devices/…/usb1``), or None in a flat tree.

        The root must be ``<mount>/bus/usb/devices`` with its entries linking into ``<mount>/devices``,
        as in the kernel's sysfs (and under umockdev); a plain test tree has no such path.
        """
        _check_device_name(sys_name)
        try:
            root = os.path.realpath(self._root)
            mount = os.path.realpath(self._root / ".." / ".." / "..")
            real = os.path.realpath(self._root / sys_name)
        except OSError:
            return None
        mount = mount.rstrip("/")
        if root != f"{mount}/bus/usb/devices" or not real.startswith(f"{mount}/devices/"):
            return None
        return real[len(mount) :]

    # --- writing -------------------------------------------------------------------------------

    def authorize(self, sys_name: str) -> None:
        """Let the device be configured and its drivers bind (write ``1`` to ``authorized``)."""
        _check_device_name(sys_name)
        self._write(sys_name, self._root / sys_name / "authorized", b"1")
        _LOG.info("authorised USB device %s", sys_name)

    def deauthorize(self, sys_name: str) -> None:
        """Unbind the device's drivers and keep it unconfigured (write ``0`` to ``authorized``)."""
        _check_device_name(sys_name)
        self._write(sys_name, self._root / sys_name / "authorized", b"0")
        _LOG.info("deauthorised USB device %s", sys_name)

    def authorize_interface(self, sys_name: str, interface: int, *, authorized: bool = True) -> None:
        """Authorise (or with ``authorized=False`` deauthorise) one interface by its bInterfaceNumber."""
        _check_device_name(sys_name)
        directory = self._interface_dir(sys_name, interface)
        self._write(sys_name, directory / "authorized", b"1" if authorized else b"0")

    def set_authorized_default(self, value: int = 0) -> list[str]:
        """Write ``authorized_default`` (0 none, 1 all, 2 internal only) on every root hub; return them."""
        if value not in (0, 1, 2):
            raise ValueError(f"authorized_default must be 0, 1 or 2, not {value!r}")
        hubs = self.list_root_hubs()
        for hub in hubs:
            self._write(hub, self._root / hub / "authorized_default", str(value).encode())
        _LOG.info("authorized_default=%d on root hubs %s", value, ", ".join(hubs) or "(none)")
        return hubs

    # --- helpers -------------------------------------------------------------------------------

    def _read_bytes(self, sys_name: str, name: str, *, limit: int = _MAX_ATTRIBUTE_SIZE) -> bytes:
        path = self._root / sys_name / name
        try:
            with path.open("rb") as handle:
                data = handle.read(limit + 1)
        except OSError as err:
            if err.errno in _GONE_ERRNOS and not (self._root / sys_name).is_dir():
                raise UsbDeviceGone(
                    "device vanished while reading", path=path, errno=err.errno, sys_name=sys_name
                ) from err
            reason = "missing attribute" if err.errno == errno.ENOENT else "unreadable attribute"
            raise UsbDescriptorError(reason, path=path, errno=err.errno, sys_name=sys_name) from err
        if len(data) > limit:
            raise UsbDescriptorError(f"attribute larger than {limit} bytes", path=path, sys_name=sys_name)
        return data

    def _read_raw_text(self, sys_name: str, name: str, *, optional: bool = False) -> bytes:
        """Return an attribute's bytes as USBGuard reads them (trailing NUL, LF, CR, TAB, BS removed)."""
        try:
            raw = self._read_bytes(sys_name, name)
        except UsbDescriptorError as err:
            if optional and err.errno in (errno.ENOENT, errno.ENOTDIR):
                # serial/manufacturer/product (and port/) exist only when the device has them.
                return b""
            raise
        return usbguard_trim(raw)

    def _read_text(self, sys_name: str, name: str, *, optional: bool = False) -> str:
        return _display(self._read_raw_text(sys_name, name, optional=optional))

    def _read_hex(self, sys_name: str, name: str, width: int) -> str:
        text = self._read_text(sys_name, name)
        if len(text) != width or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise UsbDescriptorError(
                f"expected {width} hex digits, got {text[:16]!r}", path=self._root / sys_name / name, sys_name=sys_name
            )
        return text.lower()

    def _read_flag(self, sys_name: str, name: str, directory: str | None = None) -> bool:
        entry = directory or sys_name
        text = self._read_text(entry, name).strip()
        if text not in ("0", "1"):
            raise UsbDescriptorError(
                f"expected 0 or 1, got {text[:16]!r}", path=self._root / entry / name, sys_name=sys_name
            )
        return text == "1"

    def _check_num_interfaces(self, sys_name: str) -> None:
        try:
            text = self._read_text(sys_name, "bNumInterfaces").strip()
        except UsbDescriptorError as err:
            if err.errno == errno.ENOENT:
                return
            raise
        # An unconfigured (deauthorised) device shows an empty value; anything else must be a number.
        if text and not text.isdigit():
            raise UsbDescriptorError(
                f"bNumInterfaces is not a number: {text[:16]!r}",
                path=self._root / sys_name / "bNumInterfaces",
                sys_name=sys_name,
            )

    def _interface_prefix(self, sys_name: str) -> str:
        hub = _ROOT_HUB.fullmatch(sys_name)
        return f"{hub.group(1)}-0:" if hub else f"{sys_name}:"

    def _interface_names(self, sys_name: str) -> list[str]:
        prefix = self._interface_prefix(sys_name)
        try:
            return sorted(
                entry.name
                for entry in os.scandir(self._root)
                if entry.name.startswith(prefix) and _INTERFACE.fullmatch(entry.name)
            )
        except OSError as err:
            raise UsbDescriptorError(
                "cannot list interfaces", path=self._root, errno=err.errno, sys_name=sys_name
            ) from err

    def _interface_dir(self, sys_name: str, interface: int) -> Path:
        for name in self._interface_names(sys_name):
            if int(name.rsplit(".", 1)[1]) == interface:
                return self._root / name
        path = self._root / f"{self._interface_prefix(sys_name)}?.{interface}"
        raise UsbDeviceGone("interface not present", path=path, errno=errno.ENOENT, sys_name=sys_name)

    def _read_interface_dirs(self, sys_name: str) -> list[UsbInterface]:
        interfaces = []
        for name in self._interface_names(sys_name):
            number = int(self._read_hex(name, "bInterfaceNumber", 2), 16)
            cls = int(self._read_hex(name, "bInterfaceClass", 2), 16)
            sub = int(self._read_hex(name, "bInterfaceSubClass", 2), 16)
            proto = int(self._read_hex(name, "bInterfaceProtocol", 2), 16)
            try:
                authorized = self._read_flag(sys_name, "authorized", directory=name)
            except UsbDescriptorError as err:
                if err.errno != errno.ENOENT:
                    raise
                authorized = True  # kernels before 4.4 have no per-interface authorisation
            interfaces.append(UsbInterface(number=number, cls=cls, subclass=sub, protocol=proto, authorized=authorized))
        return interfaces

    @staticmethod
    def _merge_interfaces(
        sys_name: str, declared: tuple[UsbInterface, ...], live: list[UsbInterface]
    ) -> tuple[UsbInterface, ...]:
        # The union: an interface seen either in the descriptors or in sysfs is one the policy must see.
        live_by_key = {(i.number, i.cls, i.subclass, i.protocol): i for i in live}
        merged = [live_by_key.pop((i.number, i.cls, i.subclass, i.protocol), i) for i in declared]
        if live_by_key:
            _LOG.warning(
                "USB device %s has interfaces missing from its descriptors: %s",
                sys_name,
                " ".join(i.type_text for i in live_by_key.values()),
            )
        merged.extend(live_by_key.values())
        return tuple(merged)

    def _read_connect_type(self, sys_name: str) -> ConnectType:
        # As USBGuard: a root hub's is "" (not read), a missing file is "", anything else is kept as read.
        if _ROOT_HUB.fullmatch(sys_name):
            return ""
        return self._read_text(sys_name, "port/connect_type", optional=True)

    def _read_removable(self, sys_name: str) -> Removable:
        try:
            text = self._read_text(sys_name, "removable").strip()
        except UsbDescriptorError as err:
            if err.errno == errno.ENOENT:
                return "unknown"
            raise
        return text if text in _REMOVABLE else "unknown"  # type: ignore[return-value]

    def _parent_hash(self, sys_name: str, parent: str | None) -> str:
        if parent is None:
            # A root hub's parent is the host controller: USBGuard hashes that device's sysfs path.
            path = self.sysfs_path(sys_name)
            return compute_path_hash(path.rsplit("/", 1)[0]) if path else ""
        try:
            return self.device_hash(parent)
        except (UsbDescriptorError, UsbDeviceGone) as err:
            # An unreadable parent leaves the hash empty: no parent-hash rule can match it, which is
            # the fail-closed outcome for an allow rule pinned to a hub.
            _LOG.warning("cannot hash parent %s: %s", parent, err)
            return ""

    def _write(self, sys_name: str, path: Path, value: bytes) -> None:
        try:
            # No O_CREAT: a missing file means the device is gone, never a new file in the tree.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)
        except OSError as err:
            if err.errno in _GONE_ERRNOS:
                raise UsbDeviceGone(
                    "device vanished before the write", path=path, errno=err.errno, sys_name=sys_name
                ) from err
            raise UsbAccessError(
                "cannot write authorisation file", path=path, errno=err.errno, sys_name=sys_name
            ) from err


def _display(raw: bytes) -> str:
    # Device strings are attacker-controlled; undecodable bytes are kept visible, never fatal.
    return raw.decode("utf-8", errors="backslashreplace")


def _check_device_name(sys_name: str) -> None:
    # Names reach the write path from events and commands; never let one walk out of the tree.
    if not is_device_name(sys_name):
        raise ValueError(f"not a USB device name: {sys_name!r}")


def _topology_key(name: str) -> tuple[int, int, list[int]]:
    bus, ports = _bus_and_ports(name)
    numbers = [int(p) for p in ports.split(".")] if ports else []
    return (bus, len(numbers), numbers)
