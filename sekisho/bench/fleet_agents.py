"""The worker side of ``sekisho bench fleet``: a few hundred real agents in one process.

Imports the agent runtime only (as an agent host would), not the controller. Each agent is the real
``Agent`` (outbox, sender, policy cache, heartbeats, commands, MQTT link); the bench hooks into its
link's message callback and its policy cache's listeners to note when things happened, on
CLOCK_MONOTONIC (``time.monotonic_ns``), which every process of the machine shares.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.agents.runtime.policy_cache import PolicyChange
from sekisho.protocol import topics

log = logging.getLogger(__name__)

EVENT_TYPE = "test.synthetic"
# Baseline messages start with this, so the bench's hook in each agent sets them aside before any verification.
RAW_MARK = b"sekisho-bench-raw/"
# Worker processes yield the CPU to the broker and the controller: on a real site each agent has a host of its
# own, and the server's figures should not depend on how many simulated agents share this machine's cores.
WORKER_NICE = 10
# A worker that hears nothing from the bench for this long stops by itself (the bench died).
WORKER_IDLE_LIMIT_S = 1800.0


def raise_nofile_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); return the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


@dataclass(frozen=True)
class WorkerSpec:
    """The agents one worker process runs, and where it logs."""

    configs: list[str]
    log_path: str


class SimulatedFleet:
    """Real agents in one process, with hooks that note when each one applied a version or got a message."""

    def __init__(self, configs: Sequence[Path]) -> None:
        self.agents: list[Agent] = []
        try:
            for path in configs:
                self.agents.append(Agent(load_config(path)))
        except BaseException:
            self.stop()
            raise
        count = len(self.agents)
        # Written by the agents' threads, read on request: plain assignments of ints are atomic in CPython.
        self.applied_ns: list[dict[int, int]] = [{} for _ in range(count)]
        self.apply_cost_ns: list[dict[int, int]] = [{} for _ in range(count)]
        self.policy_arrival_ns = [0] * count
        self.raw_ns: list[dict[str, int]] = [{} for _ in range(count)]
        self.connected_ns: list[int | None] = [None] * count
        for index, agent in enumerate(self.agents):
            self._hook(index, agent)

    def _hook(self, index: int, agent: Agent) -> None:
        deliver = agent.link._on_message

        def on_message(channel: str, payload: bytes) -> None:
            # Runs on the agent's paho thread, before the agent sees the message.
            now = time.monotonic_ns()
            if channel == topics.POLICY:
                if payload.startswith(RAW_MARK):
                    tag = payload[len(RAW_MARK) : len(RAW_MARK) + 16].split(b"/", 1)[0].decode()
                    self.raw_ns[index].setdefault(tag, now)
                    return  # the baseline: never offered to the policy cache
                self.policy_arrival_ns[index] = now
            deliver(channel, payload)

        # The link's callbacks are the one seam between paho and the agent; the bench sits in them.
        agent.link._on_message = on_message
        connected = agent.link._on_connected

        def on_connected(session_present: bool) -> None:
            # paho's thread, once the broker accepted the connection (CONNACK): note it, then the agent's turn.
            self.connected_ns[index] = time.monotonic_ns()
            connected(session_present)

        agent.link._on_connected = on_connected

        def on_change(change: PolicyChange) -> None:
            if change.kind != "applied":
                return
            now = time.monotonic_ns()
            version = change.bundle.bundle.version
            self.applied_ns[index].setdefault(version, now)
            arrived = self.policy_arrival_ns[index]
            if arrived:
                self.apply_cost_ns[index].setdefault(version, now - arrived)

        # Subscribed after the agent's own listener: it fires once the agent has recorded policy_applied.
        agent.policy.subscribe(on_change)

    def start(self) -> None:
        """Start every agent (each connects in the background)."""
        for agent in self.agents:
            agent.start()

    def stop(self) -> None:
        """Stop every agent (in parallel: each waits for its clean disconnect)."""
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(_stop_quietly, self.agents))

    def handle(self, command: str, args: Sequence[Any]) -> Any:
        """Answer one request of the bench."""
        if command == "status":
            versions: dict[int, int] = {}
            for agent in self.agents:
                v = agent.policy.version or 0
                versions[v] = versions.get(v, 0) + 1
            return {"connected": sum(a.link.connected for a in self.agents), "versions": versions}
        if command == "applied":
            version = int(args[0])
            return [(d.get(version), c.get(version)) for d, c in zip(self.applied_ns, self.apply_cost_ns, strict=True)]
        if command == "raw":
            return [d.get(str(args[0])) for d in self.raw_ns]
        if command == "connected_since":
            since = int(args[0])
            return [
                at if at is not None and at >= since and agent.link.connected else None
                for at, agent in zip(self.connected_ns, self.agents, strict=True)
            ]
        if command == "emit":
            count, phase = int(args[0]), str(args[1])
            for agent in self.agents:
                agent.emit_many([(EVENT_TYPE, {"n": n, "note": phase}) for n in range(count)])
            return count * len(self.agents)
        if command == "depth":
            return sum(agent.outbox.depth() for agent in self.agents)
        if command == "recorded":
            # Sequence numbers are never reused: next_seq - 1 is everything this agent ever recorded.
            return {agent.config.agent_id: agent.outbox.next_seq - 1 for agent in self.agents}
        if command == "threads":
            return threading.active_count()
        raise ValueError(f"unknown command {command!r}")


def _stop_quietly(agent: Agent) -> None:
    try:
        agent.stop(timeout=5)
    except Exception:  # one agent failing to stop must not leave the others running
        log.exception("agent %s did not stop cleanly", agent.config.agent_id)


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Run the agents of one worker process and answer the bench's requests until told to stop."""
    raise_nofile_limit()
    os.nice(WORKER_NICE)
    logging.basicConfig(
        filename=spec.log_path, level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    fleet: SimulatedFleet | None = None
    try:
        fleet = SimulatedFleet([Path(p) for p in spec.configs])
        fleet.start()
        conn.send(("ok", len(fleet.agents)))
        while conn.poll(WORKER_IDLE_LIMIT_S):
            command, *args = conn.recv()
            if command == "stop":
                break
            try:
                conn.send(("ok", fleet.handle(command, args)))
            except Exception as err:  # report, keep serving: the bench decides whether to go on
                log.exception("request %s failed", command)
                conn.send(("error", f"{type(err).__name__}: {err}"))
    except EOFError:
        pass  # the bench went away: stop the agents and leave
    except Exception as err:
        log.exception("worker failed")
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        if fleet is not None:
            fleet.stop()
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stopped", None))
        conn.close()
