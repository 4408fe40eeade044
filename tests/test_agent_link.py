"""The agent against a real mosquitto (mutual TLS, ACL, persistence) and a small acking controller.

Nothing is mocked: the agent signs, the broker routes, the test controller verifies every event with
the agent's public key and answers with signed acks, as the real ingest does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from support.mqtt import connect_client

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.errors import AlreadyRunning
from sekisho.agents.runtime.outbox import Outbox
from sekisho.deploy.broker import Broker
from sekisho.deploy.pki import CONTROLLER_CN
from sekisho.protocol import errors, messages, signing, topics

pytestmark = pytest.mark.broker

if TYPE_CHECKING:
    from agent_fixtures import AckingController, AgentSetup

    from sekisho.agents.runtime.config import AgentConfig

    SetupFn = Callable[..., AgentSetup]
    RunFn = Callable[[AgentConfig], Agent]
    ControllerFn = Callable[..., AckingController]

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0


def until(predicate: Callable[[], bool], timeout: float = WAIT, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def test_2000_events_arrive_verified_and_leave_the_outbox_on_ack(
    agent_setup: SetupFn, run_agent: RunFn, controller: AckingController
) -> None:
    setup = agent_setup()
    agent = run_agent(setup.config)
    seqs = [agent.emit("test.synthetic", {"n": i}) for i in range(2000)]
    assert seqs == list(range(2, 2002))  # seq 1 is agent.started

    assert controller.wait_for(lambda: len(controller.events[setup.name]) >= 2001), "not every event arrived"
    assert agent.wait_drained(WAIT), f"outbox not emptied: {agent.stats()}"

    received = controller.events[setup.name]
    assert set(received) == set(range(1, 2002))
    assert received[1].type == "agent.started"
    assert sorted(e.payload["n"] for s, e in received.items() if s > 1) == list(range(2000))
    assert controller.rejected == []
    stats = agent.stats()
    assert (stats.acked, stats.forged_acks, stats.outbox_depth, stats.inflight) == (2001, 0, 0, 0)
    assert stats.published == 2001

    # Acks taught the agent the controller's clock: events from now on say so.
    assert agent.clock.state()[0] is True
    seq = agent.emit("test.synthetic", {"n": 2000})
    assert controller.wait_for(lambda: seq in controller.events[setup.name])
    late = controller.events[setup.name][seq]
    assert late.clock_synced is True and late.clock_offset_ms is not None and abs(late.clock_offset_ms) < 2000
    assert received[1].clock_synced is False and received[1].clock_offset_ms is None


def test_forged_ack_deletes_nothing(agent_setup: SetupFn, run_agent: RunFn, make_controller: ControllerFn) -> None:
    ctl = make_controller(ack=False)
    setup = agent_setup()
    agent = run_agent(setup.config)
    for i in range(5):
        agent.emit("test.synthetic", {"n": i})
    assert ctl.wait_for(lambda: len(ctl.events[setup.name]) >= 6)
    everything = list(range(1, 7))

    ctl.send_ack(setup.name, everything, key=signing.generate_key())  # wrong key
    wrong_agent = messages.build_ack(ctl.signing_key, "someone-else", everything)
    ctl.client.publish_wait(topics.topic(setup.name, topics.ACKS), wrong_agent)
    ctl.client.publish_wait(topics.topic(setup.name, topics.ACKS), b'{"ack": "garbage"}')

    assert until(lambda: agent.stats().forged_acks == 3), agent.stats()
    assert agent.outbox.depth() == 6

    ctl.send_ack(setup.name, everything)
    assert agent.wait_drained(WAIT)
    assert agent.stats().acked == 6


def test_unacked_events_are_republished_after_resend_after(
    agent_setup: SetupFn, run_agent: RunFn, make_controller: ControllerFn
) -> None:
    ctl = make_controller(ack=False)
    setup = agent_setup(resend_after_s=0.5)
    agent = run_agent(setup.config)
    agent.emit("test.synthetic", {"n": 1})
    assert until(lambda: agent.stats().resent >= 2), agent.stats()
    assert agent.outbox.depth() == 2  # the broker's PUBACKs deleted nothing
    # Duplicates reach the controller, which is idempotent on (agent, seq).
    assert ctl.wait_for(lambda: ctl.deliveries >= 4)
    ctl.ack = True
    assert agent.wait_drained(WAIT)


def test_events_emitted_while_broker_is_down_are_delivered_after_restart(
    broker: Broker, agent_setup: SetupFn, run_agent: RunFn, make_controller: ControllerFn
) -> None:
    setup = agent_setup(resend_after_s=2)
    ctl = make_controller()
    agent = run_agent(setup.config)
    assert agent.wait_drained(WAIT)
    ctl.close()
    broker.stop()
    assert until(lambda: not agent.link.connected)

    seqs = [agent.emit("test.synthetic", {"n": i}) for i in range(50)]
    # On disk when emit returns, as a second reader of the file sees: nothing depends on the broker.
    assert Outbox.inspect(setup.config.outbox_path).depth == 50
    assert agent.outbox.depth() == 50

    broker.start()
    ctl = make_controller()
    assert ctl.wait_for(lambda: set(seqs) <= set(ctl.events[setup.name])), agent.stats()
    assert agent.wait_drained(WAIT), agent.stats()
    assert agent.link.connected


def test_retained_policy_bundle_is_applied_and_rollback_refused(
    agent_setup: SetupFn, run_agent: RunFn, controller: AckingController
) -> None:
    setup = agent_setup()
    # Published before the agent ever connected: the broker keeps it (retained) for the agent.
    controller.publish_policy(setup.name, 3, {"doors": ["d1"]})
    agent = run_agent(setup.config)

    assert until(lambda: agent.policy.version == 3), agent.policy.state()
    assert agent.policy.state() == "valid"
    assert (setup.config.state_dir / "policy.bundle").is_file()
    assert controller.wait_for(lambda: len(controller.of_type(setup.name, "agent.policy_applied")) == 1)
    assert controller.of_type(setup.name, "agent.policy_applied")[0].payload == {
        "policy_version": 3,
        "previous_version": None,
    }

    controller.publish_policy(setup.name, 4, {"doors": ["d1", "d2"]})
    assert until(lambda: agent.policy.version == 4)
    controller.publish_policy(setup.name, 2)
    assert controller.wait_for(lambda: len(controller.of_type(setup.name, "agent.policy_rejected")) == 1)
    rejected = controller.of_type(setup.name, "agent.policy_rejected")[0].payload
    assert (rejected["reason"], rejected["policy_version"]) == (errors.ROLLBACK, 2)
    assert agent.policy.version == 4
    current = agent.policy.in_force()
    assert current is not None and current.bundle.policy == {"doors": ["d1", "d2"]}


def test_command_round_trip_and_heartbeat(
    pki: Path, broker: Broker, agent_setup: SetupFn, run_agent: RunFn, controller: AckingController
) -> None:
    watcher = connect_client(pki, broker.controller_port, "hb-watch", identity=CONTROLLER_CN)
    try:
        watcher.subscribe_wait(topics.all_agents(topics.HEARTBEAT), qos=0)
        setup = agent_setup()
        agent = run_agent(setup.config)
        hb_raw = watcher.next_message(timeout=WAIT).payload  # sent right after connecting
        hb = messages.open_heartbeat(hb_raw, setup.public_key, setup.name)
        assert hb.policy_state == "none" and hb.next_seq >= 2 and len(hb.boot_id) == 32

        assert agent.link.wait_connected(WAIT)
        command_id = controller.publish_command(setup.name, "agent.ping")
        assert controller.wait_for(lambda: len(controller.of_type(setup.name, "agent.command_executed")) == 1)
        assert controller.of_type(setup.name, "agent.command_executed")[0].payload["command_id"] == command_id
    finally:
        watcher.close()


def test_second_agent_on_the_same_state_dir_is_refused(agent_setup: SetupFn, run_agent: RunFn) -> None:
    setup = agent_setup()
    run_agent(setup.config)
    with pytest.raises(AlreadyRunning):
        Agent(setup.config)


def drain_events() -> int:
    return int(os.environ.get("SEKISHO_BENCH_DRAIN_EVENTS", "5000"))


def test_simulate_drains_pre_queued_outbox(
    agent_setup: SetupFn, controller: AckingController, capsys: pytest.CaptureFixture[str]
) -> None:
    """Also the drain-rate measurement: SEKISHO_BENCH_DRAIN_EVENTS=20000 pytest -s -k drains_pre_queued."""
    count = drain_events()
    setup = agent_setup(resend_after_s=30)
    config = setup.config
    config.state_dir.mkdir(parents=True)
    box = Outbox(config.outbox_path, signing_key=signing.load_private_key(config.signing_key), agent_id=setup.name)
    for start in range(0, count, 1000):
        box.append_many([("test.synthetic", {"n": i}) for i in range(start, min(count, start + 1000))])
    box.close()

    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sekisho.agents.runtime.cli import app; app()",
            "simulate",
            "--config",
            str(setup.config_path),
            "--count",
            "0",
            "--exit-when-drained",
            "--timeout",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["drained"] is True and summary["outbox_depth"] == 0
    assert set(controller.events[setup.name]) == set(range(1, count + 2))
    window = (controller.last_at or 0) - (controller.first_at or 0)
    with capsys.disabled():
        print(
            f"\ndrained {count + 1} events: process {elapsed:.2f} s, first→last delivery {window:.2f} s "
            f"= {(count + 1) / max(window, 1e-6):.0f} events/s; agent summary {summary}"
        )


def test_policy_expiry_is_recorded_and_fails_closed(
    agent_setup: SetupFn, run_agent: RunFn, controller: AckingController
) -> None:
    setup = agent_setup()
    agent = run_agent(setup.config)
    assert agent.link.wait_connected(WAIT)
    controller.publish_policy(setup.name, 1, lifetime=timedelta(seconds=2))
    assert until(lambda: agent.policy.state() == "valid")
    assert controller.wait_for(lambda: len(controller.of_type(setup.name, "agent.policy_expired")) == 1, timeout=10)
    assert agent.policy.state() == "expired" and agent.policy.in_force() is None
    assert controller.of_type(setup.name, "agent.policy_expired")[0].payload == {"policy_version": 1}


def test_tampered_policy_cache_is_reported_at_start(
    agent_setup: SetupFn, run_agent: RunFn, controller: AckingController
) -> None:
    setup = agent_setup()
    config = setup.config
    config.state_dir.mkdir(parents=True)
    (config.state_dir / "policy.bundle").write_bytes(b'{"bundle": {"v": 1}, "sig": "AAAA"}')
    agent = run_agent(config)
    assert agent.policy.state() == "none"
    assert controller.wait_for(lambda: len(controller.of_type(setup.name, "agent.policy_rejected")) == 1)
    payload = controller.of_type(setup.name, "agent.policy_rejected")[0].payload
    assert payload["reason"] == errors.BAD_SIGNATURE and payload["detail"].startswith("cached bundle")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from sekisho.agents.runtime.cli import app; app()", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_simulate_with_rate_then_status(agent_setup: SetupFn, controller: AckingController) -> None:
    setup = agent_setup()
    proc = run_cli(
        "simulate",
        "--config",
        str(setup.config_path),
        "--count",
        "200",
        "--rate",
        "400",
        "--note-bytes",
        "100",
        "--exit-when-drained",
        "--timeout",
        "60",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["emitted"] == 200 and summary["drained"] is True
    assert 0.3 < summary["emit_s"] < 5  # paced, not flat out
    synthetic = controller.of_type(setup.name, "test.synthetic")
    assert sorted(e.payload["n"] for e in synthetic) == list(range(200))
    assert all(e.payload["note"] == "x" * 100 for e in synthetic)

    status = run_cli("status", "--config", str(setup.config_path))
    assert status.returncode == 0, status.stderr
    assert re.search(r"outbox depth\s*│\s*0\s", status.stdout), status.stdout
    assert re.search(r"next seq\s*│\s*202\s", status.stdout), status.stdout  # agent.started + 200 events


def test_simulate_times_out_non_zero_without_a_controller(agent_setup: SetupFn) -> None:
    setup = agent_setup()
    proc = run_cli(
        "simulate", "--config", str(setup.config_path), "--count", "10", "--exit-when-drained", "--timeout", "2"
    )
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["drained"] is False and summary["outbox_depth"] == 11


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from sekisho.agents.runtime.cli import app; app()", *args]


def test_sigkill_mid_drain_loses_nothing_and_leaves_no_gap(agent_setup: SetupFn, controller: AckingController) -> None:
    setup = agent_setup(resend_after_s=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cli_command("simulate", "--config", str(setup.config_path), "--count", "3000", "--rate", "1500"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert controller.wait_for(lambda: len(controller.events[setup.name]) >= 500)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    again = run_cli(
        "simulate", "--config", str(setup.config_path), "--count", "0", "--exit-when-drained", "--timeout", "60"
    )
    assert again.returncode == 0, again.stderr
    next_seq = Outbox.inspect(setup.config.outbox_path).next_seq
    received = controller.events[setup.name]
    assert set(received) == set(range(1, next_seq)), "a recorded event was lost or a seq skipped"
    synthetic = sorted(e.payload["n"] for e in received.values() if e.type == "test.synthetic")
    assert synthetic == list(range(len(synthetic))) and len(synthetic) >= 499
    assert [e.type for e in received.values()].count("agent.started") == 2


def test_idle_agent_uses_no_cpu(agent_setup: SetupFn, controller: AckingController) -> None:
    setup = agent_setup()
    proc = subprocess.Popen(
        cli_command("run", "--config", str(setup.config_path)),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.DEVNULL,
    )
    try:
        assert controller.wait_for(lambda: 1 in controller.events[setup.name])
        time.sleep(1.0)  # let start-up settle
        process = psutil.Process(proc.pid)
        before = process.cpu_times()
        time.sleep(5.0)
        after = process.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        assert used <= 0.05, f"idle agent used {used:.3f} s CPU in 5 s"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
