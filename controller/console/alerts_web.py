"""The alerts pages (アラート) for security staff: the live list, one alert, silences, and the wall status board.

- ``/console/alerts``: open and acknowledged alerts first (severity, then newest), then the resolved ones; a
  filter form (state, severity, rule, area, door, person, terminal, JST days) and keyset pages. Rows change
  without a reload: ``static/alerts.js`` listens to ``/console/alerts/stream`` (Server-Sent Events, one HTML
  row per changed alert, controller/api/sse.py) and swaps rows by id; a sound toggle (off by default, kept in
  this browser) beeps on a new critical or high alert. Without JavaScript the page works with its refresh link.
- ``/console/alerts/{id}``: the title in the reader's language, where (names, ids on hover, timeline links),
  the procedure, the events behind it, its history from the admin trail, and the acknowledge / resolve /
  reopen forms (alerts.ack only; a POST from any other role is refused by the role matrix).
- ``/console/alerts/silences``: silences and maintenance windows in force or to come, add one, end one early.
  There is no "mark all reviewed" and no bulk clear anywhere: each alert is handled on its own page.
- ``/console/alerts/board``: a wall board readable across a room (doors open, alerts by severity, keys out,
  agents offline), refreshed every few seconds, no controls.
- ``/console/alerts/notifications``: the notifications that could not be delivered (the dead-letter list of
  controller/alerts/delivery.py), each with its alert, channel, contact and last error, and a replay button.

The alert page also drafts an incident report from its alert, and the list lets a handler tick several alerts
for one (controller/console/incidents_web.py).

Every read goes through controller/alerts/listing.py and every change through controller/alerts/book.py, the
same functions the JSON API (controller/api/alerts.py) uses; each change and its admin-trail row commit in one
transaction with the signed-in user as the operator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import AwareDatetime
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from sekisho.common.i18n import gettext as service_text
from sekisho.common.i18n import localize
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.accounts.web import csrf_for
from sekisho.controller.alerts import book, delivery, listing, texts
from sekisho.controller.alerts.book import ALERTS
from sekisho.controller.alerts.listing import ListingError
from sekisho.controller.alerts.rules import RULES
from sekisho.controller.api import alerts as alerts_api
from sekisho.controller.api import incidents as incidents_api
from sekisho.controller.api import sse
from sekisho.controller.api.alerts import CursorQuery, FilterDep, LifetimeQuery
from sekisho.controller.audit.operators import api_operator
from sekisho.controller.console import nav, templating
from sekisho.controller.console.formats import JST, Lang, iso_jst
from sekisho.controller.console.i18n import N_, gettext
from sekisho.controller.console.overview_web import door_states, keys_out
from sekisho.controller.console.register_query import encode_trail, half, parse_trail, reports_of
from sekisho.controller.fleet.health import Thresholds, count_states, fleet_health
from sekisho.controller.reports.directory import Directory
from sekisho.controller.reports.labels import EVENT_LABELS
from sekisho.controller.reports.paging import Ref
from sekisho.controller.store.models import ConsoleUser
from sekisho.protocol import mynumber, timefmt

router = APIRouter(prefix="/console/alerts", tags=["console"], include_in_schema=False)
nav.register(nav.NavItem("/console/alerts", N_("Alerts"), Permission.ALERTS_READ, built=True))
Reader = Annotated[Actor, require(Permission.ALERTS_READ)]
Handler = Annotated[Actor, require(Permission.ALERTS_ACK)]

# Seconds between the wall board's refreshes.
BOARD_REFRESH_S: Final = 5
TextForm = Annotated[str, Form(max_length=book.MAX_TEXT + 100)]
IdForm = Annotated[str, Form(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:@-]{0,63})?$")]
# A datetime-local input: the JST wall time the operator typed.
LocalTimeForm = Annotated[str, Form(max_length=19, pattern=r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?)?$")]

STATE_LABELS: Final = {
    "open": N_("Not acknowledged"),
    "acknowledged": N_("Acknowledged"),
    "resolved": N_("Resolved"),
    "unresolved": N_("Not resolved"),
}
# The status symbol each state shows with its words (never colour alone).
STATE_STATUS: Final = {"open": "failed", "acknowledged": "warning", "resolved": "ok"}
CONDITION_LABELS: Final = {
    "active": N_("Condition still active"),
    "cleared": N_("Condition cleared"),
    "none": N_("No lasting condition"),
}
CAUSE_LABELS: Final = {
    "intrusion": N_("Intrusion"),
    "misuse": N_("Misuse"),
    "device_fault": N_("Device fault"),
    "operational": N_("Normal operation"),
    "false_alarm": N_("False alarm"),
    "test": N_("Test"),
    "other": N_("Other"),
}
LABEL_NAMES: Final = {
    "door": N_("Door"),
    "area": N_("Area"),
    "person": N_("Person"),
    "terminal": N_("Terminal"),
    "agent": N_("Agent"),
    "reader": N_("Card reader"),
    "slot": N_("Key slot"),
    "device": N_("Device"),
    "chain": N_("Record chain"),
}
# Labels whose subject has a timeline page (controller/console/registers_web.py), and the label order shown.
TIMELINE_LABELS: Final = ("person", "door", "area", "terminal")
KIND_LABELS: Final = {"silence": N_("Silence"), "maintenance": N_("Maintenance window")}
HISTORY_LABELS: Final = {
    "alert.opened": N_("Opened"),
    "alert.acknowledged": N_("Acknowledged"),
    "alert.resolved": N_("Resolved"),
    "alert.reopened": N_("Reopened"),
    "alert.condition_cleared": N_("Condition cleared"),
    "alert.retriggered": N_("Open again: not resolved in time after the acknowledgement"),
    "alert.uninhibited": N_("No longer held back by an offline agent"),
    "alert.unsilenced": N_("Silence ended: notifications resume"),
    "alert.notified": N_("Notification delivered"),
    "alert.notification_dead": N_("Notification could not be delivered"),
    "alert.notification_replayed": N_("Notification queued again"),
    "alert.escalated": N_("Escalated to the next contacts"),
}
# An escalation step writes alert.opened / alert.retriggered with its chain in the detail: contacts were told.
STEP_LABEL: Final = N_("Contacts notified (escalation step)")
FIELD_NAMES: Final = {
    "comment": N_("Comment"),
    "note": N_("What was found"),
    "reason": N_("Reason"),
    "override": N_("Why resolve while the condition is active"),
}
REFUSALS: Final = {
    "required": N_("%(field)s: please fill this in."),
    "too_long": N_("%(field)s: too long (at most 2,000 characters)."),
    "bad_cause": N_("Choose a cause from the list."),
    "not_found": N_("There is no such alert."),
    "not_open": N_(
        "This alert is no longer open: someone has acknowledged or resolved it. Its current state is shown."
    ),
    "already_resolved": N_("This alert is already resolved."),
    "not_resolved": N_("Only a resolved alert can be reopened."),
    "needs_override": N_(
        "The condition is still active (for example the door still stands open). To resolve the alert anyway, "
        "say why in the override field."
    ),
    "newer_live": N_("A newer alert about the same subject is open: work on that one."),
    "bad_period": N_("The end must be after the start."),
    "silence_too_long": N_(
        "A silence lasts at most 31 days; to stop a rule for longer, disable it in the site policy."
    ),
    "silence_everything": N_(
        "Name a rule or at least one door, area, agent, person or terminal: a silence never covers everything."
    ),
    "silence_not_active": N_("This silence has already ended."),
    "not_dead": N_("This notification is not in the list of undelivered notifications."),
    "bad_rule": N_("Choose a rule from the list."),
    "bad_time": N_("Give the start and end as date and time (JST)."),
}
CHANNEL_LABELS: Final = {"email": N_("E-mail"), "webhook": N_("Webhook"), "syslog": N_("Syslog")}
BAD_CURSOR: Final = N_("This page position is not valid any more; start from the first page.")
CAUSE_HEADING: Final = N_("Cause")
OVERRIDE_HEADING: Final = N_("Override")
FORCED: Final = N_("forced open")
SUMMARY_LABELS: Final = {
    "alarm": N_("Alarm"),
    "reason": N_("Reason"),
    "reader": N_("Card reader"),
    "direction": N_("Direction"),
}


# --- what a row shows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """One label of an alert as shown: its heading, the named subject, and its timeline page (if any)."""

    key: str
    heading: str
    ref: Ref
    timeline: str | None


@dataclass(frozen=True)
class AlertView:
    """One alert as the list and the detail page show it (in one language)."""

    id: int
    version: int
    rule: str
    title: str
    severity: str
    severity_name: str
    state: str
    condition: str
    count: int
    first_at: datetime
    last_at: datetime
    places: list[Place]
    quiet: bool
    row: Any

    @property
    def sort_key(self) -> list[int]:
        """Return the list order as numbers the page script compares: [group, rank, last seen ms, id]."""
        key = listing.sort_key(self.row)
        return [key.group, key.rank, int(key.last_at.timestamp() * 1000), key.id]


def _ref(directory: Directory, key: str, value: str) -> Ref:
    found: Ref | None = None
    if key == "door":
        found = directory.door(value)
    elif key == "area":
        found = directory.area(value)
    elif key == "person":
        found = directory.person(value)
    elif key == "terminal":
        found = directory.terminal(value)
    return found or Ref(value, value, known=False)


def places_of(labels: dict[str, str], directory: Directory, lang: Lang, viewer: Actor) -> list[Place]:
    """Return an alert's labels as named places, timeline links only where the viewer may open them."""
    out: list[Place] = []
    for key, heading in LABEL_NAMES.items():
        value = labels.get(key)
        if not value:
            continue
        ref = _ref(directory, key, value)
        link = None
        permission = Permission.AREAS_READ if key == "area" else Permission.REGISTERS_READ
        if key in TIMELINE_LABELS and ref.known and viewer.may(permission) and viewer.areas is None:
            link = f"/console/timeline/{key}/{value}"
        out.append(Place(key, gettext(lang, heading), ref, link))
    return out


