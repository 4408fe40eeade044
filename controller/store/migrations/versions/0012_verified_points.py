"""Verified points: how far the last full walk verified each chain, signed by the controller (issue 12).

A console worker's first page used to walk every chain behind its rows from the start (~35 min at 10M
events). The background walk now records, per agent chain and for the checkpoint log, the index and hash
it verified up to (and the log entry it held them against), signed with the controller's signing key; a
worker trusts such a point and walks only the records after it (controller/reports/verify.py).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the verified_points table (empty: the first background walk fills it)."""
    op.create_table(
        "verified_points",
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("chain", sa.String(64), nullable=False),
        sa.Column("chain_index", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("log_entry", sa.BigInteger(), nullable=False),
        sa.Column("log_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.Text(), nullable=True),
        sa.Column("problem", sa.Text(), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_by", sa.String(200), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.CheckConstraint("kind IN ('agent', 'log')", name=op.f("ck_verified_points_kind")),
        sa.PrimaryKeyConstraint("kind", "chain", name=op.f("pk_verified_points")),
    )


def downgrade() -> None:
    """Drop it (workers then walk from the start again)."""
    op.drop_table("verified_points")
