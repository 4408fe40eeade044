"""The controller-signed checkpoint log: what `records verify` holds every chain and key line against.

Every write that changes what verify checks appends one entry in its own transaction: an ingest batch
(the heads of the streams it advanced and of the dead-letter chain), a line of an agent's key history,
an admin audit row (the admin trail's new head, audit.py), and, once, a genesis entry with the whole
state as it was when the log began (a database upgraded from before the log existed is sealed as it
stands then). Entries form one hash chain (entry n holds
the hash of entry n - 1) and each is signed with the controller's Ed25519 signing key, which the
database does not hold.

So someone who can write the database but has not got that key can still delete records and rewind
`streams`, or delete a whole stream, or swap a key in `agents`, but cannot make a signed entry that
agrees: verify finds what is missing. What the log cannot show is itself cut back to an earlier entry
together with everything recorded after it (the database restored to an older state, or rolled back
by hand consistently); heads kept outside the database are the answer to that (receipts.py), not this log.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Table, func, insert, select, text, update

from sekisho.controller.store.chain import ChainProblem, SignedHead
from sekisho.controller.store.models import ZERO_HASH, AdminAuditEntry, AgentKey, Checkpoint, DeadLetter, Stream
from sekisho.controller.store.records import Records
from sekisho.protocol import errors, signing, timefmt
from sekisho.protocol.canonical import canonical_bytes

GENESIS = "genesis"
INGEST = "ingest"
AGENT_KEY = "agent_key"
ADMIN = "admin"  # an admin audit row appended (audit.py): the body names the trail's new head
RECORDS = "records"  # tracked rows written (record_log.py): the body names the record streams' new heads
RECORDS_SEAL = "records_seal"  # the tracked rows an upgrade to 0016 found, sealed once as they stood
FORMAT = 1

# Any constant works, as long as every controller worker uses the same one (db.py has the migration's).
_LOG_LOCK_KEY = 0x5E_C1_5E_0002
_WALK_BATCH = 1000
# Frozen like the record encoder in chain.py: the bytes hashed and signed must never change.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)

_CHECKPOINTS = cast(Table, Checkpoint.__table__)
_AGENT_KEYS = cast(Table, AgentKey.__table__)
_STREAMS = cast(Table, Stream.__table__)
_DEAD_LETTERS = cast(Table, DeadLetter.__table__)
_ADMIN_AUDIT = cast(Table, AdminAuditEntry.__table__)


def lock_log(conn: Connection) -> None:
    """Serialise appends to the log until the transaction ends (SQLite: BEGIN IMMEDIATE already does)."""
    if conn.dialect.name == "postgresql":
        # Taken last in a write transaction, after any stream row locks, so it cannot deadlock with them.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOG_LOCK_KEY})


def entry_hash(prev_hash: str, body: str) -> str:
    """Return the hash of a log entry whose body text follows the entry with prev_hash."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + body.encode()).hexdigest()


def head_fields(
    length: int, head: str, max_seq: int | None = None, contiguous_seq: int | None = None
) -> dict[str, Any]:
    """Return a stream head (or, without the seqs, the dead-letter chain head) as a log entry holds it."""
    fields: dict[str, Any] = {"length": length, "head": head}
    if max_seq is not None:
        fields["max_seq"] = max_seq
    if contiguous_seq is not None:
        fields["contiguous_seq"] = contiguous_seq
    return fields


def key_line_body(
    *,
    agent: str,
    version: int,
    action: str,
    public_key_pem: str,
    valid_from: datetime,
    registered_at: datetime,
    previous_until: datetime | None = None,
) -> dict[str, Any]:
    """Return what the controller signs for one line of an agent's key history.

    previous_until (a replace line's grace window for the replaced key) is in the body only when set, so the
    lines signed before it existed keep their signatures and digests.
    """
    body = {
        "agent": agent,
        "version": version,
        "action": action,
        "public_key_pem": public_key_pem,
        "valid_from": timefmt.fmt(valid_from),
        "registered_at": timefmt.fmt(registered_at),
    }
    if previous_until is not None:
        body["previous_until"] = timefmt.fmt(previous_until)
    return body


def key_line_digest(body: dict[str, Any]) -> str:
    """Return the digest of a key line the log entry that recorded it holds."""
    return hashlib.sha256(_ENCODER.encode(body).encode()).hexdigest()


def row_key_line(row: Any) -> dict[str, Any]:
    """Return the signed body of an agent_keys row."""
    return key_line_body(
        agent=row.agent_id,
        version=row.version,
        action=row.action,
        public_key_pem=row.public_key_pem,
        valid_from=row.valid_from,
        registered_at=row.registered_at,
        previous_until=getattr(row, "previous_until", None),
    )


def append(conn: Connection, signer: Ed25519PrivateKey | None, kind: str, fields: dict[str, Any], at: datetime) -> int:
    """Append one entry to the log (the caller holds lock_log); return its number."""
    return append_entry(conn, signer, kind, fields, at)[0]