def view(row: Any, directory: Directory, lang: Lang, viewer: Actor) -> AlertView:
    """Return an alert row as shown: the title with names in the reader's language, the places, the severity."""
    labels = listing.labels_of(row)
    places = places_of(labels, directory, lang, viewer)
    named = dict(labels) | {p.key: p.ref.name for p in places}
    return AlertView(
        id=int(row.id),
        version=int(row.version),
        rule=row.rule,
        title=texts.title(lang, row.rule, named),
        severity=row.severity,
        severity_name=service_text(lang, texts.SEVERITY_NAMES.get(row.severity, row.severity)),
        state=row.state,
        condition=row.condition,
        count=int(row.count),
        first_at=row.first_at,
        last_at=row.last_at,
        places=places,
        quiet=row.silenced_by is not None or row.inhibited_by is not None,
        row=row,
    )


def rule_choices(lang: Lang) -> list[tuple[str, str]]:
    """Return (rule id, its title with "…" for the subject) for a select, by title."""
    blank = dict.fromkeys(("door", "reader", "agent", "person", "terminal", "chain", "area", "site"), "…")
    return sorted(((rule, texts.title(lang, rule, blank)) for rule in RULES), key=lambda item: item[1])


def refusal_text(err: Exception, lang: Lang) -> str:
    """Return a refusal of the book (or the My Number guard) in the page's language."""
    if isinstance(err, mynumber.MyNumberFound):
        return localize(err, lang)
    if not isinstance(err, book.AlertRefused):
        return str(err)
    kind, field = listing.refusal(err)
    if kind not in REFUSALS:
        return str(err)  # a refusal this page has no words for: the book's own (English) reason
    name = gettext(lang, FIELD_NAMES[field]) if field in FIELD_NAMES else (field or "")
    return gettext(lang, REFUSALS[kind], field=name)


