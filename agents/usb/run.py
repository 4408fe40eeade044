"""Wire the USB guard into a running agent: real sysfs/udev/BLKROSET, or a fake tree for the demo.

A host without a USB bus (a VM without a USB controller: no /sys/bus/usb) must not take the terminal agent
down with it: the guard then says so once, shows it in the heartbeat's last error, and looks for the bus
again every ``bus_retry_s``, while the login guard and the card-removal lock keep running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.usb.guard import UsbGuard, site_ruleset
from sekisho.agents.usb.session import SessionProvider, StaticSession
from sekisho.drivers.usb.blockdev import BlockDeviceControl, FakeBlockDevices, IoctlBlockDevices, UdevBlockMonitor
from sekisho.drivers.usb.errors import UsbError
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
    # How often a host without a USB bus is looked at again (a controller may be added to a VM later).
    bus_retry_s: float = 60.0


# The heartbeat's last-error code while the guard waits for a USB bus.
NO_USB_BUS = "usb_bus_unavailable"


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
        *,
        bus_retry_s: float = 60.0,
        note_error: Callable[[str], None] | None = None,
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
        self._bus_retry_s = bus_retry_s
        self._note_error = note_error
        self._waiting_since: float | None = None
        self.running = False

    def start(self) -> None:
        """Start the guard (judging devices present), the block monitor and the sweep thread.

        Without a USB bus it does not raise: it logs why once and keeps looking for the bus in a thread.
        """
        if self._start_guard():
            self._thread = threading.Thread(target=self._run, name="usb-sweep", daemon=True)
        else:
            self._thread = threading.Thread(target=self._wait_for_bus, name="usb-wait-bus", daemon=True)
        self._thread.start()

    def _start_guard(self) -> bool:
        try:
            # Listed first: with no bus at all, nothing else is touched (no hot-plug monitor, no half start).
            self._seen = set(self.sysfs.list_devices())
            self.guard.start()
            if self._block_monitor is not None:
                self._block_monitor.start()
        except (UsbError, OSError, ImportError) as err:
            self.guard.stop()
            if self._block_monitor is not None:
                self._block_monitor.stop()
            self._unavailable(err)
            return False
        if self._waiting_since is not None:
            _LOG.warning("USB bus %s found: USB media guard started", self.sysfs.root)
            self._waiting_since = None
        self.running = True
        return True

    def _unavailable(self, err: BaseException) -> None:
        try:
            self._say_unavailable(err)
        finally:
            # After the log line: the agent notes every logged error as "log:<module>", this says more.
            if self._note_error is not None:
                self._note_error(NO_USB_BUS)

    def _say_unavailable(self, err: BaseException) -> None:
        if self._waiting_since is not None:
            _LOG.debug("still no USB bus: %s", err)
            return
        self._waiting_since = time.monotonic()
        # Logged once (the heartbeat shows it until the bus appears); no traceback: this is a fact of the host.
        _LOG.error(
            "USB バスがありません。USB 媒体制御は停止中（ログイン制御は継続）/ no USB bus at %s (%s): the USB media "
            "guard is not running, the login guard and the card-removal lock are; looking again every %g s",
            self.sysfs.root,
            err,
            self._bus_retry_s,
        )

    def _wait_for_bus(self) -> None:
        while not self._stop.wait(self._bus_retry_s):
            if self._start_guard():
                self._run()
                return

    def stop(self) -> None:
        """Stop the threads and the guard."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._block_monitor is not None:
            self._block_monitor.stop()
        self.guard.stop()
        self.running = False

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
    return AttachedGuard(
        guard,
        source,
        sysfs,
        monitor,
        config.sweep_interval_s,
        poll_tree=fake,
        bus_retry_s=config.bus_retry_s,
        note_error=agent.errors.note,
    )
