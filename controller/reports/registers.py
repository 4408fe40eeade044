"""The registers the PPC inspects, as filtered, keyset-paginated queries with names instead of ids.

Each register is a list of segments (queries.py) over the tables the door projection, ingest and the media
register keep: the key-lending register (鍵貸出管理簿), the locker log, the room entry/exit log
(入退室記録簿), the visitor log with escorts, login history, the USB device log and the media loans.
Who is inside each area now (the muster list) is in muster.py: it is never paginated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, and_, func, not_, or_, select
from sqlalchemy.engine import RowMapping

from sekisho.controller.reports.labels import DIRECTIONS, LOAN_STATES, both, event_label
from sekisho.controller.reports.paging import Column, Ref, Row, SortKey, Spec, Value
from sekisho.controller.reports.queries import Context, Segment, among, within
from sekisho.controller.store.models import DoorLogEntry, Event, KeyLoan, LoanRecord, Visit

KEY_LOANS = cast(Table, KeyLoan.__table__)
DOOR_LOG = cast(Table, DoorLogEntry.__table__)
VISITS = cast(Table, Visit.__table__)
EVENTS = cast(Table, Event.__table__)
MEDIA_LOANS = cast(Table, LoanRecord.__table__)

LOGIN_TYPES = (
    "login.granted",
    "login.denied",
    "session.locked",
    "session.unlocked",
    "session.ended",
    "session.lock_failed",
)
USB_TYPES = (
    "usb.inserted",
    "usb.allowed",
    "usb.blocked",
    "usb.rejected",
    "usb.unreadable",
    "usb.removed",
    "usb.readonly_applied",
    "usb.write_attempt",
)

C = Column


@dataclass(frozen=True)
class Register:
    """A register: its spec, its segments for a reading, and whether its rows come from hash-chained events."""

    spec: Spec
    segments: Callable[[Context], list[Segment]]
    chained: bool = True


def _person(ctx: Context, pid: str | None) -> Value:
    return ctx.directory.person(pid)


def _department(ctx: Context, pid: str | None) -> Value:
    info = ctx.directory.person_info(pid) if pid else None
    return info.department if info else None


def _payload_text(col: Any, name: str) -> ColumnElement[Any]:
    return cast(ColumnElement[Any], col[name].as_string())


# --- key-lending register (鍵貸出管理簿) ----------------------------------------------------------------

KEY_SPEC = Spec(
    "keys",
    "鍵貸出管理簿",
    "Key-lending register",
    (
        C("taken_at", "貸出日時", "taken", "time"),
        C("cabinet", "保管庫", "cabinet", "ref"),
        C("slot", "スロット", "slot", "count"),
        C("key", "鍵", "key", "ref"),
        C("person", "借用者", "borrower", "ref"),
        C("department", "所属", "department"),
        C("due_at", "返却予定", "due", "time"),
        C("returned_at", "返却日時", "returned", "time"),
        C("returned_by", "返却者", "returned by", "ref"),
        C("state", "状態", "state"),
        C("note", "備考", "note"),
    ),
)


# Plain keys kept outside an electronic cabinet, lent at the counter tablet (controller/console/counter.py):
# their lines have this cabinet, a negative id (minus the admin audit row that recorded the loan) and no agent.
COUNTER_CABINET = "counter"
KEY_STATES = ("overdue", "open", "returned")


def _cabinet(ctx: Context, cabinet: str) -> Value:
    if cabinet == COUNTER_CABINET:
        return Ref(COUNTER_CABINET, "受付カウンター / counter")
    return ctx.directory.door(cabinet)


def _loan_row(ctx: Context, segment: int, state: str, time_key: str) -> Callable[[RowMapping], Row]:
    d = ctx.directory

    def make(r: RowMapping) -> Row:
        flags: list[str] = [state]
        shown_state = "return_only" if r["return_only"] else state
        notes: list[str] = []
        if r["wrong_slot"]:
            flags.append("wrong_slot")
            notes.append(
                f"別スロットへ返却（スロット{r['returned_slot']}） / returned to wrong slot {r['returned_slot']}"
            )
        elif r["returned_by"] and r["person"] and r["returned_by"] != r["person"]:
            # The key went back to its own slot, by someone other than the borrower: a note, never "wrong slot".
            flags.append("returned_by_colleague")
            notes.append("代理返却（正しいスロット） / returned to its slot by a colleague")
        values: dict[str, Value] = {
            "taken_at": r["taken_at"],
            "cabinet": _cabinet(ctx, r["cabinet"]),
            "slot": r["slot"],
            "key": d.key(r["cabinet"], r["key"]),
            "person": _person(ctx, r["person"]),
            "department": _department(ctx, r["person"]),
            "due_at": r["due_at"],
            "returned_at": r["returned_at"],
            "returned_by": _person(ctx, r["returned_by"]),
            "state": both(LOAN_STATES[shown_state]),
            "note": "; ".join(notes) or None,
        }
        agents = (r["agent_id"],) if r["agent_id"] else ()  # a counter loan is in the admin trail, not a chain
        return Row(SortKey(segment, r[time_key], 0, int(r["id"])), values, agents, "key", tuple(flags))

    return make


def key_segments(ctx: Context) -> list[Segment]:
    """Overdue loans first (longest overdue first), then keys out (newest first), then returned (newest first)."""
    k = KEY_LOANS.c
    flt = ctx.filter
    base: list[ColumnElement[bool]] = []
    people = ctx.people()
    if people is not None:
        base += [or_(*among(k.person, people), *among(k.returned_by, people))]
    if flt.door is not None:
        base.append(k.cabinet == flt.door)
    if flt.area is not None:
        base += among(k.cabinet, [d.id for d in ctx.directory.doors.values() if d.area == flt.area])
    base += among(k.agent_id, ctx.agents())
    moment = func.coalesce(k.taken_at, k.returned_at)
    base += within(moment, flt)
    out = and_(k.returned_at.is_(None), k.taken_at.is_not(None))
    late = and_(out, k.due_at <= ctx.as_of)
    on_time = and_(out, or_(k.due_at.is_(None), k.due_at > ctx.as_of))
    q = select(KEY_LOANS)
    segments = [
        Segment(0, q.where(late, *base), k.due_at, k.id, _loan_row(ctx, 0, "overdue", "due_at"), k.agent_id, False),
        Segment(1, q.where(on_time, *base), k.taken_at, k.id, _loan_row(ctx, 1, "open", "taken_at"), k.agent_id),
        Segment(
            2,
            q.where(k.returned_at.is_not(None), *base),
            k.returned_at,
            k.id,
            _loan_row(ctx, 2, "returned", "returned_at"),
            k.agent_id,
        ),
    ]
    # The key register's "types" are loan states (overdue, open, returned): "overdue only" is segment 0.
    states = flt.types & set(KEY_STATES)
    if states:
        segments = [s for s, state in zip(segments, KEY_STATES, strict=True) if state in states]
    return segments


# --- door log: the locker log and the room entry/exit log (入退室記録簿) -------------------------------------

ROOM_SPEC = Spec(
    "rooms",
    "入退室記録簿",
    "Room entry/exit log",
    (
        C("occurred_at", "日時", "time", "time"),
        C("area", "区域", "area", "ref"),
        C("door", "扉", "door", "ref"),
        C("person", "氏名", "person", "ref"),
        C("department", "所属", "department"),
        C("direction", "入退", "in/out"),
        C("event", "種別", "event"),
        C("escort", "付添者", "escort", "ref"),
        C("card", "カード", "card"),
        C("detail", "詳細", "detail"),
    ),
)
LOCKER_SPEC = Spec(
    "lockers",
    "ロッカー使用記録",
    "Locker log",
    (
        C("occurred_at", "日時", "time", "time"),
        C("door", "ロッカー", "locker", "ref"),
        C("area", "区域", "area", "ref"),
        C("person", "氏名", "person", "ref"),
        C("department", "所属", "department"),
        C("event", "種別", "event"),
        C("card", "カード", "card"),
        C("detail", "詳細", "detail"),
    ),
)


def door_row(ctx: Context, segment: int = 0, rank: int = 0) -> Callable[[RowMapping], Row]:
    """Return the maker of door log rows (also used by the timelines)."""
    d = ctx.directory

    def make(r: RowMapping) -> Row:
        detail = "; ".join(str(x) for x in (r["reason"], r["detail"]) if x) or None
        flags = tuple(
            name
            for name, on in (
                ("denied", r["type"] == "door.access_denied"),
                ("alarm", r["type"] == "door.alarm"),
                ("visitor", bool(r["visitor"])),
                ("passback", bool(r["passback"])),
            )
            if on
        )
        values: dict[str, Value] = {
            "occurred_at": r["occurred_at"],
            "area": d.area(r["area"]),
            "door": d.door(r["door"]),
            "person": _person(ctx, r["person"]),
            "department": _department(ctx, r["person"]),
            "direction": both(DIRECTIONS.get(r["direction"] or "both", ("", ""))) or None,
            "event": event_label(r["type"]),
            "escort": _person(ctx, r["escort"]),
            "card": r["card_masked"],
            "detail": detail,
            "type": r["type"],
            "kind": r["door_kind"],
        }
        kind = "visit" if r["visitor"] else (r["door_kind"] or "door")
        return Row(SortKey(segment, r["occurred_at"], rank, int(r["id"])), values, (r["agent_id"],), kind, flags)

    return make


def door_conditions(ctx: Context) -> list[ColumnElement[bool]]:
    """Return the filter's conditions on the door log."""
    g = DOOR_LOG.c
    flt = ctx.filter
    found: list[ColumnElement[bool]] = []
    people = ctx.people()
    if people is not None:
        found.append(or_(*among(g.person, people), *among(g.second_person, people), *among(g.escort, people)))
    if flt.door is not None:
        found.append(g.door == flt.door)
    if flt.area is not None:
        found.append(g.area == flt.area)
    found += among(g.agent_id, ctx.agents())
    if flt.types:
        found += among(g.type, sorted(flt.types))
    found += within(g.occurred_at, flt)
    return found


