"""Several controller processes on one database: one leader per background job, takeover after SIGKILL.

Two real `controller serve` processes (each with its own HTTP port) share a real broker and one database:
the private PostgreSQL of the tests, or one SQLite file (file locks). Exactly one of them leads each
leader-only job; SIGKILL the leader and the other takes every job over within the bound, and an alert raised
before and one raised after the kill each reach the guard's mailbox exactly once. `sekisho controller status`
and /readyz show both processes and what each leads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alert_fixtures import Mailbox, policy_text, smtp_server
from sqlalchemy import select
from support.mqtt import connect_client
from support.site import Site, wait_for

from sekisho.controller.store import Store
from sekisho.controller.store.models import AlertNotification
from sekisho.deploy.broker import find_free_port
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab.pgcluster import pg_database
from sekisho.protocol import signing, topics
from sekisho.protocol.catalogue import DoorAlarm
from sekisho.protocol.events import build_event

DOOR_AGENT = "door-hr-01"
GUARD = "guard@example.invalid"
# One step, no repeat: each forced door is one mail to the guard desk, whoever runs the jobs.
ONE_MAIL = """
alerts:
  contacts:
    - {id: guard-desk, name: 警備室 日勤, email: guard@example.invalid}
  escalations:
    - id: doors
      steps:
        - {after_minutes: 0, notify: [guard-desk]}
      repeat: 0
  rules:
    door_forced: {severity: critical, escalation: doors}
"""
# The jobs only one process may run (controller/service.py and the jobs' leader_only).
LEADER_ONLY = {
    "policy publication",
    "media overdue check",
    "door registers",
    "certificate expiry check",
    "chain verification",
    "alerts",
}
# How soon the survivor must lead every job after the leader's SIGKILL: a lost session or lock is seen at
# the next try (leader_check_s = 0.5 here), and the status rows are written every second.
TAKEOVER_S = 20.0


@contextmanager
def database(backend: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Yield the database URL for the backend (None: the lab's SQLite file)."""
    if backend == "postgres":
        with pg_database(request.getfixturevalue("pg_server")) as url:
            yield url
        return
    yield None


def publish_forced(site: Site, door: str, seq: int) -> None:
    """Publish a signed door.alarm (forced_open) as the door agent would, and wait for the broker's PUBACK."""
    creds = AgentCredentials.at(site.lab.pki_dir, DOOR_AGENT)
    alarm = DoorAlarm(door=door, alarm="forced_open").model_dump(mode="json", exclude_none=True)
    raw = build_event(
        signing.load_private_key(creds.signing_key), agent=DOOR_AGENT, seq=seq, type="door.alarm", payload=alarm
    )
    client = connect_client(site.lab.pki_dir, site.lab.broker.port, DOOR_AGENT)
    try:
        assert not client.publish_wait(topics.topic(DOOR_AGENT, topics.EVENTS), raw).is_failure
    finally:
        client.close()


def status(site: Site) -> dict[str, dict[str, Any]]:
    """Return `sekisho controller status --json`, by worker id."""
    done = site.lab.sekisho("controller", "status", "--json", "--config", str(site.lab.controller_config))
    return {row["worker_id"]: row for row in json.loads(done.stdout)}


def readyz(port: int) -> dict[str, Any]:
    """Return a web process's /readyz answer (the dev profile with no user shows loopback its checks)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
        body: dict[str, Any] = json.loads(answer.read())
        return body


def ready(port: int) -> bool:
    """Tell whether a web process answers ready."""
    try:
        return bool(readyz(port)["status"] == "ok")
    except OSError:
        return False


def notifications(store: Store) -> list[Any]:
    """Return every notification in the outbox."""
    n = AlertNotification.__table__.c
    with store.engine.connect() as conn:
        return list(conn.execute(select(n.id, n.alert_id, n.target, n.state, n.attempts).order_by(n.id)))


def published(site: Site, worker: str) -> int:
    """Count a process's policy publications in its log."""
    log = (site.lab.root / "logs" / f"{worker}.log").read_text(errors="replace")
    return log.count("published policy version")


