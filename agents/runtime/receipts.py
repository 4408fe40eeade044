"""The controller's signed receipts this agent keeps: proof of its stream's head that the database cannot undo.

A controller ack may carry a receipt (protocol.messages.Receipt): the agent's stream length and head hash
after the batch, and the signed checkpoint that recorded them. The agent asks for receipts in its heartbeat
and keeps the newest few signed acks that carried one in ``receipts.json`` in its state dir, whole and as
received (the controller's signature covers them), written atomically. An auditor collects these files and
runs ``sekisho records verify --receipts DIR``: a chain rewritten and re-hashed in the database, or the
database cut back, no longer has the head a receipt names (docs/operations.md).

The newest receipt covers everything before it; a few older ones are kept, and the one naming the longest
stream always: if the controller's receipts ever name a shorter stream than before, its records were cut
back, and that older receipt is what proves it (the agent also logs it). Writes are spaced by ``every_s`` (an ack may
come several times a second; each write is an fsync) and the pending one is written at stop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from sekisho.common.files import write_atomically
from sekisho.protocol import messages

log = logging.getLogger(__name__)

RECEIPTS_FILE = messages.RECEIPTS_FILE
FORMAT = messages.RECEIPTS_FORMAT
KEEP = 16


def _length(raw: str) -> int:
    """Return the stream length a kept ack's receipt names (0 if it names none)."""
    try:
        return int(json.loads(raw)["ack"]["receipt"]["length"])
    except (ValueError, KeyError, TypeError):
        return 0


class ReceiptKeeper:
    """Keeps the latest signed acks that carried a receipt, in one small file written atomically."""

    def __init__(self, state_dir: Path, agent_id: str, *, keep: int = KEEP, every_s: float = 10.0) -> None:
        self.path = state_dir / RECEIPTS_FILE
        self._agent = agent_id
        self._keep = keep
        self._every_s = every_s
        self._lock = threading.Lock()
        self._acks: list[str] = self._load()
        self._highest = max(self._acks, key=_length, default=None)
        self._newest_length = 0 if self._highest is None else _length(self._highest)
        self._dirty = False
        self._written_at = 0.0
        self._warned = False  # said once per run: every later ack would say it again

    def _load(self) -> list[str]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            # Unreadable: start afresh rather than stop the agent; the next receipt replaces it.
            log.warning("receipts file %s unreadable (%s); starting a new one", self.path, type(err).__name__)
            return []
        acks = doc.get("receipts") if isinstance(doc, dict) else None
        if not isinstance(acks, list):
            return []
        found = [a for a in acks if isinstance(a, str)]
        kept = found[-self._keep :]
        highest = max(found, key=_length, default=None)
        if highest is not None and highest not in kept:
            kept.insert(0, highest)
        return kept

    def keep(self, raw: bytes, ack: messages.Ack) -> None:
        """Keep a verified ack that carries a receipt; write the file if the last write is old enough."""
        receipt = ack.receipt
        if receipt is None:
            return
        with self._lock:
            if receipt.length < self._newest_length and not self._warned:
                self._warned = True
                # The controller's chain of our events went backwards: its database was cut back or rewritten.
                # The older receipts are what proves it, so they stay in the file.
                log.error(
                    "controller receipt says our stream has %d record(s), an earlier one said %d: "
                    "its records were cut back (keep %s for the auditor)",
                    receipt.length,
                    self._newest_length,
                    self.path,
                )
            text = raw.decode()
            if receipt.length >= self._newest_length:
                self._newest_length, self._highest = receipt.length, text
            acks = [*self._acks, text][-self._keep :]
            if self._highest is not None and self._highest not in acks:
                # The longest head ever receipted stays, however many shorter ones came after it.
                acks.insert(0, self._highest)
            self._acks = acks
            self._dirty = True
            if time.monotonic() - self._written_at >= self._every_s:
                self._write()

    def flush(self) -> None:
        """Write the kept receipts now if any arrived since the last write."""
        with self._lock:
            if self._dirty:
                self._write()

    def _write(self) -> None:
        doc = {"format": FORMAT, "agent": self._agent, "receipts": self._acks}
        try:
            write_atomically(self.path, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
        except OSError as err:
            # Receipts are evidence for later, not needed to run: a full disk must not stop the sender.
            log.warning("could not write %s: %s", self.path, err.strerror)
            return
        self._dirty = False
        self._written_at = time.monotonic()


def describe(path: Path) -> str:
    """Say what a receipts file holds, for `sekisho-agent status` (where to collect it from, and how far it goes)."""
    try:
        acks = json.loads(path.read_bytes()).get("receipts", [])
    except FileNotFoundError:
        return f"none yet ({path})"
    except (OSError, ValueError, AttributeError):
        return f"unreadable ({path})"
    if not isinstance(acks, list) or not acks:
        return f"none yet ({path})"
    newest = acks[-1] if isinstance(acks[-1], str) else ""
    try:
        checkpoint = int(json.loads(newest)["ack"]["receipt"]["checkpoint"])
    except (ValueError, KeyError, TypeError):
        return f"{len(acks)} kept ({path})"
    return f"{len(acks)} kept, newest: {_length(newest)} record(s), checkpoint #{checkpoint} ({path})"
