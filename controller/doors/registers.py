"""Reading the door registers, and raising overdue key loans as findings."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal, TypeVar, cast

from sqlalchemy import Select, Table, and_, insert, or_, select, update
from sqlalchemy.orm import Session

from sekisho.common.i18n import M_
from sekisho.controller.doors.projector import KEY_LOAN_OVERDUE
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import AreaPresence, DoorLogEntry, Finding, KeyLoan, Visit
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt

log = logging.getLogger(__name__)

DoorKind = Literal["room", "locker", "key_cabinet"]
LoanState = Literal["open", "overdue", "returned", "return_only"]

_LOANS = cast(Table, KeyLoan.__table__)
_FINDINGS = cast(Table, Finding.__table__)

M = TypeVar("M")
_PAGE = 500


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(M_("%(name)s needs a time zone (e.g. +09:00)", name=name))
    return moment.astimezone(UTC)


def loan_state(loan: KeyLoan, now: datetime) -> LoanState:
    """Name a key loan's state: return_only, returned, overdue or open."""
    if loan.return_only:
        return "return_only"
    if loan.returned_at is not None:
        return "returned"
    if loan.due_at is not None and loan.due_at <= now:
        return "overdue"
    return "open"


class DoorRegisters:
    """Queries over the projected door registers (pages in id order: pass the last id back as after_id)."""

    def __init__(self, store: Store) -> None:
        """Read the registers of this store's database."""
        self.store = store
        self.engine = store.engine

    def _read(self, stmt: Select[M]) -> list[M]:
        with Session(self.engine) as session:
            return list(session.scalars(stmt))

    # --- key loans ---------------------------------------------------------------------------------

    def loans(
        self,
        *,
        open_: bool | None = None,
        overdue: bool | None = None,
        person: str | None = None,
        key: str | None = None,
        cabinet: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
        now: datetime | None = None,
    ) -> list[KeyLoan]:
        """Return key loans: open (not returned), overdue (open past due), by borrower, key or cabinet."""
        moment = _aware(now or timefmt.now(), "now")
        if limit < 1:
            raise ValueError("limit must be positive")
        stmt = select(KeyLoan).order_by(KeyLoan.id).limit(limit)
        is_open = and_(KeyLoan.returned_at.is_(None), KeyLoan.taken_at.is_not(None))
        if open_ is True:
            stmt = stmt.where(is_open)
        elif open_ is False:
            stmt = stmt.where(KeyLoan.returned_at.is_not(None))
        late = and_(is_open, KeyLoan.due_at <= moment)
        if overdue is True:
            stmt = stmt.where(late)
        elif overdue is False:
            stmt = stmt.where(~late)
        if person is not None:
            stmt = stmt.where(KeyLoan.person == person)
        if key is not None:
            stmt = stmt.where(KeyLoan.key == key)
        if cabinet is not None:
            stmt = stmt.where(KeyLoan.cabinet == cabinet)
        if after_id is not None:
            stmt = stmt.where(KeyLoan.id > after_id)
        return self._read(stmt)

    def loan(self, loan_id: int) -> KeyLoan | None:
        """Return one line of the key-lending register."""
        found = self._read(select(KeyLoan).where(KeyLoan.id == loan_id))
        return found[0] if found else None

    def check_overdue(self, now: datetime | None = None) -> list[int]:
        """Raise one key_loan_overdue finding per open loan past due (idempotent); return the new finding ids."""
        moment = _aware(now or timefmt.now(), "now")
        created: list[int] = []
        after: int | None = None
        while True:
            page = self.loans(overdue=True, now=moment, after_id=after, limit=_PAGE)
            for loan in page:
                if loan.overdue_finding_id is not None:
                    continue
                finding = self._raise_overdue(loan.id, moment)
                if finding is not None:
                    log.warning(
                        "key %s of %s overdue since %s (finding %d)", loan.key, loan.cabinet, loan.due_at, finding
                    )
                    created.append(finding)
            if len(page) < _PAGE:
                return created
            after = page[-1].id

    def _raise_overdue(self, loan_id: int, moment: datetime) -> int | None:
        with write_transaction(self.engine) as conn:
            # The loan row lock (SQLite: the writer lock) lets only one controller process raise it.
            loan = conn.execute(select(_LOANS).where(_LOANS.c.id == loan_id).with_for_update()).first()
            if loan is None or loan.overdue_finding_id is not None or loan.returned_at is not None:
                return None
            detail = {
                "loan": loan.id,
                "cabinet": loan.cabinet,
                "slot": loan.slot,
                "key": loan.key,
                "person": loan.person,
                "taken_at": timefmt.fmt(loan.taken_at),
                "due": timefmt.fmt(loan.due_at),
            }
            finding_id = conn.execute(
                insert(_FINDINGS)
                .values(kind=KEY_LOAN_OVERDUE, agent_id=loan.agent_id, detail=detail, created_at=moment)
                .returning(_FINDINGS.c.id)
            ).scalar_one()
            conn.execute(update(_LOANS).where(_LOANS.c.id == loan_id).values(overdue_finding_id=finding_id))
            return int(finding_id)

    # --- door log ----------------------------------------------------------------------------------

    def log(
        self,
        *,
        door: str | None = None,
        kind: DoorKind | None = None,
        person: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[DoorLogEntry]:
        """Return door log lines; kind=locker is the locker log; since/until bound occurred_at (until exclusive)."""
        if limit < 1:
            raise ValueError("limit must be positive")
        stmt = select(DoorLogEntry).order_by(DoorLogEntry.id).limit(limit)
        if door is not None:
            stmt = stmt.where(DoorLogEntry.door == door)
        if kind is not None:
            stmt = stmt.where(DoorLogEntry.door_kind == kind)
        if person is not None:
            stmt = stmt.where(DoorLogEntry.person == person)
        if since is not None:
            stmt = stmt.where(DoorLogEntry.occurred_at >= _aware(since, "since"))
        if until is not None:
            stmt = stmt.where(DoorLogEntry.occurred_at < _aware(until, "until"))
        if after_id is not None:
            stmt = stmt.where(DoorLogEntry.id > after_id)
        return self._read(stmt)

    # --- who is inside, visits ---------------------------------------------------------------------

    def inside(self, area: str | None = None) -> list[AreaPresence]:
        """Return who is inside now (per area, by entry time)."""
        stmt = (
            select(AreaPresence)
            .where(AreaPresence.inside.is_(True))
            .order_by(AreaPresence.area, AreaPresence.entered_at, AreaPresence.person)
        )
        if area is not None:
            stmt = stmt.where(AreaPresence.area == area)
        return self._read(stmt)

    def visits(
        self,
        *,
        open_: bool | None = None,
        since: datetime | None = None,
        visitor: str | None = None,
        area: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[Visit]:
        """Return visits: open (no exit recorded yet), or still going on at or after since."""
        if limit < 1:
            raise ValueError("limit must be positive")
        stmt = select(Visit).order_by(Visit.id).limit(limit)
        if open_ is True:
            stmt = stmt.where(Visit.exited_at.is_(None))
        elif open_ is False:
            stmt = stmt.where(Visit.exited_at.is_not(None))
        if since is not None:
            stmt = stmt.where(or_(Visit.exited_at.is_(None), Visit.exited_at >= _aware(since, "since")))
        if visitor is not None:
            stmt = stmt.where(Visit.visitor == visitor)
        if area is not None:
            stmt = stmt.where(Visit.area == area)
        if after_id is not None:
            stmt = stmt.where(Visit.id > after_id)
        return self._read(stmt)
