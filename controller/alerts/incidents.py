"""Incident records: a draft breach report (漏えい等事案の報告) built from alerts, edited, and exported as PDF.

The report holds what the PPC's report form asks for (規則第8条: 概要, the data items concerned, how many
people, cause, secondary harm, what was done for the people concerned, publication, prevention, other), with
when it was found and when it happened. Created from one or more alerts (their times, titles and events
become the first facts and the evidence list), edited by security staff with optimistic locking (two people
editing one report never overwrite each other silently), moved draft → preliminary (速報) → final (確報) →
closed. Every change is an admin-trail row with old → new; free text passes the My Number guard.

The deadlines shown are the PPC's guidance: a preliminary report promptly (概ね 3〜5 日以内: 5 days shown), the
final report within 30 days of discovery, 60 when the leak may be intentional (不正の目的).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import Connection, Table, insert, select, update

from sekisho.controller.alerts import book, texts
from sekisho.controller.console.formats import install_filters
from sekisho.controller.store.audit import Operator, append_admin, refuse_free_text
from sekisho.controller.store.models import Incident, IncidentAlert
from sekisho.protocol.schedules import JST

INCIDENTS = cast(Table, Incident.__table__)
INCIDENT_ALERTS = cast(Table, IncidentAlert.__table__)
# The report's items, in the order of the PPC's form, with the form's Japanese and an English label.
REPORT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("summary", "概要", "Summary"),
    ("data_items", "漏えい等が発生し、又は発生したおそれがある個人データの項目", "Personal data items concerned"),
    ("cause", "原因", "Cause"),
    ("secondary_harm", "二次被害又はそのおそれの有無及びその内容", "Secondary harm, actual or possible"),
    ("notice_to_people", "本人への対応の実施状況", "What was done for the people concerned"),
    ("publication", "公表の実施状況", "Publication"),
    ("prevention", "再発防止のための措置", "Measures against recurrence"),
    ("other", "その他参考となる事項", "Other relevant facts"),
)
FIELD_NAMES = tuple(name for name, _ja, _en in REPORT_FIELDS)
STATUSES = ("draft", "preliminary", "final", "closed")
STATUS_LABELS = {"draft": ("下書き", "draft"), "preliminary": ("速報済", "preliminary report sent")}
STATUS_LABELS |= {"final": ("確報済", "final report sent"), "closed": ("完了", "closed")}
MAX_FIELD = 4000
MAX_TITLE = 200
MAX_EVIDENCE = 100
PRELIMINARY_DAYS = 5
FINAL_DAYS = 30
FINAL_DAYS_MALICIOUS = 60
_TEMPLATES = Path(__file__).resolve().parent / "templates"


class IncidentRefused(ValueError):
    """An incident change that cannot be made as asked (stale version, bad value); nothing was written.

    ``kind`` names the refusal for callers that word it in their reader's language or pick an HTTP status
    (stale, closed, forward_only, needs_summary, not_found, no_alert, bad_value, too_long, required, …);
    ``field`` is the input it is about, when there is one.
    """

    def __init__(self, text: str, kind: str = "other", field: str | None = None) -> None:
        super().__init__(text)
        self.kind = kind
        self.field = field


@dataclass(frozen=True)
class Deadlines:
    """When the PPC expects the preliminary and the final report, counted from discovery."""

    preliminary: datetime
    final: datetime


def deadlines(found_at: datetime, malicious: bool) -> Deadlines:
    """Return the guidance deadlines for a report found at ``found_at``."""
    days = FINAL_DAYS_MALICIOUS if malicious else FINAL_DAYS
    return Deadlines(found_at + timedelta(days=PRELIMINARY_DAYS), found_at + timedelta(days=days))


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise IncidentRefused(f"{what}: text expected", "bad_value", what)
    text = value.strip()
    if len(text) > limit:
        raise IncidentRefused(f"{what}: at most {limit} characters", "too_long", what)
    return text


def _evidence(items: object) -> list[dict[str, str]]:
    if not isinstance(items, list) or len(items) > MAX_EVIDENCE:
        raise IncidentRefused(f"evidence: a list of at most {MAX_EVIDENCE} items", "too_many", "evidence")
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise IncidentRefused("evidence: each item has kind, ref and note", "bad_value", "evidence")
        out.append({k: _text(item.get(k, ""), f"evidence {k}", 500) for k in ("kind", "ref", "note")})
    return out


def create_from_alerts(
    conn: Connection, signer: Any, who: Operator, alert_ids: Sequence[int], title: str, now: datetime
) -> int:
    """Open a draft report from alerts: times, a first summary and the evidence list from them; return its id."""
    wanted = sorted(set(alert_ids))
    if not wanted:
        raise IncidentRefused("an incident is built from at least one alert", "no_alerts")
    a = book.ALERTS.c
    rows = conn.execute(select(*book.ALERTS.columns).where(a.id.in_(wanted)).order_by(a.first_at)).all()
    if len(rows) != len(wanted):
        missing = sorted(set(wanted) - {int(r.id) for r in rows})
        raise IncidentRefused(f"no alert {missing[0]}", "no_alert")
    name = _text(title, "title", MAX_TITLE) or texts.title("ja", rows[0].rule, rows[0].labels or {})
    refuse_free_text("incident", title=name)
    summary = "\n".join(
        f"{r.first_at.astimezone(JST):%Y/%m/%d %H:%M} {texts.title('ja', r.rule, r.labels or {})}"
        + (f"（{r._mapping['count']}件）" if r._mapping["count"] > 1 else "")
        for r in rows
    )
    report = {field: "" for field in FIELD_NAMES} | {"summary": summary}
    evidence = [{"kind": "alert", "ref": f"alert:{r.id}", "note": r.rule} for r in rows]
    values = {"title": name, "status": "draft", "found_at": min(r.opened_at for r in rows)}
    values |= {"occurred_at": min(r.first_at for r in rows), "malicious": False, "report": report}
    values |= {"people_count": None, "evidence": evidence, "created_by": who.actor, "created_at": now}
    values |= {"updated_by": who.actor, "updated_at": now, "version": 1}
    incident_id = int(conn.execute(insert(INCIDENTS).values(**values).returning(INCIDENTS.c.id)).scalar_one())
    for row in rows:
        conn.execute(insert(INCIDENT_ALERTS).values(incident_id=incident_id, alert_id=row.id))
    new = {"title": name, "alerts": wanted, "found_at": values["found_at"], "occurred_at": values["occurred_at"]}
    append_admin(conn, signer, who.action("incident.create", f"incident:{incident_id}", new=new), now)
    return incident_id


def _load(conn: Connection, incident_id: int) -> Any:
    row = conn.execute(select(*INCIDENTS.columns).where(INCIDENTS.c.id == incident_id).with_for_update()).first()
    if row is None:
        raise IncidentRefused(f"no incident {incident_id}", "not_found")
    return row


def update_report(
    conn: Connection,
    signer: Any,
    who: Operator,
    incident_id: int,
    version: int,
    changes: Mapping[str, Any],
    now: datetime,
) -> int:
    """Change a report's fields if nobody changed it since ``version``; return the new version."""
    row = _load(conn, incident_id)
    if int(row.version) != version:
        raise IncidentRefused(f"incident {incident_id} was changed by {row.updated_by} meanwhile: reload it", "stale")
    if row.status == "closed":
        raise IncidentRefused(f"incident {incident_id} is closed", "closed")
    report = dict(row.report or {})
    values: dict[str, Any] = {}
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for key, value in changes.items():
        if key in FIELD_NAMES:
            text = _text(value, key, MAX_FIELD)
            if report.get(key, "") != text:
                old[key], new[key] = report.get(key, ""), text
                report[key] = text
        elif key == "title":
            title = _text(value, "title", MAX_TITLE)
            if not title:
                raise IncidentRefused("title is required", "required", "title")
            if title != row.title:
                old[key], new[key], values["title"] = row.title, title, title
        elif key in ("found_at", "occurred_at"):
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise IncidentRefused(f"{key}: an aware date and time", "bad_value", key)
            if key == "found_at" and value is None:
                raise IncidentRefused("found_at is required", "required", "found_at")
            if value != getattr(row, key):
                old[key], new[key], values[key] = getattr(row, key), value, value
        elif key == "people_count":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise IncidentRefused("people_count: a whole number of people, 0 or more", "bad_value", key)
            if value != row.people_count:
                old[key], new[key], values[key] = row.people_count, value, value
        elif key == "malicious":
            if not isinstance(value, bool):
                raise IncidentRefused("malicious: yes or no", "bad_value", key)
            if value != row.malicious:
                old[key], new[key], values[key] = row.malicious, value, value
        elif key == "evidence":
            items = _evidence(value)
            if items != list(row.evidence or []):
                old[key], new[key], values[key] = row.evidence, items, items
        else:
            raise IncidentRefused(f"unknown field {key!r}", "unknown_field", key)
    if not new:
        return int(row.version)
    refuse_free_text("incident", **{k: v for k, v in new.items() if isinstance(v, str | list)})
    values |= {"report": report, "updated_by": who.actor, "updated_at": now, "version": row.version + 1}
    conn.execute(update(INCIDENTS).where(INCIDENTS.c.id == incident_id).values(**values))
    append_admin(conn, signer, who.action("incident.update", f"incident:{incident_id}", old=old, new=new), now)
    return int(row.version) + 1


