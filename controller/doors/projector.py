"""The door projection: follows the events table by its id and keeps the door registers current.

Each round reads the events stored since the cursor (``projection_cursors``, name ``doors``) and
applies them and the new cursor in one transaction, so a crash leaves either both or neither. Any
number of controller processes may run it: the cursor row is locked for the round (SQLite: the
writer lock), so rounds take turns and an event is never applied twice at once — and applying it
twice in a row changes nothing anyway (controller.doors.apply).

How far a round may read (the horizon, and PostgreSQL's late commits) is the shared cursor's business:
controller/store/cursor.py.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from sqlalchemy import Connection, Table, delete, func, select, update

from sekisho.controller.doors.apply import PROJECTED_TYPES, SiteView, StoredEvent, apply_event, resolve_overdue_finding
from sekisho.controller.store.cursor import EventCursor
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import (
    AreaPresence,
    DoorLogEntry,
    Event,
    Finding,
    KeyLoan,
    PolicyVersion,
    Visit,
)
from sekisho.controller.store.store import Store
from sekisho.protocol.policy import SitePolicy

log = logging.getLogger(__name__)

CURSOR = "doors"
KEY_LOAN_OVERDUE = "key_loan_overdue"
REGISTER_TABLES = (
    cast(Table, KeyLoan.__table__),
    cast(Table, DoorLogEntry.__table__),
    cast(Table, AreaPresence.__table__),
    cast(Table, Visit.__table__),
)

_EVENTS = cast(Table, Event.__table__)
_FINDINGS = cast(Table, Finding.__table__)
_LOANS = cast(Table, KeyLoan.__table__)
_POLICY = cast(Table, PolicyVersion.__table__)


class DoorProjector:
    """Projects stored door and key events into key_loans, door_log, area_presence and visits."""

    def __init__(self, store: Store, *, batch: int = 500, lock_timeout_s: int = 5) -> None:
        """Read at most ``batch`` events per transaction; wait at most ``lock_timeout_s`` for in-flight ingest."""
        self.store = store
        self.engine = store.engine
        self.batch = batch
        self.lock_timeout_s = lock_timeout_s
        self.cursor = EventCursor(self.engine, CURSOR, lock_timeout_s=lock_timeout_s)
        self._site: tuple[int, SiteView] | None = None

    def position(self) -> int:
        """Return the id of the last event the registers reflect."""
        return self.cursor.position()

    def run(self) -> int:
        """Project every event committed since the last round; return how many door/key events were applied."""
        applied = 0
        while True:
            horizon = self.cursor.horizon(self.position())
            count, more = self._round(horizon)
            applied += count
            if not more:
                return applied

    def rebuild(self) -> int:
        """Empty the registers and project every stored event again, in one transaction; return the count."""
        site = self.site()
        horizon = self.cursor.horizon(0)
        applied = 0
        with write_transaction(self.engine) as conn:
            self.cursor.lock(conn)
            for table in REGISTER_TABLES:
                if table is _LOANS:
                    # Plain-key loans from the counter tablet (negative ids) are not projected from events:
                    # their record is the admin audit trail, and a rebuild keeps them.
                    conn.execute(delete(table).where(table.c.id >= 0))
                else:
                    conn.execute(delete(table))
            position = 0
            while True:
                rows = self._read(conn, position, horizon)
                for row in rows:
                    apply_event(conn, site, row)
                applied += len(rows)
                if len(rows) < self.batch:
                    break
                position = rows[-1].id
            self._relink_findings(conn)
            self.cursor.move(conn, horizon)
        log.info("door registers rebuilt from %d event(s) up to event id %d", applied, horizon)
        return applied

    def site(self) -> SiteView:
        """Return the policy facts of the version in force (re-read only when the version changes)."""
        with self.engine.connect() as conn:
            version = conn.execute(select(func.max(_POLICY.c.version))).scalar()
            if version is None:
                return SiteView.of(None)
            if self._site is None or self._site[0] != version:
                document = conn.execute(select(_POLICY.c.document).where(_POLICY.c.version == version)).scalar_one()
                self._site = (version, SiteView.of(SitePolicy.model_validate(document)))
        return self._site[1]

    # --- rounds ------------------------------------------------------------------------------------

    def _round(self, horizon: int) -> tuple[int, bool]:
        site = self.site()
        with write_transaction(self.engine) as conn:
            position = self.cursor.lock(conn)
            if position >= horizon:
                return 0, False  # another process projected this far meanwhile
            rows = self._read(conn, position, horizon)
            for row in rows:
                apply_event(conn, site, row)
            more = len(rows) == self.batch
            self.cursor.move(conn, rows[-1].id if more else horizon)
        return len(rows), more

    def _read(self, conn: Connection, after: int, upto: int) -> list[StoredEvent]:
        e = _EVENTS.c
        stmt = (
            select(e.id, e.agent_id, e.seq, e.event_id, e.type, e.occurred_at, e.payload)
            .where(e.id > after, e.id <= upto, e.type.in_(sorted(PROJECTED_TYPES)))
            .order_by(e.id)
            .limit(self.batch)
        )
        return [StoredEvent(*row) for row in conn.execute(stmt)]

    @staticmethod
    def _relink_findings(conn: Connection) -> None:
        """Point rebuilt loans at their overdue findings again (findings are not derived; loan ids are)."""
        findings = conn.execute(
            select(_FINDINGS.c.id, _FINDINGS.c.detail)
            .where(_FINDINGS.c.kind == KEY_LOAN_OVERDUE)
            .order_by(_FINDINGS.c.id)
        ).all()
        for finding_id, detail in findings:
            loan_id: Any = (detail or {}).get("loan")
            if not isinstance(loan_id, int):
                continue
            conn.execute(update(_LOANS).where(_LOANS.c.id == loan_id).values(overdue_finding_id=finding_id))
            loan = conn.execute(
                select(_LOANS.c.returned_at, _LOANS.c.returned_by).where(_LOANS.c.id == loan_id)
            ).first()
            if loan is not None and loan.returned_at is not None:
                resolve_overdue_finding(conn, finding_id, loan.returned_at, loan.returned_by)
