"""Consistent copies of the store and loading them back: SQLite's online backup API, pg_dump and pg_restore.

A SQLite database in WAL mode keeps recent commits in controller.db-wal until a checkpoint: copying
controller.db alone (`cp`) gives a file without them — often without any table at all. The online backup
API copies through SQLite's pager, WAL content included, as one consistent snapshot, even while the
controller writes.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from sekisho.common.i18n import _
from sekisho.controller.backup.archive import BackupError
from sekisho.controller.backup.state import DatabaseState, read_state
from sekisho.controller.store.db import PRIVATE_FILE_MODE, make_engine, private_sqlite_files

# pg_dump of a big site takes a while; a hung one must not hold the backup job forever.
PG_TIMEOUT_S = 3600
_BUSY_TIMEOUT_S = 30


def backend_of(url: str) -> str:
    """Return "sqlite" or "postgresql" for a database URL (BackupError for anything else)."""
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(_("backups support SQLite and PostgreSQL, not %(backend)s", backend=repr(backend)))
    return backend


def sqlite_file(url: str) -> Path:
    """Return the database file of a SQLite URL (BackupError for in-memory or URI databases)."""
    database = make_url(url).database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        raise BackupError(
            _("SQLite database %(database)s is not a file that can be backed up", database=repr(database or "(none)"))
        )
    return Path(database)


def _new_private_file(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE_MODE)
    os.close(fd)


def _read_copy_state(copy: Path) -> DatabaseState:
    # A plain engine: make_engine would switch the copy to WAL mode and give it -wal/-shm files.
    engine = create_engine(f"sqlite:///{copy}")
    try:
        with engine.connect() as conn:
            return read_state(conn)
    finally:
        engine.dispose()


def copy_sqlite(database: Path, target: Path) -> DatabaseState:
    """Copy a live SQLite database (WAL content included) into a new file target; return its state."""
    if not database.is_file():
        raise BackupError(_("no database at %(database)s", database=database))
    _new_private_file(target)
    source = sqlite3.connect(database, timeout=_BUSY_TIMEOUT_S)
    try:
        dest = sqlite3.connect(target)
        try:
            # pages=-1: one step under one read lock, so the copy is a single consistent snapshot.
            source.backup(dest, pages=-1)
            # One self-contained file: no -wal to forget when the copy is moved.
            dest.execute("PRAGMA journal_mode=DELETE")
            check = dest.execute("PRAGMA integrity_check").fetchone()
        finally:
            dest.close()
    except sqlite3.Error as err:
        raise BackupError(_("SQLite backup of %(database)s failed: %(err)s", database=database, err=err)) from err
    finally:
        source.close()
    if check is None or check[0] != "ok":
        raise BackupError(
            _("the copy of %(database)s fails SQLite's integrity check: %(check)s", database=database, check=check)
        )
    return _read_copy_state(target)


def load_sqlite(copy: Path, database: Path) -> None:
    """Replace the content of a SQLite database with a copy, through the backup API (0600, WAL handled)."""
    private_sqlite_files(database)
    source = sqlite3.connect(copy)
    try:
        dest = sqlite3.connect(database, timeout=_BUSY_TIMEOUT_S)
        try:
            source.backup(dest, pages=-1)
        finally:
            dest.close()
    except sqlite3.Error as err:
        raise BackupError(_("loading the copy into %(database)s failed: %(err)s", database=database, err=err)) from err
    finally:
        source.close()
    private_sqlite_files(database)


def pg_tool(name: str) -> str:
    """Return the path of pg_dump or pg_restore (the newest installed), BackupError if missing."""
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps one folder per major version: the newest can dump every older server.
    versions = [p for p in glob.glob(f"/usr/lib/postgresql/*/bin/{name}") if p.split("/")[4].isdigit()]
    candidates = sorted(versions, key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise BackupError(_("%(name)s is not installed (Debian: apt-get install postgresql-client)", name=name))
    return candidates[-1]


def libpq_target(url: str) -> tuple[str, dict[str, str]]:
    """Return a libpq connection URI without the password, and the environment that carries it."""
    parsed: URL = make_url(url)
    env = dict(os.environ)
    if parsed.password is not None:
        # Never on the command line, where every local user could read it in the process list.
        env["PGPASSWORD"] = str(parsed.password)
    dsn = parsed.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    return dsn, env


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=PG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackupError(_("%(what)s failed: %(err)s", what=what, err=err)) from err
    if done.returncode != 0:
        raise BackupError(
            _(
                "%(what)s failed (exit %(code)s): %(stderr)s",
                what=what,
                code=done.returncode,
                stderr=done.stderr.strip()[-2000:],
            )
        )


def dump_postgres(url: str, target: Path) -> DatabaseState:
    """pg_dump (custom format) the database into target; the state is read from the very same snapshot."""
    dsn, env = libpq_target(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
                state = read_state(conn)
                _new_private_file(target)
                # The exported snapshot lives while this transaction is open: pg_dump sees what we counted.
                _run(
                    [
                        pg_tool("pg_dump"),
                        "--format=custom",
                        f"--snapshot={snapshot}",
                        "--no-owner",
                        "--file",
                        str(target),
                        "--dbname",
                        dsn,
                    ],
                    env,
                    "pg_dump",
                )
    finally:
        engine.dispose()
    return state


def load_postgres(dump: Path, url: str) -> None:
    """Empty the database's public schema and pg_restore the dump into it in one transaction."""
    dsn, env = libpq_target(url)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            # Tables a newer schema added would survive a plain --clean and break the upgrade that follows.
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
    _run(
        [pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "--single-transaction", "--dbname", dsn, str(dump)],
        env,
        "pg_restore",
    )


def live_state(url: str) -> DatabaseState:
    """Read the state of a live database (raises sqlalchemy errors if unreadable)."""
    engine = make_engine(url) if backend_of(url) == "postgresql" else create_engine(url)
    try:
        with engine.connect() as conn:
            return read_state(conn)
    finally:
        engine.dispose()
