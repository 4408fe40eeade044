"""Leader election by database lock (controller/leader.py) and the jobs that run only on the leader.

Real locks: advisory locks on the tests' private PostgreSQL, flock on files beside a real SQLite database,
and a real second process for the file lock. Time is a controlled clock: no test waits for a lease to run out.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sekisho.controller.leader import Elector, FileElector, Identity, PostgresElector, elector_for, lock_key
from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.store import make_engine, upgrade
from sekisho.lab.pgcluster import pg_database

JOB = "alerts"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def take(elector: Elector, name: str, tries: int = 100) -> bool:
    """Run rounds until the elector leads name: a killed holder's session ends a moment after its socket closes."""
    for _ in range(tries):
        elector.round()  # type: ignore[attr-defined]
        if elector.leads(name):
            return True
        time.sleep(0.05)
    return False


def me(worker: str) -> Identity:
    return Identity(worker, "test-host", 4242)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    with pg_database(pg_server) as url:
        yield url


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    url = f"sqlite:///{tmp_path / 'var' / 'controller.db'}"
    upgrade(url)
    return tmp_path / "var" / "controller.db"


def electors(backend: str, where: str | Path, clock: Clock) -> tuple[Elector, Elector]:
    """Two processes' electors on one database (each with its own session or file descriptors)."""
    if backend == "postgres":
        url = str(where)
        return (
            # The longest lease allowed: its timeouts bound the proofs on a loaded test machine too.
            PostgresElector(url, me("controller-1"), check_s=1.0, lease_s=7.5, clock=clock),
            PostgresElector(url, me("controller-2"), check_s=1.0, lease_s=7.5, clock=clock),
        )
    path = Path(where)
    return (
        FileElector(path, me("controller-1"), check_s=1.0, lease_s=3.0, clock=clock),
        FileElector(path, me("controller-2"), check_s=1.0, lease_s=3.0, clock=clock),
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | Path]]:
    if request.param == "postgres":
        with pg_database(request.getfixturevalue("pg_server")) as url:
            upgrade(url)
            yield "postgres", url
        return
    yield "sqlite", request.getfixturevalue("sqlite_file")


def advisory_locks(backend: tuple[str, str | Path]) -> list[Any]:
    """Return who holds which advisory lock in the database (for a failing assertion's message)."""
    kind, where = backend
    if kind != "postgres":
        return []
    engine = make_engine(str(where))
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT l.database, l.classid, l.objid, l.objsubid, l.granted, a.application_name, a.datname "
                        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
                    )
                )
            )
    finally:
        engine.dispose()


def test_exactly_one_process_leads_each_lock_and_the_other_takes_over_when_it_stops(
    backend: tuple[str, str | Path],
) -> None:
    clock = Clock()
    first, second = electors(*backend, clock)
    for elector in (first, second):
        elector.want(JOB)
        elector.want("policy publication")
    try:
        first.round()  # type: ignore[attr-defined]
        second.round()  # type: ignore[attr-defined]
        held = (first.leading(), second.leading())
        assert held == (["alerts", "policy publication"], []), advisory_locks(backend)
        assert not second.leads(JOB)
        # Rounds go on: the holder keeps its locks, the other still gets none.
        clock.now += 1
        first.round()  # type: ignore[attr-defined]
        second.round()  # type: ignore[attr-defined]
        assert first.leads(JOB) and not second.leads(JOB)
        first.stop()
        assert first.leading() == []
        # A clean stop unlocks before it closes its session: the next round of the other process takes over.
        second.round()  # type: ignore[attr-defined]
        assert second.leading() == ["alerts", "policy publication"], advisory_locks(backend)
    finally:
        first.stop()
        second.stop()


def test_a_proof_older_than_the_lease_is_no_leadership(sqlite_file: Path) -> None:
    clock = Clock()
    elector = FileElector(sqlite_file, me("controller-1"), check_s=1.0, lease_s=3.0, clock=clock)
    elector.want(JOB)
    try:
        elector.round()
        clock.now += 2.9
        assert elector.leads(JOB)
        clock.now += 0.2  # no round proved the lock for longer than the lease: stop acting (fail closed)
        assert not elector.leads(JOB)
        assert elector.leading() == []
        elector.round()
        assert elector.leads(JOB)
    finally:
        elector.stop()


