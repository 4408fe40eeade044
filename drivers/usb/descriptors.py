"""Parse the raw descriptor stream the kernel exposes in sysfs ``descriptors``.

The interface list is taken from these bytes rather than only from the ``1-2:1.0`` directories
because the kernel creates interface directories only for an authorised, configured device; with
``authorized_default=0`` a newly plugged device has none, and the policy must still see what it
declares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sekisho.drivers.usb.model import UsbInterface

DEVICE_DESCRIPTOR = 0x01
CONFIG_DESCRIPTOR = 0x02
INTERFACE_DESCRIPTOR = 0x04
DEVICE_DESCRIPTOR_LENGTH = 18
CONFIG_DESCRIPTOR_LENGTH = 9
INTERFACE_DESCRIPTOR_LENGTH = 9
# A device has at most 8 configurations with wTotalLength ≤ 65535 each; anything bigger is not a
# descriptor file and is refused before parsing.
MAX_DESCRIPTORS_SIZE = DEVICE_DESCRIPTOR_LENGTH + 8 * 65535


class DescriptorFormatError(ValueError):
    """The descriptor bytes are not a well-formed USB descriptor stream."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(f"{reason} at byte {offset}")
        self.reason = reason
        self.offset = offset


@dataclass(frozen=True, slots=True)
class ParsedDescriptors:
    """What the descriptor stream says about the device."""

    vendor_id: int
    product_id: int
    device_class: int
    device_subclass: int
    device_protocol: int
    num_configurations: int
    interfaces: tuple[UsbInterface, ...]


def parse_descriptors(data: bytes) -> ParsedDescriptors:
    """Parse a device descriptor followed by configuration descriptors; raise DescriptorFormatError."""
    if len(data) > MAX_DESCRIPTORS_SIZE:
        raise DescriptorFormatError("descriptor data too large", MAX_DESCRIPTORS_SIZE)
    if len(data) < DEVICE_DESCRIPTOR_LENGTH:
        raise DescriptorFormatError("truncated device descriptor", len(data))
    if data[0] != DEVICE_DESCRIPTOR_LENGTH or data[1] != DEVICE_DESCRIPTOR:
        raise DescriptorFormatError("not a device descriptor", 0)
    (_, _, _, dev_cls, dev_sub, dev_proto, _, vendor, product, _, _, _, _, num_configs) = struct.unpack_from(
        "<BBHBBBBHHHBBBB", data, 0
    )
    interfaces: list[UsbInterface] = []
    seen: set[tuple[int, int, int, int]] = set()
    offset = DEVICE_DESCRIPTOR_LENGTH
    while offset < len(data):
        if len(data) - offset < 2:
            raise DescriptorFormatError("truncated descriptor header", offset)
        length, kind = data[offset], data[offset + 1]
        if length < 2 or offset + length > len(data):
            raise DescriptorFormatError(f"descriptor length {length} out of bounds", offset)
        if kind == CONFIG_DESCRIPTOR and length < CONFIG_DESCRIPTOR_LENGTH:
            raise DescriptorFormatError("short configuration descriptor", offset)
        if kind == INTERFACE_DESCRIPTOR:
            if length < INTERFACE_DESCRIPTOR_LENGTH:
                raise DescriptorFormatError("short interface descriptor", offset)
            number, cls, sub, proto = data[offset + 2], data[offset + 5], data[offset + 6], data[offset + 7]
            # Every alternate setting counts: a device must not hide a HID function behind altsetting 1.
            key = (number, cls, sub, proto)
            if key not in seen:
                seen.add(key)
                interfaces.append(UsbInterface(number=number, cls=cls, subclass=sub, protocol=proto))
        offset += length
    return ParsedDescriptors(
        vendor_id=vendor,
        product_id=product,
        device_class=dev_cls,
        device_subclass=dev_sub,
        device_protocol=dev_proto,
        num_configurations=num_configs,
        interfaces=tuple(interfaces),
    )


def build_descriptors(
    *,
    vendor_id: int,
    product_id: int,
    device_class: int = 0,
    device_subclass: int = 0,
    device_protocol: int = 0,
    interfaces: tuple[tuple[int, int, int], ...] = (),
    has_serial: bool = True,
) -> bytes:
    """Return a well-formed device + one configuration descriptor stream (for fakes and umockdev files)."""
    device = struct.pack(
        "<BBHBBBBHHHBBBB",
        DEVICE_DESCRIPTOR_LENGTH,
        DEVICE_DESCRIPTOR,
        0x0200,
        device_class,
        device_subclass,
        device_protocol,
        64,
        vendor_id,
        product_id,
        0x0100,
        1,
        2,
        3 if has_serial else 0,
        1,
    )
    body = b"".join(
        struct.pack("<BBBBBBBBB", INTERFACE_DESCRIPTOR_LENGTH, INTERFACE_DESCRIPTOR, number, 0, 0, cls, sub, proto, 0)
        for number, (cls, sub, proto) in enumerate(interfaces)
    )
    total = CONFIG_DESCRIPTOR_LENGTH + len(body)
    config = struct.pack(
        "<BBHBBBBB", CONFIG_DESCRIPTOR_LENGTH, CONFIG_DESCRIPTOR, total, len(interfaces), 1, 0, 0x80, 50
    )
    return device + config + body
