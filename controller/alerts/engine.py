"""The alert engine: follows the events table, runs the rules, sweeps the conditions, escalates.

Like the door projection it polls the events table from its own cursor (``alerts``), so any number of
ingest processes feed it and an alert failure never holds back an ingest acknowledgement; a round applies
its signals and the new cursor in one transaction. Every ``condition_every_s`` it sweeps the fleet and the
records (conditions.py); every round it walks the escalation chains that are due (escalate.py), which
writes notifications to the outbox the delivery job drains (delivery.py).

The clock is a parameter: tests drive escalation minute by minute without waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, func, select

from sekisho.controller.alerts import book, conditions, escalate
from sekisho.controller.alerts.plan import Position
from sekisho.controller.alerts.rules import (
    EVENT_TYPES,
    RULES,
    Effective,
    Signal,
    Site,
    burst_subjects,
    effective,
    event_signals,
    signal,
)
from sekisho.controller.fleet.health import Thresholds, fleet_health
from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.store.cursor import EventCursor
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import Event, PolicyVersion
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt
from sekisho.protocol.alert_policy import AlertSettings
from sekisho.protocol.policy import Schedule, SitePolicy

log = logging.getLogger(__name__)

CURSOR = "alerts"
_EVENTS = cast(Table, Event.__table__)
_POLICY = cast(Table, PolicyVersion.__table__)


@dataclass(frozen=True)
class Policy:
    """What the engine takes from the policy in force: the alerts section, the site's places, the schedules."""

    version: int | None
    settings: AlertSettings
    site: Site
    schedules: dict[str, Schedule]
    effective: dict[str, Effective]

    @classmethod
    def of(cls, version: int | None, policy: SitePolicy | None) -> Policy:
        """Index a policy version (None: no policy yet; every rule at its defaults, no escalation)."""
        settings = policy.alerts if policy is not None else AlertSettings()
        eff = {rule: effective(rule, settings.rules, settings.default_escalation) for rule in RULES}
        schedules = {s.id: s for s in policy.schedules} if policy is not None else {}
        return cls(version, settings, Site.of(policy), schedules, eff)


