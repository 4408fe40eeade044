"""Rules of the USBGuard-compatible language: targets, attribute conditions, set operators, matching.

Matching is usbguard-daemon 1.1.2's (``Rule::Attribute::appliesTo`` and the ``Predicates``), checked
against the daemon in ``tests/test_usb_usbguard.py``. A rule applies when every attribute it names
applies to the device; an attribute compares the rule's values with the device's values:

- ``all-of``: every rule value matches some device value;
- ``one-of``: some rule value matches some device value;
- ``none-of``: no rule value matches any device value;
- ``equals`` (the default, and what a single value means): as many device values as rule values, and
  every rule value matching some device value. This is a count, not a set equality: with overlapping
  patterns (``equals { 08:*:* 08:06:* }``) a second device interface need not match any rule value,
  so the importer warns about overlapping ``equals`` values;
- ``equals-ordered``: same length, rule value *i* matching device value *i*;
- ``match-all``: every device value "is a subset of" some rule value — which USBGuard implements only
  for interface types. For ``id`` a device id is a subset only of the identical id (``0781:5581``,
  never ``0781:*``); for the string attributes the test is not implemented and always holds, so
  ``match-all`` on ``name``, ``serial``, ``hash``, ``parent-hash``, ``via-port`` or
  ``with-connect-type`` matches every device. Both quirks are kept (the verdict must be the daemon's)
  and the importer warns about them.

Values are compared as USBGuard compares them: ids as the strings written (case-sensitive; the
kernel reports lowercase hex, so ``0A5C:*`` matches nothing), interface types by value, strings byte
for byte (a rule string holds bytes; ``StringValue.text`` keeps bytes that are not UTF-8 as
``surrogateescape`` characters).

Device-side values: ``id`` → ``vvvv:pppp``; ``hash``/``parent-hash`` → USBGuard's device hashes
(``drivers.usb.model``); ``name`` → the product string; ``serial``; ``via-port`` → the sys name
(``1-2``, ``usb1``); ``with-interface`` → every interface descriptor's class triple, alternate settings
counted again; ``with-connect-type`` → ``port/connect_type`` (``""`` for root hubs and when missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sekisho.drivers.usb.model import UsbDevice


class Target(StrEnum):
    """What happens to a device a rule matches."""

    ALLOW = "allow"
    BLOCK = "block"
    REJECT = "reject"


class SetOperator(StrEnum):
    """How a multi-valued attribute compares the rule's values with the device's."""

    ALL_OF = "all-of"
    ONE_OF = "one-of"
    NONE_OF = "none-of"
    EQUALS = "equals"
    EQUALS_ORDERED = "equals-ordered"
    MATCH_ALL = "match-all"


class AttributeName(StrEnum):
    """Device attributes a rule can name."""

    ID = "id"
    HASH = "hash"
    PARENT_HASH = "parent-hash"
    NAME = "name"
    SERIAL = "serial"
    VIA_PORT = "via-port"
    WITH_INTERFACE = "with-interface"
    WITH_CONNECT_TYPE = "with-connect-type"


STRING_ATTRIBUTES = frozenset(
    {
        AttributeName.HASH,
        AttributeName.PARENT_HASH,
        AttributeName.NAME,
        AttributeName.SERIAL,
        AttributeName.VIA_PORT,
        AttributeName.WITH_CONNECT_TYPE,
    }
)


class _Pattern(Protocol):
    def matches(self, value: object) -> bool: ...
    def contains(self, value: object) -> bool: ...
    def to_text(self) -> str: ...


@dataclass(frozen=True, slots=True)
class DeviceIdPattern:
    """``vvvv:pppp`` with ``*`` wildcards (``vvvv:*``, ``*:*``), hex digits as written; None stands for ``*``."""

    vendor: str | None
    product: str | None

    def __post_init__(self) -> None:
        for part in (self.vendor, self.product):
            if part is not None and (len(part) != 4 or not _is_hex(part)):
                raise ValueError(f"device id part must be 4 hex digits: {part!r}")
        if self.vendor is None and self.product is not None:
            raise ValueError("a wildcard vendor needs a wildcard product")

    def matches(self, value: object) -> bool:
        """Return whether a device's ``vvvv:pppp`` matches (wildcards apply; digits compared as written)."""
        if not isinstance(value, str):
            return False
        vendor, _, product = value.partition(":")
        if self.vendor is None:
            return True
        return self.vendor == vendor and (self.product is None or self.product == product)

    def contains(self, value: object) -> bool:
        """USBGuard's ``match-all`` test: the device id "is a subset of" this one only if identical."""
        return isinstance(value, str) and value == f"{self.vendor}:{self.product}"

    @property
    def lowercase(self) -> bool:
        """Return whether the id can match a kernel-reported id (which is lowercase hex)."""
        return all(part is None or part == part.lower() for part in (self.vendor, self.product))

    def to_text(self) -> str:
        """Return the rule-language form."""
        return f"{self.vendor or '*'}:{self.product or '*'}"


