"""The admin audit trail: every admin change, export and remote command, hash-chained and sealed (issue 12).

Each row says who (``actor``: "user:<login>", "token:<login>/<name>", "cli:<os-user>@<host>" or "system"),
through what (``via``: web, api, cli, system), from where (``client``), what (``action``, a dotted name such
as ``media.loan.create``), on what (``target``) and how it changed (``old`` → ``new``, ``detail``).

The rows form one hash chain, like the dead letters (chain.py): a row's hash covers the previous hash and
the canonical JSON of every column but its id. Every append also appends a signed checkpoint of kind
``admin`` naming the trail's new head (checkpoints.py), so `records verify` holds the trail against the
controller-signed log and names a row edited, deleted or inserted directly in the database.

A row is written in the caller's transaction where the change itself is a store write (``append_admin``
with the caller's connection, or ``audit=`` on the store methods that take one), so the change and its
audit row commit together or not at all; ``AuditRecords.record_admin`` is the standalone variant for
changes that are not (a command published over MQTT, a restore, a policy published by another service).

No value of an audit row may look like a My Number: ``AdminAction.checked`` refuses the whole row (nothing
is written) and callers check their free-text inputs first with ``refuse_free_text`` for a clearer word.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, insert, select

from sekisho.controller.store.chain import ChainProblem, SignedHead
from sekisho.controller.store.checkpoints import (
    ADMIN,
    CheckpointRecords,
    append,
    head_fields,
    lock_log,
    seal_existing,
)
from sekisho.controller.store.models import ZERO_HASH, AdminAuditEntry
from sekisho.controller.store.records import aware_utc
from sekisho.protocol import mynumber, timefmt

VIAS = ("web", "api", "cli", "system")
ACTION_PATTERN = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
MAX_ACTOR = 200
MAX_ACTION = 64
MAX_CLIENT = 64
MAX_TARGET = 1000
# old + new + detail as canonical JSON: an audit row records a change, not a document store.
MAX_JSON = 256 * 1024

_AUDIT = cast(Table, AdminAuditEntry.__table__)
_WALK_BATCH = 1000
# Frozen like the dead letters' encoder: the bytes hashed must never change. ASCII-escaped so any text
# (Japanese names, reasons) hashes the same whatever the database's encoding gives back.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class AuditRefused(ValueError):
    """An audit row that cannot be written as given (malformed actor, action, oversize values); nothing written."""


def refuse_free_text(what: str, **fields: Any) -> None:
    """Raise MyNumberFound naming each admin input field that looks like a My Number (values never shown).

    Callers run it on their free-text inputs (a loan's purpose, a command's reason, a token's name…) before
    anything is stored, so the operator reads which field was refused.
    """
    found = [f"{name}{path[1:]}" for name, value in fields.items() for path in mynumber.find_my_numbers(value)]
    if found:
        raise mynumber.MyNumberFound(found, what)


def _jsonable(value: Any, where: str) -> Any:
    """Return value as the JSON the database gives back (datetimes as text, tuples as lists, keys as text)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return timefmt.fmt(aware_utc(obj, where))
        if isinstance(obj, set | frozenset):
            return sorted(obj, key=str)
        raise AuditRefused(f"{where}: {type(obj).__name__} is not JSON")

    try:
        text = json.dumps(value, default=default, allow_nan=False, ensure_ascii=False)
    except ValueError as err:
        if isinstance(err, AuditRefused):
            raise
        raise AuditRefused(f"{where}: not JSON ({err})") from err
    return json.loads(text)


@dataclass(frozen=True, slots=True)
class AdminAction:
    """One admin action to record: who, through what, from where, what, on what, old → new, detail."""

    actor: str
    via: str
    action: str
    target: str
    client: str | None = None
    old: Any = None
    new: Any = None
    detail: Any = None

    def checked(self, at: datetime) -> dict[str, Any]:
        """Return the row's columns (without chain), or raise AuditRefused / MyNumberFound; nothing is written."""
        if not self.actor or len(self.actor) > MAX_ACTOR or not self.actor.isprintable():
            raise AuditRefused(f"actor: 1–{MAX_ACTOR} printable characters needed")
        if self.via not in VIAS:
            raise AuditRefused(f"via: one of {', '.join(VIAS)}, not {self.via!r}")
        if len(self.action) > MAX_ACTION or not ACTION_PATTERN.fullmatch(self.action):
            raise AuditRefused(f"action: a dotted lower-case name such as media.loan.create, not {self.action!r}")
        if len(self.target) > MAX_TARGET or not self.target.isprintable():
            raise AuditRefused(f"target: up to {MAX_TARGET} printable characters")
        if self.client is not None and (len(self.client) > MAX_CLIENT or not self.client.isprintable()):
            raise AuditRefused(f"client: up to {MAX_CLIENT} printable characters")
        values = {
            "old": _jsonable(self.old, "old"),
            "new": _jsonable(self.new, "new"),
            "detail": _jsonable(self.detail, "detail"),
        }
        if len(_ENCODER.encode(values)) > MAX_JSON:
            raise AuditRefused(f"old, new and detail together exceed {MAX_JSON // 1024} KiB")
        # The whole row, actor and target included: an audit trail is kept for years and read by many.
        mynumber.refuse_my_numbers(
            {"actor": self.actor, "client": self.client, "target": self.target, **values},
            what="admin audit",
        )
        return {
            "at": aware_utc(at, "at"),
            "actor": self.actor,
            "via": self.via,
            "client": self.client,
            "action": self.action,
            "target": self.target,
            **values,
        }


@dataclass(frozen=True, slots=True)
class Operator:
    """Who is making a change and from where: derived at the edges (CLI: OS user and host; API: the token)."""

    actor: str
    via: str
    client: str | None = None

    def action(self, action: str, target: str, *, old: Any = None, new: Any = None, detail: Any = None) -> AdminAction:
        """Return the audit row this operator's action makes."""
        return AdminAction(self.actor, self.via, action, target, self.client, old, new, detail)


# Changes the controller makes by itself (scheduled jobs) and those of callers that name no operator.
SYSTEM = Operator("system", "system")


def admin_hash(prev_hash: str, row: Any) -> str:
    """Return the chain hash of one admin audit row (a mapping of its columns, a result row or a model)."""
    if isinstance(row, dict):
        columns = row
    elif hasattr(row, "_mapping"):
        columns = row._mapping
    else:
        columns = {name: getattr(row, name) for name in _AUDIT.columns.keys()}  # noqa: SIM118 (column names)
    record = {
        "chain_index": columns["chain_index"],
        "at": timefmt.fmt(columns["at"]),
        "actor": columns["actor"],
        "via": columns["via"],
        "client": columns["client"],
        "action": columns["action"],
        "target": columns["target"],
        "old": columns["old"],
        "new": columns["new"],
        "detail": columns["detail"],
    }
    body = _ENCODER.encode(record).encode()
    return hashlib.sha256(prev_hash.encode() + b"\n" + body).hexdigest()


def trail_head(conn: Connection) -> tuple[int, str]:
    """Return the admin trail's length and head hash as stored."""
    last = conn.execute(
        select(_AUDIT.c.chain_index, _AUDIT.c.hash).order_by(_AUDIT.c.chain_index.desc()).limit(1)
    ).first()
    return (0, ZERO_HASH) if last is None else (int(last.chain_index), str(last.hash))


def append_admin(conn: Connection, signer: Any, entry: AdminAction, at: datetime | None = None) -> int:
    """Append one audit row and the signed checkpoint sealing it, in the caller's transaction; return its id.

    Call it last in a write transaction (it takes the checkpoint log's lock), after the change it records:
    if the row is refused the exception rolls the change back with it. The checkpoint log must have begun
    (``seal_existing``); AuditRecords makes sure of that.
    """
    when = at or timefmt.now()
    row = entry.checked(when)
    lock_log(conn)
    length, head = trail_head(conn)
    row["chain_index"] = length + 1
    row["prev_hash"] = head
    row["hash"] = admin_hash(head, row)
    row_id = conn.execute(insert(_AUDIT).values(**row).returning(_AUDIT.c.id)).scalar_one()
    append(conn, signer, ADMIN, {ADMIN: head_fields(length + 1, row["hash"])}, when)
    return int(row_id)


def verify_admin(conn: Connection, signed: SignedHead | None) -> tuple[ChainProblem | None, int]:
    """Walk the admin trail's chain; return its first problem (None if intact) and its length."""
    query = select(*_AUDIT.columns).order_by(_AUDIT.c.chain_index)
    expected_index = 1
    prev_hash = ZERO_HASH
    result = conn.execute(query, execution_options={"yield_per": _WALK_BATCH})

    def problem_at(row: Any, text: str) -> ChainProblem:
        return ChainProblem(row.actor, row.chain_index, None, row.action, row.id, text, "admin_audit")

    try:
        for row in result:
            if row.chain_index > expected_index:
                return problem_at(row, f"missing admin record(s) before chain index {row.chain_index}: deleted"), 0
            if row.chain_index < expected_index or row.prev_hash != prev_hash:
                return problem_at(row, "admin record inserted/reordered"), 0
            if admin_hash(prev_hash, row) != row.hash:
                return problem_at(row, "hash mismatch: admin record edited"), 0
            expected_index += 1
            prev_hash = row.hash
    finally:
        result.close()
    walked = expected_index - 1
    # The chain index named is the first row the problem is about (the first missing, inserted or replaced).
    at, text = walked + 1, None
    if signed is None:
        if walked:
            at, text = 1, f"{walked} admin record(s) not covered by any signed checkpoint: admin records inserted"
    elif walked < signed.length:
        text = (
            f"last admin record(s) deleted: the chain ends at index {walked}, signed checkpoint "
            f"#{signed.checkpoint} has {signed.length} (chain index {walked + 1}–{signed.length} missing)"
        )
    elif walked > signed.length:
        at, text = (
            signed.length + 1,
            (
                f"admin record(s) beyond the last signed checkpoint #{signed.checkpoint} (it has {signed.length}): "
                "admin records inserted"
            ),
        )
    elif prev_hash != signed.head:
        at, text = (
            walked,
            f"head differs from signed checkpoint #{signed.checkpoint}: admin records replaced and rehashed",
        )
    if text is not None:
        return ChainProblem(None, at, None, None, None, text, "admin_audit"), 0
    return None, walked


class AuditRecords(CheckpointRecords):
    """The ``admin_audit`` table: record admin actions (in a caller's transaction or alone) and read them."""

    def record_admin(
        self,
        actor: str,
        via: str,
        client: str | None,
        action: str,
        target: str,
        old: Any = None,
        new: Any = None,
        detail: Any = None,
        *,
        conn: Connection | None = None,
        at: datetime | None = None,
    ) -> int:
        """Record one admin action; return its row id. With conn, inside that (the change's) transaction.

        Raises AuditRefused or MyNumberFound (a ValueError) before anything is written.
        """
        entry = AdminAction(actor, via, action, target, client, old, new, detail)
        entry.checked(at or timefmt.now())  # refuse before opening any transaction
        if conn is not None:
            return self.append_admin_in(conn, entry, at)
        self._ensure_sealed()
        return self.write(lambda c: append_admin(c, self.signing_key, entry, at))

    def append_admin_in(self, conn: Connection, entry: AdminAction, at: datetime | None = None) -> int:
        """Append an audit row inside the caller's write transaction (the change and its row commit together)."""
        if not self._sealed:
            # The log must begin with genesis before any other entry; in this same transaction if need be.
            seal_existing(conn, self.signing_key)
        return append_admin(conn, self.signing_key, entry, at)

    def record_export(
        self,
        actor: str,
        via: str,
        client: str | None,
        *,
        register: str,
        format: str,
        filters: dict[str, Any],
        rows: int,
        verification: str | None = None,
    ) -> int:
        """Record that someone exported a register or timeline (action ``export.<format>``); return the row id."""
        if not re.fullmatch(r"[a-z][a-z0-9_]*", format):
            raise AuditRefused(f"format: a lower-case name such as csv or pdf, not {format!r}")
        detail = {"filters": filters, "rows": rows, "verification": verification}
        return self.record_admin(actor, via, client, f"export.{format}", register, detail=detail)

    def list_admin(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> list[AdminAuditEntry]:
        """Return audit rows in the order written; until is exclusive; actor/action ending in "*" match a prefix."""
        if limit < 1:
            raise ValueError("limit must be positive")
        stmt = select(AdminAuditEntry).order_by(AdminAuditEntry.chain_index).limit(limit)
        if since is not None:
            stmt = stmt.where(AdminAuditEntry.at >= aware_utc(since, "since"))
        if until is not None:
            stmt = stmt.where(AdminAuditEntry.at < aware_utc(until, "until"))
        for column, value in ((AdminAuditEntry.actor, actor), (AdminAuditEntry.action, action)):
            if value is None:
                continue
            if value.endswith("*"):
                stmt = stmt.where(column.startswith(value[:-1], autoescape=True))
            else:
                stmt = stmt.where(column == value)
        if target is not None:
            stmt = stmt.where(AdminAuditEntry.target == target)
        if after_id is not None:
            stmt = stmt.where(AdminAuditEntry.id > after_id)
        return self.read(stmt)
