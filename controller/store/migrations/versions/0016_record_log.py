"""Record log: policy versions, issued commands and media loans chained and sealed like the events (issue 14).

``record_log`` is one append-only hash chain per tracked table (its ``stream``): every insert or change of a
row appends the row's key and the digest of its new content, and the checkpoint log gets two more entry
kinds: ``records`` (a write that advanced a record stream, in the same transaction) and ``records_seal``
(the rows that existed before this revision, sealed once as they stood, like genesis did for the events).
The sealing needs the controller's signing key, so it is not done here: the first controller start (or the
first write to a tracked table) does it (controller/store/record_log.py).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS_BEFORE = "kind IN ('genesis', 'ingest', 'agent_key', 'admin')"
_KINDS = "kind IN ('genesis', 'ingest', 'agent_key', 'admin', 'records', 'records_seal')"


def upgrade() -> None:
    """Create record_log and let the checkpoint log hold its entries."""
    op.create_table(
        "record_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("chain_index", sa.BigInteger(), nullable=False),
        sa.Column("row_key", sa.String(128), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("op IN ('seal', 'insert', 'update')", name=op.f("ck_record_log_op")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_record_log")),
        sa.UniqueConstraint("stream", "chain_index", name=op.f("uq_record_log_stream_chain_index")),
    )
    op.create_index(op.f("ix_record_log_stream_row_key"), "record_log", ["stream", "row_key"])
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint(op.f("ck_checkpoints_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_checkpoints_kind"), sa.text(_KINDS))


def downgrade() -> None:
    """Drop record_log; refused while the checkpoint log seals it (the log would no longer verify)."""
    bind = op.get_bind()
    found = bind.execute(sa.text("SELECT 1 FROM checkpoints WHERE kind IN ('records', 'records_seal') LIMIT 1"))
    if found.first() is not None:
        raise RuntimeError(
            "the checkpoint log seals the record log: downgrading below 0016 would break `records verify`"
        )
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint(op.f("ck_checkpoints_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_checkpoints_kind"), sa.text(_KINDS_BEFORE))
    op.drop_index(op.f("ix_record_log_stream_row_key"), table_name="record_log")
    op.drop_table("record_log")