def append_entry(
    conn: Connection, signer: Ed25519PrivateKey | None, kind: str, fields: dict[str, Any], at: datetime
) -> tuple[int, str]:
    """Append one entry to the log (the caller holds lock_log); return its number and hash (for receipts)."""
    head = conn.execute(
        select(_CHECKPOINTS.c.id, _CHECKPOINTS.c.hash).order_by(_CHECKPOINTS.c.id.desc()).limit(1)
    ).first()
    number = 1 if head is None else int(head.id) + 1
    prev_hash = ZERO_HASH if head is None else str(head.hash)
    body = _ENCODER.encode({**fields, "v": FORMAT, "n": number, "kind": kind, "at": timefmt.fmt(at)})
    digest = entry_hash(prev_hash, body)
    conn.execute(
        insert(_CHECKPOINTS).values(
            id=number,
            kind=kind,
            created_at=at,
            body=body,
            prev_hash=prev_hash,
            hash=digest,
            signature=None if signer is None else signing.sign(signer, "checkpoint", {"n": number, "hash": digest}),
        )
    )
    return number, digest


def add_key_line(
    conn: Connection,
    signer: Ed25519PrivateKey | None,
    *,
    agent_id: str,
    action: str,
    public_key_pem: str,
    valid_from: datetime,
    previous_until: datetime | None = None,
) -> int:
    """Add a signed line to an agent's key history and record it in the log; return the line's id."""
    lock_log(conn)
    now = timefmt.now()
    last = conn.execute(select(func.max(_AGENT_KEYS.c.version)).where(_AGENT_KEYS.c.agent_id == agent_id)).scalar()
    version = 1 if last is None else int(last) + 1
    body = key_line_body(
        agent=agent_id,
        version=version,
        action=action,
        public_key_pem=public_key_pem,
        valid_from=valid_from,
        registered_at=now,
        previous_until=previous_until,
    )
    line_id = conn.execute(
        insert(_AGENT_KEYS)
        .values(
            agent_id=agent_id,
            version=version,
            action=action,
            public_key_pem=public_key_pem,
            valid_from=valid_from,
            registered_at=now,
            previous_until=previous_until,
            signature=None if signer is None else signing.sign(signer, "agent_key", body),
        )
        .returning(_AGENT_KEYS.c.id)
    ).scalar_one()
    line = {"line": line_id, "agent": agent_id, "version": version, "action": action, "digest": key_line_digest(body)}
    append(conn, signer, AGENT_KEY, {"key": line}, now)
    return int(line_id)


def seal_existing(conn: Connection, signer: Ed25519PrivateKey | None) -> int | None:
    """Write the genesis entry if the log is empty: sign the key lines and seal every chain as it stands.

    Returns the genesis entry's number, or None if the log already had entries.
    """
    lock_log(conn)
    if conn.execute(select(_CHECKPOINTS.c.id).limit(1)).first() is not None:
        return None
    now = timefmt.now()
    streams = {
        row.agent_id: head_fields(row.chain_length, row.head_hash, row.max_seq, row.contiguous_seq)
        for row in conn.execute(select(_STREAMS).order_by(_STREAMS.c.agent_id))
    }
    letters = conn.execute(
        select(_DEAD_LETTERS.c.chain_index, _DEAD_LETTERS.c.hash).order_by(_DEAD_LETTERS.c.chain_index.desc()).limit(1)
    ).first()
    lines = []
    for row in conn.execute(select(_AGENT_KEYS).order_by(_AGENT_KEYS.c.id)).all():
        body = row_key_line(row)
        if row.signature is None and signer is not None:
            # The lines an upgrade copied from `agents`: this is the first time the controller's key is at hand.
            conn.execute(
                update(_AGENT_KEYS)
                .where(_AGENT_KEYS.c.id == row.id)
                .values(signature=signing.sign(signer, "agent_key", body))
            )
        lines.append(
            {
                "line": row.id,
                "agent": row.agent_id,
                "version": row.version,
                "action": row.action,
                "digest": key_line_digest(body),
            }
        )
    admin = conn.execute(
        select(_ADMIN_AUDIT.c.chain_index, _ADMIN_AUDIT.c.hash).order_by(_ADMIN_AUDIT.c.chain_index.desc()).limit(1)
    ).first()
    fields = {
        "streams": streams,
        "dead_letters": head_fields(int(letters.chain_index), letters.hash) if letters else head_fields(0, ZERO_HASH),
        "keys": lines,
        ADMIN: head_fields(int(admin.chain_index), admin.hash) if admin else head_fields(0, ZERO_HASH),
    }
    return append(conn, signer, GENESIS, fields, now)


class CheckpointRecords(Records):
    """The ``checkpoints`` log and the genesis seal, shared by the record families that append to it."""

    def seal_existing(self) -> int | None:
        """Seal the current state as the log's genesis entry if the log is empty; return its number if written.

        A controller does this when it starts, and every write does it first if it has not happened yet.
        """
        number = self.write(lambda conn: seal_existing(conn, self.signing_key), retry_unique=True)
        self._sealed = True
        return number

    def _ensure_sealed(self) -> None:
        # Before any write appends to the log: records stored earlier must be sealed as they were, by a
        # genesis entry of their own, never by the checkpoint of a batch that also holds new records.
        if not self._sealed:
            self.seal_existing()


