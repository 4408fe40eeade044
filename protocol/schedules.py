"""When a schedule allows a moment: JST weekdays and window, Japanese public holidays, site closure days.

Shared by the agents (doors and terminal logins decide by it) and the controller (alert rosters route by
business hours), so both sides read a ``Schedule`` the same way. Pure: the moment is a parameter.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import jpholiday

from sekisho.protocol.policy import Schedule

JST = timezone(timedelta(hours=9), "JST")  # Japan has no daylight saving, so a fixed offset is exact

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def schedule_allows(schedule: Schedule, moment: datetime) -> bool:
    """Tell whether a schedule allows this moment (JST weekday and window, holidays and closures)."""
    local = moment.astimezone(JST)
    day = local.date()
    if day in schedule.exception_days:
        return False
    if jpholiday.is_holiday(day) and not schedule.on_public_holidays:
        return False
    if _WEEKDAYS[day.weekday()] not in schedule.weekdays:
        return False
    return schedule.start <= local.time().replace(tzinfo=None) < schedule.end


def schedule_refusal(schedule: Schedule, moment: datetime) -> str | None:
    """Say why a schedule refuses this moment ("exception_day", "holiday", "outside_hours"), or None."""
    day = moment.astimezone(JST).date()
    if day in schedule.exception_days:
        return "exception_day"
    if jpholiday.is_holiday(day) and not schedule.on_public_holidays:
        return "holiday"
    return None if schedule_allows(schedule, moment) else "outside_hours"
