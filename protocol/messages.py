"""Signed messages other than events: acknowledgements, heartbeats, commands and policy bundles.

Every message on the wire is ``{KIND: body, "sig": signature}`` where the signature covers the kind
and the canonical JSON of the body (see ``protocol.signing``).
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sekisho.protocol import PROTOCOL_VERSION, errors, mynumber, signing, timefmt, topics
from sekisho.protocol.canonical import canonical_bytes, loads_strict

MAX_CONTROL_BYTES = 1024 * 1024
# A heartbeat with the largest fingerprint report is about 25 KiB; anything much bigger is not one.
MAX_HEARTBEAT_BYTES = 64 * 1024
# A command lives minutes at most: long enough to cross a slow link, short enough that a captured
# one is useless soon after; the agent remembers nonces for this long.
MAX_COMMAND_LIFETIME = timedelta(minutes=10)
# Clocks on terminals drift; accept a little skew on "issued in the future" checks.
CLOCK_SKEW = timedelta(seconds=120)


M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _dump(kind: str, key: Ed25519PrivateKey, body: dict[str, Any]) -> bytes:
    # The body is serialised once: its canonical bytes are both what is signed and what is sent. The
    # envelope {kind: body, "sig": …} is then put together in canonical key order (kinds and "sig" are plain
    # ASCII names, so no escaping applies), byte for byte what canonical_bytes of the whole would give.
    body_bytes = canonical_bytes(body)
    sig = signing.sign_canonical(key, kind, body_bytes)
    parts = sorted([(kind, body_bytes), ("sig", json.dumps(sig).encode())])
    return b"{" + b",".join(b'"' + name.encode() + b'":' + value for name, value in parts) + b"}"


def _open(kind: str, raw: bytes, key: Ed25519PublicKey | None, max_size: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    doc = loads_strict(raw, max_size=max_size)
    if not isinstance(doc, dict) or set(doc) != {kind, "sig"} or not isinstance(doc[kind], dict):
        raise errors.Rejected(errors.MALFORMED, f'expected {{"{kind}": {{...}}, "sig": "..."}}')
    body: dict[str, Any] = doc[kind]
    if body.get("v") != PROTOCOL_VERSION:
        raise errors.Rejected(errors.UNSUPPORTED_VERSION, f"{kind} version {body.get('v')!r}")
    if not isinstance(doc["sig"], str):
        raise errors.Rejected(errors.MALFORMED, "sig is not a string")
    if key is not None:
        signing.verify(key, kind, body, doc["sig"])
    return body


def _validate(model: type[M], body: dict[str, Any], kind: str) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "$"
        raise errors.Rejected(errors.SCHEMA, f"{kind} {where}: {first.get('msg')}") from err


# --- acknowledgements (controller → agent) ---------------------------------------------------------


_HASH = r"^[0-9a-f]{64}$"
# The receipts an agent keeps: the heartbeat field asking for them, and the format of the file an agent keeps
# them in (its state dir's RECEIPTS_FILE: {"format": 1, "agent": id, "receipts": [signed ack text, ...]}),
# which `sekisho records verify --receipts` reads.
RECEIPTS_FORMAT = 1
RECEIPTS_FILE = "receipts.json"


class Receipt(_Body):
    """The agent's stream head after a stored batch, and the signed checkpoint that recorded it.

    Carried in the (controller-signed) ack to agents that asked for receipts in their heartbeat. The agent
    keeps the signed ack: whoever holds it can later prove that the controller's database had this chain
    head at this index, and this checkpoint at this number, whatever the database says afterwards.
    """

    length: int = Field(ge=1)
    head: str = Field(pattern=_HASH)
    checkpoint: int = Field(ge=1)
    checkpoint_hash: str = Field(pattern=_HASH)


class Ack(_Body):
    """The controller has durably stored (or dead-lettered) these sequence numbers of one agent.

    receipt was added later (issue 14): the controller sends it only to agents whose heartbeat says
    ``receipts`` (an older agent's model refuses unknown fields, and a refused ack would delete nothing).
    """

    v: int
    agent: str = Field(pattern=topics.AGENT_ID.pattern)
    ranges: list[tuple[int, int]] = Field(max_length=10_000)
    controller_time: str
    receipt: Receipt | None = None


def seq_ranges(seqs: list[int]) -> list[tuple[int, int]]:
    """Compress sequence numbers into sorted inclusive ranges."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def build_ack(
    key: Ed25519PrivateKey,
    agent: str,
    seqs: list[int],
    at: datetime | None = None,
    receipt: Receipt | None = None,
) -> bytes:
    """Sign an acknowledgement for stored sequence numbers of one agent (with its stream head's receipt if given)."""
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "agent": agent,
        "ranges": [list(r) for r in seq_ranges(seqs)],
        "controller_time": timefmt.fmt(at or timefmt.now()),
    }
    if receipt is not None:
        # Only when there is one: an ack without it is byte for byte what older agents accept.
        body["receipt"] = receipt.model_dump()
    return _dump("ack", key, body)


