"""A real block device for BLKROSET tests: a loop device over a sparse file in a temp folder.

testbed.md: this machine has no USB and no disks to spare, but ``/dev/loop-control`` works as root,
so ``losetup -f --show IMAGE`` gives a kernel block device with the same read-only flag, ``ro``
attribute and ``stat`` counters as a USB disk's. Tests skip, saying why, where that is not possible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

IMAGE_BYTES = 8 * 1024 * 1024


@cache
def loop_unavailable() -> str | None:
    """Return why no loop device can be made here, or None when one can."""
    if os.geteuid() != 0:
        return "needs root to attach a loop device (losetup) and to issue BLKROSET (CAP_SYS_ADMIN)"
    if shutil.which("losetup") is None:
        return "losetup not installed (util-linux)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: this kernel or container offers no loop devices"
    return None


def skip_reason_printed(test_module: str) -> str | None:
    """Return the reason a loop test must skip, printing it once to stderr (so a CI log shows it)."""
    reason = loop_unavailable()
    if reason is not None:
        print(f"{test_module}: loop-device tests skipped: {reason}", file=sys.stderr)
    return reason


@contextmanager
def loop_device(folder: Path) -> Iterator[Path]:
    """Attach a loop device to a sparse image in ``folder``; yield ``/dev/loopN``; always detach it."""
    image = folder / "disk.img"
    with image.open("wb") as handle:
        handle.truncate(IMAGE_BYTES)
    attach = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, timeout=30, check=False
    )
    if attach.returncode != 0:
        import pytest

        pytest.skip(f"losetup could not attach a loop device here: {attach.stderr.strip()}")
    device = Path(attach.stdout.strip())
    # The kernel keeps a loop device's read-only flag (BLKROSET) across detach and attach: a test that
    # left /dev/loopN read-only would hand the next one a read-only disk. Start and leave it writable.
    setrw = ["blockdev", "--setrw", str(device)]
    try:
        subprocess.run(setrw, capture_output=True, timeout=30, check=True)
        yield device
    finally:
        subprocess.run(setrw, capture_output=True, timeout=30, check=False)
        subprocess.run(["losetup", "--detach", str(device)], capture_output=True, timeout=30, check=False)
