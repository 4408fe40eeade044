"""Policy versions and issued commands: what the controller told the agents to enforce and to do.

Policy versions are numbered 1, 2, … with no gaps; a change based on an older version than the
newest is refused (PolicyVersionConflict) so that it cannot silently undo a newer one.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, func, insert, select

from sekisho.controller.store.audit import AdminAction, append_admin
from sekisho.controller.store.checkpoints import CheckpointRecords
from sekisho.controller.store.models import IssuedCommand, PolicyVersion
from sekisho.controller.store.record_log import log_rows
from sekisho.controller.store.records import aware_utc
from sekisho.protocol import mynumber, timefmt

_POLICY = cast(Table, PolicyVersion.__table__)
_COMMANDS = cast(Table, IssuedCommand.__table__)


class PolicyVersionConflict(Exception):
    """Another writer stored a policy version after the one a change was based on; re-read and retry."""


def insert_policy_version(
    conn: Connection,
    document: dict[str, Any],
    created_by: str,
    source_sha256: str,
    comment: str,
    when: datetime,
    base_version: int | None,
    *,
    above: int = 0,
) -> PolicyVersion:
    """Insert the next policy version inside the caller's transaction (which may write more with it).

    The number is one more than the newest stored, or than ``above`` if that is higher: a version agents
    already hold from before a restore (controller/policy/floor.py) must never be issued again.
    Raises mynumber.MyNumberFound if any field of the document, the comment or the author looks like a My
    Number: a policy version is signed into the agents' bundles, so it must never carry one.
    """
    mynumber.refuse_my_numbers(
        {"document": document, "comment": comment, "created_by": created_by}, "$", what="policy version"
    )
    # Two workers may pick the same number; the loser hits the primary key and retries.
    current = int(conn.execute(select(func.max(_POLICY.c.version))).scalar() or 0)
    if base_version is not None and current != base_version:
        # A document derived from an older version would silently undo the newer one (e.g. a loan).
        raise PolicyVersionConflict(f"policy version {current} was stored after version {base_version}")
    values = {
        "version": max(current, above) + 1,
        "created_at": when,
        "created_by": created_by,
        "source_sha256": source_sha256,
        "document": document,
        "comment": comment,
    }
    conn.execute(insert(_POLICY).values(**values))
    return PolicyVersion(**values)


class PolicyRecords(CheckpointRecords):
    """The ``policy_versions`` and ``issued_commands`` tables."""

    def add_policy_version(
        self,
        document: dict[str, Any],
        *,
        created_by: str,
        source_sha256: str,
        comment: str = "",
        created_at: datetime | None = None,
        base_version: int | None = None,
        above: int = 0,
        audit: AdminAction | None = None,
    ) -> PolicyVersion:
        """Store a new policy document as the next version number (above ``above``) and return it.

        With ``base_version`` (0: no version yet) raise PolicyVersionConflict unless it is still the newest.
        audit: the change's admin audit row, written in the same transaction (its ``new`` gains the version).
        """
        when = aware_utc(created_at or timefmt.now(), "created_at")
        if audit is not None:
            audit.checked(when)
            self._ensure_sealed()

        def work(conn: Connection) -> PolicyVersion:
            row = insert_policy_version(
                conn, document, created_by, source_sha256, comment, when, base_version, above=above
            )
            # Chained and sealed like the events (record_log.py): the version agents enforce cannot be edited unseen.
            log_rows(conn, self.signing_key, {"policy_versions": [row.version]})
            if audit is not None:
                new = {**(audit.new or {}), "version": row.version}
                append_admin(conn, self.signing_key, dataclasses.replace(audit, new=new), when)
            return row

        return self.write(work, retry_unique=True)

    def current_policy_version(self) -> PolicyVersion | None:
        """Return the newest policy version, or None if none was ever stored."""
        found = self.read(select(PolicyVersion).order_by(PolicyVersion.version.desc()).limit(1))
        return found[0] if found else None

    def get_policy_version(self, version: int) -> PolicyVersion | None:
        """Return one policy version by number."""
        found = self.read(select(PolicyVersion).where(PolicyVersion.version == version))
        return found[0] if found else None

    # --- commands ----------------------------------------------------------------------------------

    def add_issued_command(
        self,
        *,
        command_id: str,
        agent_id: str,
        name: str,
        args: dict[str, Any],
        issued_at: datetime,
        expires_at: datetime,
        nonce: str,
        audit: AdminAction | None = None,
    ) -> IssuedCommand:
        """Record a command sent to an agent; a reused nonce or id raises IntegrityError, a My Number MyNumberFound.

        audit: the admin audit row of the command (who sent it), written in the same transaction.
        """
        mynumber.refuse_my_numbers({"agent_id": agent_id, "name": name, "args": args}, "$", what="command")
        values = {
            "id": command_id,
            "agent_id": agent_id,
            "name": name,
            "args": args,
            "issued_at": aware_utc(issued_at, "issued_at"),
            "expires_at": aware_utc(expires_at, "expires_at"),
            "nonce": nonce,
        }
        issued = aware_utc(issued_at, "issued_at")
        if audit is not None:
            audit.checked(issued)  # refused before the transaction: nothing is written
            self._ensure_sealed()

        def work(conn: Connection) -> None:
            conn.execute(insert(_COMMANDS).values(**values))
            log_rows(conn, self.signing_key, {"issued_commands": [command_id]})
            if audit is not None:
                append_admin(conn, self.signing_key, audit, issued)

        self.write(work)
        return IssuedCommand(**values)
