"""The incident-record pages (インシデント報告): draft breach reports built from alerts, for security staff.

- ``/console/incidents``: the reports, open ones first: title, status in words, when found (JST), the PPC's two
  deadlines with "overdue" in words when one has passed unsent, and how many alerts each links.
- ``/console/incidents/new?alert=…``: the alerts chosen on the alerts list (checkboxes, no script needed), a
  title, and the button that drafts the report. A report cannot be deleted, so drafting one from several alerts
  goes through this page rather than straight from the list. The alert page posts its own alert directly.
- ``/console/incidents/{id}``: the report form (every item of the PPC's form, title, found / happened times in
  JST, number of people, possibly intentional, evidence rows), saved with the version it was read at: a stale
  save names who changed the report meanwhile and keeps what the user typed, with the saved text under each
  field that differs. The status buttons move the report forward only, each after a confirmation step; the
  deadlines; the linked alerts and a form to link more by number; the report's history from the admin trail;
  and the PDF (``/console/incidents/{id}.pdf``, recorded as an export).

Reading needs alerts.read, every change alerts.ack (the role matrix refuses other roles' POSTs with 403; their
pages show the report and the PDF link without any control). Every change goes through the service functions
of controller/api/incidents.py, the ones the JSON API calls, in one transaction with its admin-trail row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, ImmutableMultiDict

from sekisho.common.i18n import localize
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.accounts.web import csrf_for
from sekisho.controller.alerts import incidents, listing
from sekisho.controller.alerts.incidents import IncidentRefused
from sekisho.controller.api import incidents as incidents_api
from sekisho.controller.audit.operators import api_operator
from sekisho.controller.console import alerts_web, nav, templating
from sekisho.controller.console.formats import JST, Lang, jst
from sekisho.controller.console.i18n import N_, gettext
from sekisho.controller.console.register_query import reports_of
from sekisho.controller.store.models import AdminAuditEntry
from sekisho.protocol import mynumber

router = APIRouter(prefix="/console/incidents", tags=["console"], include_in_schema=False)
nav.register(nav.NavItem("/console/incidents", N_("Incidents"), Permission.ALERTS_READ, built=True))
Reader = Annotated[Actor, require(Permission.ALERTS_READ)]
Handler = Annotated[Actor, require(Permission.ALERTS_ACK)]

# The PPC form's items: the Japanese catalogue holds the form's own wording (incidents.REPORT_FIELDS; a test
# keeps the two the same), the English one the English labels.
FIELD_LABELS: Final = {
    "summary": N_("Summary"),
    "data_items": N_("Personal data items concerned"),
    "cause": N_("Cause"),
    "secondary_harm": N_("Secondary harm, actual or possible"),
    "notice_to_people": N_("What was done for the people concerned"),
    "publication": N_("Publication"),
    "prevention": N_("Measures against recurrence"),
    "other": N_("Other relevant facts"),
}
OTHER_LABELS: Final = {
    "title": N_("Title"),
    "found_at": N_("When it was found (JST)"),
    "occurred_at": N_("When it happened (JST)"),
    "people_count": N_("Number of people concerned"),
    "malicious": N_("Possibly intentional (unauthorised purpose)"),
    "evidence": N_("Evidence"),
    "status": N_("Status"),
    "alerts": N_("Alert numbers"),
}
STATUS_NAMES: Final = {
    "draft": N_("Draft"),
    "preliminary": N_("Preliminary report sent"),
    "final": N_("Final report sent"),
    "closed": N_("Incident closed"),
}
# The status symbol shown with the words (never colour alone): a draft still owes the PPC its reports.
STATUS_STATE: Final = {"draft": "warning", "preliminary": "warning", "final": "ok", "closed": "ok"}
ADVANCE_LABELS: Final = {
    "preliminary": N_("Mark the preliminary report as sent"),
    "final": N_("Mark the final report as sent"),
    "closed": N_("Close this incident"),
}
CONFIRM_TEXTS: Final = {
    "preliminary": N_("Mark the preliminary report (速報) to the PPC as sent now?"),
    "final": N_("Mark the final report (確報) to the PPC as sent now?"),
    "closed": N_("Close this incident? A closed report can no longer be changed."),
}
HISTORY_LABELS: Final = {
    "incident.create": N_("Drafted from alerts"),
    "incident.update": N_("Changed"),
    "incident.status": N_("Status changed"),
    "incident.link": N_("Alerts linked"),
    "export.pdf": N_("Exported as PDF"),
}
REFUSALS: Final = {
    "closed": N_("This report is closed: it can no longer be changed."),
    "forward_only": N_("The status only moves forward, and this report is already at or past that step."),
    "needs_summary": N_("Write the summary before marking a report as sent."),
    "no_alert": N_("There is no alert with that number."),
    "no_alerts": N_("Choose at least one alert."),
    "required": N_("%(field)s: please fill this in."),
    "too_long": N_("%(field)s: too long (at most %(limit)s characters)."),
    "too_many": N_("At most %(limit)s evidence rows."),
    "bad_value": N_("%(field)s: this value cannot be used."),
    "bad_time": N_("%(field)s: give a date and time (JST)."),
    "bad_number": N_("Number of people concerned: a whole number, 0 or more (leave it empty while not known)."),
    "bad_alerts": N_("Give alert numbers (digits), separated by commas or spaces."),
}
STALE: Final = N_(
    "%(who)s changed this report at %(when)s while you were editing it. Nothing of yours was saved: what you "
    "typed is kept below, and the text saved now is shown under each field where it differs. Check it, then "
    "save again."
)
SAVED_NOW: Final = N_("Saved now")
TOO_MANY_LINKS: Final = 100
_LOCAL_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")
_ALERT_NUMBERS = re.compile(r"^[\s,、#0-9]*$")


class FormRefused(ValueError):
    """A form value the page cannot turn into a change (kind and field as IncidentRefused has them)."""

    def __init__(self, kind: str, field: str | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.field = field


def _limit(field_name: str | None) -> int:
    if field_name == "title":
        return incidents.MAX_TITLE
    if field_name and field_name.startswith("evidence"):
        return 500
    return incidents.MAX_FIELD


def field_label(lang: Lang, name: str | None) -> str:
    """Return the label of a report field in a language (the PPC form's wording in Japanese)."""
    if name in FIELD_LABELS:
        return gettext(lang, FIELD_LABELS[name])
    if name and name.startswith("evidence"):
        return gettext(lang, OTHER_LABELS["evidence"])
    if name in OTHER_LABELS:
        return gettext(lang, OTHER_LABELS[name])
    return name or ""


def refusal_text(err: Exception, lang: Lang) -> str:
    """Return a refusal (the service's, the form's or the My Number guard's) in the page's language."""
    if isinstance(err, mynumber.MyNumberFound):
        return localize(err, lang)
    kind = getattr(err, "kind", "other")
    name = getattr(err, "field", None)
    if kind not in REFUSALS:
        return str(err)  # a refusal this page has no words for: the service's own (English) reason
    limit = format(incidents.MAX_EVIDENCE if kind == "too_many" else _limit(name), ",")
    return gettext(lang, REFUSALS[kind], field=field_label(lang, name), limit=limit)


# --- the report form ------------------------------------------------------------------------------


def local_input(moment: datetime | None) -> str:
    """Return a moment as a datetime-local input's value, in JST."""
    return "" if moment is None else moment.astimezone(JST).strftime("%Y-%m-%dT%H:%M")


def jst_input(text: str, name: str) -> datetime:
    """Return the aware moment of a datetime-local value typed as JST."""
    if not _LOCAL_TIME.match(text):
        raise FormRefused("bad_time", name)
    try:
        return datetime.fromisoformat(text).replace(tzinfo=JST)
    except ValueError:
        raise FormRefused("bad_time", name) from None


def _text(form: FormData | ImmutableMultiDict[str, Any], name: str) -> str:
    value = form.get(name)
    # Browsers send a textarea's line ends as CRLF; the report keeps LF, as the service wrote its summary.
    return value.replace("\r\n", "\n").strip() if isinstance(value, str) else ""


def _texts(form: FormData, name: str) -> list[str]:
    return [v.replace("\r\n", "\n").strip() if isinstance(v, str) else "" for v in form.getlist(name)]


@dataclass(frozen=True)
class ReportForm:
    """The report form's values as typed (text), from the stored report or from a POST."""

    title: str
    found_at: str
    occurred_at: str
    people_count: str
    malicious: bool
    fields: dict[str, str]
    evidence: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def of_row(cls, row: Any) -> ReportForm:
        """Return the form as the stored report fills it."""
        report = dict(row.report or {})
        return cls(
            title=row.title,
            found_at=local_input(row.found_at),
            occurred_at=local_input(row.occurred_at),
            people_count="" if row.people_count is None else str(row.people_count),
            malicious=bool(row.malicious),
            fields={name: str(report.get(name, "")) for name in incidents.FIELD_NAMES},
            evidence=[{k: str(item.get(k, "")) for k in ("kind", "ref", "note")} for item in row.evidence or []],
        )

    @classmethod
    def of_post(cls, form: FormData) -> ReportForm:
        """Return the form as posted: evidence rows ticked for removal and empty rows left out."""
        removed = set(form.getlist("ev_remove"))
        rows = zip(_texts(form, "ev_kind"), _texts(form, "ev_ref"), _texts(form, "ev_note"), strict=False)
        evidence = [
            {"kind": kind, "ref": ref, "note": note}
            for index, (kind, ref, note) in enumerate(rows)
            if str(index) not in removed and (kind or ref or note)
        ]
        return cls(
            title=_text(form, "title"),
            found_at=_text(form, "found_at"),
            occurred_at=_text(form, "occurred_at"),
            people_count=_text(form, "people_count"),
            malicious=form.get("malicious") == "yes",
            fields={name: _text(form, name) for name in incidents.FIELD_NAMES},
            evidence=evidence,
        )

    def value(self, name: str) -> Any:
        """Return one field's value as typed (for comparing two forms)."""
        if name in self.fields:
            return self.fields[name]
        return getattr(self, name)

    def names(self) -> tuple[str, ...]:
        """Return every field's name."""
        return ("title", "found_at", "occurred_at", "people_count", "malicious", *self.fields, "evidence")

    def changes_from(self, saved: ReportForm) -> dict[str, Any]:
        """Return the service's changes: the fields that differ from the saved form, as typed values."""
        changes: dict[str, Any] = {}
        for name in self.names():
            if self.value(name) == saved.value(name):
                continue
            if name in ("found_at", "occurred_at"):
                text = self.value(name)
                if not text and name == "found_at":
                    raise FormRefused("required", name)
                changes[name] = jst_input(text, name) if text else None
            elif name == "people_count":
                if self.people_count and not self.people_count.isdecimal():
                    raise FormRefused("bad_number", name)
                changes[name] = int(self.people_count) if self.people_count else None
            else:
                changes[name] = self.value(name)
        if len(self.evidence) > incidents.MAX_EVIDENCE:
            raise FormRefused("too_many", "evidence")
        return changes

    def without_my_number(self) -> ReportForm:
        """Return the form with every value that holds a My Number emptied (never echoed back)."""

        def clean(text: str) -> str:
            return "" if mynumber.contains_my_number(text) else text

        return replace(
            self,
            title=clean(self.title),
            people_count=clean(self.people_count),
            fields={k: clean(v) for k, v in self.fields.items()},
            evidence=[{k: clean(v) for k, v in item.items()} for item in self.evidence],
        )


# --- pages ----------------------------------------------------------------------------------------


def _common(request: Request, viewer: Actor) -> dict[str, Any]:
    return {
        "status_names": STATUS_NAMES,
        "status_state": STATUS_STATE,
        "may_ack": viewer.may(Permission.ALERTS_ACK),
        "csrf_token": csrf_for(request) if viewer.via == "session" else "",
    }


@router.get("")
def incidents_page(request: Request, viewer: Reader) -> Response:
    """Show the incident reports, open ones first, with their deadlines."""
    state = request.app.state.sekisho
    now = state.clock()
    rows = [
        {"row": row, "alerts": count, "deadlines": incidents_api.deadlines_of(row, now)}
        for row, count in incidents_api.summaries(state)
    ]
    context = {**_common(request, viewer), "rows": rows, "as_of": now}
    return templating.render(request, "incidents/list.html", context, viewer=viewer)


def _alert_ids(values: list[str]) -> list[int]:
    if len(values) > TOO_MANY_LINKS or not all(v.isascii() and v.isdigit() and 0 < len(v) <= 18 for v in values):
        raise FormRefused("bad_alerts", "alerts")
    return sorted({int(v) for v in values})


def _new_context(request: Request, viewer: Actor, wanted: list[int], title: str, error: str | None) -> Any:
    lang = templating.language_of(request, viewer)
    directory = reports_of(request).directory()
    with request.app.state.sekisho.store.engine.connect() as conn:
        rows = [row for row in (listing.get(conn, i) for i in wanted) if row is not None]
    missing = sorted(set(wanted) - {int(r.id) for r in rows})
    if missing and error is None:
        error = gettext(lang, REFUSALS["no_alert"]) + f" (#{', #'.join(str(m) for m in missing)})"
    return {
        **_common(request, viewer),
        "alerts": [alerts_web.view(r, directory, lang, viewer) for r in rows],
        "title": "" if mynumber.contains_my_number(title) else title,
        "error": error,
    }


@router.get("/new")
def new_incident_page(request: Request, viewer: Handler) -> Response:
    """Show the alerts chosen on the alerts list and the button that drafts a report from them."""
    lang = templating.language_of(request, viewer)
    error = None
    wanted: list[int] = []
    try:
        wanted = _alert_ids(request.query_params.getlist("alert"))
    except FormRefused as err:
        error = refusal_text(err, lang)
    if not wanted and error is None:
        error = gettext(lang, REFUSALS["no_alerts"])
    context = _new_context(request, viewer, wanted, "", error)
    code = status.HTTP_422_UNPROCESSABLE_CONTENT if context["error"] else status.HTTP_200_OK
    return templating.render(request, "incidents/new.html", context, viewer=viewer, status_code=code)


@router.post("")
async def create_incident(request: Request, viewer: Handler) -> Response:
    """Draft a report from the posted alerts (and title); on success, open it."""
    lang = templating.language_of(request, viewer)
    form = await request.form()
    title = _text(form, "title")
    wanted: list[int] = []
    try:
        wanted = _alert_ids([v for v in form.getlist("alert") if isinstance(v, str)])
        if not wanted:
            raise FormRefused("no_alerts")
        incident_id = await run_in_threadpool(
            incidents_api.create, request.app.state.sekisho, api_operator(viewer, viewer.client), wanted, title
        )
    except (FormRefused, IncidentRefused, mynumber.MyNumberFound) as err:
        context = _new_context(request, viewer, wanted, title, refusal_text(err, lang))
        return templating.render(request, "incidents/new.html", context, viewer=viewer, status_code=422)
    return RedirectResponse(f"/console/incidents/{incident_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.get("/{incident_id}.pdf")
def incident_pdf(request: Request, viewer: Reader, incident_id: int) -> Response:
    """Download the report as an A4 PDF (recorded in the admin trail as an export: who, when)."""
    state = request.app.state.sekisho
    try:
        pdf, filename = incidents_api.export_pdf(state, viewer, viewer.client, incident_id)
    except IncidentRefused as err:
        raise HTTPException(incidents_api.refusal_status(err), "no such incident") from err
    return incidents_api.pdf_response(pdf, filename)


def _history(request: Request, incident_id: int, lang: Lang) -> list[dict[str, Any]]:
    t = AdminAuditEntry.__table__.c
    with request.app.state.sekisho.store.engine.connect() as conn:
        rows = list(
            conn.execute(
                select(t.at, t.actor, t.action, t.old, t.new)
                .where(t.target == f"incident:{incident_id}")
                .order_by(t.id)
                .limit(500)
            )
        )
    people = alerts_web.people_named(request, [r.actor for r in rows])
    out = []
    for r in rows:
        new = r.new if isinstance(r.new, dict) else {}
        old = r.old if isinstance(r.old, dict) else {}
        said = ""
        if r.action == "incident.update":
            said = ", ".join(field_label(lang, name) for name in new)
        elif r.action == "incident.status":
            before, after = old.get("status"), new.get("status")
            if before in STATUS_NAMES and after in STATUS_NAMES:
                said = f"{gettext(lang, STATUS_NAMES[before])} → {gettext(lang, STATUS_NAMES[after])}"
        elif r.action in ("incident.link", "incident.create"):
            said = ", ".join(f"#{a}" for a in new.get("alerts") or [])
        what = gettext(lang, HISTORY_LABELS[r.action]) if r.action in HISTORY_LABELS else r.action
        out.append({"at": r.at, "who": people[r.actor], "what": what, "said": said})
    return out


def _detail_context(
    request: Request,
    viewer: Actor,
    incident_id: int,
    *,
    asked: ReportForm | None = None,
    error: str | None = None,
    stale: bool = False,
    confirming: str | None = None,
    link_error: str | None = None,
    link_text: str = "",
) -> dict[str, Any]:
    state = request.app.state.sekisho
    lang = templating.language_of(request, viewer)
    now = state.clock()
    try:
        found = incidents_api.read(state, incident_id)
    except IncidentRefused as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such incident") from err
    row = found["incident"]
    saved = ReportForm.of_row(row)
    form = asked.without_my_number() if asked is not None else saved
    people = alerts_web.people_named(request, [row.created_by, row.updated_by])
    directory = reports_of(request).directory()
    preliminary, final = incidents_api.deadlines_of(row, now)
    may_edit = viewer.may(Permission.ALERTS_ACK) and row.status != "closed"
    later = incidents.STATUSES[incidents.STATUSES.index(row.status) + 1 :]
    stale_text = None
    if stale:
        who = people[row.updated_by]
        stale_text = gettext(lang, STALE, who=who.text(), when=jst(row.updated_at, lang))
    return {
        **_common(request, viewer),
        "incident": row,
        "form": form,
        "saved": saved,
        # Under each field a stale save changed: the text saved now (the user's own stays in the field).
        "differs": {n for n in saved.names() if form.value(n) != saved.value(n)} if stale else set(),
        "fields": [(name, gettext(lang, FIELD_LABELS[name])) for name in incidents.FIELD_NAMES],
        "labels": {name: gettext(lang, label) for name, label in OTHER_LABELS.items()},
        "saved_now": gettext(lang, SAVED_NOW),
        "people": people,
        "alerts": [alerts_web.view(a, directory, lang, viewer) for a in found["alerts"]],
        "alert_state_labels": alerts_web.STATE_LABELS,
        "alert_state_status": alerts_web.STATE_STATUS,
        "preliminary": preliminary,
        "final": final,
        "may_edit": may_edit,
        "advances": [(s, ADVANCE_LABELS[s]) for s in later] if viewer.may(Permission.ALERTS_ACK) else [],
        "confirming": confirming,
        "confirm_text": gettext(lang, CONFIRM_TEXTS[confirming]) if confirming in CONFIRM_TEXTS else "",
        "history": _history(request, incident_id, lang),
        "error": error,
        "stale_text": stale_text,
        "link_error": link_error,
        "link_text": "" if mynumber.contains_my_number(link_text) else link_text,
        "version": int(row.version),
    }


def _render_detail(request: Request, viewer: Actor, incident_id: int, code: int = 200, **kwargs: Any) -> Response:
    context = _detail_context(request, viewer, incident_id, **kwargs)
    return templating.render(request, "incidents/detail.html", context, viewer=viewer, status_code=code)


@router.get("/{incident_id}")
def incident_page(request: Request, viewer: Reader, incident_id: int) -> Response:
    """Show one report: the form (alerts.ack) or the report as text, deadlines, status, alerts, history, PDF."""
    return _render_detail(request, viewer, incident_id)


@router.post("/{incident_id}")
async def save_incident(request: Request, viewer: Handler, incident_id: int) -> Response:
    """Save the report form read at its version; a stale version keeps what was typed and names who changed it."""
    state = request.app.state.sekisho
    lang = templating.language_of(request, viewer)
    form = await request.form()
    asked = ReportForm.of_post(form)
    version_text = _text(form, "version")
    try:
        current = incidents_api.read(state, incident_id)["incident"]
    except IncidentRefused as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such incident") from err
    if current.status == "closed":
        error = refusal_text(IncidentRefused("closed", "closed"), lang)
        return _render_detail(request, viewer, incident_id, status.HTTP_409_CONFLICT, error=error)
    if not (version_text.isascii() and version_text.isdigit()) or int(version_text) != int(current.version):
        # Checked before the form's own values: a report changed meanwhile is shown as such, never re-rendered
        # at the new version with a refusal of another kind (the next save would then overwrite the change).
        return _render_detail(request, viewer, incident_id, status.HTTP_409_CONFLICT, asked=asked, stale=True)
    try:
        changes = asked.changes_from(ReportForm.of_row(current))
        # Called even with nothing changed: a stale version is refused either way.
        await run_in_threadpool(
            incidents_api.update, state, api_operator(viewer, viewer.client), incident_id, int(version_text), changes
        )
    except (FormRefused, IncidentRefused, mynumber.MyNumberFound) as err:
        if isinstance(err, IncidentRefused) and err.kind == "not_found":
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such incident") from err
        stale = isinstance(err, IncidentRefused) and err.kind == "stale"
        code = incidents_api.refusal_status(err) if isinstance(err, IncidentRefused) else 422
        return _render_detail(
            request,
            viewer,
            incident_id,
            code,
            asked=asked,
            stale=stale,
            error=None if stale else refusal_text(err, lang),
        )
    return RedirectResponse(f"/console/incidents/{incident_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/{incident_id}/status")
async def advance_incident(request: Request, viewer: Handler, incident_id: int) -> Response:
    """Move the report forward after a confirmation step (a first POST asks, the confirming one acts)."""
    state = request.app.state.sekisho
    form = await request.form()
    wanted = _text(form, "status")
    if wanted not in CONFIRM_TEXTS:
        lang = templating.language_of(request, viewer)
        error = gettext(lang, REFUSALS["bad_value"], field=field_label(lang, "status"))
        return _render_detail(request, viewer, incident_id, 422, error=error)
    if form.get("confirm") != "yes":
        return _render_detail(request, viewer, incident_id, confirming=wanted)
    try:
        await run_in_threadpool(incidents_api.advance, state, api_operator(viewer, viewer.client), incident_id, wanted)
    except IncidentRefused as err:
        if err.kind == "not_found":
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such incident") from err
        lang = templating.language_of(request, viewer)
        return _render_detail(
            request, viewer, incident_id, incidents_api.refusal_status(err), error=refusal_text(err, lang)
        )
    return RedirectResponse(f"/console/incidents/{incident_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/{incident_id}/alerts")
async def link_alerts(request: Request, viewer: Handler, incident_id: int) -> Response:
    """Link more alerts to the report by their numbers (12, 15 or #12 #15)."""
    state = request.app.state.sekisho
    form = await request.form()
    typed = _text(form, "alerts")
    try:
        if not _ALERT_NUMBERS.match(typed) or len(typed) > 2000:
            raise FormRefused("bad_alerts", "alerts")
        wanted = _alert_ids(re.findall(r"\d+", typed))
        if not wanted:
            raise FormRefused("bad_alerts", "alerts")
        await run_in_threadpool(incidents_api.link, state, api_operator(viewer, viewer.client), incident_id, wanted)
    except (FormRefused, IncidentRefused) as err:
        if isinstance(err, IncidentRefused) and err.kind == "not_found":
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such incident") from err
        lang = templating.language_of(request, viewer)
        code = incidents_api.refusal_status(err) if isinstance(err, IncidentRefused) else 422
        return _render_detail(request, viewer, incident_id, code, link_error=refusal_text(err, lang), link_text=typed)
    return RedirectResponse(f"/console/incidents/{incident_id}#incident-alerts", status_code=status.HTTP_303_SEE_OTHER)
