"""Block devices behind a USB device: find them in sysfs, make them read-only, watch their write counters.

Route chosen: the ``BLKROSET`` ioctl (value 1) on ``/dev/<name>`` — what ``blockdev --setro`` does —
issued by the agent itself, for each block device found under the USB device's interfaces in sysfs
(``1-2:1.0/host*/target*/*/block/sdb``, partitions as ``…/block/sdb/sdb1``). The kernel then refuses
writes and ``mount`` falls back to (or is forced into) read-only.

The race, honestly: USB authorisation comes first and the block device only exists afterwards
(authorise → usb-storage binds → SCSI scan → ``block`` add uevent → udev rules → udisks/automounters).
So read-only cannot be set *before* authorising; it is set when the block device appears. The agent
alone (``UdevBlockMonitor``, the *kernel* uevent source, delivered before udev has processed the event)
normally lands its ioctl before any automounter looks, but that is a narrow window, not a guarantee.

The shipped udev rule closes it (``deploy/udev/90-sekisho-usb-ro.rules``, installed by
``deploy/udev/install-udev.sh``): for every block device below a USB device, on ``add`` and ``change``,
udev runs ``sekisho-usb-ro``, which issues ``blockdev --setro`` unless the agent granted *this plug* of
the USB device a read-write loan. udev sends its processed event — the one udisks and desktop
automounters act on — only after its RUN programs have finished, so nothing mounts the disk before it
is read-only. The grant is a file ``/run/sekisho/usb-rw/<usb device>`` holding ``"<busnum> <devnum>"``
(``grant_writes``): the guard writes it *before* it writes ``authorized``, and the kernel creates no
block device before that, so the rule always sees the loan's answer; a stale file from an earlier plug
does not match the new device number. The guard removes it (``revoke_writes``) before a block, on
removal and when a loan turns read-only, and clears the folder when it starts. Where a block device is
read-only although its loan is read-write (the agent restarted, the loan changed from read-only), the
guard lifts it with ``BLKROSET`` 0 (``set_read_write``); a medium with a write-protect switch stays
read-only, which the kernel reports and the guard logs. The guard keeps issuing ``BLKROSET`` 1 itself
for read-only loans, so a terminal without the rule is protected as before, window included, and it
sweeps periodically, so a missed uevent is repaired within one sweep.

Write attempts: ``/sys/block/<dev>/stat`` field 7 counts sectors *written* (completed writes). A
write refused because the device is read-only never completes, so it is not counted: what the
counter shows is a write that got through, i.e. read-only was bypassed (cleared by root, a kernel
that ignored it). The ``ro`` attribute flipping back to 0 is the other detectable sign. Refused
attempts by a user (EPERM from the block layer, EROFS from a filesystem) are not visible at this
layer; seeing them would need fanotify or the audit subsystem.

``IoctlBlockDevices`` is tested against a real block device, a loop device (``tests/test_usb_blockdev.py``):
``BLKROSET`` 1 and the kernel refuses a write with EPERM while reads work; the ``stat`` counter moves
only for a write that completed; ``BLKROSET`` 0 lifts it. ``FakeBlockDevices`` does the same lookups on
a fake tree and writes the ``ro`` attribute file instead of issuing the ioctl.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sekisho.drivers.usb.errors import UsbDeviceGone, UsbError
from sekisho.drivers.usb.sysfs import DEFAULT_SYSFS_ROOT, is_device_name

# <linux/fs.h>: _IO(0x12, 93) and _IO(0x12, 94); the argument is an int.
BLKROSET = 0x125D
BLKROGET = 0x125E
# /sys/block/<dev>/stat, Documentation/block/stat.rst: the 7th field is sectors written.
_STAT_SECTORS_WRITTEN = 6
# Where the guard tells the udev rule's helper (deploy/udev/sekisho-usb-ro) which plugs may stay writable.
DEFAULT_GRANT_DIR = Path("/run/sekisho/usb-rw")

_LOG = logging.getLogger(__name__)

BlockObserver = Callable[[str, str], None]


class BlockDeviceError(UsbError):
    """A block device could not be found, set read-only or read (errno kept)."""


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """A disk or partition behind a USB device: its kernel name and its sysfs directory."""

    name: str
    sysfs_dir: Path


class BlockDeviceControl(Protocol):
    """Find the block devices behind a USB device, make them read-only, read their state."""

    def block_devices(self, usb_sys_name: str) -> list[BlockDevice]:
        """Return the disks and partitions behind a USB device (empty until the kernel creates them)."""
        ...

    def set_read_only(self, device: BlockDevice) -> None:
        """Make the block device refuse writes; raise BlockDeviceError if that failed."""
        ...

    def set_read_write(self, device: BlockDevice) -> bool:
        """Lift the read-only flag; return False if the device stays read-only (write-protected medium)."""
        ...

    def grant_writes(self, usb_sys_name: str) -> None:
        """Tell the udev rule that this plug of the USB device may stay writable (before it is authorised)."""
        ...

    def revoke_writes(self, usb_sys_name: str) -> None:
        """Withdraw the grant: the udev rule makes the device's block devices read-only again."""
        ...

    def revoke_all_writes(self) -> None:
        """Withdraw every grant (the guard starting: nothing is trusted until judged again)."""
        ...

    def is_read_only(self, device: BlockDevice) -> bool:
        """Return the kernel's read-only flag for the device."""
        ...

    def sectors_written(self, device: BlockDevice) -> int:
        """Return the kernel's count of sectors written to the device since it appeared."""
        ...


