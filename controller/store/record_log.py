"""The record log: policy versions, issued commands and media loans chained and sealed like the events (issue 14).

Each tracked table is one stream of ``record_log``. A write that inserts or changes a tracked row appends,
in the same transaction, the row's key and the digest of its new content (``op`` insert or update), chained
per stream (``hash = sha256(prev_hash + "\\n" + canonical(entry))``), then a signed checkpoint of kind
``records`` naming the stream's new head. So a row's history is the chain of its digests, and its current
content must match the last one: `records verify` walks each stream against its signed head and then holds
every row of the table against its last logged digest, naming a row edited, inserted or deleted directly in
the database.

The log keeps digests, not copies: it proves a row changed, not what it said before (the admin trail's old
→ new does that for the changes people made). Media loans mutate (returned, revoked): each change is one
more entry for the loan, which is the "append-only log of transitions" the loans' own table is not.

Rows that existed before revision 0016 are sealed once as they stand (``op`` seal, and one checkpoint of
kind ``records_seal``), or with genesis on a new database: by the first controller start or the first write
to a tracked table, whichever comes first. Like genesis, a change made before then is sealed with them.

Not tracked (yet): findings. They are raised and updated by a dozen writers across ingest, the registers
and the alert conditions, most of them without the signing key at hand; see docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Column, Connection, Table, insert, select

from sekisho.controller.store.chain import ChainProblem, SignedHead
from sekisho.controller.store.checkpoints import (
    RECORDS,
    RECORDS_SEAL,
    CheckpointRecords,
    append,
    head_fields,
    lock_log,
    seal_existing,
)
from sekisho.controller.store.models import (
    ZERO_HASH,
    IssuedCommand,
    LoanLogEntry,
    LoanRecord,
    PolicyVersion,
    RecordLogEntry,
)
from sekisho.protocol import timefmt

log = logging.getLogger(__name__)

_LOG = cast(Table, RecordLogEntry.__table__)
_WALK_BATCH = 1000
# Frozen like the other chains' encoders: the bytes hashed must never change. ASCII-escaped so any text hashes
# the same whatever the database's encoding gives back.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Tracked:
    """A table the record log covers: its stream name, table, key column and the columns left out of the digest."""

    stream: str
    table: Table
    key: str
    # Derived links rewritten by writers without the signing key (a loan's overdue finding id): not the record.
    left_out: tuple[str, ...] = ()

    def columns(self) -> list[Column[Any]]:
        """Return the columns the digest covers."""
        return [c for c in self.table.columns if c.name not in self.left_out]


TRACKED = (
    Tracked("policy_versions", cast(Table, PolicyVersion.__table__), "version"),
    Tracked("issued_commands", cast(Table, IssuedCommand.__table__), "id"),
    Tracked("media_loans", cast(Table, LoanRecord.__table__), "id", ("overdue_finding_id",)),
    Tracked("media_loan_log", cast(Table, LoanLogEntry.__table__), "id"),
)
BY_STREAM = {t.stream: t for t in TRACKED}


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return timefmt.fmt(value)
    return value


def row_digest(tracked: Tracked, row: Any) -> str:
    """Return the digest of a tracked row's content (every column but those left out), as the log keeps it."""
    columns = row._mapping
    content = {c.name: _value(columns[c.name]) for c in tracked.columns()}
    return hashlib.sha256(_ENCODER.encode(content).encode()).hexdigest()


def entry_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    """Return the chain hash of one record log entry after prev_hash."""
    record = {
        "stream": entry["stream"],
        "chain_index": entry["chain_index"],
        "row_key": entry["row_key"],
        "op": entry["op"],
        "digest": entry["digest"],
        "at": timefmt.fmt(entry["at"]),
    }
    return hashlib.sha256(prev_hash.encode() + b"\n" + _ENCODER.encode(record).encode()).hexdigest()


def stream_head(conn: Connection, stream: str) -> tuple[int, str]:
    """Return a record stream's length and head hash as stored."""
    last = conn.execute(
        select(_LOG.c.chain_index, _LOG.c.hash)
        .where(_LOG.c.stream == stream)
        .order_by(_LOG.c.chain_index.desc())
        .limit(1)
    ).first()
    return (0, ZERO_HASH) if last is None else (int(last.chain_index), str(last.hash))


def _append(conn: Connection, tracked: Tracked, rows: Iterable[tuple[str, str, str]], at: datetime) -> dict[str, Any]:
    """Append (key, op, digest) entries to one stream; return its new head as a checkpoint holds it."""
    length, head = stream_head(conn, tracked.stream)
    entries = []
    for key, op, digest in rows:
        length += 1
        entry = {"stream": tracked.stream, "chain_index": length, "row_key": key, "op": op, "digest": digest, "at": at}
        entry["prev_hash"] = head
        head = entry["hash"] = entry_hash(head, entry)
        entries.append(entry)
    if entries:
        conn.execute(insert(_LOG), entries)
    return head_fields(length, head)


def _needs_seal(conn: Connection) -> bool:
    # Sealed already (or nothing was ever written): the log has entries. Only an upgraded database has tracked
    # rows and an empty log.
    if conn.execute(select(_LOG.c.id).limit(1)).first() is not None:
        return False
    return any(conn.execute(select(t.table.c[t.key]).limit(1)).first() is not None for t in TRACKED)


def seal_fields(conn: Connection, at: datetime) -> dict[str, Any] | None:
    """Seal every tracked row as it stands (the upgrade), if not done yet; return the heads for a checkpoint."""
    if not _needs_seal(conn):
        return None
    heads = {}
    for tracked in TRACKED:
        rows = conn.execute(select(*tracked.table.columns).order_by(tracked.table.c[tracked.key])).all()
        entries = [(str(row._mapping[tracked.key]), "seal", row_digest(tracked, row)) for row in rows]
        heads[tracked.stream] = _append(conn, tracked, entries, at)
    return heads