def advance(conn: Connection, signer: Any, who: Operator, incident_id: int, status: str, now: datetime) -> None:
    """Move a report forward: draft → preliminary (速報) → final (確報) → closed; never back."""
    if status not in STATUSES:
        raise IncidentRefused(f"status: one of {', '.join(STATUSES)}", "bad_value", "status")
    row = _load(conn, incident_id)
    if STATUSES.index(status) <= STATUSES.index(row.status):
        raise IncidentRefused(f"incident {incident_id} is {row.status}: it only moves forward", "forward_only")
    if status in ("preliminary", "final") and not str((row.report or {}).get("summary", "")).strip():
        raise IncidentRefused("a report needs its summary before it is sent", "needs_summary", "summary")
    values: dict[str, Any] = {"status": status, "updated_by": who.actor, "updated_at": now, "version": row.version + 1}
    if status == "preliminary":
        values["preliminary_reported_at"] = now
    if status == "final":
        values["final_reported_at"] = now
        values["preliminary_reported_at"] = row.preliminary_reported_at or now
    conn.execute(update(INCIDENTS).where(INCIDENTS.c.id == incident_id).values(**values))
    entry = who.action("incident.status", f"incident:{incident_id}", old={"status": row.status}, new={"status": status})
    append_admin(conn, signer, entry, now)


