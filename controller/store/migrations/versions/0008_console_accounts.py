"""Console accounts: users, roles, sessions, API tokens per user, login throttling (issue 12).

Passwords are argon2id hashes; sessions and API tokens keep only the SHA-256 of their secret; every
sign-in attempt is a row of console_login_attempts, from which the lock-out is computed (so every
controller process agrees on it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the model type: a migration must not change when models.py does later.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def Timestamp() -> sa.DateTime:  # reads like a type in the column lists below
    """Return the timestamp type (timestamptz on PostgreSQL; UTC text on SQLite)."""
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create console_users, console_sessions, console_api_tokens and console_login_attempts."""
    op.create_table(
        "console_users",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("login", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("kana", sa.String(128), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("areas", sa.JSON(), nullable=False),
        sa.Column("language", sa.String(8), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("password_changed_at", Timestamp(), nullable=False),
        sa.Column("totp_secret", sa.String(64), nullable=True),
        sa.Column("totp_enrolled_at", Timestamp(), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("disabled_at", Timestamp(), nullable=True),
        sa.CheckConstraint(
            "role IN ('it_admin', 'facility_manager', 'security', 'auditor', 'area_manager')",
            name=op.f("ck_console_users_role"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_users")),
        sa.UniqueConstraint("login", name=op.f("uq_console_users_login")),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id_sha256", sa.String(64), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("last_seen_at", Timestamp(), nullable=False),
        sa.Column("expires_at", Timestamp(), nullable=False),
        sa.Column("client", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["console_users.id"], name=op.f("fk_console_sessions_user_id_console_users")
        ),
        sa.PrimaryKeyConstraint("id_sha256", name=op.f("pk_console_sessions")),
    )
    op.create_index(op.f("ix_console_sessions_user_id"), "console_sessions", ["user_id"])
    op.create_table(
        "console_api_tokens",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("expires_at", Timestamp(), nullable=True),
        sa.Column("revoked_at", Timestamp(), nullable=True),
        sa.Column("last_used_at", Timestamp(), nullable=True),
        sa.Column("last_used_client", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["console_users.id"], name=op.f("fk_console_api_tokens_user_id_console_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_api_tokens")),
        sa.UniqueConstraint("secret_sha256", name=op.f("uq_console_api_tokens_secret_sha256")),
        sa.UniqueConstraint("user_id", "name", name=op.f("uq_console_api_tokens_user_id_name")),
    )
    op.create_index(op.f("ix_console_api_tokens_user_id"), "console_api_tokens", ["user_id"])
    op.create_table(
        "console_login_attempts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("at", Timestamp(), nullable=False),
        sa.Column("login", sa.String(64), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_login_attempts")),
    )
    op.create_index(op.f("ix_console_login_attempts_login_at"), "console_login_attempts", ["login", "at"])
    op.create_index(op.f("ix_console_login_attempts_client_at"), "console_login_attempts", ["client", "at"])
    op.create_index(op.f("ix_console_login_attempts_at"), "console_login_attempts", ["at"])


def downgrade() -> None:
    """Drop the console account tables (every user, session and API token is gone)."""
    op.drop_table("console_login_attempts")
    op.drop_table("console_api_tokens")
    op.drop_table("console_sessions")
    op.drop_table("console_users")
