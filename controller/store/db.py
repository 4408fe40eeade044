"""Engines and schema migrations: SQLite by default, PostgreSQL (psycopg 3) for larger sites."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# Execution option read by the SQLite "begin" hook: "IMMEDIATE" takes the write lock at BEGIN.
SQLITE_BEGIN = "sekisho_sqlite_begin"

# Any constant works; it only has to be the same in every controller worker running upgrade().
_MIGRATION_LOCK_KEY = 0x5E_C1_5E_0001
_BUSY_TIMEOUT_MS = 30_000

# The database holds who handled My Number data when: only the controller's own user may read it.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# SQLite creates these next to the database with the database file's own mode.
_SQLITE_FILES = ("", "-wal", "-shm", "-journal")


def default_url(var_dir: Path) -> str:
    """Return the URL of the default SQLite database under the controller's state directory."""
    return f"sqlite:///{(var_dir / 'controller.db').resolve()}"


def _tighten(path: Path, mode: int) -> None:
    """Take away every permission bit outside mode from an existing file or folder, saying so."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if not current & ~mode:
        return
    try:
        path.chmod(current & mode)
    except OSError as err:  # not our file (e.g. run as another user): the warning is all we can do
        log.warning("%s is %s, wider than %s, and cannot be tightened: %s", path, oct(current), oct(mode), err)
        return
    log.warning(
        "tightened %s from %s to %s (others could read the controller's records)",
        path,
        oct(current),
        oct(current & mode),
    )


def private_dir(path: Path) -> None:
    """Create a folder only its owner can enter (0700), or tighten an existing one to that."""
    if path.is_dir():
        _tighten(path, PRIVATE_DIR_MODE)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    _tighten(path, PRIVATE_DIR_MODE)


def private_sqlite_files(database: Path) -> None:
    """Make a SQLite database file 0600 before SQLite opens it, and tighten its -wal/-shm files.

    Created here (an empty file is an empty database), the file never exists with a wider mode; SQLite then
    creates the -wal and -shm files with the database file's mode. Files of an earlier start are tightened.
    A missing folder is created 0700; an existing one is left as it is (it may not be ours alone).
    """
    if not database.parent.exists():
        private_dir(database.parent)
    # Never open an existing database: closing any descriptor of a file drops every POSIX lock this process
    # holds on it, so an engine made beside a live connection in the same process (a second Store, a tool)
    # would strip that connection's locks and let two writers corrupt the file. O_EXCL only ever opens a new one.
    try:
        fd = os.open(database, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for suffix in _SQLITE_FILES:
        _tighten(database.with_name(database.name + suffix), PRIVATE_FILE_MODE)


def _normalise(url: str | URL) -> URL:
    parsed = make_url(url)
    # A bare postgresql:// would pick psycopg2, which this project does not install.
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(
    url: str | URL,
    *,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    application_name: str | None = None,
    **kwargs: Any,
) -> Engine:
    """Create an engine with the settings the store relies on (durable SQLite, psycopg 3 PostgreSQL).

    On PostgreSQL, pool_size and max_overflow bound the connections this process holds (every controller
    process has a pool of its own), and application_name names the process in pg_stat_activity. SQLite
    ignores the three: it is one file with one writer.
    """
    parsed = _normalise(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        if pool_size is not None:
            kwargs["pool_size"] = pool_size
        if max_overflow is not None:
            kwargs["max_overflow"] = max_overflow
        if application_name is not None:
            kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "application_name": application_name}
        return create_engine(parsed, **kwargs)

    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        private_sqlite_files(Path(database))
    engine = create_engine(parsed, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would skip BEGIN before SELECTs,
        # breaking snapshot reads) and emit BEGIN ourselves in the "begin" hook below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer must hold the lock from the start: upgrading a read transaction to a write one
        # in WAL mode fails at once with SQLITE_BUSY instead of waiting for busy_timeout.
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")

    return engine


def alembic_config(url: str | URL | None = None) -> Config:
    """Build the Alembic configuration in code (no alembic.ini is needed at run time)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        # ConfigParser interpolates '%', which may appear in a URL-encoded password.
        rendered = _normalise(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def upgrade(target: Engine | str | URL, revision: str = "head") -> None:
    """Bring the database schema up to the given Alembic revision (default: the newest)."""
    engine = target if isinstance(target, Engine) else make_engine(target)
    try:
        config = alembic_config()
        with engine.connect() as conn:
            conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    # Several workers may start at once; let one migrate while the others wait.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
        if engine.dialect.name == "sqlite":
            # Copy the migrated pages into the database file now and empty the WAL: data a migration drops
            # (0004: the dead letters' plain digests) then has no older copy left in either file.
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        if engine is not target:
            engine.dispose()


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """Open a transaction that holds SQLite's writer lock from BEGIN (plain BEGIN on PostgreSQL)."""
    with engine.connect() as conn:
        conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with conn.begin():
            yield conn
