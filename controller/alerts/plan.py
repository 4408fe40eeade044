"""The escalation planner: who is on duty at a moment, and when each step of an escalation chain is due.

Pure and deterministic: every function takes the moment it judges (aware datetimes, read in JST whatever
zone they carry) and reads no clock, file or network. The alert job (its lead) records the last position it
has notified and asks `positions_due` what else is due now, so a controller that was down catches up on every
missed step exactly once.

Who is on duty, for a roster (policy ``alerts.rosters``) at a moment:

- its ``business`` contacts when the roster's schedule (``hours``) allows the moment: a listed weekday,
  ``start <= time < end``, the day not a closure (``exception_days``), and not a Japanese public holiday
  unless the schedule has ``on_public_holidays: true`` (the site works that holiday, so its business-hours
  people are on duty inside the window);
- otherwise, on a Japanese public holiday (jpholiday, 振替休日 and 国民の休日 included), its ``holiday``
  contacts (``after_hours`` when the roster names none) — also outside the window of a holiday the site works,
  and on a closure day that is a holiday;
- otherwise its ``after_hours`` contacts (nights, weekends, closure days).

The schedule rule is the one the agents decide by (protocol/schedules.py ``schedule_allows``).

Chain timing: a chain runs ``1 + repeat`` rounds. Round 0 starts when the alert opened; step ``i`` of round
``r`` is due ``steps[i].after_minutes`` after the round started; round ``r + 1`` starts
``steps[-1].after_minutes + loop_after_minutes`` after round ``r`` started.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import jpholiday

from sekisho.protocol.alert_policy import AlertSettings, Contact, Escalation, Roster, Step
from sekisho.protocol.policy import Schedule
from sekisho.protocol.schedules import JST, schedule_allows

# JST is a fixed offset (Japan has no daylight saving), so chain arithmetic done in it is exact elapsed time
# even when the caller's datetimes carry a zone with daylight saving.

ROSTER_PREFIX = "roster:"

Shift = Literal["business", "after_hours", "holiday"]


@dataclass(frozen=True, order=True)
class Position:
    """A place in an escalation chain: step ``step`` of round ``round`` (ordered as the chain runs)."""

    round: int
    step: int


def _jst(moment: datetime) -> datetime:
    """Return an aware moment in JST; a naive one is refused (its zone would be a guess)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"alerts: a naive datetime ({moment.isoformat()}) cannot be placed in JST")
    return moment.astimezone(JST)


def _roster(settings: AlertSettings, roster_id: str) -> Roster:
    for roster in settings.rosters:
        if roster.id == roster_id:
            return roster
    known = ", ".join(r.id for r in settings.rosters) or "none"
    raise KeyError(f"alerts: unknown roster {roster_id!r} (known: {known})")


def _contacts(settings: AlertSettings, ids: Iterable[str]) -> list[Contact]:
    by_id = {c.id: c for c in settings.contacts}
    found: list[Contact] = []
    for contact_id in ids:
        if contact_id not in by_id:
            raise KeyError(f"alerts: unknown contact {contact_id!r}")
        found.append(by_id[contact_id])
    return found


def _dedupe(contacts: Iterable[Contact]) -> list[Contact]:
    seen: set[str] = set()
    unique: list[Contact] = []
    for contact in contacts:
        if contact.id not in seen:
            seen.add(contact.id)
            unique.append(contact)
    return unique


def duty_shift(settings: AlertSettings, schedules: Mapping[str, Schedule], roster_id: str, at: datetime) -> Shift:
    """Tell which of a roster's shifts is on duty at this moment (JST): business, after_hours or holiday."""
    roster = _roster(settings, roster_id)
    if roster.hours not in schedules:
        raise KeyError(f"alerts: roster {roster_id!r} names unknown schedule {roster.hours!r}")
    local = _jst(at)
    if schedule_allows(schedules[roster.hours], local):
        return "business"
    if jpholiday.is_holiday(local.date()):
        return "holiday"
    return "after_hours"


