"""Alerts over HTTP (`/api/v1/alerts`): the list and one alert, acknowledge / resolve / reopen, silences and
maintenance windows, the notifications that could not be delivered, and a live stream of changes.

The same reading functions as the console's pages (controller/alerts/listing.py) and the same book functions
(controller/alerts/book.py), each write in one transaction with its admin-trail row; the operator is the
authenticated caller (``token:<login>/<token id>`` for a personal API token). Reading needs alerts.read, every
change alerts.ack (IT admins and security staff). A refusal of the book answers 404 (no such alert), 409 (the
alert's state does not allow it: not open, already resolved, its condition still active without an override…)
or 422 (a missing comment, a My Number…). Times are ISO 8601 with the JST offset.

`GET /api/v1/alerts/stream` is Server-Sent Events: ``event: alert`` with one JSON ``data:`` line per changed
alert (id, version, rule, severity, state, condition, count, labels, updated_at), polled every 0.25 s.
"""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from sekisho.common.i18n import message_of
from sekisho.controller.accounts.roles import Permission, require
from sekisho.controller.alerts import book, delivery, listing, texts
from sekisho.controller.alerts.listing import AlertFilter, ListingError
from sekisho.controller.alerts.rules import RULES
from sekisho.controller.api import sse
from sekisho.controller.api.deps import AppState, StateDep
from sekisho.controller.api.schemas import AdminText
from sekisho.controller.audit.api import OperatorDep
from sekisho.controller.console.formats import JST, iso_jst
from sekisho.controller.store.audit import Operator
from sekisho.controller.store.db import write_transaction
from sekisho.protocol import mynumber

alerts = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])
READ = [require(Permission.ALERTS_READ)]
ACK = [require(Permission.ALERTS_ACK)]

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"
# Empty means "any" (the console's filter form sends every field, chosen or not).
OptionalId = Annotated[str | None, Query(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:@-]{0,63})?$")]
DayQuery = Annotated[str | None, Query(max_length=10, pattern=r"^(\d{4}-\d{2}-\d{2})?$")]
# The payload fields an event's summary shows (never the whole payload: that needs records.read).
SUMMARY_FIELDS: Final = ("door", "alarm", "reason", "person", "terminal", "reader", "direction", "forced", "slot")
MATCHER_KEYS: Final = ("door", "area", "agent", "person", "terminal", "reader")


def _day(text: str | None, name: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise HTTPException(422, f"{name}: a date YYYY-MM-DD") from None


def alert_filter(
    state: Annotated[str | None, Query(pattern=r"^(|open|acknowledged|resolved|unresolved)$")] = None,
    severity: Annotated[str | None, Query(pattern=r"^(|critical|high|medium|low)$")] = None,
    rule: Annotated[str | None, Query(max_length=48, pattern=r"^[a-z_]*$")] = None,
    area: OptionalId = None,
    door: OptionalId = None,
    person: OptionalId = None,
    agent: OptionalId = None,
    terminal: OptionalId = None,
    since_day: Annotated[str | None, Query(alias="from", max_length=10, pattern=r"^(\d{4}-\d{2}-\d{2})?$")] = None,
    to: DayQuery = None,
) -> AlertFilter:
    """Read the list's filter from the query: state, severity, rule, area/door/person/agent/terminal, from/to.

    from and to are JST calendar days, both included (alerts seen in that period).
    """
    given = {"area": area, "door": door, "person": person, "agent": agent, "terminal": terminal}
    labels = tuple((key, value) for key, value in given.items() if value)
    start, end = _day(since_day, "from"), _day(to, "to")
    try:
        return AlertFilter(
            state=state or None,
            severity=severity or None,
            rule=rule or None,
            labels=labels,
            since=datetime.combine(start, time(0), tzinfo=JST) if start else None,
            until=datetime.combine(end + timedelta(days=1), time(0), tzinfo=JST) if end else None,
        )
    except ListingError as err:
        raise HTTPException(422, str(err)) from err


FilterDep = Annotated[AlertFilter, Depends(alert_filter)]
CursorQuery = Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_-]*$")]
LimitQuery = Annotated[int, Query(ge=1, le=listing.MAX_LIMIT)]
# A connection's lifetime in seconds (0: only the opening lines; a test or a health probe).
LifetimeQuery = Annotated[float, Query(ge=0, le=sse.LIFETIME_S)]


