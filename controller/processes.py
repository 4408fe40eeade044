"""Each controller process's row in the database: who it is, what it leads, its ingest state.

An ingest-only worker has no HTTP, and a load balancer only asks the web processes; the row is the one
place where every process of the site, on any host, can be seen (`sekisho controller status`). Live truth
about leadership is the lock itself (controller/leader.py); the row is what the process last said.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update

from sekisho.controller.ingest.worker import IngestStats
from sekisho.controller.leader import Identity
from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import ControllerProcess
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt

_TABLE = ControllerProcess.__table__


@dataclass
class ProcessReport:
    """What a process says about itself (the heartbeat row, and /readyz's ``process`` check)."""

    identity: Identity
    role: str
    started_at: datetime
    ingest: IngestStats
    leading: Callable[[], list[str]] = field(default=lambda: [])

    def ready(self) -> bool:
        """Tell whether this process's ingest is usable: connected to the broker and not stalled."""
        return self.ingest.connected and not self.ingest.stalled()

    def ingest_state(self) -> dict[str, Any]:
        """Return the ingest counters shown for this process."""
        stats = self.ingest
        last = round(time.time() - stats.last_batch_at, 1) if stats.last_batch_at else None
        return {
            "connected": stats.connected,
            "stalled": stats.stalled(),
            "stored": stats.stored,
            "waiting": stats.waiting,
            "dead_lettered": stats.dead_lettered,
            "last_batch_age_s": last,
        }

    def as_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready values (no secrets: names, counts and times)."""
        return {
            "worker_id": self.identity.worker_id,
            "host": self.identity.host,
            "pid": self.identity.pid,
            "role": self.role,
            "started_at": timefmt.fmt(self.started_at),
            "leads": self.leading(),
            "ready": self.ready(),
            "ingest": self.ingest_state(),
        }


def beat(store: Store, report: ProcessReport, now: datetime | None = None) -> None:
    """Write this process's row (insert it the first time)."""
    moment = now or timefmt.now()
    values: dict[str, Any] = {
        "host": report.identity.host[:255],
        "pid": report.identity.pid,
        "role": report.role,
        "started_at": report.started_at,
        "beat_at": moment,
        "ready": report.ready(),
        "leads": report.leading(),
        "ingest": report.ingest_state(),
    }
    with write_transaction(store.engine) as conn:
        done = conn.execute(
            update(ControllerProcess).where(ControllerProcess.worker_id == report.identity.worker_id).values(**values)
        )
        if done.rowcount == 0:
            conn.execute(insert(ControllerProcess).values(worker_id=report.identity.worker_id, **values))


def forget(store: Store, worker_id: str) -> None:
    """Delete a process's row (it stopped cleanly: nothing to look at any more)."""
    with write_transaction(store.engine) as conn:
        conn.execute(delete(ControllerProcess).where(ControllerProcess.worker_id == worker_id))


def list_processes(store: Store) -> list[Any]:
    """Return every process row, by worker id."""
    with store.engine.connect() as conn:
        return list(conn.execute(select(*_TABLE.columns).order_by(_TABLE.c.worker_id)))


class ProcessBeat(PeriodicJob):
    """Writes this process's row every ``every_s`` seconds (in every process: each writes only its own)."""

    name = "process heartbeat"

    def __init__(self, store: Store, report: ProcessReport, *, every_s: float) -> None:
        """Report ``report`` into ``store`` every ``every_s`` seconds."""
        self.store = store
        self.report = report
        self.every_s = every_s
        super().__init__()

    def run_once(self) -> None:
        """Write the row once."""
        beat(self.store, self.report)