def _door_segments(kind: str) -> Callable[[Context], list[Segment]]:
    def segments(ctx: Context) -> list[Segment]:
        g = DOOR_LOG.c
        stmt = select(DOOR_LOG).where(g.door_kind == kind, *door_conditions(ctx))
        return [Segment(0, stmt, g.occurred_at, g.id, door_row(ctx), g.agent_id)]

    return segments


# --- visitor log (来訪者記録) ----------------------------------------------------------------------------

VISIT_SPEC = Spec(
    "visits",
    "来訪者記録",
    "Visitor log",
    (
        C("entered_at", "入室", "in", "time"),
        C("exited_at", "退室", "out", "time"),
        C("visitor", "来訪者", "visitor", "ref"),
        C("company", "所属", "organisation"),
        C("escort", "付添者", "escort", "ref"),
        C("area", "区域", "area", "ref"),
        C("doors", "扉", "doors"),
        C("state", "状態", "state"),
    ),
)


def visit_segments(ctx: Context) -> list[Segment]:
    """Visits newest first (by entry, or exit for an exit with no entry on record)."""
    v = VISITS.c
    flt = ctx.filter
    moment = func.coalesce(v.entered_at, v.exited_at)
    where: list[ColumnElement[bool]] = []
    people = ctx.people()
    if people is not None:
        where.append(or_(*among(v.visitor, people), *among(v.escort, people)))
    if flt.area is not None:
        where.append(v.area == flt.area)
    where += among(v.agent_id, ctx.agents())
    where += within(moment, flt)
    d = ctx.directory

    def make(r: RowMapping) -> Row:
        doors = [ref.text() for door in r["doors"] or [] if (ref := d.door(door))]
        still = r["exited_at"] is None and r["entered_at"] is not None
        values: dict[str, Value] = {
            "entered_at": r["entered_at"],
            "exited_at": r["exited_at"],
            "visitor": _person(ctx, r["visitor"]),
            "company": _department(ctx, r["visitor"]),
            "escort": _person(ctx, r["escort"]),
            "area": d.area(r["area"]),
            "doors": " → ".join(doors) or None,
            "state": "在室中 / inside" if still else ("退室済 / left" if r["exited_at"] else None),
        }
        flags = ("inside",) if still else ()
        return Row(SortKey(0, r["sort_at"], 0, int(r["id"])), values, (r["agent_id"],), "visit", flags)

    stmt = select(VISITS, moment.label("sort_at")).where(*where)
    return [Segment(0, stmt, moment, v.id, make, v.agent_id)]


