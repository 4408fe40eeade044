"""Incident records over HTTP (`/api/v1/incidents`): draft breach reports built from alerts, edited with
optimistic locking, moved forward through their statuses, linked to more alerts, and exported as PDF.

The console's pages (controller/console/incidents_web.py) call the same service functions below, which call
controller/alerts/incidents.py inside one write transaction each (the change and its admin-trail row commit
together); the operator is the authenticated caller (``token:<login>/<token id>`` for a personal API token).
Reading needs alerts.read, every change alerts.ack. A refusal answers 404 (no such incident), 409 (a stale
version — the answer names who changed it —, a closed report, a status that does not move forward, a report
sent without its summary) or 422 (a bad value, an unknown field, a missing alert, a My Number). A PDF export
is recorded in the admin trail (``export.pdf``, target ``incident:<id>``) before it is made, like the
registers' exports. Times are ISO 8601 with the JST offset.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictInt
from sqlalchemy import func, select

from sekisho.common.i18n import message_of
from sekisho.controller.accounts.audit_hook import VIA
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.alerts import incidents
from sekisho.controller.alerts.incidents import INCIDENT_ALERTS, IncidentRefused
from sekisho.controller.api.alerts import AlertPublic, Title, alert_json
from sekisho.controller.api.deps import AppState, StateDep
from sekisho.controller.api.schemas import AdminText
from sekisho.controller.audit.api import OperatorDep
from sekisho.controller.console.formats import JST
from sekisho.controller.store.audit import Operator
from sekisho.controller.store.db import write_transaction
from sekisho.protocol import mynumber

incidents_api = APIRouter(prefix="/api/v1/incidents", tags=["incidents"])
READ = [require(Permission.ALERTS_READ)]
ACK = [require(Permission.ALERTS_ACK)]
ReaderDep = Annotated[Actor, require(Permission.ALERTS_READ)]

# Refusals that are about the report's state, not the request's values.
CONFLICTS: Final = frozenset({"stale", "closed", "forward_only", "needs_summary"})
MAX_ALERTS: Final = 100
FieldText = Annotated[AdminText, Field(max_length=incidents.MAX_FIELD)]


# --- deadlines ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deadline:
    """One of the two reports the PPC expects: when it is due, when it was sent, whether it is overdue now."""

    due: datetime
    sent_at: datetime | None
    overdue: bool


def deadlines_of(row: Any, now: datetime) -> tuple[Deadline, Deadline]:
    """Return the preliminary and final report deadlines of an incident row as of ``now``.

    Overdue: the due time has passed, that report has not been sent, and the incident is not closed.
    """
    found = incidents.deadlines(row.found_at, bool(row.malicious))
    still_open = row.status != "closed"
    preliminary = Deadline(
        found.preliminary,
        row.preliminary_reported_at,
        still_open and row.preliminary_reported_at is None and now > found.preliminary,
    )
    final = Deadline(
        found.final, row.final_reported_at, still_open and row.final_reported_at is None and now > found.final
    )
    return preliminary, final


# --- models ---------------------------------------------------------------------------------------


class DeadlinePublic(BaseModel):
    """When a report is due (the PPC's guidance, from discovery), when it was sent, whether it is overdue."""

    due: datetime
    sent_at: datetime | None
    overdue: bool


class DeadlinesPublic(BaseModel):
    """The preliminary (速報) and final (確報) report deadlines."""

    preliminary: DeadlinePublic
    final: DeadlinePublic


class EvidenceItem(BaseModel):
    """One item of the evidence list: its kind (alert, camera, log…), a reference and a note."""

    model_config = ConfigDict(extra="forbid")

    kind: AdminText = Field(default="", max_length=500)
    ref: AdminText = Field(default="", max_length=500)
    note: AdminText = Field(default="", max_length=500)


class IncidentSummaryPublic(BaseModel):
    """An incident in the list: what, its status, when found, its deadlines and how many alerts."""

    id: int
    title: str
    status: str
    status_label: Title
    found_at: datetime
    occurred_at: datetime | None
    deadlines: DeadlinesPublic
    alerts: int
    version: int
    updated_by: str
    updated_at: datetime


class IncidentPublic(BaseModel):
    """One draft report with every fact the PPC's form asks for."""

    id: int
    title: str
    status: str
    status_label: Title
    found_at: datetime
    occurred_at: datetime | None
    malicious: bool
    people_count: int | None
    report: dict[str, str]
    evidence: list[EvidenceItem]
    preliminary_reported_at: datetime | None
    final_reported_at: datetime | None
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime
    version: int
    deadlines: DeadlinesPublic


class IncidentDetailPublic(BaseModel):
    """One report with the alerts it was built from (oldest first)."""

    incident: IncidentPublic
    alerts: list[AlertPublic]


class IncidentCreate(BaseModel):
    """Draft a report from alerts; the title defaults to the first alert's."""

    model_config = ConfigDict(extra="forbid")

    alerts: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=MAX_ALERTS)
    title: AdminText = Field(default="", max_length=incidents.MAX_TITLE)


