"""A pcscd of our own with vpcd's virtual reader, for tests, ``sekisho bench login`` and the demo.

pcscd has one system-wide socket, so this refuses to share one it did not start (it says why rather
than killing someone else's) and stops the one it started when done.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
VPCD_READER = "Virtual PCD 00 00"
# vpcd's second slot (a software card connects to TCP 35964 for it): a reader of its own for pcscd, since vpcd
# says its slots may be used at the same time, so a card stuck in one does not hold up the other.
VPCD_READER_2 = "Virtual PCD 00 01"
VPCD_PORT_2 = 35964
START_TIMEOUT_S = 10.0


def running_pcscd() -> list[int]:
    """Return the pids of live (non-zombie) pcscd processes on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2 :].split()[0]
        if name == "pcscd" and state != "Z":
            pids.append(int(entry.name))
    return pids


def pcscd_binary() -> str | None:
    """Return the pcscd executable, or None when it is not installed."""
    return shutil.which("pcscd") or ("/usr/sbin/pcscd" if os.path.exists("/usr/sbin/pcscd") else None)


def pcscd_unavailable() -> str | None:
    """Return why our own pcscd with vpcd cannot run here, or None when it can."""
    if importlib.util.find_spec("smartcard") is None:
        return "pyscard is not installed (pip install -e '.[agent]')"
    if pcscd_binary() is None or not VPCD_DRIVER.exists():
        return "needs the Debian packages pcscd and vsmartcard-vpcd (see testbed.md)"
    others = running_pcscd()
    if others:
        return f"a pcscd we did not start is running (pid {others}); its socket is system-wide"
    return None


@contextlib.contextmanager
def own_pcscd(timeout_s: float = START_TIMEOUT_S) -> Iterator[subprocess.Popen[bytes]]:
    """Start pcscd in the foreground, wait until it lists the vpcd reader, stop it on exit."""
    from sekisho.drivers.smartcard.pcsc import PcscBackend

    binary = pcscd_binary()
    if binary is None:
        raise RuntimeError("pcscd is not installed")
    process = subprocess.Popen([binary, "--foreground"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        readers: list[str] = []
        while VPCD_READER not in readers:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"pcscd exited with {process.returncode}: {err[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pcscd did not list {VPCD_READER!r} within {timeout_s} s (saw {readers})")
            time.sleep(0.1)
            try:
                readers = PcscBackend().readers()
            except Exception:  # until pcscd listens, listing fails: that only means "not yet"
                readers = []
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