@dataclass(slots=True)
class LogState:
    """What the readable, trusted prefix of the log says the chains and key lines are."""

    entries: int = 0
    head: tuple[int, str] | None = None
    genesis_at: datetime | None = None
    legacy: dict[str, int] = field(default_factory=dict)
    streams: dict[str, SignedHead] = field(default_factory=dict)
    letters: SignedHead | None = None
    admin: SignedHead | None = None
    records: dict[str, SignedHead] = field(default_factory=dict)
    # key line id -> (log entry that recorded it, agent, version, digest)
    key_lines: dict[int, tuple[int, str, int, str]] = field(default_factory=dict)


def _signed_head(number: int, fields: dict[str, Any]) -> SignedHead:
    return SignedHead(
        number,
        int(fields["length"]),
        str(fields["head"]),
        int(fields.get("max_seq", 0)),
        int(fields.get("contiguous_seq", 0)),
    )


def _fold(state: LogState, number: int, body: dict[str, Any]) -> None:
    """Apply one verified entry's body to the state (raises KeyError/TypeError/ValueError if malformed)."""
    kind = body["kind"]
    if kind == GENESIS:
        state.genesis_at = timefmt.parse(body["at"])
        # Every record a stream held at genesis was stored before stored_at joined the record (format 1).
        state.legacy = {agent: int(fields["length"]) for agent, fields in body["streams"].items()}
    for agent, fields in body.get("streams", {}).items():
        state.streams[str(agent)] = _signed_head(number, fields)
    if "dead_letters" in body:
        state.letters = _signed_head(number, body["dead_letters"])
    if ADMIN in body:
        state.admin = _signed_head(number, body[ADMIN])
    for stream, fields in body.get(RECORDS, {}).items():
        state.records[str(stream)] = _signed_head(number, fields)
    lines = body.get("keys", []) + ([body["key"]] if "key" in body else [])
    for line in lines:
        state.key_lines[int(line["line"])] = (number, str(line["agent"]), int(line["version"]), str(line["digest"]))


def _entry_problem(
    row: Any, expected: int, prev_hash: str, controller_key: signing.Verifier | None
) -> tuple[str | None, dict[str, Any] | None]:
    if row.id > expected:
        return f"checkpoint(s) missing before #{row.id}: entries deleted", None
    if row.id < expected or row.prev_hash != prev_hash:
        return "checkpoint inserted/reordered", None
    if entry_hash(prev_hash, row.body) != row.hash:
        return "hash mismatch: checkpoint edited", None
    try:
        body = json.loads(row.body)
        consistent = (
            isinstance(body, dict)
            and body.get("v") == FORMAT
            and body.get("n") == row.id
            and body.get("kind") == row.kind
            and body.get("at") == timefmt.fmt(row.created_at)
        )
    except ValueError:
        consistent, body = False, None
    if not consistent:
        return "checkpoint columns differ from its body", None
    if body["kind"] == GENESIS and row.id != 1:
        return "genesis is not the first checkpoint", None
    if controller_key is not None:
        if row.signature is None:
            return "checkpoint not signed (written without the controller's signing key)", None
        try:
            signed = canonical_bytes({"n": row.id, "hash": row.hash})
            signing.verify_canonical(controller_key, "checkpoint", signed, row.signature)
        except errors.Rejected:
            return "checkpoint signature invalid", None
    return None, body


def read_log(conn: Connection, controller_key: signing.Verifier | None) -> tuple[LogState, list[ChainProblem]]:
    """Walk the checkpoint log; return what its trusted prefix says, and the first problem if any.

    With controller_key every entry's signature is checked; entries after the first bad one are not used.
    """
    state = LogState()
    problems: list[ChainProblem] = []
    expected, prev_hash = 1, ZERO_HASH
    result = conn.execute(
        select(_CHECKPOINTS).order_by(_CHECKPOINTS.c.id), execution_options={"yield_per": _WALK_BATCH}
    )
    try:
        for row in result:
            problem, body = _entry_problem(row, expected, prev_hash, controller_key)
            if problem is None and body is not None:
                try:
                    _fold(state, row.id, body)
                except (KeyError, TypeError, ValueError, AttributeError, errors.Rejected):
                    problem = "checkpoint body unreadable"
            if problem is not None:
                problems.append(ChainProblem(None, None, None, None, row.id, problem, "checkpoints"))
                return state, problems
            if row.id == 1 and row.kind != GENESIS:
                # Entries were appended to a log someone emptied: they still hold, what was before is gone.
                problems.append(
                    ChainProblem(
                        None,
                        None,
                        None,
                        None,
                        row.id,
                        "the log does not begin with genesis: entries deleted",
                        "checkpoints",
                    )
                )
            state.entries += 1
            state.head = (row.id, row.hash)
            expected, prev_hash = expected + 1, row.hash
    finally:
        result.close()
    return state, problems
