"""The person and account an event names, as indexed columns of events (registers and timelines by person).

The USB log by person and a person's timeline read login and USB events by the payload's ``person`` (and a
session event's ``user``). As JSON inside the payload that meant reading every USB event and filtering;
these columns, filled at ingest by chain.subject_columns and indexed with occurred_at, let the query read
one person's events in time order. Existing rows are filled here, in id batches, by the same function.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sekisho.controller.store.chain import subject_columns

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 5000
_INDEXES = (("person", "occurred_at"), ("account", "occurred_at"))


def _name(columns: tuple[str, ...]) -> str:
    return f"ix_events_{'_'.join(columns)}"


def _backfill(conn: sa.Connection) -> None:
    """Fill person and account of the stored events, a batch of ids at a time (bounded memory and locks)."""
    events = sa.table(
        "events", sa.column("id", sa.BigInteger()), sa.column("payload"), sa.column("person"), sa.column("account")
    )
    update = (
        sa.update(events)
        .where(events.c.id == sa.bindparam("b_id"))
        .values(person=sa.bindparam("b_person"), account=sa.bindparam("b_account"))
    )
    last = 0
    while True:
        found = conn.execute(
            sa.select(events.c.id, events.c.payload).where(events.c.id > last).order_by(events.c.id).limit(_BATCH)
        ).all()
        if not found:
            return
        changes = []
        for event_id, payload in found:
            # The column is untyped here: SQLite hands back the JSON text, psycopg the decoded value.
            fields = subject_columns(json.loads(payload) if isinstance(payload, str) else payload)
            if fields["person"] is not None or fields["account"] is not None:
                changes.append({"b_id": event_id, "b_person": fields["person"], "b_account": fields["account"]})
        if changes:
            conn.execute(update, changes)
        last = int(found[-1][0])


def upgrade() -> None:
    """Add events.person and events.account, fill them for the stored events, then index them."""
    op.add_column("events", sa.Column("person", sa.String(64), nullable=True))
    op.add_column("events", sa.Column("account", sa.String(64), nullable=True))
    _backfill(op.get_bind())
    # Indexed after the fill: one sorted build instead of an index update per row.
    for columns in _INDEXES:
        op.create_index(op.f(_name(columns)), "events", list(columns))


def downgrade() -> None:
    """Drop the indexes and the columns (the payload still holds both)."""
    for columns in reversed(_INDEXES):
        op.drop_index(op.f(_name(columns)), table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("account")
        batch.drop_column("person")