# --- login history and the USB device log (from the events) ----------------------------------------------

LOGIN_SPEC = Spec(
    "logins",
    "ログイン履歴",
    "Login history",
    (
        C("occurred_at", "日時", "time", "time"),
        C("terminal", "端末", "terminal", "ref"),
        C("person", "氏名", "person", "ref"),
        C("department", "所属", "department"),
        C("user", "アカウント", "account"),
        C("event", "種別", "event"),
        C("methods", "認証方式", "methods"),
        C("detail", "理由・詳細", "reason / detail"),
    ),
)
USB_SPEC = Spec(
    "usb",
    "USB機器記録",
    "USB device log",
    (
        C("occurred_at", "日時", "time", "time"),
        C("terminal", "端末", "terminal", "ref"),
        C("person", "氏名", "person", "ref"),
        C("event", "種別", "event"),
        C("device", "機器", "device"),
        C("serial", "シリアル", "serial"),
        C("medium", "登録媒体", "registered medium", "ref"),
        C("detail", "理由・規則", "reason / rule"),
    ),
)


def event_row(ctx: Context, segment: int = 0, rank: int = 0) -> Callable[[RowMapping], Row]:
    """Return the maker of login/USB rows from stored events (also used by the timelines)."""
    d = ctx.directory

    def make(r: RowMapping) -> Row:
        p: dict[str, Any] = r["payload"] if isinstance(r["payload"], dict) else {}
        person = p.get("person") or d.person_of_login(p.get("user"))
        etype = str(r["type"])
        login = etype.startswith(("login.", "session."))
        detail = (
            "; ".join(str(x) for x in (p.get("reason"), p.get("cause"), p.get("rule"), p.get("detail")) if x) or None
        )
        device = " ".join(str(x) for x in (p.get("vendor_product"), p.get("product")) if x) or None
        methods = ", ".join(str(m) for m in p.get("methods", []) or []) or None
        if p.get("weak"):
            methods = f"{methods or ''} (UIDのみ / UID only)".strip()
        values: dict[str, Value] = {
            "occurred_at": r["occurred_at"],
            "terminal": d.terminal(p.get("terminal")),
            "person": _person(ctx, person),
            "department": _department(ctx, person),
            "user": p.get("user"),
            "event": event_label(etype),
            "methods": methods,
            "detail": detail,
            "device": device,
            "serial": p.get("serial_masked"),
            "medium": d.medium(p.get("medium")),
            "type": etype,
        }
        flags = tuple(
            name
            for name, on in (
                ("denied", etype in ("login.denied", "usb.blocked", "usb.rejected", "session.lock_failed")),
                ("alarm", etype == "usb.write_attempt"),
            )
            if on
        )
        kind = "login" if login else "usb"
        return Row(SortKey(segment, r["occurred_at"], rank, int(r["id"])), values, (r["agent_id"],), kind, flags)

    return make