def _common(request: Request, viewer: Actor) -> dict[str, Any]:
    return {
        "state_labels": STATE_LABELS,
        "state_status": STATE_STATUS,
        "condition_labels": CONDITION_LABELS,
        "may_ack": viewer.may(Permission.ALERTS_ACK),
        "csrf_token": csrf_for(request) if viewer.via == "session" else "",
    }


def render_row(request: Request, alert: AlertView, viewer: Actor, lang: Lang) -> str:
    """Return one table row of the list (the page and the stream draw rows the same way)."""
    values = {"lang": lang, "a": alert, **_common(request, viewer)}
    return templating.environment().get_template("alerts/row.html").render(values).strip()


# --- the list -------------------------------------------------------------------------------------


def _filter_form(request: Request, lang: Lang) -> dict[str, Any]:
    directory = reports_of(request).directory()
    params = request.query_params
    chosen = {name: params.get(name, "") for name in ("state", "severity", "rule", *listing.LABEL_FILTERS)}
    chosen |= {"from": params.get("from", ""), "to": params.get("to", "")}
    people = sorted(directory.people.values(), key=lambda p: (p.kana or p.name, p.id))
    return {
        "chosen": chosen,
        "states": [(s, STATE_LABELS[s]) for s in listing.STATE_CHOICES],
        "severities": [(s, service_text(lang, texts.SEVERITY_NAMES[s])) for s in listing.SEVERITIES],
        "rules": rule_choices(lang),
        "areas": sorted((a, name) for a, (name, _kind) in directory.areas.items()),
        "doors": sorted((d.id, d.name) for d in directory.doors.values()),
        "people": [(p.id, p.name, p.kana) for p in people],
        "terminals": sorted((t, name) for t, (name, _agent) in directory.terminals.items()),
    }


