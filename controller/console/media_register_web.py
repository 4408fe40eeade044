"""The media register page (電子媒体台帳) and its JSON / CSV / PDF twins, with lend and return at the console.

- ``GET /console/registers/media-register``: every registered medium with its state, borrower (name, id on
  hover, a link to their timeline), due time, last loan and the number of loans (a link to the media loans
  register narrowed to that medium); filters state (``type``), ``kind``, ``person`` (the borrower),
  ``department`` (the managing department) and ``label`` (text in the medium's name or id).
- ``POST …/lend`` and ``POST …/return`` (``media.lend``: facility managers and IT admins): a form POST with the
  session's CSRF token; htmx swaps the register part of the page in place, and without htmx the browser
  follows the 303 back to the page. Both go through ``MediaService`` with the app's clock and the signed-in
  operator, so the loan, its policy version and its admin audit row (``media.loan.create`` /
  ``media.loan.return``) are one transaction, and a My Number in any field is refused before anything is
  stored. A refusal answers 422 with the reason in the page's language; roles without ``media.lend`` see no
  form, and their POST is refused by the role matrix (403).
- ``GET /api/v1/registers/media-register`` (``.csv``, ``.pdf``): the same lines as JSON and exports, in the
  shape and with the audit rows of the other registers (registers_api.py). Loans are changed over the API at
  ``/api/v1/media/loans`` (controller/api/media.py), not here.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup

from sekisho.common.i18n import localize
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.accounts.web import csrf_for
from sekisho.controller.audit.operators import api_operator
from sekisho.controller.console import templating
from sekisho.controller.console.formats import JST, Lang
from sekisho.controller.console.i18n import gettext
from sekisho.controller.console.register_query import (
    ID_PATTERN,
    PAGES_BY_NAME,
    REGISTER_PAGES,
    QueryError,
    half,
    one_param,
)
from sekisho.controller.console.register_query import reports_of as register_reports
from sekisho.controller.console.registers_api import export_response, page_json
from sekisho.controller.console.registers_web import cell
from sekisho.controller.media.service import APPROVER_ROLES, MediaError, MediaService
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.reports.exports import filter_lines
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.labels import MEDIUM_KINDS, MEDIUM_STATES
from sekisho.controller.reports.media_register import (
    MEDIA_REGISTER_SPEC,
    NAME,
    MediumLine,
    loan_history,
    media_lines,
    media_reading,
    not_chained,
)
from sekisho.controller.reports.service import Page
from sekisho.protocol import mynumber

log = logging.getLogger(__name__)

PATH: Final = "/console/registers/media-register"
REGISTER: Final = PAGES_BY_NAME[NAME]
pages = APIRouter(prefix=PATH, tags=["console"], include_in_schema=False)
api = APIRouter(prefix="/api/v1/registers", tags=["registers"])

Reader = Annotated[Actor, require(Permission.MEDIA_READ)]
Lender = Annotated[Actor, require(Permission.MEDIA_LEND)]
MAX_LABEL: Final = 64
MAX_PURPOSE: Final = 200
# More terminals than a site has is no loan anyone meant to make; the service refuses unknown ones.
MAX_TERMINALS: Final = 50
DEFAULT_LOAN: Final = timedelta(hours=8)
IdForm = Annotated[str, Form(max_length=64)]
EMPTY_ENTRY: Final[dict[str, Any]] = {
    "medium": "", "person": "", "terminals": set(), "due": "", "approved_by": "", "read_write": False, "purpose": "",
}  # fmt: skip


# --- reading ---------------------------------------------------------------------------------------


def media_service(request: Request, *, writing: bool = False) -> MediaService:
    """Return a MediaService on the app's store and clock (writing needs the controller's signing key)."""
    state = request.app.state.sekisho
    if writing and state.signing_key is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "署名鍵を読めません / the controller's signing key is unavailable"
        )
    # Reading needs no key: PolicyService only signs in bundles(), which reading never calls.
    return MediaService(state.store, PolicyService(state.store, state.signing_key), clock=lambda: state.clock())


def parse_media_filter(request: Request) -> Filter:
    """Read the register's filter: type (medium states), kind, person, department, medium and label."""
    states = [t.strip() for t in request.query_params.getlist("type") if t.strip()]
    unknown = [t for t in states if t not in MEDIUM_STATES]
    if unknown or len(states) > len(MEDIUM_STATES):
        raise QueryError("状態の指定が不正です / invalid state (" + ", ".join(MEDIUM_STATES) + ")")
    kind = one_param(request, "kind", None, 32)
    if kind is not None and kind not in MEDIUM_KINDS:
        raise QueryError("媒体の種類が不正です / invalid kind (" + ", ".join(MEDIUM_KINDS) + ")")
    label = one_param(request, "label", None, MAX_LABEL)
    if label is not None and next(mynumber.find_my_numbers(label), None) is not None:
        # The filter is printed on exports and kept in their audit rows: never a My Number.
        raise QueryError("label: マイナンバー（個人番号）らしき値は検索できません / looks like a My Number")
    return Filter(
        person=one_param(request, "person", ID_PATTERN, 64),
        department=one_param(request, "department", None, 100),
        medium=one_param(request, "medium", ID_PATTERN, 64),
        kind=kind,
        label=label,
        types=frozenset(states),
    )


