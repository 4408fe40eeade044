"""Ingest tells a store out of space from a message the store refuses (controller/ingest/storage_full.py)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from sekisho.controller.ingest.storage_full import storage_full


def _sqlite_full(tmp_path: Path) -> OperationalError:
    """A real SQLITE_FULL from SQLite itself: a database capped at a few pages, written past its cap."""
    engine = create_engine(f"sqlite:///{tmp_path / 'capped.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (v BLOB)"))
        with pytest.raises(OperationalError) as caught, engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA max_page_count = 3")
            conn.execute(text("INSERT INTO t VALUES (zeroblob(100000))"))
        return caught.value
    finally:
        engine.dispose()


def test_sqlite_full_through_sqlalchemy_is_storage_full(tmp_path: Path) -> None:
    err = _sqlite_full(tmp_path)
    assert storage_full(err) == "database or disk is full (SQLITE_FULL)"
    try:
        raise RuntimeError("batch failed") from err
    except RuntimeError as wrapped:
        assert storage_full(wrapped) is not None


def test_postgres_disk_full_and_os_enospc_are_storage_full() -> None:
    assert storage_full(psycopg.errors.DiskFull("could not extend file")) is not None
    assert storage_full(OSError(errno.ENOSPC, "No space left on device")) is not None
    assert storage_full(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None


def test_other_store_errors_are_not_storage_full(tmp_path: Path) -> None:
    assert storage_full(sqlite3.OperationalError("database is locked")) is None
    assert storage_full(IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))) is None
    assert storage_full(psycopg.errors.SerializationFailure("could not serialize")) is None
    assert storage_full(OSError(errno.EIO, "Input/output error")) is None
    assert storage_full(ValueError("bad payload")) is None
