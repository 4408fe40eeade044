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
ENDPOINT_DESCRIPTOR = 0x05
DEVICE_DESCRIPTOR_LENGTH = 18
CONFIG_DESCRIPTOR_LENGTH = 9
INTERFACE_DESCRIPTOR_LENGTH = 9
# An endpoint descriptor is 7 bytes, or 9 for an audio-class endpoint.
ENDPOINT_DESCRIPTOR_LENGTHS = frozenset({7, 9})
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
    """What the descriptor stream says about the device.

    ``interfaces`` holds each distinct (number, class, subclass, protocol) once; ``interface_types``
    holds the triple of every interface descriptor in stream order, alternate settings and further
    configurations included — the list USBGuard's ``with-interface`` compares against.
    """

    vendor_id: int
    product_id: int
    device_class: int
    device_subclass: int
    device_protocol: int
    num_configurations: int
    interfaces: tuple[UsbInterface, ...]
    interface_types: tuple[tuple[int, int, int], ...] = ()


def parse_descriptors(data: bytes) -> ParsedDescriptors:
    """Parse a device descriptor followed by configuration descriptors; raise DescriptorFormatError.

    The stream is refused wherever USBGuard's descriptor parser refuses it (so a device USBGuard cannot
    judge is unreadable here too, and blocked): a device, configuration or interface descriptor whose
    length is not exactly 18, 9 or 9 bytes, an endpoint descriptor that is neither 7 nor 9 bytes, a
    second device descriptor, an interface outside a configuration, an endpoint outside an interface.
    """
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
    types: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int, int]] = set()
    in_config = in_interface = False
    offset = DEVICE_DESCRIPTOR_LENGTH
    while offset < len(data):
        if len(data) - offset < 2:
            raise DescriptorFormatError("truncated descriptor header", offset)
        length, kind = data[offset], data[offset + 1]
        if length < 2 or offset + length > len(data):
            raise DescriptorFormatError(f"descriptor length {length} out of bounds", offset)
        if kind == DEVICE_DESCRIPTOR:
            raise DescriptorFormatError("second device descriptor", offset)
        if kind == CONFIG_DESCRIPTOR:
            if length != CONFIG_DESCRIPTOR_LENGTH:
                raise DescriptorFormatError(f"configuration descriptor of {length} bytes", offset)
            in_config, in_interface = True, False
        elif kind == INTERFACE_DESCRIPTOR:
            if length != INTERFACE_DESCRIPTOR_LENGTH:
                raise DescriptorFormatError(f"interface descriptor of {length} bytes", offset)
            if not in_config:
                raise DescriptorFormatError("interface descriptor outside a configuration", offset)
            in_interface = True
            number, cls, sub, proto = data[offset + 2], data[offset + 5], data[offset + 6], data[offset + 7]
            types.append((cls, sub, proto))
            # Every alternate setting counts: a device must not hide a HID function behind altsetting 1.
            key = (number, cls, sub, proto)
            if key not in seen:
                seen.add(key)
                interfaces.append(UsbInterface(number=number, cls=cls, subclass=sub, protocol=proto))
        elif kind == ENDPOINT_DESCRIPTOR:
            if length not in ENDPOINT_DESCRIPTOR_LENGTHS:
                raise DescriptorFormatError(f"endpoint descriptor of {length} bytes", offset)
            if not in_interface:
                raise DescriptorFormatError("endpoint descriptor outside an interface", offset)
        offset += length
    return ParsedDescriptors(
        vendor_id=vendor,
        product_id=product,
        device_class=dev_cls,
        device_subclass=dev_sub,
        device_protocol=dev_proto,
        num_configurations=num_configs,
        interfaces=tuple(interfaces),
        interface_types=tuple(types),
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
    alternates: tuple[tuple[int, int, int, int], ...] = (),
    bcd_device: int = 0x0100,
) -> bytes:
    """Return a well-formed device + one configuration descriptor stream (for fakes and umockdev files).

    ``interfaces`` become interfaces 0, 1, … (alternate setting 0); each ``alternates`` entry
    ``(number, class, subclass, protocol)`` adds alternate setting 1 of interface ``number``.
    """
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
        bcd_device,
        1,
        2,
        3 if has_serial else 0,
        1,
    )
    body = b"".join(
        struct.pack("<BBBBBBBBB", INTERFACE_DESCRIPTOR_LENGTH, INTERFACE_DESCRIPTOR, number, 0, 0, cls, sub, proto, 0)
        for number, (cls, sub, proto) in enumerate(interfaces)
    ) + b"".join(
        struct.pack("<BBBBBBBBB", INTERFACE_DESCRIPTOR_LENGTH, INTERFACE_DESCRIPTOR, number, 1, 0, cls, sub, proto, 0)
        for number, cls, sub, proto in alternates
    )
    total = CONFIG_DESCRIPTOR_LENGTH + len(body)
    config = struct.pack(
        "<BBHBBBBB", CONFIG_DESCRIPTOR_LENGTH, CONFIG_DESCRIPTOR, total, len(interfaces), 1, 0, 0x80, 50
    )
    return device + config + body
