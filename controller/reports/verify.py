""" "Do the hash chains behind these rows verify?": a cheap answer per page, a full one in the background.

A register page shows rows of a few agents. For each of them this walks what `records verify` walks for
one agent — the controller-signed checkpoint log, the agent's signed key history, its event chain held
against the newest signed head — with the same checks (the store's chain and checkpoint helpers), but
remembers how far it got: the log entry and the chain index it verified, and the hashes there. The next
page continues from there, so a page costs the records stored since the last one, not the whole chain.

Where a walk starts: walking every chain from the start costs ~212 µs a record (an Ed25519 signature and
the schema checks each), ~35 min at 10M events, far too long for a request. So the walks run in the
background (``PointRefresher``, a periodic job of the controller), which records per chain and for the
checkpoint log how far it verified — a *verified point* (table ``verified_points``: index, hash, log entry,
when, by which process, and any problem it found), signed with the controller's signing key. Two kinds of
refresh: an *incremental* one (every ``every_s``, default 10 min) continues each chain from its trusted
point to the head, costing only the records since; a *full* one (every ``full_every_s``, default 24 h)
walks every chain from the start, which is what finds an edit inside an already verified prefix. A chain
without a trusted point gets a walk from the start in either. A point says which walk wrote it and when
the last walk from the start behind it was (kept, signed, in its ``state`` JSON: ``walk``, ``full_at``).
The full walk pauses between batches and agents so that ingest and pages in the same process keep their
share of the interpreter.

A worker's first page (and every ``full_every`` after) starts from the persisted point instead of the
start: it trusts a point whose signature verifies under the controller's key and whose record at that
index (and log entry) still has the recorded hash, and walks the records after it. A database writer
without the controller's key cannot forge or advance a point; a row edited inside the verified prefix is
found by the next full walk from the start (the point then carries the problem and pages say broken; an
incremental refresh does not look behind the point, so it does not see it) and at once by `records
verify`, which always walks from the start. Without a usable point (none yet, bad signature,
the record at the point changed) the page walks from the start as before. The page says which it did:
"verified up to <time> by full walk, incremental since" (``ChainStatus.since``), or, when a point was
extended by an incremental refresh, "full walk from the start at <time>, extended at <time>, incremental
since" (``ChainStatus.full_at``).

Records that are not in a hash chain (media loans, the projected door registers themselves, which are
rebuilt from the events) are said to be so, not claimed verified.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Table, delete, insert, select

from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.reports.filters import JST
from sekisho.controller.store.chain import (  # the same record checks `records verify` makes
    SignedHead,
    _against_signed,
    _check_record,
    _check_signed,
)
from sekisho.controller.store.checkpoints import (  # the same entry checks `records verify` makes
    GENESIS,
    LogState,
    _entry_problem,
    _fold,
)
from sekisho.controller.store.models import ZERO_HASH, Checkpoint, Event, Stream, VerifiedPoint
from sekisho.controller.store.store import Store
from sekisho.controller.store.verification import KEY_GRACE, read_key_histories
from sekisho.protocol import errors, signing, timefmt

log = logging.getLogger(__name__)

_CHECKPOINTS = cast(Table, Checkpoint.__table__)
_EVENTS = cast(Table, Event.__table__)
_STREAMS = cast(Table, Stream.__table__)
_POINTS = cast(Table, VerifiedPoint.__table__)
_BATCH = 1000
# What the controller signs a verified point as (protocol.signing's kind): never a checkpoint or key line.
POINT_KIND = "verified_point"
LOG_CHAIN = "checkpoints"
# Between batches of a background walk: give ingest and the pages (same process, same GIL) their turn.
PAUSE_S = 0.01

State = Literal["verified", "broken", "empty", "not_chained"]
# How a verified point was written: from the chain's start, or on from its previous trusted point.
Walk = Literal["full", "incremental"]


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """The answer printed on a page or an export: verified, broken (with the problems), or nothing to check.

    since: when the oldest verified point this answer started from was written (the records after it were
    checked now); None when every chain was walked from its start in this process.
    full_at: when set, a point used was extended by an incremental refresh, and this is the oldest walk from
    the start behind the points used; None when every point used was written by a walk from the start.
    """

    state: State
    agents: tuple[str, ...]
    problems: tuple[str, ...] = ()
    checkpoint: int | None = None
    checked_at: datetime | None = None
    full: bool = False
    since: datetime | None = None
    full_at: datetime | None = None

    @property
    def ok(self) -> bool:
        """Tell whether nothing wrong was found."""
        return self.state != "broken"

    def text(self, lang: str = "ja") -> str:
        """Return one line saying what was checked and what it showed, in the display language."""
        n = len(self.agents)
        at = f" #{self.checkpoint}" if self.checkpoint is not None else ""
        if self.state == "verified":
            if lang == "en":
                if self.since is None:
                    how = " (full walk)"
                elif self.full_at is not None:
                    how = (
                        f" (full walk from the start at {_local(self.full_at)}, extended at {_local(self.since)},"
                        " incremental since)"
                    )
                else:
                    how = f" (verified up to {_local(self.since)} by full walk, incremental since)"
                return f"Verified: the hash chains of {n} agent(s) behind these rows match signed checkpoint{at}{how}"
            if self.since is None:
                how = "（全件検証）"
            elif self.full_at is not None:
                how = f"（{_local(self.full_at)}に全件検証、{_local(self.since)}に差分検証で延長、以降は差分検証）"
            else:
                how = f"（{_local(self.since)}までは全件検証、以降は差分検証）"
            return f"検証済み: この記録の元となる{n}台のハッシュチェーンは署名付きチェックポイント{at}と一致{how}"
        if self.state == "broken":
            first = self.problems[0] if self.problems else ""
            if lang == "en":
                return f"NOT VERIFIED: {len(self.problems)} problem(s) in the records behind these rows: {first}"
            return f"検証失敗: この記録の元となる記録に{len(self.problems)}件の問題があります: {first}"
        if self.state == "not_chained":
            if lang == "en":
                return "Not hash-chained: these records are kept in an append-only table, not a signed chain"
            return "ハッシュチェーン対象外: この記録は追記専用の表にあり、署名付きチェーンではありません"
        if lang == "en":
            return "Nothing to verify: no rows"
        return "検証対象なし: 行がありません"


def _local(at: datetime) -> str:
    """Return a moment as the pages print times (JST, to the minute)."""
    return at.astimezone(JST).strftime("%Y-%m-%d %H:%M JST")


@dataclass
class _LogCursor:
    state: LogState
    expected: int
    prev_hash: str
    problem: str | None = None
    since: datetime | None = None
    point: _Point | None = None  # the trusted point this walk started from (None: from the start)


@dataclass
class _StreamCursor:
    walked: int
    last_hash: str
    log_entries: int
    problem: str | None
    walked_from_start_at: datetime
    fingerprint: tuple[int, str] = field(default=(0, ZERO_HASH))
    since: datetime | None = None
    point: _Point | None = None  # the trusted point this walk started from (None: from the start)


# --- verified points: what is signed, and reading them back -------------------------------------------


def _head_list(head: SignedHead | None) -> list[Any] | None:
    if head is None:
        return None
    return [head.checkpoint, head.length, head.head, head.max_seq, head.contiguous_seq]


def _head_of(value: Any) -> SignedHead | None:
    return (
        None if value is None else SignedHead(int(value[0]), int(value[1]), str(value[2]), int(value[3]), int(value[4]))
    )


def state_json(state: LogState, walk: Walk = "full", full_at: datetime | None = None) -> str:
    """Return a folded log state as the log's verified point keeps it (canonical JSON, with the walk's meta)."""
    body: dict[str, Any] = {
        "entries": state.entries,
        "head": list(state.head) if state.head else None,
        "genesis_at": timefmt.fmt(state.genesis_at) if state.genesis_at else None,
        "legacy": state.legacy,
        "streams": {agent: _head_list(head) for agent, head in state.streams.items()},
        "letters": _head_list(state.letters),
        "admin": _head_list(state.admin),
        "key_lines": {str(line): list(v) for line, v in state.key_lines.items()},
    }
    if full_at is not None:
        body.update(walk_meta(walk, full_at))
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def walk_meta(walk: Walk, full_at: datetime) -> dict[str, str]:
    """Return what a point says about the walk that wrote it (kept in its signed state JSON)."""
    return {"walk": walk, "full_at": timefmt.fmt(full_at)}


def _read_meta(state: str | None, verified_at: datetime) -> tuple[Walk, datetime]:
    """Return which walk wrote a point and when the walk from the start behind it was.

    Points without the meta were written before incremental refreshes existed, by a walk from the start.
    """
    if state is None:
        return "full", verified_at
    try:
        body = json.loads(state)
        walk, full_at = body.get("walk"), body.get("full_at")
        if walk in ("full", "incremental") and isinstance(full_at, str):
            return cast(Walk, walk), timefmt.parse(full_at)
    except (ValueError, TypeError, AttributeError):
        pass
    return "full", verified_at


def state_from_json(text: str) -> LogState:
    """Return the log state a verified point recorded (raises KeyError/TypeError/ValueError if malformed)."""
    body = json.loads(text)
    head = body["head"]
    return LogState(
        entries=int(body["entries"]),
        head=(int(head[0]), str(head[1])) if head else None,
        genesis_at=timefmt.parse(body["genesis_at"]) if body["genesis_at"] else None,
        legacy={str(k): int(v) for k, v in body["legacy"].items()},
        streams={str(k): h for k, v in body["streams"].items() if (h := _head_of(v)) is not None},
        letters=_head_of(body["letters"]),
        admin=_head_of(body["admin"]),
        key_lines={int(k): (int(v[0]), str(v[1]), int(v[2]), str(v[3])) for k, v in body["key_lines"].items()},
    )


def point_body(row: Any) -> dict[str, Any]:
    """Return what the controller signs for one verified point (every column but the signature)."""
    return {
        "kind": row.kind,
        "chain": row.chain,
        "chain_index": int(row.chain_index),
        "hash": row.hash,
        "log_entry": int(row.log_entry),
        "log_hash": row.log_hash,
        "state": row.state,
        "problem": row.problem,
        "verified_at": timefmt.fmt(row.verified_at),
        "verified_by": row.verified_by,
    }


@dataclass(frozen=True, slots=True)
class _Point:
    kind: str
    chain: str
    chain_index: int
    hash: str
    log_entry: int
    log_hash: str
    state: str | None
    problem: str | None
    verified_at: datetime
    verified_by: str
    walk: Walk = "full"
    full_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Refresh:
    """What one refresh of the verified points did, per chain (the checkpoint log under LOG_CHAIN).

    problems: what is wrong (None: verified); walked: records (log entries) checked in this refresh;
    walks: "full" (from the start) or "incremental" (on from the chain's trusted point); a chain whose point
    already records a problem is left as it is by an incremental refresh (walked 0, its problem repeated).
    """

    problems: dict[str, str | None]
    walked: dict[str, int]
    walks: dict[str, Walk]


class ChainCheck:
    """Per-agent chain verification with a resumable walk (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = timefmt.now,
        full_every: timedelta = timedelta(minutes=10),
        signatures: bool = True,
        points: bool = True,
    ) -> None:
        """Check against the store's controller key (if it has one) and the agents' signatures.

        points: start from the persisted verified points (needs the controller's key to check them).
        """
        self.store = store
        self.clock = clock
        self.full_every = full_every
        self.signatures = signatures
        key = store.signing_key.public_key() if store.signing_key is not None else None
        self._public: Ed25519PublicKey | None = key
        self._verifier = signing.Verifier(key) if key is not None else None
        self.points = points and key is not None
        self._log: _LogCursor | None = None
        self._streams: dict[str, _StreamCursor] = {}
        self._lock = threading.Lock()

    def check(self, agents: Iterable[str], *, full: bool = False) -> ChainStatus:
        """Verify the chains of these agents (full: ignore this process's cache; start at the verified points)."""
        return self._check(agents, full=full, from_start=False)

    def check_from_start(self, agents: Iterable[str]) -> ChainStatus:
        """Verify the chains of these agents walking each from its first record (what the background job does)."""
        return self._check(agents, full=True, from_start=True)

    def _check(self, agents: Iterable[str], *, full: bool, from_start: bool) -> ChainStatus:
        wanted = tuple(sorted(set(agents)))
        now = self.clock()
        if not wanted:
            return ChainStatus("empty", (), checked_at=now, full=full)
        sinces: list[datetime] = []
        points: list[_Point] = []
        with self._lock, self.store.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # One snapshot for the log, the key lines, the stream rows and the records.
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                log = self._walk_log(conn, full, from_start)
                problems: list[str] = []
                if log.problem is not None:
                    problems.append(f"checkpoints: {log.problem}")
                if log.since is not None:
                    sinces.append(log.since)
                if log.point is not None:
                    points.append(log.point)
                for agent in wanted:
                    problem = self._walk_stream(conn, agent, log, full, from_start, now)
                    if problem is not None:
                        problems.append(f"{agent}: {problem}")
                    cursor = self._streams[agent]
                    if cursor.since is not None:
                        sinces.append(cursor.since)
                    if cursor.point is not None:
                        points.append(cursor.point)
        head = log.state.head[0] if log.state.head else None
        state: State = "broken" if problems else "verified"
        # Say "extended" only if a point used was written by an incremental refresh: then the oldest walk from
        # the start behind the points is older than the points themselves.
        extended = [p.full_at for p in points if p.walk == "incremental" and p.full_at is not None]
        return ChainStatus(
            state,
            wanted,
            tuple(problems),
            head,
            now,
            full,
            min(sinces) if sinces else None,
            min(extended) if extended else None,
        )

    # --- verified points ---------------------------------------------------------------------------

    def _point(self, conn: Connection, kind: str, chain: str) -> _Point | None:
        """Return the persisted point of a chain if its signature verifies under the controller's key."""
        if not self.points or self._public is None:
            return None
        row = conn.execute(select(_POINTS).where(_POINTS.c.kind == kind, _POINTS.c.chain == chain)).first()
        if row is None:
            return None
        try:
            signing.verify(self._public, POINT_KIND, point_body(row), row.signature)
        except (errors.Rejected, ValueError, TypeError):
            log.warning("verified point of %s %s: signature does not verify; walking from the start", kind, chain)
            return None
        walk, full_at = _read_meta(row.state, row.verified_at)
        return _Point(
            row.kind,
            row.chain,
            int(row.chain_index),
            row.hash,
            int(row.log_entry),
            row.log_hash,
            row.state,
            row.problem,
            row.verified_at,
            row.verified_by,
            walk,
            full_at,
        )

    @staticmethod
    def _entry_hash(conn: Connection, number: int) -> str | None:
        if number == 0:
            return ZERO_HASH
        return conn.execute(select(_CHECKPOINTS.c.hash).where(_CHECKPOINTS.c.id == number)).scalar()

    def _log_from_point(self, conn: Connection) -> _LogCursor | None:
        point = self._point(conn, "log", LOG_CHAIN)
        if point is None or point.state is None:
            return None
        if point.problem is not None:
            return _LogCursor(LogState(), 1, ZERO_HASH, point.problem, point.verified_at, point)
        if self._entry_hash(conn, point.chain_index) != point.hash:
            return None  # the entry the point names changed: walk the log from the start, which says where
        try:
            state = state_from_json(point.state)
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        return _LogCursor(state, point.chain_index + 1, point.hash, None, point.verified_at, point)

    # --- the checkpoint log ------------------------------------------------------------------------

    def _walk_log(
        self, conn: Connection, full: bool, from_start: bool = False, pause: Callable[[], None] | None = None
    ) -> _LogCursor:
        cursor = self._log
        if from_start:
            cursor = _LogCursor(LogState(), 1, ZERO_HASH)
        elif full or cursor is None:
            cursor = self._log_from_point(conn) or _LogCursor(LogState(), 1, ZERO_HASH)
        else:
            # Continue on a copy: a walk that fails half-way must not leave a half-updated cache.
            cursor = _LogCursor(
                copy.deepcopy(cursor.state),
                cursor.expected,
                cursor.prev_hash,
                cursor.problem,
                cursor.since,
                cursor.point,
            )
        if cursor.problem is None:
            result = conn.execute(
                select(_CHECKPOINTS).where(_CHECKPOINTS.c.id >= cursor.expected).order_by(_CHECKPOINTS.c.id),
                execution_options={"yield_per": _BATCH},
            )
            try:
                for row in result:
                    problem, body = _entry_problem(row, cursor.expected, cursor.prev_hash, self._verifier)
                    if problem is None and body is not None:
                        try:
                            _fold(cursor.state, row.id, body)
                        except (KeyError, TypeError, ValueError, AttributeError, errors.Rejected):
                            problem = "checkpoint body unreadable"
                    if problem is None and row.id == 1 and row.kind != GENESIS:
                        problem = "the log does not begin with genesis: entries deleted"
                    if problem is not None:
                        cursor.problem = f"#{row.id}: {problem}"
                        break
                    cursor.state.entries += 1
                    cursor.state.head = (row.id, row.hash)
                    cursor.expected, cursor.prev_hash = cursor.expected + 1, row.hash
                    if pause is not None and cursor.expected % _BATCH == 0:
                        pause()
            finally:
                result.close()
            if cursor.problem is None and cursor.expected > 1:
                # Entries are only ever appended: the last one verified must still be the newest's ancestor.
                last = conn.execute(
                    select(_CHECKPOINTS.c.hash).where(_CHECKPOINTS.c.id == cursor.expected - 1)
                ).scalar()
                if last != cursor.prev_hash:
                    cursor.problem = f"#{cursor.expected - 1}: checkpoint replaced"
        if not from_start:
            self._log = cursor
        return cursor

    # --- one agent's chain -------------------------------------------------------------------------

    def _stream_start(self, conn: Connection, agent: str, log: _LogCursor, now: datetime) -> _StreamCursor:
        """Return where a walk of this chain starts: its trusted verified point, else its first record."""
        start = _StreamCursor(0, ZERO_HASH, 0, None, now)
        point = self._point(conn, "agent", agent)
        if point is None or point.log_entry >= log.expected:
            return start  # no point, or held against log entries this walk has not verified
        if self._entry_hash(conn, point.log_entry) != point.log_hash:
            return start
        if point.chain_index:
            found = conn.execute(
                select(_EVENTS.c.hash).where(_EVENTS.c.agent_id == agent, _EVENTS.c.chain_index == point.chain_index)
            ).scalar()
            if found != point.hash:
                return start  # the record at the point changed: the walk from the start says how
        if point.problem is not None:
            when = timefmt.fmt(point.verified_at)
            problem = f"{point.problem} ({point.walk} walk {when})"
            return _StreamCursor(point.chain_index, point.hash, 0, problem, now, since=point.verified_at, point=point)
        return _StreamCursor(point.chain_index, point.hash, 0, None, now, since=point.verified_at, point=point)

    def _walk_stream(
        self,
        conn: Connection,
        agent: str,
        log: _LogCursor,
        full: bool,
        from_start: bool,
        now: datetime,
        pause: Callable[[], None] | None = None,
    ) -> str | None:
        stream = conn.execute(select(_STREAMS).where(_STREAMS.c.agent_id == agent)).first()
        fingerprint = (0, ZERO_HASH) if stream is None else (int(stream.chain_length), str(stream.head_hash))
        cached = None if from_start else self._streams.get(agent)
        stale = cached is None or full or now - cached.walked_from_start_at >= self.full_every
        if cached is not None and not stale:
            if cached.problem is not None:
                return cached.problem
            if cached.fingerprint == fingerprint and cached.log_entries == log.state.entries:
                return None  # nothing appended to this chain or the log since the last walk
        if from_start:
            start = _StreamCursor(0, ZERO_HASH, 0, None, now)
        elif stale or cached is None:
            start = self._stream_start(conn, agent, log, now)
        else:
            start = copy.copy(cached)
        if start.problem is None:
            histories, key_problems = read_key_histories(conn, log.state, self._verifier, KEY_GRACE, agent)
            if key_problems:
                start.problem = f"{key_problems[0].table}: {key_problems[0].problem}"
            else:
                keys = histories.get(agent) if self.signatures else None
                legacy = log.state.legacy.get(agent, 0) if log.state.genesis_at is not None else None
                start.problem = self._continue(conn, agent, stream, start, legacy, keys, pause)
                if start.problem is None:
                    if self.signatures and keys is None and start.walked:
                        start.problem = "no trusted key history: signatures not checked"
                    else:
                        head = log.state.streams.get(agent)
                        found = _against_signed(agent, start.walked, start.last_hash, stream, head)
                        start.problem = None if found is None else found.problem
        start.fingerprint = fingerprint
        start.log_entries = log.state.entries
        self._streams[agent] = start
        return start.problem

    @staticmethod
    def _continue(
        conn: Connection,
        agent: str,
        stream: object,
        at: _StreamCursor,
        legacy: int | None,
        keys: object,
        pause: Callable[[], None] | None = None,
    ) -> str | None:
        e = _EVENTS.c
        query = select(_EVENTS).where(e.agent_id == agent, e.chain_index > at.walked).order_by(e.chain_index)
        result = conn.execute(query, execution_options={"yield_per": _BATCH})
        try:
            for row in result:
                problem = _check_record(row, at.walked + 1, at.last_hash, stream, legacy) or _check_signed(
                    row,
                    keys,  # type: ignore[arg-type]
                )
                if problem is not None:
                    return f"chain index {row.chain_index} (seq {row.seq}): {problem}"
                at.walked += 1
                at.last_hash = row.hash
                if pause is not None and at.walked % _BATCH == 0:
                    pause()
        finally:
            result.close()
        if stream is not None:
            length, head = stream.chain_length, stream.head_hash  # type: ignore[attr-defined]
            if at.walked < length:
                return "stream head does not match: last record(s) deleted"
            if at.last_hash != head:
                return "stream head does not match: last record replaced"
        elif at.walked > 0:
            return "stream row missing"
        return None

    # --- the background walks ----------------------------------------------------------------------

    def refresh_points(self, by: str, agents: Iterable[str] | None = None) -> dict[str, str | None]:
        """Walk the log and every chain from the start and record signed verified points; return the problems."""
        return self.refresh(by, full=True, agents=agents).problems

    def refresh(
        self,
        by: str,
        *,
        full: bool,
        agents: Iterable[str] | None = None,
        pause_s: float | None = None,
        stop: threading.Event | None = None,
    ) -> Refresh:
        """Record signed verified points: full walks every chain from the start, else each on from its point.

        Each agent in its own short transaction (a 10M-event walk must not hold one snapshot for half an hour),
        with a pause of pause_s between batches and agents (None: none) so the process's other threads run.
        A chain without a trusted point (none yet, signature refused, its record or log entry changed) is
        walked from the start in an incremental refresh too. Needs the controller's signing key: a point is
        only worth what its signature is. A set stop event ends the walk at its next pause (WalkStopped); the
        points already recorded stay, the chain in hand keeps its previous point.
        """
        signer = self.store.signing_key
        if signer is None:
            raise ValueError("verified points need the controller's signing key")

        def pause() -> None:
            # The controller's stop must not wait for a half-hour walk: the walk ends at its next pause.
            if stop is not None and stop.wait(pause_s or 0.0):
                raise WalkStopped("chain walk stopped")
            if stop is None and pause_s is not None:
                time.sleep(pause_s)

        now = self.clock()
        problems: dict[str, str | None] = {}
        walked: dict[str, int] = {}
        walks: dict[str, Walk] = {}
        with self.store.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                start = None if full else self._log_from_point(conn)
                if start is None:
                    log_cursor = self._walk_log(conn, True, from_start=True, pause=pause)
                else:
                    self._log = start
                    log_cursor = self._walk_log(conn, False, pause=pause)
                names = (
                    sorted(agents) if agents is not None else list(conn.execute(select(_STREAMS.c.agent_id)).scalars())
                )
        origin = log_cursor.point if start is not None else None
        if origin is not None and origin.problem is not None:
            # Broken before: only a walk from the start looks at it again (the full refresh).
            problems[LOG_CHAIN], walked[LOG_CHAIN], walks[LOG_CHAIN] = origin.problem, 0, "incremental"
            return Refresh(problems, walked, walks)
        walk: Walk = "full" if origin is None else "incremental"
        full_at = now if origin is None or origin.full_at is None else origin.full_at
        entry, entry_hash = (log_cursor.expected - 1, log_cursor.prev_hash)
        self._save(
            "log", LOG_CHAIN, entry, entry_hash, entry, entry_hash, state_json(log_cursor.state, walk, full_at),
            log_cursor.problem, now, by,
        )  # fmt: skip
        problems[LOG_CHAIN] = log_cursor.problem
        walked[LOG_CHAIN] = entry - (origin.chain_index if origin is not None else 0)
        walks[LOG_CHAIN] = walk
        for agent in names:
            if pause is not None:
                pause()
            with self.store.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    # The log again, on from where the first walk left it: entries appended meanwhile count.
                    logc = _LogCursor(
                        copy.deepcopy(log_cursor.state), log_cursor.expected, log_cursor.prev_hash, log_cursor.problem
                    )
                    self._log = logc
                    logc = self._walk_log(conn, False, pause=pause)
                    # from_start=full; otherwise on from the chain's trusted point (the page's rule), if any.
                    problem = self._walk_stream(conn, agent, logc, True, full, now, pause)
                    cursor = self._streams[agent]
            point = None if full else cursor.point
            if point is not None and point.problem is not None:
                problems[agent], walked[agent], walks[agent] = problem, 0, "incremental"
                continue  # broken before: left for the next walk from the start
            agent_walk: Walk = "full" if point is None else "incremental"
            agent_full_at = now if point is None or point.full_at is None else point.full_at
            head_entry = logc.expected - 1
            self._save(
                "agent", agent, cursor.walked, cursor.last_hash, head_entry, logc.prev_hash,
                json.dumps(walk_meta(agent_walk, agent_full_at), sort_keys=True), problem, now, by,
            )  # fmt: skip
            problems[agent] = problem
            walked[agent] = cursor.walked - (point.chain_index if point is not None else 0)
            walks[agent] = agent_walk
        return Refresh(problems, walked, walks)

    def _save(
        self,
        kind: str,
        chain: str,
        index: int,
        digest: str,
        log_entry: int,
        log_hash: str,
        state: str | None,
        problem: str | None,
        at: datetime,
        by: str,
    ) -> None:
        """Replace a chain's verified point with a newly signed one."""
        assert self.store.signing_key is not None
        row = _Point(kind, chain, index, digest, log_entry, log_hash, state, problem, at, by)
        values = {**point_body(row), "verified_at": at}
        values["signature"] = signing.sign(self.store.signing_key, POINT_KIND, point_body(row))
        with self.store.engine.begin() as conn:
            conn.execute(delete(_POINTS).where(_POINTS.c.kind == kind, _POINTS.c.chain == chain))
            conn.execute(insert(_POINTS).values(**values))


class WalkStopped(Exception):
    """A background chain walk was told to stop (the controller is stopping)."""


class PointRefresher(PeriodicJob):
    """The controller's background job that keeps the verified points fresh.

    Every every_s an incremental refresh (each chain on from its trusted point: only the records since);
    when the last walk from the start is full_every_s old (or there is no trusted log point), a full one.
    Several controller workers each run one; a worker skips its round when another refreshed the points
    less than half a period ago, so the cost is paid about once per period, not once per worker.
    """

    name = "chain verification"
    # One walker: workers already skip a round another refreshed recently, but two starting together
    # would both walk every chain (~35 min at 10M events for a full walk).
    leader_only = True
    every_s = 600.0

    def __init__(
        self,
        store: Store,
        by: str,
        *,
        every_s: float = 600.0,
        full_every_s: float = 24 * 3600.0,
        clock: Callable[[], datetime] = timefmt.now,
        pause_s: float | None = PAUSE_S,
    ) -> None:
        """Refresh store's points as worker by: incremental every every_s, from the start every full_every_s."""
        if every_s <= 0 or full_every_s <= 0:
            raise ValueError("every_s and full_every_s must be positive")
        self.store = store
        self.by = by
        self.every_s = every_s
        self.full_every_s = full_every_s
        self.clock = clock
        self.pause_s = pause_s
        self.last: dict[str, str | None] = {}
        self.refreshed: Refresh | None = None
        super().__init__()

    def due(self) -> Walk | None:
        """Return which refresh this round needs: None (another worker just did one), incremental, or full."""
        checker = ChainCheck(self.store, clock=self.clock)
        with self.store.engine.connect() as conn:
            point = checker._point(conn, "log", LOG_CHAIN)  # signature checked: a forged time cannot stop us
        now = self.clock()
        if point is None or point.full_at is None:
            return "full"
        if now - point.verified_at < timedelta(seconds=self.every_s / 2):
            return None
        if now - point.full_at >= timedelta(seconds=self.full_every_s):
            return "full"
        return "incremental"

    def run_once(self) -> None:
        """Refresh the points (incremental, or from the start when due), unless another worker just did."""
        walk = self.due()
        if walk is None:
            return
        checker = ChainCheck(self.store, clock=self.clock)
        try:
            self.refreshed = checker.refresh(self.by, full=walk == "full", pause_s=self.pause_s, stop=self._stop)
        except WalkStopped:
            log.info("chain verification (%s) stopped with the controller; the next start goes on", walk)
            return
        self.last = self.refreshed.problems
        log.info(
            "chain verification (%s): %d record(s) walked in %d chain(s)",
            walk,
            sum(self.refreshed.walked.values()),
            len(self.refreshed.walked),
        )
        broken = {chain: problem for chain, problem in self.last.items() if problem}
        if broken:
            log.warning("chain verification: %d chain(s) broken: %s", len(broken), broken)
