"""Escalation: each due step of an open alert's chain becomes notifications in the outbox, exactly once.

An open alert carries its chain's run (started at, epoch, the last position done, the next due). A round
takes every alert whose next step is due, asks the planner (plan.py) which positions are due now — after a
controller outage, every missed one, each once — writes one notification per recipient and channel into
``alert_notifications`` (whose unique key makes a step's notifications exactly-once however often a restarted
or second worker repeats it), records the escalation in the admin trail, and moves the run on. An alert
acknowledged and not resolved by its ack timeout re-triggers: open again, its chain from the start.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from sekisho.controller.alerts import book
from sekisho.controller.alerts.plan import Position, due_at, next_due_at, positions_due, recipients
from sekisho.controller.store.audit import SYSTEM, append_admin
from sekisho.protocol.alert_policy import AlertSettings, Contact
from sekisho.protocol.policy import Schedule

NOTIFICATIONS = book.NOTIFICATIONS
# Alerts escalated per round at most: a storm is worked through over a few rounds, never in one long lock.
ROUND_LIMIT = 200


def _kind(epoch: int, pos: Position) -> str:
    if pos.round == 0 and pos.step == 0:
        return "opened" if epoch == 0 else "retriggered"
    return "escalated"


def _targets(contact: Contact) -> list[tuple[str, str]]:
    out = []
    if contact.email:
        out.append(("email", contact.email))
    if contact.webhook:
        out.append(("webhook", contact.webhook))
    return out


def queue(
    conn: Connection,
    alert_id: int,
    kind: str,
    epoch: int,
    pos: Position,
    channel: str,
    target: str,
    contact: str | None,
    language: str,
    now: datetime,
) -> bool:
    """Write one notification to the outbox unless it is there already; return whether it was written."""
    row = {"alert_id": alert_id, "kind": kind, "epoch": epoch, "round": pos.round, "step": pos.step}
    row |= {"channel": channel, "target": target, "contact": contact, "language": language, "state": "pending"}
    row |= {"attempts": 0, "created_at": now, "next_at": now}
    try:
        with conn.begin_nested():
            conn.execute(insert(NOTIFICATIONS).values(**row))
    except IntegrityError:
        return False  # this step was taken before (a restarted controller, or another worker)
    return True


def anything_due(conn: Connection, now: datetime) -> bool:
    """Tell whether a step, a re-trigger or the end of a silence is due (run_due would change something)."""
    a, s = book.ALERTS.c, book.SILENCES.c
    step = select(a.id).where(a.state == "open", a.esc_next_at <= now).limit(1)
    again = select(a.id).where(a.state == "acknowledged", a.retrigger_at <= now).limit(1)
    ended = (
        select(a.id)
        .join(book.SILENCES, s.id == a.silenced_by)
        .where(a.state != "resolved", or_(s.ends_at <= now, s.ended_at.is_not(None)))
        .limit(1)
    )
    return any(conn.execute(query).first() is not None for query in (step, again, ended))


def run_due(
    conn: Connection,
    signer: Any,
    settings: AlertSettings,
    schedules: Mapping[str, Schedule],
    now: datetime,
) -> int:
    """Re-trigger what timed out after an ack, take every escalation step due; return the notifications written."""
    a = book.ALERTS.c
    # Silences that ended since the last round: their open alerts escalate from now (not from the next sweep).
    book.unsilence_due(conn, signer, settings, now)
    for alert_id in conn.execute(
        select(a.id).where(a.state == "acknowledged", a.retrigger_at <= now).order_by(a.id).limit(ROUND_LIMIT)
    ).scalars():
        book.retrigger(conn, signer, settings, int(alert_id), now)
    rows = conn.execute(
        select(a.id, a.escalation, a.esc_started_at, a.esc_epoch, a.esc_round, a.esc_step)
        .where(a.state == "open", a.esc_next_at <= now, a.silenced_by.is_(None), a.inhibited_by.is_(None))
        .order_by(a.esc_next_at, a.id)
        .limit(ROUND_LIMIT)
    ).all()
    written = 0
    for row in rows:
        chain = book.chain_for(settings, row.escalation)
        if chain is None or row.esc_started_at is None:
            # The policy no longer has this chain: the alert stays open and visible, nobody more is told.
            conn.execute(update(book.ALERTS).where(a.id == row.id).values(esc_next_at=None))
            continue
        after = Position(row.esc_round, row.esc_step) if row.esc_round is not None else None
        done = positions_due(chain, row.esc_started_at, after, now)
        for pos in done:
            when = due_at(chain, row.esc_started_at, pos)
            kind = _kind(int(row.esc_epoch), pos)
            told: list[str] = []
            for contact in recipients(settings, schedules, chain.steps[pos.step], when):
                for channel, target in _targets(contact):
                    if queue(
                        conn,
                        int(row.id),
                        kind,
                        int(row.esc_epoch),
                        pos,
                        channel,
                        target,
                        contact.id,
                        contact.language,
                        now,
                    ):
                        written += 1
                told.append(contact.id)
            detail = {"chain": chain.id, "epoch": row.esc_epoch, "round": pos.round, "step": pos.step}
            detail |= {"due_at": when, "contacts": told}
            append_admin(conn, signer, SYSTEM.action(f"alert.{kind}", f"alert:{row.id}", detail=detail), now)
        last = done[-1] if done else after
        values: dict[str, Any] = {"esc_next_at": next_due_at(chain, row.esc_started_at, last)}
        if last is not None:
            values |= {"esc_round": last.round, "esc_step": last.step}
        if done:
            values |= {"version": a.version + 1, "updated_at": now}
        conn.execute(update(book.ALERTS).where(a.id == row.id).values(**values))
    return written