def open_signed_ack(raw: bytes, key: Ed25519PublicKey) -> Ack:
    """Verify and parse an acknowledgement whoever it is addressed to (an auditor reading agents' receipts)."""
    body = _open("ack", raw, key)
    body = {**body, "ranges": [tuple(r) if isinstance(r, list) else r for r in body.get("ranges", [])]}
    if isinstance(body.get("receipt"), dict):
        # Strict models take a nested model only as an instance: validate the receipt on its own first.
        body["receipt"] = _validate(Receipt, body["receipt"], "ack receipt")
    ack = _validate(Ack, body, "ack")
    timefmt.parse(ack.controller_time, "controller_time")
    return ack


def open_ack(raw: bytes, key: Ed25519PublicKey, agent: str) -> Ack:
    """Verify and parse an acknowledgement addressed to this agent."""
    ack = open_signed_ack(raw, key)
    if ack.agent != agent:
        raise errors.Rejected(errors.WRONG_AGENT, f"ack for {ack.agent!r}")
    return ack


# --- heartbeats (agent → controller) ---------------------------------------------------------------


# A short machine-readable code (no free text, so no secret or personal data can ride along).
ERROR_CODE = r"^[a-z][a-z0-9_.:-]{0,63}$"
# Person ids as the site policy spells them (protocol.policy.Ident).
_PERSON_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Bounds that keep a heartbeat small whatever the site: a terminal reports at most this many people.
MAX_FINGERPRINT_PEOPLE = 256
MAX_FINGERS = 10


class LastError(_Body):
    """The agent's most recent error: a short code and when it happened, never a message."""

    code: str = Field(pattern=ERROR_CODE)
    at: str
    count: int = Field(default=1, ge=1)


class FingerprintStatus(_Body):
    """Enrolled finger counts per person on one terminal, as fprintd reports them (never a template)."""

    checked_at: str
    # None when the sensor service answered; else a code such as "no_sensor" (counts are then empty).
    error: str | None = Field(default=None, pattern=ERROR_CODE)
    enrolled: dict[Annotated[str, Field(pattern=_PERSON_ID)], Annotated[int, Field(ge=0, le=MAX_FINGERS)]] = Field(
        default_factory=dict, max_length=MAX_FINGERPRINT_PEOPLE
    )
    # More people than MAX_FINGERPRINT_PEOPLE: the rest were not reported.
    truncated: bool = False


