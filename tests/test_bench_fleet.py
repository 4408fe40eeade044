"""`sekisho bench fleet` on a small fleet: lean and full agents, broker, controller and enrolment; nothing lost.

The lean agents (sekisho/bench/fleet_lean.py) are checked on their own against a real broker: they must apply a
signed bundle through the real policy cache (the file on disk holds it) and refuse a forged, misaddressed or
rolled-back one, with a fixed number of threads whatever the agent count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sekisho.agents.runtime.policy_cache import CACHE_NAME
from sekisho.bench.fleet import WorkerPool, percentile, site_policy
from sekisho.bench.fleet_agents import RAW_MARK
from sekisho.controller.config import load_config as load_controller_config
from sekisho.controller.mqtt import connect_blocking, make_client
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.service import open_store
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab
from sekisho.protocol import errors, messages, signing, topics

SUMMARY_KEYS = {
    "agents",
    "revocation_p50_ms",
    "revocation_p99_ms",
    "reconnect_all_s",
    "lost",
    "enrol_100_s",
    "baseline_p50_ms",
    "baseline_p99_ms",
    "delivered_p99_ms",
    "in_agent_apply_p99_ms",
    "duplicates",
    "events",
    "agent_kind",
}
WAIT = 60.0


def _leftovers() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("sekisho-bench-fleet-*"))


def _bench(*args: str) -> dict[str, Any]:
    before = _leftovers()
    result = subprocess.run(
        [sys.executable, "-m", "sekisho", "bench", "fleet", *args, "--timeout-s", "240"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) >= SUMMARY_KEYS
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    for key in (
        "revocation_p50_ms",
        "revocation_p99_ms",
        "reconnect_all_s",
        "baseline_p99_ms",
        "in_agent_apply_p99_ms",
    ):
        assert isinstance(summary[key], int | float) and summary[key] > 0, key
    assert summary["revocation_p99_ms"] >= summary["revocation_p50_ms"]
    # The run cleans up after itself: no temp dir left, no broker or controller left running on it.
    assert _leftovers() <= before
    assert "sekisho-bench-fleet-" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return summary


def test_bench_fleet_small_run_reports_every_figure_and_loses_nothing() -> None:
    summary = _bench("--agents", "20", "--rounds", "2", "--enrol", "5", "--processes", "2", "--outage-s", "1")
    assert summary["agents"] == 20 and summary["enrol_agents"] == 5 and summary["rounds"] == 2
    assert summary["enrol_100_s"] > 0
    # (a) ran on lean agents: one event loop and the apply threads per process, not threads per agent, and every
    # agent's policy cache file, read back after (a), verifies and holds the last version (v1 + 2 rounds).
    assert summary["agent_kind"] == "lean"
    assert summary["a_threads_per_process"] <= 1 + summary["apply_threads"] < 20
    assert summary["policy_on_disk"] == 20
    # (b) on full agents: each recorded its start and 2 × 5 synthetic events at least.
    assert summary["events"] >= 20 * (1 + 10)


def test_bench_fleet_full_agents_run_the_revocation_on_the_agent_runtime() -> None:
    summary = _bench(
        "--agents", "6", "--rounds", "1", "--enrol", "1", "--processes", "1", "--outage-s", "1", "--full-agents"
    )
    assert summary["agent_kind"] == "full" and summary["policy_on_disk"] is None
    # Full agents record what they applied: start, version 2 applied, and 2 × 5 synthetic events at least.
    assert summary["events"] >= 6 * (1 + 1 + 10)
    # The agent runtime's threads: several per agent.
    assert summary["a_threads_per_process"] > 2 * 6


def _wait(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT:.0f} s"
        time.sleep(0.05)


@pytest.mark.broker
def test_lean_agents_apply_signed_bundles_and_refuse_forged_misaddressed_and_rolled_back_ones(tmp_path: Path) -> None:
    names = ["lean-0001", "lean-0002", "lean-0003"]
    lab = Lab(tmp_path / "lab")
    lab.start_broker()
    pool: WorkerPool | None = None
    try:
        lab.write_controller_config()
        config = load_controller_config(lab.controller_config)
        configs = [lab.add_agent(n) for n in names]
        store = open_store(config)
        for name in names:
            store.register_agent(name, AgentCredentials.at(lab.pki_dir, name).signing_pub.read_text())
        service = PolicyService(store, signing.load_private_key(config.signing_key))
        service.apply(site_policy(names, 0), source_sha256="a" * 64, created_by="test")
        v1 = service.bundles()
        service.apply(site_policy(names, 1), source_sha256="b" * 64, created_by="test")
        v2 = service.bundles()
        store.engine.dispose()

        # One worker process for all three agents, as the bench starts them, with 2 apply threads.
        pool = WorkerPool.lean([configs], lab.root / "logs", 2)
        assert pool.wait_started(WAIT) == 3
        _wait("all connected", lambda: pool is not None and pool.ask("status")[0]["connected"] == 3)
        # One loop thread and the apply threads, however many agents.
        assert pool.ask("threads") == [1 + 2]

        client = make_client(config, "controller-test-lean")
        connect_blocking(client, config, persistent=False, timeout=10)
        try:

            def send(agent: str, payload: bytes) -> None:
                client.publish(topics.topic(agent, topics.POLICY), payload, qos=1).wait_for_publish(10)

            for name in names:
                send(name, v2[name])
            _wait("version 2 applied by all", lambda: all(a is not None for a, _ in pool.flat("applied", 2)))
            assert pool.ask("status")[0]["versions"] == {2: 3}
            key = signing.load_public_key(lab.pki.controller_signing_pub)
            for name in names:
                on_disk = (lab.root / "agents" / name / "state" / CACHE_NAME).read_bytes()
                assert on_disk == v2[name]
                assert messages.open_bundle(on_disk, key, name).bundle.version == 2

            # The baseline's raw messages are set aside before the cache sees them.
            send(names[0], RAW_MARK + b"t1/" + b"x" * 100)
            # A forged bundle (one card's status edited after signing), another agent's bundle, an older version.
            forged = v2[names[0]].replace(b'"revoked"', b'"active"', 1)
            assert forged != v2[names[0]]
            send(names[0], forged)
            send(names[0], v2[names[1]])
            send(names[0], v1[names[0]])

            def refused() -> list[tuple[str, int | None]]:
                assert pool is not None
                return [tuple(r) for r in pool.ask("rejected")[0][names[0]]]

            _wait("three bundles refused", lambda: len(refused()) == 3)
            reasons = [reason for reason, _version in refused()]
            assert reasons == [errors.BAD_SIGNATURE, errors.WRONG_AGENT, errors.ROLLBACK]
            assert pool.flat("raw", "t1")[0] is not None
            # Nothing of it reached the disk or the cache: still version 2, the same bytes.
            assert (lab.root / "agents" / names[0] / "state" / CACHE_NAME).read_bytes() == v2[names[0]]
            assert pool.ask("status")[0]["versions"] == {2: 3}
        finally:
            client.disconnect()
            client.loop_stop()
    finally:
        if pool is not None:
            pool.stop()
        lab.stop_all()


def test_site_policy_revokes_one_site_wide_person_on_every_terminal() -> None:
    agents = [f"fleet-{i:04d}" for i in range(1, 31)]
    before, after = site_policy(agents, 0), site_policy(agents, 1)
    for agent in agents:
        old, new = before.for_agent(agent), after.for_agent(agent)
        # Each terminal's bundle names the site-wide person, whose card the revocation turns off.
        assert [c["status"] for c in old["cards"] if c["person"] == "p-site-01"] == ["active"]
        assert [c["status"] for c in new["cards"] if c["person"] == "p-site-01"] == ["revoked"]
        assert [p["active"] for p in new["people"] if p["id"] == "p-site-01"] == [False]
        assert [c for c in new["cards"] if c["person"] != "p-site-01"] == [
            c for c in old["cards"] if c["person"] != "p-site-01"
        ]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
