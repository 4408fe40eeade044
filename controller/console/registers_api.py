"""The registers and timelines as JSON (`/api/v1/registers/{name}`, `/api/v1/timelines/{kind}/{id}`) and their
CSV / PDF exports (`….csv`, `….pdf`): the same filters, cursor and limit (≤ 500) as the console's pages.

Each route requires the register's (or timeline's) read permission from the role matrix; an export also needs
registers.export, and is recorded in the admin audit trail with the authenticated actor before its first byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import Response, StreamingResponse

from sekisho.controller.accounts.audit_hook import VIA
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.console.formats import JST, iso_jst
from sekisho.controller.console.register_query import (
    REGISTER_PAGES,
    TIMELINE_KINDS,
    QueryError,
    RegisterPage,
    parse_cursor,
    parse_filter,
    parse_limit,
    reports_of,
    scope,
    subject_of,
)
from sekisho.controller.reports import exports
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.paging import CursorError, Ref, Value
from sekisho.controller.reports.service import Page, Reading
from sekisho.controller.reports.timelines import Subject, SubjectKind
from sekisho.controller.reports.verify import ChainStatus

api = APIRouter(prefix="/api/v1", tags=["registers"])

Format = Literal["csv", "pdf"]


def unprocessable(err: Exception) -> HTTPException:
    """Return the 422 of a filter, cursor or limit that cannot be used."""
    return HTTPException(422, str(err))


def value_json(value: Value) -> Any:
    """Return a cell as JSON: a name with its id (and kana), times in ISO 8601 with the JST offset."""
    if isinstance(value, Ref):
        found: dict[str, Any] = {"id": value.id, "name": value.name}
        if value.kana:
            found["kana"] = value.kana
        return found
    if isinstance(value, datetime):
        return iso_jst(value)
    return value


def verification_json(found: ChainStatus) -> dict[str, Any]:
    """Return a verification as JSON (state, agents, problems, both languages' line)."""
    return {
        "state": found.state,
        "agents": list(found.agents),
        "problems": list(found.problems),
        "checkpoint": found.checkpoint,
        "full": found.full,
        "text_ja": found.text("ja"),
        "text_en": found.text("en"),
    }


def page_json(page: Page) -> dict[str, Any]:
    """Return one page of a register or timeline as JSON."""
    spec = page.spec
    return {
        "register": spec.name,
        "title": {"ja": spec.ja, "en": spec.en},
        "columns": [{"key": c.key, "ja": c.ja, "en": c.en, "kind": c.kind} for c in spec.columns],
        "filter": exports.filter_dict(page.filter),
        "as_of": iso_jst(page.as_of),
        "rows": [
            {
                "kind": row.kind,
                "flags": list(row.flags),
                "values": {c.key: value_json(row.values.get(c.key)) for c in spec.columns},
            }
            for row in page.rows
        ],
        "next_cursor": page.next_cursor,
        "verification": verification_json(page.verification),
    }


def _filter(request: Request, default_preset: str | None = None) -> Filter:
    try:
        return parse_filter(request, reports_of(request).clock(), default_preset=default_preset)
    except QueryError as err:
        raise unprocessable(err) from err


def register_page(request: Request, actor: Actor, register: RegisterPage) -> Page:
    """Read the page of a register a request asks for, narrowed to the actor's scope (422 for a bad query)."""
    flt = scope(actor, register.permission, _filter(request), scoped=register.scoped)
    try:
        return reports_of(request).page(register.name, flt, cursor=parse_cursor(request), limit=parse_limit(request))
    except (QueryError, CursorError, ValueError) as err:
        raise unprocessable(err) from err


def timeline_page(request: Request, actor: Actor, subject: Subject) -> Page:
    """Read the page of a timeline a request asks for (today in JST unless a period is given)."""
    flt = _filter(request, default_preset="today")
    try:
        return reports_of(request).timeline(subject, flt, cursor=parse_cursor(request), limit=parse_limit(request))
    except (QueryError, CursorError, ValueError) as err:
        raise unprocessable(err) from err


def _may_export(actor: Actor) -> None:
    if not actor.may(Permission.REGISTERS_EXPORT):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "権限がありません / not allowed")


def exporter_of(actor: Actor) -> str:
    """Return who exported, as printed on the export: name (login)."""
    return f"{actor.display_name} ({actor.login})"