class _SysfsBlockLookup:
    """Lookups and write grants shared by the real and the fake control: everything except the ioctl itself."""

    def __init__(self, usb_root: Path = DEFAULT_SYSFS_ROOT, grant_dir: Path = DEFAULT_GRANT_DIR) -> None:
        self.usb_root = Path(usb_root)
        self.grant_dir = Path(grant_dir)

    def block_devices(self, usb_sys_name: str) -> list[BlockDevice]:
        """Return the disks and partitions behind a USB device (empty until the kernel creates them)."""
        if not is_device_name(usb_sys_name):
            raise ValueError(f"not a USB device name: {usb_sys_name!r}")
        found: list[BlockDevice] = []
        # Interfaces are listed flat next to the device (real sysfs: symlinks), as in the fake tree.
        for disk_dir in sorted(self.usb_root.glob(f"{usb_sys_name}:*/host*/target*/*/block/*")):
            found.append(BlockDevice(disk_dir.name, disk_dir))
            found.extend(BlockDevice(p.name, p) for p in sorted(disk_dir.glob(f"{disk_dir.name}*")) if p.is_dir())
        return found

    def is_read_only(self, device: BlockDevice) -> bool:
        """Return the kernel's read-only flag (the ``ro`` attribute)."""
        return self._read(device, "ro").strip() == "1"

    def sectors_written(self, device: BlockDevice) -> int:
        """Return field 7 of the device's ``stat`` attribute."""
        fields = self._read(device, "stat").split()
        try:
            return int(fields[_STAT_SECTORS_WRITTEN])
        except (IndexError, ValueError) as err:
            raise BlockDeviceError("malformed block stat", path=device.sysfs_dir / "stat") from err

    def grant_writes(self, usb_sys_name: str) -> None:
        """Write ``GRANT_DIR/<usb_sys_name>`` = ``"<busnum> <devnum>"`` (atomically), as the udev helper expects."""
        if not is_device_name(usb_sys_name) or usb_sys_name.startswith("usb"):
            raise ValueError(f"not a USB device name: {usb_sys_name!r}")
        # busnum/devnum name this plug: the kernel gives a re-plugged device a new devnum, so a grant
        # left behind by an earlier plug (or another stick in the same port) never matches.
        plug = " ".join(self._usb_number(usb_sys_name, name) for name in ("busnum", "devnum"))
        target = self.grant_dir / usb_sys_name
        temporary = self.grant_dir / f".{usb_sys_name}.{os.getpid()}.tmp"
        try:
            self.grant_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            temporary.write_text(plug + "\n")
            os.replace(temporary, target)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise BlockDeviceError("cannot write the read-write grant", path=target, errno=err.errno) from err

    def revoke_writes(self, usb_sys_name: str) -> None:
        """Remove the device's grant file (no error if there is none)."""
        if not is_device_name(usb_sys_name):
            raise ValueError(f"not a USB device name: {usb_sys_name!r}")
        path = self.grant_dir / usb_sys_name
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise BlockDeviceError("cannot remove the read-write grant", path=path, errno=err.errno) from err

    def revoke_all_writes(self) -> None:
        """Remove every grant file in the grant folder (the folder itself stays)."""
        try:
            entries = list(os.scandir(self.grant_dir))
        except FileNotFoundError:
            return
        except OSError as err:
            raise BlockDeviceError("cannot list read-write grants", path=self.grant_dir, errno=err.errno) from err
        for entry in entries:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as err:
                path = Path(entry.path)
                raise BlockDeviceError("cannot remove a read-write grant", path=path, errno=err.errno) from err

    def _usb_number(self, usb_sys_name: str, name: str) -> str:
        path = self.usb_root / usb_sys_name / name
        try:
            text = path.read_text().strip()
        except FileNotFoundError as err:
            raise UsbDeviceGone("USB device gone", path=path, errno=err.errno) from err
        except OSError as err:
            raise BlockDeviceError("cannot read USB device number", path=path, errno=err.errno) from err
        if not text.isdigit():
            raise BlockDeviceError(f"malformed {name}: {text[:20]!r}", path=path)
        return str(int(text))

    def _read(self, device: BlockDevice, name: str) -> str:
        path = device.sysfs_dir / name
        try:
            return path.read_text()
        except FileNotFoundError as err:
            raise UsbDeviceGone("block device gone", path=path, errno=err.errno) from err
        except OSError as err:
            raise BlockDeviceError("cannot read block attribute", path=path, errno=err.errno) from err


