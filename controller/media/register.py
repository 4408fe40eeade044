"""The media-loan register (貸出記録): loans, their log, overdue findings and the last sighting of each medium.

A loan change is a policy version too (the terminals enforce loans from their bundle), so the
register writes the version, the loan row and its log line in one store transaction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, insert, or_, select, update

from sekisho.controller.store.audit import AdminAction
from sekisho.controller.store.models import Event, Finding, LoanLogEntry, LoanRecord, PolicyVersion
from sekisho.controller.store.policy import PolicyVersionConflict, insert_policy_version
from sekisho.controller.store.record_log import log_rows
from sekisho.controller.store.records import aware_utc
from sekisho.controller.store.store import Store
from sekisho.protocol import mynumber, timefmt

MEDIA_LOAN_OVERDUE = "media_loan_overdue"
# Event types whose payload may name the registered medium seen (agents/usb adds "medium").
USB_SIGHTINGS = ("usb.allowed", "usb.blocked", "usb.inserted")

_FINDINGS = cast(Table, Finding.__table__)
_LOANS = cast(Table, LoanRecord.__table__)
_LOAN_LOG = cast(Table, LoanLogEntry.__table__)


class MediaRegister:
    """The ``media_loans`` and ``media_loan_log`` tables, written and read through the controller's store."""

    def __init__(self, store: Store) -> None:
        """Keep the register in this store's database, using its retried transactions."""
        self.store = store

    def add_loan_version(
        self,
        document: dict[str, Any],
        *,
        base_version: int,
        created_by: str,
        comment: str,
        log: dict[str, Any],
        new_loan: dict[str, Any] | None = None,
        end_loan: dict[str, Any] | None = None,
        at: datetime | None = None,
        audit: AdminAction | None = None,
    ) -> PolicyVersion:
        """Store a policy version with its loan register change and log line, all in one transaction.

        ``new_loan`` is a whole media_loans row (lend); ``end_loan`` the returned/revoked columns of the
        loan named in ``log`` (return, revoke: its open overdue finding is resolved too). ``audit`` is the
        admin audit row of the change, written in the same transaction (its detail gains the new version).
        """
        when = aware_utc(at or timefmt.now(), "at")
        # Backstop of MediaService's input check: nothing of a loan that looks like a My Number is stored.
        mynumber.refuse_my_numbers({"new_loan": new_loan, "end_loan": end_loan, "log": log}, what="media loan")
        loan_id = log["loan_id"]
        # No YAML file behind a loan version: its source digest is that of the document itself.
        digest = hashlib.sha256(json.dumps(document, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

        def work(conn: Connection) -> PolicyVersion:
            row = insert_policy_version(conn, document, created_by, digest, comment, when, base_version)
            if new_loan is not None:
                values = {**new_loan, "created_at": when, "lent_version": row.version, "created_by": log["actor"]}
                conn.execute(insert(_LOANS).values(**values))
            if end_loan is not None:
                done = conn.execute(
                    update(_LOANS)
                    .where(_LOANS.c.id == loan_id, _LOANS.c.returned_at.is_(None), _LOANS.c.revoked_at.is_(None))
                    .values(**end_loan, ended_version=row.version)
                )
                if done.rowcount != 1:
                    raise PolicyVersionConflict(f"loan {loan_id!r} was ended by someone else meanwhile")
                finding_id = conn.execute(
                    select(_LOANS.c.overdue_finding_id).where(_LOANS.c.id == loan_id)
                ).scalar_one()
                if finding_id is not None:
                    conn.execute(
                        update(_FINDINGS)
                        .where(_FINDINGS.c.id == finding_id, _FINDINGS.c.resolved_at.is_(None))
                        .values(resolved_at=when, resolution=f"{log['action']} by {log['actor']}")
                    )
            line = conn.execute(
                insert(_LOAN_LOG).values(**log, at=when, version=row.version).returning(_LOAN_LOG.c.id)
            ).scalar_one()
            # The version, the loan's new state and its log line, chained and sealed in this transaction.
            changed = {"policy_versions": [row.version], "media_loans": [loan_id], "media_loan_log": [line]}
            log_rows(conn, self.store.signing_key, changed)
            if audit is not None:
                detail = {**(audit.detail or {}), "policy_version": row.version}
                self.store.append_admin_in(conn, dataclasses.replace(audit, detail=detail), when)
            return row

        return self.store.write(work)

    def get_loan(self, loan_id: str) -> LoanRecord | None:
        """Return one loan of the register."""
        found = self.store.read(select(LoanRecord).where(LoanRecord.id == loan_id))
        return found[0] if found else None

    def list_loans(
        self,
        *,
        medium: str | None = None,
        person: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        outstanding: bool | None = None,
        id_prefix: str | None = None,
    ) -> list[LoanRecord]:
        """Return loans by start time; since/until select loans whose window overlaps [since, until)."""
        stmt = select(LoanRecord).order_by(LoanRecord.starts_at, LoanRecord.id)
        if medium is not None:
            stmt = stmt.where(LoanRecord.medium == medium)
        if person is not None:
            stmt = stmt.where(LoanRecord.person == person)
        if since is not None:
            stmt = stmt.where(LoanRecord.ends_at > aware_utc(since, "since"))
        if until is not None:
            stmt = stmt.where(LoanRecord.starts_at < aware_utc(until, "until"))
        ended = or_(LoanRecord.returned_at.is_not(None), LoanRecord.revoked_at.is_not(None))
        if outstanding is True:
            stmt = stmt.where(~ended)
        elif outstanding is False:
            stmt = stmt.where(ended)
        if id_prefix is not None:
            stmt = stmt.where(LoanRecord.id.startswith(id_prefix, autoescape=True))
        return self.store.read(stmt)

    def list_loan_log(
        self, *, loan_id: str | None = None, medium: str | None = None, person: str | None = None
    ) -> list[LoanLogEntry]:
        """Return loan log lines in the order they were written."""
        stmt = select(LoanLogEntry).order_by(LoanLogEntry.id)
        if loan_id is not None:
            stmt = stmt.where(LoanLogEntry.loan_id == loan_id)
        if medium is not None:
            stmt = stmt.where(LoanLogEntry.medium == medium)
        if person is not None:
            stmt = stmt.where(LoanLogEntry.person == person)
        return self.store.read(stmt)

    def open_overdue_finding(
        self, loan_id: str, *, agent_id: str, detail: dict[str, Any], at: datetime | None = None
    ) -> int | None:
        """Raise the overdue finding of a loan once; return its id, or None if it exists or the loan ended."""
        when = aware_utc(at or timefmt.now(), "at")

        def work(conn: Connection) -> int | None:
            # The loan row lock (PostgreSQL; SQLite's writer lock) lets only one worker raise it.
            row = conn.execute(
                select(_LOANS.c.overdue_finding_id, _LOANS.c.returned_at, _LOANS.c.revoked_at)
                .where(_LOANS.c.id == loan_id)
                .with_for_update()
            ).first()
            if row is None or row.overdue_finding_id is not None or row.returned_at or row.revoked_at:
                return None
            finding_id = conn.execute(
                insert(_FINDINGS)
                .values(kind=MEDIA_LOAN_OVERDUE, agent_id=agent_id, detail=detail, created_at=when)
                .returning(_FINDINGS.c.id)
            ).scalar_one()
            conn.execute(update(_LOANS).where(_LOANS.c.id == loan_id).values(overdue_finding_id=finding_id))
            return int(finding_id)

        return self.store.write(work)

    def last_medium_sighting(self, medium_id: str) -> Event | None:
        """Return the newest stored USB event whose payload names this registered medium."""
        stmt = (
            select(Event)
            .where(Event.type.in_(USB_SIGHTINGS), Event.payload["medium"].as_string() == medium_id)
            .order_by(Event.occurred_at.desc(), Event.id.desc())
            .limit(1)
        )
        found = self.store.read(stmt)
        return found[0] if found else None
