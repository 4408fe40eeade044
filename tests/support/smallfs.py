"""A real filesystem that really fills: a size-limited tmpfs mounted inside the test's temp folder.

Disk-full tests need the kernel's own ENOSPC from write(2) and fsync(2), not an imitation: RLIMIT_FSIZE gives
EFBIG and a signal, a mocked write skips SQLite's own handling. As root (the CI container runs the tests as root)
``mount -t tmpfs -o size=…`` gives a filesystem of exactly that size; ``fill`` takes all its free space with one
file and ``free`` deletes that file again. Nothing outside the mount point is written. Tests skip, saying why,
where mounting is not allowed.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FILLER = "filler.bin"


def _mount_refused(probe: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a size-limited tmpfs (the disk-full tests)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount not installed (util-linux)"
    probe.mkdir(parents=True, exist_ok=True)
    tried = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(probe)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if tried.returncode != 0:
        return f"this machine refuses to mount a tmpfs: {tried.stderr.strip()}"
    subprocess.run(["umount", str(probe)], capture_output=True, timeout=30, check=False)
    return None


@contextmanager
def small_tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_mb`` MiB at ``folder``; yield it; always unmount (lazily if still busy)."""
    reason = _mount_refused(folder.parent / f".{folder.name}-probe")
    if reason is not None:
        print(f"disk-full tests skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(folder)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    try:
        yield folder
    finally:
        # A process the test started may still hold a file open; -l detaches now, frees when it closes.
        done = subprocess.run(["umount", str(folder)], capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30, check=False)


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged write could still use on the filesystem of ``folder``."""
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill(folder: Path, leave: int = 0) -> int:
    """Take the free space of ``folder``'s filesystem with one file, leaving about ``leave`` bytes; return its size.

    Writes big blocks, then ever smaller ones until even one byte is refused with ENOSPC, so that with
    ``leave=0`` the next block any other writer asks for is refused.
    """
    fd = os.open(folder / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    written = 0
    try:
        block = 1 << 20
        while block >= 1:
            if leave and free_bytes(folder) - leave < block:
                if free_bytes(folder) <= leave:
                    break
                block //= 2
                continue
            try:
                written += os.write(fd, b"\0" * block)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                block //= 2
    finally:
        os.close(fd)
    return written


def free(folder: Path) -> None:
    """Delete the filler: the space is free again."""
    (folder / FILLER).unlink(missing_ok=True)
