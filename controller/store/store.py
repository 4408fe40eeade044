"""The controller's record store: agents, hash-chained events, sequence gaps, dead letters, policy, commands.

Every method runs in its own transaction and keeps no state between calls, so any number of
controller workers (threads or processes) may share one database. Writers of the same agent's
stream are serialised by a row lock on its ``streams`` row (PostgreSQL) or by SQLite's single
writer lock, taken at BEGIN IMMEDIATE.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    Table,
    and_,
    any_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, aliased

from sekisho.controller.store.chain import ChainProblem, record_hash, verify_stream
from sekisho.controller.store.db import SQLITE_BEGIN
from sekisho.controller.store.models import (
    ZERO_HASH,
    Agent,
    DeadLetter,
    Event,
    Finding,
    IssuedCommand,
    LoanLogEntry,
    LoanRecord,
    PolicyVersion,
    Stream,
)
from sekisho.controller.store.redaction import clean_text, redact_payload
from sekisho.protocol import errors, mynumber, signing, timefmt, topics
from sekisho.protocol.events import DecodedEvent

log = logging.getLogger(__name__)

# Dead-letter reasons the store itself decides (the others come from protocol.errors).
DUPLICATE_ID = errors.DUPLICATE_ID
SEQ_CONFLICT = errors.SEQ_CONFLICT
SEQUENCE_GAP = "sequence_gap"

ACTIVE = "active"
REVOKED = "revoked"

_INT64 = range(-(2**63), 2**63)
# Events looked up per existence query; keeps the bind-parameter count far below SQLite's limit.
_LOOKUP_CHUNK = 1000

_EVENTS = cast(Table, Event.__table__)
_STREAMS = cast(Table, Stream.__table__)
_AGENTS = cast(Table, Agent.__table__)
_FINDINGS = cast(Table, Finding.__table__)
_DEAD_LETTERS = cast(Table, DeadLetter.__table__)
_POLICY = cast(Table, PolicyVersion.__table__)
_COMMANDS = cast(Table, IssuedCommand.__table__)
_LOANS = cast(Table, LoanRecord.__table__)
_LOAN_LOG = cast(Table, LoanLogEntry.__table__)

MEDIA_LOAN_OVERDUE = "media_loan_overdue"
# Event types whose payload may name the registered medium seen (agents/usb adds "medium").
USB_SIGHTINGS = ("usb.allowed", "usb.blocked", "usb.inserted")

_EVENT_COLUMNS = (
    "agent_id",
    "seq",
    "event_id",
    "type",
    "occurred_at",
    "received_at",
    "stored_at",
    "clock_synced",
    "clock_offset_ms",
    "payload",
    "raw",
    "chain_index",
    "prev_hash",
    "hash",
)
_PG_COPY_EVENTS = f"COPY events ({', '.join(_EVENT_COLUMNS)}) FROM STDIN"

T = TypeVar("T")
M = TypeVar("M")


class AgentExists(Exception):
    """The agent is already registered with another key or is revoked; pass replace=True to re-enrol."""


class AgentNotFound(LookupError):
    """No agent with that id is registered."""


class PolicyVersionConflict(Exception):
    """Another writer stored a policy version after the one a change was based on; re-read and retry."""


@dataclass(frozen=True, slots=True)
class DeadLetterIn:
    """A message to keep as a dead letter: what arrived, where, and why it was not accepted."""

    topic: str
    raw: bytes
    reason: str
    detail: str
    agent_id: str | None = None
    seq: int | None = None
    event_id: str | None = None
    # True when the agent's own signature proves it sent this: the agent may then drop it (ingest acks it).
    ackable: bool = False


@dataclass(frozen=True, slots=True)
class GapFinding:
    """A newly detected run of missing sequence numbers of one agent."""

    id: int
    agent_id: str
    first_seq: int
    last_seq: int


@dataclass(slots=True)
class BatchResult:
    """What store_batch did with each input; the caller acknowledges stored + duplicates + dead_lettered."""

    stored: list[tuple[str, int]] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    dead_lettered: list[tuple[str | None, int | None]] = field(default_factory=list)
    gaps: list[GapFinding] = field(default_factory=list)
    resolved_gaps: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _StreamState:
    agent_id: str
    chain_length: int
    head_hash: str
    max_seq: int
    contiguous_seq: int


def _aware_utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return moment.astimezone(UTC)


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _missing_ranges(first: int, last: int, present: Sequence[int]) -> list[tuple[int, int]]:
    """Return the runs of [first, last] not in the sorted sequence present."""
    ranges = []
    expected = first
    for seq in present:
        if seq > expected:
            ranges.append((expected, seq - 1))
        expected = max(expected, seq + 1)
    if expected <= last:
        ranges.append((expected, last))
    return ranges


def _is_transient(err: DBAPIError, *, unique: bool) -> bool:
    """Tell whether retrying the whole transaction may succeed."""
    if err.connection_invalidated:
        return True
    sqlstate = getattr(err.orig, "sqlstate", None)
    # 40001 serialization failure, 40P01 deadlock; 23505 unique violation (a concurrent writer won).
    if sqlstate in ("40001", "40P01") or (unique and sqlstate == "23505"):
        return True
    message = str(err.orig).lower()
    return "database is locked" in message or "database is busy" in message


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value in _INT64:
        return value
    return None


class Store:
    """The controller's persistent records, on an engine made by ``db.make_engine``."""

    def __init__(self, engine: Engine, *, attempts: int = 5) -> None:
        """Use the given engine; retry transient write conflicts up to ``attempts`` times."""
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {engine.dialect.name!r}")
        self.engine = engine
        self._attempts = attempts
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    # --- transactions ------------------------------------------------------------------------------

    def _write(self, work: Callable[[Connection], T], *, retry_unique: bool = False) -> T:
        """Run work in one write transaction, retrying it whole on transient conflicts."""
        attempt = 1
        while True:
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
                    with conn.begin():
                        return work(conn)
            except DBAPIError as err:
                if attempt >= self._attempts or not _is_transient(err, unique=retry_unique):
                    raise
                log.info("retrying store transaction after a transient conflict (attempt %d): %s", attempt, err)
                # Jitter so that two workers that collided do not collide again in lockstep.
                time.sleep(min(0.02 * 2**attempt, 0.5) * (0.5 + random.random()))
                attempt += 1

    def _read(self, stmt: Select[M]) -> list[M]:
        """Return the ORM objects a query selects, detached (safe to use after the session ends)."""
        with Session(self.engine) as session:
            return list(session.scalars(stmt))

    # --- agents ------------------------------------------------------------------------------------

    def register_agent(
        self, agent_id: str, public_key_pem: str, *, replace: bool = False, registered_at: datetime | None = None
    ) -> None:
        """Enrol an agent with its Ed25519 public key (idempotent for the same key)."""
        try:
            topics.check_agent_id(agent_id)
        except errors.Rejected as err:
            raise ValueError(err.detail) from err
        signing.load_public_key_pem(public_key_pem.encode())  # raises ValueError if not Ed25519 PEM
        when = _aware_utc(registered_at or timefmt.now(), "registered_at")

        def work(conn: Connection) -> None:
            row = conn.execute(
                select(_AGENTS.c.public_key_pem, _AGENTS.c.status).where(_AGENTS.c.id == agent_id)
            ).first()
            if row is None:
                conn.execute(
                    insert(_AGENTS).values(
                        id=agent_id, public_key_pem=public_key_pem, status=ACTIVE, registered_at=when
                    )
                )
            elif row.public_key_pem == public_key_pem and row.status == ACTIVE:
                return
            elif not replace:
                raise AgentExists(f"agent {agent_id!r} is already registered ({row.status}, other key?)")
            else:
                conn.execute(
                    update(_AGENTS)
                    .where(_AGENTS.c.id == agent_id)
                    .values(public_key_pem=public_key_pem, status=ACTIVE, registered_at=when)
                )

        self._write(work, retry_unique=True)

    def revoke_agent(self, agent_id: str) -> None:
        """Mark an agent revoked: its key is no longer offered for verifying new events."""

        def work(conn: Connection) -> None:
            done = conn.execute(update(_AGENTS).where(_AGENTS.c.id == agent_id).values(status=REVOKED))
            if done.rowcount == 0:
                raise AgentNotFound(agent_id)

        self._write(work)

    def agent_keys(self, *, include_revoked: bool = False) -> dict[str, str]:
        """Return agent id → public key PEM, for active agents (or all, to re-verify old records)."""
        stmt = select(_AGENTS.c.id, _AGENTS.c.public_key_pem)
        if not include_revoked:
            stmt = stmt.where(_AGENTS.c.status == ACTIVE)
        with self.engine.connect() as conn:
            return {row.id: row.public_key_pem for row in conn.execute(stmt)}

    def record_heartbeat(self, agent_id: str, info: dict[str, Any], seen_at: datetime) -> bool:
        """Record an agent's latest heartbeat; older heartbeats than the one stored are ignored."""
        seen = _aware_utc(seen_at, "seen_at")
        version = info.get("version")
        values = {
            "last_seen_at": seen,
            "version": version[:32] if isinstance(version, str) else None,
            "outbox_depth": _int_or_none(info.get("outbox_depth")),
            "clock_offset_ms": _int_or_none(info.get("clock_offset_ms")),
            "policy_version": _int_or_none(info.get("policy_version")),
            "last_heartbeat": mynumber.redact(info),
        }

        def work(conn: Connection) -> bool:
            # Heartbeats may be handled by different workers out of order: keep the newest.
            stmt = (
                update(_AGENTS)
                .where(_AGENTS.c.id == agent_id)
                .where(or_(_AGENTS.c.last_seen_at.is_(None), _AGENTS.c.last_seen_at <= seen))
                .values(**values)
            )
            return conn.execute(stmt).rowcount > 0

        return self._write(work)

    def list_agents(self) -> list[Agent]:
        """Return every registered agent, ordered by id."""
        return self._read(select(Agent).order_by(Agent.id))

    # --- events ------------------------------------------------------------------------------------

    def store_batch(
        self,
        events: Sequence[DecodedEvent],
        dead_letters: Sequence[DeadLetterIn] = (),
        received_at: datetime | None = None,
    ) -> BatchResult:
        """Store verified events and dead letters in one transaction; idempotent on (agent, seq)."""
        received = _aware_utc(received_at or timefmt.now(), "received_at")
        return self._write(lambda conn: self._store_batch(conn, events, dead_letters, received), retry_unique=True)

    def _store_batch(
        self,
        conn: Connection,
        events: Sequence[DecodedEvent],
        dead_letters: Sequence[DeadLetterIn],
        received_at: datetime,
    ) -> BatchResult:
        result = BatchResult()
        now = timefmt.now()
        letters = [self._dead_letter_row(letter, received_at) for letter in dead_letters]
        result.dead_lettered.extend((letter.agent_id, letter.seq) for letter in dead_letters)

        # Verified events that end up as dead letters still account for their seq: they are acked, the
        # agent drops them, and the dead letter holds them, so they must not read as a sequence gap.
        accounted: dict[str, list[int]] = defaultdict(list)
        for letter in dead_letters:
            if letter.ackable and letter.agent_id is not None and letter.seq is not None:
                accounted[letter.agent_id].append(letter.seq)
        streams = self._lock_streams(conn, sorted({ev.agent for ev in events} | set(accounted)))
        known = [ev for ev in events if ev.agent in streams]
        stored_ids, owners = self._existing(conn, known)

        def reject(ev: DecodedEvent, reason: str, detail: str) -> None:
            letter = DeadLetterIn(
                topic=topics.topic(ev.agent, topics.EVENTS),
                raw=ev.raw,
                reason=reason,
                detail=detail,
                agent_id=ev.agent,
                seq=ev.seq,
                event_id=ev.id,
            )
            letters.append(self._dead_letter_row(letter, received_at))
            result.dead_lettered.append((ev.agent, ev.seq))
            if reason == DUPLICATE_ID:
                accounted[ev.agent].append(ev.seq)

        rows: list[dict[str, Any]] = []
        new_seqs: dict[str, list[int]] = defaultdict(list)
        for ev in events:
            key = (ev.agent, ev.seq)
            stream = streams.get(ev.agent)
            if stream is None:
                reject(ev, errors.UNKNOWN_AGENT, f"agent {ev.agent!r} is not registered")
                continue
            prior = stored_ids.get(key)
            if prior is not None:
                if prior == ev.id:
                    result.duplicates.append(key)
                else:
                    # Same seq, another event: the agent reused a number. Keep it, never overwrite.
                    reject(ev, SEQ_CONFLICT, f"seq {ev.seq} is already stored as event {prior}")
                continue
            owner = owners.get(ev.id)
            if owner is not None:
                reject(ev, DUPLICATE_ID, f"event id already stored for {owner[0]} seq {owner[1]}")
                continue
            if ev.clock_offset_ms is not None and ev.clock_offset_ms not in _INT64:
                reject(ev, errors.SCHEMA, "clock.offset_ms does not fit a 64-bit integer")
                continue
            occurred_at = _aware_utc(ev.occurred_at, "occurred_at")
            raw = ev.raw.decode("utf-8")
            stream.chain_length += 1
            digest = record_hash(
                stream.head_hash,
                agent=ev.agent,
                seq=ev.seq,
                chain_index=stream.chain_length,
                event_id=ev.id,
                type=ev.type,
                occurred_at=occurred_at,
                received_at=received_at,
                raw=raw,
            )
            rows.append(
                {
                    "agent_id": ev.agent,
                    "seq": ev.seq,
                    "event_id": ev.id,
                    "type": ev.type,
                    "occurred_at": occurred_at,
                    "received_at": received_at,
                    "stored_at": now,
                    "clock_synced": ev.clock_synced,
                    "clock_offset_ms": ev.clock_offset_ms,
                    "payload": ev.payload,
                    "raw": raw,
                    "chain_index": stream.chain_length,
                    "prev_hash": stream.head_hash,
                    "hash": digest,
                }
            )
            stream.head_hash = digest
            stored_ids[key] = ev.id
            owners[ev.id] = key
            new_seqs[ev.agent].append(ev.seq)
            result.stored.append(key)

        if rows:
            self._insert_events(conn, rows)
        for agent_id, seqs in accounted.items():
            if agent_id in streams:
                new_seqs[agent_id].extend(seqs)
        for agent_id, seqs in new_seqs.items():
            self._track_sequence(conn, streams[agent_id], sorted(set(seqs)), now, result)
        if new_seqs:
            conn.execute(
                update(_STREAMS)
                .where(_STREAMS.c.agent_id == bindparam("b_agent"))
                .values(
                    chain_length=bindparam("b_length"),
                    head_hash=bindparam("b_head"),
                    max_seq=bindparam("b_max"),
                    contiguous_seq=bindparam("b_contiguous"),
                ),
                [
                    {
                        "b_agent": s.agent_id,
                        "b_length": s.chain_length,
                        "b_head": s.head_hash,
                        "b_max": s.max_seq,
                        "b_contiguous": s.contiguous_seq,
                    }
                    for s in (streams[agent_id] for agent_id in new_seqs)
                ],
            )
        if letters:
            conn.execute(insert(_DEAD_LETTERS), letters)
        return result

    @staticmethod
    def _insert_events(conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert new event rows in bulk, inside the current transaction."""
        if conn.dialect.name != "postgresql":
            # sqlite3's executemany is already a tight C loop over one prepared statement.
            conn.execute(insert(_EVENTS), rows)
            return
        # PostgreSQL: COPY, formatted by psycopg's C code. Per-row INSERTs cost a round trip each,
        # and multi-row VALUES or unnest() arrays are re-parsed or escaped in Python per batch.
        # The values are those SQLAlchemy would bind: aware UTC datetimes, JSON as its text.
        driver = conn.connection.driver_connection
        assert driver is not None
        dbapi_error = conn.dialect.loaded_dbapi.Error
        try:
            with driver.cursor() as cursor, cursor.copy(_PG_COPY_EVENTS) as copy:
                for row in rows:
                    copy.write_row(
                        [json.dumps(row[name]) if name == "payload" else row[name] for name in _EVENT_COLUMNS]
                    )
        except dbapi_error as err:
            # Wrap as SQLAlchemy would, so a unique violation from a concurrent worker is retried.
            raise DBAPIError.instance(_PG_COPY_EVENTS, None, err, dbapi_error, dialect=conn.dialect) from err

    def _lock_streams(self, conn: Connection, agent_ids: list[str]) -> dict[str, _StreamState]:
        """Create missing stream rows of registered agents, then lock them all in a fixed order."""
        if not agent_ids:
            return {}
        seed = (
            select(_AGENTS.c.id, literal(0), literal(ZERO_HASH), literal(0), literal(0))
            .where(_AGENTS.c.id.in_(agent_ids))
            .order_by(_AGENTS.c.id)
        )
        columns = ["agent_id", "chain_length", "head_hash", "max_seq", "contiguous_seq"]
        conn.execute(self._insert(_STREAMS).from_select(columns, seed).on_conflict_do_nothing())
        # Sorted order: two workers locking overlapping sets of agents cannot deadlock each other.
        # (SQLite ignores FOR UPDATE; it already holds the database write lock since BEGIN IMMEDIATE.)
        locked = conn.execute(
            select(_STREAMS).where(_STREAMS.c.agent_id.in_(agent_ids)).order_by(_STREAMS.c.agent_id).with_for_update()
        )
        return {
            row.agent_id: _StreamState(row.agent_id, row.chain_length, row.head_hash, row.max_seq, row.contiguous_seq)
            for row in locked
        }

    def _among(self, column: ColumnElement[Any], values: list[Any]) -> ColumnElement[bool]:
        """Return "column is one of values" in the form each backend plans and parses fastest."""
        if self.engine.dialect.name == "postgresql":
            # One array parameter instead of hundreds: psycopg then reuses the parsed statement.
            return column == any_(literal(values, postgresql.ARRAY(column.type)))
        return column.in_(values)

    def _existing(
        self, conn: Connection, events: Sequence[DecodedEvent]
    ) -> tuple[dict[tuple[str, int], str], dict[str, tuple[str, int]]]:
        """Return the stored rows that share an (agent, seq) or an event id with the given events."""
        by_pair: dict[tuple[str, int], str] = {}
        by_id: dict[str, tuple[str, int]] = {}
        for chunk in _chunks(events, _LOOKUP_CHUNK):
            seqs: dict[str, set[int]] = defaultdict(set)
            for ev in chunk:
                seqs[ev.agent].add(ev.seq)
            match = or_(
                *(
                    and_(_EVENTS.c.agent_id == agent_id, self._among(_EVENTS.c.seq, sorted(agent_seqs)))
                    for agent_id, agent_seqs in seqs.items()
                ),
                self._among(_EVENTS.c.event_id, sorted({ev.id for ev in chunk})),
            )
            found = conn.execute(select(_EVENTS.c.agent_id, _EVENTS.c.seq, _EVENTS.c.event_id).where(match))
            for agent_id, seq, event_id in found:
                by_pair[(agent_id, seq)] = event_id
                by_id[event_id] = (agent_id, seq)
        return by_pair, by_id

    def _track_sequence(
        self, conn: Connection, stream: _StreamState, seqs: list[int], now: datetime, result: BatchResult
    ) -> None:
        """Advance max/contiguous seq of a stream and open or close gap findings for the new seqs."""
        before_max, before_contiguous = stream.max_seq, stream.contiguous_seq
        fresh = [s for s in seqs if s > before_max]
        late = [s for s in seqs if s <= before_max]
        if fresh:
            gaps = _missing_ranges(before_max + 1, fresh[-1], fresh)
            stream.max_seq = fresh[-1]
            if gaps:
                self._open_gaps(conn, stream.agent_id, gaps, now, result)
        if late:
            self._fill_gaps(conn, stream.agent_id, late, now, result)
        if before_contiguous == before_max:
            contiguous = before_contiguous
            for seq in fresh:
                if seq != contiguous + 1:
                    break
                contiguous = seq
            stream.contiguous_seq = contiguous
        elif seqs[0] == before_contiguous + 1:
            stream.contiguous_seq = self._contiguous_end(conn, stream.agent_id, before_contiguous)

    @staticmethod
    def _contiguous_end(conn: Connection, agent_id: str, contiguous: int) -> int:
        """Return the end of the unbroken run of stored seqs that starts at contiguous + 1."""
        following = aliased(_EVENTS)
        # Walks the (agent_id, seq) index upwards and stops at the first seq without a successor.
        stmt = (
            select(_EVENTS.c.seq)
            .where(_EVENTS.c.agent_id == agent_id, _EVENTS.c.seq > contiguous)
            .where(~exists().where(following.c.agent_id == agent_id, following.c.seq == _EVENTS.c.seq + 1))
            .order_by(_EVENTS.c.seq)
            .limit(1)
        )
        end = conn.execute(stmt).scalar()
        return contiguous if end is None else int(end)

    @staticmethod
    def _open_gaps(
        conn: Connection, agent_id: str, gaps: list[tuple[int, int]], now: datetime, result: BatchResult
    ) -> None:
        rows = [
            {
                "kind": SEQUENCE_GAP,
                "agent_id": agent_id,
                "first_seq": first,
                "last_seq": last,
                "detail": {"missing": last - first + 1, "noticed_before_seq": last + 1},
                "created_at": now,
                "resolved_at": None,
                "resolution": None,
            }
            for first, last in gaps
        ]
        ids = conn.execute(insert(_FINDINGS).returning(_FINDINGS.c.id, sort_by_parameter_order=True), rows).scalars()
        result.gaps.extend(
            GapFinding(finding_id, agent_id, first, last) for finding_id, (first, last) in zip(ids, gaps, strict=True)
        )

    @staticmethod
    def _fill_gaps(conn: Connection, agent_id: str, late: list[int], now: datetime, result: BatchResult) -> None:
        """Shrink, split or resolve the open gap findings that late events fall into."""
        candidates = conn.execute(
            select(_FINDINGS.c.id, _FINDINGS.c.first_seq, _FINDINGS.c.last_seq, _FINDINGS.c.detail)
            .where(
                _FINDINGS.c.kind == SEQUENCE_GAP,
                _FINDINGS.c.agent_id == agent_id,
                _FINDINGS.c.resolved_at.is_(None),
                _FINDINGS.c.first_seq <= late[-1],
                _FINDINGS.c.last_seq >= late[0],
            )
            .order_by(_FINDINGS.c.first_seq)
        ).all()
        for finding_id, first, last, detail in candidates:
            inside = late[bisect.bisect_left(late, first) : bisect.bisect_right(late, last)]
            if not inside:
                continue
            detail = dict(detail or {})
            detail["filled"] = int(detail.get("filled", 0)) + len(inside)
            remaining = _missing_ranges(first, last, inside)
            if not remaining:
                conn.execute(
                    update(_FINDINGS)
                    .where(_FINDINGS.c.id == finding_id)
                    .values(detail=detail, resolved_at=now, resolution="filled: the missing events arrived late")
                )
                result.resolved_gaps.append(finding_id)
                continue
            # The finding keeps its id for the first remaining run; any further runs become new
            # findings pointing back at it, so one alert is not raised again for the same events.
            (keep_first, keep_last), *split = remaining
            detail.setdefault("original", [first, last])
            detail["missing"] = keep_last - keep_first + 1
            conn.execute(
                update(_FINDINGS)
                .where(_FINDINGS.c.id == finding_id)
                .values(first_seq=keep_first, last_seq=keep_last, detail=detail)
            )
            if split:
                conn.execute(
                    insert(_FINDINGS),
                    [
                        {
                            "kind": SEQUENCE_GAP,
                            "agent_id": agent_id,
                            "first_seq": piece_first,
                            "last_seq": piece_last,
                            "detail": {"missing": piece_last - piece_first + 1, "split_from": finding_id},
                            "created_at": now,
                            "resolved_at": None,
                            "resolution": None,
                        }
                        for piece_first, piece_last in split
                    ],
                )

    @staticmethod
    def _dead_letter_row(letter: DeadLetterIn, received_at: datetime) -> dict[str, Any]:
        return {
            "received_at": received_at,
            "topic": clean_text(letter.topic, 1024) or "",
            "agent_id": clean_text(letter.agent_id, 128),
            "seq": _int_or_none(letter.seq),
            "event_id": clean_text(letter.event_id, 128),
            "reason": clean_text(letter.reason, 64) or "unknown",
            "detail": clean_text(letter.detail, 4000) or "",
            "payload": redact_payload(letter.raw),
            "payload_sha256": hashlib.sha256(letter.raw).hexdigest(),
            "size": len(letter.raw),
        }

    def verify_chains(self, agent_id: str | None = None, *, keys: dict[str, str] | None = None) -> list[ChainProblem]:
        """Re-check every (or one) agent's hash chain; with keys, re-verify the agents' signatures too."""
        if agent_id is not None:
            agent_ids = [agent_id]
        else:
            with self.engine.connect() as conn:
                found = set(conn.execute(select(_STREAMS.c.agent_id)).scalars())
                # An agent with records but no stream row is itself a finding, so look at both.
                found.update(conn.execute(select(_EVENTS.c.agent_id).distinct()).scalars())
            agent_ids = sorted(found)
        problems = []
        for one in agent_ids:
            with self.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    # One snapshot for the stream row and its records, despite concurrent appends.
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    problem = verify_stream(conn, one, keys)
            if problem is not None:
                problems.append(problem)
        return problems

    def list_events(
        self,
        *,
        agent_id: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Return events in id order; since/until bound occurred_at (until exclusive); page with after_id."""
        if limit < 1:
            raise ValueError("limit must be positive")
        stmt = select(Event).order_by(Event.id).limit(limit)
        if agent_id is not None:
            stmt = stmt.where(Event.agent_id == agent_id)
        if type is not None:
            stmt = stmt.where(Event.type == type)
        if since is not None:
            stmt = stmt.where(Event.occurred_at >= _aware_utc(since, "since"))
        if until is not None:
            stmt = stmt.where(Event.occurred_at < _aware_utc(until, "until"))
        if after_id is not None:
            stmt = stmt.where(Event.id > after_id)
        return self._read(stmt)

    def count_events(self, agent_id: str | None = None) -> int:
        """Return the number of stored events (of one agent, or in total)."""
        stmt = select(func.count()).select_from(_EVENTS)
        if agent_id is not None:
            stmt = stmt.where(_EVENTS.c.agent_id == agent_id)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def event_seqs(self, agent_id: str) -> list[int]:
        """Return the stored sequence numbers of one agent, ascending."""
        stmt = select(_EVENTS.c.seq).where(_EVENTS.c.agent_id == agent_id).order_by(_EVENTS.c.seq)
        with self.engine.connect() as conn:
            return [int(seq) for seq in conn.execute(stmt).scalars()]

    def list_streams(self) -> list[Stream]:
        """Return every agent's chain head and sequence progress."""
        return self._read(select(Stream).order_by(Stream.agent_id))

    def get_stream(self, agent_id: str) -> Stream | None:
        """Return the chain head and sequence progress of one agent, if it has stored anything."""
        found = self._read(select(Stream).where(Stream.agent_id == agent_id))
        return found[0] if found else None

    # --- dead letters and findings -----------------------------------------------------------------

    def list_dead_letters(self, limit: int = 100, after_id: int | None = None) -> list[DeadLetter]:
        """Return dead letters in id order, paged with after_id."""
        stmt = select(DeadLetter).order_by(DeadLetter.id).limit(limit)
        if after_id is not None:
            stmt = stmt.where(DeadLetter.id > after_id)
        return self._read(stmt)

    def list_findings(
        self, open_only: bool = False, *, kind: str | None = None, agent_id: str | None = None
    ) -> list[Finding]:
        """Return findings in id order, optionally only unresolved ones, of one kind or agent."""
        stmt = select(Finding).order_by(Finding.id)
        if open_only:
            stmt = stmt.where(Finding.resolved_at.is_(None))
        if kind is not None:
            stmt = stmt.where(Finding.kind == kind)
        if agent_id is not None:
            stmt = stmt.where(Finding.agent_id == agent_id)
        return self._read(stmt)

    # --- policy versions and commands --------------------------------------------------------------

    def add_policy_version(
        self,
        document: dict[str, Any],
        *,
        created_by: str,
        source_sha256: str,
        comment: str = "",
        created_at: datetime | None = None,
        base_version: int | None = None,
    ) -> PolicyVersion:
        """Store a new policy document as the next version number and return it.

        With ``base_version`` (0: no version yet) raise PolicyVersionConflict unless it is still the newest.
        """
        when = _aware_utc(created_at or timefmt.now(), "created_at")

        def work(conn: Connection) -> PolicyVersion:
            return self._insert_policy_version(conn, document, created_by, source_sha256, comment, when, base_version)

        return self._write(work, retry_unique=True)

    @staticmethod
    def _insert_policy_version(
        conn: Connection,
        document: dict[str, Any],
        created_by: str,
        source_sha256: str,
        comment: str,
        when: datetime,
        base_version: int | None,
    ) -> PolicyVersion:
        # Two workers may pick the same number; the loser hits the primary key and retries.
        current = int(conn.execute(select(func.max(_POLICY.c.version))).scalar() or 0)
        if base_version is not None and current != base_version:
            # A document derived from an older version would silently undo the newer one (e.g. a loan).
            raise PolicyVersionConflict(f"policy version {current} was stored after version {base_version}")
        values = {
            "version": current + 1,
            "created_at": when,
            "created_by": created_by,
            "source_sha256": source_sha256,
            "document": document,
            "comment": comment,
        }
        conn.execute(insert(_POLICY).values(**values))
        return PolicyVersion(**values)

    def current_policy_version(self) -> PolicyVersion | None:
        """Return the newest policy version, or None if none was ever stored."""
        found = self._read(select(PolicyVersion).order_by(PolicyVersion.version.desc()).limit(1))
        return found[0] if found else None

    def get_policy_version(self, version: int) -> PolicyVersion | None:
        """Return one policy version by number."""
        found = self._read(select(PolicyVersion).where(PolicyVersion.version == version))
        return found[0] if found else None

    def add_issued_command(
        self,
        *,
        command_id: str,
        agent_id: str,
        name: str,
        args: dict[str, Any],
        issued_at: datetime,
        expires_at: datetime,
        nonce: str,
    ) -> IssuedCommand:
        """Record a command sent to an agent; a reused nonce or id raises IntegrityError."""
        values = {
            "id": command_id,
            "agent_id": agent_id,
            "name": name,
            "args": args,
            "issued_at": _aware_utc(issued_at, "issued_at"),
            "expires_at": _aware_utc(expires_at, "expires_at"),
            "nonce": nonce,
        }
        self._write(lambda conn: conn.execute(insert(_COMMANDS).values(**values)))
        return IssuedCommand(**values)

    # --- media loans (貸出記録) ---------------------------------------------------------------------

    def add_loan_version(
        self,
        document: dict[str, Any],
        *,
        base_version: int,
        created_by: str,
        comment: str,
        log: dict[str, Any],
        new_loan: dict[str, Any] | None = None,
        end_loan: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> PolicyVersion:
        """Store a policy version with its loan register change and log line, all in one transaction.

        ``new_loan`` is a whole media_loans row (lend); ``end_loan`` the returned/revoked columns of the
        loan named in ``log`` (return, revoke: its open overdue finding is resolved too).
        """
        when = _aware_utc(at or timefmt.now(), "at")
        loan_id = log["loan_id"]
        # No YAML file behind a loan version: its source digest is that of the document itself.
        digest = hashlib.sha256(json.dumps(document, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

        def work(conn: Connection) -> PolicyVersion:
            row = self._insert_policy_version(conn, document, created_by, digest, comment, when, base_version)
            if new_loan is not None:
                values = {**new_loan, "created_at": when, "lent_version": row.version, "created_by": log["actor"]}
                conn.execute(insert(_LOANS).values(**values))
            if end_loan is not None:
                done = conn.execute(
                    update(_LOANS)
                    .where(_LOANS.c.id == loan_id, _LOANS.c.returned_at.is_(None), _LOANS.c.revoked_at.is_(None))
                    .values(**end_loan, ended_version=row.version)
                )
                if done.rowcount != 1:
                    raise PolicyVersionConflict(f"loan {loan_id!r} was ended by someone else meanwhile")
                finding_id = conn.execute(
                    select(_LOANS.c.overdue_finding_id).where(_LOANS.c.id == loan_id)
                ).scalar_one()
                if finding_id is not None:
                    conn.execute(
                        update(_FINDINGS)
                        .where(_FINDINGS.c.id == finding_id, _FINDINGS.c.resolved_at.is_(None))
                        .values(resolved_at=when, resolution=f"{log['action']} by {log['actor']}")
                    )
            conn.execute(insert(_LOAN_LOG).values(**log, at=when, version=row.version))
            return row

        return self._write(work)

    def get_loan(self, loan_id: str) -> LoanRecord | None:
        """Return one loan of the register."""
        found = self._read(select(LoanRecord).where(LoanRecord.id == loan_id))
        return found[0] if found else None

    def list_loans(
        self,
        *,
        medium: str | None = None,
        person: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        outstanding: bool | None = None,
        id_prefix: str | None = None,
    ) -> list[LoanRecord]:
        """Return loans by start time; since/until select loans whose window overlaps [since, until)."""
        stmt = select(LoanRecord).order_by(LoanRecord.starts_at, LoanRecord.id)
        if medium is not None:
            stmt = stmt.where(LoanRecord.medium == medium)
        if person is not None:
            stmt = stmt.where(LoanRecord.person == person)
        if since is not None:
            stmt = stmt.where(LoanRecord.ends_at > _aware_utc(since, "since"))
        if until is not None:
            stmt = stmt.where(LoanRecord.starts_at < _aware_utc(until, "until"))
        ended = or_(LoanRecord.returned_at.is_not(None), LoanRecord.revoked_at.is_not(None))
        if outstanding is True:
            stmt = stmt.where(~ended)
        elif outstanding is False:
            stmt = stmt.where(ended)
        if id_prefix is not None:
            stmt = stmt.where(LoanRecord.id.startswith(id_prefix, autoescape=True))
        return self._read(stmt)

    def list_loan_log(
        self, *, loan_id: str | None = None, medium: str | None = None, person: str | None = None
    ) -> list[LoanLogEntry]:
        """Return loan log lines in the order they were written."""
        stmt = select(LoanLogEntry).order_by(LoanLogEntry.id)
        if loan_id is not None:
            stmt = stmt.where(LoanLogEntry.loan_id == loan_id)
        if medium is not None:
            stmt = stmt.where(LoanLogEntry.medium == medium)
        if person is not None:
            stmt = stmt.where(LoanLogEntry.person == person)
        return self._read(stmt)

    def open_overdue_finding(
        self, loan_id: str, *, agent_id: str, detail: dict[str, Any], at: datetime | None = None
    ) -> int | None:
        """Raise the overdue finding of a loan once; return its id, or None if it exists or the loan ended."""
        when = _aware_utc(at or timefmt.now(), "at")

        def work(conn: Connection) -> int | None:
            # The loan row lock (PostgreSQL; SQLite's writer lock) lets only one worker raise it.
            row = conn.execute(
                select(_LOANS.c.overdue_finding_id, _LOANS.c.returned_at, _LOANS.c.revoked_at)
                .where(_LOANS.c.id == loan_id)
                .with_for_update()
            ).first()
            if row is None or row.overdue_finding_id is not None or row.returned_at or row.revoked_at:
                return None
            finding_id = conn.execute(
                insert(_FINDINGS)
                .values(kind=MEDIA_LOAN_OVERDUE, agent_id=agent_id, detail=detail, created_at=when)
                .returning(_FINDINGS.c.id)
            ).scalar_one()
            conn.execute(update(_LOANS).where(_LOANS.c.id == loan_id).values(overdue_finding_id=finding_id))
            return int(finding_id)

        return self._write(work)

    def last_medium_sighting(self, medium_id: str) -> Event | None:
        """Return the newest stored USB event whose payload names this registered medium."""
        stmt = (
            select(Event)
            .where(Event.type.in_(USB_SIGHTINGS), Event.payload["medium"].as_string() == medium_id)
            .order_by(Event.occurred_at.desc(), Event.id.desc())
            .limit(1)
        )
        found = self._read(stmt)
        return found[0] if found else None
