"""Who is inside each area now (the muster list), with a "confirmed safe" tick per person.

The list is never paginated: in an evacuation every name must be on the one screen or sheet. A tick
belongs to one stay: it names the entry time it confirmed, so someone who leaves and comes back is
unticked again until someone confirms them anew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from sekisho.controller.reports.directory import Directory
from sekisho.controller.reports.paging import Column, Ref, Row, SortKey, Spec, Value
from sekisho.controller.store.models import AreaPresence, MusterCheck
from sekisho.controller.store.store import Store
from sekisho.protocol import mynumber, timefmt

PRESENCE = cast(Table, AreaPresence.__table__)
CHECKS = cast(Table, MusterCheck.__table__)

MUSTER_SPEC = Spec(
    "muster",
    "在室者一覧（避難確認）",
    "Who is inside (muster list)",
    (
        Column("area", "区域", "area", "ref"),
        Column("person", "氏名", "person", "ref"),
        Column("department", "所属", "department"),
        Column("entered_at", "入室日時", "entered", "time"),
        Column("door", "入室扉", "door", "ref"),
        Column("visitor", "来訪者", "visitor"),
        Column("escort", "付添者", "escort", "ref"),
        Column("safe", "安全確認", "confirmed safe"),
        Column("checked_by", "確認者", "confirmed by"),
        Column("checked_at", "確認日時", "confirmed at", "time"),
    ),
)


class MusterError(ValueError):
    """A tick that cannot be set: the person is not inside that area, or the confirmer is not valid."""


@dataclass(frozen=True, slots=True)
class MusterLine:
    """One person inside one area, and whether someone has confirmed them safe during this stay."""

    area: Ref
    person: Ref
    department: str | None
    entered_at: datetime | None
    door: Ref | None
    agent: str | None
    visitor: bool
    escort: Ref | None
    safe: bool
    checked_by: str | None
    checked_at: datetime | None

    def as_row(self) -> Row:
        """Return the line as a register row (for exports)."""
        values: dict[str, Value] = {
            "area": self.area,
            "person": self.person,
            "department": self.department,
            "entered_at": self.entered_at,
            "door": self.door,
            "visitor": "来訪者 / visitor" if self.visitor else None,
            "escort": self.escort,
            "safe": "✔ 確認済 / safe" if self.safe else "未確認 / not confirmed",
            "checked_by": self.checked_by,
            "checked_at": self.checked_at,
        }
        key = SortKey(0, self.entered_at, 0, f"{self.area.id}/{self.person.id}")
        flags = ("safe",) if self.safe else ("unconfirmed",)
        return Row(key, values, (self.agent,) if self.agent else (), "muster", flags)


@dataclass(frozen=True, slots=True)
class AreaMuster:
    """The people inside one area."""

    area: Ref
    kind: str | None
    lines: tuple[MusterLine, ...]

    @property
    def unconfirmed(self) -> int:
        """Return how many inside are not yet confirmed safe."""
        return sum(1 for line in self.lines if not line.safe)


def muster(store: Store, directory: Directory, area: str | None = None) -> list[AreaMuster]:
    """Return who is inside each area (every area of the policy, empty ones too), ticks included."""
    p, c = PRESENCE.c, CHECKS.c
    stmt = (
        select(PRESENCE, c.checked_by, c.checked_at, c.entered_at.label("checked_stay"))
        .select_from(PRESENCE.outerjoin(CHECKS, and_(c.area == p.area, c.person == p.person)))
        .where(p.inside.is_(True))
        .order_by(p.area, p.entered_at, p.person)
    )
    if area is not None:
        stmt = stmt.where(p.area == area)
    by_area: dict[str, list[MusterLine]] = {}
    with store.engine.connect() as conn:
        for r in conn.execute(stmt).mappings():
            safe = r["checked_at"] is not None and r["checked_stay"] == r["entered_at"]
            door = directory.door(r["door"])
            info = directory.doors.get(r["door"])
            pinfo = directory.person_info(r["person"])
            line = MusterLine(
                area=directory.area(r["area"]) or Ref(r["area"], r["area"]),
                person=directory.person(r["person"]) or Ref(r["person"], r["person"]),
                department=pinfo.department if pinfo else None,
                entered_at=r["entered_at"],
                door=door,
                agent=info.agent if info else None,
                visitor=bool(r["visitor"]),
                escort=directory.person(r["escort"]),
                safe=safe,
                checked_by=r["checked_by"] if safe else None,
                checked_at=r["checked_at"] if safe else None,
            )
            by_area.setdefault(r["area"], []).append(line)
    areas = [area] if area is not None else sorted(set(directory.areas) | set(by_area))
    out = []
    for a in areas:
        ref = directory.area(a) or Ref(a, a)
        kind = directory.areas.get(a, (a, None))[1]
        out.append(AreaMuster(ref, kind, tuple(by_area.get(a, []))))
    return out


def mark_safe(
    store: Store,
    area: str,
    person: str,
    *,
    by: str,
    at: datetime | None = None,
    on_change: Callable[[str, dict[str, Any]], None] | None = None,
) -> datetime | None:
    """Tick a person inside an area as confirmed safe for their current stay; return that stay's entry time."""
    when = at or timefmt.now()
    if not by or len(by) > 200:
        raise MusterError("確認者が不正です / confirmer must be 1..200 characters")
    mynumber.refuse_my_numbers({"by": by}, what="muster tick")
    p = PRESENCE.c
    dialect_insert = postgresql.insert if store.engine.dialect.name == "postgresql" else sqlite.insert

    def work(conn: Any) -> datetime | None:
        row = conn.execute(select(p.entered_at).where(p.area == area, p.person == person, p.inside.is_(True))).first()
        if row is None:
            raise MusterError(f"{person} は {area} に在室していません / {person} is not inside {area}")
        values = {"area": area, "person": person, "entered_at": row.entered_at, "checked_by": by, "checked_at": when}
        stmt = dialect_insert(CHECKS).values(**values)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["area", "person"],
                set_={"entered_at": row.entered_at, "checked_by": by, "checked_at": when},
            )
        )
        return cast(datetime | None, row.entered_at)

    stay = store.write(work)
    if on_change is not None:
        on_change("muster.mark_safe", {"area": area, "person": person, "by": by})
    return stay


def clear_safe(
    store: Store,
    area: str,
    person: str | None = None,
    *,
    on_change: Callable[[str, dict[str, Any]], None] | None = None,
) -> int:
    """Remove the tick of one person, or every tick of an area (a new roll call); return how many were removed."""
    c = CHECKS.c
    stmt = delete(CHECKS).where(c.area == area)
    if person is not None:
        stmt = stmt.where(c.person == person)
    removed = int(store.write(lambda conn: conn.execute(stmt).rowcount))
    if on_change is not None:
        on_change("muster.clear_safe", {"area": area, "person": person, "removed": removed})
    return removed
