"""Heads held outside the database: the agents' receipts and the exported heads file (issue 14).

The checkpoint log (checkpoints.py) shows any change made by someone who cannot sign as the controller.
It cannot show a change made together with a re-signed log, or the whole database cut back to an earlier
state: the database then agrees with itself. What shows it is a head someone else kept:

- **Receipts.** After storing a batch, the controller's signed ack tells an agent that asked for them
  (heartbeat ``receipts``) its stream's length and head hash after the batch, and the number and hash of the
  signed checkpoint that recorded them (protocol.messages.Receipt). The agent keeps the latest signed acks
  in its state dir (agents/runtime/receipts.py). ``check_receipts`` holds them against the database: the
  record at that chain index must have that hash, and the log must still hold that checkpoint with that hash.
- **The heads file.** A controller job appends the newest signed checkpoint (number, hash, signature, time)
  to an append-only file outside the database every ``heads_every_s`` (``HeadsExport`` in
  controller/records_jobs.py); ``check_heads`` holds each line against the log the same way.

A receipt or heads line is trusted only with a valid controller signature: a forged one is reported, never
used. Both checks only read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Table, select

from sekisho.controller.store.chain import ChainProblem
from sekisho.controller.store.models import Agent, Checkpoint, Event
from sekisho.controller.store.records import Records
from sekisho.protocol import errors, messages, signing, timefmt
from sekisho.protocol.canonical import canonical_bytes

# The file an agent keeps its receipts in (in its state dir), and its format.
RECEIPTS_FILE = messages.RECEIPTS_FILE
RECEIPTS_FORMAT = messages.RECEIPTS_FORMAT
# A heads file line: what the controller signed for checkpoint n (kind "checkpoint", {"n", "hash"}).
HEADS_FORMAT = 1
# Neither file is ever large; a bigger one is not ours.
MAX_RECEIPT_FILE = 4 * 1024 * 1024
MAX_HEADS_LINE = 4096

_AGENTS = cast(Table, Agent.__table__)
_EVENTS = cast(Table, Event.__table__)
_CHECKPOINTS = cast(Table, Checkpoint.__table__)


@dataclass(frozen=True, slots=True)
class HeldReceipt:
    """One signed ack as an agent kept it, and where it was read from (for the report)."""

    source: str
    raw: bytes


def read_receipt_files(directory: Path) -> tuple[list[HeldReceipt], list[ChainProblem]]:
    """Read every receipts file under directory (any depth); return the acks they hold and unreadable files."""
    held: list[HeldReceipt] = []
    problems: list[ChainProblem] = []
    for path in sorted(p for p in directory.rglob("*.json") if p.is_file()):
        where = str(path.relative_to(directory))
        try:
            if path.stat().st_size > MAX_RECEIPT_FILE:
                raise ValueError(f"larger than {MAX_RECEIPT_FILE} bytes")
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict) or doc.get("format") != RECEIPTS_FORMAT:
                raise ValueError(f"not a receipts file (format {RECEIPTS_FORMAT})")
            acks = doc.get("receipts")
            if not isinstance(acks, list) or not all(isinstance(a, str) for a in acks):
                raise ValueError("receipts is not a list of signed acks")
        except (OSError, ValueError, UnicodeDecodeError) as err:
            problems.append(_problem(None, None, f"receipt file {where}: unreadable ({err})"))
            continue
        held.extend(HeldReceipt(f"{where}[{i}]", ack.encode()) for i, ack in enumerate(acks))
    return held, problems


def _problem(agent: str | None, index: int | None, text: str, checkpoint: int | None = None) -> ChainProblem:
    return ChainProblem(agent, index, None, None, checkpoint, text, "receipts")


def _event_hash(conn: Connection, agent: str, index: int) -> str | None:
    found = conn.execute(
        select(_EVENTS.c.hash).where(_EVENTS.c.agent_id == agent, _EVENTS.c.chain_index == index)
    ).scalar()
    return None if found is None else str(found)


def _checkpoint_hash(conn: Connection, number: int) -> str | None:
    found = conn.execute(select(_CHECKPOINTS.c.hash).where(_CHECKPOINTS.c.id == number)).scalar()
    return None if found is None else str(found)


def _checkpoint_problem(conn: Connection, number: int, digest: str, said_by: str) -> str | None:
    stored = _checkpoint_hash(conn, number)
    says = f"{said_by} says signed checkpoint #{number} has hash {digest}"
    if stored is None:
        return f"{says}, the log has no #{number} (cut back or re-created)"
    if stored != digest:
        return f"{says}, database has {stored} (log rewritten)"
    return None


def check_receipts(
    conn: Connection, held: Iterable[HeldReceipt], controller_key: Ed25519PublicKey
) -> tuple[int, list[ChainProblem]]:
    """Hold each signed receipt against the chains and the log; return how many were checked and the problems."""
    checked = 0
    problems: list[ChainProblem] = []
    for one in held:
        try:
            ack = messages.open_signed_ack(one.raw, controller_key)
        except (errors.Rejected, ValueError) as err:
            # Rejected for a bad signature or shape; ValueError for text that is not even JSON.
            reason = err.reason if isinstance(err, errors.Rejected) else "not a signed ack"
            problems.append(
                _problem(None, None, f"receipt {one.source}: not signed by the controller, not trusted ({reason})")
            )
            continue
        receipt = ack.receipt
        if receipt is None:
            problems.append(_problem(ack.agent, None, f"receipt {one.source}: a signed ack without a receipt"))
            continue
        checked += 1
        said_by = f"receipt #{receipt.checkpoint} from {ack.agent}"
        stored = _event_hash(conn, ack.agent, receipt.length)
        if stored != receipt.head:
            has = "no record there (deleted or cut back)" if stored is None else stored
            says = f"stream {ack.agent}: {said_by} says head {receipt.head} at index {receipt.length}"
            problems.append(_problem(ack.agent, receipt.length, f"{says}, database has {has}", receipt.checkpoint))
        text = _checkpoint_problem(conn, receipt.checkpoint, receipt.checkpoint_hash, said_by)
        if text is not None:
            problems.append(_problem(ack.agent, None, text, receipt.checkpoint))
    return checked, problems


def heads_line(number: int, digest: str, signature: str | None, created_at: Any) -> bytes:
    """Return one heads file line (JSON and a newline) for a signed checkpoint."""
    line = {
        "format": HEADS_FORMAT,
        "n": number,
        "hash": digest,
        "signature": signature,
        "at": timefmt.fmt(created_at),
        "exported_at": timefmt.fmt(timefmt.now()),
    }
    return json.dumps(line, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def last_heads_number(path: Path) -> int | None:
    """Return the checkpoint number of the heads file's last readable line, or None (no file, empty, unreadable)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 2 * MAX_HEADS_LINE))
            tail = f.read().splitlines()
    except OSError:
        return None
    for raw in reversed(tail):
        try:
            number = json.loads(raw).get("n")
        except (ValueError, AttributeError):
            continue
        if isinstance(number, int):
            return number
    return None


