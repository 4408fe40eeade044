"""Initial schema: agents, events with their hash chain, streams, dead letters, findings, policy, commands.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types: a migration must not change when models.py does later.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def Timestamp() -> sa.DateTime:  # reads like a type in the column lists below
    """Return the timestamp type (timestamptz on PostgreSQL; UTC text on SQLite)."""
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create every table of the first schema version."""
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_at", Timestamp(), nullable=False),
        sa.Column("last_seen_at", Timestamp(), nullable=True),
        sa.Column("version", sa.String(32), nullable=True),
        sa.Column("outbox_depth", sa.BigInteger(), nullable=True),
        sa.Column("clock_offset_ms", sa.BigInteger(), nullable=True),
        sa.Column("policy_version", sa.BigInteger(), nullable=True),
        sa.Column("last_heartbeat", sa.JSON(), nullable=True),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_agents_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
    )
    op.create_table(
        "events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("occurred_at", Timestamp(), nullable=False),
        sa.Column("received_at", Timestamp(), nullable=False),
        sa.Column("stored_at", Timestamp(), nullable=False),
        sa.Column("clock_synced", sa.Boolean(), nullable=False),
        sa.Column("clock_offset_ms", sa.BigInteger(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("chain_index", sa.BigInteger(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_events_agent_id_agents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("agent_id", "chain_index", name=op.f("uq_events_agent_id_chain_index")),
        sa.UniqueConstraint("agent_id", "seq", name=op.f("uq_events_agent_id_seq")),
        sa.UniqueConstraint("event_id", name=op.f("uq_events_event_id")),
    )
    op.create_index(op.f("ix_events_agent_id_occurred_at"), "events", ["agent_id", "occurred_at"])
    op.create_index(op.f("ix_events_type_occurred_at"), "events", ["type", "occurred_at"])
    op.create_table(
        "streams",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("chain_length", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("max_seq", sa.BigInteger(), nullable=False),
        sa.Column("contiguous_seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_streams_agent_id_agents")),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_streams")),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("received_at", Timestamp(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("event_id", sa.Text(), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_table(
        "findings",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=True),
        sa.Column("first_seq", sa.BigInteger(), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("resolved_at", Timestamp(), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
    )
    op.create_index(op.f("ix_findings_agent_id_kind_first_seq"), "findings", ["agent_id", "kind", "first_seq"])
    op.create_table(
        "policy_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_policy_versions")),
    )
    op.create_table(
        "issued_commands",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("issued_at", Timestamp(), nullable=False),
        sa.Column("expires_at", Timestamp(), nullable=False),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_issued_commands")),
        sa.UniqueConstraint("nonce", name=op.f("uq_issued_commands_nonce")),
    )
    op.create_index(op.f("ix_issued_commands_agent_id_issued_at"), "issued_commands", ["agent_id", "issued_at"])


def downgrade() -> None:
    """Drop every table of the first schema version."""
    op.drop_table("issued_commands")
    op.drop_table("policy_versions")
    op.drop_index(op.f("ix_findings_agent_id_kind_first_seq"), table_name="findings")
    op.drop_table("findings")
    op.drop_table("dead_letters")
    op.drop_table("streams")
    op.drop_index(op.f("ix_events_type_occurred_at"), table_name="events")
    op.drop_index(op.f("ix_events_agent_id_occurred_at"), table_name="events")
    op.drop_table("events")
    op.drop_table("agents")