def event_conditions(
    ctx: Context, types: tuple[str, ...]
) -> tuple[list[ColumnElement[bool]], tuple[ColumnElement[bool], ...]]:
    """Return the filter's conditions on stored events of these types, and the branches a row meets one of.

    A person is matched on the indexed events.person / events.account columns ingest fills from the payload
    (chain.subject_columns), never on the JSON: the database then reads that person's events in time order
    through ix_events_person_occurred_at instead of every event of these types. Session events name only the
    account, so login history matches the person's events or, apart, those of their accounts that name no such
    person: two disjoint branches, each read through its own index (queries.Segment.branches).
    """
    e = EVENTS.c
    flt = ctx.filter
    chosen = [t for t in types if not flt.types or t in flt.types]
    found: list[ColumnElement[bool]] = [*among(e.type, chosen)]
    branches: tuple[ColumnElement[bool], ...] = ()
    people = ctx.people()
    if people is not None:
        # Session events name only the account (user); login.granted/denied name both.
        logins = ctx.directory.logins_of(people) if types == LOGIN_TYPES else []
        if logins:
            own = and_(*among(e.person, people))
            branches = (own, and_(*among(e.account, logins), or_(e.person.is_(None), not_(own))))
        else:
            found += among(e.person, people)
    if flt.terminal is not None:
        found.append(_payload_text(e.payload, "terminal") == flt.terminal)
    found += among(e.agent_id, ctx.agents())
    found += within(e.occurred_at, flt)
    return found, branches