@dataclass(frozen=True, slots=True)
class InterfacePattern:
    """``cc:ss:pp`` with ``*`` for subclass and/or protocol (a ``*`` subclass needs a ``*`` protocol)."""

    cls: int
    subclass: int | None
    protocol: int | None

    def __post_init__(self) -> None:
        for byte in (self.cls, self.subclass, self.protocol):
            if byte is not None and not 0 <= byte <= 0xFF:
                raise ValueError(f"interface field out of range: {byte}")
        if self.subclass is None and self.protocol is not None:
            raise ValueError("a wildcard subclass needs a wildcard protocol")

    def matches(self, value: object) -> bool:
        """Return whether a device interface triple ``(cls, sub, proto)`` matches."""
        if not isinstance(value, tuple) or len(value) != 3:
            return False
        cls, sub, proto = value
        return (
            cls == self.cls
            and (self.subclass is None or sub == self.subclass)
            and (self.protocol is None or proto == self.protocol)
        )

    def contains(self, value: object) -> bool:
        """USBGuard's ``match-all`` test for interfaces: the same as ``matches``."""
        return self.matches(value)

    def overlaps(self, other: InterfacePattern) -> bool:
        """Return whether some interface triple matches both patterns."""
        return (
            self.cls == other.cls
            and (self.subclass is None or other.subclass is None or self.subclass == other.subclass)
            and (self.protocol is None or other.protocol is None or self.protocol == other.protocol)
        )

    def to_text(self) -> str:
        """Return the rule-language form."""
        sub = "*" if self.subclass is None else f"{self.subclass:02x}"
        proto = "*" if self.protocol is None else f"{self.protocol:02x}"
        return f"{self.cls:02x}:{sub}:{proto}"


@dataclass(frozen=True, slots=True)
class StringValue:
    """A quoted string compared byte for byte (non-UTF-8 bytes held as ``surrogateescape`` characters)."""

    text: str

    def matches(self, value: object) -> bool:
        """Return whether the device value equals the string."""
        return value == self.text

    def contains(self, value: object) -> bool:
        """USBGuard's ``match-all`` test for strings is not implemented and always holds."""
        return True

    def to_text(self) -> str:
        """Return the quoted, escaped rule-language form."""
        return quote(self.text)


Value = DeviceIdPattern | InterfacePattern | StringValue


@dataclass(frozen=True, slots=True)
class Condition:
    """One attribute of a rule: its name, set operator and the rule-side values."""

    attribute: AttributeName
    operator: SetOperator
    values: tuple[Value, ...]

    def applies_to(self, device_values: Sequence[object]) -> bool:
        """Return whether this condition holds for the device's values of the attribute (as USBGuard)."""
        rule = self.values
        if self.operator is SetOperator.ALL_OF:
            return all(any(r.matches(d) for d in device_values) for r in rule)
        if self.operator is SetOperator.ONE_OF:
            return any(r.matches(d) for r in rule for d in device_values)
        if self.operator is SetOperator.NONE_OF:
            return not any(r.matches(d) for r in rule for d in device_values)
        if self.operator is SetOperator.EQUALS:
            return len(rule) == len(device_values) and all(any(r.matches(d) for d in device_values) for r in rule)
        if self.operator is SetOperator.EQUALS_ORDERED:
            return len(rule) == len(device_values) and all(
                r.matches(d) for r, d in zip(rule, device_values, strict=True)
            )
        # MATCH_ALL
        return all(any(r.contains(d) for r in rule) for d in device_values)

    def to_text(self) -> str:
        """Return ``name value`` or ``name [operator] { values }`` as USBGuard writes it."""
        if self.operator is SetOperator.EQUALS and len(self.values) == 1:
            return f"{self.attribute} {self.values[0].to_text()}"
        operator = "" if self.operator is SetOperator.EQUALS else f"{self.operator} "
        return f"{self.attribute} {operator}{{ {' '.join(v.to_text() for v in self.values)} }}"


def device_values(device: UsbDevice, attribute: AttributeName) -> tuple[object, ...]:
    """Return the device's values for an attribute, in the form the patterns compare against."""
    if attribute is AttributeName.ID:
        return (device.device_id,)
    if attribute is AttributeName.HASH:
        return (device.device_hash,)
    if attribute is AttributeName.PARENT_HASH:
        return (device.parent_hash,)
    if attribute is AttributeName.NAME:
        return (device.raw_product.decode("utf-8", "surrogateescape"),)
    if attribute is AttributeName.SERIAL:
        return (device.raw_serial.decode("utf-8", "surrogateescape"),)
    if attribute is AttributeName.VIA_PORT:
        return (device.sys_name,)
    if attribute is AttributeName.WITH_INTERFACE:
        return device.rule_interfaces
    return (device.connect_type,)


@dataclass(frozen=True, slots=True)
class Rule:
    """A target and the conditions a device must meet for the target to apply."""

    target: Target
    conditions: tuple[Condition, ...] = ()

    def matches(self, device: UsbDevice) -> bool:
        """Return whether every condition of the rule holds for the device."""
        return all(c.applies_to(device_values(device, c.attribute)) for c in self.conditions)

    def condition(self, attribute: AttributeName) -> Condition | None:
        """Return the rule's condition on an attribute, or None."""
        return next((c for c in self.conditions if c.attribute is attribute), None)

    def to_text(self) -> str:
        """Return the rule in the rule language; ``parse_rule(rule.to_text()) == rule``."""
        return " ".join([str(self.target), *(c.to_text() for c in self.conditions)])

    def __str__(self) -> str:
        return self.to_text()


def quote(text: str) -> str:
    """Quote a string as USBGuard does: ``\\"``, ``\\\\``, printable ASCII as is, every other byte as ``\\xHH``."""
    out = ['"']
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        else:
            # USBGuard writes device strings byte by byte; UTF-8 keeps Japanese product names intact.
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8", errors="surrogateescape"))
    out.append('"')
    return "".join(out)


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)
