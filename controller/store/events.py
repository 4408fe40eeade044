"""Events and their hash chains: the ingest batch, each agent's stream head, sequence gaps and dead letters.

``store_batch`` is the one write of the ingest path: it appends verified events to their agents'
chains, opens or closes sequence-gap findings, keeps refused messages as dead letters (a chain of
their own) and appends one signed checkpoint naming the new heads, all in one transaction. Writers of
the same agent's stream are serialised by a row lock on its ``streams`` row (PostgreSQL) or by
SQLite's single writer lock, taken at BEGIN IMMEDIATE; the checkpoint log by a lock taken last.

A second copy of a stored event is harmless only if it is the same bytes. The same (agent, seq) or the
same event id with other signed content is a conflict: kept whole as a dead letter (``seq_conflict`` or
``duplicate_id``) and raised as a finding of that kind, since an agent key signing two different events
under one number is possible tampering.
"""

from __future__ import annotations

import bisect
import json
import logging
import operator
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
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
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import aliased

from sekisho.controller.store.chain import letter_hash, record_hash, subject_columns
from sekisho.controller.store.checkpoints import INGEST, CheckpointRecords, append_entry, head_fields, lock_log
from sekisho.controller.store.findings import note_finding
from sekisho.controller.store.models import ZERO_HASH, Agent, DeadLetter, Event, Finding, Stream
from sekisho.controller.store.records import INT64, aware_utc, int_or_none
from sekisho.controller.store.redaction import clean_text, letter_mac, redact_payload
from sekisho.protocol import errors, timefmt, topics
from sekisho.protocol.events import DecodedEvent

log = logging.getLogger(__name__)

# Dead-letter reasons the store itself decides (the others come from protocol.errors). A conflict is
# also raised as a finding of the same kind: one open finding per kind and agent, counting repeats.
DUPLICATE_ID = errors.DUPLICATE_ID
SEQ_CONFLICT = errors.SEQ_CONFLICT
SEQUENCE_GAP = "sequence_gap"

# Events looked up per existence query; keeps the bind-parameter count far below SQLite's limit.
_LOOKUP_CHUNK = 1000

_EVENTS = cast(Table, Event.__table__)
_STREAMS = cast(Table, Stream.__table__)
_AGENTS = cast(Table, Agent.__table__)
_FINDINGS = cast(Table, Finding.__table__)
_DEAD_LETTERS = cast(Table, DeadLetter.__table__)

# The columns of a new events row, in the order the PostgreSQL COPY writes them.
EVENT_COLUMNS = (
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
    "person",
    "account",
)
_PG_COPY_EVENTS = f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN"

T = TypeVar("T")

_Converter = Callable[[Any], Any]
# Per engine dialect (each carries its own JSON serialiser): the INSERT and each column's bind processor.
_SQLITE_INSERTS: weakref.WeakKeyDictionary[Dialect, tuple[str, list[_Converter | None]]] = weakref.WeakKeyDictionary()


def _sqlite_insert(dialect: Dialect) -> tuple[str, list[_Converter | None]]:
    """Return the positional INSERT of a new events row and each column's bind processor, for this dialect."""
    cached = _SQLITE_INSERTS.get(dialect)
    if cached is None:
        compiled = insert(_EVENTS).compile(dialect=dialect, column_keys=list(EVENT_COLUMNS))
        # Positional ("?") parameters, in the order EVENT_COLUMNS lists them.
        assert tuple(compiled.positiontup or ()) == EVENT_COLUMNS
        converters: list[_Converter | None] = [
            _EVENTS.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in EVENT_COLUMNS
        ]
        cached = _SQLITE_INSERTS[dialect] = (compiled.string, converters)
    return cached


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


@dataclass(frozen=True, slots=True)
class Conflict:
    """A signed event that clashed with a stored one: kept as dead letter, raised as finding (possible tampering)."""

    kind: str
    agent_id: str
    seq: int
    event_id: str
    dead_letter_id: int
    finding_id: int


