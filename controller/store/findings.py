"""Findings: what the controller noticed and raised for people to look at (sequence gaps, overdue loans…).

Each kind is raised by the code that notices it (ingest: sequence gaps; the media register and the
door registers: overdue loans); this module only reads them back.
"""

from __future__ import annotations

from sqlalchemy import select

from sekisho.controller.store.models import Finding
from sekisho.controller.store.records import Records


class FindingRecords(Records):
    """The ``findings`` table, read by kind, agent and whether still open."""

    def list_findings(
        self, open_only: bool = False, *, kind: str | None = None, agent_id: str | None = None
    ) -> list[Finding]:
        """Return findings in id order, optionally only unresolved ones, of one kind or agent."""
        stmt = select(Finding).order_by(Finding.id)
        if open_only:
            stmt = stmt.where(Finding.resolved_at.is_(None))
        if kind is not None:
            stmt = stmt.where(Finding.kind == kind)
        if agent_id is not None:
            stmt = stmt.where(Finding.agent_id == agent_id)
        return self.read(stmt)
