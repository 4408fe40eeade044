"""``sekisho bench fleet``: a thousand real agents on one broker — revocation, broker restart, enrolment.

Two kinds of simulated agent, with the same identities (certificate, CN = agent id, signing key registered in
the store, state directory), one kind on the machine at a time:

- **lean** (``fleet_lean``, part (a) by default): what issue 11 names for the revocation — a real MQTT v5
  client over mutual TLS, confined by the broker's ACL plugin to its topics, subscribed to its policy topic,
  feeding the real ``PolicyCache`` (signature, addressee, rollback, atomic persist with fsync). One event
  loop per worker process drives all its agents' paho clients, plus a few apply threads; no thread per agent.
- **full** (``fleet_agents``, part (b), and (a) with ``--full-agents``): the real agent runtime
  (``agents.runtime.agent.Agent``: outbox, sender, policy cache, heartbeats, command dispatcher, MQTT link),
  ~4 threads per agent, at most 80 agents per worker process (paho's ``select()`` loop). Only the
  capabilities (login, USB, doors) are missing.

One mosquitto (the lab's: both listeners, the ACL plugin, persistence), one ``sekisho controller serve``
(ingest, HTTPS API with enrolment), SQLite store.

(a) Revocation: the site policy names a handful of site-wide people on every terminal; each round revokes
    one of them (person inactive, card revoked) through the path of ``sekisho policy apply``
    (``PolicyService.apply``, ``bundles``, ``publish_once``), timed from the start of the apply until each
    agent's policy cache has verified, persisted and announced the new version (a full agent has then also
    recorded ``agent.policy_applied`` in its outbox). Baseline of the same round: raw QoS 1 messages of the
    same size as a bundle, published by one controller-certificate client to the same agents' policy
    topics (not retained), timed to their arrival in the agent's MQTT callback; the agents set them aside
    before any verification. After (a) on lean agents, every agent's cache file is read back and must
    verify and hold the last version; then the lean fleet stops and the full one starts for (b).
(b) Broker restart (full agents): every agent records events, the broker is stopped (SIGTERM, it saves its
    database), the agents record as many again while it is down, then it starts on the same ports. Timed from the
    start command until every agent is connected again (the agents' jittered back-off as shipped), then
    until every outbox is drained (each event stored and acknowledged). Every event any agent ever
    recorded must be stored exactly once: ``lost`` = recorded − distinct stored, ``duplicates`` = stored
    rows − distinct.
(c) Enrolment: devices enrol over HTTPS against the running controller with one token (``enrol_fleet``:
    keys made on the device, CSR, pinned CA), all timed together.

Times across processes come from CLOCK_MONOTONIC (``time.monotonic_ns``), one clock for the whole machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing as mp
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from sekisho.agents.runtime.policy_cache import CACHE_NAME as POLICY_CACHE_NAME
from sekisho.bench.fleet_agents import RAW_MARK, WorkerSpec, raise_nofile_limit, worker_main
from sekisho.bench.fleet_lean import DEFAULT_APPLY_THREADS, LEAN_AGENTS_PER_PROCESS, LeanSpec, lean_worker_main
from sekisho.controller.config import ControllerConfig
from sekisho.controller.config import load_config as load_controller_config
from sekisho.controller.fleet.enrol_service import EnrolmentService
from sekisho.controller.mqtt import connect_blocking, make_client
from sekisho.controller.policy.service import PolicyService, publish_once
from sekisho.controller.service import open_store
from sekisho.controller.store.db import make_engine
from sekisho.controller.store.models import Event
from sekisho.controller.store.store import Store
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab
from sekisho.lab.fleet import enrol_fleet, enrolment_settings
from sekisho.protocol import errors, messages, signing, topics
from sekisho.protocol.policy import Area, Card, Person, Site, SitePolicy, Terminal

log = logging.getLogger(__name__)

AGENT_PREFIX = "fleet"
ENROL_PREFIX = "enrol"
# Site-wide people, on every terminal's handler list: each round revokes the next one.
SITE_WIDE_PEOPLE = 10
LOCAL_PEOPLE_PER_TERMINAL = 3


class FleetBenchError(RuntimeError):
    """A step of the fleet bench did not complete (timeout, a worker died, a check failed)."""


# Full agents only (the lean ones run in an epoll loop of their own): each holds ~12 file descriptors (outbox
# and nonce store in SQLite, lock, socket, paho's socket pair), and paho's network loop uses select(), which
# fails on a descriptor numbered 1024 or more: the client then drops its connection at once, again and again
# (the broker logs "Protocol error"). One agent per process, as deployed, is far from that; the bench keeps
# each worker process well under it.
MAX_AGENTS_PER_PROCESS = 80
DEFAULT_AGENTS_PER_PROCESS = 75


@dataclass(frozen=True)
class FleetOptions:
    """What `sekisho bench fleet` runs."""

    agents: int = 1000
    rounds: int = 5
    enrol: int = 100
    # None: as few as keep each under MAX_AGENTS_PER_PROCESS.
    processes: int | None = None
    events: int = 5
    outage_s: float = 5.0
    timeout_s: float = 300.0
    workdir: Path | None = None
    # The agents' heartbeat interval; 30 s is what agents ship with.
    heartbeat_s: float = 30.0
    # (a) on the full agent runtime too (as (b)), instead of the lean agents (fleet_lean).
    full_agents: bool = False
    # Lean worker processes for (a); None: one per LEAN_AGENTS_PER_PROCESS agents.
    lean_processes: int | None = None
    apply_threads: int = DEFAULT_APPLY_THREADS

    @property
    def worker_processes(self) -> int:
        """Return how many worker processes carry the agents."""
        if self.processes is not None:
            return max(1, min(self.processes, self.agents))
        return max(1, math.ceil(self.agents / DEFAULT_AGENTS_PER_PROCESS))

    @property
    def lean_worker_processes(self) -> int:
        """Return how many worker processes carry the lean agents of (a)."""
        if self.lean_processes is not None:
            return max(1, min(self.lean_processes, self.agents))
        return max(1, math.ceil(self.agents / LEAN_AGENTS_PER_PROCESS))

    @property
    def agent_kind(self) -> str:
        """Return what the simulated agents of (a) are: "lean" or "full"."""
        return "full" if self.full_agents else "lean"

    def check(self) -> None:
        """Raise FleetBenchError for a layout the agents cannot run in."""
        per_process = math.ceil(self.agents / self.worker_processes)
        if per_process > MAX_AGENTS_PER_PROCESS:
            enough = math.ceil(self.agents / DEFAULT_AGENTS_PER_PROCESS)
            raise FleetBenchError(
                f"{per_process} agents per process is over {MAX_AGENTS_PER_PROCESS}: paho's select() loop fails on "
                f"file descriptors ≥ 1024; use --processes {enough} or more"
            )


# --- helpers ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Return the nearest-rank percentile q (0 < q ≤ 100) of values."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def agent_name(index: int) -> str:
    """Return the id of simulated agent number `index` (from 1)."""
    return f"{AGENT_PREFIX}-{index:04d}"


def _uid_hash(label: str) -> str:
    # A synthetic card: the hash of a made-up label stands in for HMAC(site key, UID).
    return hashlib.sha256(f"sekisho-bench-fleet/{label}".encode()).hexdigest()


def site_policy(agents: Sequence[str], revoked: int = 0) -> SitePolicy:
    """Return the bench's synthetic site: one terminal per agent, local handlers and site-wide people.

    Each terminal has three local handlers and every site-wide person; the first `revoked` site-wide
    people are inactive with their cards revoked.
    """
    local_count = max(LOCAL_PEOPLE_PER_TERMINAL, len(agents) // 5)
    people: list[Person] = []
    cards: list[Card] = []
    for i in range(SITE_WIDE_PEOPLE):
        pid = f"p-site-{i + 1:02d}"
        gone = i < revoked
        people.append(
            Person(
                id=pid,
                name=f"全拠点 担当{i + 1:02d} (synthetic)",
                roles=["designated_handler"],
                logins=[f"site{i + 1:02d}"],
                active=not gone,
            )
        )
        cards.append(
            Card(id=f"c-site-{i + 1:02d}", person=pid, uid_hash=_uid_hash(pid), status="revoked" if gone else "active")
        )
    for i in range(local_count):
        pid = f"p-{i + 1:04d}"
        people.append(
            Person(
                id=pid, name=f"担当者 {i + 1:04d} (synthetic)", roles=["designated_handler"], logins=[f"u{i + 1:04d}"]
            )
        )
        cards.append(Card(id=f"c-{i + 1:04d}", person=pid, uid_hash=_uid_hash(pid)))
    site_wide = [p.id for p in people[:SITE_WIDE_PEOPLE]]
    terminals = [
        Terminal(
            id=f"t-{index + 1:04d}",
            name=f"端末 {index + 1:04d}",
            agent=agent,
            area="a-office",
            handlers=[f"p-{(index + k) % local_count + 1:04d}" for k in range(LOCAL_PEOPLE_PER_TERMINAL)] + site_wide,
        )
        for index, agent in enumerate(agents)
    ]
    return SitePolicy(
        site=Site(name="bench fleet (synthetic)"),
        people=people,
        cards=cards,
        areas=[Area(id="a-office", name="管理区域 (synthetic)")],
        terminals=terminals,
    )


def _policy_sha(policy: SitePolicy) -> str:
    return hashlib.sha256(policy.model_dump_json().encode()).hexdigest()


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection


class WorkerPool:
    """The worker processes, spoken to all at once."""

    def __init__(self, target: Callable[[Connection, Any], None], specs: Sequence[Any], label: str) -> None:
        # Spawned, not forked: the bench process holds paho and SQLite state that must not be copied.
        ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        for index, spec in enumerate(specs):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=target, args=(child, spec), name=f"{label}-{index + 1}", daemon=True)
            process.start()
            child.close()
            self.workers.append(_Worker(process, parent))

    @classmethod
    def full(cls, groups: Sequence[Sequence[Path]], log_dir: Path) -> WorkerPool:
        """Start worker processes of full agents (the agent runtime), one per group of agent configs."""
        log_dir.mkdir(parents=True, exist_ok=True)
        specs = [
            WorkerSpec([str(p) for p in group], str(log_dir / f"fleet-worker-{i + 1}.log"))
            for i, group in enumerate(groups)
        ]
        return cls(worker_main, specs, "fleet-worker")

    @classmethod
    def lean(cls, groups: Sequence[Sequence[Path]], log_dir: Path, apply_threads: int) -> WorkerPool:
        """Start worker processes of lean agents (fleet_lean), one per group of agent configs."""
        log_dir.mkdir(parents=True, exist_ok=True)
        specs = [
            LeanSpec([str(p) for p in group], str(log_dir / f"fleet-lean-{i + 1}.log"), apply_threads)
            for i, group in enumerate(groups)
        ]
        return cls(lean_worker_main, specs, "fleet-lean")

    def wait_started(self, timeout: float) -> int:
        """Wait until every worker has built and started its agents; return how many agents run."""
        return sum(int(r) for r in self._collect(timeout, "start"))

    def ask(self, command: str, *args: Any, timeout: float = 120) -> list[Any]:
        """Send one request to every worker and return their answers in worker order."""
        for worker in self.workers:
            try:
                worker.conn.send((command, *args))
            except (OSError, ValueError) as err:
                raise FleetBenchError(f"{worker.process.name} is gone ({err}); see its log") from err
        return self._collect(timeout, command)

    def _collect(self, timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        answers = []
        for worker in self.workers:
            if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                raise FleetBenchError(f"{worker.process.name} did not answer {what!r} within {timeout:.0f} s")
            try:
                status, value = worker.conn.recv()
            except EOFError as err:
                raise FleetBenchError(f"{worker.process.name} died during {what!r}; see its log") from err
            if status != "ok":
                raise FleetBenchError(f"{worker.process.name} failed {what!r}: {value}")
            answers.append(value)
        return answers

    def flat(self, command: str, *args: Any, timeout: float = 120) -> list[Any]:
        """Ask every worker and concatenate their per-agent lists."""
        return [item for answer in self.ask(command, *args, timeout=timeout) for item in answer]

    def stop(self, timeout: float = 60) -> None:
        """Tell every worker to stop its agents, then make sure each process is gone."""
        for worker in self.workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(("stop",))
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.process.join(max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(10)
            worker.conn.close()
        self.workers.clear()


# --- the bench ------------------------------------------------------------------------------------------


def _wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll check() until true; return the seconds it took, FleetBenchError on timeout."""
    started = time.monotonic()
    deadline = started + timeout
    while not check():
        if time.monotonic() > deadline:
            raise FleetBenchError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - started