def read_lines(request: Request, flt: Filter) -> tuple[list[MediumLine], datetime]:
    """Return the register's lines for a filter and the moment they were read (the app's clock)."""
    reports = register_reports(request)
    now = reports.clock()
    history = loan_history(reports.store.engine.connect)
    return media_lines(media_service(request), reports.directory(), flt, now, history), now


def _filter_or_422(request: Request) -> Filter:
    try:
        return parse_media_filter(request)
    except QueryError as err:
        raise HTTPException(422, str(err)) from err


# --- the page --------------------------------------------------------------------------------------


def _cells(line: MediumLine, lang: Lang, viewer: Actor) -> list[Markup]:
    shown: list[Markup] = []
    for column in MEDIA_REGISTER_SPEC.columns:
        value = line.row.values.get(column.key)
        if column.key == "kind" and isinstance(value, str):
            shown.append(Markup("{}").format(half(value, lang)))
        elif column.key == "loans":
            count = gettext(lang, "%(count)s loans", count=value or 0)
            target = f"/console/registers/media?medium={line.medium_id}"
            shown.append(Markup('<a href="{}">{}</a>').format(target, count))
        else:
            shown.append(cell(column, value, lang, viewer))
    return shown


def _form_choices(request: Request, media: MediaService, lines: list[MediumLine], lang: Lang) -> dict[str, Any]:
    directory = register_reports(request).directory()
    current = media.policy.current()
    policy = current[1] if current else None
    people = [p for p in (policy.people if policy else []) if p.active and "visitor" not in p.roles]
    people.sort(key=lambda p: (p.kana or p.name, p.id))
    return {
        "people": [(p.id, p.name, p.kana) for p in people],
        "approvers": [(p.id, p.name, p.kana) for p in people if APPROVER_ROLES & set(p.roles)],
        "terminals": sorted((t, name) for t, (name, _agent) in directory.terminals.items())
        if policy is None
        else [(t.id, t.name) for t in policy.terminals],
        "lendable": [
            (line.medium_id, ref.text() if (ref := directory.medium(line.medium_id)) else line.medium_id)
            for line in lines
            if line.state == "in_store"
        ],
        "kinds": [(k, pair[0] if lang == "ja" else pair[1]) for k, pair in MEDIUM_KINDS.items()],
        "states": [(s, pair[0] if lang == "ja" else pair[1]) for s, pair in MEDIUM_STATES.items()],
        "departments": sorted({m.department for m in (policy.media if policy else [])}),
    }


def _query_of(request: Request) -> str:
    keep = ("type", "kind", "person", "department", "medium", "label")
    return urlencode([(k, v) for k, v in request.query_params.multi_items() if k in keep and v])


