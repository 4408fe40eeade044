"""Wire the USB guard into a running agent: real sysfs/udev/BLKROSET, or a fake tree for the demo."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.usb.guard import UsbGuard, site_ruleset
from sekisho.agents.usb.session import SessionProvider, StaticSession
from sekisho.drivers.usb.blockdev import BlockDeviceControl, FakeBlockDevices, IoctlBlockDevices, UdevBlockMonitor
from sekisho.drivers.usb.events import HotplugSource, InjectedHotplug, UdevHotplug
from sekisho.drivers.usb.sysfs import DEFAULT_SYSFS_ROOT, SysfsUsb

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class UsbGuardConfig:
    """How the guard is attached: which terminal, which sysfs root, which admin rules, how often to sweep."""

    terminal_id: str
    sysfs_root: Path | None = None
    rules_text: str | None = None
    sweep_interval_s: float = 1.0


class AttachedGuard:
    """A guard plus the threads that feed it (block-device monitor, sweeps, fake-tree polling)."""

    def __init__(
        self,
        guard: UsbGuard,
        hotplug: HotplugSource,
        sysfs: SysfsUsb,
        block_monitor: UdevBlockMonitor | None,
        interval_s: float,
        poll_tree: bool,
    ) -> None:
        self.guard = guard
        self.hotplug = hotplug
        self.sysfs = sysfs
        self._block_monitor = block_monitor
        self._interval = interval_s
        self._poll_tree = poll_tree
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[str] = set()

    def start(self) -> None:
        """Start the guard (judging devices present), then the block monitor and the sweep thread."""
        self.guard.start()
        self._seen = set(self.sysfs.list_devices())
        if self._block_monitor is not None:
            self._block_monitor.start()
        self._thread = threading.Thread(target=self._run, name="usb-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the threads and the guard."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._block_monitor is not None:
            self._block_monitor.stop()
        self.guard.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self._poll_tree and isinstance(self.hotplug, InjectedHotplug):
                    self._diff_tree(self.hotplug)
                self.guard.sweep()
            except Exception:  # the sweep must outlive one bad tree read
                _LOG.exception("USB sweep failed")

    def _diff_tree(self, hotplug: InjectedHotplug) -> None:
        # A fake tree has no uevents: changes made by another process are found by listing it.
        present = set(self.sysfs.list_devices())
        for name in sorted(self._seen - present):
            hotplug.inject_remove(name)
        for name in sorted(present - self._seen):
            if not name.startswith("usb"):
                hotplug.inject_add(name)
        self._seen = present


def attach_usb_guard(
    agent: Agent,
    config: UsbGuardConfig,
    *,
    session: SessionProvider | None = None,
    blockdevs: BlockDeviceControl | None = None,
    hotplug: HotplugSource | None = None,
) -> AttachedGuard:
    """Build a USB guard on the agent's emit and policy cache; the caller starts it (after agent.start())."""
    fake = config.sysfs_root is not None
    sysfs = SysfsUsb(config.sysfs_root or DEFAULT_SYSFS_ROOT)
    source = hotplug or (InjectedHotplug(sysfs) if fake else UdevHotplug(sysfs))
    control = blockdevs or (FakeBlockDevices(sysfs.root) if fake else IoctlBlockDevices(sysfs.root))
    guard = UsbGuard(
        agent.emit_many,
        agent.policy,
        sysfs,
        source,
        session or StaticSession(),
        config.terminal_id,
        control,
        rules=site_ruleset(config.rules_text),
    )
    monitor = None if fake else UdevBlockMonitor(guard.on_block_device)
    return AttachedGuard(guard, source, sysfs, monitor, config.sweep_interval_s, poll_tree=fake)
