"""Controller processes: each serve or ingest process reports who it is, what it leads and its ingest state.

Several controllers run against one database (docs/operations.md, "Several controllers"); an ingest-only
worker has no HTTP, so its health and the jobs each process leads are kept in the database, where
`sekisho controller status` lists them from any host.

Revision ID: 0017
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the controller_processes table (empty: each process adds its row at start)."""
    op.create_table(
        "controller_processes",
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("leads", sa.JSON(), nullable=False),
        sa.Column("ingest", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_controller_processes")),
    )


def downgrade() -> None:
    """Drop it."""
    op.drop_table("controller_processes")
