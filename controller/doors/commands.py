"""Which signed door commands go to which agents: doors resolved to their agents by the policy in force.

The names, argument models and limits are the wire contract in ``protocol.door_commands``; the
arguments are built with those models, so what is sent is what the door agent accepts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sekisho.common.i18n import M_
from sekisho.protocol import mynumber
from sekisho.protocol.door_commands import (
    EMERGENCY_UNLOCK,
    FORGIVE_PASSBACK,
    MAX_UNLOCK_S,
    UNLOCK,
    CommandArgs,
    ForgiveArgs,
    ModeCommand,
    Selection,
    UnlockArgs,
    parse_args,
)
from sekisho.protocol.errors import Rejected
from sekisho.protocol.policy import Door, SitePolicy


class TargetError(ValueError):
    """The doors named do not resolve to agents (unknown door or area, nothing selected…)."""


@dataclass(frozen=True)
class DoorCommand:
    """One command for one agent: its name and arguments, ready to be signed."""

    agent: str
    name: str
    args: dict[str, Any]


def _wire(model: type[CommandArgs], **values: Any) -> dict[str, Any]:
    """Build a command's arguments with the agent's own check, so nothing it would refuse is sent."""
    # None is "not given": such an argument is left out (the agent refuses a null).
    given = {name: value for name, value in values.items() if value is not None}
    try:
        return parse_args(model, given).wire()
    except Rejected as err:
        raise TargetError(M_("the door agent would refuse this: %(detail)s", detail=err.detail)) from err


def _refuse_my_numbers(**fields: Any) -> None:
    """Refuse names that look like a My Number before any message below repeats them (never the value)."""
    found = [name for name, value in fields.items() if next(mynumber.find_my_numbers(value), None) is not None]
    if found:
        raise TargetError(M_("%(fields)s: looks like a My Number; refused, value not shown", fields=", ".join(found)))


def _door(policy: SitePolicy, door_id: str) -> Door:
    for door in policy.doors:
        if door.id == door_id:
            return door
    raise TargetError(M_("no door %(door)s in the policy in force", door=door_id))


def _check_area(policy: SitePolicy, area: str) -> None:
    if area not in {a.id for a in policy.areas}:
        raise TargetError(M_("no area %(area)s in the policy in force", area=area))


def unlock(policy: SitePolicy, door_id: str, seconds: int, requested_by: str | None) -> DoorCommand:
    """Build a one-off remote unlock of one door for its agent."""
    _refuse_my_numbers(door=door_id, requested_by=requested_by)
    if not 1 <= seconds <= MAX_UNLOCK_S:
        raise TargetError(M_("seconds must be 1..%(max)s", max=MAX_UNLOCK_S))
    door = _door(policy, door_id)
    args = _wire(UnlockArgs, door=door.id, seconds=seconds, requested_by=requested_by)
    return DoorCommand(door.agent, UNLOCK, args)


def set_mode(
    policy: SitePolicy,
    name: ModeCommand,
    *,
    doors: list[str] | None = None,
    area: str | None = None,
    all_doors: bool = False,
) -> list[DoorCommand]:
    """Build one mode command per agent for the doors named, the doors of an area, or every door.

    By area or --all, an emergency unlock selects room doors only: it is for getting people out, and
    lockers and key cabinets stay locked (they fail secure). Naming such a door explicitly is refused.
    """
    _refuse_my_numbers(door=doors, area=area)
    chosen = [bool(doors), area is not None, all_doors]
    if sum(chosen) != 1:
        raise TargetError(M_("give exactly one of --door, --area, --all"))
    if doors:
        selected = [_door(policy, d) for d in dict.fromkeys(doors)]
        if name == EMERGENCY_UNLOCK:
            kept = [d.id for d in selected if d.kind != "room"]
            if kept:
                raise TargetError(
                    M_("lockers and key cabinets are never emergency-unlocked: %(doors)s", doors=", ".join(kept))
                )
    else:
        if area is not None:
            _check_area(policy, area)
        selected = [d for d in policy.doors if all_doors or d.area == area]
        if name == EMERGENCY_UNLOCK:
            selected = [d for d in selected if d.kind == "room"]
    if not selected:
        raise TargetError(M_("no door matches"))
    by_agent: dict[str, list[str]] = defaultdict(list)
    for door in selected:
        by_agent[door.agent].append(door.id)
    return [DoorCommand(agent, name, _wire(Selection, doors=ids)) for agent, ids in sorted(by_agent.items())]


def forgive_passback(policy: SitePolicy, area: str, person: str | None) -> list[DoorCommand]:
    """Build the command that clears anti-passback state in an area, for every agent with a door there."""
    _refuse_my_numbers(area=area, person=person)
    _check_area(policy, area)
    if person is not None and person not in {p.id for p in policy.people}:
        raise TargetError(M_("no person %(person)s in the policy in force", person=person))
    agents = sorted({d.agent for d in policy.doors if d.area == area})
    if not agents:
        raise TargetError(M_("area %(area)s has no doors", area=area))
    args = _wire(ForgiveArgs, area=area, person=person)
    return [DoorCommand(agent, FORGIVE_PASSBACK, dict(args)) for agent in agents]