def _ms(ns: float) -> float:
    return ns / 1e6


def _cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


@dataclass
class RoundResult:
    """One revocation round and its baseline (milliseconds from the start of each)."""

    version: int
    revocation_ms: list[float]
    baseline_ms: list[float]
    in_agent_ms: list[float]
    delivered_ms: list[float]
    sign_ms: float
    bundle_bytes: int
    broker_cpu_s: float


@dataclass
class FleetResult:
    """Everything the bench measured."""

    agents: int
    agent_kind: str = "lean"
    setup: dict[str, float] = field(default_factory=dict)
    # Cold start of the full agents (for (b), and for (a) with --full-agents).
    connect_all_s: float = 0.0
    # Cold start of the lean agents of (a); 0 with --full-agents.
    lean_connect_all_s: float = 0.0
    rounds: list[RoundResult] = field(default_factory=list)
    broker_start_s: float = 0.0
    reconnect_ms: list[float] = field(default_factory=list)
    drain_s: float = 0.0
    outage_events: int = 0
    recorded: int = 0
    stored_rows: int = 0
    stored_distinct: int = 0
    enrolled: int = 0
    enrol_s: float = 0.0
    worker_threads: list[int] = field(default_factory=list)
    lean_threads: list[int] = field(default_factory=list)
    # Lean agents whose policy cache file, read back after (a), verifies and holds the last version.
    policy_on_disk: int | None = None

    @property
    def lost(self) -> int:
        """Events recorded by an agent but never stored."""
        return self.recorded - self.stored_distinct

    @property
    def duplicates(self) -> int:
        """Events stored more than once."""
        return self.stored_rows - self.stored_distinct


