"""Indexes for the register and timeline queries of the console, and the muster list's safe ticks (issue 12).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = (
    ("key_loans", ("returned_at", "taken_at")),
    ("key_loans", ("returned_by", "returned_at")),
    ("door_log", ("area", "occurred_at")),
    ("visits", ("escort", "entered_at")),
    ("media_loans", ("starts_at",)),
)


def _name(table: str, columns: tuple[str, ...]) -> str:
    return f"ix_{table}_{'_'.join(columns)}"


def upgrade() -> None:
    """Add the register indexes and the muster_checks table."""
    for table, columns in _INDEXES:
        op.create_index(op.f(_name(table, columns)), table, list(columns))
    op.create_table(
        "muster_checks",
        sa.Column("area", sa.String(64), nullable=False),
        sa.Column("person", sa.String(64), nullable=False),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("checked_by", sa.String(200), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("area", "person", name=op.f("pk_muster_checks")),
    )


def downgrade() -> None:
    """Drop them again."""
    op.drop_table("muster_checks")
    for table, columns in reversed(_INDEXES):
        op.drop_index(op.f(_name(table, columns)), table_name=table)
