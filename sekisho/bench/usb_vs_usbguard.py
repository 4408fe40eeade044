"""``sekisho bench usb --vs-usbguard``: the same mocked plugs judged in one run by usbguard-daemon and by the guard.

Set-up: the real usbguard-daemon 1.1.2 (umockdev backend, sekisho.lab.usbguard) with the benchmark's
rules in USBGuard form — the medium allowed by id and serial, then sekisho's default policy — and the
real guard (sekisho/bench/usb_umockdev_guard.py: UdevHotplug, SysfsUsb, an outbox that fsyncs, the
benchmark's policy with the medium lent read-only) running *inside the daemon's umockdev testbed*
(LD_PRELOAD + UMOCKDEV_DIR). A plug is a umockdev file hard-linked into the daemon's device folder: the
daemon adds the device to its testbed and emits one ``add`` uevent there, which reaches both. Each plug
gets a new port (1-1, 1-2, …: usbguard's umockdev backend never forgets a sysfs path), keyboard,
unregistered stick and lent medium in turn; after both have decided, the file is removed (an unplug,
which both see too) before the next plug.

Timing, the same start for both: ``t0`` is when the guard's udev monitor delivered the uevent (wall
clock, before the device is read) — the same event the daemon reads from its own socket.

- guard: ``t0`` → just after ``authorized`` was written (its events fsync'd before that).
- usbguard: ``t0`` → the timestamp of the daemon's ``Policy.Device.Update`` audit record for the
  device, which it writes after applying the target (``authorized``). The daemon's stamps have a
  resolution of 1 ms, and ``t0`` is taken by the guard's process, a little after the daemon emitted
  the event: both err in usbguard's favour, never against it. A value below zero (the daemon's
  millisecond stamp before the guard's ``t0``) counts as 0.

Both run at once on the same CPUs, as they would not on a terminal (one guard per machine); neither
gets the machine to itself. Shared by both and reported apart (``umockdev_delivery``): the daemon's
inotify wake-up, its umockdev testbed adding the device and emitting the uevent — umockdev's cost, which
a kernel's hot-plug path does not have. The daemon is killed and its folder removed at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sekisho.agents.usb.rules.policy import DEFAULT_POLICY_TEXT
from sekisho.bench.usb import KINDS, MEDIUM_SERIAL
from sekisho.lab.usbguard import (
    PRELOAD,
    AuditRecord,
    UsbguardDaemon,
    pci_controller,
    usb_device,
    usbguard_unavailable,
    write_umockdev,
)

PCI = "/devices/pci0000:00/0000:00:14.0"
# The medium first (as the guard's media register outranks everything for it), then sekisho's default.
RULES = f'allow id 0951:1666 serial "{MEDIUM_SERIAL}" with-interface 08:06:50\n' + DEFAULT_POLICY_TEXT
START_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 10.0
MAX_TIMEOUTS = 3


def vs_usbguard_unavailable() -> str | None:
    """Return why the comparison cannot run here, or None when it can."""
    reason = usbguard_unavailable()
    if reason is not None:
        return reason
    if importlib.util.find_spec("pyudev") is None:
        return "pyudev is not installed in this Python (the guard's udev monitor)"
    return None


@dataclass
class VsResult:
    """Per-plug figures in milliseconds, and how the two verdicts compared."""

    usbguard_ms: list[float] = field(default_factory=list)
    guard_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)
    per_kind: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    agree: int = 0
    differ: list[str] = field(default_factory=list)
    timeouts: int = 0
    # usbguard's millisecond stamp earlier than the guard's t0: counted as 0 ms.
    clamped: int = 0
    outbox_sync: str = ""
    elapsed_s: float = 0.0


class _Harness:
    """The guard process inside the daemon's testbed; its JSON lines arrive on a queue."""

    def __init__(self, work: Path, testbed: Path) -> None:
        preload = ":".join(filter(None, [PRELOAD, os.environ.get("LD_PRELOAD", "")]))
        env = {**os.environ, "LD_PRELOAD": preload, "UMOCKDEV_DIR": str(testbed)}
        self.log_path = work / "guard.log"
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sekisho.bench.usb_umockdev_guard", str(work / "guard")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
                start_new_session=True,
            )
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))

    def next_line(self, timeout: float) -> dict[str, Any] | None:
        """Return the next line, or None after ``timeout`` seconds."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        """Close stdin (the guard stops cleanly); kill its process group if it lingers."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        """Return the guard's stderr."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class _Waiter:
    """Collects the guard's lines and the daemon's audit records and waits for the ones a plug needs."""

    def __init__(self, harness: _Harness, daemon: UsbguardDaemon) -> None:
        self.harness = harness
        self.daemon = daemon
        self.guard_lines: list[dict[str, Any]] = []
        self.audit: list[AuditRecord] = []

    def wait(self, action: str, sys_name: str, audit_type: str) -> tuple[dict[str, Any], AuditRecord] | None:
        """Return the guard's line and the daemon's record for this device, or None on a timeout."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        line: dict[str, Any] | None = None
        record: AuditRecord | None = None
        while time.monotonic() < deadline:
            if line is None:
                line = self._take_line(action, sys_name)
            if record is None:
                self.audit.extend(self.daemon.read_audit())
                record = self._take_record(audit_type, sys_name)
            if line is not None and record is not None:
                return line, record
            if not self.daemon.running() or self.harness.process.poll() is not None:
                return None
            incoming = self.harness.next_line(0.0005)
            if incoming is not None:
                self.guard_lines.append(incoming)
        return None

    def _take_line(self, action: str, sys_name: str) -> dict[str, Any] | None:
        for index, line in enumerate(self.guard_lines):
            if line.get("action") == action and line.get("sys_name") == sys_name:
                return self.guard_lines.pop(index)
        return None

    def _take_record(self, audit_type: str, sys_name: str) -> AuditRecord | None:
        for index, record in enumerate(self.audit):
            if record.type == audit_type and record.sys_name == sys_name:
                return self.audit.pop(index)
        return None


def _wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def run_vs_usbguard(count: int, budget_s: float = 180.0) -> VsResult:
    """Plug ``count`` devices (or as many as ``budget_s`` allows) into usbguard's testbed; time both."""
    work = Path(tempfile.mkdtemp(prefix="sekisho-bench-vs-usbguard-"))
    daemon = UsbguardDaemon(work / "usbguard", RULES, "keep")
    harness: _Harness | None = None
    result = VsResult(per_kind={kind[0]: ([], []) for kind in KINDS})
    try:
        root_hub = usb_device(
            f"{PCI}/usb1",
            0x1D6B,
            0x0002,
            ((0x09, 0x00, 0x00),),
            name=b"xHCI Host Controller\n",
            serial=b"0000:00:14.0\n",
            connect_type=None,
            device_class=9,
        )
        daemon.plug(write_umockdev(work / "root.umockdev", [pci_controller(PCI), root_hub]))
        daemon.start()
        seen: list[AuditRecord] = []

        def root_hub_known() -> bool:
            seen.extend(daemon.read_audit())
            if not daemon.running():
                raise RuntimeError(f"usbguard-daemon exited: {daemon.log()[-1500:]}")
            return any(record.sys_name == "usb1" for record in seen) and daemon.testbed() is not None

        _wait_for(root_hub_known, START_TIMEOUT_S, "usbguard-daemon to read the root hub")
        testbed = daemon.testbed()
        assert testbed is not None
        harness = _Harness(work, testbed)
        ready = harness.next_line(START_TIMEOUT_S)
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"the guard did not start in usbguard's testbed: {harness.log()[-1500:]}")
        result.outbox_sync = str(ready.get("outbox_sync", ""))
        waiter = _Waiter(harness, daemon)
        plugs = work / "plugs"
        plugs.mkdir()
        started = time.monotonic()
        for index in range(count):
            if time.monotonic() - started > budget_s:
                break
            kind, vendor, product, serial, interfaces = KINDS[index % len(KINDS)]
            sys_name = f"1-{index + 1}"
            device = usb_device(
                f"{PCI}/usb1/{sys_name}",
                vendor,
                product,
                interfaces,
                name=f"bench {kind}\n".encode(),
                serial=f"{serial}\n".encode() if serial else None,
            )
            source = write_umockdev(plugs / f"{sys_name}.umockdev", [device])
            linked = daemon.plug(source)
            pair = waiter.wait("add", sys_name, "Policy.Device.Update")
            if pair is None:
                result.timeouts += 1
                if result.timeouts >= MAX_TIMEOUTS:
                    break
                continue
            line, record = pair
            if line["decided"] is not None:
                uevent = float(line["uevent"])
                guard_ms = (float(line["decided"]) - uevent) * 1000
                usbguard_ms = (record.timestamp - uevent) * 1000
                if usbguard_ms < 0:
                    result.clamped += 1
                    usbguard_ms = 0.0
                result.guard_ms.append(guard_ms)
                result.usbguard_ms.append(usbguard_ms)
                result.delivery_ms.append((uevent - linked) * 1000)
                result.per_kind[kind][0].append(guard_ms)
                result.per_kind[kind][1].append(usbguard_ms)
                if line["target"] == record.fields.get("target.new"):
                    result.agree += 1
                else:
                    result.differ.append(f"{sys_name} ({kind}): guard {line['target']}, usbguard {record.fields}")
            daemon.unplug(source.name)
            if waiter.wait("remove", sys_name, "Device.Remove") is None:
                result.timeouts += 1
                if result.timeouts >= MAX_TIMEOUTS:
                    break
        result.elapsed_s = time.monotonic() - started
        return result
    finally:
        if harness is not None:
            harness.stop()
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
