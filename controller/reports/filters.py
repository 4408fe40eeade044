"""What a register or timeline is narrowed to: people, places, terminals, event types and a JST date range.

Date presets are calendar periods in JST (the site's time zone, whatever the server's is): today, this week
(a Japanese week starts on Monday) and this month, each as a half-open range [since, until) computed from an
injected clock reading, so the same filter gives the same rows in a test and at 23:59 on a Sunday.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal, get_args
from zoneinfo import ZoneInfo

JST = ZoneInfo("Asia/Tokyo")

Preset = Literal["today", "this_week", "this_month"]
PRESETS: tuple[Preset, ...] = get_args(Preset)
PRESET_LABELS: dict[Preset, tuple[str, str]] = {
    "today": ("今日", "today"),
    "this_week": ("今週", "this week"),
    "this_month": ("今月", "this month"),
}


class FilterError(ValueError):
    """A filter that cannot be applied (unknown preset, naive time, empty range); the text is bilingual."""


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=JST).astimezone(UTC)


def preset_range(preset: str, now: datetime) -> tuple[datetime, datetime]:
    """Return [since, until) in UTC of a JST calendar period containing now: today, this_week or this_month."""
    if now.tzinfo is None:
        raise FilterError("現在時刻にタイムゾーンが必要です / now needs a time zone")
    today = now.astimezone(JST).date()
    if preset == "today":
        return _midnight(today), _midnight(today + timedelta(days=1))
    if preset == "this_week":
        monday = today - timedelta(days=today.weekday())
        return _midnight(monday), _midnight(monday + timedelta(days=7))
    if preset == "this_month":
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
        return _midnight(first), _midnight(following)
    raise FilterError(f"期間の指定が不正です: {preset!r} / unknown period {preset!r} (today, this_week, this_month)")


def _aware(moment: datetime | None, name: str) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise FilterError(f"{name}: 時刻にはタイムゾーンが必要です / {name} needs a time zone (e.g. +09:00)")
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Filter:
    """What to show: every field narrows (None/empty: no condition); since/until bound the row's time, until exclusive.

    door matches a room door, locker or key cabinet by its policy id; terminal a terminal's policy id (its
    agent is looked up in the policy), agent an agent id directly; types the event types (door log and
    event registers: e.g. ``door.access_denied``, ``usb.blocked``; the media register: medium states such as
    ``in_store``, ``overdue``). medium narrows the media loans and the media register to one registered medium,
    kind the media register to a kind of medium (``usb_memory`` …), label to media whose name or id contains it.
    """

    person: str | None = None
    department: str | None = None
    door: str | None = None
    area: str | None = None
    terminal: str | None = None
    agent: str | None = None
    types: frozenset[str] = field(default_factory=frozenset)
    medium: str | None = None
    kind: str | None = None
    label: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    preset: Preset | None = None

    def __post_init__(self) -> None:
        """Normalise times to UTC and refuse naive ones or an empty range."""
        object.__setattr__(self, "since", _aware(self.since, "since"))
        object.__setattr__(self, "until", _aware(self.until, "until"))
        object.__setattr__(self, "types", frozenset(self.types))
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise FilterError("期間の終わりが始まり以前です / until must be after since")

    @classmethod
    def for_period(cls, preset: str, now: datetime, **fields: object) -> Filter:
        """Return a filter over a preset JST period (today, this_week, this_month) containing now."""
        since, until = preset_range(preset, now)
        return cls(since=since, until=until, preset=preset, **fields)  # type: ignore[arg-type]

    def narrowed(self, **fields: object) -> Filter:
        """Return a copy with some fields replaced."""
        return replace(self, **fields)  # type: ignore[arg-type]

    def is_empty(self) -> bool:
        """Tell whether nothing narrows the rows."""
        return self == Filter()