class ReportChanges(BaseModel):
    """The fields to change (only those given); null clears occurred_at or people_count."""

    model_config = ConfigDict(extra="forbid")

    title: AdminText | None = Field(default=None, max_length=incidents.MAX_TITLE)
    summary: FieldText | None = None
    data_items: FieldText | None = None
    cause: FieldText | None = None
    secondary_harm: FieldText | None = None
    notice_to_people: FieldText | None = None
    publication: FieldText | None = None
    prevention: FieldText | None = None
    other: FieldText | None = None
    found_at: AwareDatetime | None = None
    occurred_at: AwareDatetime | None = None
    people_count: Annotated[StrictInt, Field(ge=0)] | None = None
    malicious: StrictBool | None = None
    evidence: list[EvidenceItem] | None = Field(default=None, max_length=incidents.MAX_EVIDENCE)


class IncidentUpdate(BaseModel):
    """Change a report: the version it was read at (a stale one is refused with 409) and the changes."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    changes: ReportChanges


class IncidentAdvance(BaseModel):
    """Move a report forward: preliminary (速報 sent), final (確報 sent) or closed."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["draft", "preliminary", "final", "closed"]


class IncidentLink(BaseModel):
    """Link more alerts to a report (their ids); already linked ones are skipped."""

    model_config = ConfigDict(extra="forbid")

    alerts: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=MAX_ALERTS)


# --- service (the console calls these too) --------------------------------------------------------


def refusal_status(err: IncidentRefused) -> int:
    """Return the HTTP status of a refusal: 404 no such incident, 409 its state forbids it, else 422."""
    if err.kind == "not_found":
        return status.HTTP_404_NOT_FOUND
    return status.HTTP_409_CONFLICT if err.kind in CONFLICTS else status.HTTP_422_UNPROCESSABLE_CONTENT


def refused(err: Exception) -> HTTPException:
    """Return the HTTP answer of a refused change (the reason, or the My Number guard's message)."""
    if isinstance(err, mynumber.MyNumberFound):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message_of(err))
    assert isinstance(err, IncidentRefused)
    return HTTPException(refusal_status(err), str(err))


def create(state: AppState, who: Operator, alert_ids: list[int], title: str) -> int:
    """Draft a report from alerts in one transaction with its trail row; return its id."""
    with write_transaction(state.store.engine) as conn:
        return incidents.create_from_alerts(conn, state.store.signing_key, who, alert_ids, title, state.clock())


def update(state: AppState, who: Operator, incident_id: int, version: int, changes: dict[str, Any]) -> int:
    """Change a report's fields if it is still at ``version``; return the new version."""
    with write_transaction(state.store.engine) as conn:
        return incidents.update_report(conn, state.store.signing_key, who, incident_id, version, changes, state.clock())


def advance(state: AppState, who: Operator, incident_id: int, new_status: str) -> None:
    """Move a report forward (draft → preliminary → final → closed)."""
    with write_transaction(state.store.engine) as conn:
        incidents.advance(conn, state.store.signing_key, who, incident_id, new_status, state.clock())


def link(state: AppState, who: Operator, incident_id: int, alert_ids: list[int]) -> int:
    """Link more alerts to a report; return how many were new."""
    with write_transaction(state.store.engine) as conn:
        return incidents.link_alerts(conn, state.store.signing_key, who, incident_id, alert_ids, state.clock())


