"""Arguments of the door commands, checked strictly: an unknown key, a wrong type or a bad id is refused.

The command itself is already verified (signature, expiry, nonce) by ``agents.runtime.commands``; this
only makes sure a signed but malformed request does nothing rather than something unintended.

============================  ===================================================================
``door.unlock``               ``{"door": id, "seconds"?: 1..60, "requested_by"?: id}``
``door.emergency_unlock``     one of ``{"all": true}``, ``{"doors": [id, ...]}``, ``{"area": id}``;
``door.lockdown``             optional ``"group": id`` (a label carried into ``door.mode_changed``)
``door.normal``
``door.forgive_passback``     ``{"area": id, "person"?: id}``
============================  ===================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sekisho.protocol.errors import Rejected

BAD_ARGS = "bad_args"
UNKNOWN_DOOR = "unknown_door"
UNKNOWN_AREA = "unknown_area"
NO_DOORS = "no_doors"
LOCKDOWN = "lockdown"
NOT_RECORDED = "not_recorded"
MAX_UNLOCK_S = 60
MAX_DOORS = 256
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class UnlockArgs:
    """A remote unlock of one door."""

    door: str
    seconds: int | None
    requested_by: str | None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which doors a mode command is for: all, a list, or an area's; with an optional group label."""

    all: bool = False
    doors: tuple[str, ...] = ()
    area: str | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class ForgiveArgs:
    """Anti-passback forgiveness for an area (everyone, or one person)."""

    area: str
    person: str | None


def _args(raw: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise Rejected(BAD_ARGS, "args must be an object")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise Rejected(BAD_ARGS, f"unknown argument {unknown[0]!r}"[:300])
    return raw


def _ident(args: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = args.get(name)
    if value is None:
        if required or name in args:
            raise Rejected(BAD_ARGS, f"{name} is required" if required else f"{name} must not be null")
        return None
    if not isinstance(value, str) or not _IDENT.match(value):
        raise Rejected(BAD_ARGS, f"{name} must be an id (letters, digits, _ . -; up to 64)")
    return value


def parse_unlock(raw: Any) -> UnlockArgs:
    """Check ``door.unlock`` arguments."""
    args = _args(raw, {"door", "seconds", "requested_by"})
    door = _ident(args, "door", required=True)
    assert door is not None
    seconds = args.get("seconds")
    if "seconds" in args and (
        isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_UNLOCK_S
    ):
        raise Rejected(BAD_ARGS, f"seconds must be an integer from 1 to {MAX_UNLOCK_S}")
    return UnlockArgs(door, seconds, _ident(args, "requested_by", required=False))


def parse_selection(raw: Any) -> Selection:
    """Check the door selection of ``door.emergency_unlock`` / ``door.lockdown`` / ``door.normal``."""
    args = _args(raw, {"all", "doors", "area", "group"})
    chosen = [key for key in ("all", "doors", "area") if key in args]
    if len(chosen) != 1:
        raise Rejected(BAD_ARGS, "give exactly one of all, doors, area")
    group = _ident(args, "group", required=False)
    if chosen[0] == "all":
        if args["all"] is not True:
            raise Rejected(BAD_ARGS, "all must be true")
        return Selection(all=True, group=group)
    if chosen[0] == "area":
        return Selection(area=_ident(args, "area", required=True), group=group)
    doors = args["doors"]
    if not isinstance(doors, list) or not 1 <= len(doors) <= MAX_DOORS:
        raise Rejected(BAD_ARGS, f"doors must be a list of 1 to {MAX_DOORS} door ids")
    if not all(isinstance(d, str) and _IDENT.match(d) for d in doors):
        raise Rejected(BAD_ARGS, "doors must be door ids")
    if len(set(doors)) != len(doors):
        raise Rejected(BAD_ARGS, "doors names a door twice")
    return Selection(doors=tuple(doors), group=group)


def parse_forgive(raw: Any) -> ForgiveArgs:
    """Check ``door.forgive_passback`` arguments."""
    args = _args(raw, {"area", "person"})
    area = _ident(args, "area", required=True)
    assert area is not None
    return ForgiveArgs(area, _ident(args, "person", required=False))
