"""Event types known to this protocol version and their payload schemas.

Capabilities add their own types here (login, USB, doors). A type's schema only ever gains optional
fields within one protocol version; anything else is a new type name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from sekisho.protocol.events import Payload, event_type

# Annotated constraints (not shared Field objects) so each field can still have its own default.
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
# A card identifier is only ever sent keyed-hashed (hex) and masked for display.
CardHash = Annotated[str, Field(pattern=r"^[0-9a-f]{32,64}$")]
Masked = Annotated[str, Field(max_length=32)]
# A machine reason code (snake_case). The vocabularies live with the deciders and their docs: login denials in
# agents/login/decision.py LoginReason (docs/login.md), door denials in agents/doors/checks.py DenyReason
# (docs/doors.md). Both have ``card_timeout``: a smart card that stopped answering before its check was over.
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
    door: Id | None = None
    # A UID-only or reader-reported number (no challenge-response): anyone who copies it can replay it.
    weak: bool = False


Direction = Literal["entry", "exit", "both"]
DoorCause = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")]


class _DoorAccessFields(Payload):
    """Optional fields shared by door grants and denials (agents.doors)."""

    reader: Id | None = None
    direction: Direction | None = None
    area: Id | None = None
    card_hash: CardHash | None = None
    weak: bool = False
    pin_checked: bool = False
    # Two-person rule: the other card holder; visitor rule: the escort (both appear in the event).
    second_person: Id | None = None
    escort: Id | None = None
    visitor: bool = False
    slot: int | None = Field(default=None, ge=0, le=255)
    passback: bool = Field(default=False, description="granted despite an anti-passback violation (soft mode)")
    detail: str = Field(default="", max_length=300)


@event_type("door.access_granted")
class DoorAccessGranted(_DoorAccessFields):
    """A door, locker or key cabinet was unlocked for a person by the local policy."""

    door: Id
    person: Id
    card_masked: Masked
    rule: str = Field(max_length=100)


@event_type("door.access_denied")
class DoorAccessDenied(_DoorAccessFields):
    """A request to open a door was refused, with the reason (also: first card of a pair that timed out)."""

    door: Id
    reason: Reason
    person: Id | None = None
    card_masked: Masked


@event_type("door.access_pending")
class DoorAccessPending(_DoorAccessFields):
    """A valid first step that needs another: a PIN, a second person, or a visitor's escort."""

    door: Id
    person: Id
    card_masked: Masked
    waiting_for: Literal["pin", "second_person", "escort"]
    until_s: int = Field(ge=0, le=600)


@event_type("door.unlocked")
class DoorUnlocked(Payload):
    """The lock was released other than by a card grant: remote command, emergency, or egress."""

    door: Id
    cause: DoorCause
    command_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    requested_by: Id | None = None


@event_type("door.locked")
class DoorLocked(Payload):
    """The lock re-engaged: door closed, grant window passed unopened, lockdown, restart or command."""

    door: Id
    cause: DoorCause


@event_type("door.opened")
class DoorOpened(Payload):
    """The door sensor reports the door open (forced: no grant or unlock preceded it)."""

    door: Id
    forced: bool = False
    person: Id | None = None


@event_type("door.closed")
class DoorClosed(Payload):
    """The door sensor reports the door closed (and the lock re-engaged)."""

    door: Id
    open_seconds: int = Field(ge=0)
    person: Id | None = None


AlarmKind = Literal[
    "held_open",
    "forced_open",
    "tamper",
    "reader_offline",
    "reader_sc_failed",
    "reader_flood",
    "board_offline",
    "relay_fault",
    "key_taken_without_grant",
    "key_wrong_slot",
    "passback",
]


@event_type("door.alarm")
class DoorAlarm(Payload):
    """Something security staff must see: held open, forced, tamper, a device offline, a key misuse."""

    door: Id
    alarm: AlarmKind
    detail: str = Field(default="", max_length=300)
    person: Id | None = None
    slot: int | None = Field(default=None, ge=0, le=255)
    reader: Id | None = None
    # reader_sc_failed: key_mismatch, plaintext_reader or sc_failed (docs/doors.md, "Alarms").
    cause: DoorCause | None = None


@event_type("door.alarm_cleared")
class DoorAlarmCleared(Payload):
    """The condition behind an alarm ended (door closed, device back, tamper restored)."""

    door: Id
    alarm: AlarmKind
    detail: str = Field(default="", max_length=300)
    # The reader an alarm about a reader was about (reader_offline, reader_sc_failed, reader_flood, tamper).
    reader: Id | None = None


# The modes a door command puts a door in (protocol.door_commands).
DoorMode = Literal["normal", "emergency_unlock", "lockdown"]


@event_type("door.mode_changed")
class DoorModeChanged(Payload):
    """A door entered or left emergency unlock or lock-down (signed command from the controller)."""

    door: Id
    mode: DoorMode
    previous: DoorMode
    command_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    group: Id | None = None


@event_type("door.passback_forgiven")
class DoorPassbackForgiven(Payload):
    """Anti-passback state was cleared for a person (or everyone) in an area, by command or timeout."""

    area: Id
    person: Id | None = None
    cause: DoorCause
    command_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")


@event_type("key.taken")
class KeyTaken(Payload):
    """A key left its cabinet slot after a grant: a loan in the key-lending register (鍵貸出管理簿)."""

    door: Id
    slot: int = Field(ge=0, le=255)
    key: Id
    person: Id
    due_at: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(?:Z|[+-][0-9]{2}:[0-9]{2})$")


@event_type("key.returned")
class KeyReturned(Payload):
    """A key came back to a cabinet slot; wrong_slot when the person returning did not hold this slot's key."""

    door: Id
    slot: int = Field(ge=0, le=255)
    key: Id
    person: Id | None = Field(default=None, description="who opened the cabinet to return it, if anyone")
    wrong_slot: bool = False


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


@event_type("session.lock_failed")
class SessionLockFailed(Payload):
    """The lock or end command for a session failed (did not start, exited non-zero, timed out)."""

    terminal: Id
    user: str = Field(max_length=64)
    action: Literal["lock", "end"]
    detail: str = Field(default="", max_length=300)


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
