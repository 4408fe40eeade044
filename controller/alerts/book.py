"""The alert book: signals grouped into alerts, and the lifecycle people drive (acknowledge, resolve, reopen).

Every write happens in the caller's transaction (the engine's round, a console request) and every lifecycle
transition appends an admin-trail row in it (action ``alert.*``, target ``alert:<id>``; the controller's own
transitions as ``system``), so an alert and its history commit together and `records verify` checks both.

Grouping: one live alert per dedup key (the unique ``open_key``). A repeat counts on the live alert; a
condition that clears is marked ``cleared`` (the alert stays until a person resolves it); a signal that
re-fires within the rule's debounce after the alert was resolved reopens that alert instead of opening a
new one (flapping stays one alert). A silenced or inhibited alert is recorded like any other and notifies
nobody while the silence or the inhibiting alert lasts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import Connection, Table, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from sekisho.controller.alerts.plan import due_at, first_position
from sekisho.controller.alerts.rules import INHIBITED_BY_AGENT_OFFLINE, Effective, Signal
from sekisho.controller.store.audit import SYSTEM, AdminAction, Operator, append_admin, refuse_free_text
from sekisho.controller.store.models import Alert, AlertEvent, AlertNotification, AlertSilence
from sekisho.protocol.alert_policy import AlertSettings, Escalation

ALERTS = cast(Table, Alert.__table__)
ALERT_EVENTS = cast(Table, AlertEvent.__table__)
SILENCES = cast(Table, AlertSilence.__table__)
NOTIFICATIONS = cast(Table, AlertNotification.__table__)
# Events kept per alert: the first ones; the count says how many there were in all.
EVENTS_KEPT = 50
CAUSES = ("intrusion", "misuse", "device_fault", "operational", "false_alarm", "test", "other")
MAX_TEXT = 2000
State = Literal["open", "acknowledged", "resolved"]


class AlertRefused(ValueError):
    """A lifecycle step that cannot be taken as asked (the reason says why; nothing was written).

    ``kind`` names the refusal for callers that word it in their reader's language or pick an HTTP status
    (controller/alerts/listing.py ``refusal``); ``field`` is the input it is about, when there is one.
    """

    def __init__(self, text: str, kind: str = "other", field: str | None = None) -> None:
        super().__init__(text)
        self.kind = kind
        self.field = field


@dataclass(frozen=True)
class Raised:
    """What one signal did: which alert, and whether it opened, reopened, counted, or cleared it."""

    alert_id: int
    outcome: Literal["opened", "reopened", "counted", "cleared"]
    epoch: int = 0
    quiet: bool = False  # silenced or inhibited: recorded, nobody told


def _audit(conn: Connection, signer: Any, entry: AdminAction, at: datetime) -> None:
    append_admin(conn, signer, entry, at)


def _silence_for(conn: Connection, rule: str, labels: Mapping[str, str], now: datetime) -> int | None:
    """Return the id of an active silence or maintenance window matching this rule and these labels."""
    s = SILENCES.c
    rows = conn.execute(
        select(s.id, s.rule, s.matchers)
        .where(s.starts_at <= now, s.ends_at > now, s.ended_at.is_(None), or_(s.rule.is_(None), s.rule == rule))
        .order_by(s.id)
    ).all()
    for row in rows:
        matchers = dict(row.matchers or {})
        if all(labels.get(k) == v for k, v in matchers.items()):
            return int(row.id)
    return None


def _inhibitor(conn: Connection, rule: str, labels: Mapping[str, str]) -> str | None:
    """Return the dedup key of the live alert that inhibits this one (an offline agent mutes its devices)."""
    agent = labels.get("agent")
    if rule not in INHIBITED_BY_AGENT_OFFLINE or not agent:
        return None
    key = f"agent_offline|agent={agent}"
    found = conn.execute(select(ALERTS.c.id).where(ALERTS.c.open_key == key)).scalar()
    return key if found is not None else None


def chain_for(settings: AlertSettings, escalation: str | None) -> Escalation | None:
    """Return the escalation chain by id (None: no chain, or one the policy no longer has)."""
    return next((e for e in settings.escalations if e.id == escalation), None) if escalation else None


def _start_chain(chain: Escalation | None, now: datetime) -> dict[str, Any]:
    if chain is None:
        return {"esc_started_at": None, "esc_round": None, "esc_step": None, "esc_next_at": None}
    return {
        "esc_started_at": now,
        "esc_round": None,
        "esc_step": None,
        "esc_next_at": due_at(chain, now, first_position()),
    }


def _keep_events(conn: Connection, alert_id: int, event_id: int | None, count: int) -> None:
    if event_id is not None and count <= EVENTS_KEPT:
        conn.execute(insert(ALERT_EVENTS).values(alert_id=alert_id, event_id=event_id))


def raise_signal(
    conn: Connection, signer: Any, sig: Signal, eff: Effective, settings: AlertSettings, now: datetime
) -> Raised | None:
    """Apply one signal in the caller's transaction; return what it did (None: disabled, or nothing to clear)."""
    if not eff.enabled:
        return None
    a = ALERTS.c
    key = sig.dedup_key
    live = conn.execute(select(a.id, a.count.label("n"), a.condition, a.last_at).where(a.open_key == key)).first()
    if sig.clears:
        cleared = clear(conn, signer, key, sig.at, now)
        return Raised(cleared, "cleared") if cleared is not None else None
    condition = "active" if eff.rule.condition == "active" else "none"
    if live is not None:
        count = int(live.n) + 1
        values: dict[str, Any] = {"count": count, "version": a.version + 1, "updated_at": now}
        values["last_at"] = max(live.last_at, sig.at)
        if condition == "active" and live.condition != "active":
            values |= {"condition": "active", "cleared_at": None}  # the condition came back: armed again
        if sig.params:
            values["params"] = sig.params
        conn.execute(update(ALERTS).where(a.id == live.id).values(**values))
        _keep_events(conn, int(live.id), sig.event_id, count)
        return Raised(int(live.id), "counted")
    chain = chain_for(settings, eff.escalation)
    silence = _silence_for(conn, sig.rule, sig.labels, now)
    inhibitor = _inhibitor(conn, sig.rule, sig.labels)
    quiet = silence is not None or inhibitor is not None
    recent = conn.execute(
        select(a.id, a.count.label("n"), a.esc_epoch)
        .where(a.dedup_key == key, a.resolved_at.is_not(None), a.resolved_at >= now - timedelta(seconds=eff.debounce_s))
        .order_by(a.id.desc())
        .limit(1)
    ).first()
    common: dict[str, Any] = {
        "open_key": key,
        "state": "open",
        "condition": condition,
        "severity": eff.severity,
        "last_at": sig.at,
        "silenced_by": silence,
        "inhibited_by": inhibitor,
        "escalation": chain.id if chain else None,
        "retrigger_at": None,
        "version": 1,
        "updated_at": now,
        **_start_chain(None if quiet else chain, now),
    }
    if recent is not None:
        count = int(recent.n) + 1
        reopened = common | {"count": count, "cleared_at": None, "acked_at": None, "acked_by": None}
        reopened |= {"ack_comment": None, "resolved_at": None, "resolved_by": None, "resolution": None}
        reopened |= {"cause": None, "override": None, "esc_epoch": ALERTS.c.esc_epoch + 1, "version": a.version + 1}
        conn.execute(update(ALERTS).where(a.id == recent.id).values(**reopened))
        _keep_events(conn, int(recent.id), sig.event_id, count)
        detail = {"why": "fired again within the debounce", "debounce_s": eff.debounce_s, "silenced_by": silence}
        _audit(conn, signer, SYSTEM.action("alert.reopened", f"alert:{recent.id}", detail=detail), now)
        return Raised(int(recent.id), "reopened", int(recent.esc_epoch) + 1, quiet)
    row = common | {
        "rule": sig.rule,
        "dedup_key": key,
        "labels": sig.labels,
        "params": sig.params,
        "count": 1,
        "first_at": sig.at,
        "opened_at": now,
        "esc_epoch": 0,
    }
    try:
        with conn.begin_nested():
            alert_id = int(conn.execute(insert(ALERTS).values(**row).returning(a.id)).scalar_one())
    except IntegrityError:
        # Another worker opened it between our read and insert: count this one on theirs.
        return raise_signal(conn, signer, sig, eff, settings, now)
    _keep_events(conn, alert_id, sig.event_id, 1)
    new = {"rule": sig.rule, "severity": eff.severity, "labels": sig.labels, "silenced_by": silence}
    new |= {"inhibited_by": inhibitor, "escalation": row["escalation"]}
    _audit(conn, signer, SYSTEM.action("alert.opened", f"alert:{alert_id}", new=new), now)
    return Raised(alert_id, "opened", 0, quiet)


