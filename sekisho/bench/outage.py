"""`sekisho bench outage`: the broker down for minutes while many real agents buffer; exact counts afterwards.

Real mosquitto, a real `controller serve` and real agent processes (`sekisho agent simulate`, durable outbox):
the controller is up, the broker is stopped, the agents record every event while it is down, the broker comes
back after ``--down-s`` and the controller and agents reconnect by themselves. The result is counted from the
store: every event the agents recorded stored exactly once, each agent's sequence numbers without a gap, every
outbox empty, and `records verify` clean.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import select

from sekisho.agents.runtime.errors import OutboxError
from sekisho.agents.runtime.outbox import Outbox
from sekisho.controller.config import load_config
from sekisho.controller.service import open_store
from sekisho.controller.store.db import make_engine
from sekisho.controller.store.models import Event
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab


@dataclass(frozen=True)
class OutageOptions:
    """What one run does: how many agents, events in all, how long the broker stays down."""

    agents: int = 20
    events: int = 100_000
    down_s: float = 600.0
    reconnect_max_s: float = 30.0
    timeout_s: float = 1800.0
    workdir: Path | None = None

    def per_agent(self) -> list[int]:
        """Split the events between the agents as evenly as possible."""
        base, extra = divmod(self.events, self.agents)
        return [base + (1 if i < extra else 0) for i in range(self.agents)]


@dataclass
class OutageResult:
    """Exact counts from the store after the outage."""

    emitted: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    seq_gaps: int = 0
    outbox_left: int = 0
    verify_ok: bool = False
    agents_drained: int = 0
    buffered_s: float = 0.0
    down_s: float = 0.0
    drain_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def agent_name(index: int) -> str:
    """The bench's agents are term-out-001, term-out-002, …"""
    return f"term-out-{index + 1:03d}"


def _outbox_depth(lab: Lab, agent: str) -> int:
    try:
        return Outbox.inspect(lab.root / "agents" / agent / "state" / "outbox.sqlite3").depth
    except OutboxError:
        return 0  # not created yet: an agent still starting


