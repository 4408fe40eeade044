"""What the register pages, the JSON API and the exports share: the registers offered, the filter read from
GET parameters, the area manager's scope, and the one Reports instance of the app.

A filter arrives as the same query string on the page (`/console/registers/rooms?person=p-0001&preset=today`),
on the JSON API (`/api/v1/registers/rooms?…`) and on the exports (`/api/v1/registers/rooms.csv?…`), so an export
button is the page's own query string on another path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Final

from fastapi import HTTPException, Request, status

from sekisho.controller.accounts.roles import Actor, Permission
from sekisho.controller.console.formats import JST
from sekisho.controller.console.i18n import N_
from sekisho.controller.reports.filters import PRESETS, Filter, FilterError
from sekisho.controller.reports.service import Reports
from sekisho.controller.reports.timelines import Subject, SubjectKind

# Ids of people, doors, areas and terminals as the policy spells them; anything else is refused before a query.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
TYPE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
MAX_TYPES: Final = 20
DEFAULT_LIMIT: Final = 50
# Cursors of the pages before the current one, kept in the query string so "previous" needs no server state.
MAX_TRAIL: Final = 20


@dataclass(frozen=True)
class RegisterPage:
    """One register as the console offers it: the reports' name, the page path, its label and permission.

    ``scoped``: an area register, which an area manager may read for their own areas (the query is narrowed
    to one of them); the others are site-wide and need a site-wide permission.
    """

    name: str
    path: str
    label: str
    permission: Permission
    scoped: bool = False
    # Event types (or, for keys, loan states) the filter form offers.
    types: tuple[str, ...] = ()
    # False for an inventory read whole (the media register, media_register_web.py): it has its own routes,
    # not the keyset page routes the register loops add.
    paged: bool = True


REGISTER_PAGES: Final[tuple[RegisterPage, ...]] = (
    RegisterPage(
        "keys", "/console/keys", N_("Key-lending register"), Permission.REGISTERS_READ,
        types=("overdue", "open", "returned"),
    ),
    RegisterPage(
        "rooms", "/console/registers/rooms", N_("Room entry/exit log"), Permission.AREAS_READ, scoped=True,
        types=("door.access_granted", "door.access_denied", "door.opened", "door.closed", "door.alarm",
               "door.unlocked"),
    ),
    RegisterPage(
        "lockers", "/console/registers/lockers", N_("Locker log"), Permission.REGISTERS_READ,
        types=("door.access_granted", "door.access_denied", "door.opened", "door.closed", "door.alarm"),
    ),
    RegisterPage("visits", "/console/registers/visits", N_("Visitor log"), Permission.AREAS_READ, scoped=True),
    RegisterPage(
        "logins", "/console/registers/logins", N_("Login history"), Permission.REGISTERS_READ,
        types=("login.granted", "login.denied", "session.locked", "session.unlocked", "session.ended",
               "session.lock_failed"),
    ),
    RegisterPage(
        "media-register", "/console/registers/media-register", N_("Media register"), Permission.MEDIA_READ,
        types=("overdue", "on_loan", "reserved", "in_store", "lost", "retired", "disposed"), paged=False,
    ),
    RegisterPage("media", "/console/registers/media", N_("Media loans"), Permission.MEDIA_READ),
    RegisterPage(
        "usb", "/console/registers/usb", N_("USB device log"), Permission.REGISTERS_READ,
        types=("usb.inserted", "usb.allowed", "usb.blocked", "usb.rejected", "usb.removed", "usb.write_attempt"),
    ),
)  # fmt: skip
PAGES_BY_NAME: Final = {page.name: page for page in REGISTER_PAGES}

# Which timelines there are and who may read them: an area's for area managers (their own areas), the rest
# site-wide (one person's day crosses every area).
TIMELINE_KINDS: Final[dict[SubjectKind, tuple[str, Permission]]] = {
    "person": (N_("Person timeline"), Permission.REGISTERS_READ),
    "door": (N_("Door timeline"), Permission.REGISTERS_READ),
    "area": (N_("Area timeline"), Permission.AREAS_READ),
    "terminal": (N_("Terminal timeline"), Permission.REGISTERS_READ),
}


class QueryError(ValueError):
    """A filter, cursor or limit that cannot be used; the text is bilingual (日本語 / English)."""


def reports_of(request: Request) -> Reports:
    """Return the app's Reports (one per app: it caches names and the chains' verification walk)."""
    found = getattr(request.app.state, "sekisho_reports", None)
    if isinstance(found, Reports):
        return found
    state = request.app.state.sekisho
    # Through state.clock each time: a test (or the demo) that moves the clock moves "overdue" with it.
    reports = Reports(state.store, clock=lambda: state.clock())
    request.app.state.sekisho_reports = reports
    return reports


def one_param(request: Request, name: str, pattern: re.Pattern[str] | None = ID_PATTERN, size: int = 64) -> str | None:
    """Return a query parameter given at most once, stripped, printable, within size and the pattern (None if empty)."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise QueryError(f"{name} は1つだけ指定してください / give {name} once")
    value = values[0].strip() if values else ""
    if not value:
        return None
    if len(value) > size or not value.isprintable() or (pattern is not None and not pattern.fullmatch(value)):
        raise QueryError(f"{name} の値が不正です / invalid {name}")
    return value


