"""The register and timeline pages: one page per register (the key-lending register first: overdue, then out),
a filter form, keyset pages (next / previous), names with the id on hover and a link to the person's (door's,
area's, terminal's) timeline, the verification line, CSV / PDF export buttons with the same filter, and an A4
print view (the print stylesheet). Pages call the same reports functions as the JSON API (registers_api.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup, escape

from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.console import nav, templating
from sekisho.controller.console.formats import JST, Lang, idhover, jst, person
from sekisho.controller.console.i18n import N_, gettext
from sekisho.controller.console.register_query import (
    REGISTER_PAGES,
    TIMELINE_KINDS,
    QueryError,
    RegisterPage,
    encode_trail,
    half,
    parse_cursor,
    parse_trail,
    reports_of,
    subject_of,
)
from sekisho.controller.console.registers_api import register_page, timeline_page
from sekisho.controller.reports.exports import filter_lines, period_text
from sekisho.controller.reports.filters import PRESET_LABELS, PRESETS
from sekisho.controller.reports.labels import EVENT_LABELS, LOAN_STATES
from sekisho.controller.reports.paging import Column, Ref, Row, Value
from sekisho.controller.reports.service import Page
from sekisho.controller.reports.timelines import SubjectKind

pages = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)

# Columns naming something with a timeline of its own: a click on the name opens it.
LINKED: Final[dict[str, SubjectKind]] = {
    "person": "person",
    "returned_by": "person",
    "escort": "person",
    "visitor": "person",
    "approved_by": "person",
    "door": "door",
    "cabinet": "door",
    "place": "door",
    "area": "area",
    "terminal": "terminal",
}
# Text columns whose values are bilingual labels (`延滞 / overdue`): shown in the page's language only.
BILINGUAL: Final = frozenset({"state", "event", "direction", "category", "read_only", "note"})
STATE_OF_VERIFICATION: Final = {"verified": "ok", "broken": "failed", "empty": "unknown", "not_chained": "unknown"}
FILTER_FIELDS: Final = ("person", "department", "door", "area", "terminal", "medium", "from", "to", "preset")


def _link_target(column: Column, ref: Ref, viewer: Actor) -> str | None:
    kind = LINKED.get(column.key)
    if kind is None or not ref.known or ref.id == "counter":
        return None
    _label, permission = TIMELINE_KINDS[kind]
    if not viewer.may(permission) or (viewer.areas is not None and not (kind == "area" and viewer.sees_area(ref.id))):
        return None
    return f"/console/timeline/{kind}/{ref.id}"


def cell(column: Column, value: Value, lang: Lang, viewer: Actor) -> Markup:
    """Return one table cell's content: names with kana and the id on hover, times in JST, labels in one language."""
    if value is None or value == "":
        return Markup("")
    if isinstance(value, Ref):
        shown = (
            person(value.name, value.kana, value.id)
            if value.kana or LINKED.get(column.key) == "person"
            else (idhover(value.name, value.id))
        )
        target = _link_target(column, value, viewer)
        return Markup('<a href="{}">{}</a>').format(target, shown) if target else shown
    if isinstance(value, datetime):
        return Markup('<time datetime="{}">{}</time>').format(value.astimezone(JST).isoformat(), jst(value, lang))
    if isinstance(value, bool):
        return escape(half("はい / yes" if value else "いいえ / no", lang))
    text = str(value)
    if column.key in BILINGUAL:
        text = "; ".join(half(part, lang) for part in text.split("; "))
    return Markup("{}").format(text)


def verification_view(page: Page, lang: Lang) -> dict[str, str]:
    """Return the page's verification line for the layout's footer (symbol + text, never colour alone)."""
    return {
        "state": STATE_OF_VERIFICATION.get(page.verification.state, "unknown"),
        "text": page.verification.text(lang),
    }


def _query(request: Request, **changes: str | None) -> str:
    """Return the request's query string with some parameters replaced (None: removed)."""
    items = [(k, v) for k, v in request.query_params.multi_items() if k not in changes]
    items += [(k, v) for k, v in changes.items() if v]
    return urlencode(items)


