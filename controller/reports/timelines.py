"""Timelines: one person's (or door's, area's, terminal's) day or period across every record kind, by time.

Each source (door log, keys taken, keys returned, login and USB events, media-loan log, admin trail) is
an ordered query over its own indexed table; a page asks each for the next rows after the cursor and
merges them newest first. Rows of the same moment are ordered by source rank, then id, so the order is
total and a cursor (time, rank, id) resumes exactly where the last page stopped.

Visits appear through the door log: a visitor's grant names its escort, so the escort's timeline shows it.
Admin changes come from the admin audit trail (``admin_audit``) when the database has it; a change counts
for a subject when its target is the subject's id or ends in ``:<id>`` (``person:p-0001``, ``door:room-hr``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from sqlalchemy import Column as SAColumn
from sqlalchemy import ColumnElement, Connection, MetaData, String, Table, Text, and_, false, or_, select
from sqlalchemy.engine import RowMapping

from sekisho.controller.reports.labels import CATEGORIES, both, event_label
from sekisho.controller.reports.paging import Column, Ref, Row, SortKey, Spec, Value, check_id
from sekisho.controller.reports.queries import Context, Segment, among, ordered, within
from sekisho.controller.reports.registers import (
    DOOR_LOG,
    EVENTS,
    KEY_LOANS,
    LOGIN_TYPES,
    USB_TYPES,
    door_conditions,
    door_row,
    event_conditions,
    event_row,
)
from sekisho.controller.store.models import BigId, LoanLogEntry, UTCDateTime

MEDIA_LOG = cast(Table, LoanLogEntry.__table__)

# A light description of the admin trail's table (its model belongs to controller/store/audit.py): only the
# columns a timeline reads, so this module works with or without that table in the database.
ADMIN_AUDIT = Table(
    "admin_audit",
    MetaData(),
    SAColumn("id", BigId, primary_key=True),
    SAColumn("at", UTCDateTime),
    SAColumn("actor", String(200)),
    SAColumn("via", String(8)),
    SAColumn("action", String(64)),
    SAColumn("target", Text),
)

SubjectKind = Literal["person", "door", "area", "terminal"]

TIMELINE_SPEC = Spec(
    "timeline",
    "タイムライン",
    "Timeline",
    (
        Column("at", "日時", "time", "time"),
        Column("category", "区分", "kind"),
        Column("event", "内容", "event"),
        Column("person", "人", "person", "ref"),
        Column("place", "場所・端末", "place / terminal", "ref"),
        Column("detail", "詳細", "detail"),
    ),
)
SUBJECT_TITLES: dict[SubjectKind, tuple[str, str]] = {
    "person": ("個人のタイムライン", "Person timeline"),
    "door": ("扉のタイムライン", "Door timeline"),
    "area": ("区域のタイムライン", "Area timeline"),
    "terminal": ("端末のタイムライン", "Terminal timeline"),
}

# Source ranks: the order of rows that share a moment.
R_DOOR, R_TAKEN, R_RETURNED, R_LOGIN, R_USB, R_MEDIA, R_ADMIN = range(7)


@dataclass(frozen=True, slots=True)
class Subject:
    """Whose timeline: a person, door, area or terminal, by policy id."""

    kind: SubjectKind
    id: str


def timeline_spec(subject: Subject, title: str) -> Spec:
    """Return the spec of a subject's timeline, titled with the subject's name."""
    ja, en = SUBJECT_TITLES[subject.kind]
    return Spec(f"timeline.{subject.kind}", f"{ja}: {title}", f"{en}: {title}", TIMELINE_SPEC.columns)


def _category(kind: str) -> str:
    return both(CATEGORIES.get(kind, (kind, kind)))


def _wrap(make: Callable[[RowMapping], Row], shape: Callable[[Row], dict[str, Value]]) -> Callable[[RowMapping], Row]:
    def wrapped(r: RowMapping) -> Row:
        row = make(r)
        return Row(row.key, shape(row), row.agents, row.kind, row.flags)

    return wrapped


def _from_door(row: Row) -> dict[str, Value]:
    v = row.values
    direction = v.get("direction")
    event = f"{v['event']}（{direction}）" if direction else v["event"]
    escort = v.get("escort")
    parts = [v.get("detail"), f"付添 / escort: {escort.text()}" if isinstance(escort, Ref) else None]
    detail = "; ".join(str(x) for x in parts if x)
    return {
        "at": v["occurred_at"],
        "category": _category(row.kind),
        "event": event,
        "person": v["person"],
        "place": v["door"],
        "detail": detail or None,
    }


def _from_event(row: Row) -> dict[str, Value]:
    v = row.values
    extra = [v.get("device"), v.get("serial"), v.get("methods"), v.get("detail")]
    medium = v.get("medium")
    if isinstance(medium, Ref):
        extra.insert(0, f"媒体 / medium: {medium.text()}")
    return {
        "at": v["occurred_at"],
        "category": _category(row.kind),
        "event": v["event"],
        "person": v["person"],
        "place": v["terminal"],
        "detail": "; ".join(str(x) for x in extra if x) or None,
    }


def _key_source(ctx: Context, rank: int, where: list[ColumnElement[bool]]) -> Segment:
    k = KEY_LOANS.c
    taken = rank == R_TAKEN
    time_col = k.taken_at if taken else k.returned_at
    d = ctx.directory

    def make(r: RowMapping) -> Row:
        key = d.key(r["cabinet"], r["key"])
        who = r["person"] if taken else r["returned_by"]
        notes = []
        if not taken and r["wrong_slot"]:
            notes.append(f"別スロットへ返却（スロット{r['returned_slot']}） / wrong slot {r['returned_slot']}")
        elif not taken and r["returned_by"] and r["person"] and r["returned_by"] != r["person"]:
            notes.append("代理返却（正しいスロット） / returned to its slot by a colleague")
        if taken and r["due_at"] is not None:
            notes.append(f"返却予定 / due {r['due_at'].isoformat(timespec='minutes')}")
        values: dict[str, Value] = {
            "at": r["taken_at"] if taken else r["returned_at"],
            "category": _category("key"),
            "event": f"{event_label('key.taken' if taken else 'key.returned')}: {key.text()}",
            "person": d.person(who),
            "place": d.door(r["cabinet"]),
            "detail": "; ".join(notes) or None,
        }
        flags = ("wrong_slot",) if not taken and r["wrong_slot"] else ()
        return Row(SortKey(0, values["at"], rank, int(r["id"])), values, (r["agent_id"],), "key", flags)  # type: ignore[arg-type]

    stmt = select(KEY_LOANS).where(time_col.is_not(None), *where, *within(time_col, ctx.filter))
    return Segment(0, stmt, time_col, k.id, make, k.agent_id, rank=rank)


def _media_source(ctx: Context, where: list[ColumnElement[bool]]) -> Segment:
    m = MEDIA_LOG.c
    d = ctx.directory

    def make(r: RowMapping) -> Row:
        values: dict[str, Value] = {
            "at": r["at"],
            "category": _category("media"),
            "event": f"{event_label('media.' + r['action'])}: {(d.medium(r['medium']) or r['medium'])}",
            "person": d.person(r["person"]),
            "place": None,
            "detail": f"操作者 / by {r['actor']}; 貸出 / loan {r['loan_id']}",
        }
        medium = d.medium(r["medium"])
        if medium is not None:
            values["event"] = f"{event_label('media.' + r['action'])}: {medium.text()}"
        return Row(SortKey(0, r["at"], R_MEDIA, int(r["id"])), values, (), "media")

    stmt = select(MEDIA_LOG).where(*where, *within(m.at, ctx.filter))
    return Segment(0, stmt, m.at, m.id, make, None, rank=R_MEDIA)


def _admin_source(ctx: Context, ident: str) -> Segment:
    a = ADMIN_AUDIT.c

    def make(r: RowMapping) -> Row:
        values: dict[str, Value] = {
            "at": r["at"],
            "category": _category("admin"),
            "event": str(r["action"]),
            "person": None,
            "place": None,
            "detail": f"{r['actor']} ({r['via']}) → {r['target']}",
        }
        return Row(SortKey(0, r["at"], R_ADMIN, int(r["id"])), values, (), "admin")

    target = or_(a.target == ident, a.target.endswith(f":{ident}", autoescape=True))
    stmt = select(ADMIN_AUDIT).where(target, *within(a.at, ctx.filter))
    return Segment(0, stmt, a.at, a.id, make, None, rank=R_ADMIN)


def sources(ctx: Context, subject: Subject, *, admin: bool) -> list[Segment]:
    """Return the ordered sources of a subject's timeline (the filter's period and types applied)."""
    k = KEY_LOANS.c
    out: list[Segment] = []
    door_ctx = Context(
        ctx.directory, ctx.filter.narrowed(person=None, department=None, door=None, area=None), ctx.as_of
    )
    door_where = door_conditions(door_ctx)
    g = DOOR_LOG.c
    wanted = ctx.filter.types
    if subject.kind == "person":
        p = subject.id
        door_where.append(or_(g.person == p, g.second_person == p, g.escort == p))
        key_taken = [k.person == p]
        key_returned = [k.returned_by == p]
    elif subject.kind == "door":
        door_where.append(g.door == subject.id)
        key_taken = key_returned = [k.cabinet == subject.id]
    elif subject.kind == "area":
        door_where.append(g.area == subject.id)
        cabinets = [d.id for d in ctx.directory.doors.values() if d.area == subject.id and d.kind == "key_cabinet"]
        key_taken = key_returned = among(k.cabinet, cabinets)
    else:
        key_taken = key_returned = [false()]
    if subject.kind != "terminal":
        door_make = _wrap(door_row(ctx, rank=R_DOOR), _from_door)
        stmt = select(DOOR_LOG).where(*door_where)
        out.append(Segment(0, stmt, g.occurred_at, g.id, door_make, g.agent_id, rank=R_DOOR))
        if not wanted or "key.taken" in wanted:
            out.append(_key_source(ctx, R_TAKEN, key_taken))
        if not wanted or "key.returned" in wanted:
            out.append(_key_source(ctx, R_RETURNED, key_returned))
    if subject.kind in ("person", "terminal"):
        if subject.kind == "person":
            ev_ctx = Context(ctx.directory, ctx.filter.narrowed(person=subject.id, department=None), ctx.as_of)
        else:
            ev_ctx = Context(
                ctx.directory, ctx.filter.narrowed(person=None, department=None, terminal=subject.id), ctx.as_of
            )
        e = EVENTS.c
        cols = (e.id, e.agent_id, e.type, e.occurred_at, e.payload)
        for rank, types in ((R_LOGIN, LOGIN_TYPES), (R_USB, USB_TYPES)):
            where, branches = event_conditions(ev_ctx, types)
            make = _wrap(event_row(ev_ctx, rank=rank), _from_event)
            stmt = select(*cols).where(*where)
            out.append(Segment(0, stmt, e.occurred_at, e.id, make, e.agent_id, rank=rank, branches=branches))
    if subject.kind == "person" and (not wanted or any(t.startswith("media.") for t in wanted)):
        out.append(_media_source(ctx, [MEDIA_LOG.c.person == subject.id]))
    if admin and (not wanted or "admin" in wanted):
        out.append(_admin_source(ctx, subject.id))
    return out


def _after_for(segment: Segment, key: SortKey | None, limit: int | None = None) -> Any:
    """Return the segment's select resuming after a merged cursor (time desc, rank asc, id desc)."""
    stmt = segment.stmt
    t, i = segment.time_col, segment.id_col
    if key is not None:
        check_id(key, True)
        if segment.rank > key.rank:
            stmt = stmt.where(t <= key.at)
        elif segment.rank == key.rank:
            # t <= at is implied by the OR but seekable (see queries.after).
            stmt = stmt.where(t <= key.at, or_(t < key.at, and_(t == key.at, i < key.id)))
        else:
            stmt = stmt.where(t < key.at)
    return ordered(segment, stmt, limit=limit)


def _order(row: Row) -> tuple[float, int, int]:
    at = row.key.at
    return (-(at.timestamp() if at else 0.0), row.key.rank, -int(row.key.id))


def merge_fetch(
    conn: Connection, segments: Sequence[Segment], key: SortKey | None, limit: int
) -> tuple[list[Row], bool]:
    """Return the next limit rows of the merged sources after key, and whether more follow."""
    rows: list[Row] = []
    for segment in segments:
        rows.extend(segment.to_row(r) for r in conn.execute(_after_for(segment, key, limit + 1)).mappings())
    rows.sort(key=_order)
    return rows[:limit], len(rows) > limit


def merge_every(
    connect: Callable[[], Any], segments: Sequence[Segment], key: SortKey | None, chunk: int
) -> Iterator[Row]:
    """Yield every merged row after key, chunk by chunk (memory bounded by chunk × sources)."""
    while True:
        with connect() as conn:
            rows, more = merge_fetch(conn, segments, key, chunk)
        yield from rows
        if not more or not rows:
            return
        key = rows[-1].key
