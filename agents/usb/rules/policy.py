"""The product's default USB policy: a rule set plus the class checks no rule file may override.

Class codes (USB-IF "Defined Class Codes"):

- allowed: hubs (``09``) and HID keyboards/mice — boot keyboard ``03:01:01``, boot mouse ``03:01:02``
  and non-boot HID ``03:00:*`` (most modern mice and keyboards report no boot subclass);
- blocked: mass storage ``08``, still image/PTP and MTP-over-PTP ``06``, CDC data ``0a``, wireless
  controllers ``e0`` and vendor-specific ``ff``; every class not allowed (audio, video, printers,
  CDC control ``02``, …) falls through to the default, which is block.
- MTP devices that declare a vendor-specific interface (``ff``, as many phones do) are out of scope
  as MTP: they are blocked as vendor-specific, which is the same outcome.
- A device declaring both mass storage (``08``) and HID (``03``) is rejected as a BadUSB, before any
  rule is consulted: no imported allow rule can let it through.
- A device whose descriptors could not be read, or that declares no interface at all, is blocked.

A keyboard that also exposes a vendor-specific interface (many gaming keyboards do) is blocked by
default; a site that needs one pins it with an explicit ``allow … hash "…"`` rule.
"""

from __future__ import annotations

from functools import cache

from sekisho.agents.usb.rules.model import Target
from sekisho.agents.usb.rules.parser import parse_rules
from sekisho.agents.usb.rules.ruleset import Decision, RuleSet
from sekisho.drivers.usb.errors import UsbError
from sekisho.drivers.usb.model import UsbDevice

HUB_CLASS = 0x09
HID_CLASS = 0x03
MASS_STORAGE_CLASS = 0x08
STILL_IMAGE_CLASS = 0x06
CDC_DATA_CLASS = 0x0A
WIRELESS_CLASS = 0xE0
VENDOR_SPECIFIC_CLASS = 0xFF

UNREADABLE_REASON = "unreadable descriptors"
NO_INTERFACES_REASON = "no interfaces declared"
BADUSB_REASON = "mass storage combined with HID (BadUSB)"

DEFAULT_POLICY_TEXT = """\
# sekisho default USB policy (first match wins; anything unmatched is blocked)
block with-interface one-of { 08:*:* 06:*:* 0a:*:* e0:*:* ff:*:* }
allow with-interface match-all { 09:*:* 03:01:01 03:01:02 03:00:* }
"""


@cache
def default_ruleset() -> RuleSet:
    """Return the default policy's rule set (default target: block)."""
    parsed = parse_rules(DEFAULT_POLICY_TEXT, default_target=Target.BLOCK)
    # The text above is a constant; a problem here is a bug, not input to report.
    assert not parsed.problems, parsed.problems
    return parsed.ruleset


def decide_device(device: UsbDevice, ruleset: RuleSet | None = None) -> Decision:
    """Judge a device: class checks first (no interfaces → block, storage+HID → reject), then the rules."""
    classes = {interface.cls for interface in device.interfaces}
    if not classes:
        # `match-all` holds vacuously for an empty interface list; never let that allow a device.
        return Decision(Target.BLOCK, None, "class-check", NO_INTERFACES_REASON)
    if MASS_STORAGE_CLASS in classes and HID_CLASS in classes:
        return Decision(Target.REJECT, None, "class-check", BADUSB_REASON)
    return (ruleset if ruleset is not None else default_ruleset()).decide(device)


def decide_unreadable(error: UsbError | None = None) -> Decision:
    """Judge a device that could not be read: block, with the driver's reason appended."""
    reason = UNREADABLE_REASON if error is None else f"{UNREADABLE_REASON}: {error}"
    return Decision(Target.BLOCK, None, "class-check", reason)