def read(state: AppState, incident_id: int) -> dict[str, Any]:
    """Return one report with its alerts and deadlines (IncidentRefused "not_found" when there is none)."""
    with state.store.engine.connect() as conn:
        return incidents.read(conn, incident_id)


def summaries(state: AppState) -> list[tuple[Any, int]]:
    """Return the reports (open ones first, newest discovery first) with how many alerts each links."""
    with state.store.engine.connect() as conn:
        rows = incidents.list_incidents(conn)
        ids = [int(r.id) for r in rows]
        c = INCIDENT_ALERTS.c
        counts: dict[int, int] = {}
        if ids:
            found = conn.execute(
                select(c.incident_id, func.count()).where(c.incident_id.in_(ids)).group_by(c.incident_id)
            )
            counts = {int(i): int(n) for i, n in found}
    return [(r, counts.get(int(r.id), 0)) for r in rows]


def incidents_of_alert(state: AppState, alert_id: int) -> list[Any]:
    """Return the reports an alert is linked to (id, title, status), oldest first."""
    i, c = incidents.INCIDENTS.c, INCIDENT_ALERTS.c
    with state.store.engine.connect() as conn:
        return list(
            conn.execute(
                select(i.id, i.title, i.status)
                .join(INCIDENT_ALERTS, c.incident_id == i.id)
                .where(c.alert_id == alert_id)
                .order_by(i.id)
                .limit(100)
            )
        )


def exporter_of(actor: Actor) -> str:
    """Return who exported, as printed on the PDF: name (login)."""
    return f"{actor.display_name} ({actor.login})"


def export_pdf(state: AppState, actor: Actor, client: str | None, incident_id: int) -> tuple[bytes, str]:
    """Return a report's PDF and its file name; the export is in the admin trail before the PDF is made."""
    found = read(state, incident_id)
    now = state.clock()
    row = found["incident"]
    # Recorded first, as the registers' exports are (controller/reports/exports.py): a refused trail row
    # fails the request, and no PDF leaves without its row.
    state.store.record_export(
        actor.audit_name,
        VIA.get(actor.via, "api"),
        client,
        register=f"incident:{incident_id}",
        format="pdf",
        filters={"incident": incident_id, "version": int(row.version)},
        rows=len(found["alerts"]),
    )
    pdf = incidents.render_pdf(found, exporter=exporter_of(actor), exported_at=now)
    return pdf, f"incident-{incident_id}-{now.astimezone(JST):%Y%m%d-%H%M}.pdf"


def pdf_response(pdf: bytes, filename: str) -> Response:
    """Return a PDF as a download (attachment, never cached)."""
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"}
    return Response(pdf, media_type="application/pdf", headers=headers)


# --- JSON -----------------------------------------------------------------------------------------