class IoctlBlockDevices(_SysfsBlockLookup):
    """The real control: BLKROSET on ``/dev/<name>`` (needs CAP_SYS_ADMIN)."""

    def __init__(
        self,
        usb_root: Path = DEFAULT_SYSFS_ROOT,
        dev_root: Path = Path("/dev"),
        grant_dir: Path = DEFAULT_GRANT_DIR,
    ) -> None:
        super().__init__(usb_root, grant_dir)
        self.dev_root = Path(dev_root)

    def set_read_only(self, device: BlockDevice) -> None:
        """Issue BLKROSET 1 on the device node, then read it back with BLKROGET."""
        if not self._blkroset(device, 1):
            raise BlockDeviceError("read-only flag did not stick", path=self.dev_root / device.name)
        _LOG.info("block device %s set read-only", device.name)

    def set_read_write(self, device: BlockDevice) -> bool:
        """Issue BLKROSET 0; return False if BLKROGET still reports read-only (the medium's own write protection)."""
        writable = not self._blkroset(device, 0)
        if writable:
            _LOG.info("block device %s made writable", device.name)
        else:
            _LOG.warning("block device %s stays read-only (write-protected medium)", device.name)
        return writable

    def _blkroset(self, device: BlockDevice, value: int) -> bool:
        """Issue BLKROSET ``value`` on ``/dev/<name>``; return the read-only flag BLKROGET reads back."""
        path = self.dev_root / device.name
        try:
            # O_RDONLY: opening a disk for writing is exactly what we are preventing; the ioctl needs no more.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise BlockDeviceError("cannot open block device", path=path, errno=err.errno) from err
        try:
            fcntl.ioctl(fd, BLKROSET, struct.pack("i", value))
            result = fcntl.ioctl(fd, BLKROGET, struct.pack("i", 0))
        except OSError as err:
            raise BlockDeviceError("BLKROSET failed", path=path, errno=err.errno) from err
        finally:
            os.close(fd)
        return bool(struct.unpack("i", result)[0])


