"""Demo USB traffic on a fake sysfs tree: a stick blocked, a keyboard allowed, a lent medium for its borrower only."""

from __future__ import annotations

import logging
import threading

from sekisho.agents.usb.guard import UsbGuard
from sekisho.agents.usb.session import StaticSession
from sekisho.drivers.usb.blockdev import FakeBlockDevices
from sekisho.drivers.usb.events import InjectedHotplug
from sekisho.drivers.usb.fake import FakeSysfsTree

_LOG = logging.getLogger(__name__)


def run_usb_traffic(
    guard: UsbGuard,
    tree: FakeSysfsTree,
    hotplug: InjectedHotplug,
    session: StaticSession,
    blocks: FakeBlockDevices,
    stop: threading.Event,
    *,
    borrower: str,
    other_person: str,
    medium_serial: str,
    interval_s: float = 2.0,
) -> None:
    """Plug and unplug demo devices until stopped; the guard (already started) records every decision."""
    if not (tree.root / "usb1").exists():
        tree.add_root_hub(1)
    steps = [
        ("unregistered stick", "1-2", 0x0781, 0x5581, "4C530001230000123456", (0x08, 0x06, 0x50), borrower),
        ("keyboard", "1-1", 0x046D, 0xC31C, "", (0x03, 0x01, 0x01), borrower),
        ("lent medium, borrower", "1-4", 0x0951, 0x1666, medium_serial, (0x08, 0x06, 0x50), borrower),
        ("lent medium, someone else", "1-4", 0x0951, 0x1666, medium_serial, (0x08, 0x06, 0x50), other_person),
    ]
    while not stop.is_set():
        for label, sys_name, vendor, product, serial, interface, person in steps:
            if stop.is_set():
                return
            session.login(person)
            tree.add_device(sys_name, vendor, product, serial=serial, interfaces=[interface], authorized=False)
            hotplug.inject_add(sys_name)
            if tree.read_attribute(sys_name, "authorized") == "1" and interface[0] == 0x08:
                # The kernel's part once a storage device is authorised: its disk appears.
                blocks.add_disk(sys_name, "sdb")
                guard.on_block_device(sys_name, "sdb")
            _LOG.info("demo USB: %s → %s", label, guard.decisions().get(sys_name, "?"))
            stop.wait(interval_s)
            tree.remove_device(sys_name)
            hotplug.inject_remove(sys_name)
