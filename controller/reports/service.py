"""The reports service: the one set of functions the console pages, the JSON API and the CLI call.

``Reports(store)`` reads registers and timelines a page at a time (keyset cursors, names resolved,
"do the chains behind these rows verify"), or all rows as a stream for the exports, and keeps the muster
list's ticks. It holds only caches (the policy names, the chain walk), so one instance per process serves
every request, and several processes may run side by side.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import inspect

from sekisho.controller.reports import muster as muster_list
from sekisho.controller.reports.directory import Directory
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.paging import (
    Cursor,
    Row,
    SortKey,
    Spec,
    check_limit,
    decode_cursor,
    encode_cursor,
)
from sekisho.controller.reports.queries import Context, Segment, agents_behind, count_rows, every, fetch
from sekisho.controller.reports.registers import REGISTERS
from sekisho.controller.reports.timelines import Subject, merge_every, merge_fetch, sources, timeline_spec
from sekisho.controller.reports.verify import ChainCheck, ChainStatus
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt


class UnknownRegister(LookupError):
    """A register name that is not one of REGISTERS."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a register or timeline: rows, the cursor of the next page, and the chains' verification."""

    spec: Spec
    filter: Filter
    rows: list[Row]
    next_cursor: str | None
    as_of: datetime
    verification: ChainStatus


@dataclass(frozen=True, slots=True)
class Reading:
    """Everything an export streams: the spec, the filter, the rows (lazily) and the verification printed."""

    spec: Spec
    filter: Filter
    rows: Iterator[Row]
    as_of: datetime
    verification: ChainStatus
    directory: Directory
    count: int