def check_heads(conn: Connection, path: Path, controller_key: Ed25519PublicKey) -> tuple[int, list[ChainProblem]]:
    """Hold each line of a heads file against the log; return how many lines were checked and the problems."""
    checked = 0
    problems: list[ChainProblem] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"heads file line {number}"
            try:
                if len(raw) > MAX_HEADS_LINE:
                    raise ValueError("line too long")
                line = json.loads(raw)
                if not isinstance(line, dict) or line.get("format") != HEADS_FORMAT:
                    raise ValueError(f"not a heads line (format {HEADS_FORMAT})")
                n, digest, sig = line["n"], line["hash"], line["signature"]
                if not isinstance(n, int) or not isinstance(digest, str):
                    raise ValueError("n or hash malformed")
            except (ValueError, KeyError, UnicodeDecodeError) as err:
                problems.append(_problem(None, None, f"{where}: unreadable ({err})"))
                continue
            try:
                if not isinstance(sig, str):
                    raise errors.Rejected(errors.BAD_SIGNATURE, "no signature")
                signing.verify_canonical(controller_key, "checkpoint", canonical_bytes({"n": n, "hash": digest}), sig)
            except (errors.Rejected, ValueError) as err:
                reason = err.reason if isinstance(err, errors.Rejected) else "signature malformed"
                problems.append(_problem(None, None, f"{where}: not signed by the controller, not trusted ({reason})"))
                continue
            checked += 1
            text = _checkpoint_problem(conn, n, digest, where)
            if text is not None:
                problems.append(_problem(None, None, text, n))
    return checked, problems


@dataclass(frozen=True, slots=True)
class OutsideCheck:
    """What the receipts and heads file checks found."""

    receipts: int
    heads: int
    problems: list[ChainProblem]


class ReceiptRecords(Records):
    """The agents that asked for receipts, the newest signed head to export, and the checks against held heads."""

    def receipt_agents(self) -> frozenset[str]:
        """Return the agents whose latest recorded heartbeat asks for receipts in their acks."""
        # Only the one field, in the database: a fleet's whole heartbeats (fingerprint reports) every refresh is MBs.
        asks = _AGENTS.c.last_heartbeat["receipts"].as_integer() == RECEIPTS_FORMAT
        with self.engine.connect() as conn:
            return frozenset(str(agent) for agent in conn.execute(select(_AGENTS.c.id).where(asks)).scalars())

    def newest_checkpoint(self) -> tuple[int, str, str | None, Any] | None:
        """Return the newest checkpoint's number, hash, signature and time, or None if the log is empty."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_CHECKPOINTS.c.id, _CHECKPOINTS.c.hash, _CHECKPOINTS.c.signature, _CHECKPOINTS.c.created_at)
                .order_by(_CHECKPOINTS.c.id.desc())
                .limit(1)
            ).first()
        return None if row is None else (int(row.id), str(row.hash), row.signature, row.created_at)

    def check_outside(
        self,
        controller_key: Ed25519PublicKey,
        *,
        receipts: list[HeldReceipt] | None = None,
        heads_file: Path | None = None,
    ) -> OutsideCheck:
        """Hold agents' receipts and a heads file against the database in one snapshot."""
        problems: list[ChainProblem] = []
        checked_receipts = checked_heads = 0
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                if receipts is not None:
                    checked_receipts, found = check_receipts(conn, receipts, controller_key)
                    problems.extend(found)
                if heads_file is not None:
                    checked_heads, found = check_heads(conn, heads_file, controller_key)
                    problems.extend(found)
        return OutsideCheck(checked_receipts, checked_heads, problems)
