"""Signed checkpoints: the checkpoint log, the agents' key history and the dead letters' hash chain.

The migration cannot sign (the controller's signing key is not in the database), so it prepares what
needs no key: every registered agent gets its current key as line 1 of its history (unsigned; a revoked
agent also a revoke line), and the existing dead letters are chained in id order. The first controller
that starts with its signing key then writes the log's genesis entry: it signs those lines and seals
every chain as it stands (controller/store/checkpoints.py, seal_existing).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types: a migration must not change when models.py does later.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ZERO_HASH = "0" * 64
# The dead-letter record of chain.letter_hash, frozen here as it was when this revision was written.
_LETTER_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_BATCH = 1000


def Timestamp() -> sa.DateTime:  # reads like a type in the column lists below
    """Return the timestamp type (timestamptz on PostgreSQL; UTC text on SQLite)."""
    return sa.DateTime(timezone=True)


def _utc(value: datetime) -> datetime:
    # SQLite gives the stored UTC back without a zone; PostgreSQL an aware time in the session's zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _letter_hash(prev_hash: str, row: sa.Row[tuple[object, ...]], chain_index: int) -> str:
    record = {
        "chain_index": chain_index,
        "received_at": _utc(row.received_at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "topic": row.topic,
        "agent_id": row.agent_id,
        "seq": row.seq,
        "event_id": row.event_id,
        "reason": row.reason,
        "detail": row.detail,
        "payload": row.payload,
        "size": row.size,
    }
    return hashlib.sha256(prev_hash.encode() + b"\n" + _LETTER_ENCODER.encode(record).encode()).hexdigest()


def _chain_dead_letters(conn: sa.Connection) -> None:
    letters = sa.table(
        "dead_letters",
        sa.column("id", BigId),
        sa.column("received_at", Timestamp()),
        sa.column("topic", sa.Text()),
        sa.column("agent_id", sa.Text()),
        sa.column("seq", sa.BigInteger()),
        sa.column("event_id", sa.Text()),
        sa.column("reason", sa.String(64)),
        sa.column("detail", sa.Text()),
        sa.column("payload", sa.Text()),
        sa.column("size", sa.BigInteger()),
        sa.column("chain_index", sa.BigInteger()),
        sa.column("prev_hash", sa.String(64)),
        sa.column("hash", sa.String(64)),
    )
    update = (
        sa.update(letters)
        .where(letters.c.id == sa.bindparam("b_id"))
        .values(chain_index=sa.bindparam("b_index"), prev_hash=sa.bindparam("b_prev"), hash=sa.bindparam("b_hash"))
    )
    index, head, after = 0, ZERO_HASH, None
    while True:
        page = sa.select(letters).order_by(letters.c.id).limit(_BATCH)
        if after is not None:
            page = page.where(letters.c.id > after)
        rows = conn.execute(page).all()
        if not rows:
            return
        changes = []
        for row in rows:
            index += 1
            digest = _letter_hash(head, row, index)
            changes.append({"b_id": row.id, "b_index": index, "b_prev": head, "b_hash": digest})
            head = digest
        conn.execute(update, changes)
        after = rows[-1].id


def _copy_agent_keys(conn: sa.Connection, agent_keys: sa.Table) -> None:
    agents = sa.table(
        "agents",
        sa.column("id", sa.String(64)),
        sa.column("public_key_pem", sa.Text()),
        sa.column("status", sa.String(16)),
        sa.column("registered_at", Timestamp()),
    )
    now = datetime.now(UTC)
    lines = []
    for agent in conn.execute(sa.select(agents).order_by(agents.c.id)):
        registered = _utc(agent.registered_at)
        common = {"agent_id": agent.id, "public_key_pem": agent.public_key_pem, "registered_at": now}
        lines.append({**common, "version": 1, "action": "register", "valid_from": registered, "signature": None})
        if agent.status == "revoked":
            # When it was revoked was not kept: from the upgrade on, as far as the history can say.
            lines.append({**common, "version": 2, "action": "revoke", "valid_from": now, "signature": None})
    if lines:
        op.bulk_insert(agent_keys, lines)


def upgrade() -> None:
    """Create agent_keys and checkpoints, copy the agents' keys, and chain the dead letters."""
    agent_keys = op.create_table(
        "agent_keys",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("valid_from", Timestamp(), nullable=False),
        sa.Column("registered_at", Timestamp(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=True),
        sa.CheckConstraint("action IN ('register', 'replace', 'revoke')", name=op.f("ck_agent_keys_action")),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_agent_keys_agent_id_agents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_keys")),
        sa.UniqueConstraint("agent_id", "version", name=op.f("uq_agent_keys_agent_id_version")),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("signature", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('genesis', 'ingest', 'agent_key')", name=op.f("ck_checkpoints_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
    )
    conn = op.get_bind()
    _copy_agent_keys(conn, agent_keys)
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("chain_index", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(64), nullable=True))
    _chain_dead_letters(conn)
    with op.batch_alter_table("dead_letters") as batch:
        batch.alter_column("chain_index", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(64), nullable=False)
        batch.create_unique_constraint(op.f("uq_dead_letters_chain_index"), ["chain_index"])


def downgrade() -> None:
    """Drop the checkpoint log, the key history and the dead letters' chain columns."""
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_constraint(op.f("uq_dead_letters_chain_index"), type_="unique")
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
        batch.drop_column("chain_index")
    op.drop_table("checkpoints")
    op.drop_table("agent_keys")