def on_duty(settings: AlertSettings, schedules: Mapping[str, Schedule], roster_id: str, at: datetime) -> list[Contact]:
    """Return the roster's contacts on duty at this moment (JST), in the roster's order."""
    roster = _roster(settings, roster_id)
    shift = duty_shift(settings, schedules, roster_id, at)
    if shift == "business":
        ids = roster.business
    elif shift == "holiday":
        ids = roster.holiday if roster.holiday is not None else roster.after_hours
    else:
        ids = roster.after_hours
    return _dedupe(_contacts(settings, ids))


def recipients(settings: AlertSettings, schedules: Mapping[str, Schedule], step: Step, at: datetime) -> list[Contact]:
    """Return whom a step notifies at this moment: its contacts and rosters on duty, each contact once, in order."""
    found: list[Contact] = []
    for who in step.notify:
        if who.startswith(ROSTER_PREFIX):
            found.extend(on_duty(settings, schedules, who.removeprefix(ROSTER_PREFIX), at))
        else:
            found.extend(_contacts(settings, [who]))
    return _dedupe(found)


def first_position() -> Position:
    """Return the chain's first position: round 0, step 0."""
    return Position(0, 0)


def _check(chain: Escalation, pos: Position) -> None:
    if not (0 <= pos.round <= chain.repeat and 0 <= pos.step < len(chain.steps)):
        raise ValueError(
            f"alerts: escalation {chain.id!r} has no position {pos} "
            f"({1 + chain.repeat} rounds of {len(chain.steps)} steps)"
        )


def _round_length(chain: Escalation) -> timedelta:
    return timedelta(minutes=chain.steps[-1].after_minutes + chain.loop_after_minutes)


def due_at(chain: Escalation, started_at: datetime, pos: Position) -> datetime:
    """Return when a chain position is due (JST) for an alert whose chain started at ``started_at``."""
    _check(chain, pos)
    round_start = _jst(started_at) + pos.round * _round_length(chain)
    return round_start + timedelta(minutes=chain.steps[pos.step].after_minutes)


def next_position(chain: Escalation, pos: Position) -> Position | None:
    """Return the position after ``pos``, or None after the last step of the last round."""
    if pos.round < 0 or pos.step < 0:
        raise ValueError(f"alerts: negative chain position {pos}")
    # Total over positions past the chain's end too: a policy update may shorten a chain under a running alert;
    # a recorded step beyond the new last step ends its round, a round beyond the new last one ends the chain.
    if pos.round > chain.repeat:
        return None
    if pos.step + 1 < len(chain.steps):
        return Position(pos.round, pos.step + 1)
    return Position(pos.round + 1, 0) if pos.round < chain.repeat else None


def positions_due(chain: Escalation, started_at: datetime, after: Position | None, now: datetime) -> list[Position]:
    """List every position after ``after`` (None: from the start) due by ``now``, in chain order."""
    now_jst = _jst(now)
    pos = first_position() if after is None else next_position(chain, after)
    due: list[Position] = []
    # Due times never decrease along the chain (steps are in after_minutes order, loops last >= 1 minute),
    # so the first position not yet due ends the list.
    while pos is not None and due_at(chain, started_at, pos) <= now_jst:
        due.append(pos)
        pos = next_position(chain, pos)
    return due


def next_due_at(chain: Escalation, started_at: datetime, after: Position | None) -> datetime | None:
    """Return when the position after ``after`` (None: the first) is due, or None when the chain is done."""
    pos = first_position() if after is None else next_position(chain, after)
    return None if pos is None else due_at(chain, started_at, pos)


def retrigger_at(chain: Escalation, acknowledged_at: datetime) -> datetime | None:
    """Return when an acknowledged but unresolved alert starts its chain again (JST), or None if it never does."""
    if chain.ack_timeout_minutes is None:
        return None
    return _jst(acknowledged_at) + timedelta(minutes=chain.ack_timeout_minutes)