def clear(conn: Connection, signer: Any, dedup_key: str, at: datetime, now: datetime) -> int | None:
    """The condition behind the live alert of this key ended (shown apart from resolved); return its id."""
    a = ALERTS.c
    live = conn.execute(select(a.id, a.condition).where(a.open_key == dedup_key)).first()
    if live is None or live.condition != "active":
        return None
    values: dict[str, Any] = {"condition": "cleared", "cleared_at": at, "version": a.version + 1, "updated_at": now}
    conn.execute(update(ALERTS).where(a.id == live.id).values(**values))
    _audit(conn, signer, SYSTEM.action("alert.condition_cleared", f"alert:{live.id}", detail={"at": at}), now)
    return int(live.id)


def release_inhibited(conn: Connection, signer: Any, settings: AlertSettings, inhibitor: str, now: datetime) -> int:
    """The inhibiting alert ended: alerts it muted that are still open start their escalation now; return how many."""
    a = ALERTS.c
    rows = conn.execute(
        select(a.id, a.escalation).where(a.inhibited_by == inhibitor, a.state == "open", a.silenced_by.is_(None))
    ).all()
    for row in rows:
        values: dict[str, Any] = {"inhibited_by": None, "version": a.version + 1, "updated_at": now}
        values |= _start_chain(chain_for(settings, row.escalation), now)
        conn.execute(update(ALERTS).where(a.id == row.id).values(**values))
        _audit(conn, signer, SYSTEM.action("alert.uninhibited", f"alert:{row.id}", detail={"by": inhibitor}), now)
    return len(rows)


