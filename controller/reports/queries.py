"""Keyset pagination over SQL: segments of one register, each an ordered query that resumes after a sort key."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, false, func, or_, select, union_all
from sqlalchemy.engine import RowMapping

from sekisho.controller.reports.directory import Directory
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.paging import Row, SortKey, check_id


@dataclass(frozen=True, slots=True)
class Context:
    """What one reading of a register runs against: the names, the filter, and the moment it began."""

    directory: Directory
    filter: Filter
    as_of: datetime

    def people(self) -> list[str] | None:
        """Return the person ids the filter narrows to (person and/or department), or None for everyone."""
        flt = self.filter
        chosen: list[str] | None = None
        if flt.person is not None:
            chosen = [flt.person]
        if flt.department is not None:
            members = self.directory.department_people(flt.department)
            chosen = members if chosen is None else [p for p in chosen if p in members]
        return chosen

    def agents(self) -> list[str] | None:
        """Return the agent ids the filter narrows to (terminal and/or agent), or None for every agent."""
        flt = self.filter
        chosen: list[str] | None = None
        if flt.terminal is not None:
            agent = self.directory.agent_of_terminal(flt.terminal)
            chosen = [agent] if agent else []
        if flt.agent is not None:
            chosen = [flt.agent] if chosen is None or flt.agent in chosen else []
        return chosen


@dataclass(frozen=True)
class Segment:
    """One ordered part of a register: a filtered select, its time and id columns, and how to make rows of it."""

    number: int
    stmt: Select[Any]
    time_col: ColumnElement[Any]
    id_col: ColumnElement[Any]
    to_row: Callable[[RowMapping], Row]
    agent_col: ColumnElement[Any] | None = None
    descending: bool = True
    rank: int = 0
    # Alternatives a row meets one of (say, the person's own events or those naming only their account). Kept out
    # of stmt: an OR of two indexed columns yields rows in no order, so the database read and sorted all of them;
    # as branches, each is read in time order through its own index and the reads are merged (see ordered).
    branches: tuple[ColumnElement[bool], ...] = ()

    def matching(self) -> Select[Any]:
        """Return the select of every row of the segment (stmt with its branches joined by OR), unordered."""
        return self.stmt.where(or_(*self.branches)) if self.branches else self.stmt


def within(col: ColumnElement[Any], flt: Filter) -> list[ColumnElement[bool]]:
    """Return the conditions putting a time column inside the filter's [since, until)."""
    found: list[ColumnElement[bool]] = []
    if flt.since is not None:
        found.append(col >= flt.since)
    if flt.until is not None:
        found.append(col < flt.until)
    return found


def among(col: ColumnElement[Any], values: Sequence[Any] | None) -> list[ColumnElement[bool]]:
    """Return the condition col IN values (None: no condition; empty: nothing matches)."""
    if values is None:
        return []
    if not values:
        return [false()]
    return [col.in_(list(values))]


def numeric_id(segment: Segment) -> bool:
    """Tell whether the segment's id column holds numbers (else text)."""
    try:
        return segment.id_col.type.python_type is int
    except NotImplementedError:
        return True


def after(segment: Segment, key: SortKey | None, limit: int | None = None) -> Select[Any]:
    """Return the segment's select ordered, resuming strictly after key (when key is of this segment)."""
    stmt = segment.stmt
    t, i = segment.time_col, segment.id_col
    if key is not None and key.segment == segment.number:
        check_id(key, numeric_id(segment))
        # The plain bound on the time column (t <= at) says nothing the OR does not, but it is one the index can
        # seek to: without it SQLite reads the filter's whole range from its start and drops the rows before the
        # cursor (page 21 of one person's month at 10M events: 100 ms of SQL instead of a few).
        if segment.descending:
            stmt = stmt.where(t <= key.at, or_(t < key.at, and_(t == key.at, i < key.id)))
        else:
            stmt = stmt.where(t >= key.at, or_(t > key.at, and_(t == key.at, i > key.id)))
    return ordered(segment, stmt, descending=segment.descending, limit=limit)


def ordered(segment: Segment, stmt: Select[Any], *, descending: bool = True, limit: int | None = None) -> Select[Any]:
    """Return stmt (the segment's, bounds added) in time and id order, at most ``limit`` rows.

    With branches, each branch is read in that order up to the limit on its own, and the reads are merged: the
    database walks each branch's index and stops, where an OR (or a UNION ALL ordered only outside) made it read
    and sort every row of both. The branches are disjoint (the caller makes them so): no row lost or repeated.
    """

    def order(t: ColumnElement[Any], i: ColumnElement[Any]) -> tuple[ColumnElement[Any], ...]:
        return (t.desc(), i.desc()) if descending else (t.asc(), i.asc())

    t, i = segment.time_col, segment.id_col
    if segment.branches:
        # Each branch a subquery of its own: SQLite takes no ORDER BY or LIMIT on a bare member of a UNION.
        reads = [stmt.where(b).order_by(*order(t, i)).limit(limit).subquery() for b in segment.branches]
        merged = union_all(*(select(*read.c) for read in reads)).subquery()
        stmt, t, i = select(*merged.c), merged.c[str(t.key)], merged.c[str(i.key)]
    return stmt.order_by(*order(t, i)).limit(limit)


def fetch(conn: Connection, segments: Sequence[Segment], key: SortKey | None, limit: int) -> tuple[list[Row], bool]:
    """Return up to limit rows after key across the segments in order, and whether more follow."""
    rows: list[Row] = []
    for segment in segments:
        if key is not None and segment.number < key.segment:
            continue
        want = limit + 1 - len(rows)
        for found in conn.execute(after(segment, key, want)).mappings():
            rows.append(segment.to_row(found))
        if len(rows) > limit:
            break
    return rows[:limit], len(rows) > limit


def every(connect: Callable[[], Any], segments: Sequence[Segment], key: SortKey | None, chunk: int) -> Iterator[Row]:
    """Yield every row after key, chunk by chunk (a fresh short read each chunk: memory stays flat)."""
    while True:
        with connect() as conn:
            rows, more = fetch(conn, segments, key, chunk)
        yield from rows
        if not more or not rows:
            return
        key = rows[-1].key


def agents_behind(conn: Connection, segments: Sequence[Segment]) -> set[str]:
    """Return the distinct agents whose records the segments' rows come from (for an export's verification)."""
    found: set[str] = set()
    for segment in segments:
        if segment.agent_col is None:
            continue
        sub = segment.matching().with_only_columns(segment.agent_col.label("agent")).distinct()
        found.update(a for a in conn.execute(select(sub.subquery().c.agent)).scalars() if a)
    return found


def count_rows(conn: Connection, segment: Segment) -> int:
    """Return how many rows a segment has (printed at the top of an export)."""
    return int(conn.execute(select(func.count()).select_from(segment.matching().subquery())).scalar_one())
