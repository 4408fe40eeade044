"""The guard's side of ``sekisho bench usb --vs-usbguard``, run inside usbguard-daemon's umockdev testbed.

Started by sekisho/bench/usb_vs_usbguard.py with ``LD_PRELOAD=libumockdev-preload.so.0`` and
``UMOCKDEV_DIR`` set to the daemon's testbed: /sys is the daemon's mocked /sys, and the uevents the
daemon's umockdev emits for a plug reach this process's udev monitor too — the same event, at the same
moment, as the daemon gets it. The guard is the real one: ``UdevHotplug`` (pyudev), ``SysfsUsb``, an
agent's outbox (fsync'd) and ``IoctlBlockDevices``, with the benchmark's policy.

For every add or remove of a device it prints one JSON line: ``uevent`` (wall time when the monitor
delivered the event, before the device is read), ``decided`` (wall time just after ``authorized`` was
written) and the value written. ``{"ready": true}`` once the guard runs; it stops when stdin closes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sekisho.agents.usb.guard import UsbGuard
from sekisho.agents.usb.session import StaticSession
from sekisho.bench.offline import offline_agent
from sekisho.bench.usb import AGENT, TERMINAL, bench_policy
from sekisho.drivers.usb.blockdev import IoctlBlockDevices
from sekisho.drivers.usb.events import UdevHotplug
from sekisho.drivers.usb.sysfs import SysfsUsb, is_device_name

_print_lock = threading.Lock()


def _emit(payload: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()


class _TimedSysfs(SysfsUsb):
    """The real sysfs driver, noting when each decision was written to ``authorized``."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, tuple[float, str]] = {}

    def authorize(self, sys_name: str) -> None:
        """Write ``authorized=1``, then note the time."""
        super().authorize(sys_name)
        self.written[sys_name] = (time.time(), "allow")

    def deauthorize(self, sys_name: str) -> None:
        """Write ``authorized=0``, then note the time."""
        super().deauthorize(sys_name)
        self.written[sys_name] = (time.time(), "block")


class _TimedHotplug(UdevHotplug):
    """The real udev source, noting when the monitor delivered each event and reporting the outcome."""

    def __init__(self, sysfs: _TimedSysfs) -> None:
        super().__init__(sysfs)
        self._timed = sysfs

    def _on_udev_event(self, udev_device: Any) -> None:
        received = time.time()
        name = udev_device.sys_name
        # The guard decides inside this call (observers are called synchronously).
        super()._on_udev_event(udev_device)
        if not is_device_name(name) or name.startswith("usb") or udev_device.action not in ("add", "remove"):
            return
        written = self._timed.written.pop(name, None) if udev_device.action == "add" else None
        _emit(
            {
                "action": udev_device.action,
                "sys_name": name,
                "uevent": received,
                "decided": written[0] if written else None,
                "target": written[1] if written else None,
            }
        )


def main(argv: list[str] | None = None) -> int:
    """Run the guard in the testbed until stdin closes; argv: STATE_DIR."""
    args = sys.argv[1:] if argv is None else argv
    state = Path(args[0])
    agent = offline_agent(state, AGENT, bench_policy())
    sysfs = _TimedSysfs()
    hotplug = _TimedHotplug(sysfs)
    guard = UsbGuard(
        agent.emit_many,
        agent.policy,
        sysfs,
        hotplug,
        StaticSession("alice"),
        TERMINAL,
        IoctlBlockDevices(sysfs.root, grant_dir=state / "usb-rw"),
    )
    try:
        guard.start()
        _emit({"ready": True, "outbox_sync": str(agent.config.outbox_sync)})
        sys.stdin.read()
    finally:
        guard.stop()
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