_EVENT_COLUMNS = (EVENTS.c.id, EVENTS.c.agent_id, EVENTS.c.type, EVENTS.c.occurred_at, EVENTS.c.payload)


def _event_segments(types: tuple[str, ...]) -> Callable[[Context], list[Segment]]:
    def segments(ctx: Context) -> list[Segment]:
        e = EVENTS.c
        where, branches = event_conditions(ctx, types)
        stmt = select(*_EVENT_COLUMNS).where(*where)
        return [Segment(0, stmt, e.occurred_at, e.id, event_row(ctx), e.agent_id, branches=branches)]

    return segments


# --- media loans (貸出記録) -------------------------------------------------------------------------------

MEDIA_SPEC = Spec(
    "media",
    "電子媒体貸出記録",
    "Media loans",
    (
        C("starts_at", "貸出開始", "from", "time"),
        C("ends_at", "返却期限", "until", "time"),
        C("medium", "媒体", "medium", "ref"),
        C("person", "借用者", "borrower", "ref"),
        C("department", "所属", "department"),
        C("terminals", "使用端末", "terminals"),
        C("purpose", "目的", "purpose"),
        C("read_only", "読取専用", "read-only"),
        C("approved_by", "承認者", "approved by", "ref"),
        C("returned_at", "返却日時", "returned", "time"),
        C("received_by", "受領者", "received by"),
        C("state", "状態", "state"),
    ),
)


def media_segments(ctx: Context) -> list[Segment]:
    """Media loans newest first, whose window overlaps the filter's period."""
    m = MEDIA_LOANS.c
    flt = ctx.filter
    where: list[ColumnElement[bool]] = []
    people = ctx.people()
    if people is not None:
        where.append(or_(*among(m.person, people), *among(m.approved_by, people)))
    if flt.medium is not None:
        where.append(m.medium == flt.medium)
    if flt.since is not None:
        where.append(m.ends_at > flt.since)
    if flt.until is not None:
        where.append(m.starts_at < flt.until)
    d = ctx.directory

    def make(r: RowMapping) -> Row:
        if r["revoked_at"] is not None:
            state = "revoked"
        elif r["returned_at"] is not None:
            state = "returned"
        elif r["ends_at"] <= ctx.as_of:
            state = "overdue"
        else:
            state = "open"
        terminals = [ref.text() for t in r["terminals"] or [] if (ref := d.terminal(t))]
        values: dict[str, Value] = {
            "starts_at": r["starts_at"],
            "ends_at": r["ends_at"],
            "medium": d.medium(r["medium"]),
            "person": _person(ctx, r["person"]),
            "department": _department(ctx, r["person"]),
            "terminals": ", ".join(terminals) or None,
            "purpose": r["purpose"],
            "read_only": "はい / yes" if r["read_only"] else "いいえ / no",
            "approved_by": _person(ctx, r["approved_by"]),
            "returned_at": r["returned_at"] or r["revoked_at"],
            "received_by": r["received_by"],
            "state": both(LOAN_STATES[state]),
        }
        return Row(SortKey(0, r["starts_at"], 0, str(r["id"])), values, (), "media", (state,))

    return [Segment(0, select(MEDIA_LOANS).where(*where), m.starts_at, m.id, make)]


REGISTERS: dict[str, Register] = {
    "keys": Register(KEY_SPEC, key_segments),
    "lockers": Register(LOCKER_SPEC, _door_segments("locker")),
    "rooms": Register(ROOM_SPEC, _door_segments("room")),
    "visits": Register(VISIT_SPEC, visit_segments),
    "logins": Register(LOGIN_SPEC, _event_segments(LOGIN_TYPES)),
    "usb": Register(USB_SPEC, _event_segments(USB_TYPES)),
    "media": Register(MEDIA_SPEC, media_segments, chained=False),
}