class FakeBlockDevices(_SysfsBlockLookup):
    """The simulated control on a FakeSysfsTree: writes the ``ro`` attribute instead of the ioctl."""

    def __init__(self, usb_root: Path, grant_dir: Path | None = None) -> None:
        # The grants go next to the tree by default (a hidden folder no USB name lookup matches).
        super().__init__(usb_root, grant_dir if grant_dir is not None else Path(usb_root) / ".sekisho-usb-rw")
        self.applied: list[str] = []
        self.lifted: list[str] = []
        self.fail: set[str] = set()
        self.write_protected: set[str] = set()

    def add_disk(self, usb_sys_name: str, name: str = "sdb", *, interface: int = 0, partitions: int = 0) -> BlockDevice:
        """Create a disk (and partitions) under a USB device's interface, as usb-storage's SCSI scan does."""
        host = self.usb_root / f"{usb_sys_name}:1.{interface}" / "host0" / "target0:0:0" / "0:0:0:0" / "block"
        disk = host / name
        directories = [disk] + [disk / f"{name}{n}" for n in range(1, partitions + 1)]
        for directory in directories:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "ro").write_text("0\n")
            (directory / "stat").write_text(_stat_line(0))
        return BlockDevice(name, disk)

    def write_sectors(self, device: BlockDevice, sectors: int) -> None:
        """Add to the device's sectors-written counter, as a write that got through would."""
        current = self.sectors_written(device)
        (device.sysfs_dir / "stat").write_text(_stat_line(current + sectors))

    def clear_read_only(self, device: BlockDevice) -> None:
        """Clear the ``ro`` flag, as ``blockdev --setrw`` by someone with root would."""
        (device.sysfs_dir / "ro").write_text("0\n")

    def set_read_only(self, device: BlockDevice) -> None:
        """Write ``1`` to the fake ``ro`` attribute (or fail for names in ``fail``)."""
        path = device.sysfs_dir / "ro"
        if device.name in self.fail:
            raise BlockDeviceError("BLKROSET failed", path=path, errno=13)
        try:
            path.write_text("1\n")
        except OSError as err:
            raise BlockDeviceError("cannot set read-only", path=path, errno=err.errno) from err
        self.applied.append(device.name)

    def set_read_write(self, device: BlockDevice) -> bool:
        """Write ``0`` to the fake ``ro`` attribute, unless the name is in ``write_protected`` (stays ``1``)."""
        path = device.sysfs_dir / "ro"
        if device.name in self.fail:
            raise BlockDeviceError("BLKROSET failed", path=path, errno=13)
        if device.name in self.write_protected:
            return False
        try:
            path.write_text("0\n")
        except OSError as err:
            raise BlockDeviceError("cannot clear read-only", path=path, errno=err.errno) from err
        self.lifted.append(device.name)
        return True

    def granted(self) -> dict[str, str]:
        """Return the grant files present: USB device name → ``"<busnum> <devnum>"``."""
        if not self.grant_dir.is_dir():
            return {}
        return {p.name: p.read_text().strip() for p in sorted(self.grant_dir.iterdir()) if not p.name.startswith(".")}


def _stat_line(sectors_written: int) -> str:
    fields = [0] * 17
    fields[_STAT_SECTORS_WRITTEN] = sectors_written
    return " ".join(str(f) for f in fields) + "\n"


class UdevBlockMonitor:
    """Kernel-source ``block`` add events for disks behind USB devices: calls ``callback(usb_sys_name, block)``."""

    def __init__(self, callback: BlockObserver) -> None:
        self._callback = callback
        self._thread: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Open the netlink monitor (kernel source, so events arrive before udev and udisks act)."""
        with self._lock:
            if self._thread is not None:
                return
            import pyudev

            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context, source="kernel")
            monitor.filter_by(subsystem="block")
            monitor.start()
            self._thread = pyudev.MonitorObserver(monitor, callback=self._on_event, name="usb-block")
            self._thread.daemon = True
            self._thread.start()

    def stop(self) -> None:
        """Stop the monitor thread; idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()

    def _on_event(self, udev_device: Any) -> None:
        if udev_device.action != "add":
            return
        usb_sys_name = None
        for ancestor in udev_device.ancestors:
            if ancestor.subsystem == "usb" and ancestor.device_type == "usb_device":
                usb_sys_name = ancestor.sys_name
                break
        if usb_sys_name is None:
            return
        try:
            self._callback(usb_sys_name, udev_device.sys_name)
        except Exception:
            _LOG.exception("block device observer failed on %s", udev_device.sys_name)


__all__ = [
    "BLKROGET",
    "BLKROSET",
    "DEFAULT_GRANT_DIR",
    "BlockDevice",
    "BlockDeviceControl",
    "BlockDeviceError",
    "FakeBlockDevices",
    "IoctlBlockDevices",
    "UdevBlockMonitor",
]
