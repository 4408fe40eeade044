"""Findings: what the controller noticed and raised for people to look at (sequence gaps, overdue loans…).

Each kind is raised by the code that notices it (ingest: sequence gaps and facts from a non-owner; the
media register and the door registers: overdue loans). This module reads them back, and raises the
grouped kinds (one open finding per kind and agent, counting repeats) through note_finding.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, Table, insert, select, update

from sekisho.controller.store.models import Finding
from sekisho.controller.store.records import Records
from sekisho.protocol import timefmt

_FINDINGS = cast(Table, Finding.__table__)


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

    def note_finding(self, kind: str, agent_id: str, seq: int | None, detail: dict[str, Any]) -> int:
        """Raise a finding of one kind for an agent, or count one more occurrence on the open one; return its id.

        Repeats are grouped (one open finding per kind and agent, with a count and the latest detail), so an
        agent that keeps sending the same refused fact cannot bury the others under findings.
        """

        return self.write(lambda conn: note_finding(conn, kind, agent_id, seq, detail))

    def resolve_findings(self, kind: str, agent_id: str, resolution: str) -> int:
        """Resolve the open findings of one kind for an agent (its condition has cleared); return how many."""
        f = _FINDINGS.c

        def resolve(conn: Connection) -> int:
            result = conn.execute(
                update(_FINDINGS)
                .where(f.kind == kind, f.agent_id == agent_id, f.resolved_at.is_(None))
                .values(resolved_at=timefmt.now(), resolution=resolution)
            )
            return int(result.rowcount or 0)

        return self.write(resolve)


def note_finding(conn: Connection, kind: str, agent_id: str, seq: int | None, detail: dict[str, Any]) -> int:
    """FindingRecords.note_finding inside the caller's transaction (ingest raises findings with its batch)."""
    f = _FINDINGS.c
    row = conn.execute(
        select(f.id, f.detail, f.first_seq, f.last_seq)
        .where(f.kind == kind, f.agent_id == agent_id, f.resolved_at.is_(None))
        .order_by(f.id)
        .limit(1)
    ).first()
    now = timefmt.now()
    if row is None:
        values = {**detail, "count": 1, "last_at": timefmt.fmt(now)}
        inserted = conn.execute(
            insert(_FINDINGS)
            .values(kind=kind, agent_id=agent_id, first_seq=seq, last_seq=seq, detail=values, created_at=now)
            .returning(f.id)
        ).scalar_one()
        return int(inserted)
    count = int(dict(row.detail).get("count", 1)) + 1
    seqs = [s for s in (row.first_seq, row.last_seq, seq) if s is not None]
    conn.execute(
        update(_FINDINGS)
        .where(f.id == row.id)
        .values(
            detail={**detail, "count": count, "last_at": timefmt.fmt(now)},
            first_seq=min(seqs) if seqs else None,
            last_seq=max(seqs) if seqs else None,
        )
    )
    return int(row.id)
