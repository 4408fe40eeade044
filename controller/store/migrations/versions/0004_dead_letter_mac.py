"""Dead letters keep a keyed MAC of the refused bytes instead of their plain SHA-256 (issue 10, item 4).

A plain digest beside a redacted payload let anyone who could read the database confirm a guessed My
Number: refill the redacted digits, hash, compare (the attack run needed about 2,000 guesses). The old
digests are dropped, not converted: they cannot be keyed after the fact. ``payload_mac`` is the
HMAC-SHA256 under a key derived from the controller's signing key (``controller/store/redaction.py``);
rows from before this revision have none (NULL).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Drop dead_letters.payload_sha256 with every stored digest; add the nullable payload_mac.

    Dropped must mean gone from the files too, not only from SQL's view:

    - SQLite rebuilds the table (batch mode: copy every row but the dropped column, drop the old table)
      with secure_delete on, so the freed pages are zeroed; ``db.upgrade`` then checkpoints the WAL into
      the database file and truncates it.
    - PostgreSQL only hides a dropped column (the bytes stay in every row until it is rewritten), so the
      table is rewritten into a new file (CLUSTER on its primary key; the old file goes at commit).
    """
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        op.execute("PRAGMA secure_delete = ON")
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("payload_sha256")
        batch.add_column(sa.Column("payload_mac", sa.String(64), nullable=True))
    if bind.dialect.name == "postgresql":
        op.execute("CLUSTER dead_letters USING pk_dead_letters")
        op.execute("ALTER TABLE dead_letters SET WITHOUT CLUSTER")


def downgrade() -> None:
    """Put back a payload_sha256 column, empty: the refused bytes are gone, their digests are not recomputed."""
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("payload_mac")
        batch.add_column(sa.Column("payload_sha256", sa.String(64), nullable=False, server_default=""))
    with op.batch_alter_table("dead_letters") as batch:
        # The default only filled the existing rows; revision 0003's column has none.
        batch.alter_column("payload_sha256", existing_type=sa.String(64), server_default=None)
