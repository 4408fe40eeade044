"""The hash chains over stored records: how a record is hashed and how a chain is re-checked.

Each agent's events form a chain in the order they were stored (chain_index 1, 2, 3...), not in
sequence order, because events may arrive late. A record's hash covers the previous hash and the
canonical form of the record, so editing, deleting, inserting or reordering rows is detectable.
The dead letters form one more chain of the same kind. The hash carries no secret: whoever can
rewrite a whole table can also recompute its chain, which is why verification holds each chain's end
against the controller-signed checkpoint log (checkpoints.py) and re-checks the agents' own
signatures on the stored wire bytes against the signed key history.

Record format 1 (every record stored before the checkpoint log existed) leaves ``stored_at`` out;
format 2 (every later record) covers it. Which records are format 1 is fixed by the signed genesis
checkpoint: those up to each stream's length at that time.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from sekisho.controller.store.models import ZERO_HASH, DeadLetter, Event, Stream
from sekisho.protocol import errors, events, signing, timefmt

# Rows fetched per round trip while walking a chain; the walk never holds more than this.
_WALK_BATCH = 1000


# Produces exactly protocol.canonical.canonical_bytes of a record (sorted keys, compact separators,
# UTF-8; tests/test_store.py pins the equality) minus its float scan: a record holds only str and int.
# Keeping the encoder here also freezes the chain format even if the wire's canonical form ever changes.
_RECORD_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# Dead letters hold whatever arrived (cleaned, redacted): escape non-ASCII so any text hashes the same.
_LETTER_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


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
    stored_at: datetime | None = None,
) -> bytes:
    """Return the canonical bytes of one stored event record, the part of it the chain hash covers.

    With stored_at, the record is in format 2 (every record stored since the checkpoint log exists);
    without it, in format 1 (the records sealed by the genesis checkpoint).
    """
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
    if stored_at is not None:
        record["stored_at"] = timefmt.fmt(stored_at)
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
    stored_at: datetime | None = None,
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
        stored_at=stored_at,
    )
    return hashlib.sha256(prev_hash.encode() + b"\n" + record).hexdigest()


def letter_hash(prev_hash: str, letter: Any) -> str:
    """Return the chain hash of one dead letter (a row or a mapping of its columns) after prev_hash.

    It covers every column but the row id and the keyed digest of the bytes that arrived (payload_mac,
    kept apart from the chain); the stored, redacted payload text itself is covered.
    """
    columns = letter if isinstance(letter, dict) else letter._mapping
    get = columns.get
    record = {
        "chain_index": get("chain_index"),
        "received_at": timefmt.fmt(columns["received_at"]),
        "topic": get("topic"),
        "agent_id": get("agent_id"),
        "seq": get("seq"),
        "event_id": get("event_id"),
        "reason": get("reason"),
        "detail": get("detail"),
        "payload": get("payload"),
        "size": get("size"),
    }
    return hashlib.sha256(prev_hash.encode() + b"\n" + _LETTER_ENCODER.encode(record).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first broken record of one chain (or a broken row of another checked table), and what is wrong.

    table is the table the problem was found in: "events" (agent_id names the stream), "dead_letters",
    "checkpoints", "agent_keys", "agents" or "admin_audit" (agent_id then holds the row's actor, event_id its
    action), "record_log" (agent_id holds the tracked table, event_id the row's key) or "receipts".
    """

    agent_id: str | None
    chain_index: int | None
    seq: int | None
    event_id: str | None
    row_id: int | None
    problem: str
    table: str = "events"


@dataclass(frozen=True, slots=True)
class SignedHead:
    """A chain's end as the newest signed checkpoint that names it has it."""

    checkpoint: int
    length: int
    head: str
    max_seq: int = 0
    contiguous_seq: int = 0


@dataclass(frozen=True, slots=True)
class KeySpan:
    """One line of an agent's signed key history: from valid_from on, key signs its events (None: revoked).

    previous_until: on a replace line, events signed with the key it replaced and received before then were
    accepted too (the rotation's grace window for events still in the agent's outbox).
    """

    version: int
    valid_from: datetime
    key: signing.Verifier | None
    previous_until: datetime | None = None


class KeyHistory:
    """The keys an agent's events may be signed with, by the time the controller received them.

    An event is checked against the key valid when it was received. A running ingest worker holds the
    keys it read for up to key_refresh_s, so around a replacement or a revocation the key on either side
    is accepted for ``grace``; an event received later than that after a revocation is a problem. After a
    replacement whose signed line has a grace window (previous_until), the replaced key also counts for
    events received within it: ingest accepted those, marked, from the agent's outbox.
    """

    def __init__(self, spans: Sequence[KeySpan], grace: timedelta) -> None:
        """Use spans in version order."""
        self.spans = list(spans)
        self._starts = [span.valid_from for span in self.spans]
        self.grace = grace

    def keys_at(self, received_at: datetime) -> list[signing.Verifier]:
        """Return the keys an event received at that time may verify with, the one valid then first."""
        if not self.spans:
            return []
        # Before the first line (records older than a key history made at an upgrade): the first key.
        at = max(bisect.bisect_right(self._starts, received_at) - 1, 0)
        found = [self.spans[at].key]
        window = self.spans[at].valid_from + self.grace
        previous_until = self.spans[at].previous_until
        if previous_until is not None:
            window = max(window, previous_until)
        if at > 0 and received_at < window:
            found.append(self.spans[at - 1].key)
        if at + 1 < len(self.spans) and self.spans[at + 1].valid_from - self.grace <= received_at:
            found.append(self.spans[at + 1].key)
        return [key for key in found if key is not None]

    def revoked_at(self, received_at: datetime) -> datetime | None:
        """Return when the agent was revoked if it was at that time, else None."""
        at = bisect.bisect_right(self._starts, received_at) - 1
        if at >= 0 and self.spans[at].key is None:
            return self.spans[at].valid_from
        return None


