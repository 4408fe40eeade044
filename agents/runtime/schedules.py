"""Site time and schedules shared by the capabilities: JST, weekdays, Japanese public holidays, closures.

The schedule rule itself lives in protocol/schedules.py (the controller's alert rosters read schedules too).
"""

from __future__ import annotations

from datetime import date

from sekisho.protocol.policy import Person
from sekisho.protocol.schedules import JST, schedule_allows, schedule_refusal

__all__ = ["JST", "person_current", "schedule_allows", "schedule_refusal"]


def person_current(person: Person, today: date) -> bool:
    """Tell whether a person is active and inside valid_from/valid_until on this (JST) day."""
    if not person.active:
        return False
    if person.valid_from is not None and today < person.valid_from:
        return False
    return not (person.valid_until is not None and today > person.valid_until)