def _filter_query(request: Request) -> str:
    """Return only the filter part of the query (for export links and the print view)."""
    keep = (*FILTER_FIELDS, "type")
    return urlencode([(k, v) for k, v in request.query_params.multi_items() if k in keep and v])


def paging_links(request: Request, page: Page) -> dict[str, str | None]:
    """Return the next / previous / first links: previous from the trail of cursors kept in the query string."""
    trail = parse_trail(request)
    current = parse_cursor(request) or ""
    path = request.url.path
    next_link = None
    if page.next_cursor:
        next_link = f"{path}?{_query(request, cursor=page.next_cursor, trail=encode_trail([*trail, current]))}"
    previous_link = None
    if current:
        back = trail[-1] if trail else ""
        previous_link = f"{path}?{_query(request, cursor=back or None, trail=encode_trail(trail[:-1]) or None)}"
    first_link = f"{path}?{_query(request, cursor=None, trail=None)}" if current else None
    return {"next": next_link, "previous": previous_link, "first": first_link}


def _table(page: Page, lang: Lang, viewer: Actor) -> tuple[list[str], list[dict[str, Any]]]:
    headings = [c.ja if lang == "ja" else c.en for c in page.spec.columns]
    rows = [_row(page, row, lang, viewer) for row in page.rows]
    return headings, rows


def _row(page: Page, row: Row, lang: Lang, viewer: Actor) -> dict[str, Any]:
    return {
        "cells": [cell(c, row.values.get(c.key), lang, viewer) for c in page.spec.columns],
        "flags": row.flags,
        "classes": " ".join(f"row-{flag}" for flag in row.flags),
    }


def _type_label(value: str, lang: Lang) -> str:
    pair = LOAN_STATES.get(value) or EVENT_LABELS.get(value)
    return (pair[0] if lang == "ja" else pair[1]) if pair else value


def _form(request: Request, register: RegisterPage | None, viewer: Actor, lang: Lang) -> dict[str, Any]:
    params = request.query_params
    directory = reports_of(request).directory()
    areas = sorted(directory.areas.items(), key=lambda item: item[0])
    if viewer.areas is not None:
        areas = [a for a in areas if a[0] in viewer.areas]
    people = sorted(((p.id, p.name, p.kana) for p in directory.people.values()), key=lambda p: (p[2] or p[1], p[0]))
    return {
        "chosen": {name: params.get(name, "") for name in FILTER_FIELDS},
        "types_chosen": set(params.getlist("type")),
        "types": [(t, _type_label(t, lang)) for t in (register.types if register else ())],
        "presets": [(p, PRESET_LABELS[p][0] if lang == "ja" else PRESET_LABELS[p][1]) for p in PRESETS],
        "areas": areas,
        "people": people,
        "departments": sorted({p.department for p in directory.people.values() if p.department}),
        "doors": sorted((d.id, d.name) for d in directory.doors.values()),
        "terminals": sorted((t, name) for t, (name, _agent) in directory.terminals.items()),
        "area_locked": viewer.areas is not None,
    }


def _error_page(request: Request, template: str, context: dict[str, Any], viewer: Actor, err: Exception) -> Response:
    lang = templating.language_of(request, viewer)
    values = {**context, "error": half(str(err), lang), "page": None, "headings": [], "rows": [], "links": {}}
    return templating.render(request, template, values, viewer=viewer, status_code=422)


def _register_view(register: RegisterPage) -> Any:
    def view(request: Request) -> Response:
        viewer: Actor = request.state.actor
        lang = templating.language_of(request, viewer)
        context: dict[str, Any] = {
            "register": register,
            "title": gettext(lang, register.label),
            "form": _form(request, register, viewer, lang),
            "registers": [r for r in REGISTER_PAGES if viewer.may(r.permission)],
            "export_query": _filter_query(request),
            "may_export": viewer.may(Permission.REGISTERS_EXPORT),
            "may_lend": viewer.may(Permission.KEYS_LEND) and register.name == "keys",
        }
        try:
            page = register_page(request, viewer, register)
        except HTTPException as err:
            if err.status_code != 422:
                raise
            return _error_page(request, "registers/register.html", context, viewer, QueryError(str(err.detail)))
        headings, rows = _table(page, lang, viewer)
        context.update(
            page=page,
            headings=headings,
            rows=rows,
            links=paging_links(request, page),
            verification=verification_view(page, lang),
            period=period_text(page.filter),
            filter_lines=[
                (half(label, lang), value)
                for label, value in filter_lines(page.filter, reports_of(request).directory())
            ],
            print_title=f"{page.spec.ja} / {page.spec.en}",
            print_period=period_text(page.filter),
            error=None,
        )
        return templating.render(
            request, "registers/register.html", context, viewer=viewer, now=reports_of(request).clock()
        )

    view.__doc__ = f"Show the {register.name} register: filter form, one keyset page, verification, exports."
    return view