def _wait(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class Tally:
    """What the store holds of the bench's events, against what the agents recorded."""

    stored: int
    lost: int
    duplicated: int
    seq_gaps: int
    problems: list[str]


def tally(rows: Iterable[tuple[str, int, str, Any]], wanted: dict[str, int]) -> Tally:
    """Count stored, lost and duplicated synthetic events and agents whose seqs are not 1..n, from event rows."""
    counters: dict[str, Counter[int]] = {name: Counter() for name in wanted}
    seqs: dict[str, list[int]] = {name: [] for name in wanted}
    for agent, seq, type_, payload in rows:
        if agent in counters:
            # Every event of an agent counts for its sequence (it also records its own start); only the
            # synthetic ones carry the counter n that tells a lost or doubled event.
            seqs[agent].append(int(seq))
            if type_ == "test.synthetic":
                counters[agent][int(payload["n"])] += 1
    stored = lost = duplicated = gaps = 0
    problems: list[str] = []
    for agent, count in wanted.items():
        seen = counters[agent]
        stored += sum(seen.values())
        missing = sum(1 for n in range(count) if n not in seen)
        extra = sum(c - 1 for c in seen.values() if c > 1) + sum(1 for n in seen if not 0 <= n < count)
        lost += missing
        duplicated += extra
        ordered = sorted(seqs[agent])
        if ordered != list(range(1, len(ordered) + 1)):
            gaps += 1
            problems.append(f"{agent}: sequence numbers not 1..{len(ordered)}")
        if missing or extra:
            problems.append(f"{agent}: {missing} lost, {extra} duplicated of {count}")
    return Tally(stored, lost, duplicated, gaps, problems)


def count_stored(url: str, wanted: dict[str, int]) -> Tally:
    """Tally every stored event of the bench's agents."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Event.agent_id, Event.seq, Event.type, Event.payload))
            return tally(((r[0], r[1], r[2], r[3]) for r in rows), wanted)
    finally:
        engine.dispose()


class OutageBench:
    """One run on a lab rooted in a directory."""

    def __init__(self, options: OutageOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.result = OutageResult()

    def run(self, root: Path) -> OutageResult:
        """Set the site up, take the broker down, let the agents buffer, bring it back, count."""
        opts = self.options
        lab = Lab(root)
        names = [agent_name(i) for i in range(opts.agents)]
        wanted = dict(zip(names, opts.per_agent(), strict=True))
        try:
            lab.start_broker()
            lab.write_controller_config()
            for name in names:
                lab.add_agent(name, reconnect_max_s=opts.reconnect_max_s)
            self._register(lab, names)
            lab.spawn_controller(http=True, worker_id="controller-1")
            self._wait_ready(lab)
            lab.broker.stop()
            down_at = time.monotonic()
            self.console.print(f"broker down; {len(names)} agents record {opts.events} events")
            agents = [self._spawn_agent(lab, name, count) for name, count in wanted.items()]
            _wait(
                "every event to be in an outbox",
                lambda: sum(_outbox_depth(lab, n) for n in names) >= opts.events,
                opts.timeout_s,
            )
            self.result.buffered_s = time.monotonic() - down_at
            self.result.emitted = opts.events
            left = opts.down_s - (time.monotonic() - down_at)
            if left > 0:
                self.console.print(f"all buffered in {self.result.buffered_s:.1f} s; broker stays down {left:.0f} s")
                time.sleep(left)
            lab.start_broker()
            up_at = time.monotonic()
            self.result.down_s = up_at - down_at
            self.console.print("broker up; waiting for every agent to drain")
            deadline = up_at + opts.timeout_s
            for proc in agents:
                try:
                    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    code = None
                if code == 0:
                    self.result.agents_drained += 1
            self.result.drain_s = time.monotonic() - up_at
            self.result.outbox_left = sum(_outbox_depth(lab, n) for n in names)
            url = self._database_url(lab)
            counted = count_stored(url, wanted)
            self.result.stored, self.result.lost = counted.stored, counted.lost
            self.result.duplicated, self.result.seq_gaps = counted.duplicated, counted.seq_gaps
            self.result.problems += counted.problems
            verify = lab.sekisho("records", "verify", "--config", str(lab.controller_config), check=False, timeout=1800)
            self.result.verify_ok = verify.returncode == 0
            if not self.result.verify_ok:
                self.result.problems.append("records verify: " + verify.stdout.strip()[-500:])
        finally:
            lab.stop_all()
        return self.result

    def _register(self, lab: Lab, names: list[str]) -> None:
        # In process, as `controller register-agent` does for one: a command per agent costs seconds each.
        store = open_store(load_config(lab.controller_config))
        try:
            for name in names:
                store.register_agent(name, AgentCredentials.at(lab.pki_dir, name).signing_pub.read_text())
        finally:
            store.engine.dispose()

    def _spawn_agent(self, lab: Lab, name: str, count: int) -> subprocess.Popen[bytes]:
        args = ["agent", "simulate", "--config", str(lab.agent_config(name)), "--count", str(count)]
        args += ["--exit-when-drained", "--timeout", str(self.options.timeout_s)]
        return lab.spawn(*args, log_name=name)

    def _database_url(self, lab: Lab) -> str:
        return load_config(lab.controller_config).resolved_database_url()

    def _wait_ready(self, lab: Lab) -> None:
        import urllib.error
        import urllib.request

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{lab.http_port}/readyz", timeout=2) as answer:
                    return bool(json.loads(answer.read())["status"] == "ok")
            except (urllib.error.URLError, OSError, ValueError):
                return False

        _wait("the controller to be ready", ready, 120)


def summary(result: OutageResult, options: OutageOptions) -> dict[str, Any]:
    """The last line the command prints: exact counts and the timings."""
    return {
        "agents": options.agents,
        "events": result.emitted,
        "stored": result.stored,
        "lost": result.lost,
        "duplicated": result.duplicated,
        "seq_gaps": result.seq_gaps,
        "outbox_left": result.outbox_left,
        "chains_verify": result.verify_ok,
        "agents_drained": result.agents_drained,
        "buffered_s": round(result.buffered_s, 1),
        "down_s": round(result.down_s, 1),
        "drain_s": round(result.drain_s, 1),
    }


def run_outage_bench(options: OutageOptions, console: Console) -> int:
    """Run the outage bench; print the counts and a last-line JSON; 0 only if nothing was lost or doubled."""
    root = options.workdir or Path(tempfile.mkdtemp(prefix="sekisho-bench-outage-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = OutageBench(options, console).run(root)
    except TimeoutError as err:
        console.print(f"[red]{err}[/red]")
        print(json.dumps({"agents": options.agents, "events": options.events, "error": str(err)}))
        return 1
    finally:
        if options.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    for problem in result.problems:
        console.print(f"[red]{problem}[/red]", markup=True, highlight=False)
    line = summary(result, options)
    ok = (
        result.lost == 0
        and result.duplicated == 0
        and result.seq_gaps == 0
        and result.outbox_left == 0
        and result.verify_ok
        and result.agents_drained == options.agents
    )
    print(json.dumps(line), flush=True)
    return 0 if ok else 1
