"""Fleet enrolment: one-time tokens, refusals, device identity and issued certificates (issue 11, enrolment).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the model type: a migration must not change when models.py does later.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def Timestamp() -> sa.DateTime:  # reads like a type in the column lists below
    """Return the timestamp type (timestamptz on PostgreSQL; UTC text on SQLite)."""
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create enrol_tokens, enrol_refusals, fleet_devices and agent_certificates."""
    op.create_table(
        "enrol_tokens",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=True),
        sa.Column("reenrol", sa.Boolean(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("expires_at", Timestamp(), nullable=False),
        sa.Column("revoked_at", Timestamp(), nullable=True),
        sa.Column("last_used_at", Timestamp(), nullable=True),
        sa.CheckConstraint("kind IN ('terminal', 'door')", name=op.f("ck_enrol_tokens_kind")),
        sa.CheckConstraint("uses_left >= 0", name=op.f("ck_enrol_tokens_uses_left")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrol_tokens")),
        sa.UniqueConstraint("secret_sha256", name=op.f("uq_enrol_tokens_secret_sha256")),
    )
    op.create_table(
        "enrol_refusals",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("at", Timestamp(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("token_id", sa.String(16), nullable=True),
        sa.Column("kind", sa.String(16), nullable=True),
        sa.Column("name", sa.String(64), nullable=True),
        sa.Column("machine_id_sha256", sa.String(64), nullable=True),
        sa.Column("client", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrol_refusals")),
    )
    op.create_index(op.f("ix_enrol_refusals_at"), "enrol_refusals", ["at"])
    op.create_table(
        "fleet_devices",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("machine_id_sha256", sa.String(64), nullable=False),
        sa.Column("enrolled_at", Timestamp(), nullable=False),
        sa.Column("token_id", sa.String(16), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_fleet_devices_agent_id_agents")),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_fleet_devices")),
    )
    op.create_index(op.f("ix_fleet_devices_machine_id_sha256"), "fleet_devices", ["machine_id_sha256"])
    op.create_table(
        "agent_certificates",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("serial", sa.String(40), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("issuer_sha256", sa.String(64), nullable=False),
        sa.Column("not_before", Timestamp(), nullable=False),
        sa.Column("not_after", Timestamp(), nullable=False),
        sa.Column("issued_at", Timestamp(), nullable=False),
        sa.Column("via", sa.String(8), nullable=False),
        sa.CheckConstraint("via IN ('enrol', 'renew')", name=op.f("ck_agent_certificates_via")),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_agent_certificates_agent_id_agents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_certificates")),
        sa.UniqueConstraint("serial", name=op.f("uq_agent_certificates_serial")),
        sa.UniqueConstraint("sha256", name=op.f("uq_agent_certificates_sha256")),
    )
    op.create_index(op.f("ix_agent_certificates_agent_id_issued_at"), "agent_certificates", ["agent_id", "issued_at"])


def downgrade() -> None:
    """Drop the enrolment tables."""
    op.drop_index(op.f("ix_agent_certificates_agent_id_issued_at"), table_name="agent_certificates")
    op.drop_table("agent_certificates")
    op.drop_index(op.f("ix_fleet_devices_machine_id_sha256"), table_name="fleet_devices")
    op.drop_table("fleet_devices")
    op.drop_index(op.f("ix_enrol_refusals_at"), table_name="enrol_refusals")
    op.drop_table("enrol_refusals")
    op.drop_table("enrol_tokens")
