"""Leader election by database lock: which controller process runs each background job that must be single.

Several `serve` processes share one database; jobs such as policy publication or alert escalation must run
in exactly one of them. Each such job has a named lock:

* PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) taken on one dedicated connection per
  process. PostgreSQL releases it when that session ends, so a process that dies (SIGKILL, host or network
  loss) loses its leaderships and another process takes them at its next try.
* SQLite (one host, one file): an OS file lock (``flock``) on a file beside the database; the kernel releases
  it when the process dies.

Fail closed: a process leads a job only while it has proved, recently, that it still holds the lock. On
PostgreSQL the proof is a query on the dedicated connection at least every ``check_s``; the proof is valid for
``lease_s``, which is shorter than the time PostgreSQL needs to notice a silent client (the TCP keepalives set
on the session), so the old leader stops before the server can hand the lock to another process. Better no
leader for a few seconds than two.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool

from sekisho.controller.store.db import make_engine

log = logging.getLogger(__name__)

# The first key of every advisory lock taken here (the two-key form); the second is the job's crc32. The
# schema migration lock uses the one-key form (controller/store/db.py), which PostgreSQL keeps apart.
LOCK_NAMESPACE = 0x5E15
# Server-side TCP keepalives on the lock session: PostgreSQL drops a silent client after about
# idle + interval * count seconds (8 s), releasing its locks. lease_s must stay below this.
_KEEPALIVE = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 1, "tcp_keepalives_count": 3}
SERVER_RELEASE_S = 8.0


def lock_key(name: str) -> int:
    """Return the second advisory-lock key of a job name (stable across processes and versions)."""
    return zlib.crc32(name.encode()) & 0x7FFF_FFFF


@dataclass(frozen=True)
class Identity:
    """Who a process is: shown in health answers, the heartbeat row and the lock session's name."""

    worker_id: str
    host: str
    pid: int

    @classmethod
    def here(cls, worker_id: str) -> Identity:
        """Return this process's identity."""
        return cls(worker_id, socket.gethostname(), os.getpid())


class Elector(Protocol):
    """The interface jobs use: register the locks wanted, then ask whether this process leads one."""

    identity: Identity
    check_s: float

    def want(self, name: str) -> None:
        """Compete for the lock ``name`` from now on."""

    def leads(self, name: str) -> bool:
        """Tell whether this process holds ``name`` now (proved recently enough)."""

    def leading(self) -> list[str]:
        """Return the names of the locks this process holds now."""

    def start(self) -> None:
        """Start competing."""

    def stop(self) -> None:
        """Release every lock and stop."""


