"""A throwaway PostgreSQL cluster on a free loopback port, for tests and benchmarks.

Neither relies on a server this machine happens to run: they initdb a cluster in a temp
directory, start it on a free port, and stop it at the end. As root, PostgreSQL refuses to run, so
the cluster is owned by and run as the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql


def find_pg_bin() -> Path | None:
    """Return the directory holding initdb/pg_ctl, or None if PostgreSQL is not installed."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_cluster(keep_in: Path | None = None) -> Iterator[str]:
    """Start a private cluster; yield a SQLAlchemy URL base (`postgresql+psycopg://postgres@127.0.0.1:PORT`).

    With keep_in, the cluster lives in that directory, is started from what an earlier call left there, and is
    stopped cleanly instead of removed (a benchmark's loaded data kept for the next run).
    """
    bindir = find_pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    if keep_in is None:
        root = Path(tempfile.mkdtemp(prefix="sekisho-pg-"))
    else:
        root = keep_in
        root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
        if subprocess.run([*run_as, "test", "-w", str(root)], check=False).returncode != 0:
            raise RuntimeError(f"the postgres user cannot reach {root}: every folder above it needs o+x")
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    if not (data / "PG_VERSION").exists():
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"],
            check=True,
            capture_output=True,
            env=env,
        )
    opts = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=on -c max_connections=50"
    )
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        # A kept cluster is shut down cleanly (no recovery on the next start); a throwaway one at once.
        mode = "fast" if keep_in is not None else "immediate"
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "stop"],
            capture_output=True,
            env=env,
            check=False,
        )
        if keep_in is None:
            shutil.rmtree(root, ignore_errors=True)


@contextmanager
def pg_database(base: str, name: str | None = None, fresh: bool = True) -> Iterator[str]:
    """Yield the URL of a database on the private cluster: a randomly named one dropped afterwards, or `name`, kept.

    A named database is created when missing and, with fresh, emptied first (dropped and created again).
    """
    kept = name is not None
    name = name or f"sekisho_test_{uuid.uuid4().hex[:12]}"
    admin_dsn = base.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        if kept and fresh:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{base}/{name}"
    finally:
        if not kept:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
