"""Run under `umockdev-run -- /usr/bin/python3` by tests/test_usb_umockdev.py; prints one JSON line.

It builds a mocked USB tree with UMockdev.Testbed (root hub usb1, a stick at 1-2), then drives the
project's SysfsUsb and UdevHotplug against the real /sys/bus/usb/devices path that umockdev redirects.
Only the driver is imported: it needs the standard library and pyudev, which Debian's Python has.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

from sekisho.drivers.usb import SysfsUsb, UdevHotplug, UsbEvent  # noqa: E402
from sekisho.drivers.usb.descriptors import build_descriptors  # noqa: E402

STICK = build_descriptors(vendor_id=0x0781, product_id=0x5581, interfaces=((0x08, 0x06, 0x50),))
HUB = build_descriptors(vendor_id=0x1D6B, product_id=0x0002, device_class=0x09, interfaces=((0x09, 0x00, 0x00),))


def _attrs(vendor: str, product: str, cls: str, serial: str) -> list[str]:
    return [
        "idVendor",
        vendor,
        "idProduct",
        product,
        "bDeviceClass",
        cls,
        "bDeviceSubClass",
        "00",
        "bDeviceProtocol",
        "00",
        "authorized",
        "1",
        "serial",
        serial,
        "product",
        "Mock " + vendor,
    ]


def main() -> None:
    """Build the mocked tree, exercise the driver, print the observations as JSON."""
    testbed = UMockdev.Testbed.new()
    hub = testbed.add_device(
        "usb",
        "usb1",
        None,
        [*_attrs("1d6b", "0002", "09", "0000:00:14.0"), "authorized_default", "1"],
        ["DEVTYPE", "usb_device"],
    )
    testbed.set_attribute_binary(hub, "descriptors", HUB)
    stick = testbed.add_device(
        "usb", "1-2", hub, _attrs("0781", "5581", "00", "4C530001234567891234"), ["DEVTYPE", "usb_device"]
    )
    testbed.set_attribute_binary(stick, "descriptors", STICK)

    sysfs = SysfsUsb()
    result: dict[str, object] = {"devices": sysfs.list_devices()}
    device = sysfs.read_device("1-2")
    result["interfaces"] = [i.type_text for i in device.interfaces]
    result["parent_hash_ok"] = device.parent_hash == sysfs.read_device("usb1").device_hash
    sysfs.deauthorize("1-2")
    result["authorized_after_deauthorize"] = Path("/sys/bus/usb/devices/1-2/authorized").read_text().strip()
    result["hubs_defaulted"] = sysfs.set_authorized_default(0)
    result["authorized_default"] = Path("/sys/bus/usb/devices/usb1/authorized_default").read_text().strip()

    import pyudev

    result["pyudev_sees"] = sorted(d.sys_name for d in pyudev.Context().list_devices(subsystem="usb"))

    events: list[UsbEvent] = []
    got = threading.Event()

    def observe(event: UsbEvent) -> None:
        events.append(event)
        if event.action == "remove":
            got.set()

    source = UdevHotplug(sysfs)
    source.subscribe(observe)
    source.start()
    try:
        # add_device announces the device at once, possibly before its descriptors are written, so
        # that first add may read as unreadable; the explicit add after them must read the keyboard.
        second = testbed.add_device("usb", "1-3", hub, _attrs("046d", "c31c", "00", ""), ["DEVTYPE", "usb_device"])
        testbed.set_attribute_binary(
            second,
            "descriptors",
            build_descriptors(vendor_id=0x046D, product_id=0xC31C, interfaces=((0x03, 0x01, 0x01),), has_serial=False),
        )
        testbed.uevent(second, "add")
        testbed.uevent(second, "remove")
        got.wait(10)
    finally:
        source.stop()
    result["events"] = [
        [e.action, e.sys_name, e.device.device_id if e.device else None, str(e.error) if e.error else None]
        for e in events
    ]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
