"""A fake ``/sys/bus/usb/devices`` tree in a plain directory, for tests, the demo and the benchmark.

Entries are written flat, as the real directory lists them (``usb1``, ``1-2``, ``1-2:1.0``); the
parent of a device follows from its name, as in the kernel. Each entry appears whole (written beside the
tree, then renamed in), as the kernel's do: a guard polling the tree never sees a device half written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from sekisho.drivers.usb.descriptors import build_descriptors
from sekisho.drivers.usb.sysfs import is_device_name, parent_of

InterfaceSpec = tuple[int, int, int]

# Well-known device IDs for readable tests and demo output.
LINUX_FOUNDATION = 0x1D6B
ROOT_HUB_2_0 = 0x0002


class FakeSysfsTree:
    """Writes device directories with attribute files the way the kernel lays them out."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # The kernel numbers devices on a bus from 1 (the root hub) and never reuses a number soon.
        self._next_devnum = 2

    def add_root_hub(self, bus: int = 1, *, authorized_default: int = 1) -> str:
        """Create root hub ``usbN`` with its hub interface; return its sys name."""
        sys_name = f"usb{bus}"
        self._write_device(
            sys_name,
            vendor=LINUX_FOUNDATION,
            product=ROOT_HUB_2_0,
            serial=f"0000:00:{bus:02x}.0",
            cls=0x09,
            interfaces=[(0x09, 0x00, 0x00)],
            descriptors=None,
            manufacturer="Linux Foundation",
            name="EHCI Host Controller",
            connect_type=None,
            authorized=True,
            removable="unknown",
            interface_prefix=f"{bus}-0",
            extra={"authorized_default": str(authorized_default)},
        )
        return sys_name

    def add_device(
        self,
        sys_name: str,
        vendor: int,
        product: int,
        serial: str = "",
        cls: int = 0,
        interfaces: Iterable[InterfaceSpec] = ((0x08, 0x06, 0x50),),
        descriptors: bytes | None = None,
        *,
        manufacturer: str = "",
        name: str = "",
        connect_type: str | None = "hotplug",
        authorized: bool = True,
        removable: str = "removable",
    ) -> Path:
        """Create device ``sys_name`` (its parent must exist); ``descriptors=None`` synthesises them."""
        if not is_device_name(sys_name) or sys_name.startswith("usb"):
            raise ValueError(f"not a device sys name: {sys_name!r}")
        parent = parent_of(sys_name)
        if parent is not None and not (self.root / parent).is_dir():
            raise ValueError(f"parent {parent} of {sys_name} does not exist")
        return self._write_device(
            sys_name,
            vendor=vendor,
            product=product,
            serial=serial,
            cls=cls,
            interfaces=list(interfaces),
            descriptors=descriptors,
            manufacturer=manufacturer,
            name=name,
            connect_type=connect_type,
            authorized=authorized,
            removable=removable,
            interface_prefix=sys_name,
        )

    def remove_device(self, sys_name: str) -> None:
        """Remove a device, its interfaces and every device behind it, as an unplug does."""
        prefix_hub = sys_name.removeprefix("usb") + "-" if sys_name.startswith("usb") else None
        for entry in list(self.root.iterdir()):
            name = entry.name
            behind = (
                name == sys_name
                or name.startswith(sys_name + ":")
                or name.startswith(sys_name + ".")
                or (prefix_hub is not None and name.startswith(prefix_hub))
            )
            if behind:
                shutil.rmtree(entry)

    def write_attribute(self, sys_name: str, name: str, data: bytes | str) -> Path:
        """Overwrite (or create) one attribute file, e.g. to corrupt it in a test."""
        path = self.root / sys_name / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def read_attribute(self, sys_name: str, name: str) -> str:
        """Return an attribute file's text without the trailing newline."""
        return (self.root / sys_name / name).read_text().strip()

    def _write_device(
        self,
        sys_name: str,
        *,
        vendor: int,
        product: int,
        serial: str,
        cls: int,
        interfaces: list[InterfaceSpec],
        descriptors: bytes | None,
        manufacturer: str,
        name: str,
        connect_type: str | None,
        authorized: bool,
        removable: str,
        interface_prefix: str,
        extra: dict[str, str] | None = None,
    ) -> Path:
        directory = self.root / sys_name
        if directory.exists():
            raise FileExistsError(f"{sys_name} is already in the tree")
        bus = int(sys_name.removeprefix("usb").split("-", 1)[0])
        if sys_name.startswith("usb"):
            devnum = 1
        else:
            devnum, self._next_devnum = self._next_devnum, self._next_devnum + 1
        if descriptors is None:
            descriptors = build_descriptors(
                vendor_id=vendor,
                product_id=product,
                device_class=cls,
                interfaces=tuple(interfaces),
                has_serial=bool(serial),
            )
        files: dict[str, str] = {
            "idVendor": f"{vendor:04x}",
            "idProduct": f"{product:04x}",
            "bDeviceClass": f"{cls:02x}",
            "bDeviceSubClass": "00",
            "bDeviceProtocol": "00",
            # The kernel pads this one to width 2 with a space.
            "bNumInterfaces": f"{len(interfaces):2d}" if authorized else "",
            "authorized": "1" if authorized else "0",
            "removable": removable,
            "busnum": str(bus),
            "devnum": str(devnum),
        }
        for key, value in (("serial", serial), ("manufacturer", manufacturer), ("product", name)):
            if value:
                files[key] = value
        files.update(extra or {})
        with self._staged(directory) as staging:
            for key, value in files.items():
                (staging / key).write_text(value + "\n")
            (staging / "descriptors").write_bytes(descriptors)
            if connect_type is not None:
                (staging / "port").mkdir()
                (staging / "port" / "connect_type").write_text(connect_type + "\n")
        # The kernel creates interface directories only once the device is authorised and configured.
        if authorized:
            for number, (icls, isub, iproto) in enumerate(interfaces):
                with self._staged(self.root / f"{interface_prefix}:1.{number}") as iface:
                    for key, byte in (
                        ("bInterfaceNumber", number),
                        ("bInterfaceClass", icls),
                        ("bInterfaceSubClass", isub),
                        ("bInterfaceProtocol", iproto),
                    ):
                        (iface / key).write_text(f"{byte:02x}\n")
                    (iface / "authorized").write_text("1\n")
        return directory

    @contextlib.contextmanager
    def _staged(self, target: Path) -> Iterator[Path]:
        """Yield a directory to fill beside the tree, then rename it to ``target`` in one step."""
        # Beside the tree, not in it (a lister would see it); same filesystem, so the rename is atomic.
        staging = Path(tempfile.mkdtemp(prefix=".fake-usb-", dir=self.root.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 is not what sysfs shows
        try:
            yield staging
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
