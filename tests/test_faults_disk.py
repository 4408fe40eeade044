"""Disk full, for real: the controller's database and an agent's state on a size-limited tmpfs that fills.

Real mosquitto, a real `controller serve` and real agent processes, as in test_pipeline_faults.py; the
filesystem is a tmpfs mounted inside the test's temp folder (tests/support/smallfs.py), filled with one file
and freed by deleting it, so every ENOSPC comes from the kernel. Nothing outside the mount point is touched.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, text
from support.site import Site, wait_for
from support.smallfs import fill, free, small_tmpfs
from test_doors_offline import ALICE, BOB, KEY, SITE_KEY, _site_yaml
from test_pipeline_faults import add_agent, assert_exactly_once, simulate, start_controller, wait_exit

from sekisho.agents.doors.attach import attach_doors
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.agents.runtime.errors import OutboxFull
from sekisho.agents.runtime.outbox import Outbox
from sekisho.controller.store import make_engine
from sekisho.controller.store.models import Agent as AgentRow
from sekisho.controller.store.models import Event as EventRow
from sekisho.drivers.locker import SimulatedLockerBoard
from sekisho.drivers.osdp import ReaderConfig, SimulatedReaderLink
from sekisho.drivers.osdp.simulated import LedFeedback

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


DOOR = "door-t1"
READERS = ("rdr-in", "rdr-out", "rdr-keys")


def _door_colours(readers: SimulatedReaderLink, reader: str, start: int) -> list[str]:
    """The LED colours shown at ``reader`` since feedback item ``start`` (green: go, red: refused)."""
    return [str(f.colour) for f in readers.feedback[start:] if isinstance(f, LedFeedback) and f.reader_id == reader]


def _heartbeat_error(site: Site) -> str | None:
    with site.store().engine.connect() as conn:
        beat = conn.execute(select(AgentRow.last_heartbeat).where(AgentRow.id == DOOR)).scalar_one_or_none()
    last = (beat or {}).get("last_error") or {}
    return last.get("code")


def test_door_agent_disk_full_refuses_unrecorded_releases_says_so_then_resumes(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The door agent's state (outbox, policy cache, door state) on a tmpfs that fills.

    The chosen behaviour (docs/operations.md, "Fault matrix"): no release without its record. A grant that
    cannot be written is refused (relay untouched, red LED); a refusal is still refused; the agent keeps
    running, logs the full disk once and its heartbeat carries last_error ``outbox_full``; nothing of what
    it did record is lost, no sequence number is skipped; once space is freed the same card opens again.
    """
    with small_tmpfs(tmp_path / "agentfs", 16) as disk:
        site.lab.add_agent(
            DOOR, resend_after_s=3, heartbeat_interval_s=1, reconnect_max_s=2, state_dir=str(disk / "state")
        )
        site.lab.register_agents(DOOR)
        site.lab.spawn_controller(http=True)
        site.wait_ready()
        policy = _site_yaml(site.lab.root / "site.yaml")
        site.lab.sekisho("policy", "apply", str(policy), "--config", str(site.lab.controller_config))
        agent = Agent(load_config(site.lab.agent_config(DOOR)))
        readers = SimulatedReaderLink(
            [
                ReaderConfig(reader_id=r, address=i + 1, scbk=KEY)
                for i, r in enumerate(("rdr-in", "rdr-out", "rdr-keys"))
            ]
        )
        board = SimulatedLockerBoard(relays=2, doors=2, key_slots=1)
        doors = attach_doors(
            emit=agent.emit, policy=agent.policy, state_dir=agent.config.state_dir, readers=[readers],
            board=board, site_key=SITE_KEY, commands=agent.commands, tick_s=0.02,
        )  # fmt: skip
        agent.start()
        doors.start()
        try:
            wait_for(lambda: agent.policy.version == 1, 30, "the signed policy to reach the door agent")
            assert readers.present_card("rdr-in", ALICE)
            assert board.status().relays_commanded[0], "Alice let in before the disk filled"
            wait_for(lambda: not board.status().relays_commanded[0], 15, "the room door to lock again")
            wait_for(lambda: agent.stats().outbox_depth == 0, 30, "everything so far acknowledged")
            recorded_before = agent.stats().next_seq - 1

            # SQLite reuses a WAL's space after a checkpoint: truncated, the next event needs new blocks.
            with sqlite3.connect(agent.config.outbox_path) as conn:
                assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            fill(disk)

            caplog.clear()
            relays_before = len(board.relay_log())
            fed = len(readers.feedback)
            assert readers.present_card("rdr-in", ALICE)  # allowed, but the grant cannot be written
            assert readers.present_card("rdr-keys", BOB)  # not allowed at the cabinet: refused as ever
            assert readers.present_card("rdr-in", ALICE)
            assert len(board.relay_log()) == relays_before, "a relay moved without its record"
            assert not any(board.status().relays_commanded)
            assert _door_colours(readers, "rdr-in", fed) == ["red", "red"]
            assert _door_colours(readers, "rdr-keys", fed) == ["red"]
            assert agent.stats().next_seq - 1 == recorded_before, "a sequence number was used by an unwritten event"
            last = agent.health().last_error
            assert last is not None and last["code"] == "outbox_full"
            full_lines = [r for r in caplog.records if "the disk is full; events cannot be recorded" in r.getMessage()]
            assert len(full_lines) == 1, "the full disk must be logged once, not once per tap"
            wait_for(lambda: _heartbeat_error(site) == "outbox_full", 30, "the heartbeat to report outbox_full")

            free(disk)
            fed = len(readers.feedback)
            assert readers.present_card("rdr-in", ALICE)
            assert board.status().relays_commanded[0], "Alice let in again once space was freed"
            assert _door_colours(readers, "rdr-in", fed) == ["green"]
            assert any("writable again; 6 event(s) were refused" in r.getMessage() for r in caplog.records)
            wait_for(lambda: not board.status().relays_commanded[0], 15, "the room door to lock again")
            wait_for(lambda: agent.stats().outbox_depth == 0, 60, "every recorded event acknowledged")
            final = agent.stats().next_seq - 1
            store = site.store()
            wait_for(lambda: len(store.event_seqs(DOOR)) >= final, 30, "every recorded event stored")
            assert store.event_seqs(DOOR) == list(range(1, final + 1)), "lost, doubled or a gap"
            assert store.verify_chains(DOOR, signatures=True) == []
            with store.engine.connect() as conn:
                granted = conn.execute(
                    select(func.count()).select_from(EventRow)
                    .where(EventRow.agent_id == DOOR, EventRow.type == "door.access_granted")
                ).scalar_one()  # fmt: skip
            assert granted == 2, "exactly the two releases that were recorded"
        finally:
            doors.stop()
            agent.stop()
            site.close()
            site.lab.stop_all()