def leads_of(rows: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """Return what each live (not silent) process leads."""
    return {worker: set(row["leads"]) for worker, row in rows.items() if not row["silent"]}


@pytest.mark.broker
@pytest.mark.faults
@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_controllers_one_leader_per_job_and_the_survivor_takes_over_after_sigkill(
    site: Site, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as smtp_port, database(backend, request) as url:
        lab = site.lab
        lab.database_url = url
        smtp = {"host": "127.0.0.1", "port": smtp_port, "sender": "Sekisho <alerts@example.invalid>", "timeout_s": 5.0}
        alerts = {"every_s": 0.2, "delivery_every_s": 0.2, "smtp": smtp}
        lab.write_controller_config(alerts=alerts, leader_check_s=0.5, process_beat_s=1.0)
        lab.add_agent(DOOR_AGENT)
        lab.register_agents(DOOR_AGENT)
        policy = tmp_path / "site.yaml"
        policy.write_text(policy_text(ONE_MAIL), encoding="utf-8")
        lab.sekisho("policy", "apply", str(policy), "--config", str(lab.controller_config))

        ports = {"controller-1": find_free_port(), "controller-2": find_free_port()}
        first = lab.spawn_controller(http=True, worker_id="controller-1", http_port=ports["controller-1"])
        wait_for(lambda: ready(ports["controller-1"]), 60, "controller-1 to be ready")
        second = lab.spawn_controller(http=True, worker_id="controller-2", http_port=ports["controller-2"])
        wait_for(lambda: ready(ports["controller-2"]), 60, "controller-2 to be ready")
        # And an ingest-only worker: no HTTP, no jobs; the status rows are where it is seen.
        ingest = lab.spawn_controller(http=False, worker_id="controller-3")

        # All report; every leader-only job has exactly one leader, and it is the first one up.
        everyone = {*ports, "controller-3"}
        wait_for(lambda: set(leads_of(status(site))) == everyone, 60, "every process in controller status")
        wait_for(
            lambda: (
                leads_of(status(site)) == {"controller-1": LEADER_ONLY, "controller-2": set(), "controller-3": set()}
            ),
            30,
            "controller-1 to lead every leader-only job, the others none",
        )
        wait_for(lambda: all(row["ready"] for row in status(site).values()), 30, "every process ready")
        rows = status(site)
        assert {w: rows[w]["role"] for w in everyone} == {
            "controller-1": "serve",
            "controller-2": "serve",
            "controller-3": "ingest",
        }
        assert {rows[w]["pid"] for w in everyone} == {first.pid, second.pid, ingest.pid}
        assert all(rows[w]["ingest"]["connected"] for w in everyone)
        # Each web process's /readyz says which process answered and what it leads.
        for worker, port in ports.items():
            process = readyz(port)["checks"]["process"]
            assert process["worker_id"] == worker
            assert process["role"] == "serve"
        assert set(readyz(ports["controller-1"])["checks"]["process"]["leads"]) == LEADER_ONLY
        assert readyz(ports["controller-2"])["checks"]["process"]["leads"] == []

        # The policy went out once, from the leader; the other process published nothing.
        wait_for(lambda: published(site, "controller-1") == 1, 30, "the leader's publication")
        assert published(site, "controller-2") == 0
        store = site.store()
        publish_forced(site, "room-hr", 1)
        wait_for(lambda: len(mailbox.mails) >= 1, 60, "the first alert's mail")
        wait_for(lambda: [r.state for r in notifications(store)] == ["sent"], 30, "the first notification sent")

        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
        killed_at = time.monotonic()
        # Its own /readyz is the survivor's word at once (the status rows follow within a beat).
        wait_for(
            lambda: set(readyz(ports["controller-2"])["checks"]["process"]["leads"]) == LEADER_ONLY,
            TAKEOVER_S,
            "controller-2 to lead every job after controller-1 was killed",
            interval=0.05,
        )
        taken_over_s = time.monotonic() - killed_at
        wait_for(lambda: leads_of(status(site)).get("controller-2") == LEADER_ONLY, 30, "the status rows to follow")

        # The new leader publishes the version in force once (it cannot know when the dead one signed it).
        wait_for(lambda: published(site, "controller-2") == 1, 30, "the new leader's publication")
        # The survivor's alert engine raises the next alert; its delivery sends it, once.
        publish_forced(site, "locker-01", 2)
        wait_for(lambda: len(mailbox.mails) >= 2, 60, "the second alert's mail (raised by the survivor)")
        wait_for(lambda: [r.state for r in notifications(store)] == ["sent", "sent"], 30, "both notifications sent")
        # Stopped cleanly: whatever it could still send has gone, so the mailbox below is final.
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
        ingest.send_signal(signal.SIGTERM)
        assert ingest.wait(timeout=60) == 0
        assert published(site, "controller-2") == 1, "the policy was published again without a new version"

        rows_after = status(site)
        # The clean stop removed its row; the killed process's row stays, and is shown silent.
        assert "controller-2" not in rows_after and "controller-3" not in rows_after
        assert rows_after["controller-1"]["silent"]

        mails = mailbox.mails
        rows_n = notifications(store)
        site.close()
    assert [m.to for m in mails] == [GUARD, GUARD], "an alert's mail was lost or sent twice"
    assert sorted(m.notification for m in mails) == [r.id for r in rows_n]
    assert [(r.target, r.state, r.attempts) for r in rows_n] == [(GUARD, "sent", 1), (GUARD, "sent", 1)]
    assert len({r.alert_id for r in rows_n}) == 2
    print(f"takeover after SIGKILL ({backend}): {taken_over_s:.1f} s")


def test_controller_status_with_no_process_says_so(site: Site) -> None:
    done: subprocess.CompletedProcess[str] = site.lab.sekisho(
        "controller", "status", "--json", "--config", str(site.lab.controller_config)
    )
    assert json.loads(done.stdout) == []
