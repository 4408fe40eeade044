"""Door registers projected from the events: key loans (鍵貸出管理簿), door log, area presence, visits.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def Timestamp() -> sa.DateTime:  # reads like a type in the column lists below
    """Return the timestamp type (timestamptz on PostgreSQL; UTC text on SQLite)."""
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the projection cursor and the four door registers."""
    cursors = op.create_table(
        "projection_cursors",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", Timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_projection_cursors")),
    )
    # The door projection starts before the first event: existing events are projected on first run.
    op.bulk_insert(cursors, [{"name": "doors", "position": 0, "updated_at": None}])
    op.create_table(
        "key_loans",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("cabinet", sa.String(64), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("person", sa.String(64), nullable=True),
        sa.Column("taken_at", Timestamp(), nullable=True),
        sa.Column("due_at", Timestamp(), nullable=True),
        sa.Column("returned_at", Timestamp(), nullable=True),
        sa.Column("returned_by", sa.String(64), nullable=True),
        sa.Column("returned_slot", sa.Integer(), nullable=True),
        sa.Column("wrong_slot", sa.Boolean(), nullable=False),
        sa.Column("return_only", sa.Boolean(), nullable=False),
        sa.Column("taken_event_id", sa.String(32), nullable=True),
        sa.Column("returned_event_id", sa.String(32), nullable=True),
        sa.Column("overdue_finding_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_loans")),
        sa.UniqueConstraint("taken_event_id", name=op.f("uq_key_loans_taken_event_id")),
        sa.UniqueConstraint("returned_event_id", name=op.f("uq_key_loans_returned_event_id")),
    )
    op.create_index(op.f("ix_key_loans_cabinet_key_taken_at"), "key_loans", ["cabinet", "key", "taken_at"])
    op.create_index(op.f("ix_key_loans_person_taken_at"), "key_loans", ["person", "taken_at"])
    op.create_index(op.f("ix_key_loans_returned_at_due_at"), "key_loans", ["returned_at", "due_at"])
    op.create_table(
        "door_log",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("occurred_at", Timestamp(), nullable=False),
        sa.Column("door", sa.String(64), nullable=False),
        sa.Column("door_kind", sa.String(16), nullable=True),
        sa.Column("area", sa.String(64), nullable=True),
        sa.Column("person", sa.String(64), nullable=True),
        sa.Column("card_masked", sa.String(32), nullable=True),
        sa.Column("reader", sa.String(64), nullable=True),
        sa.Column("direction", sa.String(8), nullable=True),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("visitor", sa.Boolean(), nullable=False),
        sa.Column("escort", sa.String(64), nullable=True),
        sa.Column("second_person", sa.String(64), nullable=True),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("passback", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_door_log")),
        sa.UniqueConstraint("event_id", name=op.f("uq_door_log_event_id")),
    )
    op.create_index(op.f("ix_door_log_door_occurred_at"), "door_log", ["door", "occurred_at"])
    op.create_index(op.f("ix_door_log_door_kind_occurred_at"), "door_log", ["door_kind", "occurred_at"])
    op.create_index(op.f("ix_door_log_person_occurred_at"), "door_log", ["person", "occurred_at"])
    op.create_index(op.f("ix_door_log_occurred_at"), "door_log", ["occurred_at"])
    op.create_table(
        "area_presence",
        sa.Column("area", sa.String(64), nullable=False),
        sa.Column("person", sa.String(64), nullable=False),
        sa.Column("inside", sa.Boolean(), nullable=False),
        sa.Column("entered_at", Timestamp(), nullable=True),
        sa.Column("exited_at", Timestamp(), nullable=True),
        sa.Column("door", sa.String(64), nullable=False),
        sa.Column("visitor", sa.Boolean(), nullable=False),
        sa.Column("escort", sa.String(64), nullable=True),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("area", "person", name=op.f("pk_area_presence")),
    )
    op.create_index(op.f("ix_area_presence_area_inside"), "area_presence", ["area", "inside"])
    op.create_table(
        "visits",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("visitor", sa.String(64), nullable=False),
        sa.Column("escort", sa.String(64), nullable=True),
        sa.Column("area", sa.String(64), nullable=False),
        sa.Column("entered_at", Timestamp(), nullable=True),
        sa.Column("exited_at", Timestamp(), nullable=True),
        sa.Column("doors", sa.JSON(), nullable=False),
        sa.Column("entry_event_id", sa.String(32), nullable=True),
        sa.Column("exit_event_id", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_visits")),
        sa.UniqueConstraint("entry_event_id", name=op.f("uq_visits_entry_event_id")),
        sa.UniqueConstraint("exit_event_id", name=op.f("uq_visits_exit_event_id")),
    )
    op.create_index(op.f("ix_visits_visitor_entered_at"), "visits", ["visitor", "entered_at"])
    op.create_index(op.f("ix_visits_area_exited_at"), "visits", ["area", "exited_at"])
    op.create_index(op.f("ix_visits_entered_at"), "visits", ["entered_at"])


def downgrade() -> None:
    """Drop the door registers and the projection cursor (the events they came from stay)."""
    op.drop_index(op.f("ix_visits_entered_at"), table_name="visits")
    op.drop_index(op.f("ix_visits_area_exited_at"), table_name="visits")
    op.drop_index(op.f("ix_visits_visitor_entered_at"), table_name="visits")
    op.drop_table("visits")
    op.drop_index(op.f("ix_area_presence_area_inside"), table_name="area_presence")
    op.drop_table("area_presence")
    op.drop_index(op.f("ix_door_log_occurred_at"), table_name="door_log")
    op.drop_index(op.f("ix_door_log_person_occurred_at"), table_name="door_log")
    op.drop_index(op.f("ix_door_log_door_kind_occurred_at"), table_name="door_log")
    op.drop_index(op.f("ix_door_log_door_occurred_at"), table_name="door_log")
    op.drop_table("door_log")
    op.drop_index(op.f("ix_key_loans_returned_at_due_at"), table_name="key_loans")
    op.drop_index(op.f("ix_key_loans_person_taken_at"), table_name="key_loans")
    op.drop_index(op.f("ix_key_loans_cabinet_key_taken_at"), table_name="key_loans")
    op.drop_table("key_loans")
    op.drop_table("projection_cursors")