# --- models ---------------------------------------------------------------------------------------


class Title(BaseModel):
    """An alert's title in both languages."""

    ja: str
    en: str


class AlertPublic(BaseModel):
    """One alert: what, where (labels: ids), how often, its lifecycle and who moved it."""

    id: int
    rule: str
    title: Title
    severity: str
    state: str
    condition: str
    count: int
    labels: dict[str, str]
    params: dict[str, Any]
    first_at: datetime
    last_at: datetime
    opened_at: datetime
    cleared_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None
    ack_comment: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None
    cause: str | None
    override: str | None
    silenced_by: int | None
    inhibited_by: str | None
    escalation: str | None
    version: int
    updated_at: datetime


class AlertPagePublic(BaseModel):
    """One page of alerts (unresolved first, severity, newest) and the cursor of the next."""

    items: list[AlertPublic]
    next_cursor: str | None


class AlertEventPublic(BaseModel):
    """A stored event behind an alert, summarised (payload fields that say what happened where)."""

    id: int
    event_id: str
    occurred_at: datetime
    type: str
    agent_id: str
    summary: dict[str, Any]


class HistoryPublic(BaseModel):
    """One admin-trail row about the alert."""

    at: datetime
    actor: str
    via: str
    action: str
    old: Any
    new: Any
    detail: Any


class AlertDetailPublic(BaseModel):
    """One alert with its events and its history (oldest first)."""

    alert: AlertPublic
    events: list[AlertEventPublic]
    history: list[HistoryPublic]


class AlertAcknowledge(BaseModel):
    """Acknowledge an open alert: what you are doing about it."""

    model_config = ConfigDict(extra="forbid")

    comment: AdminText = Field(min_length=1, max_length=book.MAX_TEXT)


class AlertResolve(BaseModel):
    """Resolve an alert: what was found, the cause, and why if its condition is still active."""

    model_config = ConfigDict(extra="forbid")

    note: AdminText = Field(min_length=1, max_length=book.MAX_TEXT)
    cause: Literal["intrusion", "misuse", "device_fault", "operational", "false_alarm", "test", "other"]
    override: AdminText | None = Field(default=None, max_length=book.MAX_TEXT)


class AlertReopen(BaseModel):
    """Reopen a resolved alert: why."""

    model_config = ConfigDict(extra="forbid")

    reason: AdminText = Field(min_length=1, max_length=book.MAX_TEXT)


class SilencePublic(BaseModel):
    """A silence or maintenance window: matching alerts are recorded and notify nobody until it ends."""

    id: int
    kind: str
    rule: str | None
    matchers: dict[str, str]
    starts_at: datetime
    ends_at: datetime
    reason: str
    created_by: str
    created_at: datetime
    ended_at: datetime | None
    ended_by: str | None


