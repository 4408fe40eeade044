"""Event types known to this protocol version and their payload schemas.

Capabilities add their own types here (login, USB, doors). A type's schema only ever gains optional
fields within one protocol version; anything else is a new type name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from protocol.events import Payload, event_type

# Annotated constraints (not shared Field objects) so each field can still have its own default.
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
# A card identifier is only ever sent keyed-hashed (hex) and masked for display.
CardHash = Annotated[str, Field(pattern=r"^[0-9a-f]{32,64}$")]
Masked = Annotated[str, Field(max_length=32)]
Reason = Annotated[str, Field(max_length=200)]


@event_type("agent.started")
class AgentStarted(Payload):
    """The agent process started (after a boot, an update or a crash)."""

    version: str = Field(max_length=32)
    outbox_depth: int = Field(ge=0)
    policy_version: int | None = None


@event_type("agent.policy_applied")
class PolicyApplied(Payload):
    """A new signed policy bundle was verified and became the one in force."""

    policy_version: int = Field(ge=1)
    previous_version: int | None = None


@event_type("agent.policy_rejected")
class PolicyRejected(Payload):
    """A policy bundle arrived and was refused (bad signature, expired, rollback, wrong agent...)."""

    reason: Reason
    detail: str = Field(default="", max_length=300)
    policy_version: int | None = None


@event_type("agent.policy_expired")
class PolicyExpired(Payload):
    """The cached policy passed its expiry without a newer one: decisions now fail closed."""

    policy_version: int = Field(ge=1)


@event_type("agent.command_executed")
class CommandExecuted(Payload):
    """A signed command from the controller was accepted and carried out."""

    command_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    name: str = Field(max_length=64)
    result: str = Field(default="ok", max_length=200)


@event_type("agent.command_rejected")
class CommandRejected(Payload):
    """A command was refused (bad signature, expired, replayed, unknown, for another agent)."""

    reason: Reason
    detail: str = Field(default="", max_length=300)
    command_id: str | None = Field(default=None, max_length=64)
    name: str | None = Field(default=None, max_length=64)


@event_type("card.presented")
class CardPresented(Payload):
    """A card was read at a reader; the identifier is keyed-hashed and masked."""

    reader: Id
    card_hash: CardHash
    card_masked: Masked


@event_type("door.access_granted")
class DoorAccessGranted(Payload):
    """A door, locker or key-cabinet slot was unlocked for a person by the local policy."""

    door: Id
    person: Id
    card_masked: Masked
    rule: str = Field(max_length=100)


@event_type("door.access_denied")
class DoorAccessDenied(Payload):
    """A request to open a door was refused, with the reason."""

    door: Id
    reason: Reason
    person: Id | None = None
    card_masked: Masked


@event_type("door.opened")
class DoorOpened(Payload):
    """The door sensor reports the door open."""

    door: Id
    forced: bool = False


@event_type("door.closed")
class DoorClosed(Payload):
    """The door sensor reports the door closed (and the lock re-engaged)."""

    door: Id
    open_seconds: int = Field(ge=0)


class _LoginFields(Payload):
    """Optional fields shared by the login decision events (agents.login)."""

    card: Id | None = None
    card_masked: Masked | None = None
    # A UID-only card (no challenge–response) was accepted or presented: every such event says so.
    weak: bool = False
    service: str | None = Field(default=None, max_length=64, description="the PAM service (login, gdm-password…)")
    fingerprint_attempts: int | None = Field(default=None, ge=0, le=100)


@event_type("login.granted")
class LoginGranted(_LoginFields):
    """A terminal login was allowed."""

    terminal: Id
    person: Id
    user: str = Field(max_length=64)
    methods: list[Literal["card", "fingerprint", "password"]] = Field(max_length=3)


@event_type("login.denied")
class LoginDenied(_LoginFields):
    """A terminal login was refused, with the precise reason."""

    terminal: Id
    user: str = Field(max_length=64)
    reason: Reason
    person: Id | None = None
    detail: str = Field(default="", max_length=300)


@event_type("login.notice_shown")
class LoginNoticeShown(Payload):
    """The security notice of the day was shown when a session opened (seed 002 好事例7)."""

    terminal: Id
    user: str = Field(max_length=64)
    day: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", description="the JST date the notice belongs to")
    notice_index: int = Field(ge=0)
    service: str | None = Field(default=None, max_length=64)


@event_type("session.locked")
class SessionLocked(Payload):
    """A terminal session was locked (card removed, idle, or by command)."""

    terminal: Id
    user: str = Field(max_length=64)
    cause: Reason


@event_type("session.unlocked")
class SessionUnlocked(Payload):
    """The card came back before the session was ended; the desktop still asks for the unlock."""

    terminal: Id
    user: str = Field(max_length=64)
    cause: Reason


@event_type("session.ended")
class SessionEnded(Payload):
    """A locked terminal session was ended (the card stayed away too long, or by command)."""

    terminal: Id
    user: str = Field(max_length=64)
    cause: Reason


# drivers.usb's device hash is base64 SHA-256 (44 characters); the older hex form is still accepted.
DeviceHash = Annotated[str, Field(pattern=r"^(?:[0-9a-f]{32,64}|[A-Za-z0-9+/]{43}=)$")]
VendorProduct = Annotated[str, Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")]
UsbSysName = Annotated[str, Field(pattern=r"^(?:usb[0-9]{1,3}|[0-9]{1,3}-[0-9]{1,3}(?:\.[0-9]{1,3}){0,6})$")]
BlockDeviceName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,31}$")]
# The serial itself never travels: the SHA-256 (hex) is what the media register keys on.
SerialSha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
UsbTrigger = Literal["insert", "start", "policy", "session", "clock", "write_watch", "block_device"]


class _UsbDeviceFields(Payload):
    """Optional fields shared by the USB decision events."""

    sys_name: UsbSysName | None = None
    serial_masked: Masked | None = None
    serial_sha256: SerialSha256 | None = None
    medium: Id | None = None
    loan: Id | None = None
    person: Id | None = None
    trigger: UsbTrigger | None = None


@event_type("usb.inserted")
class UsbInserted(_UsbDeviceFields):
    """A USB device appeared (plugged in, or present when the guard started); its decision follows."""

    terminal: Id
    vendor_product: VendorProduct
    device_hash: DeviceHash
    product: str | None = Field(default=None, max_length=100)
    interfaces: list[Annotated[str, Field(pattern=r"^[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}$")]] = Field(
        default_factory=list, max_length=32
    )


@event_type("usb.blocked")
class UsbBlocked(_UsbDeviceFields):
    """A USB device was kept (or made) unauthorised; reason is a loan code or the rule's reason."""

    terminal: Id
    vendor_product: VendorProduct
    device_hash: DeviceHash
    reason: Reason
    rule: str | None = Field(default=None, max_length=200)