class Reports:
    """Registers, timelines, muster list and the rows behind exports, over one store."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = timefmt.now,
        chains: ChainCheck | None = None,
    ) -> None:
        """Read this store; clock gives "now" (the as-of moment of a first page and the JST presets)."""
        self.store = store
        self.clock = clock
        self.chains = chains or ChainCheck(store, clock=clock)
        self._directory: Directory | None = None
        self._admin_table: bool | None = None
        self._lock = threading.Lock()

    # --- names -------------------------------------------------------------------------------------

    def directory(self) -> Directory:
        """Return the names of the policy in force (re-read when a new version is stored)."""
        newest = Directory.newest_version(self.store)
        with self._lock:
            if self._directory is None or self._directory.version != newest:
                self._directory = Directory.load(self.store)
            return self._directory

    def has_admin_trail(self) -> bool:
        """Tell whether the database has the admin audit trail table (built by controller/store/audit.py)."""
        if not self._admin_table:
            self._admin_table = inspect(self.store.engine).has_table("admin_audit")
        return bool(self._admin_table)

    # --- registers ---------------------------------------------------------------------------------

    def _start(self, cursor: str | None) -> tuple[SortKey | None, datetime]:
        if cursor is None:
            return None, self.clock()
        decoded = decode_cursor(cursor)
        return decoded.after, decoded.as_of

    def _register(self, name: str) -> Any:
        found = REGISTERS.get(name)
        if found is None:
            raise UnknownRegister(f"台帳 {name!r} はありません / no register {name!r} ({', '.join(REGISTERS)})")
        return found

    def page(self, name: str, flt: Filter, *, cursor: str | None = None, limit: int = 50) -> Page:
        """Return one page of a register, newest first (the key register: overdue, out, then returned)."""
        register = self._register(name)
        check_limit(limit)
        key, as_of = self._start(cursor)
        ctx = Context(self.directory(), flt, as_of)
        with self.store.engine.connect() as conn:
            rows, more = fetch(conn, register.segments(ctx), key, limit)
        return self._page(register.spec, flt, rows, more, as_of, register.chained)

    def reading(self, name: str, flt: Filter, *, chunk: int = 1000) -> Reading:
        """Return every row of a register for an export, streamed in keyset chunks, with a full verification."""
        register = self._register(name)
        as_of = self.clock()
        ctx = Context(self.directory(), flt, as_of)
        segments = register.segments(ctx)
        verification = self._full_verification(segments, register.chained, as_of)
        count = self._count(segments)
        rows = every(self.store.engine.connect, segments, None, chunk)
        return Reading(register.spec, flt, rows, as_of, verification, ctx.directory, count)

    # --- timelines ---------------------------------------------------------------------------------

    def _subject_title(self, subject: Subject) -> str:
        d = self.directory()
        if subject.kind == "person":
            return d.describe_person(subject.id)
        ref = {"door": d.door, "area": d.area, "terminal": d.terminal}[subject.kind](subject.id)
        return ref.text() if ref else subject.id

    def timeline(self, subject: Subject, flt: Filter, *, cursor: str | None = None, limit: int = 50) -> Page:
        """Return one page of a person's, door's, area's or terminal's timeline, newest first."""
        check_limit(limit)
        key, as_of = self._start(cursor)
        ctx = Context(self.directory(), flt, as_of)
        spec = timeline_spec(subject, self._subject_title(subject))
        with self.store.engine.connect() as conn:
            rows, more = merge_fetch(conn, sources(ctx, subject, admin=self.has_admin_trail()), key, limit)
        return self._page(spec, flt, rows, more, as_of, True)

    def timeline_reading(self, subject: Subject, flt: Filter, *, chunk: int = 1000) -> Reading:
        """Return every row of a timeline for an export, streamed, with a full verification."""
        as_of = self.clock()
        ctx = Context(self.directory(), flt, as_of)
        segments = sources(ctx, subject, admin=self.has_admin_trail())
        verification = self._full_verification(segments, True, as_of)
        spec = timeline_spec(subject, self._subject_title(subject))
        count = self._count(segments)
        rows = merge_every(self.store.engine.connect, segments, None, chunk)
        return Reading(spec, flt, rows, as_of, verification, ctx.directory, count)

    # --- muster list -------------------------------------------------------------------------------

    def muster(self, area: str | None = None) -> list[muster_list.AreaMuster]:
        """Return who is inside each area now, with the safe ticks."""
        return muster_list.muster(self.store, self.directory(), area)

    def muster_page(self, area: str | None = None) -> tuple[list[muster_list.AreaMuster], ChainStatus]:
        """Return the muster list and whether the chains behind it verify."""
        areas = self.muster(area)
        agents = {line.agent for a in areas for line in a.lines if line.agent}
        return areas, self.chains.check(agents)

    def muster_reading(self, area: str | None = None) -> Reading:
        """Return the muster list as export rows (with a full verification)."""
        as_of = self.clock()
        areas = self.muster(area)
        rows = [line.as_row() for a in areas for line in a.lines]
        agents = {agent for row in rows for agent in row.agents}
        verification = self.chains.check(agents, full=True)
        flt = Filter(area=area)
        directory = self.directory()
        return Reading(muster_list.MUSTER_SPEC, flt, iter(rows), as_of, verification, directory, len(rows))

    def mark_safe(self, area: str, person: str, *, by: str, on_change: Any = None) -> datetime | None:
        """Tick a person inside an area as confirmed safe (for their current stay)."""
        return muster_list.mark_safe(self.store, area, person, by=by, at=self.clock(), on_change=on_change)

    def clear_safe(self, area: str, person: str | None = None, *, on_change: Any = None) -> int:
        """Remove one tick, or every tick of an area."""
        return muster_list.clear_safe(self.store, area, person, on_change=on_change)

    # --- helpers -----------------------------------------------------------------------------------

    def _page(self, spec: Spec, flt: Filter, rows: list[Row], more: bool, as_of: datetime, chained: bool) -> Page:
        next_cursor = encode_cursor(Cursor(rows[-1].key, as_of)) if more and rows else None
        if not chained:
            verification = ChainStatus("not_chained", (), checked_at=self.clock())
        else:
            verification = self.chains.check({a for row in rows for a in row.agents})
        return Page(spec, flt, rows, next_cursor, as_of, verification)

    def _count(self, segments: Sequence[Segment]) -> int:
        with self.store.engine.connect() as conn:
            return sum(count_rows(conn, segment) for segment in segments)

    def _full_verification(self, segments: Sequence[Segment], chained: bool, as_of: datetime) -> ChainStatus:
        if not chained:
            return ChainStatus("not_chained", (), checked_at=as_of)
        with self.store.engine.connect() as conn:
            agents = agents_behind(conn, segments)
        return self.chains.check(agents, full=True)