class Heartbeat(_Body):
    """Liveness and health of an agent; not stored in the event chain.

    The fields after policy_state were added later (issue 11) and are optional, so heartbeats of older
    agents are still accepted; a newer agent leaves out those it has nothing for.
    """

    v: int
    agent: str = Field(pattern=topics.AGENT_ID.pattern)
    at: str
    version: str = Field(max_length=32)
    boot_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    outbox_depth: int = Field(ge=0)
    oldest_unacked_age_s: int | None = Field(default=None, ge=0)
    next_seq: int = Field(ge=1)
    clock_offset_ms: int | None = None
    policy_version: int | None = None
    policy_state: str = Field(max_length=16)
    kind: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_-]{0,15}$")
    interval_s: int | None = Field(default=None, ge=1, le=3600)
    cert_not_after: str | None = Field(default=None, max_length=40)
    last_error: LastError | None = None
    fingerprints: FingerprintStatus | None = None
    # The receipt format the agent keeps (1): the controller then puts a receipt in its acks (issue 14).
    receipts: int | None = Field(default=None, ge=1, le=1)


# Optional fields a heartbeat carries only when set (an older controller refuses keys it does not know).
_LATER_FIELDS = ("kind", "interval_s", "cert_not_after", "last_error", "fingerprints", "receipts")


def build_heartbeat(key: Ed25519PrivateKey, **fields: Any) -> bytes:
    """Sign a heartbeat (fields as in Heartbeat, without v)."""
    body = Heartbeat.model_validate({"v": PROTOCOL_VERSION, **fields}).model_dump()
    for name in _LATER_FIELDS:
        if body[name] is None:
            del body[name]
    return _dump("heartbeat", key, body)


def open_heartbeat(raw: bytes, key: Ed25519PublicKey, topic_agent: str) -> Heartbeat:
    """Verify and parse a heartbeat received on an agent's topic; one carrying a My Number is refused."""
    body = _open("heartbeat", raw, key, MAX_HEARTBEAT_BYTES)
    # Every field, not only the free-text ones: the controller keeps the whole heartbeat (agents table).
    found = next(mynumber.find_my_numbers(body, "$.heartbeat"), None)
    if found is not None:
        raise errors.Rejected(errors.MY_NUMBER, f"heartbeat field {found} looks like a My Number")
    hb = _validate(Heartbeat, body, "heartbeat")
    if hb.agent != topic_agent:
        raise errors.Rejected(errors.TOPIC_MISMATCH, f"heartbeat of {hb.agent!r} on topic of {topic_agent!r}")
    for name, text in (
        ("cert_not_after", hb.cert_not_after),
        ("last_error.at", hb.last_error.at if hb.last_error else None),
        ("fingerprints.checked_at", hb.fingerprints.checked_at if hb.fingerprints else None),
    ):
        if text is not None:
            timefmt.parse(text, name)
    return hb


def peek_agent(raw: bytes, kind: str) -> str | None:
    """Return the claimed agent id of an unverified message, to pick the key to verify it with."""
    try:
        doc = loads_strict(raw, max_size=MAX_CONTROL_BYTES)
        agent = doc[kind]["agent"]
        return agent if isinstance(agent, str) else None
    except (errors.Rejected, KeyError, TypeError):
        return None


# --- commands (controller → agent) -----------------------------------------------------------------


class Command(_Body):
    """A signed, expiring, single-use instruction to one agent (remote unlock, lock-down, ...)."""

    v: int
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    agent: str = Field(pattern=topics.AGENT_ID.pattern)
    name: str = Field(pattern=r"^[a-z][a-z0-9_.]{0,63}$")
    args: dict[str, Any]
    issued_at: str
    expires_at: str
    nonce: str = Field(pattern=r"^[A-Za-z0-9_-]{22,64}$")


@dataclass(frozen=True, slots=True)
class VerifiedCommand:
    """A command whose signature, addressee and validity window have been checked."""

    command: Command
    issued_at: datetime
    expires_at: datetime


