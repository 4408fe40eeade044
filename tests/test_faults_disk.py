"""Disk full, for real: the controller's database and an agent's state on a size-limited tmpfs that fills.

Real mosquitto, a real `controller serve` and real agent processes, as in test_pipeline_faults.py; the
filesystem is a tmpfs mounted inside the test's temp folder (tests/support/smallfs.py), filled with one file
and freed by deleting it, so every ENOSPC comes from the kernel. Nothing outside the mount point is touched.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from support.site import Site, wait_for
from support.smallfs import fill, free, small_tmpfs
from test_pipeline_faults import add_agent, assert_exactly_once, simulate, start_controller, wait_exit

from sekisho.controller.store import make_engine

pytestmark = [pytest.mark.broker, pytest.mark.faults]

N = 3000
AGENT = "term-f1"


def readyz(site: Site) -> tuple[int, dict[str, Any]]:
    """GET /readyz: the status code and the body (dev profile, no users yet: the checks are shown)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{site.lab.http_port}/readyz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def controller_log(site: Site, worker: str = "controller-1") -> str:
    return (site.lab.root / "logs" / f"{worker}.log").read_text(errors="replace")


def truncate_wal(url: str) -> None:
    """Checkpoint the controller's WAL into the database and truncate it to nothing.

    SQLite reuses a WAL file's space from its start after a checkpoint, so with a big WAL left over from the
    migrations the first batches after the fill would still fit; truncated, every commit needs new blocks.
    """
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            busy = 1
            deadline = time.monotonic() + 30
            while busy and time.monotonic() < deadline:
                busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()[0]
            assert busy == 0, "the controller kept the WAL busy"
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def test_controller_disk_full_mid_stream_stores_nothing_acks_nothing_then_resumes(site: Site, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "dbfs", 48) as disk:
        site.lab.database_url = f"sqlite:///{disk}/controller.db"
        site.lab.write_controller_config()
        add_agent(site)
        controller = start_controller(site)
        agent = simulate(site, AGENT, N, rate=250)
        wait_for(lambda: site.count_events() > 200, 60, "the stream to be under way")
        truncate_wal(site.url)
        fill(disk)

        def full() -> bool:
            code, body = readyz(site)
            return code == 503 and "storage full" in str(body.get("checks", {}).get("ingest", ""))

        wait_for(full, 60, "/readyz to answer 503 naming the full storage")
        stored_when_full = site.count_events()
        assert stored_when_full < N
        # The agent records everything meanwhile; none of it may be acknowledged (its outbox keeps it all).
        wait_for(lambda: site.outbox_depth(AGENT) >= N - stored_when_full, 60, "the agent to keep what was not stored")
        time.sleep(4)  # more than one resend (3 s) and several retries while full
        assert site.count_events() == stored_when_full, "an event was stored while the disk was full"
        assert site.outbox_depth(AGENT) >= N - stored_when_full, "an event left the outbox while the disk was full"
        assert controller.poll() is None, "the controller exited on a full disk"
        log = controller_log(site)
        assert log.count("the database is out of space") == 1, "the full disk must be logged once, not per retry"
        assert "SQLITE_FULL" in log

        free(disk)
        wait_exit(agent)
        wait_for(lambda: readyz(site)[0] == 200, 60, "/readyz to be ready again")
        assert controller.poll() is None
        assert "the database accepts writes again" in controller_log(site)
        assert_exactly_once(site, AGENT, N)
        verify = site.lab.sekisho("records", "verify", "--config", str(site.lab.controller_config), check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        dead = site.store().engine.connect().exec_driver_sql("SELECT count(*) FROM dead_letters").scalar_one()
        assert dead == 0, "a real event was dead-lettered while the disk was full"
        site.close()
        site.lab.stop_all()