def render_page(
    request: Request,
    viewer: Actor,
    *,
    error: str | None = None,
    done: str | None = None,
    entered: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    """Render the register with its filter, lend form (for lenders) and an optional notice."""
    lang = templating.language_of(request, viewer)
    reports = register_reports(request)
    context: dict[str, Any] = {
        "register": REGISTER,
        "title": gettext(lang, REGISTER.label),
        "registers": [r for r in REGISTER_PAGES if viewer.may(r.permission)],
        "may_export": viewer.may(Permission.REGISTERS_EXPORT),
        "may_lend": viewer.may(Permission.MEDIA_LEND),
        "csrf_token": csrf_for(request) if viewer.via == "session" else "",
        "error": half(error, lang) if error else None,
        "done": done,
        "query": _query_of(request),
        # What the lend form shows again after a refusal (StrictUndefined: every key present).
        "entered": {**EMPTY_ENTRY, **(entered or {})},
        "chosen": {k: request.query_params.get(k, "") for k in ("kind", "person", "department", "label")},
        "states_chosen": set(request.query_params.getlist("type")),
        "lend_medium": request.query_params.get("lend", ""),
    }
    lines: list[MediumLine] = []
    filter_error: str | None = None
    try:
        flt = parse_media_filter(request)
    except QueryError as err:
        # A bad filter is told on the page; nothing is read with it.
        flt, now, filter_error = Filter(), reports.clock(), half(str(err), lang)
    else:
        lines, now = read_lines(request, flt)
    media = media_service(request)
    default_due = (now.astimezone(JST) + DEFAULT_LOAN).strftime("%Y-%m-%dT%H:%M")
    context.update(
        filter_error=filter_error,
        headings=[c.ja if lang == "ja" else c.en for c in MEDIA_REGISTER_SPEC.columns],
        lines=[
            {"cells": _cells(line, lang, viewer), "state": line.state, "loan": line.loan_id, "medium": line.medium_id}
            for line in lines
        ],
        filter_lines=[(half(label, lang), value) for label, value in filter_lines(flt, reports.directory())],
        form=_form_choices(request, media, lines, lang),
        default_due=default_due,
        verification={"state": "unknown", "text": not_chained(now).text(lang)},
        print_title=f"{MEDIA_REGISTER_SPEC.ja} / {MEDIA_REGISTER_SPEC.en}",
    )
    code = 422 if filter_error and status_code == 200 else status_code
    return templating.render(
        request, "registers/media_register.html", context, viewer=viewer, status_code=code, now=now
    )


@pages.get("", response_class=HTMLResponse)
def media_register_page(
    request: Request, actor: Reader, done: Annotated[str | None, Query(max_length=16)] = None
) -> Response:
    """Show the media register: every medium's state, borrower, due time, last loan; lend and return forms."""
    return render_page(request, actor, done=done if done in ("lent", "returned") else None)


# --- lend and return -------------------------------------------------------------------------------


def parse_due(text: str) -> datetime:
    """Return the due time of a `YYYY-MM-DDTHH:MM` input read as JST."""
    try:
        return datetime.fromisoformat(text.strip()).replace(tzinfo=JST)
    except ValueError:
        raise MediaError("返却期限の日時が不正です / the due time is not valid") from None


def _recorder(actor: Actor) -> str:
    # Kept on the loan (recorded_by / received_by) and shown in the loans register: name and login.
    return f"{actor.display_name} ({actor.login})"[:128]


def _publish(request: Request) -> None:
    hook = request.app.state.sekisho.on_policy_change
    if hook is not None:
        try:
            hook()
        except Exception:  # the policy keeper publishes within 5 s; the loan is stored either way
            log.exception("immediate policy publication failed; the policy keeper retries")


def _refusal(request: Request, actor: Actor, err: MediaError, entered: dict[str, Any]) -> Response:
    # The service names fields, never values; redacting the message is the backstop. A service message is
    # shown in the page's language.
    shown = localize(err, templating.language_of(request, actor))
    return render_page(request, actor, error=mynumber.redact(shown), entered=entered, status_code=422)


@pages.post("/lend")
def lend_form(
    request: Request,
    actor: Lender,
    medium: IdForm = "",
    person: IdForm = "",
    terminal: Annotated[list[str] | None, Form()] = None,
    due: Annotated[str, Form(max_length=32)] = "",
    purpose: Annotated[str, Form(max_length=MAX_PURPOSE)] = "",
    approved_by: IdForm = "",
    read_write: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """Lend a registered medium from the console (media.lend; CSRF checked by require on every POST)."""
    terminals = [t for t in (terminal or []) if t]
    # Echo what was chosen back into the form on a refusal, but never a value that looks like a My Number.
    entered = {
        "medium": medium,
        "person": person,
        "terminals": set(terminals),
        "due": due,
        "approved_by": approved_by,
        "read_write": bool(read_write),
        "purpose": "" if next(mynumber.find_my_numbers(purpose), None) is not None else purpose,
    }
    try:
        if len(terminals) > MAX_TERMINALS:
            raise MediaError("端末の指定が多すぎます / too many terminals")
        media = media_service(request, writing=True)
        media.lend(
            medium,
            person,
            terminals,
            None,
            parse_due(due),
            purpose.strip(),
            not read_write,
            approved_by,
            _recorder(actor),
            operator=api_operator(actor, request.client.host if request.client else None),
        )
    except MediaError as err:
        return _refusal(request, actor, err, entered)
    except mynumber.MyNumberFound:
        return _refusal(
            request, actor, MediaError("マイナンバーらしき値は記録できません / looks like a My Number"), entered
        )
    _publish(request)
    return RedirectResponse(f"{PATH}?done=lent", status_code=status.HTTP_303_SEE_OTHER)


@pages.post("/return")
def return_form(request: Request, actor: Lender, loan: IdForm = "") -> Response:
    """Record that a lent medium came back, received by the signed-in user (media.lend)."""
    if not ID_PATTERN.fullmatch(loan):
        return _refusal(request, actor, MediaError("貸出を選んでください / choose the loan to end"), {})
    try:
        media = media_service(request, writing=True)
        media.return_medium(
            loan,
            received_by=_recorder(actor),
            operator=api_operator(actor, request.client.host if request.client else None),
        )
    except MediaError as err:
        return _refusal(request, actor, err, {})
    _publish(request)
    return RedirectResponse(f"{PATH}?done=returned", status_code=status.HTTP_303_SEE_OTHER)


# --- JSON and exports ------------------------------------------------------------------------------


@api.get(f"/{NAME}", dependencies=[require(Permission.MEDIA_READ)])
def media_register_json(request: Request) -> dict[str, Any]:
    """Return the whole media register as JSON (the shape of the other registers, never more than one page)."""
    flt = _filter_or_422(request)
    lines, now = read_lines(request, flt)
    page = Page(MEDIA_REGISTER_SPEC, flt, [line.row for line in lines], None, now, not_chained(now))
    found = page_json(page)
    # What a client needs to act on a line through /api/v1/media (the state's key, the open loan's id).
    for row, line in zip(found["rows"], lines, strict=True):
        row["state"] = line.state
        row["loan"] = line.loan_id
    return found


def _export(fmt: Literal["csv", "pdf"]) -> Any:
    def export(request: Request) -> Response:
        actor: Actor = request.state.actor
        if not actor.may(Permission.REGISTERS_EXPORT):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "権限がありません / not allowed")
        flt = _filter_or_422(request)
        lines, now = read_lines(request, flt)
        reading = media_reading(lines, flt, register_reports(request).directory(), now)
        return export_response(request, actor, reading, fmt, NAME)

    export.__doc__ = f"Export the media register as {fmt.upper()} (same filters as the page)."
    return export


for _fmt in ("csv", "pdf"):
    api.add_api_route(
        f"/{NAME}.{_fmt}",
        _export(_fmt),
        methods=["GET"],
        name=f"register:{NAME}.{_fmt}",
        # One permission decides a route (the matrix test's rule); registers.export is checked inside.
        dependencies=[require(Permission.MEDIA_READ)],
        response_class=Response,
    )
