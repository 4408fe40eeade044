"""`sekisho bench scale`: agents behind site brokers bridged to a central broker, against the same agents direct.

One run, two phases on one central broker and one controller (``controller serve``, SQLite unless a URL is
given):

- **bridged**: ``--sites`` site brokers (mosquitto, the project's configuration, each bridging over mutual
  TLS to the central broker's sites listener through a cuttable loopback link, sekisho.lab.sites), with
  ``--agents-per-site`` real agents each (the agent runtime: outbox, window, resends; all in one process,
  sekisho.bench.scale_agents). With ``--partition-s`` every site's link to the centre is cut that long
  once the first events have arrived, while the agents keep producing, then healed.
- **direct**: the site brokers stopped, the same agents (same outboxes, sequence numbers going on) connected
  straight to the central broker's agents' listener.

Per hop, on this host's wall clock: the event's own time (``at``, when the agent recorded it) → seen on the
site broker → seen on the central broker (probes: non-shared QoS 0 subscribers on the brokers' controllers'
listeners) → stored (``stored_at``). events/s: stored events over the time from the phase's first event to
its last store. Lost: an (agent, seq) the phase emitted that is not stored; duplicates: an (agent, seq)
stored twice. Both must be 0 (exit 1 otherwise); the JSON line is printed last.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from sekisho.controller.store.db import make_engine
from sekisho.controller.store.models import Event
from sekisho.deploy.broker import Broker
from sekisho.deploy.pki import PkiPaths
from sekisho.lab.sites import Federation
from sekisho.protocol import topics

PHASES = ("bridged", "direct")


@dataclass(frozen=True)
class Options:
    """What `sekisho bench scale` was asked to run."""

    sites: int = 3
    agents_per_site: int = 10
    events: int = 100
    rate: float = 20.0
    partition_s: float = 0.0
    database_url: str | None = None
    workdir: Path | None = None
    timeout_s: float = 600.0
    resend_after_s: float = 30.0


class Probe:
    """A non-shared QoS 0 subscriber to every agent's events on one broker's controllers' listener."""

    def __init__(self, name: str, broker: Broker) -> None:
        self.seen: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        pki = PkiPaths.at(broker.pki_dir)
        # Controller client ids start with "controller": the broker's id namespace keeps them apart.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"controller-bench-probe-{name}", protocol=mqtt.MQTTv5
        )
        self._client.tls_set(
            ca_certs=str(pki.ca_cert),
            certfile=str(pki.controller_cert),
            keyfile=str(pki.controller_key),
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.connect_host, broker.controller_port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(15):
            self.close()
            raise RuntimeError(f"probe {name}: no SUBACK")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(topics.all_agents(topics.EVENTS), qos=0)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        try:
            body = json.loads(message.payload)["event"]
            key = (str(body["agent"]), int(body["seq"]))
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            # The first sighting counts; an agent's resend of the same event is not a new arrival.
            self.seen.setdefault(key, now)

    def first_seen(self) -> float | None:
        """Return when this probe saw its first event (None: none yet)."""
        with self._lock:
            return min(self.seen.values(), default=None)

    def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _stored(url: str) -> list[tuple[str, int, str, float, float]]:
    """Return (agent, seq, phase note, event time, stored time) of every synthetic event stored."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Event.agent_id, Event.seq, Event.payload, Event.occurred_at, Event.stored_at).where(
                    Event.type == "test.synthetic"
                )
            ).all()
    finally:
        engine.dispose()
    return [(r[0], int(r[1]), str(r[2].get("note", "")), r[3].timestamp(), r[4].timestamp()) for r in rows]


def _run_agents(fed: Federation, opts: Options, phase: str) -> subprocess.Popen[bytes]:
    configs = [str(fed.lab.agent_config(name)) for name in fed.agents()]
    args = ["--count", str(opts.events), "--rate", str(opts.rate), "--note", phase, "--timeout", str(opts.timeout_s)]
    return fed.lab.spawn(*args, *configs, log_name=f"agents-{phase}", module="sekisho.bench.scale_agents")


def _summary_line(fed: Federation, phase: str) -> dict[str, Any]:
    path = fed.lab.root / "logs" / f"agents-{phase}.log"
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                summary: dict[str, Any] = json.loads(line)
                return summary
    return {"drained": False}


def _partition(fed: Federation, central: Probe, seconds: float, done: threading.Event, log: list[str]) -> None:
    # The cut starts once events flow through the bridges, so the partition interrupts a running stream.
    while central.first_seen() is None and not done.wait(0.05):
        pass
    if done.is_set():
        return
    for site in fed.site_brokers.values():
        site.link.cut()
    log.append(f"links cut at {time.time():.3f} for {seconds} s")
    done.wait(seconds)
    for site in fed.site_brokers.values():
        site.link.heal()
    log.append(f"links healed at {time.time():.3f}")


def _phase_figures(
    rows: list[tuple[str, int, str, float, float]],
    phase: str,
    agents: list[str],
    events: int,
    probes: dict[str, dict[tuple[str, int], float]],
) -> dict[str, Any]:
    mine = [r for r in rows if r[2] == phase]
    keys = [(r[0], r[1]) for r in mine]
    distinct = set(keys)
    expected = events * len(agents)
    per_agent = {a: sum(1 for k in distinct if k[0] == a) for a in agents}
    lost = sum(max(0, events - n) for n in per_agent.values())
    hops: dict[str, list[float]] = {}
    e2e: list[float] = []
    for agent, seq, _note, at, stored in mine:
        key = (agent, seq)
        e2e.append(stored - at)
        points = [("agent", at)]
        site = probes["site"].get(key)
        if site is not None:
            points.append(("site broker", site))
        central = probes["central"].get(key)
        if central is not None:
            points.append(("central broker", central))
        points.append(("stored", stored))
        for (a_name, a_t), (b_name, b_t) in itertools.pairwise(points):
            hops.setdefault(f"{a_name} → {b_name}", []).append(b_t - a_t)
    first = min((r[3] for r in mine), default=0.0)
    last = max((r[4] for r in mine), default=0.0)
    seconds = last - first
    return {
        "expected": expected,
        "stored": len(distinct),
        "lost": lost,
        "duplicates": len(keys) - len(distinct),
        "eps": round(len(distinct) / seconds) if seconds > 0 else 0,
        "p50_ms": _ms(_percentile(e2e, 0.5)),
        "p99_ms": _ms(_percentile(e2e, 0.99)),
        "hops": {
            name: {"p50_ms": _ms(_percentile(v, 0.5)), "p99_ms": _ms(_percentile(v, 0.99)), "n": len(v)}
            for name, v in hops.items()
        },
    }


def run_scale_bench(opts: Options, console: Console) -> int:
    """Run the bridged and the direct phase; print a table and the JSON line; return the exit code."""
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="sekisho-bench-scale-"))
    if opts.workdir is not None and root.exists():
        shutil.rmtree(root)
    sites = {f"site{i + 1}": [f"s{i + 1}-a{j + 1:02d}" for j in range(opts.agents_per_site)] for i in range(opts.sites)}
    fed = Federation(root, sites=sites, database_url=opts.database_url)
    probes: list[Probe] = []
    failed: list[str] = []
    partition_log: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    site_seen: dict[tuple[str, int], float] = {}
    resent: dict[str, int] = {}
    try:
        agent_options: dict[str, object] = {"resend_after_s": opts.resend_after_s, "heartbeat_interval_s": 60}
        fed.start(agent_options)
        lab = fed.lab
        lab.write_controller_config(batch_max=1000, batch_wait_ms=10)
        fed.register_agents()
        controller = lab.spawn_controller(http=True)
        from sekisho.bench.cli import _db_url, _wait_ready

        _wait_ready(lab, controller, timeout=120)
        central = Probe("central", lab.broker)
        probes.append(central)
        site_probes = [Probe(name, site.broker) for name, site in fed.site_brokers.items()]
        probes += site_probes
        console.print(
            f"{opts.sites} site broker(s) × {opts.agents_per_site} agents, {opts.events} events per agent "
            f"at {opts.rate or 'full'} /s; partition {opts.partition_s} s; agents resend after {opts.resend_after_s} s"
        )

        for phase in PHASES:
            if phase == "direct":
                # The same agents, their outboxes and sequence numbers kept, now on the central broker.
                for probe in site_probes:
                    site_seen.update(probe.seen)
                    probe.close()
                    probes.remove(probe)
                for site in fed.site_brokers.values():
                    site.broker.stop()
                for name in fed.agents():
                    lab.add_agent(name, broker_port=lab.broker.port, **agent_options)
            done = threading.Event()
            cutter = None
            if phase == "bridged" and opts.partition_s > 0:
                cutter = threading.Thread(
                    target=_partition, args=(fed, central, opts.partition_s, done, partition_log), daemon=True
                )
                cutter.start()
            proc = _run_agents(fed, opts, phase)
            try:
                proc.wait(timeout=opts.timeout_s + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            done.set()
            if cutter is not None:
                cutter.join(timeout=5)
            summary = _summary_line(fed, phase)
            resent[phase] = int(summary.get("resent", 0))
            if proc.returncode != 0 or not summary.get("drained"):
                failed.append(phase)
            console.print(f"{phase}: agents {json.dumps(summary)}")
        for line in partition_log:
            console.print(line)
        time.sleep(0.5)  # the last probe deliveries
        rows = _stored(_db_url(lab))
        seen = {"site": site_seen, "central": dict(central.seen)}
        for phase in PHASES:
            results[phase] = _phase_figures(rows, phase, fed.agents(), opts.events, seen)
    finally:
        for probe in probes:
            probe.close()
        fed.stop()
        if opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    table = Table("measure", *PHASES, title="bench scale (preliminary on a shared host)")
    table.add_row("events/s (stored)", *(f"{results[p]['eps']:,}" for p in PHASES))
    table.add_row("end to end p50 / p99 (ms)", *(f"{results[p]['p50_ms']} / {results[p]['p99_ms']}" for p in PHASES))
    hop_names = list(dict.fromkeys(h for p in PHASES for h in results[p]["hops"]))
    for hop in hop_names:
        cells = []
        for p in PHASES:
            h = results[p]["hops"].get(hop)
            cells.append(f"{h['p50_ms']} / {h['p99_ms']} (n={h['n']})" if h else "—")
        table.add_row(f"{hop} p50 / p99 (ms)", *cells)
    table.add_row("stored / expected", *(f"{results[p]['stored']} / {results[p]['expected']}" for p in PHASES))
    table.add_row("events published again by the agents", *(str(resent.get(p, 0)) for p in PHASES))
    table.add_row("lost / duplicates", *(f"{results[p]['lost']} / {results[p]['duplicates']}" for p in PHASES))
    console.print(table)
    lost = sum(results[p]["lost"] for p in PHASES)
    duplicates = sum(results[p]["duplicates"] for p in PHASES)
    figures: dict[str, Any] = {
        "bridged_eps": results["bridged"]["eps"],
        "direct_eps": results["direct"]["eps"],
        "bridged_p50_ms": results["bridged"]["p50_ms"],
        "bridged_p99_ms": results["bridged"]["p99_ms"],
        "direct_p50_ms": results["direct"]["p50_ms"],
        "direct_p99_ms": results["direct"]["p99_ms"],
        "bridged_hops": results["bridged"]["hops"],
        "direct_hops": results["direct"]["hops"],
        "sites": opts.sites,
        "agents": opts.sites * opts.agents_per_site,
        "events_per_agent": opts.events,
        "partition_s": opts.partition_s,
        "resend_after_s": opts.resend_after_s,
        "resent": {phase: resent.get(phase, 0) for phase in PHASES},
        "lost": lost,
        "duplicates": duplicates,
        "failed": failed,
    }
    print(json.dumps(figures, ensure_ascii=False))
    return 1 if lost or duplicates or failed else 0