def _text(value: str | None, what: str, *, required: bool) -> str | None:
    text = " ".join((value or "").split())
    if required and not text:
        raise AlertRefused(f"{what} is required", "required", what)
    if len(text) > MAX_TEXT:
        raise AlertRefused(f"{what}: at most {MAX_TEXT} characters", "too_long", what)
    return text or None


def _load(conn: Connection, alert_id: int) -> Any:
    row = conn.execute(select(*ALERTS.columns).where(ALERTS.c.id == alert_id).with_for_update()).first()
    if row is None:
        raise AlertRefused(f"no alert {alert_id}", "not_found")
    return row


def cancel_pending(conn: Connection, alert_id: int, why: str) -> int:
    """Cancel the alert's chain notifications not delivered yet (a person has it); the SIEM's copy still goes."""
    n = NOTIFICATIONS.c
    result = conn.execute(
        update(NOTIFICATIONS)
        .where(n.alert_id == alert_id, n.state == "pending", n.channel != "syslog")
        .values(state="cancelled", last_error=why, lease_until=None)
    )
    return int(result.rowcount or 0)


def acknowledge(
    conn: Connection, signer: Any, settings: AlertSettings, alert_id: int, who: Operator, comment: str, now: datetime
) -> None:
    """Acknowledge an open alert with a comment: the chain stops; unresolved after the ack timeout it starts again."""
    text = _text(comment, "comment", required=True)
    refuse_free_text("alert acknowledgement", comment=text)
    row = _load(conn, alert_id)
    if row.state != "open":
        raise AlertRefused(f"alert {alert_id} is {row.state}, not open", "not_open")
    chain = chain_for(settings, row.escalation)
    retrigger = None
    if chain is not None and chain.ack_timeout_minutes is not None:
        retrigger = now + timedelta(minutes=chain.ack_timeout_minutes)
    values: dict[str, Any] = {"state": "acknowledged", "acked_at": now, "acked_by": who.actor, "ack_comment": text}
    values |= {"esc_next_at": None, "retrigger_at": retrigger, "version": ALERTS.c.version + 1, "updated_at": now}
    conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(**values))
    cancelled = cancel_pending(conn, alert_id, "acknowledged before delivery")
    new = {"state": "acknowledged", "comment": text, "retrigger_at": retrigger, "cancelled_notifications": cancelled}
    _audit(conn, signer, who.action("alert.acknowledged", f"alert:{alert_id}", old={"state": row.state}, new=new), now)