class _Base:
    """The thread and bookkeeping shared by both kinds: try every check_s, publish what is held until when."""

    kind = "base"

    def __init__(
        self, identity: Identity, *, check_s: float, lease_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 0 < check_s < lease_s:
            raise ValueError("leader election needs 0 < check_s < lease_s")
        self.clock = clock
        self.identity = identity
        self.check_s = check_s
        self.lease_s = lease_s
        self._wanted: set[str] = set()
        self._held: frozenset[str] = frozenset()
        self._valid_until = 0.0
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader election", daemon=True)
        self._failing = False

    def want(self, name: str) -> None:
        """Compete for the lock ``name`` from now on (the next round tries it)."""
        with self._mutex:
            self._wanted.add(name)

    def leads(self, name: str) -> bool:
        """Tell whether this process holds ``name`` and proved it within lease_s."""
        return name in self._held and self.clock() < self._valid_until

    def leading(self) -> list[str]:
        """Return the names of the locks this process holds now (empty once the proof is too old)."""
        if self.clock() >= self._valid_until:
            return []
        return sorted(self._held)

    def start(self) -> None:
        """Take what can be taken now, then keep trying every check_s in a thread."""
        self.round()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and release every lock (another process takes them at its next try)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._mutex:
            self._held = frozenset()
            self._valid_until = 0.0
            self._release_all()

    def round(self) -> None:
        """Prove what is held, try what is wanted; on any failure hold nothing (fail closed)."""
        with self._mutex:
            started = self.clock()
            try:
                held = self._check_and_take(set(self._wanted))
            except Exception as err:  # a lost connection or file error: no leadership until proved again
                self._held = frozenset()
                self._valid_until = 0.0
                self._reset()
                if not self._failing:
                    log.warning("leader election (%s) failed, leading nothing: %s", self.kind, type(err).__name__)
                    log.debug("leader election failure", exc_info=True)
                self._failing = True
                return
            if self._failing:
                log.info("leader election (%s) works again", self.kind)
                self._failing = False
            # Counted from before the proof: the lock was certainly ours when the question was asked.
            self._held = frozenset(held)
            self._valid_until = started + self.lease_s

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            self.round()

    def _check_and_take(self, wanted: set[str]) -> set[str]:
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget the connection or files after a failure (their locks are gone or will be)."""

    def _release_all(self) -> None:
        raise NotImplementedError


class PostgresElector(_Base):
    """Advisory locks on one dedicated PostgreSQL session per process."""

    kind = "postgresql"

    def __init__(
        self,
        url: str,
        identity: Identity,
        *,
        check_s: float = 1.0,
        lease_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_s >= SERVER_RELEASE_S:
            raise ValueError(f"lease_s must be below {SERVER_RELEASE_S} s (when PostgreSQL drops a silent session)")
        super().__init__(identity, check_s=check_s, lease_s=lease_s, clock=clock)
        timeout_ms = int(lease_s * 1000)
        connect_args: dict[str, Any] = {
            # Shown in pg_stat_activity: which process holds which lock (`sekisho controller status`).
            "application_name": f"sekisho {identity.worker_id} {identity.host} {identity.pid}"[:63],
            # Connecting proves nothing (a process without a session leads nothing), so it may take longer
            # than a proof; the lease bounds the proofs (statement_timeout, tcp_user_timeout below).
            "connect_timeout": 10,
            # The client side notices a dead server or network within the lease, too.
            "keepalives": 1,
            "keepalives_idle": 2,
            "keepalives_interval": 1,
            "keepalives_count": 2,
            "tcp_user_timeout": timeout_ms,
        }
        # Its own engine without a pool: a broken session is closed for good, never handed back.
        self.engine: Engine = make_engine(url, poolclass=NullPool, connect_args=connect_args)
        self._conn: Connection | None = None
        self._timeout_ms = timeout_ms

    def _connect(self) -> Connection:
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        for setting, value in _KEEPALIVE.items():
            conn.execute(text(f"SET {setting} = {int(value)}"))
        # A proof that cannot answer within the lease is no proof.
        conn.execute(text(f"SET statement_timeout = {self._timeout_ms}"))
        return conn

    def _check_and_take(self, wanted: set[str]) -> set[str]:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        keys = {lock_key(name): name for name in wanted}
        rows = conn.execute(
            text(
                "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND classid = CAST(:ns AS oid) AND objsubid = 2 AND granted"
            ),
            {"ns": LOCK_NAMESPACE},
        ).scalars()
        held = {keys[int(k)] for k in rows if int(k) in keys}
        gained = set()
        for key, name in keys.items():
            if name in held:
                continue
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:ns, :key)"), {"ns": LOCK_NAMESPACE, "key": key}
            ).scalar()
            if got:
                gained.add(name)
        return held | gained

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
            with contextlib.suppress(Exception):
                conn.close()

    def _release_all(self) -> None:
        # Unlocked before the session closes: the server ends a closed session's backend (and releases its
        # locks) a moment later, and the next leader should not wait for that on a clean stop.
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(text("SELECT pg_advisory_unlock_all()"))
        self._reset()
        self.engine.dispose()


class FileElector(_Base):
    """flock on files beside the SQLite database: one host, one file, the kernel releases a dead holder's lock."""

    kind = "file"

    def __init__(
        self,
        database: Path,
        identity: Identity,
        *,
        check_s: float = 1.0,
        lease_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(identity, check_s=check_s, lease_s=lease_s, clock=clock)
        self.database = database
        self._fds: dict[str, int] = {}

    def path_for(self, name: str) -> Path:
        """Return the lock file of a job name (beside the database, 0600)."""
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return self.database.with_name(f"{self.database.name}.leader-{slug}.lock")

    def _check_and_take(self, wanted: set[str]) -> set[str]:
        for name in sorted(wanted - set(self._fds)):
            fd = os.open(self.path_for(name), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._fds[name] = fd
            # Who holds it, for a person looking at the folder; the lock itself is what counts.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.identity.worker_id} {self.identity.host} {self.identity.pid}\n".encode(), 0)
        # A held flock cannot be lost while this process lives and keeps the descriptor open.
        return set(self._fds)

    def _release_all(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases its flock

    def _reset(self) -> None:
        self._release_all()


def elector_for(url: str, identity: Identity, *, check_s: float, lease_s: float) -> _Base:
    """Return the elector that fits the database: advisory locks on PostgreSQL, flock beside a SQLite file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ValueError("leader election on SQLite needs a database file (locks are taken beside it)")
        return FileElector(Path(database), identity, check_s=check_s, lease_s=lease_s)
    return PostgresElector(url, identity, check_s=check_s, lease_s=lease_s)