for _register in (r for r in REGISTER_PAGES if r.paged):
    pages.add_api_route(
        _register.path.removeprefix("/console"),
        _register_view(_register),
        methods=["GET"],
        name=f"page:{_register.name}",
        response_class=HTMLResponse,
        dependencies=[require(_register.permission)],
    )


@pages.get("/registers", response_class=HTMLResponse, dependencies=[require(Permission.AREAS_READ)])
def registers_index(request: Request) -> Response:
    """List the registers this role may open."""
    viewer: Actor = request.state.actor
    registers = [r for r in REGISTER_PAGES if viewer.may(r.permission) and (viewer.areas is None or r.scoped)]
    return templating.render(request, "registers/index.html", {"registers": registers}, viewer=viewer)


def _timeline_view(kind: SubjectKind, label: str) -> Any:
    def view(request: Request, id: str) -> Response:
        viewer: Actor = request.state.actor
        lang = templating.language_of(request, viewer)
        subject = subject_of(kind, id, viewer)
        reports = reports_of(request)
        context: dict[str, Any] = {
            "kind": kind,
            "subject": subject,
            "title": f"{gettext(lang, label)}: {id}",
            "form": _form(request, None, viewer, lang),
            "export_query": _filter_query(request),
            "export_base": f"/api/v1/timelines/{kind}/{id}",
            "may_export": viewer.may(Permission.REGISTERS_EXPORT),
        }
        try:
            page = timeline_page(request, viewer, subject)
        except HTTPException as err:
            if err.status_code != 422:
                raise
            return _error_page(request, "registers/timeline.html", context, viewer, QueryError(str(err.detail)))
        headings, rows = _table(page, lang, viewer)
        since = page.filter.since
        context.update(
            # The reports title the timeline with the subject's name (kana for a person).
            title=page.spec.ja if lang == "ja" else page.spec.en,
            page=page,
            headings=headings,
            rows=rows,
            links=paging_links(request, page),
            day_links=_day_links(request, since) if page.filter.preset in (None, "today") else {},
            verification=verification_view(page, lang),
            period=period_text(page.filter),
            print_title=f"{page.spec.ja} / {page.spec.en}",
            print_period=period_text(page.filter),
            error=None,
        )
        return templating.render(request, "registers/timeline.html", context, viewer=viewer, now=reports.clock())

    view.__doc__ = f"Show a {kind}'s timeline: one day (today by default) or a period, every record kind merged."
    return view


def _day_links(request: Request, since: datetime | None) -> dict[str, str]:
    """Return links to the day before and after the one shown."""
    if since is None:
        return {}
    day = since.astimezone(JST).date()
    links = {}
    for name, other in (("previous_day", day - timedelta(days=1)), ("next_day", day + timedelta(days=1))):
        text = other.isoformat()
        links[name] = (
            f"{request.url.path}?{_query(request, preset=None, cursor=None, trail=None, **{'from': text, 'to': text})}"
        )
    return links


for _kind, (_label, _permission) in TIMELINE_KINDS.items():
    pages.add_api_route(
        f"/timeline/{_kind}/{{id}}",
        _timeline_view(_kind, _label),
        methods=["GET"],
        name=f"page:timeline:{_kind}",
        response_class=HTMLResponse,
        dependencies=[require(_permission)],
    )

# The navigation: the key register is the facility manager's first screen; the others hang off "Registers".
nav.register(nav.NavItem("/console/keys", N_("Keys out"), Permission.REGISTERS_READ, built=True))
nav.register(nav.NavItem("/console/registers", N_("Registers"), Permission.AREAS_READ, built=True))