def _filter_query(request: Request) -> str:
    keep = ("state", "severity", "rule", *listing.LABEL_FILTERS, "from", "to")
    return urlencode([(k, v) for k, v in request.query_params.multi_items() if k in keep and v])


def _paging(request: Request, next_cursor: str | None) -> dict[str, str | None]:
    """Return next / previous / first links; previous from the trail of cursors kept in the query string."""
    trail = parse_trail(request)
    current = request.query_params.get("cursor", "")
    base = _filter_query(request)
    path = request.url.path

    def link(cursor: str | None, cursors: list[str]) -> str:
        extra = [("cursor", cursor)] if cursor else []
        if cursor and cursors:
            extra.append(("trail", encode_trail(cursors)))
        query = "&".join(part for part in (base, urlencode(extra)) if part)
        return f"{path}?{query}" if query else path

    return {
        "next": link(next_cursor, [*trail, current]) if next_cursor else None,
        "previous": link((trail[-1] if trail else "") or None, trail[:-1]) if current else None,
        "first": link(None, []) if current else None,
    }


def _as_of(request: Request) -> datetime:
    """Return the newest change the list shows (the stream starts from it; the epoch for an empty book)."""
    with request.app.state.sekisho.store.engine.connect() as conn:
        found = conn.execute(select(ALERTS.c.updated_at).order_by(ALERTS.c.updated_at.desc()).limit(1)).scalar()
    return found if isinstance(found, datetime) else datetime(1970, 1, 1, tzinfo=UTC)


@router.get("")
def alerts_page(request: Request, viewer: Reader, flt: FilterDep, cursor: CursorQuery = None) -> Response:
    """Show the alerts, unresolved first, with the filter form; live through the stream."""
    lang = templating.language_of(request, viewer)
    as_of = _as_of(request)
    error = None
    rows: list[AlertView] = []
    next_cursor = None
    try:
        with request.app.state.sekisho.store.engine.connect() as conn:
            found = listing.page(conn, flt, cursor=cursor or None)
        directory = reports_of(request).directory()
        rows = [view(r, directory, lang, viewer) for r in found.rows]
        next_cursor = found.next_cursor
    except ListingError:
        error = gettext(lang, BAD_CURSOR)
    query = _filter_query(request)
    stream_query = "&".join(part for part in (query, urlencode({"since": timefmt.fmt(as_of)})) if part)
    context = {
        **_common(request, viewer),
        "rows": rows,
        "form": _filter_form(request, lang),
        "links": _paging(request, next_cursor),
        "first_page": not cursor,
        "stream_url": f"/console/alerts/stream?{stream_query}",
        "refresh_url": f"/console/alerts?{query}" if query else "/console/alerts",
        "error": error,
        "as_of": request.app.state.sekisho.clock(),
    }
    return templating.render(request, "alerts/list.html", context, viewer=viewer, status_code=422 if error else 200)