class AlertEngine(PeriodicJob):
    """Rules over new events every round; conditions every ``condition_every_s``; escalation every round."""

    name = "alerts"
    # One engine: rounds take turns on the cursor row, but escalation and the sweeps of conditions must not
    # run twice at once (two escalations of one step would queue its notifications twice).
    leader_only = True
    IDLE_MOVE_S = 2.0
    IDLE_MOVE_ROWS = 20_000

    def __init__(
        self,
        store: Store,
        *,
        thresholds: Thresholds | None = None,
        every_s: float = 0.2,
        condition_every_s: float = 10.0,
        batch: int = 1000,
        clock: Callable[[], datetime] = timefmt.now,
        syslog: bool = False,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """Follow ``store``'s events every ``every_s`` seconds, ``batch`` events per transaction at most.

        With ``syslog``, every alert opened (or reopened) that is not silenced also goes to the SIEM.
        ``on_change`` is called once a transaction that changed alerts has committed (live streams look then).
        """
        self.syslog = syslog
        self.on_change = on_change
        self._changed = False
        self.store = store
        self.engine = store.engine
        self.thresholds = thresholds or Thresholds()
        self.every_s = every_s
        self.condition_every_s = condition_every_s
        self.batch = batch
        self.clock = clock
        self.cursor = EventCursor(self.engine, CURSOR)
        self._policy: Policy | None = None
        self._swept_at: float | None = None
        self._moved_at: float | None = None
        super().__init__()

    # --- the policy -----------------------------------------------------------------------------

    def policy(self) -> Policy:
        """Return the alert settings of the policy version in force (re-read only when the version changes)."""
        with self.engine.connect() as conn:
            version = conn.execute(select(func.max(_POLICY.c.version))).scalar()
            if self._policy is None or self._policy.version != version:
                document = None
                if version is not None:
                    document = conn.execute(select(_POLICY.c.document).where(_POLICY.c.version == version)).scalar_one()
                self._policy = Policy.of(version, SitePolicy.model_validate(document) if document else None)
        return self._policy

    # --- rounds ---------------------------------------------------------------------------------

    def run_once(self) -> None:
        """Apply the rules to the events stored since the last round, sweep conditions when due, escalate."""
        self.follow()
        now = time.monotonic()
        if self._swept_at is None or now - self._swept_at >= self.condition_every_s:
            self.sweep()
            self._swept_at = now
        self.escalate()

    def follow(self) -> int:
        """Run the rules over every event committed since the cursor; return how many events were read."""
        read = 0
        while True:
            position = self.cursor.position()
            horizon = self.cursor.horizon(position)
            if horizon <= position or not self._worth_a_write(position, horizon):
                return read
            count, more = self._round(horizon)
            self._announce()
            read += count
            if not more:
                return read

    def _worth_a_write(self, position: int, horizon: int) -> bool:
        """Tell whether a round should take the writer lock: events for the rules, or a cursor far behind.

        Most events are nobody's alert (logins granted, doors opened with a card): the rules' filter finds none,
        and moving the cursor past them every 0.2 s would queue for SQLite's writer lock with ingest. So the
        cursor moves past such events at most every ``IDLE_MOVE_S`` or ``IDLE_MOVE_ROWS`` events.
        """
        e = _EVENTS.c
        with self.engine.connect() as conn:
            wanted = conn.execute(
                select(e.id).where(e.id > position, e.id <= horizon, e.type.in_(sorted(EVENT_TYPES))).limit(1)
            ).first()
        if wanted is not None or horizon - position >= self.IDLE_MOVE_ROWS:
            return True
        return self._moved_at is None or time.monotonic() - self._moved_at >= self.IDLE_MOVE_S

    def _round(self, horizon: int) -> tuple[int, bool]:
        policy = self.policy()
        self._moved_at = time.monotonic()
        with write_transaction(self.engine) as conn:
            position = self.cursor.lock(conn)
            # Stamped once the writer lock is held: live streams find changes by their stamp (listing.ChangeFeed).
            now = self.clock()
            if position >= horizon:
                return 0, False  # another process got this far meanwhile
            e = _EVENTS.c
            rows = conn.execute(
                select(e.id, e.agent_id, e.type, e.occurred_at, e.payload)
                .where(e.id > position, e.id <= horizon, e.type.in_(sorted(EVENT_TYPES)))
                .order_by(e.id)
                .limit(self.batch)
            ).all()
            for row in rows:
                payload = row.payload if isinstance(row.payload, dict) else {}
                signals = event_signals(policy.site, int(row.id), row.agent_id, row.type, row.occurred_at, payload)
                if row.type == "login.denied":
                    signals += self._bursts(conn, policy, row, payload)
                self._apply(conn, policy, signals, now)
            more = len(rows) == self.batch
            self.cursor.move(conn, rows[-1].id if more else horizon)
        return len(rows), more

    def _bursts(self, conn: Connection, policy: Policy, row: Any, payload: dict[str, Any]) -> list[Signal]:
        """Count the failed logins in the window behind this one, per person and per terminal."""
        out = []
        e = _EVENTS.c
        for rule, key, labels in burst_subjects(policy.site, row.agent_id, payload):
            eff = policy.effective[rule]
            if not eff.enabled:
                continue
            window = timedelta(minutes=eff.window_minutes or 10)
            threshold = eff.threshold or 5
            where = [
                e.type == "login.denied",
                e.occurred_at > row.occurred_at - window,
                e.occurred_at <= row.occurred_at,
            ]
            where += [e.id <= row.id]  # what was stored up to this event: a replay of the round counts the same
            if rule == "login_failures_person":
                where.append(e.person == key["person"])
            else:
                where += [e.agent_id == row.agent_id]
            n = int(conn.execute(select(func.count()).select_from(_EVENTS).where(*where)).scalar_one())
            if n >= threshold:
                params = {"failures": n, "window_minutes": int(window.total_seconds() // 60), "threshold": threshold}
                out.append(signal(rule, row.occurred_at, key, {**labels, **key}, params=params, event_id=int(row.id)))
        return out

    def _announce(self) -> None:
        """Tell ``on_change`` about alerts changed by the transaction that just committed."""
        changed, self._changed = self._changed, False
        if changed and self.on_change is not None:
            self.on_change()

    def _apply(self, conn: Connection, policy: Policy, signals: list[Signal], now: datetime) -> None:
        signer = self.store.signing_key
        for sig in signals:
            raised = book.raise_signal(conn, signer, sig, policy.effective[sig.rule], policy.settings, now)
            self._changed = self._changed or raised is not None
            if self.syslog and raised is not None and raised.outcome in ("opened", "reopened") and not raised.quiet:
                first = Position(0, 0)
                escalate.queue(conn, raised.alert_id, "opened", raised.epoch, first, "syslog", "siem", None, "en", now)
            if raised is not None and sig.rule == "agent_offline" and raised.outcome == "cleared":
                book.release_inhibited(conn, signer, policy.settings, sig.dedup_key, now)

    def sweep(self) -> None:
        """Judge the condition rules now: raise what is true and not live-and-active, clear what no longer is."""
        policy = self.policy()
        agents = fleet_health(self.store, self.thresholds, self.clock())
        with write_transaction(self.engine) as conn:
            now = self.clock()  # once the writer lock is held (see _round)
            found = list(conditions.record_signals(conn, policy.site, now))
            found += conditions.fleet_signals(
                policy.site, agents, policy.effective, conditions.policy_published_at(conn), now
            )
            live = book.live_keys(conn, conditions.CONDITION_RULES)
            true_now = {sig.dedup_key for sig in found}
            # An agent offline is not also stale: the stale alert's condition clears when offline opens.
            fresh = [sig for sig in found if live.get(sig.dedup_key, (0, ""))[1] != "active"]
            self._apply(conn, policy, fresh, now)
            for key, (_alert_id, condition) in live.items():
                if condition == "active" and key not in true_now:
                    book.clear(conn, self.store.signing_key, key, now, now)
                    self._changed = True
                    if key.startswith("agent_offline|"):
                        book.release_inhibited(conn, self.store.signing_key, policy.settings, key, now)
            self._apply(conn, policy, conditions.letter_signals(conn, policy.site), now)
        self._announce()

    def escalate(self) -> int:
        """Take every escalation step and re-trigger that is due; return the notifications written."""
        policy = self.policy()
        now = self.clock()
        with self.engine.connect() as conn:
            # Most rounds have nothing due: find out with a read, not SQLite's writer lock (ingest needs it).
            if not escalate.anything_due(conn, now):
                return 0
        with write_transaction(self.engine) as conn:
            now = self.clock()  # once the writer lock is held (see _round)
            written = escalate.run_due(conn, self.store.signing_key, policy.settings, policy.schedules, now)
        self._changed = self._changed or written > 0  # a re-trigger moves an alert back to open
        self._announce()
        return written