def build_command(
    key: Ed25519PrivateKey,
    *,
    agent: str,
    name: str,
    args: dict[str, Any] | None = None,
    lifetime: timedelta = timedelta(seconds=60),
    issued_at: datetime | None = None,
) -> tuple[str, bytes]:
    """Sign a command for one agent; return (command id, wire bytes)."""
    if lifetime > MAX_COMMAND_LIFETIME or lifetime <= timedelta(0):
        raise ValueError(f"command lifetime must be in (0, {MAX_COMMAND_LIFETIME}]")
    # Commands are recorded (issued_commands) and logged by the agent: no My Number in them either.
    mynumber.refuse_my_numbers(args or {}, "$.args", what=f"command {name}")
    issued = issued_at or timefmt.now()
    command_id = uuid.uuid4().hex
    body = {
        "v": PROTOCOL_VERSION,
        "id": command_id,
        "agent": topics.check_agent_id(agent),
        "name": name,
        "args": args or {},
        "issued_at": timefmt.fmt(issued),
        "expires_at": timefmt.fmt(issued + lifetime),
        "nonce": signing.b64(secrets.token_bytes(18)),
    }
    return command_id, _dump("command", key, body)


def open_command(raw: bytes, key: Ed25519PublicKey, agent: str, now: datetime | None = None) -> VerifiedCommand:
    """Verify a command's signature, addressee and time window. Replay checks are the caller's (nonces)."""
    body = _open("command", raw, key)
    cmd = _validate(Command, body, "command")
    if cmd.agent != agent:
        raise errors.Rejected(errors.WRONG_AGENT, f"command for {cmd.agent!r}")
    issued = timefmt.parse(cmd.issued_at, "issued_at")
    expires = timefmt.parse(cmd.expires_at, "expires_at")
    moment = now or timefmt.now()
    if expires - issued > MAX_COMMAND_LIFETIME or expires <= issued:
        raise errors.Rejected(errors.SCHEMA, "command validity window out of bounds")
    if moment > expires:
        raise errors.Rejected(errors.EXPIRED, f"command expired at {cmd.expires_at}")
    if issued - CLOCK_SKEW > moment:
        raise errors.Rejected(errors.NOT_YET_VALID, f"command issued in the future ({cmd.issued_at})")
    return VerifiedCommand(cmd, issued, expires)


# --- policy bundles (controller → agent, retained) -------------------------------------------------


class Bundle(_Body):
    """A signed per-agent policy: the site policy version and the part of it this agent enforces."""

    v: int
    agent: str = Field(pattern=topics.AGENT_ID.pattern)
    version: int = Field(ge=1)
    issued_at: str
    expires_at: str
    policy: dict[str, Any]


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle whose signature and addressee have been checked (expiry is judged by the holder)."""

    bundle: Bundle
    issued_at: datetime
    expires_at: datetime
    raw: bytes

    def expired(self, now: datetime | None = None) -> bool:
        """Tell whether the bundle is past its expiry."""
        return (now or timefmt.now()) > self.expires_at


def build_bundle(
    key: Ed25519PrivateKey,
    *,
    agent: str,
    version: int,
    policy: dict[str, Any],
    lifetime: timedelta,
    issued_at: datetime | None = None,
) -> bytes:
    """Sign a policy bundle for one agent."""
    issued = issued_at or timefmt.now()
    body = {
        "v": PROTOCOL_VERSION,
        "agent": topics.check_agent_id(agent),
        "version": version,
        "issued_at": timefmt.fmt(issued),
        "expires_at": timefmt.fmt(issued + lifetime),
        "policy": policy,
    }
    return _dump("bundle", key, body)


def open_bundle(raw: bytes, key: Ed25519PublicKey, agent: str) -> VerifiedBundle:
    """Verify a bundle's signature and addressee; the caller decides about expiry and rollback."""
    body = _open("bundle", raw, key)
    bundle = _validate(Bundle, body, "bundle")
    if bundle.agent != agent:
        raise errors.Rejected(errors.WRONG_AGENT, f"bundle for {bundle.agent!r}")
    issued = timefmt.parse(bundle.issued_at, "issued_at")
    expires = timefmt.parse(bundle.expires_at, "expires_at")
    if expires <= issued:
        raise errors.Rejected(errors.SCHEMA, "bundle expires before it was issued")
    return VerifiedBundle(bundle, issued, expires, raw)
