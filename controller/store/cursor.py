"""A follower's place in the events table: how far it has read, and how far it may safely read.

The door projection and the alert rules follow the events table by id, each from its own row in
``projection_cursors``, so any number of controller processes can feed them. Reading is safe only up to
the horizon: on SQLite writers take turns, so every id up to the largest is committed; on PostgreSQL an id
is drawn at insert but visible only at commit, so a slow ingest transaction can commit id 41 after id 42
is visible, and a follower that moved past 42 would skip 41 for good. When the ids after the cursor have
holes, the horizon briefly takes ``LOCK TABLE events IN SHARE MODE``: granted only once every transaction
inserting events has finished, it makes every id below the largest visible one committed or never used.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection, Engine, Table, func, insert, select, text, update

from sekisho.controller.store.models import Event, ProjectionCursor
from sekisho.protocol import timefmt

_EVENTS = cast(Table, Event.__table__)
_CURSORS = cast(Table, ProjectionCursor.__table__)


class EventCursor:
    """One named cursor over the events table (a row of ``projection_cursors``)."""

    def __init__(self, engine: Engine, name: str, *, lock_timeout_s: int = 5) -> None:
        """Follow the events for ``name``; wait at most ``lock_timeout_s`` for in-flight ingest at a hole."""
        self.engine = engine
        self.name = name
        self.lock_timeout_s = lock_timeout_s

    def position(self) -> int:
        """Return the id of the last event the follower has applied."""
        with self.engine.connect() as conn:
            found = conn.execute(select(_CURSORS.c.position).where(_CURSORS.c.name == self.name)).scalar()
        return int(found or 0)

    def horizon(self, position: int) -> int:
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

    def lock(self, conn: Connection) -> int:
        """Lock the cursor row for this transaction (rounds of several processes take turns); return it."""
        stmt = select(_CURSORS.c.position).where(_CURSORS.c.name == self.name).with_for_update()
        found = conn.execute(stmt).scalar()
        if found is None:
            # The migrations create the rows; this only guards against someone deleting one.
            conn.execute(insert(_CURSORS).values(name=self.name, position=0, updated_at=None))
            found = conn.execute(stmt).scalar_one()
        return int(found)

    def move(self, conn: Connection, position: int) -> None:
        """Set the cursor in the caller's transaction (with what was applied: both commit or neither)."""
        conn.execute(
            update(_CURSORS).where(_CURSORS.c.name == self.name).values(position=position, updated_at=timefmt.now())
        )