def _json_text(value: Any) -> str:
    # Compare JSON values by their text: in Python 1 == True == 1.0, in a signed payload they differ.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# The longest person id or login name the protocol allows (catalogue.Id, the login payloads' user).
_SUBJECT_MAX = 64


def _subject(value: object) -> str | None:
    """Return a payload's person or user field as the events column holds it (a non-empty string, else None)."""
    if not isinstance(value, str) or not value or len(value) > _SUBJECT_MAX:
        return None
    return value


def subject_columns(payload: object) -> dict[str, str | None]:
    """Return the events row's person and account columns for a signed event's payload.

    person is the payload's ``person`` field, as the door projection copies it into door_log.person;
    account is its ``user`` field (login and session events name the account, and only login.granted
    and login.denied also name the person). Both are indexed with occurred_at so the registers and
    timelines read one person's events without reading everyone's. Ingest, the migration that filled
    them for older rows, the registers benchmark's bulk loader and the chain walk (which checks the
    columns still match the signed payload) all use this one function.
    """
    fields = payload if isinstance(payload, dict) else {}
    return {"person": _subject(fields.get("person")), "account": _subject(fields.get("user"))}


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
    # The person/account columns are copies of the signed payload for the registers' indexes: edited,
    # they would hide a person's rows from a register whose chains still verify.
    for name, original in subject_columns(signed.payload).items():
        if getattr(row, name, original) != original:
            return name
    return None


def _recomputed(row: Any, prev_hash: str, stored_at: datetime | None) -> str:
    return record_hash(
        prev_hash,
        agent=row.agent_id,
        seq=row.seq,
        chain_index=row.chain_index,
        event_id=row.event_id,
        type=row.type,
        occurred_at=row.occurred_at,
        received_at=row.received_at,
        raw=row.raw,
        stored_at=stored_at,
    )


def _check_record(
    row: Any, expected_index: int, prev_hash: str, stream: Any | None, legacy_length: int | None
) -> str | None:
    if row.chain_index > expected_index:
        return f"missing record(s) before chain index {row.chain_index}"
    if row.chain_index < expected_index or row.prev_hash != prev_hash:
        return "record inserted/reordered"
    if legacy_length is None:
        # No genesis to say which records are in format 1: either format is a well-formed chain.
        formats: tuple[datetime | None, ...] = (row.stored_at, None)
    else:
        formats = (None,) if row.chain_index <= legacy_length else (row.stored_at,)
    if all(_recomputed(row, prev_hash, stored_at) != row.hash for stored_at in formats):
        return "hash mismatch: record edited"
    if stream is None:
        return "stream row missing"
    if row.chain_index > stream.chain_length:
        return "record beyond the stream head: record inserted"
    return None


def _check_signed(row: Any, keys: KeyHistory | None) -> str | None:
    try:
        signed = events.decode_event(row.raw.encode())
    except errors.Rejected as err:
        return f"stored raw does not decode: {err.reason}"
    mismatch = _column_mismatch(row, signed)
    if mismatch is not None:
        return f"stored column {mismatch} differs from signed event"
    if keys is None:
        return None
    candidates = keys.keys_at(row.received_at)
    for key in candidates:
        try:
            signed.verify(key)
        except errors.Rejected:
            continue
        return None
    revoked = keys.revoked_at(row.received_at)
    if not candidates and revoked is not None:
        return f"stored after the agent was revoked ({timefmt.fmt(revoked)})"
    return "signature invalid"


def _head_text(signed: SignedHead) -> str:
    return f"signed checkpoint #{signed.checkpoint} has {signed.length} record(s), seq up to {signed.max_seq}"


