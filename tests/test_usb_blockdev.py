"""IoctlBlockDevices against a real kernel block device: BLKROSET 1 refuses writes, reads go on, BLKROSET 0 lifts it.

The device is a loop device over a sparse file in a temp folder (tests/support/loopdev.py): the same
block layer, read-only flag, ``ro`` attribute and ``stat`` counters as a USB disk's, on a machine with
no USB. Skipped, with the reason printed, without root or loop devices.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.loopdev import loop_device, skip_reason_printed

from sekisho.drivers.usb.blockdev import BlockDevice, BlockDeviceError, IoctlBlockDevices

_REASON = skip_reason_printed("test_usb_blockdev")

SECTOR = 512
PATTERN = bytes(range(256)) * 16  # 4 KiB


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Path]:
    if _REASON is not None:
        pytest.skip(_REASON)
    with loop_device(tmp_path) as device:
        yield device


def _block(device: Path) -> BlockDevice:
    return BlockDevice(device.name, Path("/sys/block") / device.name)


def _write(device: Path, data: bytes, offset: int = 0) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(device: Path, size: int, offset: int = 0) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def test_read_only_refuses_writes_keeps_reads_and_lifts(loop: Path, tmp_path: Path) -> None:
    control = IoctlBlockDevices(usb_root=tmp_path / "no-usb")
    block = _block(loop)
    _write(loop, PATTERN)
    assert not control.is_read_only(block)

    control.set_read_only(block)
    assert control.is_read_only(block)  # the kernel's `ro` attribute, as the guard reads it
    before = control.sectors_written(block)
    with pytest.raises(OSError) as refused:
        _write(loop, b"\xff" * len(PATTERN))
    # The block layer refuses the write itself (EPERM); a filesystem mounted on it would say EROFS.
    assert refused.value.errno in (errno.EPERM, errno.EROFS)
    assert _read(loop, len(PATTERN)) == PATTERN
    # A refused write never completes, so the guard's write watch sees nothing: no false alarm.
    assert control.sectors_written(block) == before

    assert control.set_read_write(block) is True
    assert not control.is_read_only(block)
    _write(loop, b"\xaa" * len(PATTERN))
    assert _read(loop, len(PATTERN)) == b"\xaa" * len(PATTERN)
    # A write that got through is what the counter shows (and the guard reports on a read-only loan).
    assert control.sectors_written(block) - before == len(PATTERN) // SECTOR


def test_read_only_set_by_blockdev_is_seen_and_lifted(loop: Path, tmp_path: Path) -> None:
    # What the udev rule's helper does (blockdev --setro), undone by the guard for a read-write loan.
    subprocess.run(["blockdev", "--setro", str(loop)], check=True, timeout=30)
    control = IoctlBlockDevices(usb_root=tmp_path / "no-usb")
    block = _block(loop)
    assert control.is_read_only(block)
    assert control.set_read_write(block) is True
    ro = subprocess.run(["blockdev", "--getro", str(loop)], capture_output=True, text=True, check=True, timeout=30)
    assert ro.stdout.strip() == "0"


def test_missing_device_node_is_a_block_device_error(tmp_path: Path) -> None:
    control = IoctlBlockDevices(usb_root=tmp_path, dev_root=tmp_path / "dev")
    with pytest.raises(BlockDeviceError) as failed:
        control.set_read_only(BlockDevice("sdz", tmp_path / "sdz"))
    assert failed.value.errno == errno.ENOENT