@router.get("/stream", response_class=StreamingResponse)
def alerts_stream(
    request: Request,
    viewer: Reader,
    flt: FilterDep,
    since: AwareDatetime | None = None,
    max_s: LifetimeQuery = sse.LIFETIME_S,
) -> StreamingResponse:
    """Stream the list's changes: an HTML row per changed alert that passes the filter, else its removal."""
    lang = templating.language_of(request, viewer)

    def render(row: Any, event_id: str) -> str:
        if not flt.matches(row):
            return sse.event("gone", json.dumps({"id": int(row.id)}), event_id)
        alert = view(row, reports_of(request).directory(), lang, viewer)
        data = {
            "id": alert.id,
            "version": alert.version,
            "severity": alert.severity,
            "state": alert.state,
            "key": alert.sort_key,
            "html": render_row(request, alert, viewer, lang),
        }
        return sse.event("alert", json.dumps(data, ensure_ascii=False, separators=(",", ":")), event_id)

    return sse.alert_stream(request, render, since=since, lifetime_s=max_s)


# --- silences -------------------------------------------------------------------------------------


def _matchers_view(matchers: dict[str, Any], directory: Directory, lang: Lang) -> list[tuple[str, Ref]]:
    return [
        (gettext(lang, LABEL_NAMES.get(k, k)) if k in LABEL_NAMES else k, _ref(directory, k, str(v)))
        for k, v in sorted(matchers.items())
    ]


def _local_input(moment: datetime) -> str:
    return moment.astimezone(JST).strftime("%Y-%m-%dT%H:%M")


def _silences_context(request: Request, viewer: Actor, error: str | None, asked: dict[str, str] | None) -> Any:
    lang = templating.language_of(request, viewer)
    state = request.app.state.sekisho
    directory = reports_of(request).directory()
    now = state.clock()
    rows = alerts_api.silences(state)
    rules = dict(rule_choices(lang))
    setters = people_named(request, [r.created_by for r in rows])
    blank = dict.fromkeys(("rule", "door", "area", "agent", "person", "terminal", "reason"), "")
    blank |= {"starts": _local_input(now), "ends": _local_input(now + timedelta(hours=1)), "kind": "maintenance"}
    shown = [
        {
            "row": r,
            "kind": KIND_LABELS.get(r.kind, r.kind),
            "rule": rules.get(r.rule, r.rule) if r.rule else None,
            "matchers": _matchers_view(dict(r.matchers or {}), directory, lang),
            "upcoming": r.starts_at > now,
            "who": setters[r.created_by],
        }
        for r in rows
    ]
    return {
        **_common(request, viewer),
        "silences": shown,
        "kinds": KIND_LABELS,
        "form": _filter_form(request, lang),
        "asked": {**blank, **(asked or {})},
        "error": error,
    }


@router.get("/silences")
def silences_page(request: Request, viewer: Reader) -> Response:
    """Show the silences and maintenance windows in force or to come, and the form to add one."""
    return templating.render(
        request, "alerts/silences.html", _silences_context(request, viewer, None, None), viewer=viewer
    )


def _jst_input(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=JST)


