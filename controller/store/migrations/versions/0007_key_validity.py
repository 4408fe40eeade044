"""Key rotation with history (issue 11): how long a replaced key's events are still accepted.

``agent_keys.previous_until`` is set on a ``replace`` line: events signed with the key the line replaces
are still accepted (and marked) when received before then, so events waiting in an agent's outbox at the
rotation are stored instead of being re-sent for ever. The moment is part of the controller-signed line
(controller/store/checkpoints.py ``key_line_body``) only when set, so every line written before this
revision keeps its signature and its digest in the checkpoint log.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the nullable agent_keys.previous_until (NULL: the replaced key counts only around the rotation)."""
    with op.batch_alter_table("agent_keys") as batch:
        batch.add_column(sa.Column("previous_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop agent_keys.previous_until (lines that carried it no longer verify: downgrade only an unused store)."""
    with op.batch_alter_table("agent_keys") as batch:
        batch.drop_column("previous_until")
