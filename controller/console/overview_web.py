"""The site overview (現況): doors open now and their modes, keys out (overdue first), agents, open findings.

Read from the door registers (controller/doors), the fleet's health (controller/fleet/health.py) and the
findings, and refreshed live like the muster list (htmx polling of ``/console/overview/fragment``; without
htmx a plain refresh link). Sections a role may not read (agents without fleet.read, findings without
alerts.read) are left out rather than shown empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, cast

from fastapi import APIRouter, Request, Response
from sqlalchemy import Table, select

from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.console import nav, templating
from sekisho.controller.console.i18n import N_
from sekisho.controller.console.muster_web import REFRESH_S, reports_of
from sekisho.controller.doors.registers import DoorRegisters, loan_state
from sekisho.controller.fleet.health import Thresholds, count_states, fleet_health
from sekisho.controller.reports.paging import Ref
from sekisho.controller.store.models import DoorLogEntry
from sekisho.controller.store.store import Store

router = APIRouter(prefix="/console/overview", tags=["console"], include_in_schema=False)
nav.register(nav.NavItem("/console/overview", N_("Site overview"), Permission.REGISTERS_READ, built=True))
Viewer = Annotated[Actor, require(Permission.REGISTERS_READ)]

_LOG = cast(Table, DoorLogEntry.__table__)
# The door log types that say whether a door stands open, and which mode it is in.
_OPEN_TYPES: Final = ("door.opened", "door.closed")
MODE_LABELS: Final = {
    "normal": N_("Normal"),
    "lockdown": N_("Locked down"),
    "emergency_unlock": N_("Emergency unlock"),
}
AGENT_STATES: Final = {
    "online": ("ok", N_("online")),
    "stale": ("warning", N_("stale")),
    "offline": ("failed", N_("offline")),
    "revoked": ("failed", N_("revoked")),
}


@dataclass(frozen=True, slots=True)
class DoorNow:
    """One door as the registers last saw it: open or closed (None: never reported), its mode, since when."""

    door: Ref
    kind: str | None
    area: Ref | None
    open: bool | None
    since: datetime | None
    mode: str


def door_states(request: Request) -> list[DoorNow]:
    """Return every door of the policy with its last reported state (door log), open doors first."""
    reports = reports_of(request)
    directory = reports.directory()
    store: Store = request.app.state.sekisho.store
    out: list[DoorNow] = []
    c = _LOG.c
    with store.engine.connect() as conn:
        for door_id, info in sorted(directory.doors.items()):
            last = conn.execute(
                select(c.type, c.occurred_at)
                .where(c.door == door_id, c.type.in_(_OPEN_TYPES))
                .order_by(c.occurred_at.desc(), c.id.desc())
                .limit(1)
            ).first()
            mode_row = conn.execute(
                select(c.reason)
                .where(c.door == door_id, c.type == "door.mode_changed")
                .order_by(c.occurred_at.desc(), c.id.desc())
                .limit(1)
            ).first()
            out.append(
                DoorNow(
                    door=directory.door(door_id) or Ref(door_id, door_id),
                    kind=info.kind,
                    area=directory.area(info.area) if info.area else None,
                    open=None if last is None else last.type == "door.opened",
                    since=None if last is None else last.occurred_at,
                    mode=_mode_of(mode_row),
                )
            )
    out.sort(key=lambda d: (not d.open, d.mode == "normal", d.door.name))
    return out


def _mode_of(row: Any) -> str:
    # The projector keeps a door.mode_changed's new mode as the log line's reason (controller/doors/apply.py).
    if row is None or row.reason not in MODE_LABELS:
        return "normal"
    return str(row.reason)


@dataclass(frozen=True, slots=True)
class KeysOut:
    """The keys out now: how many, how many overdue, and the loans (overdue first)."""

    out: int
    overdue: int
    loans: list[dict[str, Any]]


def keys_out(request: Request) -> KeysOut:
    """Return the open key loans with names, overdue first."""
    state = request.app.state.sekisho
    now = state.clock()
    directory = reports_of(request).directory()
    loans = DoorRegisters(state.store).loans(open_=True, limit=1000, now=now)
    rows = []
    for loan in loans:
        current = loan_state(loan, now)
        rows.append(
            {
                "key": loan.key,
                "cabinet": loan.cabinet,
                "person": directory.person(loan.person) if loan.person else None,
                "taken_at": loan.taken_at,
                "due_at": loan.due_at,
                "overdue": current == "overdue",
            }
        )
    rows.sort(key=lambda r: (not r["overdue"], r["due_at"] or now))
    return KeysOut(len(rows), sum(1 for r in rows if r["overdue"]), rows)


def _context(request: Request, actor: Actor) -> dict[str, Any]:
    state = request.app.state.sekisho
    now = state.clock()
    doors = door_states(request)
    context: dict[str, Any] = {
        "doors": doors,
        "doors_open": sum(1 for d in doors if d.open),
        "doors_not_normal": sum(1 for d in doors if d.mode != "normal"),
        "mode_labels": MODE_LABELS,
        "agent_states": AGENT_STATES,
        "keys": keys_out(request),
        "agents": None,
        "findings": None,
        "as_of": now,
        "refresh_s": REFRESH_S,
        "may_command": actor.may(Permission.DOORS_COMMAND),
    }
    if actor.may(Permission.FLEET_READ):
        agents = fleet_health(state.store, Thresholds.from_config(state.config), now)
        context["agents"] = {"counts": count_states(agents), "list": agents}
    if actor.may(Permission.ALERTS_READ):
        context["findings"] = len(state.store.list_findings(open_only=True))
    return context


@router.get("")
def overview_page(request: Request, actor: Viewer) -> Response:
    """Show the site at a glance, refreshed live."""
    return templating.render(request, "live/overview.html", _context(request, actor), viewer=actor)


@router.get("/fragment")
def overview_fragment(request: Request, actor: Viewer) -> Response:
    """Return the overview's panels alone (htmx swaps them in every few seconds)."""
    return templating.render(request, "live/overview_panels.html", _context(request, actor), viewer=actor)