def _jst(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(JST)


def _label(status_name: str) -> Title:
    ja, en = incidents.STATUS_LABELS[status_name]
    return Title(ja=ja, en=en)


def deadlines_json(row: Any, now: datetime) -> DeadlinesPublic:
    """Return an incident's deadlines as the API shows them."""
    preliminary, final = (
        DeadlinePublic(due=d.due.astimezone(JST), sent_at=_jst(d.sent_at), overdue=d.overdue)
        for d in deadlines_of(row, now)
    )
    return DeadlinesPublic(preliminary=preliminary, final=final)


def incident_json(row: Any, now: datetime) -> IncidentPublic:
    """Return an incident row as the API shows it (times in JST)."""
    values = {name: getattr(row, name) for name in IncidentPublic.model_fields if hasattr(row, name)}
    values = {k: _jst(v) if isinstance(v, datetime) else v for k, v in values.items()}
    report = dict(row.report or {})
    values |= {
        "status_label": _label(row.status),
        "report": {name: str(report.get(name, "")) for name in incidents.FIELD_NAMES},
        "evidence": [EvidenceItem.model_validate(e) for e in row.evidence or []],
        "malicious": bool(row.malicious),
        "deadlines": deadlines_json(row, now),
    }
    return IncidentPublic.model_validate(values)


def detail_json(found: dict[str, Any], now: datetime) -> IncidentDetailPublic:
    """Return a report read with ``read`` as the API shows it."""
    return IncidentDetailPublic(
        incident=incident_json(found["incident"], now), alerts=[alert_json(a) for a in found["alerts"]]
    )


@contextmanager
def answering_refusals() -> Iterator[None]:
    """Answer a refusal of the incident book (or a My Number in a field) with its HTTP status and reason."""
    try:
        yield
    except (IncidentRefused, mynumber.MyNumberFound) as err:
        raise refused(err) from err


def _detail(state: AppState, incident_id: int) -> IncidentDetailPublic:
    with answering_refusals():
        found = read(state, incident_id)
    return detail_json(found, state.clock())


# --- routes (the .pdf path before /{incident_id}) ---------------------------------------------------


@incidents_api.get("", response_model=list[IncidentSummaryPublic], dependencies=READ)
def list_all(state: StateDep) -> list[IncidentSummaryPublic]:
    """List the reports: open ones first, newest discovery first, with deadlines and alert counts."""
    now = state.clock()
    return [
        IncidentSummaryPublic(
            id=r.id,
            title=r.title,
            status=r.status,
            status_label=_label(r.status),
            found_at=r.found_at.astimezone(JST),
            occurred_at=_jst(r.occurred_at),
            deadlines=deadlines_json(r, now),
            alerts=count,
            version=r.version,
            updated_by=r.updated_by,
            updated_at=r.updated_at.astimezone(JST),
        )
        for r, count in summaries(state)
    ]


@incidents_api.post("", response_model=IncidentDetailPublic, status_code=status.HTTP_201_CREATED, dependencies=ACK)
def create_incident(state: StateDep, body: IncidentCreate, operator: OperatorDep) -> IncidentDetailPublic:
    """Draft a report from one or more alerts (times, a first summary and the evidence list from them)."""
    with answering_refusals():
        incident_id = create(state, operator, body.alerts, body.title)
    return _detail(state, incident_id)


@incidents_api.get("/{incident_id}.pdf", response_class=Response)
def incident_pdf(request: Request, actor: ReaderDep, incident_id: int) -> Response:
    """Return the report as an A4 PDF (recorded as an export in the admin trail)."""
    state: AppState = request.app.state.sekisho
    with answering_refusals():
        pdf, filename = export_pdf(state, actor, request.client.host if request.client else None, incident_id)
    return pdf_response(pdf, filename)


@incidents_api.get("/{incident_id}", response_model=IncidentDetailPublic, dependencies=READ)
def get_incident(state: StateDep, incident_id: int) -> IncidentDetailPublic:
    """Return one report with its alerts and deadlines."""
    return _detail(state, incident_id)


@incidents_api.patch("/{incident_id}", response_model=IncidentDetailPublic, dependencies=ACK)
def update_incident(
    state: StateDep, incident_id: int, body: IncidentUpdate, operator: OperatorDep
) -> IncidentDetailPublic:
    """Change fields of a report read at ``version``; 409 if someone changed it since (the answer names who)."""
    changes = body.changes.model_dump(exclude_unset=True)
    if "evidence" in changes and changes["evidence"] is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "evidence: a list (empty to clear it)")
    with answering_refusals():
        update(state, operator, incident_id, body.version, changes)
    return _detail(state, incident_id)


@incidents_api.post("/{incident_id}/status", response_model=IncidentDetailPublic, dependencies=ACK)
def advance_incident(
    state: StateDep, incident_id: int, body: IncidentAdvance, operator: OperatorDep
) -> IncidentDetailPublic:
    """Move a report forward: draft → preliminary (速報) → final (確報) → closed; never back (409)."""
    with answering_refusals():
        advance(state, operator, incident_id, body.status)
    return _detail(state, incident_id)


@incidents_api.post("/{incident_id}/alerts", response_model=IncidentDetailPublic, dependencies=ACK)
def link_incident_alerts(
    state: StateDep, incident_id: int, body: IncidentLink, operator: OperatorDep
) -> IncidentDetailPublic:
    """Link more alerts to a report (and to its evidence list)."""
    with answering_refusals():
        link(state, operator, incident_id, body.alerts)
    return _detail(state, incident_id)