def test_outbox_on_a_full_disk_says_full_uses_no_number_and_goes_on_when_freed(tmp_path: Path) -> None:
    """The outbox reports the full disk as such (SQLite rolled back already: no masking 'no transaction')."""
    with small_tmpfs(tmp_path / "outboxfs", 4) as disk:
        outbox = Outbox(disk / "outbox.sqlite3", signing_key=Ed25519PrivateKey.generate(), agent_id="term-x")
        try:
            assert outbox.append("test.synthetic", {"n": 0}) == 1
            with sqlite3.connect(disk / "outbox.sqlite3") as conn:
                assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            fill(disk)
            with pytest.raises(OutboxFull, match="the disk is full; the event was not recorded"):
                outbox.append("test.synthetic", {"n": 1})
            with pytest.raises(OutboxFull):
                outbox.append_many([("test.synthetic", {"n": 1}), ("test.synthetic", {"n": 2})])
            with pytest.raises(OutboxFull, match="cannot remove acknowledged events"):
                outbox.remove_ranges([(1, 1)])
            assert outbox.next_seq == 2
            free(disk)
            assert outbox.append("test.synthetic", {"n": 1}) == 2, "the refused event's number was not used"
            assert [seq for seq, _ in outbox.pending()] == [1, 2]
            assert outbox.remove_ranges([(1, 2)]) == 2
        finally:
            outbox.close()
