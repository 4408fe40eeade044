"""Alerts (issue 13): alerts, the events behind them, silences and maintenance windows, the notification outbox.

The alert rules follow the events table from a cursor (projection_cursors, name ``alerts``) that starts at the
newest event stored when this migration runs: an upgraded site is not alarmed about its whole history.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = True) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create the four alert tables, the admin trail's target index and the alerts cursor at the newest event."""
    op.create_table(
        "alerts",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("rule", sa.String(48), nullable=False),
        sa.Column("dedup_key", sa.String(400), nullable=False),
        sa.Column("open_key", sa.String(400), nullable=True),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("condition", sa.String(8), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        _ts("first_at", False),
        _ts("last_at", False),
        _ts("opened_at", False),
        _ts("cleared_at"),
        _ts("acked_at"),
        sa.Column("acked_by", sa.String(200), nullable=True),
        sa.Column("ack_comment", sa.Text(), nullable=True),
        _ts("resolved_at"),
        sa.Column("resolved_by", sa.String(200), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.Column("cause", sa.String(32), nullable=True),
        sa.Column("override", sa.Text(), nullable=True),
        sa.Column("silenced_by", sa.BigInteger(), nullable=True),
        sa.Column("inhibited_by", sa.String(400), nullable=True),
        sa.Column("escalation", sa.String(64), nullable=True),
        _ts("esc_started_at"),
        sa.Column("esc_epoch", sa.Integer(), nullable=False),
        sa.Column("esc_round", sa.Integer(), nullable=True),
        sa.Column("esc_step", sa.Integer(), nullable=True),
        _ts("esc_next_at"),
        _ts("retrigger_at"),
        sa.Column("version", sa.BigInteger(), nullable=False),
        _ts("updated_at", False),
        sa.CheckConstraint("state IN ('open', 'acknowledged', 'resolved')", name=op.f("ck_alerts_state")),
        sa.CheckConstraint("condition IN ('active', 'cleared', 'none')", name=op.f("ck_alerts_condition")),
        sa.CheckConstraint("severity IN ('critical', 'high', 'medium', 'low')", name=op.f("ck_alerts_severity")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("open_key", name=op.f("uq_alerts_open_key")),
    )
    op.create_index(op.f("ix_alerts_state_severity_last_at"), "alerts", ["state", "severity", "last_at"])
    op.create_index(op.f("ix_alerts_updated_at"), "alerts", ["updated_at"])
    op.create_index(op.f("ix_alerts_esc_next_at"), "alerts", ["esc_next_at"])
    op.create_index(op.f("ix_alerts_dedup_key_resolved_at"), "alerts", ["dedup_key", "resolved_at"])
    op.create_table(
        "alert_events",
        sa.Column("alert_id", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], name=op.f("fk_alert_events_alert_id_alerts")),
        sa.PrimaryKeyConstraint("alert_id", "event_id", name=op.f("pk_alert_events")),
    )
    op.create_table(
        "alert_silences",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("rule", sa.String(48), nullable=True),
        sa.Column("matchers", sa.JSON(), nullable=False),
        _ts("starts_at", False),
        _ts("ends_at", False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        _ts("created_at", False),
        _ts("ended_at"),
        sa.Column("ended_by", sa.String(200), nullable=True),
        sa.CheckConstraint("kind IN ('silence', 'maintenance')", name=op.f("ck_alert_silences_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_silences")),
    )
    op.create_index(op.f("ix_alert_silences_ends_at"), "alert_silences", ["ends_at"])
    op.create_table(
        "alert_notifications",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(8), nullable=False),
        sa.Column("target", sa.String(254), nullable=False),
        sa.Column("contact", sa.String(64), nullable=True),
        sa.Column("language", sa.String(2), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("created_at", False),
        _ts("next_at", False),
        _ts("lease_until"),
        _ts("sent_at"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'sent', 'dead', 'cancelled')", name=op.f("ck_alert_notifications_state")
        ),
        sa.CheckConstraint("channel IN ('email', 'webhook', 'syslog')", name=op.f("ck_alert_notifications_channel")),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], name=op.f("fk_alert_notifications_alert_id_alerts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_notifications")),
        sa.UniqueConstraint(
            "alert_id",
            "kind",
            "epoch",
            "round",
            "step",
            "channel",
            "target",
            name=op.f("uq_alert_notifications_alert_id_kind_epoch_round_step_channel_target"),
        ),
    )
    op.create_index(op.f("ix_alert_notifications_state_next_at"), "alert_notifications", ["state", "next_at"])
    # An alert's history is read from the admin trail by its target ("alert:<id>").
    op.create_index(op.f("ix_admin_audit_target_at"), "admin_audit", ["target", "at"])
    top = op.get_bind().execute(sa.text("SELECT max(id) FROM events")).scalar()
    cursors = sa.table("projection_cursors", sa.column("name"), sa.column("position"), sa.column("updated_at"))
    letters = op.get_bind().execute(sa.text("SELECT max(id) FROM dead_letters")).scalar()
    op.bulk_insert(
        cursors,
        [
            {"name": "alerts", "position": int(top or 0), "updated_at": None},
            {"name": "alert_letters", "position": int(letters or 0), "updated_at": None},
        ],
    )


def downgrade() -> None:
    """Drop the alert tables and the cursor."""
    op.execute("DELETE FROM projection_cursors WHERE name IN ('alerts', 'alert_letters')")
    op.drop_index(op.f("ix_admin_audit_target_at"), table_name="admin_audit")
    op.drop_table("alert_notifications")
    op.drop_table("alert_silences")
    op.drop_table("alert_events")
    op.drop_table("alerts")