def _day(request: Request, name: str) -> date | None:
    text = one_param(request, name, re.compile(r"\d{4}-\d{2}-\d{2}"), 10)
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise QueryError(f"{name}: 日付は YYYY-MM-DD で指定してください / {name} must be a date YYYY-MM-DD") from None


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=JST)


def parse_filter(request: Request, now: datetime, *, default_preset: str | None = None) -> Filter:
    """Read a Filter from the query string: person, department, door, area, terminal, medium, type…, from, to, preset.

    from/to are JST calendar days, both included; a preset (today, this_week, this_month) wins over them.
    """
    types = [t.strip() for t in request.query_params.getlist("type") if t.strip()]
    if len(types) > MAX_TYPES or any(len(t) > 64 or not TYPE_PATTERN.fullmatch(t) for t in types):
        raise QueryError("種別の指定が不正です / invalid event type")
    department = one_param(request, "department", None, 100)
    if department is not None and not department.isprintable():
        raise QueryError("department の値が不正です / invalid department")
    fields: dict[str, object] = {
        "person": one_param(request, "person"),
        "department": department,
        "door": one_param(request, "door"),
        "area": one_param(request, "area"),
        "terminal": one_param(request, "terminal"),
        "medium": one_param(request, "medium"),
        "types": frozenset(types),
    }
    preset = one_param(request, "preset", re.compile("|".join(PRESETS))) or None
    start, end = _day(request, "from"), _day(request, "to")
    try:
        if preset is None and start is None and end is None and default_preset is not None:
            preset = default_preset
        if preset is not None:
            return Filter.for_period(preset, now, **fields)
        since = _midnight(start) if start else None
        until = _midnight(end + timedelta(days=1)) if end else None
        return Filter(since=since, until=until, **fields)  # type: ignore[arg-type]
    except FilterError as err:
        raise QueryError(str(err)) from err


def parse_limit(request: Request, default: int = DEFAULT_LIMIT) -> int:
    """Return the page size asked for (1..500)."""
    text = one_param(request, "limit", re.compile(r"\d{1,4}"), 4)
    limit = default if text is None else int(text)
    if not 1 <= limit <= 500:
        raise QueryError("件数は1〜500で指定してください / limit must be 1..500")
    return limit


def parse_cursor(request: Request) -> str | None:
    """Return the opaque cursor of the page asked for (the reports decode and check it)."""
    return one_param(request, "cursor", re.compile(r"[A-Za-z0-9_-]+"), 400)


def parse_trail(request: Request) -> list[str]:
    """Return the cursors of the pages before this one ('' for the first page)."""
    text = one_param(request, "trail", re.compile(r"[A-Za-z0-9_.~-]*"), 400 * MAX_TRAIL)
    if not text:
        return []
    return ["" if part == "~" else part for part in text.split(".")][-MAX_TRAIL:]


def encode_trail(trail: list[str]) -> str:
    """Return the trail as one query value (cursors are base64url: '.' separates them, '~' is the first page)."""
    return ".".join(part or "~" for part in trail[-MAX_TRAIL:])


def scope(actor: Actor, page_permission: Permission, flt: Filter, *, scoped: bool) -> Filter:
    """Narrow a filter to what the actor may see, or refuse (403) an area outside an area manager's areas.

    An area manager reads area registers only, one of their areas at a time (their first when none is named).
    """
    if not actor.may(page_permission):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "権限がありません / not allowed")
    if actor.areas is None:
        return flt
    if not scoped:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "権限がありません / not allowed")
    if flt.area is None:
        if not actor.areas:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "担当区域がありません / no areas assigned")
        return flt.narrowed(area=sorted(actor.areas)[0])
    if not actor.sees_area(flt.area):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "担当外の区域です / not one of your areas")
    return flt


def subject_of(kind: SubjectKind, ident: str, actor: Actor) -> Subject:
    """Return a timeline's subject after checking the id and, for an area manager, that the area is theirs."""
    if not ID_PATTERN.fullmatch(ident):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "見つかりません / not found")
    if actor.areas is not None and not (kind == "area" and actor.sees_area(ident)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "担当外の区域です / not one of your areas")
    return Subject(kind, ident)


def half(text: str, lang: str) -> str:
    """Return one language of a bilingual `日本語 / English` label (the whole text when it is not one)."""
    if " / " not in text:
        return text
    japanese, english = text.split(" / ", 1)
    return japanese if lang == "ja" else english
