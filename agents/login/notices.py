"""The security notice of the day (seed 002 好事例7): one of the policy's notices, rotating daily in JST."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

from sekisho.agents.login.decision import JST


def notice_for(day: date, notices: Sequence[str]) -> str | None:
    """Return the notice shown on ``day`` (the same all day, the next one tomorrow), or None without notices."""
    if not notices:
        return None
    # Days since 0001-01-01: consecutive days step through the list in order, and every terminal shows
    # the same notice on the same day without keeping any state.
    return notices[day.toordinal() % len(notices)]


def notice_now(moment: datetime, notices: Sequence[str]) -> str | None:
    """Return the notice for the JST date of ``moment`` (a UTC evening is already tomorrow in Japan)."""
    return notice_for(moment.astimezone(JST).date(), notices)