@dataclass(slots=True)
class BatchResult:
    """What store_batch did with each input; the caller acknowledges stored + duplicates + dead_lettered."""

    stored: list[tuple[str, int]] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    dead_lettered: list[tuple[str | None, int | None]] = field(default_factory=list)
    gaps: list[GapFinding] = field(default_factory=list)
    resolved_gaps: list[int] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    checkpoint: int | None = None
    # The checkpoint's hash, and each advanced stream's (length, head) it recorded: the agents' receipts.
    checkpoint_hash: str | None = None
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(slots=True)
class _StreamState:
    agent_id: str
    chain_length: int
    head_hash: str
    max_seq: int
    contiguous_seq: int


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


@dataclass(frozen=True, slots=True)
class _Clash:
    letter: int  # index into the batch's dead-letter rows
    kind: str
    event: DecodedEvent
    detail: str


class EventRecords(CheckpointRecords):
    """The ``events``, ``streams`` and ``dead_letters`` tables, and the findings ingest raises."""

    def store_batch(
        self,
        events: Sequence[DecodedEvent],
        dead_letters: Sequence[DeadLetterIn] = (),
        received_at: datetime | None = None,
    ) -> BatchResult:
        """Store verified events and dead letters in one transaction; idempotent on (agent, seq)."""
        received = aware_utc(received_at or timefmt.now(), "received_at")
        self._ensure_sealed()
        return self.write(lambda conn: self._store_batch(conn, events, dead_letters, received), retry_unique=True)

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
        clashes: list[_Clash] = []

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
            if reason in (DUPLICATE_ID, SEQ_CONFLICT):
                clashes.append(_Clash(len(letters) - 1, reason, ev, detail))

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
                prior_id, prior_raw = prior
                if prior_id == ev.id and prior_raw == ev.raw:
                    result.duplicates.append(key)
                elif prior_id == ev.id:
                    # Same seq and id, other signed content: never acked-and-dropped as a copy.
                    reject(ev, SEQ_CONFLICT, f"seq {ev.seq} is already stored as event {prior_id} with other content")
                else:
                    # Same seq, another event: the agent reused a number. Keep it, never overwrite.
                    reject(ev, SEQ_CONFLICT, f"seq {ev.seq} is already stored as event {prior_id}")
                continue
            owner = owners.get(ev.id)
            if owner is not None:
                reject(ev, DUPLICATE_ID, f"event id already stored for {owner[0]} seq {owner[1]}")
                continue
            if ev.clock_offset_ms is not None and ev.clock_offset_ms not in INT64:
                reject(ev, errors.SCHEMA, "clock.offset_ms does not fit a 64-bit integer")
                continue
            occurred_at = aware_utc(ev.occurred_at, "occurred_at")
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
                stored_at=now,
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
                    **subject_columns(ev.payload),
                }
            )
            stream.head_hash = digest
            stored_ids[key] = (ev.id, ev.raw)
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
        if letters or new_seqs:
            self._seal_batch(conn, [streams[agent_id] for agent_id in sorted(new_seqs)], letters, now, result)
        for clash in clashes:
            self._raise_conflict(conn, clash, int(letters[clash.letter]["id"]), result)
        return result

    def _seal_batch(
        self,
        conn: Connection,
        advanced: list[_StreamState],
        letters: list[dict[str, Any]],
        now: datetime,
        result: BatchResult,
    ) -> None:
        """Chain and insert the dead letters, then append the checkpoint naming every head this batch moved."""
        lock_log(conn)
        heads = {s.agent_id: head_fields(s.chain_length, s.head_hash, s.max_seq, s.contiguous_seq) for s in advanced}
        fields: dict[str, Any] = {"streams": heads}
        if letters:
            last = conn.execute(
                select(_DEAD_LETTERS.c.chain_index, _DEAD_LETTERS.c.hash)
                .order_by(_DEAD_LETTERS.c.chain_index.desc())
                .limit(1)
            ).first()
            length, head = (0, ZERO_HASH) if last is None else (int(last.chain_index), str(last.hash))
            for letter in letters:
                length += 1
                letter["chain_index"] = length
                letter["prev_hash"] = head
                head = letter["hash"] = letter_hash(head, letter)
            ids = conn.execute(
                insert(_DEAD_LETTERS).returning(_DEAD_LETTERS.c.id, sort_by_parameter_order=True), letters
            ).scalars()
            for letter, letter_id in zip(letters, ids, strict=True):
                letter["id"] = letter_id
            fields["dead_letters"] = head_fields(length, head)
        result.checkpoint, result.checkpoint_hash = append_entry(conn, self.signing_key, INGEST, fields, now)
        result.heads = {s.agent_id: (s.chain_length, s.head_hash) for s in advanced}

    @staticmethod
    def _raise_conflict(conn: Connection, clash: _Clash, letter_id: int, result: BatchResult) -> None:
        """Raise (or count on the open one) the finding of a conflicting duplicate kept as a dead letter."""
        ev = clash.event
        log.warning(
            "store: %s seq %d conflicts with a stored event (%s): %s", ev.agent, ev.seq, clash.kind, clash.detail
        )
        detail = {
            "reason": "possible tampering: the agent's key signed another event under a stored seq or id",
            "detail": clash.detail,
            "seq": ev.seq,
            "event_id": ev.id,
            "dead_letter_id": letter_id,
        }
        finding_id = note_finding(conn, clash.kind, ev.agent, ev.seq, detail)
        result.conflicts.append(Conflict(clash.kind, ev.agent, ev.seq, ev.id, letter_id, finding_id))

    @staticmethod
    def _insert_events(conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert new event rows in bulk, inside the current transaction."""
        if conn.dialect.name != "postgresql":
            # sqlite3's executemany is a tight C loop over one prepared statement; what cost time was SQLAlchemy's
            # generic per-row, per-column parameter handling around it. The values are converted here by the very
            # bind processors SQLAlchemy would apply (UTC datetimes, JSON), looked up once per dialect.
            sql, converters = _sqlite_insert(conn.dialect)
            values = operator.itemgetter(*EVENT_COLUMNS)
            params = [
                tuple([v if conv is None else conv(v) for v, conv in zip(values(row), converters, strict=True)])
                for row in rows
            ]
            conn.exec_driver_sql(sql, params)
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
                        [json.dumps(row[name]) if name == "payload" else row[name] for name in EVENT_COLUMNS]
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
    ) -> tuple[dict[tuple[str, int], tuple[str, bytes]], dict[str, tuple[str, int]]]:
        """Return the stored rows that share an (agent, seq) or an event id with the given events.

        By (agent, seq): the stored event id and raw bytes (a copy is a duplicate only if the bytes match).
        """
        by_pair: dict[tuple[str, int], tuple[str, bytes]] = {}
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
            found = conn.execute(
                select(_EVENTS.c.agent_id, _EVENTS.c.seq, _EVENTS.c.event_id, _EVENTS.c.raw).where(match)
            )
            for agent_id, seq, event_id, raw in found:
                by_pair[(agent_id, seq)] = (event_id, raw.encode())
                by_id[event_id] = (agent_id, seq)
        return by_pair, by_id

    # --- sequence gaps -----------------------------------------------------------------------------

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
            stream.contiguous_seq = self._contiguous_end(conn, stream.agent_id, seqs[0])

    @staticmethod
    def _contiguous_end(conn: Connection, agent_id: str, start: int) -> int:
        """Return the end of the unbroken run that starts at ``start`` (a seq of this batch, stored or accounted).

        The events table holds the stored seqs only: ``start`` itself may be a dead letter (accounted), so the
        run is checked to go on at start + 1 before the walk, which would otherwise begin at the next stored seq
        and step over a missing one (a hole right after a dead-lettered seq read as contiguous).
        """
        after = select(_EVENTS.c.seq).where(_EVENTS.c.agent_id == agent_id, _EVENTS.c.seq == start + 1)
        if conn.execute(after).first() is None:
            return start
        following = aliased(_EVENTS)
        # Walks the (agent_id, seq) index upwards and stops at the first seq without a successor.
        stmt = (
            select(_EVENTS.c.seq)
            .where(_EVENTS.c.agent_id == agent_id, _EVENTS.c.seq > start)
            .where(~exists().where(following.c.agent_id == agent_id, following.c.seq == _EVENTS.c.seq + 1))
            .order_by(_EVENTS.c.seq)
            .limit(1)
        )
        end = conn.execute(stmt).scalar()
        return start if end is None else int(end)

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
        # Collected, then written with one executemany per kind of change: with several workers sharing an agent's
        # events a batch fills hundreds of gaps, and one statement each cost a round trip each on PostgreSQL.
        resolved: list[dict[str, Any]] = []
        shrunk: list[dict[str, Any]] = []
        pieces: list[dict[str, Any]] = []
        for finding_id, first, last, detail in candidates:
            inside = late[bisect.bisect_left(late, first) : bisect.bisect_right(late, last)]
            if not inside:
                continue
            detail = dict(detail or {})
            detail["filled"] = int(detail.get("filled", 0)) + len(inside)
            remaining = _missing_ranges(first, last, inside)
            if not remaining:
                resolved.append({"b_id": finding_id, "b_detail": detail})
                result.resolved_gaps.append(finding_id)
                continue
            # The finding keeps its id for the first remaining run; any further runs become new
            # findings pointing back at it, so one alert is not raised again for the same events.
            (keep_first, keep_last), *split = remaining
            detail.setdefault("original", [first, last])
            detail["missing"] = keep_last - keep_first + 1
            shrunk.append({"b_id": finding_id, "b_first": keep_first, "b_last": keep_last, "b_detail": detail})
            pieces.extend(
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
            )
        detail_type = _FINDINGS.c.detail.type
        if resolved:
            conn.execute(
                update(_FINDINGS)
                .where(_FINDINGS.c.id == bindparam("b_id"))
                .values(
                    detail=bindparam("b_detail", type_=detail_type),
                    resolved_at=now,
                    resolution="filled: the missing events arrived late",
                ),
                resolved,
            )
        if shrunk:
            conn.execute(
                update(_FINDINGS)
                .where(_FINDINGS.c.id == bindparam("b_id"))
                .values(
                    first_seq=bindparam("b_first"),
                    last_seq=bindparam("b_last"),
                    detail=bindparam("b_detail", type_=detail_type),
                ),
                shrunk,
            )
        if pieces:
            conn.execute(insert(_FINDINGS), pieces)

    # --- chains and reading ------------------------------------------------------------------------

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
            stmt = stmt.where(Event.occurred_at >= aware_utc(since, "since"))
        if until is not None:
            stmt = stmt.where(Event.occurred_at < aware_utc(until, "until"))
        if after_id is not None:
            stmt = stmt.where(Event.id > after_id)
        return self.read(stmt)

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
        return self.read(select(Stream).order_by(Stream.agent_id))

    def get_stream(self, agent_id: str) -> Stream | None:
        """Return the chain head and sequence progress of one agent, if it has stored anything."""
        found = self.read(select(Stream).where(Stream.agent_id == agent_id))
        return found[0] if found else None

    # --- dead letters ------------------------------------------------------------------------------

    def _dead_letter_row(self, letter: DeadLetterIn, received_at: datetime) -> dict[str, Any]:
        return {
            "received_at": received_at,
            "topic": clean_text(letter.topic, 1024) or "",
            "agent_id": clean_text(letter.agent_id, 128),
            "seq": int_or_none(letter.seq),
            "event_id": clean_text(letter.event_id, 128),
            "reason": clean_text(letter.reason, 64) or "unknown",
            "detail": clean_text(letter.detail, 4000) or "",
            "payload": redact_payload(letter.raw),
            "payload_mac": letter_mac(self.signing_key, letter.raw),
            "size": len(letter.raw),
        }

    def list_dead_letters(self, limit: int = 100, after_id: int | None = None) -> list[DeadLetter]:
        """Return dead letters in id order, paged with after_id."""
        stmt = select(DeadLetter).order_by(DeadLetter.id).limit(limit)
        if after_id is not None:
            stmt = stmt.where(DeadLetter.id > after_id)
        return self.read(stmt)
