"""The per-agent hash chain over stored events: how a record is hashed and how a chain is re-checked.

Each agent's events form a chain in the order they were stored (chain_index 1, 2, 3...), not in
sequence order, because events may arrive late. A record's hash covers the previous hash and the
canonical form of the record, so editing, deleting, inserting or reordering rows is detectable.
The hash carries no secret: whoever can rewrite the whole table can also recompute the chain, which
is why verification can also re-check the agents' own signatures on the stored wire bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, select

from sekisho.controller.store.models import ZERO_HASH, Event, Stream
from sekisho.protocol import errors, events, signing, timefmt

# Rows fetched per round trip while walking a chain; the walk never holds more than this.
_WALK_BATCH = 1000


# Produces exactly protocol.canonical.canonical_bytes of a record (sorted keys, compact separators,
# UTF-8; tests/test_store.py pins the equality) minus its float scan: a record holds only str and int.
# Keeping the encoder here also freezes the chain format even if the wire's canonical form ever changes.
_RECORD_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_bytes(
    *,
    agent: str,
    seq: int,
    chain_index: int,
    event_id: str,
    type: str,
    occurred_at: datetime,
    received_at: datetime,
    raw: str,
) -> bytes:
    """Return the canonical bytes of one stored event record, the part of it the chain hash covers."""
    record = {
        "agent": agent,
        "seq": seq,
        "chain_index": chain_index,
        "event_id": event_id,
        "type": type,
        "occurred_at": timefmt.fmt(occurred_at),
        "received_at": timefmt.fmt(received_at),
        "raw": raw,
    }
    return _RECORD_ENCODER.encode(record).encode()


def record_hash(
    prev_hash: str,
    *,
    agent: str,
    seq: int,
    chain_index: int,
    event_id: str,
    type: str,
    occurred_at: datetime,
    received_at: datetime,
    raw: str,
) -> str:
    """Return the chain hash of one stored event record given the hash of the record before it."""
    record = record_bytes(
        agent=agent,
        seq=seq,
        chain_index=chain_index,
        event_id=event_id,
        type=type,
        occurred_at=occurred_at,
        received_at=received_at,
        raw=raw,
    )
    return hashlib.sha256(prev_hash.encode() + b"\n" + record).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first broken record of one agent's chain, and what is wrong with it."""

    agent_id: str
    chain_index: int | None
    seq: int | None
    event_id: str | None
    row_id: int | None
    problem: str


def _json_text(value: Any) -> str:
    # Compare JSON values by their text: in Python 1 == True == 1.0, in a signed payload they differ.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _column_mismatch(row: Any, signed: events.DecodedEvent) -> str | None:
    pairs: tuple[tuple[str, Any, Any], ...] = (
        ("agent_id", row.agent_id, signed.agent),
        ("seq", row.seq, signed.seq),
        ("event_id", row.event_id, signed.id),
        ("type", row.type, signed.type),
        ("occurred_at", row.occurred_at, signed.occurred_at),
        ("clock_synced", row.clock_synced, signed.clock_synced),
        ("clock_offset_ms", row.clock_offset_ms, signed.clock_offset_ms),
    )
    for name, stored, original in pairs:
        if stored != original or type(stored) is not type(original):
            return name
    if _json_text(row.payload) != _json_text(signed.payload):
        return "payload"
    return None


def _check_record(row: Any, expected_index: int, prev_hash: str, stream: Any | None) -> str | None:
    if row.chain_index > expected_index:
        return f"missing record(s) before chain index {row.chain_index}"
    if row.chain_index < expected_index or row.prev_hash != prev_hash:
        return "record inserted/reordered"
    recomputed = record_hash(
        prev_hash,
        agent=row.agent_id,
        seq=row.seq,
        chain_index=row.chain_index,
        event_id=row.event_id,
        type=row.type,
        occurred_at=row.occurred_at,
        received_at=row.received_at,
        raw=row.raw,
    )
    if recomputed != row.hash:
        return "hash mismatch: record edited"
    if stream is None:
        return "stream row missing"
    if row.chain_index > stream.chain_length:
        return "record beyond the stream head: record inserted"
    return None


def _check_signed(row: Any, key: Ed25519PublicKey | None) -> str | None:
    try:
        signed = events.decode_event(row.raw.encode())
    except errors.Rejected as err:
        return f"stored raw does not decode: {err.reason}"
    mismatch = _column_mismatch(row, signed)
    if mismatch is not None:
        return f"stored column {mismatch} differs from signed event"
    if key is not None:
        try:
            signed.verify(key)
        except errors.Rejected:
            return "signature invalid"
    return None


def _load_key(pem: str | None) -> Ed25519PublicKey | None:
    if pem is None:
        return None
    try:
        return signing.load_public_key_pem(pem.encode())
    except ValueError:
        return None


def verify_stream(conn: Connection, agent_id: str, keys: dict[str, str] | None = None) -> ChainProblem | None:
    """Walk one agent's chain in chain_index order and return its first problem, or None if intact.

    Run it inside one transaction with a stable snapshot, so that concurrent appends are either
    wholly visible (stream row and records) or not at all.
    """
    key = _load_key(keys.get(agent_id)) if keys is not None else None
    stream = conn.execute(select(Stream).where(Stream.agent_id == agent_id)).first()
    query = select(*Event.__table__.columns).where(Event.agent_id == agent_id).order_by(Event.chain_index)
    expected_index = 1
    prev_hash = ZERO_HASH
    # yield_per streams the rows (a server-side cursor on PostgreSQL) instead of loading the chain.
    result = conn.execute(query, execution_options={"yield_per": _WALK_BATCH})
    try:
        for row in result:
            problem = _check_record(row, expected_index, prev_hash, stream) or _check_signed(row, key)
            if problem is not None:
                return ChainProblem(agent_id, row.chain_index, row.seq, row.event_id, row.id, problem)
            expected_index += 1
            prev_hash = row.hash
    finally:
        result.close()
    last_index = expected_index - 1
    if stream is None:
        if last_index == 0:
            return None
        return ChainProblem(agent_id, None, None, None, None, "stream row missing")
    if last_index < stream.chain_length:
        return ChainProblem(
            agent_id, last_index + 1, None, None, None, "stream head does not match: last record(s) deleted"
        )
    if prev_hash != stream.head_hash:
        return ChainProblem(agent_id, last_index, None, None, None, "stream head does not match: last record replaced")
    if keys is not None and key is None and last_index > 0:
        return ChainProblem(agent_id, None, None, None, None, "no usable public key: signatures not checked")
    return None
