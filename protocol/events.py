"""The event envelope (agent → controller) and the registry of event types with their payload schemas.

Wire form (one MQTT message per event)::

    {"event": {"v": 1, "agent": "term-001", "seq": 42, "id": "<uuid4 hex>", "type": "door.opened",
               "at": "2026-11-23T09:00:00.000000Z", "clock": {"synced": true, "offset_ms": -3},
               "payload": {...}},
     "sig": "<Ed25519 over 'sekisho/v1/event\\n' + canonical JSON of the event object>"}
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sekisho.protocol import PROTOCOL_VERSION, errors, mynumber, signing, timefmt, topics
from sekisho.protocol.canonical import canonical_bytes, canonical_bytes_parsed, loads_strict

MAX_EVENT_BYTES = 64 * 1024


class Payload(BaseModel):
    """Base of every event payload schema: strict, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


P = TypeVar("P", bound=type[Payload])
EVENT_TYPES: dict[str, type[Payload]] = {}


def event_type(name: str) -> Callable[[P], P]:
    """Register a payload schema under an event type name (a class decorator)."""

    def register(cls: P) -> P:
        if name in EVENT_TYPES and EVENT_TYPES[name] is not cls:
            raise ValueError(f"event type {name!r} registered twice")
        EVENT_TYPES[name] = cls
        return cls

    return register


class ClockState(BaseModel):
    """How far the agent trusts its own clock when it stamped the event."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    synced: bool
    offset_ms: int | None = Field(default=None, description="controller time minus agent time")


class EventHeader(BaseModel):
    """The envelope fields around a payload; validated before the payload schema."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    v: int
    agent: str = Field(pattern=topics.AGENT_ID.pattern)
    seq: int = Field(ge=1, lt=2**63)
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    type: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$", max_length=64)
    at: str
    clock: ClockState
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DecodedEvent:
    """An event parsed and schema-checked but not yet signature-verified."""

    agent: str
    seq: int
    id: str
    type: str
    occurred_at: datetime
    clock_synced: bool
    clock_offset_ms: int | None
    payload: dict[str, Any]
    body: dict[str, Any]
    signature: str
    raw: bytes
    canonical_body: bytes

    def verify(self, key: Ed25519PublicKey | signing.Verifier) -> None:
        """Check the agent's signature over the event body."""
        signing.verify_canonical(key, "event", self.canonical_body, self.signature)


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "$"
    return f"{where}: {first.get('msg', 'invalid')}"


def decode_event(raw: bytes, *, topic_agent: str | None = None) -> DecodedEvent:
    """Parse and validate one event from the wire; raise Rejected with a reason for anything wrong.

    The My Number guard runs here too, so no caller can forget it.
    """
    doc = loads_strict(raw, max_size=MAX_EVENT_BYTES)
    if not isinstance(doc, dict) or set(doc) != {"event", "sig"} or not isinstance(doc["event"], dict):
        raise errors.Rejected(errors.MALFORMED, 'expected {"event": {...}, "sig": "..."}')
    body = doc["event"]
    if body.get("v") != PROTOCOL_VERSION:
        raise errors.Rejected(errors.UNSUPPORTED_VERSION, f"envelope version {body.get('v')!r}")
    try:
        header = EventHeader.model_validate(body)
    except ValidationError as err:
        raise errors.Rejected(errors.SCHEMA, _first_error(err)) from err
    if topic_agent is not None and topic_agent != header.agent:
        raise errors.Rejected(errors.TOPIC_MISMATCH, f"event of {header.agent!r} on topic of {topic_agent!r}")
    schema = EVENT_TYPES.get(header.type)
    if schema is None:
        raise errors.Rejected(errors.UNKNOWN_TYPE, f"event type {header.type!r}")
    try:
        schema.model_validate(header.payload)
    except ValidationError as err:
        raise errors.Rejected(errors.SCHEMA, f"payload of {header.type}: {_first_error(err)}") from err
    if not isinstance(doc["sig"], str):
        raise errors.Rejected(errors.MALFORMED, "sig is not a string")
    # loads_strict refused floats, duplicate keys and lone surrogates, so the parsed body re-serialises to
    # exactly what the agent signed. The wire form must be that canonical form too: then the raw bytes the
    # store keeps are exactly the signed content, and no reader can find anything else in them.
    canonical_body = canonical_bytes_parsed(body)
    # Every field is scanned, the header (ids, clock.offset_ms) and the signature too: whatever the agent
    # sent is what the store keeps. The cheap gate over the canonical text skips the per-field walk for
    # the usual event, whose only digit runs are its timestamp and ids.
    found = None
    signature = doc["sig"]
    if mynumber.may_contain_my_number(canonical_body.decode()) or mynumber.may_contain_my_number(signature):
        found = next(mynumber.find_my_numbers({**body, "sig": signature}), None)
    if found is not None:
        raise errors.Rejected(errors.MY_NUMBER, f"field {found} looks like a My Number")
    occurred_at = timefmt.parse(header.at, "at")
    # The document's canonical form is its two keys in order around the canonical body: built from the body
    # already serialised above instead of serialising the whole document again.
    if b'{"event":' + canonical_body + b',"sig":' + canonical_bytes_parsed(signature) + b"}" != raw:
        raise errors.Rejected(errors.MALFORMED, "event is not in canonical form (sorted keys, no whitespace)")
    return DecodedEvent(
        agent=header.agent,
        seq=header.seq,
        id=header.id,
        type=header.type,
        occurred_at=occurred_at,
        clock_synced=header.clock.synced,
        clock_offset_ms=header.clock.offset_ms,
        payload=header.payload,
        body=body,
        signature=doc["sig"],
        raw=raw,
        canonical_body=canonical_body,
    )


def build_event(
    key: Ed25519PrivateKey,
    *,
    agent: str,
    seq: int,
    type: str,
    payload: dict[str, Any],
    at: datetime | None = None,
    clock_synced: bool = False,
    clock_offset_ms: int | None = None,
    event_id: str | None = None,
) -> bytes:
    """Validate, sign and serialise one event; raise Rejected if the agent would emit something invalid."""
    schema = EVENT_TYPES.get(type)
    if schema is None:
        raise errors.Rejected(errors.UNKNOWN_TYPE, f"event type {type!r}")
    try:
        checked = schema.model_validate(payload).model_dump(mode="json")
        # What goes on the wire must pass the controller's strict check, so check the dumped form too.
        schema.model_validate(checked)
    except ValidationError as err:
        raise errors.Rejected(errors.SCHEMA, f"payload of {type}: {_first_error(err)}") from err
    body = {
        "v": PROTOCOL_VERSION,
        "agent": topics.check_agent_id(agent),
        "seq": seq,
        "id": event_id or uuid.uuid4().hex,
        "type": type,
        "at": timefmt.fmt(at or timefmt.now()),
        "clock": {"synced": clock_synced, "offset_ms": clock_offset_ms},
        "payload": checked,
    }
    found = next(mynumber.find_my_numbers(body), None)
    if found is not None:
        # Defence in depth: the agent refuses too, so such a value never even reaches the disk.
        raise errors.Rejected(errors.MY_NUMBER, f"field {found} looks like a My Number")
    return canonical_bytes({"event": body, "sig": signing.sign(key, "event", body)})


# Importing the catalogue registers the built-in event types.
from sekisho.protocol import catalogue as _catalogue  # noqa: E402,F401