def link_alerts(
    conn: Connection, signer: Any, who: Operator, incident_id: int, alert_ids: Sequence[int], now: datetime
) -> int:
    """Add alerts to a report (and to its evidence list); return how many were new."""
    row = _load(conn, incident_id)
    if row.status == "closed":
        raise IncidentRefused(f"incident {incident_id} is closed", "closed")
    have = set(
        conn.execute(select(INCIDENT_ALERTS.c.alert_id).where(INCIDENT_ALERTS.c.incident_id == incident_id)).scalars()
    )
    wanted = sorted(set(alert_ids) - have)
    a = book.ALERTS.c
    found = conn.execute(select(a.id, a.rule).where(a.id.in_(wanted))).all()
    if len(found) != len(wanted):
        raise IncidentRefused("no such alert", "no_alert")
    for alert in found:
        conn.execute(insert(INCIDENT_ALERTS).values(incident_id=incident_id, alert_id=alert.id))
    if found:
        evidence = [
            *list(row.evidence or []),
            *({"kind": "alert", "ref": f"alert:{r.id}", "note": r.rule} for r in found),
        ]
        conn.execute(
            update(INCIDENTS)
            .where(INCIDENTS.c.id == incident_id)
            .values(evidence=evidence[:MAX_EVIDENCE], updated_by=who.actor, updated_at=now, version=row.version + 1)
        )
        entry = who.action("incident.link", f"incident:{incident_id}", new={"alerts": [r.id for r in found]})
        append_admin(conn, signer, entry, now)
    return len(found)


def read(conn: Connection, incident_id: int) -> dict[str, Any]:
    """Return one report with its alerts (for the console, the API and the PDF)."""
    row = conn.execute(select(*INCIDENTS.columns).where(INCIDENTS.c.id == incident_id)).first()
    if row is None:
        raise IncidentRefused(f"no incident {incident_id}", "not_found")
    a = book.ALERTS.c
    alerts = conn.execute(
        select(*book.ALERTS.columns)
        .join(INCIDENT_ALERTS, INCIDENT_ALERTS.c.alert_id == a.id)
        .where(INCIDENT_ALERTS.c.incident_id == incident_id)
        .order_by(a.first_at)
    ).all()
    return {"incident": row, "alerts": list(alerts), "deadlines": deadlines(row.found_at, bool(row.malicious))}


def list_incidents(conn: Connection, limit: int = 200) -> list[Any]:
    """Return the reports, open ones first, newest discovery first."""
    i = INCIDENTS.c
    rows = conn.execute(select(*INCIDENTS.columns).order_by(i.found_at.desc()).limit(limit)).all()
    return sorted(rows, key=lambda r: r.status == "closed")


def render_html(found: Mapping[str, Any], *, exporter: str, exported_at: datetime) -> str:
    """Return the printable report (Japanese with English labels) as HTML."""
    env = Environment(loader=FileSystemLoader(str(_TEMPLATES)), autoescape=select_autoescape(["html"]))
    install_filters(env)
    incident = found["incident"]
    alerts = [
        {"id": r.id, "title": texts.title("ja", r.rule, r.labels or {}), "severity": r.severity, "first_at": r.first_at}
        | {"count": r._mapping["count"], "state": r.state}
        for r in found["alerts"]
    ]
    return env.get_template("incident.html").render(
        incident=incident,
        report=dict(incident.report or {}),
        fields=REPORT_FIELDS,
        status=STATUS_LABELS[incident.status],
        alerts=alerts,
        deadlines=found["deadlines"],
        exporter=exporter,
        exported_at=exported_at,
    )


def render_pdf(found: Mapping[str, Any], *, exporter: str, exported_at: datetime) -> bytes:
    """Return the report as an A4 PDF with the Japanese font embedded (WeasyPrint)."""
    from weasyprint import HTML  # heavy import (pango, cairo): only when a PDF is asked for

    pdf = HTML(
        string=render_html(found, exporter=exporter, exported_at=exported_at), base_url=str(_TEMPLATES)
    ).write_pdf()
    if pdf is None:
        raise RuntimeError("WeasyPrint returned no PDF")
    return bytes(pdf)
