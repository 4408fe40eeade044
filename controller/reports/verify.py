""" "Do the hash chains behind these rows verify?": a cheap answer per page, a full one per export.

A register page shows rows of a few agents. For each of them this walks what `records verify` walks for
one agent — the controller-signed checkpoint log, the agent's signed key history, its event chain held
against the newest signed head — with the same checks (the store's chain and checkpoint helpers), but
remembers how far it got: the log entry and the chain index it verified, and the hashes there. The next
page continues from there, so a page costs the records stored since the last one, not the whole chain.
A cached prefix is walked again from the start every ``full_every`` (and always for an export, which
prints the result): a row edited inside an already verified prefix is found then, and by `records verify`.

The cache lives in this process only (nothing another worker needs): a second worker does its own walks.
Records that are not in a hash chain (media loans, the projected door registers themselves, which are
rebuilt from the events) are said to be so, not claimed verified.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, cast

from sqlalchemy import Connection, Table, select

from sekisho.controller.store.chain import (  # the same record checks `records verify` makes
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
from sekisho.controller.store.models import ZERO_HASH, Checkpoint, Event, Stream
from sekisho.controller.store.store import Store
from sekisho.controller.store.verification import KEY_GRACE, read_key_histories
from sekisho.protocol import errors, signing, timefmt

_CHECKPOINTS = cast(Table, Checkpoint.__table__)
_EVENTS = cast(Table, Event.__table__)
_STREAMS = cast(Table, Stream.__table__)
_BATCH = 1000

State = Literal["verified", "broken", "empty", "not_chained"]


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """The answer printed on a page or an export: verified, broken (with the problems), or nothing to check."""

    state: State
    agents: tuple[str, ...]
    problems: tuple[str, ...] = ()
    checkpoint: int | None = None
    checked_at: datetime | None = None
    full: bool = False

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
                return f"Verified: the hash chains of {n} agent(s) behind these rows match signed checkpoint{at}"
            return f"検証済み: この記録の元となる{n}台のハッシュチェーンは署名付きチェックポイント{at}と一致"
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


@dataclass
class _LogCursor:
    state: LogState
    expected: int
    prev_hash: str
    problem: str | None = None


@dataclass
class _StreamCursor:
    walked: int
    last_hash: str
    log_entries: int
    problem: str | None
    walked_from_start_at: datetime
    fingerprint: tuple[int, str] = field(default=(0, ZERO_HASH))


class ChainCheck:
    """Per-agent chain verification with a resumable walk (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = timefmt.now,
        full_every: timedelta = timedelta(minutes=10),
        signatures: bool = True,
    ) -> None:
        """Check against the store's controller key (if it has one) and the agents' signatures."""
        self.store = store
        self.clock = clock
        self.full_every = full_every
        self.signatures = signatures
        key = store.signing_key.public_key() if store.signing_key is not None else None
        self._verifier = signing.Verifier(key) if key is not None else None
        self._log: _LogCursor | None = None
        self._streams: dict[str, _StreamCursor] = {}
        self._lock = threading.Lock()

    def check(self, agents: Iterable[str], *, full: bool = False) -> ChainStatus:
        """Verify the chains of these agents (full: from their first record, ignoring what is cached)."""
        wanted = tuple(sorted(set(agents)))
        now = self.clock()
        if not wanted:
            return ChainStatus("empty", (), checked_at=now, full=full)
        with self._lock, self.store.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # One snapshot for the log, the key lines, the stream rows and the records.
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                log = self._walk_log(conn, full)
                problems: list[str] = []
                if log.problem is not None:
                    problems.append(f"checkpoints: {log.problem}")
                for agent in wanted:
                    problem = self._walk_stream(conn, agent, log, full, now)
                    if problem is not None:
                        problems.append(f"{agent}: {problem}")
        head = log.state.head[0] if log.state.head else None
        state: State = "broken" if problems else "verified"
        return ChainStatus(state, wanted, tuple(problems), head, now, full)

    # --- the checkpoint log ------------------------------------------------------------------------

    def _walk_log(self, conn: Connection, full: bool) -> _LogCursor:
        cursor = self._log
        if full or cursor is None:
            cursor = _LogCursor(LogState(), 1, ZERO_HASH)
        else:
            # Continue on a copy: a walk that fails half-way must not leave a half-updated cache.
            cursor = _LogCursor(copy.deepcopy(cursor.state), cursor.expected, cursor.prev_hash, cursor.problem)
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
            finally:
                result.close()
            if cursor.problem is None and cursor.expected > 1:
                # Entries are only ever appended: the last one verified must still be the newest's ancestor.
                last = conn.execute(
                    select(_CHECKPOINTS.c.hash).where(_CHECKPOINTS.c.id == cursor.expected - 1)
                ).scalar()
                if last != cursor.prev_hash:
                    cursor.problem = f"#{cursor.expected - 1}: checkpoint replaced"
        self._log = cursor
        return cursor

    # --- one agent's chain -------------------------------------------------------------------------

    def _walk_stream(self, conn: Connection, agent: str, log: _LogCursor, full: bool, now: datetime) -> str | None:
        stream = conn.execute(select(_STREAMS).where(_STREAMS.c.agent_id == agent)).first()
        fingerprint = (0, ZERO_HASH) if stream is None else (int(stream.chain_length), str(stream.head_hash))
        cached = self._streams.get(agent)
        stale = cached is None or full or now - cached.walked_from_start_at >= self.full_every
        if cached is not None and not stale:
            if cached.problem is not None:
                return cached.problem
            if cached.fingerprint == fingerprint and cached.log_entries == log.state.entries:
                return None  # nothing appended to this chain or the log since the last walk
        start = _StreamCursor(0, ZERO_HASH, 0, None, now) if stale or cached is None else copy.copy(cached)
        histories, key_problems = read_key_histories(conn, log.state, self._verifier, KEY_GRACE, agent)
        if key_problems:
            start.problem = f"{key_problems[0].table}: {key_problems[0].problem}"
        else:
            keys = histories.get(agent) if self.signatures else None
            legacy = log.state.legacy.get(agent, 0) if log.state.genesis_at is not None else None
            start.problem = self._continue(conn, agent, stream, start, legacy, keys)
            if start.problem is None:
                if self.signatures and keys is None and start.walked:
                    start.problem = "no trusted key history: signatures not checked"
                else:
                    found = _against_signed(agent, start.walked, start.last_hash, stream, log.state.streams.get(agent))
                    start.problem = None if found is None else found.problem
        start.fingerprint = fingerprint
        start.log_entries = log.state.entries
        self._streams[agent] = start
        return start.problem

    @staticmethod
    def _continue(
        conn: Connection, agent: str, stream: object, at: _StreamCursor, legacy: int | None, keys: object
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
