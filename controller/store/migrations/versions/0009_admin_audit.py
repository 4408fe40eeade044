"""Admin audit trail: a hash-chained stream of every admin change, export and remote command (issue 12).

``admin_audit`` holds one row per admin action (who, via, from where, what, old → new), chained like the
dead letters (controller/store/audit.py); the checkpoint log gets a fourth entry kind, ``admin``, that
seals the trail's head, so `records verify` names a row edited, deleted or inserted in the database.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS_BEFORE = "kind IN ('genesis', 'ingest', 'agent_key')"
_KINDS = "kind IN ('genesis', 'ingest', 'agent_key', 'admin')"


def upgrade() -> None:
    """Create admin_audit and let the checkpoint log hold admin entries."""
    op.create_table(
        "admin_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("via", sa.String(8), nullable=False),
        sa.Column("client", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("old", sa.JSON(), nullable=True),
        sa.Column("new", sa.JSON(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("chain_index", sa.BigInteger(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("via IN ('web', 'api', 'cli', 'system')", name=op.f("ck_admin_audit_via")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_audit")),
        sa.UniqueConstraint("chain_index", name=op.f("uq_admin_audit_chain_index")),
    )
    op.create_index(op.f("ix_admin_audit_at"), "admin_audit", ["at"])
    op.create_index(op.f("ix_admin_audit_actor_at"), "admin_audit", ["actor", "at"])
    op.create_index(op.f("ix_admin_audit_action_at"), "admin_audit", ["action", "at"])
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint(op.f("ck_checkpoints_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_checkpoints_kind"), sa.text(_KINDS))


def downgrade() -> None:
    """Drop admin_audit; refused while the checkpoint log holds admin entries (the log would no longer verify)."""
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM checkpoints WHERE kind = 'admin' LIMIT 1")).first() is not None:
        raise RuntimeError(
            "the checkpoint log seals admin audit entries: downgrading below 0009 would break `records verify`"
        )
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint(op.f("ck_checkpoints_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_checkpoints_kind"), sa.text(_KINDS_BEFORE))
    op.drop_index(op.f("ix_admin_audit_action_at"), table_name="admin_audit")
    op.drop_index(op.f("ix_admin_audit_actor_at"), table_name="admin_audit")
    op.drop_index(op.f("ix_admin_audit_at"), table_name="admin_audit")
    op.drop_table("admin_audit")
