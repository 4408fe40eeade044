"""Transactions on the controller database: the retried write transaction and detached reads every record family uses.

Every write runs in its own transaction and keeps no state between calls, so any number of
controller workers (threads or processes) may share one database. A transaction that loses a race
to another worker (deadlock, serialisation failure, unique violation, SQLite busy) is run again whole.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine, Select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sekisho.controller.store.db import SQLITE_BEGIN

log = logging.getLogger(__name__)

INT64 = range(-(2**63), 2**63)

T = TypeVar("T")
M = TypeVar("M")


def aware_utc(moment: datetime, name: str) -> datetime:
    """Return moment in UTC; a naive time is refused, as its zone would be a guess."""
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return moment.astimezone(UTC)


def int_or_none(value: Any) -> int | None:
    """Return value if it is an int that fits a BIGINT column, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value in INT64:
        return value
    return None


def _is_transient(err: DBAPIError, *, unique: bool) -> bool:
    """Tell whether retrying the whole transaction may succeed."""
    if err.connection_invalidated:
        return True
    sqlstate = getattr(err.orig, "sqlstate", None)
    # 40001 serialization failure, 40P01 deadlock; 23505 unique violation (a concurrent writer won).
    if sqlstate in ("40001", "40P01") or (unique and sqlstate == "23505"):
        return True
    message = str(err.orig).lower()
    return "database is locked" in message or "database is busy" in message


class Records:
    """The engine and transaction helpers shared by the store's record families (and the media register)."""

    def __init__(self, engine: Engine, *, attempts: int = 5, signing_key: Ed25519PrivateKey | None = None) -> None:
        """Use the given engine; retry transient write conflicts up to ``attempts`` times.

        signing_key is the controller's Ed25519 key (config.signing_key): it signs the checkpoint log and
        the agents' key lines. Without it they are written unsigned, and `records verify` reports them.
        """
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {engine.dialect.name!r}")
        self.engine = engine
        self.signing_key = signing_key
        self._attempts = attempts
        # Whether this process has seen the checkpoint log begun (checkpoints.CheckpointRecords); only a shortcut.
        self._sealed = False
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    def write(self, work: Callable[[Connection], T], *, retry_unique: bool = False) -> T:
        """Run work in one write transaction, retrying it whole on transient conflicts."""
        attempt = 1
        while True:
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
                    with conn.begin():
                        return work(conn)
            except DBAPIError as err:
                if attempt >= self._attempts or not _is_transient(err, unique=retry_unique):
                    raise
                log.info("retrying store transaction after a transient conflict (attempt %d): %s", attempt, err)
                # Jitter so that two workers that collided do not collide again in lockstep.
                time.sleep(min(0.02 * 2**attempt, 0.5) * (0.5 + random.random()))
                attempt += 1

    def read(self, stmt: Select[M]) -> list[M]:
        """Return the ORM objects a query selects, detached (safe to use after the session ends)."""
        with Session(self.engine) as session:
            return list(session.scalars(stmt))