def resolve(
    conn: Connection,
    signer: Any,
    alert_id: int,
    who: Operator,
    note: str,
    cause: str,
    now: datetime,
    *,
    override: str | None = None,
) -> None:
    """Resolve an alert with a note and a cause; a condition still active needs a stated override."""
    text = _text(note, "note", required=True)
    why = _text(override, "override", required=False)
    refuse_free_text("alert resolution", note=text, override=why)
    if cause not in CAUSES:
        raise AlertRefused(f"cause: one of {', '.join(CAUSES)}", "bad_cause", "cause")
    row = _load(conn, alert_id)
    if row.state == "resolved":
        raise AlertRefused(f"alert {alert_id} is already resolved", "already_resolved")
    if row.condition == "active" and why is None:
        raise AlertRefused(
            f"alert {alert_id}: its condition is still active; resolving needs a stated override", "needs_override"
        )
    values: dict[str, Any] = {"state": "resolved", "open_key": None, "resolved_at": now, "resolved_by": who.actor}
    values |= {"resolution": text, "cause": cause, "override": why, "esc_next_at": None, "retrigger_at": None}
    values |= {"version": ALERTS.c.version + 1, "updated_at": now}
    conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(**values))
    cancelled = cancel_pending(conn, alert_id, "resolved before delivery")
    new = {"state": "resolved", "note": text, "cause": cause, "override": why, "condition": row.condition}
    new["cancelled_notifications"] = cancelled
    _audit(conn, signer, who.action("alert.resolved", f"alert:{alert_id}", old={"state": row.state}, new=new), now)


def reopen(
    conn: Connection, signer: Any, settings: AlertSettings, alert_id: int, who: Operator, reason: str, now: datetime
) -> None:
    """Reopen a resolved alert (its escalation starts again), unless a newer live alert has the same key."""
    text = _text(reason, "reason", required=True)
    refuse_free_text("alert reopening", reason=text)
    row = _load(conn, alert_id)
    if row.state != "resolved":
        raise AlertRefused(f"alert {alert_id} is {row.state}, not resolved", "not_resolved")
    if conn.execute(select(ALERTS.c.id).where(ALERTS.c.open_key == row.dedup_key)).scalar() is not None:
        raise AlertRefused(
            f"alert {alert_id}: a newer alert for the same subject is live; work on that one", "newer_live"
        )
    values: dict[str, Any] = {"state": "open", "open_key": row.dedup_key, "resolved_at": None, "resolved_by": None}
    values |= {"resolution": None, "cause": None, "override": None, "acked_at": None, "acked_by": None}
    values |= {"ack_comment": None, "esc_epoch": row.esc_epoch + 1, "version": ALERTS.c.version + 1}
    values |= {"updated_at": now, "retrigger_at": None, **_start_chain(chain_for(settings, row.escalation), now)}
    conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(**values))
    _audit(
        conn,
        signer,
        who.action("alert.reopened", f"alert:{alert_id}", old={"state": "resolved"}, new={"reason": text}),
        now,
    )


def retrigger(conn: Connection, signer: Any, settings: AlertSettings, alert_id: int, now: datetime) -> bool:
    """Acknowledged but not resolved by the ack timeout: back to open, the chain from its start; False if moot."""
    a = ALERTS.c
    row = _load(conn, alert_id)
    if row.state != "acknowledged" or row.retrigger_at is None or row.retrigger_at > now:
        return False
    values: dict[str, Any] = {
        "state": "open",
        "retrigger_at": None,
        "esc_epoch": row.esc_epoch + 1,
        "version": a.version + 1,
    }
    values |= {"updated_at": now, **_start_chain(chain_for(settings, row.escalation), now)}
    conn.execute(update(ALERTS).where(a.id == alert_id).values(**values))
    detail = {"acked_by": row.acked_by, "acked_at": row.acked_at}
    _audit(conn, signer, SYSTEM.action("alert.retriggered", f"alert:{alert_id}", detail=detail), now)
    return True


def add_silence(
    conn: Connection,
    signer: Any,
    who: Operator,
    *,
    kind: Literal["silence", "maintenance"],
    rule: str | None,
    matchers: Mapping[str, str],
    starts_at: datetime,
    ends_at: datetime,
    reason: str,
    now: datetime,
) -> int:
    """Record a silence or maintenance window (who, why, from, until); return its id."""
    text = _text(reason, "reason", required=True)
    refuse_free_text("alert silence", reason=text, matchers=dict(matchers))
    if ends_at <= starts_at:
        raise AlertRefused("the end must be after the start", "bad_period")
    if ends_at - starts_at > timedelta(days=31):
        raise AlertRefused(
            "a silence lasts at most 31 days (a longer one hides a rule: disable it in the policy)", "silence_too_long"
        )
    if rule is None and not matchers:
        raise AlertRefused("a silence names a rule or at least one label (never everything)", "silence_everything")
    row: dict[str, Any] = {
        "kind": kind,
        "rule": rule,
        "matchers": dict(matchers),
        "starts_at": starts_at,
        "ends_at": ends_at,
    }
    row |= {"reason": text, "created_by": who.actor, "created_at": now}
    silence_id = int(conn.execute(insert(SILENCES).values(**row).returning(SILENCES.c.id)).scalar_one())
    _audit(conn, signer, who.action(f"alert.{kind}.create", f"silence:{silence_id}", new=row), now)
    return silence_id


