"""Condition rules: the fleet's and the records' state, judged every sweep, raised while true, cleared when not.

Unlike an event, a condition is not an occurrence: a sweep that finds an agent still offline does not count a
repeat. A sweep raises what is true and not yet live-and-active, and clears the live alerts of these rules
whose condition it no longer finds. Dead letters that mean possible tampering (a bad signature, a revoked or
stale key, a fact from a device that does not own it) are read once each, from their own cursor.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, func, insert, select, update

from sekisho.controller.alerts.rules import Effective, Signal, Site, signal
from sekisho.controller.fleet.health import AgentHealth
from sekisho.controller.store.models import DeadLetter, Finding, PolicyVersion, ProjectionCursor, VerifiedPoint
from sekisho.protocol import errors, timefmt

_FINDINGS = cast(Table, Finding.__table__)
_LETTERS = cast(Table, DeadLetter.__table__)
_CURSORS = cast(Table, ProjectionCursor.__table__)
_POINTS = cast(Table, VerifiedPoint.__table__)
_POLICY = cast(Table, PolicyVersion.__table__)
LETTERS_CURSOR = "alert_letters"
# Dead-letter reasons that mean a device or someone on the wire may be forging or replaying records.
TAMPER_REASONS = frozenset(
    {
        errors.BAD_SIGNATURE,
        errors.STALE_KEY,
        errors.REVOKED_AGENT,
        errors.TOPIC_MISMATCH,
        errors.SEQ_CONFLICT,
        errors.DUPLICATE_ID,
        errors.NOT_OWNER,
        errors.UNKNOWN_AGENT,
    }
)
# Findings that are conditions of a rule: open while the finding is open.
FINDING_RULES = {
    "sequence_gap": "sequence_gap",
    "key_loan_overdue": "key_overdue",
    "media_loan_overdue": "medium_overdue",
    "cert_expiring": "cert_expiring",
    "cert_expired": "cert_expiring",
}
CONDITION_RULES = (
    "agent_stale",
    "agent_offline",
    "clock_skew",
    "outbox_backlog",
    "policy_not_applied",
    "cert_expiring",
    "sequence_gap",
    "key_overdue",
    "medium_overdue",
    "chain_broken",
    "ingest_stalled",
)


def fleet_signals(
    site: Site, agents: list[AgentHealth], eff: dict[str, Effective], policy_at: datetime | None, now: datetime
) -> Iterator[Signal]:
    """Yield the fleet conditions true now: heartbeats missing, clock skew, outbox backlog, policy not applied."""
    stalled: list[str] = []
    for agent in agents:
        if agent.status == "revoked":
            continue
        where = {"site": site.name, "agent": agent.id, "terminal": site.agent_terminal.get(agent.id)}
        seen = {"last_seen_at": timefmt.fmt(agent.last_seen_at) if agent.last_seen_at else None}
        if agent.state in ("stale", "offline"):
            rule = "agent_stale" if agent.state == "stale" else "agent_offline"
            yield signal(rule, now, {"agent": agent.id}, where, params=seen | {"age_s": agent.last_seen_age_s})
        if agent.state == "offline":
            continue  # what an offline agent last reported is history, not a condition
        skew_limit_s = eff["clock_skew"].threshold or 60
        if agent.clock_offset_ms is not None and abs(agent.clock_offset_ms) > skew_limit_s * 1000:
            params: dict[str, Any] = {"offset_ms": agent.clock_offset_ms, "limit_s": skew_limit_s}
            yield signal("clock_skew", now, {"agent": agent.id}, where, params=params)
        backlog = eff["outbox_backlog"].threshold or 1000
        if agent.outbox_depth is not None and agent.outbox_depth >= backlog:
            yield signal("outbox_backlog", now, {"agent": agent.id}, where, params={"depth": agent.outbox_depth})
        late_s = eff["ingest_stalled"].threshold or 120
        if agent.state == "online" and (agent.oldest_unacked_age_s or 0) > late_s:
            stalled.append(agent.id)
        minutes = eff["policy_not_applied"].window_minutes or 15
        if (
            agent.policy_current is False
            and policy_at is not None
            and now - policy_at > timedelta(minutes=minutes)
            and agent.current_policy_version is not None
        ):
            params = {"reported": agent.policy_version, "current": agent.current_policy_version}
            yield signal("policy_not_applied", now, {"agent": agent.id}, where, params=params)
    if stalled:
        # Agents reach the broker (heartbeats arrive) but their events stay unacknowledged: ingest is not storing.
        params = {"agents": sorted(stalled)[:20], "count": len(stalled), "limit_s": late_s}
        yield signal("ingest_stalled", now, {"site": site.name or "site"}, params=params)


def record_signals(conn: Connection, site: Site, now: datetime) -> Iterator[Signal]:
    """Yield the record conditions true now: open findings, and chains the background walk found broken."""
    f = _FINDINGS.c
    for row in conn.execute(
        select(f.id, f.kind, f.agent_id, f.detail, f.first_seq, f.last_seq).where(
            f.resolved_at.is_(None), f.kind.in_(sorted(FINDING_RULES))
        )
    ):
        rule = FINDING_RULES[row.kind]
        detail = dict(row.detail or {})
        key: dict[str, Any] = {"agent": row.agent_id}
        if rule in ("key_overdue", "medium_overdue"):
            key["loan"] = detail.get("loan")  # one alert per loan
        labels = {"site": site.name, "person": detail.get("person"), "door": detail.get("door")}
        params = {"finding": row.id, "kind": row.kind, "first_seq": row.first_seq, "last_seq": row.last_seq}
        yield signal(rule, now, key, labels, params=params)
    p = _POINTS.c
    for point in conn.execute(select(p.kind, p.chain, p.problem).where(p.problem.is_not(None))):
        yield signal(
            "chain_broken",
            now,
            {"chain": f"{point.kind}:{point.chain}"},
            {"site": site.name},
            params={"problem": str(point.problem)[:300]},
        )


def policy_published_at(conn: Connection) -> datetime | None:
    """Return when the policy version in force was made (agents are given a while to apply it)."""
    row = conn.execute(select(_POLICY.c.created_at).order_by(_POLICY.c.version.desc()).limit(1)).first()
    return row.created_at if row is not None else None


def letter_signals(conn: Connection, site: Site, limit: int = 1000) -> list[Signal]:
    """Read the dead letters after this cursor (moved in the caller's transaction); return the tampering signals."""
    position = conn.execute(
        select(_CURSORS.c.position).where(_CURSORS.c.name == LETTERS_CURSOR).with_for_update()
    ).scalar()
    if position is None:
        # Not there (a database older than the alerts' migration would have it): start from now.
        top = conn.execute(select(func.max(_LETTERS.c.id))).scalar()
        conn.execute(insert(_CURSORS).values(name=LETTERS_CURSOR, position=int(top or 0), updated_at=None))
        return []
    d = _LETTERS.c
    rows = conn.execute(
        select(d.id, d.received_at, d.agent_id, d.reason, d.topic).where(d.id > position).order_by(d.id).limit(limit)
    ).all()
    if not rows:
        return []
    conn.execute(
        update(_CURSORS).where(_CURSORS.c.name == LETTERS_CURSOR).values(position=rows[-1].id, updated_at=timefmt.now())
    )
    out = []
    for row in rows:
        if row.reason not in TAMPER_REASONS:
            continue
        # The agent id of a dead letter is whatever arrived: bounded and printable before it becomes a label.
        agent = "".join(ch for ch in str(row.agent_id or "unknown")[:64] if ch.isprintable())
        params = {"reason": row.reason, "letter": row.id}
        out.append(signal("signature_failure", row.received_at, {"agent": agent}, {"site": site.name}, params=params))
    return out
