"""PostgreSQL statistics tying an event's agent to the terminal its payload names (login history by terminal).

The login history filtered by terminal asks for ``agent_id IN (the terminal's agents)`` and ``payload ->> 'terminal'
= the terminal``. The two always go together, but the planner multiplies their selectivities as if they were
independent and, with no statistics on the JSON expression at all, expects about 70 rows where a terminal has tens
of thousands. It then preferred reading every login event of the agent through a bitmap and sorting them to
walking the agent's index backwards and stopping after one page: 2.9 s instead of 0.4 ms at 8.6 million events
(docs/benchmarks.md). Extended statistics on the pair (dependencies and most common values) give it the real
count. SQLite needs nothing: its plan already walks the agent's index.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger(__name__)

STATISTICS = "st_events_agent_terminal"
# Expressions in extended statistics came with PostgreSQL 14.
MINIMUM = (14,)


def upgrade() -> None:
    """Create the statistics on PostgreSQL 14 or newer and gather them (ANALYZE samples, it does not read all)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    version = bind.dialect.server_version_info or (0,)
    if tuple(version[:1]) < MINIMUM:
        log.warning("PostgreSQL %s: no statistics on expressions; login history by terminal may be slow", version)
        return
    op.execute(
        f"CREATE STATISTICS IF NOT EXISTS {STATISTICS} (dependencies, mcv) "
        "ON agent_id, (payload ->> 'terminal') FROM events"
    )
    op.execute("ANALYZE events")


def downgrade() -> None:
    """Drop the statistics."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP STATISTICS IF EXISTS {STATISTICS}")
