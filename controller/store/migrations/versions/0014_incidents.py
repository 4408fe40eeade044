"""Incident records (issue 13): draft PPC breach reports built from alerts, and the alerts they came from.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create incidents and incident_alerts."""
    op.create_table(
        "incidents",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("malicious", sa.Boolean(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("people_count", sa.BigInteger(), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("preliminary_reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("final_reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("status IN ('draft', 'preliminary', 'final', 'closed')", name=op.f("ck_incidents_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incidents")),
    )
    op.create_index(op.f("ix_incidents_status_found_at"), "incidents", ["status", "found_at"])
    op.create_table(
        "incident_alerts",
        sa.Column("incident_id", sa.BigInteger(), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"], ["incidents.id"], name=op.f("fk_incident_alerts_incident_id_incidents")
        ),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], name=op.f("fk_incident_alerts_alert_id_alerts")),
        sa.PrimaryKeyConstraint("incident_id", "alert_id", name=op.f("pk_incident_alerts")),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("incident_alerts")
    op.drop_table("incidents")