def end_silence(conn: Connection, signer: Any, who: Operator, silence_id: int, now: datetime) -> None:
    """End a silence early (recorded); alerts it muted notify from the next escalation round."""
    row = conn.execute(select(*SILENCES.columns).where(SILENCES.c.id == silence_id)).first()
    if row is None or row.ended_at is not None or row.ends_at <= now:
        raise AlertRefused(f"silence {silence_id} is not active", "silence_not_active")
    conn.execute(update(SILENCES).where(SILENCES.c.id == silence_id).values(ended_at=now, ended_by=who.actor))
    _audit(
        conn, signer, who.action(f"alert.{row.kind}.end", f"silence:{silence_id}", old={"ends_at": row.ends_at}), now
    )


def unsilence_due(conn: Connection, signer: Any, settings: AlertSettings, now: datetime) -> int:
    """Alerts whose silence has ended lose it; those still open start their escalation; return how many."""
    a, s = ALERTS.c, SILENCES.c
    ended = or_(s.ends_at <= now, s.ended_at.is_not(None))
    rows = conn.execute(
        select(a.id, a.state, a.escalation, a.inhibited_by, a.silenced_by)
        .join(SILENCES, s.id == a.silenced_by)
        .where(a.state != "resolved", ended)
    ).all()
    for row in rows:
        values: dict[str, Any] = {"silenced_by": None, "version": a.version + 1, "updated_at": now}
        # An acknowledged alert keeps its quiet chain; unsilenced, a later re-trigger can escalate it.
        if row.inhibited_by is None and row.state == "open":
            values |= _start_chain(chain_for(settings, row.escalation), now)
        conn.execute(update(ALERTS).where(a.id == row.id).values(**values))
        # A transition like the others (release_inhibited's alert.uninhibited): why the chain starts only now.
        detail = {"silence": row.silenced_by}
        _audit(conn, signer, SYSTEM.action("alert.unsilenced", f"alert:{row.id}", detail=detail), now)
    return len(rows)


def active_silences(conn: Connection, now: datetime, limit: int = 500) -> list[Any]:
    """Return the silences and maintenance windows in force or still to come, soonest end first."""
    s = SILENCES.c
    stmt = select(*SILENCES.columns).where(s.ends_at > now, s.ended_at.is_(None)).order_by(s.ends_at).limit(limit)
    return list(conn.execute(stmt))


def live_keys(conn: Connection, rules: Iterable[str]) -> dict[str, tuple[int, str]]:
    """Return the live alerts of these rules: dedup key → (id, condition)."""
    a = ALERTS.c
    rows = conn.execute(select(a.open_key, a.id, a.condition).where(a.open_key.is_not(None), a.rule.in_(list(rules))))
    return {str(r.open_key): (int(r.id), str(r.condition)) for r in rows}


def counts(conn: Connection) -> dict[str, int]:
    """Return the number of alerts open, acknowledged, and open critical (the status board's figures)."""
    a = ALERTS.c
    rows = conn.execute(
        select(a.state, a.severity, func.count()).where(a.state != "resolved").group_by(a.state, a.severity)
    )
    out = {"open": 0, "acknowledged": 0, "critical": 0}
    for state, severity, n in rows:
        out[str(state)] += int(n)
        if severity == "critical" and state == "open":
            out["critical"] += int(n)
    return out


def unresolved_with_labels(conn: Connection, **labels: str) -> list[Any]:
    """Return live alerts of a subject (e.g. door=…), newest first (for a door or person page's banner)."""
    a = ALERTS.c
    rows = conn.execute(select(*ALERTS.columns).where(a.state != "resolved").order_by(a.id.desc())).all()
    return [r for r in rows if all((r.labels or {}).get(k) == v for k, v in labels.items())]
