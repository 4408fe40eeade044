"""PostgreSQL connections per controller process (issue 14): every process (serve, each `controller ingest`)
has a pool of its own, bounded by the configuration and named in pg_stat_activity, so N workers can be sized
against the server's max_connections. Real private PostgreSQL cluster."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout

from sekisho.controller.config import ControllerConfig
from sekisho.controller.service import open_store
from sekisho.controller.store.db import make_engine
from sekisho.lab.pgcluster import pg_database

pytestmark = pytest.mark.postgres


def _config(tmp_path: Path, url: str, **values: object) -> ControllerConfig:
    files = {name: tmp_path / name for name in ("ca_cert", "tls_cert", "tls_key", "signing_key")}
    return ControllerConfig(var_dir=tmp_path / "var", database_url=url, **files, **values)  # type: ignore[arg-type]


def _ours(conn: object, name: str) -> int:
    query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND pid <> pg_backend_pid()")
    return int(conn.execute(query, {"name": name}).scalar_one())  # type: ignore[attr-defined]


def test_a_controller_process_holds_at_most_its_configured_connections(pg_server: str, tmp_path: Path) -> None:
    with pg_database(pg_server) as url:
        config = _config(tmp_path, url, database_pool_size=2, database_max_overflow=1, worker_id="controller-7")
        store = open_store(config)
        try:
            with contextlib.ExitStack() as held:
                conns = [held.enter_context(store.engine.connect()) for _ in range(3)]  # size + overflow
                # Named after the worker, so an operator sees which process holds which connection.
                assert _ours(conns[0], "sekisho-controller-7") == 2
                assert store.engine.pool.checkedout() == 3  # type: ignore[attr-defined]
        finally:
            store.engine.dispose()

        # Past size + overflow, a thread waits for a connection instead of opening one the server may not have.
        engine = make_engine(url, pool_size=2, max_overflow=1, application_name="sekisho-x", pool_timeout=0.2)
        try:
            with contextlib.ExitStack() as held:
                for _ in range(3):
                    held.enter_context(engine.connect())
                with pytest.raises(PoolTimeout):
                    engine.connect()
        finally:
            engine.dispose()