def seal_records(conn: Connection, signer: Ed25519PrivateKey | None) -> int | None:
    """Seal the rows an upgrade found (once) with a checkpoint of kind records_seal; return its number if written."""
    lock_log(conn)
    now = timefmt.now()
    heads = seal_fields(conn, now)
    if heads is None:
        return None
    return append(conn, signer, RECORDS_SEAL, {RECORDS: heads}, now)


def log_rows(conn: Connection, signer: Ed25519PrivateKey | None, changed: dict[str, list[Any]]) -> int:
    """Log the current content of tracked rows just written ({stream: keys}), and one signed checkpoint for them.

    Call it in the write's own transaction, after the rows are written (it takes the checkpoint log's lock).
    Returns the checkpoint's number.
    """
    lock_log(conn)
    # The log must begin with genesis (a new database written by a tool before any controller start), and a
    # database upgraded to 0016 has its older rows sealed before the first new one is logged.
    seal_existing(conn, signer)
    seal_records(conn, signer)
    now = timefmt.now()
    heads = {}
    for stream, keys in changed.items():
        tracked = BY_STREAM[stream]
        wanted = [str(k) for k in keys]
        rows = conn.execute(select(*tracked.table.columns).where(tracked.table.c[tracked.key].in_(keys))).all()
        found = {str(row._mapping[tracked.key]): row for row in rows}
        logged = set(
            conn.execute(select(_LOG.c.row_key).where(_LOG.c.stream == stream, _LOG.c.row_key.in_(wanted))).scalars()
        )
        entries = [
            (key, "update" if key in logged else "insert", row_digest(tracked, found[key]))
            for key in wanted
            if key in found
        ]
        heads[stream] = _append(conn, tracked, entries, now)
    return append(conn, signer, RECORDS, {RECORDS: heads}, now)


class RecordLogRecords(CheckpointRecords):
    """Seals the rows an upgrade to 0016 found when the checkpoint log is sealed (controller start, first write)."""

    def seal_existing(self) -> int | None:
        """Seal the state as genesis if the log is empty, then the tracked rows if not yet (CheckpointRecords)."""
        number = super().seal_existing()
        sealed = self.write(lambda conn: seal_records(conn, self.signing_key), retry_unique=True)
        if sealed is not None:
            # Trust on first use, as genesis: said once, so an operator can tell it from a later re-seal.
            log.warning("record log begun: policy versions, commands and loans as they stand sealed as #%d", sealed)
        return number


def _problem(stream: str, index: int | None, key: str | None, text: str) -> ChainProblem:
    # agent_id holds the stream (the table), event_id the row's key.
    return ChainProblem(stream, index, None, key, None, text, "record_log")


def verify_stream(conn: Connection, tracked: Tracked, signed: SignedHead | None) -> tuple[list[ChainProblem], int]:
    """Walk one record stream against its signed head, then hold the table's rows against it; return problems, rows."""
    stream = tracked.stream
    last: dict[str, str] = {}
    expected, prev_hash = 1, ZERO_HASH
    result = conn.execute(
        select(_LOG).where(_LOG.c.stream == stream).order_by(_LOG.c.chain_index),
        execution_options={"yield_per": _WALK_BATCH},
    )
    try:
        for entry in result:
            text = None
            if entry.chain_index > expected:
                text = f"record log entries missing before chain index {entry.chain_index}: deleted"
            elif entry.chain_index < expected or entry.prev_hash != prev_hash:
                text = "record log entry inserted/reordered"
            elif entry_hash(prev_hash, dict(entry._mapping)) != entry.hash:
                text = "hash mismatch: record log entry edited"
            if text is not None:
                # Nothing after a broken link is trusted, so the rows are not held against it.
                return [_problem(stream, entry.chain_index, entry.row_key, text)], 0
            last[entry.row_key] = entry.digest
            expected, prev_hash = expected + 1, entry.hash
    finally:
        result.close()
    walked = expected - 1
    text = None
    at = walked + 1
    if signed is None:
        if walked:
            at, text = 1, f"{walked} record log entr(ies) not covered by any signed checkpoint: inserted"
    elif walked < signed.length:
        text = (
            f"last record log entr(ies) deleted: the chain ends at index {walked}, signed checkpoint "
            f"#{signed.checkpoint} has {signed.length}"
        )
    elif walked > signed.length:
        at, text = signed.length + 1, f"record log entr(ies) beyond signed checkpoint #{signed.checkpoint}: inserted"
    elif prev_hash != signed.head:
        at, text = walked, f"head differs from signed checkpoint #{signed.checkpoint}: record log rewritten"
    if text is not None:
        return [_problem(stream, at, None, text)], 0
    problems: list[ChainProblem] = []
    seen: set[str] = set()
    rows = conn.execute(
        select(*tracked.table.columns).order_by(tracked.table.c[tracked.key]),
        execution_options={"yield_per": _WALK_BATCH},
    )
    count = 0
    try:
        for row in rows:
            count += 1
            key = str(row._mapping[tracked.key])
            seen.add(key)
            digest = last.get(key)
            if digest is None:
                problems.append(_problem(stream, None, key, f"{stream} {key}: not in the record log: row inserted"))
            elif digest != row_digest(tracked, row):
                problems.append(
                    _problem(stream, None, key, f"{stream} {key}: differs from its last logged state: row edited")
                )
    finally:
        rows.close()
    for key in sorted(set(last) - seen):
        problems.append(_problem(stream, None, key, f"{stream} {key}: in the record log but missing: row deleted"))
    return problems, count
