"""Run under `umockdev-run -d TREE.umockdev -- python usbguard_probe.py RULESETS.json` by tests/test_usb_usbguard.py.

Reads the mocked /sys/bus/usb/devices with sekisho's driver, fills the hash placeholders of the rule
sets (``<hash:1-2>`` is sekisho's hash of device 1-2, ``<parent:usb1>`` its parent hash) and prints
one JSON object: every device as USBGuard would print its device rule, and sekisho's verdict for every
device under every rule set. The test hands the same tree and the filled rule sets to usbguard-daemon.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from sekisho.agents.usb.rules import parse_rules
from sekisho.agents.usb.rules.model import quote
from sekisho.drivers.usb import SysfsUsb, UsbDevice

_PLACEHOLDER = re.compile(r"<(hash|parent):([^>]+)>")


def device_rule(device: UsbDevice) -> str:
    """Return the device as USBGuard's device rule prints it (without the target)."""
    interfaces = [f"{c:02x}:{s:02x}:{p:02x}" for c, s, p in device.rule_interfaces]
    # USBGuard leaves an attribute without values out (a device without interfaces has no with-interface).
    with_interface = []
    if len(interfaces) == 1:
        with_interface = [f"with-interface {interfaces[0]}"]
    elif interfaces:
        with_interface = [f"with-interface {{ {' '.join(interfaces)} }}"]
    return " ".join(
        [
            f"id {device.device_id}",
            f"serial {quote(device.raw_serial.decode('utf-8', 'surrogateescape'))}",
            f"name {quote(device.raw_product.decode('utf-8', 'surrogateescape'))}",
            f"hash {quote(device.device_hash)}",
            f"parent-hash {quote(device.parent_hash)}",
            f"via-port {quote(device.sys_name)}",
            *with_interface,
            f"with-connect-type {quote(device.connect_type)}",
        ]
    )


def main() -> None:
    """Print the devices and sekisho's verdicts as one JSON line."""
    templates: list[str] = json.loads(Path(sys.argv[1]).read_text())["rulesets"]
    scan = SysfsUsb().scan()
    devices = {device.sys_name: device for device in scan.devices}

    def fill(match: re.Match[str]) -> str:
        device = devices[match.group(2)]
        return device.device_hash if match.group(1) == "hash" else device.parent_hash

    rulesets = [_PLACEHOLDER.sub(fill, template) for template in templates]
    verdicts = []
    for text in rulesets:
        parsed = parse_rules(text)
        assert not parsed.problems, (text, parsed.problems)
        verdicts.append({name: str(parsed.ruleset.decide(device).target) for name, device in devices.items()})
    result = {
        "devices": {name: device_rule(device) for name, device in devices.items()},
        "unreadable": [str(error) for error in scan.unreadable],
        "rulesets": rulesets,
        "verdicts": verdicts,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