def _against_signed(
    agent_id: str, walked: int, last_hash: str, stream: Any | None, signed: SignedHead | None
) -> ChainProblem | None:
    """Hold a walked chain and its streams row against the newest signed checkpoint of the stream."""
    if signed is None:
        if walked == 0:
            return None
        return ChainProblem(
            agent_id, 1, None, None, None, f"{walked} record(s) not covered by any signed checkpoint: records inserted"
        )
    if walked < signed.length:
        what = "stream deleted: all records missing" if walked == 0 else "last record(s) deleted"
        if stream is None and walked == 0:
            what += ", and its streams row"
        return ChainProblem(
            agent_id,
            walked + 1,
            None,
            None,
            None,
            f"{what}: the chain ends at index {walked}, {_head_text(signed)} "
            f"(chain index {walked + 1}–{signed.length} missing)",
        )
    if walked > signed.length:
        return ChainProblem(
            agent_id,
            signed.length + 1,
            None,
            None,
            None,
            f"record(s) beyond the last signed checkpoint: {_head_text(signed)}, the chain has {walked}: "
            "records inserted",
        )
    if last_hash != signed.head:
        return ChainProblem(
            agent_id,
            walked,
            None,
            None,
            None,
            f"head differs from signed checkpoint #{signed.checkpoint}: records replaced and rehashed",
        )
    if stream is None:
        return ChainProblem(agent_id, None, None, None, None, "stream row missing")
    stored = (stream.chain_length, stream.head_hash, stream.max_seq, stream.contiguous_seq)
    if stored != (signed.length, signed.head, signed.max_seq, signed.contiguous_seq):
        return ChainProblem(
            agent_id, None, None, None, None, f"streams row differs from signed checkpoint #{signed.checkpoint}"
        )
    return None


def verify_stream(
    conn: Connection,
    agent_id: str,
    *,
    signed: SignedHead | None,
    legacy_length: int | None = 0,
    keys: KeyHistory | None = None,
) -> tuple[ChainProblem | None, int]:
    """Walk one agent's chain in chain_index order; return its first problem (None if intact) and its length.

    signed is the stream's end as the newest signed checkpoint has it (None: never checkpointed);
    records up to legacy_length are in record format 1 (None: unknown, the log has no genesis, so either
    format is accepted and the problem is the log's). With keys, every event's signature is checked
    against the agent's key history. Run it inside the transaction that read the checkpoints, so the
    stream row, the records and the signed heads are one snapshot despite concurrent appends.
    """
    stream = conn.execute(select(Stream).where(Stream.agent_id == agent_id)).first()
    query = select(*Event.__table__.columns).where(Event.agent_id == agent_id).order_by(Event.chain_index)
    expected_index = 1
    prev_hash = ZERO_HASH
    # yield_per streams the rows (a server-side cursor on PostgreSQL) instead of loading the chain.
    result = conn.execute(query, execution_options={"yield_per": _WALK_BATCH})
    try:
        for row in result:
            problem = _check_record(row, expected_index, prev_hash, stream, legacy_length) or _check_signed(row, keys)
            if problem is not None:
                return ChainProblem(agent_id, row.chain_index, row.seq, row.event_id, row.id, problem), 0
            expected_index += 1
            prev_hash = row.hash
    finally:
        result.close()
    last_index = expected_index - 1
    if stream is not None:
        if last_index < stream.chain_length:
            return ChainProblem(
                agent_id, last_index + 1, None, None, None, "stream head does not match: last record(s) deleted"
            ), 0
        if prev_hash != stream.head_hash:
            return ChainProblem(
                agent_id, last_index, None, None, None, "stream head does not match: last record replaced"
            ), 0
    elif last_index > 0:
        return ChainProblem(agent_id, None, None, None, None, "stream row missing"), 0
    return _against_signed(agent_id, last_index, prev_hash, stream, signed), last_index


def verify_letters(conn: Connection, signed: SignedHead | None) -> tuple[ChainProblem | None, int]:
    """Walk the dead letters' chain; return its first problem (None if intact) and its length."""
    query = select(*DeadLetter.__table__.columns).order_by(DeadLetter.chain_index)
    expected_index = 1
    prev_hash = ZERO_HASH
    result = conn.execute(query, execution_options={"yield_per": _WALK_BATCH})

    def problem_at(row: Any, text: str) -> ChainProblem:
        return ChainProblem(row.agent_id, row.chain_index, row.seq, row.event_id, row.id, text, "dead_letters")

    try:
        for row in result:
            if row.chain_index > expected_index:
                return problem_at(row, f"missing dead letter(s) before chain index {row.chain_index}"), 0
            if row.chain_index < expected_index or row.prev_hash != prev_hash:
                return problem_at(row, "dead letter inserted/reordered"), 0
            if letter_hash(prev_hash, row) != row.hash:
                return problem_at(row, "hash mismatch: dead letter edited"), 0
            expected_index += 1
            prev_hash = row.hash
    finally:
        result.close()
    walked = expected_index - 1
    text: str | None = None
    if signed is None:
        if walked:
            text = f"{walked} dead letter(s) not covered by any signed checkpoint: dead letters inserted"
    elif walked < signed.length:
        text = (
            f"last dead letter(s) deleted: the chain ends at index {walked}, signed checkpoint "
            f"#{signed.checkpoint} has {signed.length} (chain index {walked + 1}–{signed.length} missing)"
        )
    elif walked > signed.length:
        text = (
            f"dead letter(s) beyond the last signed checkpoint #{signed.checkpoint} (it has {signed.length}): "
            "dead letters inserted"
        )
    elif prev_hash != signed.head:
        text = f"head differs from signed checkpoint #{signed.checkpoint}: dead letters replaced and rehashed"
    if text is not None:
        return ChainProblem(None, walked + 1, None, None, None, text, "dead_letters"), 0
    return None, walked