class FleetBench:
    """One run of the fleet bench on a lab of its own."""

    def __init__(self, options: FleetOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.names = [agent_name(i + 1) for i in range(options.agents)]
        self.result = FleetResult(agents=options.agents)

    # --- set-up ---------------------------------------------------------------------------------------

    def _timed(self, label: str, step: Callable[[], object]) -> None:
        started = time.perf_counter()
        step()
        self.result.setup[label] = time.perf_counter() - started

    def run(self, root: Path) -> FleetResult:
        """Build the site, run (a), (b) and (c), and return the figures."""
        self.options.check()
        nofile = raise_nofile_limit()
        needed = self.options.agents * 2 + 200
        if nofile < needed:
            raise FleetBenchError(f"open-file limit {nofile} is below the ~{needed} the broker needs (ulimit -n)")
        lab = Lab(root)
        pool: WorkerPool | None = None
        store: Store | None = None
        try:
            lab.start_broker()
            lab.write_controller_config(**enrolment_settings(lab))
            config = load_controller_config(lab.controller_config)
            beat = self.options.heartbeat_s
            self._timed("issue certificates", lambda: [lab.add_agent(n, heartbeat_interval_s=beat) for n in self.names])
            store = open_store(config)
            service = PolicyService(store, signing.load_private_key(config.signing_key))
            self._timed("register agents", lambda: self._register(lab, store))
            self._timed("policy version 1", lambda: self._seed_policy(lab, self._apply(config, service, 0)[1]))
            controller = lab.spawn_controller(http=True)
            self._timed("controller ready", lambda: _wait_https_ready(lab, controller, config, self.options.timeout_s))
            self.result.agent_kind = self.options.agent_kind
            if self.options.full_agents:
                pool = self._start_workers(lab, 1)
                self.result.worker_threads = [int(n) for n in pool.ask("threads")]
                for number in range(1, self.options.rounds + 1):
                    self._round(lab, pool, config, service, number, full=True)
            else:
                # (a) on lean agents, then (b) on full agents with the same identities (certificates, signing
                # keys, state directories): one fleet on the machine at a time, so neither measures the other.
                pool = self._start_lean(lab)
                self.result.lean_threads = [int(n) for n in pool.ask("threads")]
                for number in range(1, self.options.rounds + 1):
                    self._round(lab, pool, config, service, number, full=False)
                pool.stop()
                pool = None
                self._check_policy_on_disk(lab, 1 + self.options.rounds)
                pool = self._start_workers(lab, 1 + self.options.rounds)
                self.result.worker_threads = [int(n) for n in pool.ask("threads")]
            self._broker_restart(lab, pool)
            self._enrol(config, store, root / "enrolled")
            self._count_events(pool, config)
            return self.result
        finally:
            if pool is not None:
                pool.stop()
            if store is not None:
                store.engine.dispose()
            lab.stop_all()

    def _register(self, lab: Lab, store: Store) -> None:
        for name in self.names:
            creds = AgentCredentials.at(lab.pki_dir, name)
            store.register_agent(name, creds.signing_pub.read_text())

    def _apply(self, config: ControllerConfig, service: PolicyService, revoked: int) -> tuple[int, dict[str, bytes]]:
        """Store and publish a policy version as `sekisho policy apply` does; return it and its bundles."""
        policy = site_policy(self.names, revoked)
        version = service.apply(policy, source_sha256=_policy_sha(policy), created_by="bench-fleet")
        if version is None:
            raise FleetBenchError("the policy did not change")
        signed = service.signed_bundles()
        if signed is None:
            raise FleetBenchError("no policy version stored")
        # As `sekisho policy apply` does: each bundle is sent while the next one is signed.
        return version, publish_once(config, signed, purpose="bench-fleet")

    def _seed_policy(self, lab: Lab, bundles: dict[str, bytes]) -> None:
        """Put each agent's version-1 bundle in its policy cache, as on a fleet that has been running.

        Agents starting with no policy at all each send a heartbeat without a version before the retained
        bundle arrives, and the controller answers every such heartbeat by signing the bundles of the whole
        fleet (PolicyPublisher.on_heartbeat → PolicyService.bundles): O(agents²) work on the ingest thread,
        which then acknowledges nothing for minutes at a thousand agents. A first-ever start of a whole
        fleet at once is not what (a) and (b) measure, so the bench starts from a fleet that holds v1.
        """
        for name in self.names:
            state = lab.root / "agents" / name / "state"
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            (state / POLICY_CACHE_NAME).write_bytes(bundles[name])

    def _groups(self, lab: Lab, count: int) -> list[list[Path]]:
        return [[lab.agent_config(n) for n in self.names[i::count]] for i in range(count)]

    def _start_workers(self, lab: Lab, version: int) -> WorkerPool:
        """Start the full agents; return once every one is connected and holds `version`."""
        count = self.options.worker_processes
        started = time.monotonic_ns()
        pool = WorkerPool.full(self._groups(lab, count), lab.root / "logs")
        self.result.connect_all_s = self._wait_ready(pool, version, started)
        self.console.print(
            f"{self.options.agents} full agents in {count} processes connected with policy version {version} "
            f"in {self.result.connect_all_s:.1f} s (process start included)"
        )
        return pool

    def _start_lean(self, lab: Lab) -> WorkerPool:
        """Start the lean agents of (a); return once every one is connected and holds version 1."""
        count = self.options.lean_worker_processes
        started = time.monotonic_ns()
        pool = WorkerPool.lean(self._groups(lab, count), lab.root / "logs", self.options.apply_threads)
        self.result.lean_connect_all_s = self._wait_ready(pool, 1, started)
        self.console.print(
            f"{self.options.agents} lean agents in {count} processes connected with policy version 1 "
            f"in {self.result.lean_connect_all_s:.1f} s (process start included)"
        )
        return pool

    def _wait_ready(self, pool: WorkerPool, version: int, started: int) -> float:
        """Wait until every agent of the pool is connected and holds `version`; seconds since `started`."""
        try:
            running = pool.wait_started(self.options.timeout_s)
            if running != self.options.agents:
                raise FleetBenchError(f"{running} agents started, {self.options.agents} expected")

            def all_on_version() -> bool:
                states: list[dict[str, Any]] = pool.ask("status")
                connected = sum(int(s["connected"]) for s in states)
                on_version = sum(int(s["versions"].get(version, 0)) for s in states)
                return connected == on_version == self.options.agents

            _wait_until(
                f"every agent connected with policy version {version}", all_on_version, self.options.timeout_s, 0.5
            )
        except BaseException:
            pool.stop()
            raise
        return (time.monotonic_ns() - started) / 1e9

    def _check_policy_on_disk(self, lab: Lab, version: int) -> None:
        """Read back every agent's policy cache file: it must verify, be addressed to it and hold `version`."""
        key = signing.load_public_key(lab.pki.controller_signing_pub)
        good = 0
        problems: list[str] = []
        for name in self.names:
            path = lab.root / "agents" / name / "state" / POLICY_CACHE_NAME
            try:
                held = messages.open_bundle(path.read_bytes(), key, name).bundle.version
            except (OSError, errors.Rejected) as err:
                problems.append(f"{name}: {err}")
                continue
            if held == version:
                good += 1
            else:
                problems.append(f"{name}: version {held}")
        self.result.policy_on_disk = good
        if problems:
            raise FleetBenchError(
                f"{len(problems)} policy cache files do not hold version {version}: {'; '.join(problems[:5])}"
            )

    # --- (a) revocation ----------------------------------------------------------------------------------

    def _quiet(self, pool: WorkerPool) -> None:
        # Each round starts from a quiet fleet: the last round's policy_applied events stored and acknowledged.
        _wait_until("outboxes drained", lambda: sum(pool.ask("depth")) == 0, self.options.timeout_s, 0.5)

    def _baseline(self, pool: WorkerPool, config: ControllerConfig, tag: str, size: int) -> list[float]:
        client: mqtt.Client = make_client(config, f"{config.worker_id}-bench-raw")
        connect_blocking(client, config, persistent=False, timeout=10)
        try:
            head = RAW_MARK + tag.encode() + b"/"
            payload = head + b"x" * max(0, size - len(head))
            started = time.monotonic_ns()
            infos = [client.publish(topics.topic(n, topics.POLICY), payload, qos=1) for n in self.names]
            for info in infos:
                info.wait_for_publish(self.options.timeout_s)
            _wait_until(
                f"baseline {tag} received by every agent",
                lambda: all(t is not None for t in pool.flat("raw", tag)),
                self.options.timeout_s,
                0.1,
            )
            return [_ms(t - started) for t in pool.flat("raw", tag)]
        finally:
            client.disconnect()
            client.loop_stop()

    def _round(
        self, lab: Lab, pool: WorkerPool, config: ControllerConfig, service: PolicyService, number: int, *, full: bool
    ) -> None:
        # Lean agents have no outbox: nothing of theirs is in flight between rounds.
        if full:
            self._quiet(pool)
        current = service.current()
        size = len(next(iter(service.bundles().values()))) if current is not None else 4096
        baseline = self._baseline(pool, config, f"r{number}", size)
        if full:
            self._quiet(pool)
        broker_cpu = _cpu_seconds(lab.broker.pid)
        started = time.monotonic_ns()
        version, bundles = self._apply(config, service, number)
        signed = time.monotonic_ns()

        def applied() -> bool:
            return all(at is not None for at, _cost in pool.flat("applied", version))

        _wait_until(f"round {number}: every agent applied version {version}", applied, self.options.timeout_s, 0.1)
        broker_cpu = _cpu_seconds(lab.broker.pid) - broker_cpu
        answers = pool.flat("applied", version)
        result = RoundResult(
            version=version,
            revocation_ms=[_ms(at - started) for at, _cost in answers],
            baseline_ms=baseline,
            in_agent_ms=[_ms(cost) for _at, cost in answers if cost is not None],
            delivered_ms=[_ms(at - cost - started) for at, cost in answers if cost is not None],
            sign_ms=_ms(signed - started),
            bundle_bytes=max(len(b) for b in bundles.values()),
            broker_cpu_s=broker_cpu,
        )
        self.result.rounds.append(result)
        self.console.print(
            f"round {number}: revoked p-site-{number:02d} → version {version}; applied by all "
            f"{len(answers)}: p50 {percentile(result.revocation_ms, 50):.0f} ms, "
            f"p99 {percentile(result.revocation_ms, 99):.0f} ms (baseline p99 {percentile(baseline, 99):.0f} ms)"
        )

    # --- (b) broker restart ---------------------------------------------------------------------------------

    def _broker_restart(self, lab: Lab, pool: WorkerPool) -> None:
        opts = self.options
        self._quiet(pool)
        before = sum(pool.ask("emit", opts.events, "before-outage"))
        lab.broker.stop()
        down_at = time.monotonic()
        _wait_until(
            "every agent saw the broker go",
            lambda: sum(s["connected"] for s in pool.ask("status")) == 0,
            opts.timeout_s,
        )
        during = sum(pool.ask("emit", opts.events, "during-outage"))
        self.result.outage_events = before + during
        time.sleep(max(0.0, opts.outage_s - (time.monotonic() - down_at)))
        started = time.monotonic_ns()
        lab.broker.start(timeout=60)
        self.result.broker_start_s = (time.monotonic_ns() - started) / 1e9
        _wait_until(
            "every agent reconnected",
            lambda: all(t is not None for t in pool.flat("connected_since", started)),
            opts.timeout_s,
            0.1,
        )
        self.result.reconnect_ms = [_ms(t - started) for t in pool.flat("connected_since", started)]
        _wait_until("every outbox drained after the restart", lambda: sum(pool.ask("depth")) == 0, opts.timeout_s, 0.2)
        # From the start command, like the reconnect figure: every event of the outage stored and acknowledged.
        self.result.drain_s = (time.monotonic_ns() - started) / 1e9
        self.console.print(
            f"broker restart: all {opts.agents} reconnected {max(self.result.reconnect_ms) / 1000:.1f} s after the "
            f"start command; {self.result.outage_events} events recorded around the outage"
        )

    # --- (c) enrolment ----------------------------------------------------------------------------------------

    def _enrol(self, config: ControllerConfig, store: Store, directory: Path) -> None:
        if self.options.enrol <= 0:
            return
        service = EnrolmentService(config, store)
        url = f"https://localhost:{config.http_port}"
        run = enrol_fleet(service, url, directory, self.options.enrol, prefix=ENROL_PREFIX)
        self.result.enrolled = len(run.agents)
        self.result.enrol_s = run.seconds
        self.console.print(f"enrolled {len(run.agents)} devices over HTTPS in {run.seconds:.1f} s")

    # --- counting -------------------------------------------------------------------------------------------

    def _count_events(self, pool: WorkerPool, config: ControllerConfig) -> None:
        self._quiet(pool)
        recorded: dict[str, int] = {}
        for answer in pool.ask("recorded"):
            recorded.update(answer)
        self.result.recorded = sum(recorded.values())
        rows, distinct = stored_counts(config, AGENT_PREFIX + "-")
        self.result.stored_rows, self.result.stored_distinct = rows, distinct


def stored_counts(config: ControllerConfig, prefix: str) -> tuple[int, int]:
    """Return (rows, distinct (agent, seq)) of the events stored for agents whose id starts with prefix."""
    engine = make_engine(config.resolved_database_url())
    try:
        mine = Event.agent_id.startswith(prefix)
        with engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(Event).where(mine)).scalar_one()
            distinct = conn.execute(
                select(func.count()).select_from(select(Event.agent_id, Event.seq).where(mine).distinct().subquery())
            ).scalar_one()
        return int(rows), int(distinct)
    finally:
        engine.dispose()


