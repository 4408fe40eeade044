"""The media register (電子媒体台帳): every registered medium, where it is now, who holds it, when it is due.

An inventory, not a log: its rows are the media of the policy in force (tens to a few hundred), read whole
from ``MediaService.inventory`` (the function ``sekisho media inventory`` and ``GET /api/v1/media`` call), with
each medium's number of loans and latest loan from the loan register. Its records are policy versions and the
append-only ``media_loans`` table, not signed event chains, so its verification line says "not hash-chained"
as the media loans register's does. The order is the one a facility manager works through: overdue first,
then out on loan, reserved, in store, and last the media taken out of use (lost, retired, disposed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import Table, func, select

from sekisho.controller.media.service import MediaService, MediumStatus
from sekisho.controller.reports.directory import Directory
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.labels import MEDIUM_KINDS, MEDIUM_STATES, both
from sekisho.controller.reports.paging import Column, Row, SortKey, Spec, Value
from sekisho.controller.reports.service import Reading
from sekisho.controller.reports.verify import ChainStatus
from sekisho.controller.store.models import LoanRecord

MEDIA_LOANS = cast(Table, LoanRecord.__table__)
NAME: Final = "media-register"
# The states in the order the register lists them; the filter form offers them in this order too.
STATE_ORDER: Final[tuple[str, ...]] = tuple(MEDIUM_STATES)

C = Column
MEDIA_REGISTER_SPEC: Final = Spec(
    NAME,
    "電子媒体台帳",
    "Media register",
    (
        C("medium", "媒体", "medium", "ref"),
        C("kind", "種類", "kind"),
        C("owner", "管理部署", "managed by"),
        C("state", "状態", "state"),
        C("person", "借用者", "borrower", "ref"),
        C("department", "借用者の所属", "borrower's department"),
        C("terminals", "使用端末", "terminals"),
        C("ends_at", "返却期限", "due", "time"),
        C("last_loan_at", "最終貸出", "last loan", "time"),
        C("loans", "貸出回数", "loans", "count"),
        C("last_seen_at", "最終確認", "last seen", "time"),
    ),
)


@dataclass(frozen=True, slots=True)
class MediumLine:
    """One medium as the register shows it: the row, and what the console's lend/return forms need."""

    row: Row
    medium_id: str
    state: str
    loan_id: str | None


def loan_history(conn_factory: Callable[[], Any]) -> dict[str, tuple[int, datetime]]:
    """Return, per medium id, how many loans it has had and when the latest one started."""
    m = MEDIA_LOANS.c
    stmt = select(m.medium, func.count(), func.max(m.starts_at)).group_by(m.medium)
    with conn_factory() as conn:
        return {medium: (int(count), latest) for medium, count, latest in conn.execute(stmt)}


def _state(line: MediumStatus) -> str:
    # inventory() names a loan's state; "returned"/"revoked" never reach it (it reads outstanding loans only).
    return "in_store" if line.state in ("returned", "revoked") else line.state


def _matches(flt: Filter, line: MediumStatus, state: str) -> bool:
    medium = line.medium
    if flt.medium is not None and medium.id != flt.medium:
        return False
    if flt.kind is not None and medium.kind != flt.kind:
        return False
    if flt.types and state not in flt.types:
        return False
    if flt.person is not None and (line.loan is None or line.loan.person != flt.person):
        return False
    if flt.department is not None and medium.department != flt.department:
        return False
    if flt.label is not None:
        wanted = flt.label.casefold()
        if wanted not in medium.name.casefold() and wanted not in medium.id.casefold():
            return False
    return True


def media_lines(
    media: MediaService, directory: Directory, flt: Filter, now: datetime, history: dict[str, tuple[int, datetime]]
) -> list[MediumLine]:
    """Return the register's lines for a filter, overdue first (see the module docstring)."""
    lines: list[MediumLine] = []
    for status in media.inventory(now):
        state = _state(status)
        if not _matches(flt, status, state):
            continue
        loan = status.loan
        count, latest = history.get(status.medium.id, (0, None))
        holder = directory.person_info(loan.person) if loan else None
        terminals = [ref.text() for t in (loan.terminals if loan else []) if (ref := directory.terminal(t))]
        values: dict[str, Value] = {
            "medium": directory.medium(status.medium.id),
            "kind": both(MEDIUM_KINDS.get(status.medium.kind, (status.medium.kind, status.medium.kind))),
            "owner": status.medium.department,
            "state": both(MEDIUM_STATES.get(state, (state, state))),
            "person": directory.person(loan.person) if loan else None,
            "department": holder.department if holder else None,
            "terminals": ", ".join(terminals) or None,
            "ends_at": loan.ends_at if loan else None,
            "last_loan_at": latest,
            "loans": count,
            "last_seen_at": status.last_seen_at,
        }
        segment = STATE_ORDER.index(state) if state in STATE_ORDER else len(STATE_ORDER)
        row = Row(SortKey(segment, None, 0, status.medium.id), values, (), "medium", (state,))
        lines.append(MediumLine(row, status.medium.id, state, loan.id if loan else None))
    lines.sort(key=lambda line: (line.row.key.segment, line.medium_id))
    return lines


def not_chained(at: datetime) -> ChainStatus:
    """Return the verification line of the register: its records are not in a signed chain."""
    return ChainStatus("not_chained", (), checked_at=at)


def media_reading(lines: list[MediumLine], flt: Filter, directory: Directory, as_of: datetime) -> Reading:
    """Return the register's lines as an export reading (CSV / PDF, with the filter and verification printed)."""
    rows = [line.row for line in lines]
    return Reading(MEDIA_REGISTER_SPEC, flt, iter(rows), as_of, not_chained(as_of), directory, len(rows))
