"""How one stored door or key event changes the door registers.

Every change here is safe to repeat: re-applying an event that was already applied finds its own trace
(its event id in a register row, or a movement at the same time) and changes nothing. Times are the
agent's occurred_at, never the arrival time, so events that come late (an agent was offline) are
judged against what is already known to have happened after them.

Payloads are read through their catalogue models (``protocol.catalogue``), as ingest checked them. A
stored payload its model refuses (the database was edited, or a schema changed under stored events)
changes no register: it becomes one ``door_event_unreadable`` finding, and the projection goes on, so
one bad row neither stops the registers nor disappears unnoticed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import Connection, Table, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from sekisho.controller.store.models import AreaPresence, DoorLogEntry, Finding, KeyLoan, Visit
from sekisho.protocol import timefmt
from sekisho.protocol.catalogue import (
    DoorAccessDenied,
    DoorAccessGranted,
    DoorAlarm,
    DoorAlarmCleared,
    DoorClosed,
    DoorModeChanged,
    DoorOpened,
    DoorUnlocked,
    KeyReturned,
    KeyTaken,
)
from sekisho.protocol.events import EVENT_TYPES
from sekisho.protocol.policy import Door, SitePolicy

log = logging.getLogger(__name__)

_LOANS = cast(Table, KeyLoan.__table__)
_LOG = cast(Table, DoorLogEntry.__table__)
_PRESENCE = cast(Table, AreaPresence.__table__)
_VISITS = cast(Table, Visit.__table__)
_FINDINGS = cast(Table, Finding.__table__)

# The door log keeps what a reviewer reads; door.locked (after every close) and pending steps are noise.
LOG_TYPES = frozenset(
    {
        "door.access_granted",
        "door.access_denied",
        "door.opened",
        "door.closed",
        "door.alarm",
        "door.alarm_cleared",
        "door.unlocked",
        "door.mode_changed",
    }
)
KEY_TYPES = frozenset({"key.taken", "key.returned"})
PROJECTED_TYPES = LOG_TYPES | KEY_TYPES
# A stored door or key event whose payload its catalogue model refuses (see the module docstring).
UNREADABLE_EVENT = "door_event_unreadable"

LogPayload = (
    DoorAccessGranted
    | DoorAccessDenied
    | DoorOpened
    | DoorClosed
    | DoorAlarm
    | DoorAlarmCleared
    | DoorUnlocked
    | DoorModeChanged
)


@dataclass(frozen=True)
class SiteView:
    """What the projection takes from the policy in force: doors, which key lives in which slot, visitors."""

    doors: dict[str, Door]
    slot_keys: dict[tuple[str, int], str]
    visitors: frozenset[str]

    @classmethod
    def of(cls, policy: SitePolicy | None) -> SiteView:
        """Index a site policy (None: nothing known, events are still projected from their own fields)."""
        if policy is None:
            return cls({}, {}, frozenset())
        return cls(
            doors={d.id: d for d in policy.doors},
            slot_keys={(c.door, s.index): s.key for c in policy.key_cabinets for s in c.slots},
            visitors=frozenset(p.id for p in policy.people if "visitor" in p.roles),
        )


@dataclass(frozen=True)
class StoredEvent:
    """The columns of a stored event that the projection reads."""

    id: int
    agent_id: str
    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    payload: dict[str, Any]


def apply_event(conn: Connection, site: SiteView, event: StoredEvent) -> None:
    """Bring the registers up to date with one stored event (inside the caller's transaction)."""
    schema = EVENT_TYPES.get(event.type)
    if event.type not in PROJECTED_TYPES or schema is None:
        return
    try:
        payload = schema.model_validate(event.payload)
    except ValidationError as err:
        _unreadable(conn, event, err)
        return
    if isinstance(payload, LogPayload):
        _log(conn, site, event, payload)
        if isinstance(payload, DoorAccessGranted):
            _movement(conn, site, event, payload)
    elif isinstance(payload, KeyTaken):
        _key_taken(conn, event, payload)
    elif isinstance(payload, KeyReturned):
        _key_returned(conn, site, event, payload)


def _unreadable(conn: Connection, event: StoredEvent, err: ValidationError) -> None:
    """Raise the finding for a payload its model refuses, once per event (a rebuild finds it again)."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "$"
    problem = f"{where}: {first.get('msg', 'invalid')}"[:300]
    log.error("door event %s (%s seq %d) not projected: %s", event.event_id, event.agent_id, event.seq, problem)
    f = _FINDINGS.c
    raised = conn.execute(
        select(f.id).where(f.kind == UNREADABLE_EVENT, f.agent_id == event.agent_id, f.first_seq == event.seq)
    ).first()
    if raised is not None:
        return
    detail = {"event_id": event.event_id, "type": event.type, "event": event.id, "error": problem}
    conn.execute(
        insert(_FINDINGS).values(
            kind=UNREADABLE_EVENT,
            agent_id=event.agent_id,
            first_seq=event.seq,
            last_seq=event.seq,
            detail=detail,
            created_at=timefmt.now(),
        )
    )


def _insert_ignoring_duplicates(conn: Connection, table: Table, values: dict[str, Any]) -> None:
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(dialect_insert(table).values(**values).on_conflict_do_nothing())


# --- the door log ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LogLine:
    """The columns of a door log row that depend on the event type (the rest come from the envelope)."""

    person: str | None = None
    reason: str | None = None
    detail: str | None = None
    area: str | None = None
    card_masked: str | None = None
    reader: str | None = None
    direction: str | None = None
    visitor: bool = False
    escort: str | None = None
    second_person: str | None = None
    slot: int | None = None
    passback: bool = False


def _log_line(p: LogPayload) -> _LogLine:
    if isinstance(p, DoorAccessGranted | DoorAccessDenied):
        return _LogLine(
            person=p.person,
            reason=p.rule if isinstance(p, DoorAccessGranted) else p.reason,
            detail=p.detail or None,
            area=p.area,
            card_masked=p.card_masked,
            reader=p.reader,
            direction=p.direction,
            visitor=p.visitor,
            escort=p.escort,
            second_person=p.second_person,
            slot=p.slot,
            passback=p.passback,
        )
    if isinstance(p, DoorAlarm):
        return _LogLine(person=p.person, reason=p.alarm, detail=p.detail or None, reader=p.reader, slot=p.slot)
    if isinstance(p, DoorAlarmCleared):
        return _LogLine(reason=p.alarm, detail=p.detail or None, reader=p.reader)
    if isinstance(p, DoorUnlocked):
        return _LogLine(person=p.requested_by, reason=p.cause)
    if isinstance(p, DoorModeChanged):
        return _LogLine(reason=p.mode, detail=f"previous: {p.previous}")
    if isinstance(p, DoorOpened):
        return _LogLine(person=p.person, reason="forced" if p.forced else None)
    return _LogLine(person=p.person, detail=f"open_seconds: {p.open_seconds}")


def log_row(site: SiteView, event: StoredEvent, p: LogPayload) -> dict[str, Any]:
    """Return the door_log row the projection writes for one event (also the bulk loader of the benchmark)."""
    door = site.doors.get(p.door)
    line = _log_line(p)
    return {
        "id": event.id,
        "event_id": event.event_id,
        "agent_id": event.agent_id,
        "type": event.type,
        "occurred_at": event.occurred_at,
        "door": p.door,
        "door_kind": door.kind if door else None,
        "area": line.area or (door.area if door else None),
        "person": line.person,
        "card_masked": line.card_masked,
        "reader": line.reader,
        "direction": line.direction,
        "reason": line.reason,
        "detail": line.detail,
        "visitor": line.visitor or (line.person is not None and line.person in site.visitors),
        "escort": line.escort,
        "second_person": line.second_person,
        "slot": line.slot,
        "passback": line.passback,
    }


def _log(conn: Connection, site: SiteView, event: StoredEvent, p: LogPayload) -> None:
    _insert_ignoring_duplicates(conn, _LOG, log_row(site, event, p))


# --- entry and exit: who is inside, visits ---------------------------------------------------------


def _movement(conn: Connection, site: SiteView, event: StoredEvent, p: DoorAccessGranted) -> None:
    if p.direction not in ("entry", "exit"):
        return  # "both" readers (lockers, cabinets, single-reader doors) open a door; nobody changes area
    door = site.doors.get(p.door)
    # A door no longer in the policy still counts: its reader said entry or exit when it happened.
    if door is not None and door.kind != "room":
        return
    area = p.area or (door.area if door else None)
    if area is None:
        return
    person, entering = p.person, p.direction == "entry"
    visitor = p.visitor or person in site.visitors
    _presence(conn, event, p.door, area, person, entering, visitor, p.escort)
    if visitor:
        _visit(conn, event, p.door, area, person, p.escort, entering)
    second = p.second_person
    if second and second != person:
        # A two-person grant lets both through. Should the agent also record the other person's own
        # grant, that second movement in the same direction moments later changes nothing that matters.
        second_is_visitor = second in site.visitors
        escort = person if second_is_visitor else None
        _presence(conn, event, p.door, area, second, entering, second_is_visitor, escort)


def _presence(
    conn: Connection,
    event: StoredEvent,
    door: str,
    area: str,
    person: str,
    entering: bool,
    visitor: bool,
    escort: str | None,
) -> None:
    when = event.occurred_at
    row = conn.execute(
        select(_PRESENCE).where(_PRESENCE.c.area == area, _PRESENCE.c.person == person).with_for_update()
    ).first()
    values: dict[str, Any] = {
        "inside": entering,
        "door": door,
        "visitor": visitor,
        "event_id": event.event_id,
    }
    if entering:
        values.update(entered_at=when, exited_at=None, escort=escort)
    else:
        values["exited_at"] = when
    if row is None:
        conn.execute(insert(_PRESENCE).values(area=area, person=person, **{"entered_at": None, **values}))
        return
    latest = max(moment for moment in (row.entered_at, row.exited_at) if moment is not None)
    if when <= latest:
        # Older than the movement on record (or that movement itself): it happened, it is in the door
        # log, but it says nothing about where the person is now.
        return
    conn.execute(update(_PRESENCE).where(_PRESENCE.c.area == area, _PRESENCE.c.person == person).values(**values))


def _visit(
    conn: Connection, event: StoredEvent, door: str, area: str, visitor: str, escort: str | None, entering: bool
) -> None:
    when = event.occurred_at
    mine = (_VISITS.c.visitor == visitor, _VISITS.c.area == area)
    if entering:
        if conn.execute(select(_VISITS.c.id).where(_VISITS.c.entry_event_id == event.event_id)).first():
            return
        # An exit already on record without its entry (the entry arrived late) becomes this visit's end.
        lone = conn.execute(
            select(_VISITS)
            .where(*mine, _VISITS.c.entry_event_id.is_(None), _VISITS.c.exited_at >= when)
            .order_by(_VISITS.c.exited_at, _VISITS.c.id)
            .limit(1)
            .with_for_update()
        ).first()
        if lone is not None:
            conn.execute(
                update(_VISITS)
                .where(_VISITS.c.id == lone.id)
                .values(
                    entered_at=when,
                    entry_event_id=event.event_id,
                    escort=escort or lone.escort,
                    doors=[door, *lone.doors],
                )
            )
            return
        _new_visit(conn, event, visitor, escort, area, door, entering=True)
        return
    if conn.execute(select(_VISITS.c.id).where(_VISITS.c.exit_event_id == event.event_id)).first():
        return
    # The exit ends the latest visit that began before it and has no end yet.
    open_visit = conn.execute(
        select(_VISITS)
        .where(*mine, _VISITS.c.exited_at.is_(None), _VISITS.c.entered_at < when)
        .order_by(_VISITS.c.entered_at.desc(), _VISITS.c.id.desc())
        .limit(1)
        .with_for_update()
    ).first()
    if open_visit is not None:
        conn.execute(
            update(_VISITS)
            .where(_VISITS.c.id == open_visit.id)
            .values(exited_at=when, exit_event_id=event.event_id, doors=[*open_visit.doors, door])
        )
        return
    # An exit with no entry on record (it was before the register began, or its entry comes late).
    _new_visit(conn, event, visitor, escort, area, door, entering=False)


def _new_visit(
    conn: Connection,
    event: StoredEvent,
    visitor: str,
    escort: str | None,
    area: str,
    door: str,
    *,
    entering: bool,
) -> None:
    when = event.occurred_at
    conn.execute(
        insert(_VISITS).values(
            id=event.id,
            agent_id=event.agent_id,
            visitor=visitor,
            escort=escort,
            area=area,
            entered_at=when if entering else None,
            exited_at=None if entering else when,
            doors=[door],
            entry_event_id=event.event_id if entering else None,
            exit_event_id=None if entering else event.event_id,
        )
    )


# --- the key-lending register ----------------------------------------------------------------------


def _key_taken(conn: Connection, event: StoredEvent, p: KeyTaken) -> None:
    if conn.execute(select(_LOANS.c.id).where(_LOANS.c.taken_event_id == event.event_id)).first():
        return
    when = event.occurred_at
    taken = {
        "slot": p.slot,
        "person": p.person,
        "taken_at": when,
        "due_at": datetime.fromisoformat(p.due_at),
        "taken_event_id": event.event_id,
        "return_only": False,
    }
    # A return already on record without its loan (the taking arrived late) completes this loan.
    lone = conn.execute(
        select(_LOANS.c.id)
        .where(
            _LOANS.c.cabinet == p.door,
            _LOANS.c.key == p.key,
            _LOANS.c.taken_event_id.is_(None),
            _LOANS.c.returned_at >= when,
        )
        .order_by(_LOANS.c.returned_at, _LOANS.c.id)
        .limit(1)
        .with_for_update()
    ).first()
    if lone is not None:
        conn.execute(update(_LOANS).where(_LOANS.c.id == lone.id).values(**taken))
        return
    conn.execute(
        insert(_LOANS).values(
            id=event.id,
            agent_id=event.agent_id,
            cabinet=p.door,
            key=p.key,
            returned_at=None,
            returned_by=None,
            returned_slot=None,
            wrong_slot=False,
            returned_event_id=None,
            overdue_finding_id=None,
            **taken,
        )
    )


def _key_returned(conn: Connection, site: SiteView, event: StoredEvent, p: KeyReturned) -> None:
    if conn.execute(select(_LOANS.c.id).where(_LOANS.c.returned_event_id == event.event_id)).first():
        return
    when, cabinet, slot = event.occurred_at, p.door, p.slot
    # The agent sets wrong_slot whenever the person returning is not the slot's borrower: a presence switch
    # cannot tell which key went in. A colleague putting the borrower's key back into its own slot is the
    # same signal, and was shown as "wrong slot". Only someone who holds another key of this cabinet can have
    # put that key into this slot; anyone else returned this slot's own key (issue 12).
    slot_key = site.slot_keys.get((cabinet, slot))
    wrong_slot = p.wrong_slot and _holds_other_key(conn, cabinet, slot_key or p.key, p.person, when)
    # A key put into another key's slot fills that slot: the loan it closes is that slot's key's.
    key = (slot_key if p.wrong_slot else None) or p.key
    returned = {
        "returned_at": when,
        "returned_by": p.person,
        "returned_slot": slot,
        "wrong_slot": wrong_slot,
        "returned_event_id": event.event_id,
    }
    loan = conn.execute(
        select(_LOANS.c.id, _LOANS.c.overdue_finding_id)
        .where(
            _LOANS.c.cabinet == cabinet,
            _LOANS.c.key == key,
            _LOANS.c.returned_at.is_(None),
            _LOANS.c.taken_at <= when,
        )
        .order_by(_LOANS.c.taken_at.desc(), _LOANS.c.id.desc())
        .limit(1)
        .with_for_update()
    ).first()
    if loan is None:
        conn.execute(
            insert(_LOANS).values(
                id=event.id,
                agent_id=event.agent_id,
                cabinet=cabinet,
                slot=None,
                key=key,
                person=None,
                taken_at=None,
                due_at=None,
                return_only=True,
                taken_event_id=None,
                overdue_finding_id=None,
                **returned,
            )
        )
        return
    conn.execute(update(_LOANS).where(_LOANS.c.id == loan.id).values(**returned))
    if loan.overdue_finding_id is not None:
        resolve_overdue_finding(conn, loan.overdue_finding_id, when, p.person)


def _holds_other_key(conn: Connection, cabinet: str, key: str, person: str | None, when: datetime) -> bool:
    """Tell whether person had a key of this cabinet other than key out at that moment."""
    if person is None:
        return False
    c = _LOANS.c
    found = conn.execute(
        select(c.id)
        .where(
            c.cabinet == cabinet,
            c.person == person,
            c.key != key,
            c.taken_at <= when,
            or_(c.returned_at.is_(None), c.returned_at > when),
        )
        .limit(1)
    ).first()
    return found is not None


def resolve_overdue_finding(conn: Connection, finding_id: int, returned_at: datetime, by: str | None) -> None:
    """Mark a key loan's overdue finding resolved by the key's return (no-op if already resolved)."""
    conn.execute(
        update(_FINDINGS)
        .where(_FINDINGS.c.id == finding_id, _FINDINGS.c.resolved_at.is_(None))
        .values(
            resolved_at=timefmt.now(),
            resolution=f"key returned {timefmt.fmt(returned_at)} by {by or 'unknown'}",
        )
    )
