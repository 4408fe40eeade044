"""Media loans: the 貸出記録 register (media_loans) and its append-only action log (media_loan_log).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types: a migration must not change when models.py does later.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_APPEND_ONLY = "media_loan_log is append-only"


def Timestamp() -> sa.DateTime:  # reads like a type in the column lists below
    """Return the timestamp type (timestamptz on PostgreSQL; UTC text on SQLite)."""
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the loan register and the loan log, and make the log refuse updates and deletes."""
    op.create_table(
        "media_loans",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("medium", sa.String(64), nullable=False),
        sa.Column("person", sa.String(64), nullable=False),
        sa.Column("terminals", sa.JSON(), nullable=False),
        sa.Column("starts_at", Timestamp(), nullable=False),
        sa.Column("ends_at", Timestamp(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("read_only", sa.Boolean(), nullable=False),
        sa.Column("approved_by", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("lent_version", sa.Integer(), nullable=False),
        sa.Column("returned_at", Timestamp(), nullable=True),
        sa.Column("received_by", sa.String(128), nullable=True),
        sa.Column("revoked_at", Timestamp(), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.Column("ended_version", sa.Integer(), nullable=True),
        sa.Column("overdue_finding_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_media_loans")),
    )
    op.create_index(op.f("ix_media_loans_medium_starts_at"), "media_loans", ["medium", "starts_at"])
    op.create_index(op.f("ix_media_loans_person_starts_at"), "media_loans", ["person", "starts_at"])
    op.create_table(
        "media_loan_log",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("loan_id", sa.String(64), nullable=False),
        sa.Column("medium", sa.String(64), nullable=False),
        sa.Column("person", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("at", Timestamp(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.CheckConstraint("action IN ('lend', 'return', 'revoke')", name=op.f("ck_media_loan_log_action")),
        sa.ForeignKeyConstraint(["loan_id"], ["media_loans.id"], name=op.f("fk_media_loan_log_loan_id_media_loans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_media_loan_log")),
    )
    op.create_index(op.f("ix_media_loan_log_loan_id"), "media_loan_log", ["loan_id"])
    op.create_index(op.f("ix_media_loan_log_medium_at"), "media_loan_log", ["medium", "at"])
    op.create_index(op.f("ix_media_loan_log_person_at"), "media_loan_log", ["person", "at"])
    # The log is what an auditor reads: the database itself refuses to rewrite or drop a line of it.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION media_loan_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_APPEND_ONLY}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER media_loan_log_append_only BEFORE UPDATE OR DELETE ON media_loan_log "
            "FOR EACH ROW EXECUTE FUNCTION media_loan_log_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER media_loan_log_no_{verb.lower()} BEFORE {verb} ON media_loan_log "
                f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
            )


def downgrade() -> None:
    """Drop the loan log and the loan register."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS media_loan_log_append_only ON media_loan_log")
        op.execute("DROP FUNCTION IF EXISTS media_loan_log_append_only()")
    op.drop_index(op.f("ix_media_loan_log_person_at"), table_name="media_loan_log")
    op.drop_index(op.f("ix_media_loan_log_medium_at"), table_name="media_loan_log")
    op.drop_index(op.f("ix_media_loan_log_loan_id"), table_name="media_loan_log")
    op.drop_table("media_loan_log")
    op.drop_index(op.f("ix_media_loans_person_starts_at"), table_name="media_loans")
    op.drop_index(op.f("ix_media_loans_medium_starts_at"), table_name="media_loans")
    op.drop_table("media_loans")
