"""Extra descriptor details through libusb (pyusb), where libusb can see the device.

Optional: sysfs already gives everything the policy needs. Without pyusb, without a libusb backend,
or without the device on the bus, the answer is None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DescriptorDetails:
    """Descriptor fields sysfs does not put in the policy's view."""

    bcd_usb: int
    bcd_device: int
    max_packet_size0: int
    num_configurations: int


def descriptor_details(vendor_id: str, product_id: str) -> DescriptorDetails | None:
    """Return libusb's view of the first device with this ``vvvv``/``pppp`` ID, or None if it cannot see one."""
    try:
        import usb.core
    except ImportError:
        return None
    try:
        device = usb.core.find(idVendor=int(vendor_id, 16), idProduct=int(product_id, 16))
    except usb.core.NoBackendError:
        _LOG.debug("no libusb backend: descriptor details unavailable")
        return None
    except (usb.core.USBError, ValueError, OSError) as err:
        _LOG.debug("libusb lookup of %s:%s failed: %s", vendor_id, product_id, err)
        return None
    if device is None:
        return None
    return DescriptorDetails(
        bcd_usb=int(device.bcdUSB),
        bcd_device=int(device.bcdDevice),
        max_packet_size0=int(device.bMaxPacketSize0),
        num_configurations=int(device.bNumConfigurations),
    )
