"""Zero loss, zero duplicates under faults: real mosquitto, real controller and agent processes, SIGKILL.

Each test pushes thousands of events through `sekisho agent simulate` (a real agent process with its
durable outbox) and `sekisho controller serve` (real ingest into a real store), breaks something with
SIGKILL, and then checks exact counts: every emitted event stored exactly once, no sequence gap.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from sqlalchemy import select
from support.site import Site, wait_for

from sekisho.controller.store.models import Finding
from sekisho.lab.pgcluster import pg_database

pytestmark = [pytest.mark.broker, pytest.mark.faults]

N = 3000
AGENT = "term-f1"


def start_controller(site: Site, worker: str = "controller-1", http: bool = True) -> subprocess.Popen[bytes]:
    proc = site.lab.spawn_controller(http=http, worker_id=worker)
    if http:
        site.wait_ready()
    return proc


def simulate(site: Site, agent: str, count: int, *, rate: float | None = None) -> subprocess.Popen[bytes]:
    args = ["agent", "simulate", "--config", str(site.lab.agent_config(agent)), "--count", str(count)]
    if rate:
        args += ["--rate", str(rate)]
    return site.lab.spawn(*args, "--exit-when-drained", "--timeout", "240", log_name=f"{agent}-{time.monotonic_ns()}")


def add_agent(site: Site, agent: str = AGENT) -> None:
    # A short resend timer keeps the tests quick; the default (30 s) only changes how long recovery takes.
    site.lab.add_agent(agent, resend_after_s=3, heartbeat_interval_s=5, reconnect_max_s=2)
    site.lab.register_agents(agent)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, f"agent did not drain (exit {proc.returncode})"


def assert_exactly_once(site: Site, agent: str, count: int) -> None:
    payload_counters = site.synthetic_seqs(agent)
    assert len(payload_counters) == count, f"stored {len(payload_counters)} of {count} events"
    assert payload_counters == list(range(count)), "an event is missing or stored twice"
    store = site.store()
    seqs = store.event_seqs(agent)
    assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers have a gap or a duplicate"
    with store.engine.connect() as conn:
        open_gaps = conn.execute(select(Finding).where(Finding.agent_id == agent, Finding.resolved_at.is_(None))).all()
    assert open_gaps == []
    assert store.verify_chains(agent, signatures=True) == []
    assert site.outbox_depth(agent) == 0


def test_broker_killed_mid_stream_and_restarted(site: Site) -> None:
    add_agent(site)
    start_controller(site)
    agent = simulate(site, AGENT, N, rate=1500)
    wait_for(lambda: site.count_events() > 300, 30, "the stream to be under way")
    site.lab.broker.kill()
    time.sleep(2.0)
    site.lab.broker.start()
    wait_exit(agent)
    assert_exactly_once(site, AGENT, N)


def test_controller_killed_mid_batch_and_restarted(site: Site) -> None:
    add_agent(site)
    controller = start_controller(site)
    agent = simulate(site, AGENT, N, rate=1500)
    wait_for(lambda: site.count_events() > 300, 30, "the stream to be under way")
    controller.kill()
    controller.wait()
    time.sleep(1.5)
    start_controller(site)
    wait_exit(agent)
    assert_exactly_once(site, AGENT, N)


def test_agent_killed_with_full_outbox_and_restarted(site: Site) -> None:
    add_agent(site)
    # No controller yet: nothing is acknowledged, so the outbox keeps every event.
    agent = simulate(site, AGENT, N)
    wait_for(lambda: site.outbox_depth(AGENT) >= N, 60, "the outbox to hold every event")
    agent.kill()
    agent.wait()
    assert site.outbox_depth(AGENT) >= N
    start_controller(site)
    wait_exit(simulate(site, AGENT, 0))
    assert_exactly_once(site, AGENT, N)


def test_broker_down_while_agent_buffers(site: Site) -> None:
    add_agent(site)
    site.lab.broker.stop()
    agent = simulate(site, AGENT, N)
    wait_for(lambda: site.outbox_depth(AGENT) >= N, 60, "the agent to buffer every event")
    time.sleep(2.0)  # down "for a while": the agent keeps retrying with backoff
    site.lab.broker.start()
    start_controller(site)
    wait_exit(agent)
    assert_exactly_once(site, AGENT, N)


@pytest.mark.postgres
def test_two_workers_on_postgres_one_killed(site: Site, pg_server: str) -> None:
    with pg_database(pg_server) as url:
        site.lab.database_url = url
        site.lab.write_controller_config()
        agents = ["term-p1", "term-p2"]
        for name in agents:
            add_agent(site, name)
        start_controller(site, "controller-1")
        second = start_controller(site, "controller-2", http=False)
        time.sleep(1.0)
        procs = [simulate(site, name, N, rate=1000) for name in agents]
        wait_for(lambda: site.count_events() > 500, 30, "both workers to be storing")
        second.kill()
        second.wait()
        for proc in procs:
            wait_exit(proc)
        for name in agents:
            assert_exactly_once(site, name, N)
        site.lab.stop_all()
