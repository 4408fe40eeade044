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


@event_type("login.granted")
class LoginGranted(Payload):
    """A terminal login was allowed."""

    terminal: Id
    person: Id
    user: str = Field(max_length=64)
    methods: list[Literal["card", "fingerprint", "password"]] = Field(max_length=3)


@event_type("login.denied")
class LoginDenied(Payload):
    """A terminal login was refused, with the precise reason."""

    terminal: Id
    user: str = Field(max_length=64)
    reason: Reason


@event_type("session.locked")
class SessionLocked(Payload):
    """A terminal session was locked (card removed, idle, or by command)."""

    terminal: Id
    user: str = Field(max_length=64)
    cause: Reason


@event_type("usb.blocked")
class UsbBlocked(Payload):
    """A USB device was kept unauthorised."""

    terminal: Id
    vendor_product: str = Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")
    device_hash: CardHash
    reason: Reason


@event_type("usb.allowed")
class UsbAllowed(Payload):
    """A USB device was authorised."""

    terminal: Id
    vendor_product: str = Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")
    device_hash: CardHash
    rule: str = Field(max_length=200)


@event_type("test.synthetic")
class Synthetic(Payload):
    """Load and fault-test traffic; carries a counter and optional filler (never personal data)."""

    n: int = Field(ge=0)
    note: str = Field(default="", max_length=4096)
