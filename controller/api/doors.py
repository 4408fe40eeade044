"""Door registers over HTTP: key loans (鍵貸出管理簿), the door and locker log, who is inside, visits.

Who may read what is the role matrix's (controller/accounts/roles.py): the key register and the door log
need registers.read (site-wide roles); who is inside and the visitor log need areas.read, and an area
manager gets only the areas of their account (another area answers 403).

Read-only: the registers are projected from the stored events (controller.doors.projector), at most
about a second behind them. Lists page in id order like /api/v1/events: pass next_after_id back as
after_id. Times are UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict

from sekisho.common.i18n import M_, Message
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.api.deps import StateDep
from sekisho.controller.doors.registers import DoorKind, DoorRegisters, LoanState, loan_state
from sekisho.controller.store.models import KeyLoan
from sekisho.protocol import timefmt

keys = APIRouter(prefix="/api/v1/keys", tags=["doors"], dependencies=[require(Permission.REGISTERS_READ)])
door_log = APIRouter(prefix="/api/v1/doors", tags=["doors"], dependencies=[require(Permission.REGISTERS_READ)])
areas = APIRouter(prefix="/api/v1/areas", tags=["doors"])
visits = APIRouter(prefix="/api/v1/visits", tags=["doors"])
routers = (keys, door_log, areas, visits)
AreaReader = Annotated[Actor, require(Permission.AREAS_READ)]

IdQuery = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
AfterId = Annotated[int | None, Query(ge=0)]
Limit = Annotated[int, Query(ge=1, le=1000)]
OpenQuery = Annotated[bool | None, Query(alias="open")]


class KeyLoanPublic(BaseModel):
    """One line of the key-lending register with its state (return_only: returned with no loan on record)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    agent_id: str
    cabinet: str
    slot: int | None
    key: str
    person: str | None
    taken_at: datetime | None
    due_at: datetime | None
    returned_at: datetime | None
    returned_by: str | None
    returned_slot: int | None
    wrong_slot: bool
    return_only: bool
    state: LoanState
    overdue: bool
    returned_late: bool
    taken_event_id: str | None
    returned_event_id: str | None
    overdue_finding_id: int | None


class KeyLoanPage(BaseModel):
    """One page of key loans with the cursor for the next page."""

    items: list[KeyLoanPublic]
    next_after_id: int | None


class DoorLogEntryPublic(BaseModel):
    """One door event of the log (id is the stored event's id)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    event_id: str
    agent_id: str
    type: str
    occurred_at: datetime
    door: str
    door_kind: str | None
    area: str | None
    person: str | None
    card_masked: str | None
    reader: str | None
    direction: str | None
    reason: str | None
    detail: str | None
    visitor: bool
    escort: str | None
    second_person: str | None
    slot: int | None
    passback: bool


class DoorLogPage(BaseModel):
    """One page of the door log with the cursor for the next page."""

    items: list[DoorLogEntryPublic]
    next_after_id: int | None


class PresencePublic(BaseModel):
    """Someone inside an area now, since when, through which door."""

    model_config = ConfigDict(from_attributes=True)

    area: str
    person: str
    entered_at: datetime | None
    door: str
    visitor: bool
    escort: str | None


class VisitPublic(BaseModel):
    """One visit of the visitor log; exited_at None: no exit recorded yet."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    visitor: str
    escort: str | None
    area: str
    entered_at: datetime | None
    exited_at: datetime | None
    doors: list[str]
    entry_event_id: str | None
    exit_event_id: str | None


class VisitPage(BaseModel):
    """One page of visits with the cursor for the next page."""

    items: list[VisitPublic]
    next_after_id: int | None


def _unprocessable(message: Message) -> HTTPException:
    # The detail stays a Message: the app's handler gives it in the request's language (api/privacy.py).
    return HTTPException(422, message)


def _window(since: datetime | None, until: datetime | None) -> None:
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise _unprocessable(M_("%(name)s needs a time zone (e.g. +09:00)", name=name))
    if since is not None and until is not None and until <= since:
        raise _unprocessable(M_("until must be after since"))