class SilenceCreate(BaseModel):
    """A new silence (a rule and/or labels, never everything) or maintenance window, at most 31 days."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["silence", "maintenance"] = "silence"
    rule: str | None = Field(default=None, max_length=48, pattern=r"^[a-z_]+$")
    matchers: dict[Literal["door", "area", "agent", "person", "terminal", "reader"], AdminText] = Field(
        default_factory=dict, max_length=len(MATCHER_KEYS)
    )
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime
    reason: AdminText = Field(min_length=1, max_length=book.MAX_TEXT)


class NotificationPublic(BaseModel):
    """A notification of the outbox (the dead-letter list: could not be delivered)."""

    id: int
    alert_id: int
    kind: str
    channel: str
    target: str
    contact: str | None
    language: str
    state: str
    attempts: int
    created_at: datetime
    next_at: datetime
    last_error: str | None


# --- helpers --------------------------------------------------------------------------------------


def _jst(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(JST)


def _at(moment: datetime) -> datetime:
    return moment.astimezone(JST)


def alert_json(row: Any) -> AlertPublic:
    """Return an alert row as the API shows it (times in JST)."""
    labels = listing.labels_of(row)
    values = {name: getattr(row, name) for name in AlertPublic.model_fields if hasattr(row, name)}
    for name, value in values.items():
        if isinstance(value, datetime):
            values[name] = _jst(value)
    values |= {
        "labels": labels,
        "params": dict(row.params or {}),
        "title": Title(ja=texts.title("ja", row.rule, labels), en=texts.title("en", row.rule, labels)),
    }
    return AlertPublic.model_validate(values)


def event_summary(payload: Any) -> dict[str, Any]:
    """Return the fields of an event payload that say what happened where (never the whole payload)."""
    found = payload if isinstance(payload, dict) else {}
    return {k: found[k] for k in SUMMARY_FIELDS if k in found and isinstance(found[k], str | int | bool)}


def silence_json(row: Any) -> SilencePublic:
    """Return a silence row as the API shows it."""
    values = {name: getattr(row, name) for name in SilencePublic.model_fields}
    values = {k: _jst(v) if isinstance(v, datetime) else v for k, v in values.items()}
    values["matchers"] = {str(k): str(v) for k, v in dict(row.matchers or {}).items()}
    return SilencePublic.model_validate(values)


def notification_json(row: Any) -> NotificationPublic:
    """Return an outbox row as the API shows it."""
    values = {name: getattr(row, name) for name in NotificationPublic.model_fields}
    return NotificationPublic.model_validate({k: _jst(v) if isinstance(v, datetime) else v for k, v in values.items()})


def refused(err: Exception) -> HTTPException:
    """Return the HTTP answer of a refused change (the book's reason, or the My Number guard's message)."""
    if isinstance(err, mynumber.MyNumberFound):
        return HTTPException(422, message_of(err))
    assert isinstance(err, book.AlertRefused)
    return HTTPException(listing.refusal_status(err), str(err))


def _one(state: AppState, alert_id: int) -> Any:
    with state.store.engine.connect() as conn:
        row = listing.get(conn, alert_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}")
    return row


def acknowledge(state: AppState, alert_id: int, who: Operator, comment: str) -> None:
    """Acknowledge an alert in one transaction with its trail row (refusals raise AlertRefused / MyNumberFound)."""
    settings = listing.alert_settings(state.store)
    with write_transaction(state.store.engine) as conn:
        book.acknowledge(conn, state.store.signing_key, settings, alert_id, who, comment, state.clock())


def resolve(state: AppState, alert_id: int, who: Operator, note: str, cause: str, override: str | None) -> None:
    """Resolve an alert in one transaction with its trail row."""
    with write_transaction(state.store.engine) as conn:
        book.resolve(conn, state.store.signing_key, alert_id, who, note, cause, state.clock(), override=override)


def reopen(state: AppState, alert_id: int, who: Operator, reason: str) -> None:
    """Reopen a resolved alert in one transaction with its trail row."""
    settings = listing.alert_settings(state.store)
    with write_transaction(state.store.engine) as conn:
        book.reopen(conn, state.store.signing_key, settings, alert_id, who, reason, state.clock())


def add_silence(
    state: AppState,
    who: Operator,
    *,
    kind: Literal["silence", "maintenance"],
    rule: str | None,
    matchers: dict[str, str],
    starts_at: datetime,
    ends_at: datetime,
    reason: str,
) -> int:
    """Record a silence or maintenance window; return its id."""
    if rule is not None and rule not in RULES:
        raise book.AlertRefused("rule: not a rule of the catalogue")
    with write_transaction(state.store.engine) as conn:
        return book.add_silence(
            conn, state.store.signing_key, who, kind=kind, rule=rule, matchers=matchers, starts_at=starts_at,
            ends_at=ends_at, reason=reason, now=state.clock(),
        )  # fmt: skip


def end_silence(state: AppState, silence_id: int, who: Operator) -> None:
    """End a silence early (recorded)."""
    with write_transaction(state.store.engine) as conn:
        book.end_silence(conn, state.store.signing_key, who, silence_id, state.clock())


def silences(state: AppState) -> list[Any]:
    """Return the silences and maintenance windows in force or to come."""
    with state.store.engine.connect() as conn:
        return book.active_silences(conn, state.clock())


def _silence(state: AppState, silence_id: int) -> Any:
    with state.store.engine.connect() as conn:
        row = conn.execute(book.SILENCES.select().where(book.SILENCES.c.id == silence_id)).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no silence {silence_id}")
    return row


def stream_json(row: Any, event_id: str) -> str:
    """Return one changed alert as an SSE event of one JSON line (what the benchmark and programs read)."""
    data = {
        "id": int(row.id),
        "version": int(row.version),
        "rule": row.rule,
        "severity": row.severity,
        "state": row.state,
        "condition": row.condition,
        "count": int(row.count),
        "labels": listing.labels_of(row),
        "updated_at": iso_jst(row.updated_at),
    }
    return sse.event("alert", json.dumps(data, ensure_ascii=False, separators=(",", ":")), event_id)


# --- routes (the fixed paths before /{alert_id}) ----------------------------------------------------


@alerts.get("", response_model=AlertPagePublic, dependencies=READ)
def list_alerts(
    state: StateDep, flt: FilterDep, cursor: CursorQuery = None, limit: LimitQuery = listing.DEFAULT_LIMIT
) -> AlertPagePublic:
    """List alerts, unresolved first, then by severity and newest; pass next_cursor back as cursor."""
    try:
        with state.store.engine.connect() as conn:
            found = listing.page(conn, flt, cursor=cursor or None, limit=limit)
    except ListingError as err:
        raise HTTPException(422, str(err)) from err
    return AlertPagePublic(items=[alert_json(r) for r in found.rows], next_cursor=found.next_cursor)


@alerts.get("/stream", dependencies=READ, response_class=StreamingResponse)
def stream(
    request: Request,
    flt: FilterDep,
    since: AwareDatetime | None = None,
    max_s: LifetimeQuery = sse.LIFETIME_S,
) -> StreamingResponse:
    """Stream alert changes as Server-Sent Events (event: alert, one JSON line each) from now or ``since``."""

    def render(row: Any, event_id: str) -> str:
        return stream_json(row, event_id) if flt.matches(row) else ""

    return sse.alert_stream(request, render, since=since, lifetime_s=max_s)


@alerts.get("/silences", response_model=list[SilencePublic], dependencies=READ)
def list_silences(state: StateDep) -> list[SilencePublic]:
    """List the silences and maintenance windows in force or to come (who, why, until when)."""
    return [silence_json(r) for r in silences(state)]


@alerts.post("/silences", response_model=SilencePublic, status_code=status.HTTP_201_CREATED, dependencies=ACK)
def create_silence(state: StateDep, body: SilenceCreate, operator: OperatorDep) -> SilencePublic:
    """Add a silence or maintenance window; a rule or at least one label, at most 31 days."""
    try:
        silence_id = add_silence(
            state, operator, kind=body.kind, rule=body.rule, matchers={str(k): v for k, v in body.matchers.items()},
            starts_at=body.starts_at or state.clock(), ends_at=body.ends_at, reason=body.reason,
        )  # fmt: skip
    except (book.AlertRefused, mynumber.MyNumberFound) as err:
        raise refused(err) from err
    return silence_json(_silence(state, silence_id))


@alerts.post("/silences/{silence_id}/end", response_model=SilencePublic, dependencies=ACK)
def end_silence_early(state: StateDep, silence_id: int, operator: OperatorDep) -> SilencePublic:
    """End a silence or maintenance window now."""
    _silence(state, silence_id)
    try:
        end_silence(state, silence_id, operator)
    except book.AlertRefused as err:
        raise refused(err) from err
    return silence_json(_silence(state, silence_id))


@alerts.get("/notifications/dead", response_model=list[NotificationPublic], dependencies=READ)
def dead_notifications(state: StateDep, limit: LimitQuery = 200) -> list[NotificationPublic]:
    """List the notifications that could not be delivered (newest first)."""
    return [notification_json(r) for r in delivery.dead_letters(state.store, limit=limit)]


@alerts.post("/notifications/{notification_id}/replay", status_code=status.HTTP_202_ACCEPTED, dependencies=ACK)
def replay_notification(state: StateDep, notification_id: int, operator: OperatorDep) -> dict[str, Any]:
    """Put a dead notification back in the outbox; the delivery job sends it at its next round."""
    try:
        delivery.replay(state.store, notification_id, operator, state.clock())
    except book.AlertRefused as err:
        raise refused(err) from err
    return {"id": notification_id, "state": "pending"}


@alerts.get("/{alert_id}", response_model=AlertDetailPublic, dependencies=READ)
def get_alert(state: StateDep, alert_id: int) -> AlertDetailPublic:
    """Return one alert with the events behind it and its history."""
    with state.store.engine.connect() as conn:
        row = listing.get(conn, alert_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}")
        events = listing.events_of(conn, alert_id)
        trail = listing.history(conn, alert_id)
    return AlertDetailPublic(
        alert=alert_json(row),
        events=[
            AlertEventPublic(
                id=e.id,
                event_id=e.event_id,
                occurred_at=_at(e.occurred_at),
                type=e.type,
                agent_id=e.agent_id,
                summary=event_summary(e.payload),
            )
            for e in events
        ],
        history=[
            HistoryPublic(
                at=_at(h.at), actor=h.actor, via=h.via, action=h.action, old=h.old, new=h.new, detail=h.detail
            )
            for h in trail
        ],
    )


@alerts.post("/{alert_id}/acknowledge", response_model=AlertPublic, dependencies=ACK)
def acknowledge_alert(state: StateDep, alert_id: int, body: AlertAcknowledge, operator: OperatorDep) -> AlertPublic:
    """Acknowledge an open alert with a comment (its escalation stops)."""
    try:
        acknowledge(state, alert_id, operator, body.comment)
    except (book.AlertRefused, mynumber.MyNumberFound) as err:
        raise refused(err) from err
    return alert_json(_one(state, alert_id))


@alerts.post("/{alert_id}/resolve", response_model=AlertPublic, dependencies=ACK)
def resolve_alert(state: StateDep, alert_id: int, body: AlertResolve, operator: OperatorDep) -> AlertPublic:
    """Resolve an alert with a note and a cause; an active condition needs an override (409 without)."""
    try:
        resolve(state, alert_id, operator, body.note, body.cause, body.override)
    except (book.AlertRefused, mynumber.MyNumberFound) as err:
        raise refused(err) from err
    return alert_json(_one(state, alert_id))


@alerts.post("/{alert_id}/reopen", response_model=AlertPublic, dependencies=ACK)
def reopen_alert(state: StateDep, alert_id: int, body: AlertReopen, operator: OperatorDep) -> AlertPublic:
    """Reopen a resolved alert with a reason."""
    try:
        reopen(state, alert_id, operator, body.reason)
    except (book.AlertRefused, mynumber.MyNumberFound) as err:
        raise refused(err) from err
    return alert_json(_one(state, alert_id))
