"""The door projection: follows the events table by its id and keeps the door registers current.

Each round reads the events stored since the cursor (``projection_cursors``, name ``doors``) and
applies them and the new cursor in one transaction, so a crash leaves either both or neither. Any
number of controller processes may run it: the cursor row is locked for the round (SQLite: the
writer lock), so rounds take turns and an event is never applied twice at once — and applying it
twice in a row changes nothing anyway (controller.doors.apply).

The one subtle part is knowing how far the cursor may advance. On SQLite writers take turns, so the
rows up to the largest id are all committed. On PostgreSQL an id is drawn when a row is inserted but
becomes visible only at commit, so a slow ingest transaction can commit id 41 after id 42 is already
visible; advancing past 42 would skip 41 for good. So when the ids after the cursor have holes,
the projection briefly takes ``LOCK TABLE events IN SHARE MODE``: granted only once every
transaction that is inserting events has finished, it makes every id below the largest visible one
either committed or never to be used. It is released at once and taken only when there are holes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, delete, func, insert, select, text, update

from sekisho.controller.doors.apply import PROJECTED_TYPES, SiteView, StoredEvent, apply_event, resolve_overdue_finding
from sekisho.controller.store.db import SQLITE_BEGIN
from sekisho.controller.store.models import (
    AreaPresence,
    DoorLogEntry,
    Event,
    Finding,
    KeyLoan,
    PolicyVersion,
    ProjectionCursor,
    Visit,
)
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt
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
_CURSORS = cast(Table, ProjectionCursor.__table__)
_FINDINGS = cast(Table, Finding.__table__)
_LOANS = cast(Table, KeyLoan.__table__)
_POLICY = cast(Table, PolicyVersion.__table__)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """Open a transaction that holds SQLite's writer lock from BEGIN (plain BEGIN on PostgreSQL)."""
    with engine.connect() as conn:
        conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with conn.begin():
            yield conn


class DoorProjector:
    """Projects stored door and key events into key_loans, door_log, area_presence and visits."""

    def __init__(self, store: Store, *, batch: int = 500, lock_timeout_s: int = 5) -> None:
        """Read at most ``batch`` events per transaction; wait at most ``lock_timeout_s`` for in-flight ingest."""
        self.store = store
        self.engine = store.engine
        self.batch = batch
        self.lock_timeout_s = lock_timeout_s
        self._site: tuple[int, SiteView] | None = None

    def position(self) -> int:
        """Return the id of the last event the registers reflect."""
        with self.engine.connect() as conn:
            found = conn.execute(select(_CURSORS.c.position).where(_CURSORS.c.name == CURSOR)).scalar()
        return int(found or 0)

    def run(self) -> int:
        """Project every event committed since the last round; return how many door/key events were applied."""
        applied = 0
        while True:
            horizon = self._horizon(self.position())
            count, more = self._round(horizon)
            applied += count
            if not more:
                return applied

    def rebuild(self) -> int:
        """Empty the registers and project every stored event again, in one transaction; return the count."""
        site = self.site()
        horizon = self._horizon(0)
        applied = 0
        with write_transaction(self.engine) as conn:
            self._lock_cursor(conn)
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
            self._move_cursor(conn, horizon)
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
            position = self._lock_cursor(conn)
            if position >= horizon:
                return 0, False  # another process projected this far meanwhile
            rows = self._read(conn, position, horizon)
            for row in rows:
                apply_event(conn, site, row)
            more = len(rows) == self.batch
            self._move_cursor(conn, rows[-1].id if more else horizon)
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

    def _horizon(self, position: int) -> int:
        """Return the largest events.id up to which every event that will ever exist is committed."""
        with self.engine.connect() as conn:
            top, count = conn.execute(select(func.max(_EVENTS.c.id), func.count()).where(_EVENTS.c.id > position)).one()
        if top is None:
            return position
        if self.engine.dialect.name != "postgresql" or count == top - position:
            return int(top)  # no holes: no id in the range is held by an uncommitted transaction
        with self.engine.connect() as conn, conn.begin():
            # Bounded: while this waits, new ingest transactions queue behind it; better to retry next round.
            conn.execute(text(f"SET LOCAL lock_timeout = '{int(self.lock_timeout_s)}s'"))
            conn.execute(text("LOCK TABLE events IN SHARE MODE"))
            top = conn.execute(select(func.max(_EVENTS.c.id))).scalar()
        return max(position, int(top or 0))

    @staticmethod
    def _lock_cursor(conn: Connection) -> int:
        stmt = select(_CURSORS.c.position).where(_CURSORS.c.name == CURSOR).with_for_update()
        found = conn.execute(stmt).scalar()
        if found is None:
            # The migration creates the row; this only guards against someone deleting it.
            conn.execute(insert(_CURSORS).values(name=CURSOR, position=0, updated_at=None))
            found = conn.execute(stmt).scalar_one()
        return int(found)

    @staticmethod
    def _move_cursor(conn: Connection, position: int) -> None:
        conn.execute(
            update(_CURSORS).where(_CURSORS.c.name == CURSOR).values(position=position, updated_at=timefmt.now())
        )

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