@router.post("/silences")
async def add_silence(
    request: Request,
    viewer: Handler,
    reason: TextForm = "",
    starts: LocalTimeForm = "",
    ends: LocalTimeForm = "",
    kind: Annotated[str, Form(pattern=r"^(silence|maintenance)$")] = "maintenance",
    rule: Annotated[str, Form(max_length=48, pattern=r"^[a-z_]*$")] = "",
    door: IdForm = "",
    area: IdForm = "",
    agent: IdForm = "",
    person: IdForm = "",
    terminal: IdForm = "",
) -> Response:
    """Add a silence or maintenance window (a rule and/or labels, at most 31 days), recorded with who and why."""
    lang = templating.language_of(request, viewer)
    asked = {"kind": kind, "rule": rule, "door": door, "area": area, "agent": agent, "person": person}
    asked |= {"terminal": terminal, "starts": starts, "ends": ends, "reason": reason}
    matchers = {k: v for k, v in (("door", door), ("area", area), ("agent", agent), ("person", person),
                                  ("terminal", terminal)) if v}  # fmt: skip
    error = None
    if rule and rule not in RULES:
        error = gettext(lang, REFUSALS["bad_rule"])
    elif not starts or not ends:
        error = gettext(lang, REFUSALS["bad_time"])
    else:
        try:
            await run_in_threadpool(
                alerts_api.add_silence, request.app.state.sekisho, api_operator(viewer, viewer.client),
                kind="silence" if kind == "silence" else "maintenance", rule=rule or None, matchers=matchers,
                starts_at=_jst_input(starts), ends_at=_jst_input(ends), reason=reason,
            )  # fmt: skip
        except ValueError as err:  # AlertRefused, MyNumberFound, or a datetime that does not exist
            error = refusal_text(err, lang) if isinstance(err, book.AlertRefused | mynumber.MyNumberFound) else None
            error = error or gettext(lang, REFUSALS["bad_time"])
    if error is not None:
        if mynumber.contains_my_number(reason):
            asked["reason"] = ""  # never echoed back
        context = _silences_context(request, viewer, error, asked)
        return templating.render(request, "alerts/silences.html", context, viewer=viewer, status_code=422)
    return RedirectResponse("/console/alerts/silences", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/silences/{silence_id}/end")
async def end_silence(request: Request, viewer: Handler, silence_id: int) -> Response:
    """End a silence or maintenance window now (recorded)."""
    try:
        await run_in_threadpool(
            alerts_api.end_silence, request.app.state.sekisho, silence_id, api_operator(viewer, viewer.client)
        )
    except book.AlertRefused as err:
        lang = templating.language_of(request, viewer)
        context = _silences_context(request, viewer, refusal_text(err, lang), None)
        return templating.render(request, "alerts/silences.html", context, viewer=viewer, status_code=409)
    return RedirectResponse("/console/alerts/silences", status_code=status.HTTP_303_SEE_OTHER)


# --- the wall board -------------------------------------------------------------------------------


def _board_context(request: Request, viewer: Actor) -> dict[str, Any]:
    state = request.app.state.sekisho
    lang = templating.language_of(request, viewer)
    now = state.clock()
    with state.store.engine.connect() as conn:
        counts = listing.open_counts(conn)
    doors = door_states(request)
    agents = None
    if viewer.may(Permission.FLEET_READ):
        agents = count_states(fleet_health(state.store, Thresholds.from_config(state.config), now))
    return {
        "alerts": [
            {"severity": s, "name": service_text(lang, texts.SEVERITY_NAMES[s]), **counts[s]}
            for s in listing.SEVERITIES
        ],
        "unresolved": sum(c["open"] + c["acknowledged"] for c in counts.values()),
        "doors_open": sum(1 for d in doors if d.open),
        "doors_not_normal": sum(1 for d in doors if d.mode != "normal"),
        "keys": keys_out(request),
        "agents": agents,
        "as_of": now,
        "refresh_s": BOARD_REFRESH_S,
    }


@router.get("/board")
def board(request: Request, viewer: Reader) -> Response:
    """Show the wall status board: large figures, high contrast, refreshed every few seconds, no controls."""
    return templating.render(request, "alerts/board.html", _board_context(request, viewer), viewer=viewer)


@router.get("/board/fragment")
def board_fragment(request: Request, viewer: Reader) -> Response:
    """Return the board's figures alone (the page script swaps them in)."""
    return templating.render(request, "alerts/board_panels.html", _board_context(request, viewer), viewer=viewer)


# --- undelivered notifications ------------------------------------------------------------------


def _notifications_context(request: Request, viewer: Actor, error: str | None) -> dict[str, Any]:
    state = request.app.state.sekisho
    lang = templating.language_of(request, viewer)
    rows = delivery.dead_letters(state.store)
    directory = reports_of(request).directory()
    with state.store.engine.connect() as conn:
        wanted = sorted({int(r.alert_id) for r in rows})
        alerts = {int(a.id): a for a in conn.execute(select(*ALERTS.columns).where(ALERTS.c.id.in_(wanted)))}
    shown = []
    for r in rows:
        alert = alerts.get(int(r.alert_id))
        shown.append(
            {
                "row": r,
                "alert": view(alert, directory, lang, viewer) if alert is not None else None,
                "channel": gettext(lang, CHANNEL_LABELS[r.channel]) if r.channel in CHANNEL_LABELS else r.channel,
            }
        )
    return {**_common(request, viewer), "notifications": shown, "error": error}


@router.get("/notifications")
def notifications_page(request: Request, viewer: Reader) -> Response:
    """Show the notifications that could not be delivered (newest first), each with a replay button (alerts.ack)."""
    context = _notifications_context(request, viewer, None)
    return templating.render(request, "alerts/notifications.html", context, viewer=viewer)


@router.post("/notifications/{notification_id}/replay")
async def replay_notification(request: Request, viewer: Handler, notification_id: int) -> Response:
    """Put an undelivered notification back in the outbox; the delivery job sends it at its next round."""
    state = request.app.state.sekisho
    try:
        await run_in_threadpool(
            delivery.replay, state.store, notification_id, api_operator(viewer, viewer.client), state.clock()
        )
    except book.AlertRefused as err:
        lang = templating.language_of(request, viewer)
        context = _notifications_context(request, viewer, refusal_text(err, lang))
        return templating.render(request, "alerts/notifications.html", context, viewer=viewer, status_code=409)
    return RedirectResponse("/console/alerts/notifications", status_code=status.HTTP_303_SEE_OTHER)


# --- one alert ------------------------------------------------------------------------------------


def people_named(request: Request, actors: list[str]) -> dict[str, Ref]:
    """Return the console users named by trail actors (user:<login>, token:<login>/<id>) by name, the actor on hover."""
    logins = {}
    for actor in actors:
        kind, _, rest = actor.partition(":")
        if kind in ("user", "token") and rest:
            logins[actor] = rest.split("/", 1)[0]
    found: dict[str, Any] = {}
    if logins:
        u = ConsoleUser.__table__.c
        with request.app.state.sekisho.store.engine.connect() as conn:
            rows = conn.execute(
                select(u.login, u.display_name, u.kana).where(u.login.in_(sorted(set(logins.values())))).limit(500)
            )
            found = {r.login: r for r in rows}
    out = {}
    for actor in actors:
        user = found.get(logins.get(actor, ""))
        out[actor] = Ref(actor, user.display_name, user.kana) if user is not None else Ref(actor, actor, known=False)
    return out


def _event_summary(payload: Any, directory: Directory, lang: Lang) -> str:
    parts = []
    summary = alerts_api.event_summary(payload)
    for key in ("door", "person", "terminal"):
        if isinstance(summary.get(key), str):
            parts.append(_ref(directory, key, summary[key]).text())
    for key in ("alarm", "reason", "reader", "direction"):
        if key in summary:
            parts.append(f"{gettext(lang, SUMMARY_LABELS[key])}: {summary[key]}")
    if summary.get("forced"):
        parts.append(gettext(lang, FORCED))
    return " · ".join(str(p) for p in parts)


def _history_line(row: Any, lang: Lang) -> tuple[str, str]:
    detail = row.detail if isinstance(row.detail, dict) else {}
    new = row.new if isinstance(row.new, dict) else {}
    if row.action in ("alert.opened", "alert.retriggered") and "chain" in detail:
        what = gettext(lang, STEP_LABEL)
    elif row.action in HISTORY_LABELS:
        what = gettext(lang, HISTORY_LABELS[row.action])
    else:
        what = row.action
    said = new.get("comment") or new.get("note") or new.get("reason") or ""
    if row.action == "alert.resolved":
        cause = new.get("cause")
        bits = [str(said)]
        if cause in CAUSE_LABELS:
            bits.append(f"{gettext(lang, CAUSE_HEADING)}: {gettext(lang, CAUSE_LABELS[cause])}")
        if new.get("override"):
            bits.append(f"{gettext(lang, OVERRIDE_HEADING)}: {new['override']}")
        said = " / ".join(b for b in bits if b)
    elif row.action in ("alert.notified", "alert.notification_dead"):
        said = " ".join(str(detail.get(k)) for k in ("channel", "contact", "error") if detail.get(k))
    elif "chain" in detail:
        contacts = detail.get("contacts") or []
        said = ", ".join(str(c) for c in contacts) if isinstance(contacts, list) else ""
    return what, str(said)


def _detail_context(
    request: Request, viewer: Actor, alert_id: int, error: str | None, asked: dict[str, str] | None = None
) -> dict[str, Any]:
    lang = templating.language_of(request, viewer)
    state = request.app.state.sekisho
    with state.store.engine.connect() as conn:
        row = listing.get(conn, alert_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such alert")
        events = listing.events_of(conn, alert_id)
        trail = listing.history(conn, alert_id)
    directory = reports_of(request).directory()
    alert = view(row, directory, lang, viewer)
    people = people_named(request, [h.actor for h in trail] + [a for a in (row.acked_by, row.resolved_by) if a])
    first_day = row.first_at.astimezone(JST).date().isoformat()
    last_day = row.last_at.astimezone(JST).date().isoformat()
    period = urlencode({"from": first_day, "to": last_day})
    return {
        **_common(request, viewer),
        "a": alert,
        "row": row,
        "procedure": texts.procedure(lang, row.rule),
        "period": period,
        "events": [
            {
                "at": e.occurred_at,
                "type": half(" / ".join(EVENT_LABELS[e.type]), lang) if e.type in EVENT_LABELS else e.type,
                "agent": e.agent_id,
                "summary": _event_summary(e.payload, directory, lang),
                "id": e.event_id,
            }
            for e in events
        ],
        "history": [
            {"at": h.at, "who": people[h.actor], "what": what, "said": said}
            for h in trail
            for what, said in [_history_line(h, lang)]
        ],
        "people": people,
        "incidents": incidents_api.incidents_of_alert(state, alert_id),
        "causes": [(c, CAUSE_LABELS[c]) for c in book.CAUSES],
        "cause_labels": CAUSE_LABELS,
        "field_names": FIELD_NAMES,
        "error": error,
        "iso": iso_jst,
        # What the form sent, shown again after a refusal (a My-Number-like value is never echoed back).
        "asked": dict.fromkeys(("comment", "note", "cause", "override", "reason"), "")
        | {k: ("" if mynumber.contains_my_number(v) else v) for k, v in (asked or {}).items()},
    }


@router.get("/{alert_id}")
def alert_page(request: Request, viewer: Reader, alert_id: int) -> Response:
    """Show one alert: what, where, the procedure, its events and history, and (alerts.ack) what to do next."""
    context = _detail_context(request, viewer, alert_id, None)
    return templating.render(request, "alerts/detail.html", context, viewer=viewer)


async def _change(
    request: Request, viewer: Actor, alert_id: int, asked: dict[str, str], work: Any, *args: Any
) -> Response:
    """Run one book change for the signed-in user; a refusal comes back on the page in its language."""
    state = request.app.state.sekisho
    try:
        await run_in_threadpool(work, state, alert_id, api_operator(viewer, viewer.client), *args)
    except (book.AlertRefused, mynumber.MyNumberFound) as err:
        lang = templating.language_of(request, viewer)
        code = listing.refusal_status(err) if isinstance(err, book.AlertRefused) else 422
        if code == status.HTTP_404_NOT_FOUND:
            raise HTTPException(code, "no such alert") from err
        context = _detail_context(request, viewer, alert_id, refusal_text(err, lang), asked)
        return templating.render(request, "alerts/detail.html", context, viewer=viewer, status_code=code)
    return RedirectResponse(f"/console/alerts/{alert_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/{alert_id}/acknowledge")
async def acknowledge(request: Request, viewer: Handler, alert_id: int, comment: TextForm = "") -> Response:
    """Acknowledge an open alert with a comment (its escalation stops)."""
    return await _change(request, viewer, alert_id, {"comment": comment}, alerts_api.acknowledge, comment)


@router.post("/{alert_id}/resolve")
async def resolve(
    request: Request,
    viewer: Handler,
    alert_id: int,
    note: TextForm = "",
    cause: Annotated[str, Form(max_length=32)] = "",
    override: TextForm = "",
) -> Response:
    """Resolve an alert with what was found and its cause; with the condition active, an override reason."""
    asked = {"note": note, "cause": cause, "override": override}
    return await _change(request, viewer, alert_id, asked, alerts_api.resolve, note, cause, override.strip() or None)


@router.post("/{alert_id}/reopen")
async def reopen(request: Request, viewer: Handler, alert_id: int, reason: TextForm = "") -> Response:
    """Reopen a resolved alert with a reason."""
    return await _change(request, viewer, alert_id, {"reason": reason}, alerts_api.reopen, reason)
