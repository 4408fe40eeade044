"""The muster list page (在室者一覧): who is inside each area now, a "confirmed safe" tick per person, print view.

Every page reads ``Reports.muster_page`` (controller/reports), the same service the exports and the CLI use.
The list refreshes itself through htmx polling of ``/console/muster/fragment`` (every 5 s) when htmx was
fetched at set-up; without it the page has a plain "refresh" link (no inline script, no meta refresh).

Ticks need ``muster.confirm`` (facility managers, security): a form POST with the session's CSRF token,
recorded in the admin audit trail. A role without the permission gets no tick control at all, and a POST
from it is refused by the role matrix (403) whatever token it carries. Area managers see their areas only.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response, status
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from sekisho.controller.accounts.audit_hook import VIA
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.accounts.web import csrf_for
from sekisho.controller.console import nav, templating
from sekisho.controller.console.i18n import N_
from sekisho.controller.reports.muster import AreaMuster, MusterError
from sekisho.controller.reports.service import Reports
from sekisho.controller.reports.verify import ChainStatus
from sekisho.protocol import mynumber

router = APIRouter(prefix="/console/muster", tags=["console"], include_in_schema=False)
nav.register(nav.NavItem("/console/muster", N_("Who is inside"), Permission.AREAS_READ, built=True))

Reader = Annotated[Actor, require(Permission.AREAS_READ)]
Confirmer = Annotated[Actor, require(Permission.MUSTER_CONFIRM)]
AREA_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
AreaQuery = Annotated[str | None, Query(max_length=64, pattern=AREA_PATTERN)]
# Seconds between the live list's refreshes (htmx polling).
REFRESH_S: Final = 5
# The PPC's areas first: controlled (管理区域), then handling (取扱区域), then anything else.
KIND_ORDER: Final = {"controlled": 0, "handling": 1}
KIND_LABELS: Final = {"controlled": N_("Controlled area"), "handling": N_("Handling area")}


def reports_of(request: Request) -> Reports:
    """Return this app's reports service (one per app: it only caches names and chain walks)."""
    found = getattr(request.app.state, "console_reports", None)
    if not isinstance(found, Reports):
        state = request.app.state.sekisho
        found = Reports(state.store, clock=state.clock)
        request.app.state.console_reports = found
    return found


def verification_line(check: ChainStatus, lang: str) -> dict[str, str]:
    """Return the layout's verification slot for a chain check (state for the symbol, text in the language)."""
    shown = {"verified": "ok", "broken": "failed"}.get(check.state, "unknown")
    return {"state": shown, "text": check.text(lang)}


def _forbidden_area(area: str) -> HTTPException:
    return HTTPException(
        status.HTTP_403_FORBIDDEN, f"区域 {area} は担当外です / the area {area} is not one of this account's areas"
    )


def visible_areas(request: Request, actor: Actor, area: str | None) -> tuple[list[AreaMuster], ChainStatus]:
    """Return the muster list the actor may see (one area or all of theirs), controlled areas first."""
    if area is not None and not actor.sees_area(area):
        raise _forbidden_area(area)
    reports = reports_of(request)
    if area is not None and area not in reports.directory().areas:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"区域 {area} はありません / no area {area}")
    areas, check = reports.muster_page(area)
    shown = [a for a in areas if actor.sees_area(a.area.id)]
    shown.sort(key=lambda a: (KIND_ORDER.get(a.kind or "", 9), a.area.name, a.area.id))
    return shown, check


def _context(request: Request, actor: Actor, area: str | None) -> dict[str, Any]:
    areas, check = visible_areas(request, actor, area)
    lang = templating.language_of(request, actor)
    total = sum(len(a.lines) for a in areas)
    unconfirmed = sum(a.unconfirmed for a in areas)
    return {
        "areas": areas,
        "area": area,
        "kind_labels": KIND_LABELS,
        "total": total,
        "unconfirmed": unconfirmed,
        "may_confirm": actor.may(Permission.MUSTER_CONFIRM),
        "csrf_token": csrf_for(request) if actor.via == "session" else "",
        "as_of": reports_of(request).clock(),
        "refresh_s": REFRESH_S,
        "query": f"?area={area}" if area else "",
        "verification": verification_line(check, lang),
    }


@router.get("")
def muster_page(request: Request, actor: Reader, area: AreaQuery = None) -> Response:
    """Show who is inside each area now, with the safe ticks; refreshed live."""
    context = _context(request, actor, area)
    return templating.render(request, "live/muster.html", context, viewer=actor)


@router.get("/fragment")
def muster_fragment(request: Request, actor: Reader, area: AreaQuery = None) -> Response:
    """Return the list alone (htmx swaps it in every few seconds)."""
    return templating.render(request, "live/muster_list.html", _context(request, actor, area), viewer=actor)


@router.get("/print")
def muster_print(request: Request, actor: Reader, area: AreaQuery = None) -> Response:
    """Show the list laid out for A4 portrait with printed by/at and a sign-off line."""
    context = _context(request, actor, area)
    context["print_title"] = "在室者一覧（避難確認） / Who is inside (muster list)"
    context["print_view"] = True
    return templating.render(request, "live/muster_print.html", context, viewer=actor)


_SAFE_NEXT = re.compile(r"^/console/muster(\?area=[A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$")


def _confirmer_name(actor: Actor) -> str:
    # Shown on the list and printed: the person's name with the login that identifies them in the trail.
    return f"{actor.display_name} ({actor.login})"[:200]


@router.post("/confirm")
async def confirm(
    request: Request,
    actor: Confirmer,
    area: Annotated[str, Form(max_length=64, pattern=AREA_PATTERN)],
    person: Annotated[str, Form(max_length=64, pattern=AREA_PATTERN)],
    action: Annotated[str, Form(pattern=r"^(confirm|clear)$")] = "confirm",
    back: Annotated[str, Form(max_length=200)] = "/console/muster",
) -> Response:
    """Tick (or untick) one person inside one area as confirmed safe; recorded in the admin audit trail."""
    if not actor.sees_area(area):
        raise _forbidden_area(area)
    reports = reports_of(request)
    state = request.app.state.sekisho
    by = _confirmer_name(actor)

    def record(what: str, detail: dict[str, Any]) -> None:
        state.store.record_admin(
            actor.audit_name, VIA.get(actor.via, "web"), actor.client, what, f"area:{area}/person:{person}",
            None, detail, None,
        )  # fmt: skip

    try:
        if action == "confirm":
            await run_in_threadpool(reports.mark_safe, area, person, by=by, on_change=record)
        else:
            await run_in_threadpool(reports.clear_safe, area, person, on_change=record)
    except mynumber.MyNumberFound as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(err)) from err
    except MusterError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from err
    target = back if _SAFE_NEXT.match(back) else "/console/muster"
    return RedirectResponse(f"{target}#area-{area}", status_code=status.HTTP_303_SEE_OTHER)
