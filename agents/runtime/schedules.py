"""Site time and schedules shared by the capabilities: JST, weekdays, Japanese public holidays, closures."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import jpholiday

from sekisho.protocol.policy import Person, Schedule

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


def person_current(person: Person, today: date) -> bool:
    """Tell whether a person is active and inside valid_from/valid_until on this (JST) day."""
    if not person.active:
        return False
    if person.valid_from is not None and today < person.valid_from:
        return False
    return not (person.valid_until is not None and today > person.valid_until)