@pytest.mark.postgres
def test_a_leader_whose_session_is_cut_stops_and_the_other_takes_over(pg_url: str) -> None:
    clock = Clock()
    holder = PostgresElector(pg_url, me("controller-1"), lease_s=7.5, clock=clock)
    other = PostgresElector(pg_url, me("controller-2"), lease_s=7.5, clock=clock)
    for elector in (holder, other):
        elector.want(JOB)
    engine = make_engine(pg_url)
    try:
        holder.round()
        other.round()
        assert holder.leads(JOB) and not other.leads(JOB)
        # The session is shown under the process's name, holding the job's lock.
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.objid = CAST(:key AS oid) AND l.granted"
                ),
                {"key": lock_key(JOB)},
            ).all()
            assert [r.application_name for r in rows] == ["sekisho controller-1 test-host 4242"]
            # What a network cut or a DBA ends in the end: PostgreSQL closes the holder's session.
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": rows[0].pid})
            conn.commit()
        # The server ends the session a moment after the signal: the other's next rounds take the lock.
        assert take(other, JOB)
        # The old holder's next proof fails: it leads nothing, even within its lease.
        holder.round()
        assert not holder.leads(JOB)
        assert holder.leading() == []
        # It competes again on a new session, and waits: the lock has a holder.
        holder.round()
        assert not holder.leads(JOB) and other.leads(JOB)
    finally:
        holder.stop()
        other.stop()
        engine.dispose()


HOLD = """
import sys, time
from pathlib import Path
from sekisho.controller.leader import FileElector, Identity
elector = FileElector(Path(sys.argv[1]), Identity("controller-9", "test-host", 9), check_s=1.0, lease_s=3.0)
elector.want("alerts")
elector.round()
print("leads" if elector.leads("alerts") else "follows", flush=True)
time.sleep(600)
"""


def test_the_file_lock_of_a_killed_process_goes_to_the_next(sqlite_file: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(sqlite_file)], stdout=subprocess.PIPE, text=True)
    clock = Clock()
    elector = FileElector(sqlite_file, me("controller-1"), clock=clock)
    elector.want(JOB)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "leads"
        elector.round()
        assert not elector.leads(JOB)
        assert "controller-9 test-host 9" in elector.path_for(JOB).read_text()
        child.kill()
        child.wait(timeout=10)
        assert take(elector, JOB)
        assert "controller-1 test-host 4242" in elector.path_for(JOB).read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        elector.stop()


def test_sqlite_without_a_file_is_refused() -> None:
    with pytest.raises(ValueError, match="database file"):
        elector_for("sqlite://", me("controller-1"), check_s=1.0, lease_s=3.0)


def test_postgres_refuses_a_lease_postgres_could_outlive(pg_url: str) -> None:
    with pytest.raises(ValueError, match="lease_s"):
        PostgresElector(pg_url, me("controller-1"), check_s=1.0, lease_s=9.0)


class Counting(PeriodicJob):
    """A leader-only job that counts its rounds and hears its leadership changes."""

    name = JOB
    every_s = 0.01
    leader_only = True

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0
        self.changes: list[bool] = []
        self.ran = threading.Event()

    def run_once(self) -> None:
        self.rounds += 1
        self.ran.set()

    def leadership_changed(self, leading: bool) -> None:
        self.changes.append(leading)


def test_a_leader_only_job_runs_only_while_its_process_leads(
    sqlite_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sekisho.controller.periodic")
    clock = Clock()
    holder = FileElector(sqlite_file, me("controller-1"), clock=clock)
    mine = FileElector(sqlite_file, me("controller-2"), clock=clock)
    holder.want(JOB)
    holder.round()
    job = Counting()
    job.lead_by(mine)
    mine.round()  # the other process holds the lock: this job must not run
    job.start()
    try:
        assert not job.leads()
        job.poke()
        # The job thread looks several times (every check_s, or on a poke) without running a round.
        for _ in range(5):
            job.poke()
            assert not job.ran.wait(0.05)
        assert job.rounds == 0
        holder.stop()
        mine.round()
        job.poke()
        assert job.ran.wait(10)
        assert job.changes == [True]
        assert "alerts: controller-2 is now the leader" in caplog.text
    finally:
        job.stop()
        mine.stop()
        holder.stop()


class SilentLink:
    """A TCP forwarder to PostgreSQL that can go silent: connections stay open, nothing passes (a cut network)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.silent = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.silent.is_set() and not self.closed.is_set():
                    self.closed.wait(0.05)  # hold the bytes: neither side hears anything
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.closed.set()
        self.server.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.mark.postgres
def test_a_leader_cut_off_by_a_silent_network_stops_leading_when_its_proof_runs_out(pg_url: str) -> None:
    parsed = make_url(pg_url)
    assert parsed.port is not None
    link = SilentLink(parsed.port)
    clock = Clock()
    holder = PostgresElector(
        parsed.set(port=link.port).render_as_string(hide_password=False), me("controller-1"), clock=clock
    )
    holder.want(JOB)
    try:
        holder.round()
        assert holder.leads(JOB)
        link.silent.set()
        # Its next proof gets no answer: the round hangs, and the last proof ages.
        stuck = threading.Thread(target=holder.round, daemon=True)
        stuck.start()
        stuck.join(0.5)
        assert stuck.is_alive(), "the proof should be waiting for the silent database"
        clock.now += 2.9
        assert holder.leads(JOB)
        clock.now += 0.2
        assert not holder.leads(JOB), "a leader that cannot prove its lock must stop acting (fail closed)"
        assert holder.leading() == []
    finally:
        link.close()
        holder.stop()