@event_type("usb.allowed")
class UsbAllowed(_UsbDeviceFields):
    """A USB device was authorised, by a rule or by an active media loan."""

    terminal: Id
    vendor_product: VendorProduct
    device_hash: DeviceHash
    rule: str = Field(max_length=200)
    read_only: bool | None = None


@event_type("usb.rejected")
class UsbRejected(_UsbDeviceFields):
    """A USB device was rejected (e.g. BadUSB): deauthorised and not re-judged until it is plugged again."""

    terminal: Id
    vendor_product: VendorProduct
    device_hash: DeviceHash
    reason: Reason
    rule: str | None = Field(default=None, max_length=200)


@event_type("usb.unreadable")
class UsbUnreadable(Payload):
    """A USB device whose descriptors could not be read was kept unauthorised."""

    terminal: Id
    sys_name: UsbSysName
    reason: Reason
    trigger: UsbTrigger | None = None


@event_type("usb.removed")
class UsbRemoved(_UsbDeviceFields):
    """A USB device was unplugged (fields known from its insertion are repeated)."""

    terminal: Id
    vendor_product: VendorProduct | None = None
    device_hash: DeviceHash | None = None
    was: Literal["allowed", "blocked", "rejected", "unreadable", "unknown"] = "unknown"


@event_type("usb.readonly_applied")
class UsbReadOnlyApplied(_UsbDeviceFields):
    """A lent medium's block device was set read-only (BLKROSET) after the device was authorised."""

    terminal: Id
    vendor_product: VendorProduct
    device_hash: DeviceHash
    block_device: BlockDeviceName


@event_type("usb.write_attempt")
class UsbWriteAttempt(_UsbDeviceFields):
    """A read-only medium lost its protection: sectors were written or its read-only flag was cleared."""

    terminal: Id
    vendor_product: VendorProduct
    device_hash: DeviceHash
    block_device: BlockDeviceName
    detected_by: Literal["sectors_written", "ro_cleared"]
    sectors_written: int = Field(default=0, ge=0)


@event_type("test.synthetic")
class Synthetic(Payload):
    """Load and fault-test traffic; carries a counter and optional filler (never personal data)."""

    n: int = Field(ge=0)
    note: str = Field(default="", max_length=4096)