def _loan(loan: KeyLoan, now: datetime) -> KeyLoanPublic:
    state = loan_state(loan, now)
    late = loan.returned_at is not None and loan.due_at is not None and loan.returned_at > loan.due_at
    return KeyLoanPublic.model_validate(
        {
            **{name: getattr(loan, name) for name in KeyLoanPublic.model_fields if hasattr(loan, name)},
            "state": state,
            "overdue": state == "overdue",
            "returned_late": late,
        }
    )


@keys.get("/loans", response_model=KeyLoanPage)
def list_key_loans(
    state: StateDep,
    open_: OpenQuery = None,
    overdue: bool | None = None,
    person: IdQuery = None,
    key: IdQuery = None,
    cabinet: IdQuery = None,
    after_id: AfterId = None,
    limit: Limit = 100,
) -> KeyLoanPage:
    """List the key-lending register: open (not returned), overdue (open past due), by borrower, key, cabinet."""
    if open_ is False and overdue is True:
        raise _unprocessable(M_("open=false and overdue=true contradict each other: a returned key cannot be overdue"))
    now = timefmt.now()
    rows = DoorRegisters(state.store).loans(
        open_=open_,
        overdue=overdue,
        person=person,
        key=key,
        cabinet=cabinet,
        after_id=after_id,
        limit=limit + 1,
        now=now,
    )
    items = [_loan(r, now) for r in rows[:limit]]
    return KeyLoanPage(items=items, next_after_id=items[-1].id if len(rows) > limit and items else None)


@keys.get("/loans/{loan_id}", response_model=KeyLoanPublic)
def get_key_loan(state: StateDep, loan_id: int) -> KeyLoanPublic:
    """Return one line of the key-lending register."""
    found = DoorRegisters(state.store).loan(loan_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, M_("no key loan %(loan)s", loan=loan_id))
    return _loan(found, timefmt.now())


@door_log.get("/log", response_model=DoorLogPage)
def list_door_log(
    state: StateDep,
    door: IdQuery = None,
    kind: DoorKind | None = None,
    person: IdQuery = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: AfterId = None,
    limit: Limit = 100,
) -> DoorLogPage:
    """List door events (kind=locker: the locker log); since/until bound the time they happened."""
    _window(since, until)
    rows = DoorRegisters(state.store).log(
        door=door, kind=kind, person=person, since=since, until=until, after_id=after_id, limit=limit + 1
    )
    items = [DoorLogEntryPublic.model_validate(r) for r in rows[:limit]]
    return DoorLogPage(items=items, next_after_id=items[-1].id if len(rows) > limit and items else None)


@areas.get("/presence", response_model=list[PresencePublic])
def list_presence(state: StateDep, actor: AreaReader) -> list[PresencePublic]:
    """List who is inside every area now (an area manager: their areas)."""
    rows = DoorRegisters(state.store).inside()
    return [PresencePublic.model_validate(r) for r in rows if actor.sees_area(r.area)]


def _may_see(actor: Actor, area: str | None) -> None:
    if area is not None and not actor.sees_area(area):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, M_("the area %(area)s is not one of this account's areas", area=area)
        )


@areas.get("/{area}/presence", response_model=list[PresencePublic])
def area_presence(
    state: StateDep,
    actor: AreaReader,
    area: Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")],
) -> list[PresencePublic]:
    """List who is inside one area now."""
    _may_see(actor, area)
    return [PresencePublic.model_validate(r) for r in DoorRegisters(state.store).inside(area)]


@visits.get("", response_model=VisitPage)
def list_visits(
    state: StateDep,
    actor: AreaReader,
    open_: OpenQuery = None,
    since: datetime | None = None,
    visitor: IdQuery = None,
    area: IdQuery = None,
    after_id: AfterId = None,
    limit: Limit = 100,
) -> VisitPage:
    """List the visitor log: open (no exit yet), or visits going on at or after since.

    An area manager must name one of their areas (or has exactly one, which is then the default).
    """
    _window(since, None)
    if actor.areas is not None:
        if area is None and len(actor.areas) == 1:
            area = next(iter(actor.areas))
        if area is None:
            raise _unprocessable(M_("name one of your areas with area="))
        _may_see(actor, area)
    rows = DoorRegisters(state.store).visits(
        open_=open_, since=since, visitor=visitor, area=area, after_id=after_id, limit=limit + 1
    )
    items = [VisitPublic.model_validate(r) for r in rows[:limit]]
    return VisitPage(items=items, next_after_id=items[-1].id if len(rows) > limit and items else None)