def _wait_https_ready(lab: Lab, proc: Any, config: ControllerConfig, timeout: float) -> None:
    """Wait until `controller serve` answers /readyz with ok over HTTPS (ingest connected)."""
    ctx = ssl.create_default_context(cafile=str(lab.pki.ca_cert))
    url = f"https://localhost:{config.http_port}/readyz"

    def ready() -> bool:
        if proc.poll() is not None:
            raise FleetBenchError(f"the controller exited; see {lab.root / 'logs'}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as answer:
                return bool(json.loads(answer.read())["status"] == "ok")
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False

    _wait_until("controller ready", ready, timeout, 0.2)


# --- report ---------------------------------------------------------------------------------------------------


def summary(result: FleetResult, options: FleetOptions) -> dict[str, Any]:
    """Return the one-line JSON summary (revocation and baseline pooled over every round and agent)."""
    revocation = [ms for r in result.rounds for ms in r.revocation_ms]
    baseline = [ms for r in result.rounds for ms in r.baseline_ms]
    in_agent = [ms for r in result.rounds for ms in r.in_agent_ms]
    delivered = [ms for r in result.rounds for ms in r.delivered_ms]

    def pct(values: list[float], q: float) -> float | None:
        return round(percentile(values, q), 1) if values else None

    return {
        "agents": result.agents,
        "revocation_p50_ms": pct(revocation, 50),
        "revocation_p99_ms": pct(revocation, 99),
        "reconnect_all_s": round(max(result.reconnect_ms) / 1000, 2) if result.reconnect_ms else None,
        "lost": result.lost,
        "enrol_100_s": round(result.enrol_s, 2) if result.enrolled else None,
        "enrol_agents": result.enrolled,
        # What ran (a): "lean" (fleet_lean: MQTT client + policy cache, one event loop per process) or "full".
        "agent_kind": result.agent_kind,
        "baseline_p50_ms": pct(baseline, 50),
        "baseline_p99_ms": pct(baseline, 99),
        "delivered_p50_ms": pct(delivered, 50),
        "delivered_p99_ms": pct(delivered, 99),
        "in_agent_apply_p50_ms": pct(in_agent, 50),
        "in_agent_apply_p99_ms": pct(in_agent, 99),
        "rounds": len(result.rounds),
        "reconnect_p50_s": round(percentile(result.reconnect_ms, 50) / 1000, 2) if result.reconnect_ms else None,
        "drain_after_restart_s": round(result.drain_s, 2),
        "duplicates": result.duplicates,
        "events": result.recorded,
        "processes": options.worker_processes,
        "a_processes": options.worker_processes if options.full_agents else options.lean_worker_processes,
        "a_threads_per_process": max(result.worker_threads if options.full_agents else result.lean_threads, default=0),
        "apply_threads": None if options.full_agents else options.apply_threads,
        "policy_on_disk": result.policy_on_disk,
        "heartbeat_s": options.heartbeat_s,
    }


def report(result: FleetResult, options: FleetOptions, console: Console) -> dict[str, Any]:
    """Print the tables; return the summary."""
    figures = summary(result, options)
    # The tables are wide; piped output (the docs, the tests) would otherwise be cut to 80 columns.
    console = console if console.is_terminal else Console(width=200)
    rounds = Table(
        "round", "version", "bundle bytes", "apply+sign+publish", "revocation p50", "revocation p99", "max",
        "delivered p99", "baseline p50", "baseline p99", "in agent p99", "broker CPU s",
        title=f"(a) revocation → applied by all {result.agents} {result.agent_kind} agents "
        "(ms from the start of `policy apply`)",
    )  # fmt: skip
    for index, r in enumerate(result.rounds, 1):
        rounds.add_row(
            str(index),
            str(r.version),
            f"{r.bundle_bytes:,}",
            f"{r.sign_ms:.0f}",
            f"{percentile(r.revocation_ms, 50):.0f}",
            f"{percentile(r.revocation_ms, 99):.0f}",
            f"{max(r.revocation_ms):.0f}",
            f"{percentile(r.delivered_ms, 99):.0f}" if r.delivered_ms else "-",
            f"{percentile(r.baseline_ms, 50):.0f}",
            f"{percentile(r.baseline_ms, 99):.0f}",
            f"{percentile(r.in_agent_ms, 99):.1f}" if r.in_agent_ms else "-",
            f"{r.broker_cpu_s:.2f}",
        )
    console.print(rounds)
    table = Table("measure", "value", title="bench fleet")
    if not options.full_agents:
        table.add_row(
            "(a) lean agents / worker processes / apply threads each",
            f"{result.agents} / {options.lean_worker_processes} / {options.apply_threads}",
        )
        table.add_row("(a) threads per lean worker process", ", ".join(str(n) for n in result.lean_threads))
        table.add_row(
            "(a) cold start: lean processes up, all connected with version 1 (s)", f"{result.lean_connect_all_s:.1f}"
        )
        table.add_row("(a) policy cache files read back at the last version", f"{result.policy_on_disk}")
    table.add_row("full agents / worker processes", f"{result.agents} / {options.worker_processes}")
    table.add_row("threads per full-agent worker process", ", ".join(str(n) for n in result.worker_threads))
    for label, seconds in result.setup.items():
        table.add_row(f"set-up: {label} (s)", f"{seconds:.1f}")
    table.add_row("cold start: full-agent processes up, all connected (s)", f"{result.connect_all_s:.1f}")
    table.add_row(
        "(a) revocation p50 / p99, all rounds pooled (ms)",
        f"{figures['revocation_p50_ms']} / {figures['revocation_p99_ms']}",
    )
    table.add_row(
        "(a) baseline raw QoS 1 p50 / p99, same size, same agents (ms)",
        f"{figures['baseline_p50_ms']} / {figures['baseline_p99_ms']}",
    )
    table.add_row(
        "(a) bundle delivered (arrived at the agent, before verification) p50 / p99 (ms)",
        f"{figures['delivered_p50_ms']} / {figures['delivered_p99_ms']}",
    )
    table.add_row(
        "(a) in the agent: arrival → verified, persisted (full agents: and recorded) p50 / p99 (ms)",
        f"{figures['in_agent_apply_p50_ms']} / {figures['in_agent_apply_p99_ms']}",
    )
    table.add_row("(b) broker start command → listening (s)", f"{result.broker_start_s:.2f}")
    table.add_row(
        "(b) start command → all reconnected, p50 / all (s)",
        f"{figures['reconnect_p50_s']} / {figures['reconnect_all_s']}",
    )
    table.add_row("(b) start command → every outbox drained (s)", f"{result.drain_s:.1f}")
    table.add_row(
        "(b) events recorded (all kinds) / stored distinct / lost / duplicates",
        f"{result.recorded} / {result.stored_distinct} / {result.lost} / {result.duplicates}",
    )
    table.add_row(f"(c) enrolment of {result.enrolled} devices over HTTPS (s)", f"{result.enrol_s:.1f}")
    console.print(table)
    return figures


def run_fleet_bench(options: FleetOptions, console: Console) -> int:
    """Run the fleet bench, print its tables and the JSON line; return the exit code."""
    root = Path(tempfile.mkdtemp(prefix="sekisho-bench-fleet-")) if options.workdir is None else options.workdir
    if options.workdir is not None:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
    try:
        result = FleetBench(options, console).run(root)
    except FleetBenchError as err:
        console.print(f"[bold red]bench fleet failed:[/] {err}", soft_wrap=True)
        return 1
    finally:
        if options.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    figures = report(result, options, console)
    print(json.dumps(figures))
    bad = result.lost != 0 or result.duplicates != 0 or result.enrolled != options.enrol
    return 1 if bad else 0