def export_response(request: Request, actor: Actor, reading: Reading, fmt: Format, basename: str) -> Response:
    """Stream a reading as CSV or return it as PDF, recorded in the admin audit trail before the first byte."""
    state = request.app.state.sekisho
    client = request.client.host if request.client else None
    hook = exports.audit_hook(state.store, actor=actor.audit_name, via=VIA.get(actor.via, "api"), client=client)
    now = reports_of(request).clock()
    stamp = now.astimezone(JST).strftime("%Y%m%d-%H%M")
    name = f"{basename}-{stamp}.{fmt}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"}
    if fmt == "pdf":
        body = exports.export_pdf(reading, exporter=exporter_of(actor), exported_at=now, on_export=hook)
        return Response(body, media_type="application/pdf", headers=headers)
    chunks = exports.export_csv(reading, exporter=exporter_of(actor), exported_at=now, on_export=hook)
    # The first chunk is made here: the audit row is written (or refused, failing the request) before any
    # status line leaves; a refused export never reaches the client.
    first = next(chunks)

    def body_chunks() -> Iterator[bytes]:
        yield first
        yield from chunks

    return StreamingResponse(body_chunks(), media_type="text/csv; charset=utf-8", headers=headers)


def _register_routes(register: RegisterPage) -> None:
    def read(request: Request) -> dict[str, Any]:
        actor: Actor = request.state.actor
        return page_json(register_page(request, actor, register))

    read.__doc__ = f"Return one page of the {register.name} register (filters, cursor, limit ≤ 500)."
    api.add_api_route(
        f"/registers/{register.name}",
        read,
        methods=["GET"],
        name=f"register:{register.name}",
        dependencies=[require(register.permission)],
    )
    for fmt in ("csv", "pdf"):
        api.add_api_route(
            f"/registers/{register.name}.{fmt}",
            _export_register(register, fmt),
            methods=["GET"],
            name=f"register:{register.name}.{fmt}",
            # The route asks for what reading the register needs (one permission decides a route, the matrix
            # test's rule); the export permission is checked inside (every role that may read may export).
            dependencies=[require(register.permission)],
            response_class=Response,
        )


def _export_register(register: RegisterPage, fmt: Format) -> Callable[[Request], Response]:
    def export(request: Request) -> Response:
        actor: Actor = request.state.actor
        _may_export(actor)
        flt = scope(actor, register.permission, _filter(request), scoped=register.scoped)
        reading = reports_of(request).reading(register.name, flt)
        return export_response(request, actor, reading, fmt, register.name)

    export.__doc__ = f"Export the {register.name} register as {fmt.upper()} (same filters as the page)."
    return export


def _export_timeline(kind: SubjectKind, permission: Permission, fmt: Format) -> Callable[..., Response]:
    def export(request: Request, id: str) -> Response:
        actor: Actor = request.state.actor
        _may_export(actor)
        subject = subject_of(kind, id, actor)
        reading = reports_of(request).timeline_reading(subject, _filter(request, default_preset="today"))
        return export_response(request, actor, reading, fmt, f"timeline-{kind}-{id}")

    export.__doc__ = f"Export a {kind} timeline as {fmt.upper()} (same period and filters as the page)."
    return export


def _timeline_routes(kind: SubjectKind, permission: Permission) -> None:
    # The export paths first: "{id}" would match "p-0001.csv" too.
    for fmt in ("csv", "pdf"):
        api.add_api_route(
            f"/timelines/{kind}/{{id}}.{fmt}",
            _export_timeline(kind, permission, fmt),
            methods=["GET"],
            name=f"timeline:{kind}.{fmt}",
            dependencies=[require(permission)],
            response_class=Response,
        )

    def read(request: Request, id: str) -> dict[str, Any]:
        actor: Actor = request.state.actor
        return page_json(timeline_page(request, actor, subject_of(kind, id, actor)))

    read.__doc__ = f"Return one page of a {kind}'s timeline (today in JST unless from/to/preset say otherwise)."
    api.add_api_route(
        f"/timelines/{kind}/{{id}}", read, methods=["GET"], name=f"timeline:{kind}", dependencies=[require(permission)]
    )


for _register in (r for r in REGISTER_PAGES if r.paged):
    _register_routes(_register)
for _kind, (_label, _permission) in TIMELINE_KINDS.items():
    _timeline_routes(_kind, _permission)
