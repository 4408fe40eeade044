"""How the console (and the reports) show times and people: JST, Japanese dates, names with readings.

Plain functions taking the display language, plus `install_filters`, which registers them as Jinja2
filters that read the language from the template's `lang` variable (Japanese when absent). The pages and
the PDF/CSV exports share them so a time reads the same on screen and on paper.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Final, Literal, TypeGuard
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_datetime
from jinja2 import Environment, pass_context
from jinja2.runtime import Context
from markupsafe import Markup, escape

Lang = Literal["ja", "en"]
LANGUAGES: Final[tuple[Lang, ...]] = ("ja", "en")
DEFAULT_LANG: Final[Lang] = "ja"
JST: Final = ZoneInfo("Asia/Tokyo")

# CLDR patterns: Japanese paper forms write 2026/12/06 (日) with 24-hour times; the English form follows
# the British day-month order, which reads unambiguously next to the Japanese one.
_DATETIME: Final[dict[Lang, str]] = {"ja": "y/MM/dd (EEE) HH:mm", "en": "EEE d MMM y HH:mm"}
_DATETIME_SECONDS: Final[dict[Lang, str]] = {"ja": "y/MM/dd (EEE) HH:mm:ss", "en": "EEE d MMM y HH:mm:ss"}
_DATE: Final[dict[Lang, str]] = {"ja": "y/MM/dd (EEE)", "en": "EEE d MMM y"}


def is_lang(value: object) -> TypeGuard[Lang]:
    """Tell whether a value is one of the console's languages."""
    return value in LANGUAGES


def as_lang(value: object) -> Lang:
    """Return the value if it is a console language, else the default (Japanese)."""
    return value if is_lang(value) else DEFAULT_LANG


def to_jst(moment: datetime) -> datetime:
    """Convert an aware datetime to JST; a naive one is refused (the store and the wire are always aware)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        # Guessing UTC or local time for a naive value would shift a record by nine hours without a word.
        raise ValueError("naive datetime: cannot show it in JST")
    return moment.astimezone(JST)


def jst(moment: datetime | None, lang: Lang = DEFAULT_LANG, *, seconds: bool = False) -> str:
    """Format a moment in JST: `2026/12/06 (日) 14:05` (ja) or `Sun 6 Dec 2026 14:05` (en); '' for None."""
    if moment is None:
        return ""
    patterns = _DATETIME_SECONDS if seconds else _DATETIME
    return format_datetime(to_jst(moment), patterns[lang], tzinfo=JST, locale=lang)


def jst_date(day: datetime | date | None, lang: Lang = DEFAULT_LANG) -> str:
    """Format the JST calendar day: `2026/12/06 (日)` (ja) or `Sun 6 Dec 2026` (en); '' for None."""
    if day is None:
        return ""
    if isinstance(day, datetime):
        day = to_jst(day).date()
    return format_date(day, _DATE[lang], locale=lang)


def jst_time(moment: datetime | None) -> str:
    """Format the JST time of day, 24-hour `14:05` (the same in both languages); '' for None."""
    if moment is None:
        return ""
    return to_jst(moment).strftime("%H:%M")


def iso_jst(moment: datetime | None) -> str:
    """Format for exports and the API: ISO 8601 in JST with its offset, `2026-12-06T14:05:00+09:00`."""
    if moment is None:
        return ""
    return to_jst(moment).isoformat(timespec="seconds")


def jst_today(now: datetime) -> date:
    """Return the JST calendar day a UTC clock reading falls on (injected clocks, never the wall clock)."""
    return to_jst(now).date()


def utc(moment: datetime) -> datetime:
    """Return an aware moment in UTC (for queries against the store)."""
    return to_jst(moment).astimezone(UTC)


def person_text(name: str, kana: str | None = None) -> str:
    """Return a person as plain text for CSV and PDF: `山田 太郎（やまだ たろう）`, or the name alone."""
    if kana and kana != name:
        return f"{name}（{kana}）"
    return name


def idhover(text: str, ident: object | None) -> Markup:
    """Return the text with the id on hover (title attribute); ids are never shown in the page body."""
    if ident is None or ident == "":
        return Markup("<span>{}</span>").format(text)
    return Markup('<span class="idhover" title="{}">{}</span>').format(f"ID: {ident}", text)


def person(name: str | None, kana: str | None = None, ident: object | None = None) -> Markup:
    """Return a person's kanji name with the kana reading as ruby, and the id on hover.

    The reading is in <rt>, with <rp> brackets for browsers and screen readers that do not render ruby,
    so it is there for anyone unsure how a name is read without taking a column of its own.
    """
    if not name:
        # An unknown person still gets a visible placeholder, never an empty cell that reads as "nobody".
        return idhover("—", ident)
    if kana and kana != name:
        shown = Markup("<ruby>{}<rp>（</rp><rt>{}</rt><rp>）</rp></ruby>").format(name, kana)
    else:
        shown = escape(name)
    if ident is None or ident == "":
        return Markup('<span class="person">{}</span>').format(shown)
    return Markup('<span class="person idhover" title="{}">{}</span>').format(f"ID: {ident}", shown)


# Status is never colour alone: each state has its own symbol and the text says it (WCAG 1.4.1).
_STATUS_SYMBOL: Final[dict[str, str]] = {"ok": "✓", "failed": "✗", "warning": "!", "unknown": "?"}


def status(state: str, text: str) -> Markup:
    """Return a status as symbol and text (class status-<state> only adds colour): ok, failed, warning, unknown."""
    known = state if state in _STATUS_SYMBOL else "unknown"
    return Markup(
        '<span class="status status-{}"><span class="status-symbol" aria-hidden="true">{}</span> {}</span>'
    ).format(known, _STATUS_SYMBOL[known], text)


def _context_lang(context: Context) -> Lang:
    return as_lang(context.get("lang"))


@pass_context
def _jst_filter(context: Context, moment: datetime | None, seconds: bool = False) -> str:
    return jst(moment, _context_lang(context), seconds=seconds)


@pass_context
def _jst_date_filter(context: Context, day: datetime | date | None) -> str:
    return jst_date(day, _context_lang(context))


def _person_filter(subject: object, kana: str | None = None, ident: object | None = None) -> Markup:
    # `{{ user | person }}` for anything with name/kana/id attributes, or `{{ name | person(kana, id) }}`.
    if isinstance(subject, str) or subject is None:
        return person(subject, kana, ident)
    return person(
        getattr(subject, "name", None) or getattr(subject, "display_name", None),
        getattr(subject, "kana", None) or getattr(subject, "name_kana", None),
        ident if ident is not None else getattr(subject, "id", None) or getattr(subject, "user_id", None),
    )


def install_filters(env: Environment) -> None:
    """Register the jst, jst_date, jst_time, iso_jst, person, person_text, idhover filters and status()."""
    env.filters["jst"] = _jst_filter
    env.filters["jst_date"] = _jst_date_filter
    env.filters["jst_time"] = jst_time
    env.filters["iso_jst"] = iso_jst
    env.filters["person"] = _person_filter
    env.filters["person_text"] = person_text
    env.filters["idhover"] = idhover
    env.globals["status"] = status
