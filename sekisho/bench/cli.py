"""Benchmarks of the event pipeline. Each compares against a baseline measured in the same run."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import func, select

from sekisho.agents.runtime.outbox import Outbox
from sekisho.bench.raw import TlsFiles, run_baseline, tls_for_dir
from sekisho.common.i18n import _
from sekisho.controller.store.db import make_engine
from sekisho.controller.store.models import Event
from sekisho.deploy.pki import AgentCredentials, PkiPaths
from sekisho.lab import Lab
from sekisho.lab.pgcluster import pg_database, postgres_cluster
from sekisho.protocol import events, signing, topics

console = Console()
bench_app = typer.Typer(help=_("Measure the pipeline (figures go to docs/benchmarks.md)."), no_args_is_help=True)


def _stored_count(url: str, type_: str = "test.synthetic") -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Event).where(Event.type == type_)).scalar_one())
    finally:
        engine.dispose()


def _distinct_counts(url: str) -> tuple[int, int, float | None]:
    """Return (rows, distinct (agent, seq) pairs, first received_at as epoch seconds) of synthetic events."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(func.count(), func.min(Event.received_at)).where(Event.type == "test.synthetic")
            ).one()
            distinct = conn.execute(
                select(func.count()).select_from(
                    select(Event.agent_id, Event.seq).where(Event.type == "test.synthetic").distinct().subquery()
                )
            ).scalar_one()
            first = rows[1].timestamp() if rows[1] is not None else None
            return int(rows[0]), int(distinct), first
    finally:
        engine.dispose()


def _wait_ready(lab: Lab, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until the controller's ingest is connected (its /readyz says ok)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited; see {lab.root / 'logs'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{lab.http_port}/readyz", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("controller not ready in time")


def _sample_event_bytes(pki_dir: Path, agent: str, note_bytes: int) -> bytes:
    key = signing.load_private_key(AgentCredentials.at(pki_dir, agent).signing_key)
    return events.build_event(
        key, agent=agent, seq=1, type="test.synthetic", payload={"n": 1, "note": "x" * note_bytes}
    )


def _prefill(lab: Lab, agent: str, count: int, note_bytes: int) -> None:
    creds = AgentCredentials.at(lab.pki_dir, agent)
    state = lab.root / "agents" / agent / "state"
    state.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(
        state / "outbox.sqlite3",
        signing_key=signing.load_private_key(creds.signing_key),
        agent_id=agent,
    )
    try:
        note = "x" * note_bytes
        for start in range(0, count, 5000):
            outbox.append_many(
                [("test.synthetic", {"n": i, "note": note}) for i in range(start, min(count, start + 5000))]
            )
    finally:
        outbox.close()


def _workdir(keep: Path | None) -> Path:
    if keep is not None:
        if keep.exists():
            shutil.rmtree(keep)
        keep.mkdir(parents=True)
        return keep
    return Path(tempfile.mkdtemp(prefix="sekisho-bench-"))


@bench_app.command(
    "ingest", help=_("Raw paho QoS 1 publish→subscribe rate vs. durable agent-outbox→stored-and-acked rate.")
)
def bench_ingest(
    per_agent: Annotated[int, typer.Option(min=100, help=_("events per agent process"))] = 20_000,
    agents: Annotated[int, typer.Option(min=1, max=16, help=_("agent (publisher) processes"))] = 3,
    note_bytes: Annotated[int, typer.Option(min=0, max=4096, help=_("filler bytes per event"))] = 64,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=8,
            help=_("controller ingest processes (subscribers); default 1 on SQLite (one writer), 2 on PostgreSQL"),
        ),
    ] = None,
    database_url: Annotated[str | None, typer.Option(help=_("store URL (default: SQLite in the work dir)"))] = None,
    postgres: Annotated[
        bool, typer.Option(help=_("store in a private PostgreSQL cluster started for the run"))
    ] = False,
    workdir: Annotated[Path | None, typer.Option(help=_("keep state here instead of a temp dir"))] = None,
    rounds: Annotated[
        int, typer.Option(min=1, max=9, help=_("alternate baseline and durable runs; report medians"))
    ] = 1,
) -> None:
    """Raw paho QoS 1 publish→subscribe rate vs. durable agent-outbox→stored-and-acked rate."""
    if workers is None:
        workers = default_workers(postgres or _is_postgres(database_url))
    results = []
    for index in range(rounds):
        if rounds > 1:
            console.rule(f"round {index + 1} of {rounds}")
        with contextlib.ExitStack() as stack:
            url = database_url
            if postgres:
                url = stack.enter_context(pg_database(stack.enter_context(postgres_cluster())))
            results.append(_bench_ingest(per_agent, agents, note_bytes, workers, url, workdir))
    summary = {key: statistics.median(r[key] for r in results) for key in ("raw_eps", "durable_eps", "ratio")}
    if rounds > 1:
        console.print(
            "medians over rounds: "
            + ", ".join(f"{k} {v:,.3f}" if k == "ratio" else f"{k} {v:,.0f}" for k, v in summary.items())
        )
    lost = sum(r["expected"] - r["stored"] for r in results)
    duplicates = sum(r["duplicates"] for r in results)
    print(json.dumps({**summary, "rounds": rounds, "lost": lost, "duplicates": duplicates}))
    if lost or duplicates or any(r["failed"] for r in results):
        raise typer.Exit(1)


def default_workers(postgres: bool) -> int:
    """Return the bench's default number of controller ingest processes for a backend.

    SQLite has one writer: a second process only queues for its lock, and on a shared subscription each
    process sees every other seq of an agent, so each batch opens sequence-gap findings the other closes.
    One process already checks the next batch while it stores the last. PostgreSQL runs its own server
    process; two ingest processes there verify in parallel while the other writes. The raw baseline always
    gets as many subscribers as the durable run has ingest processes.
    """
    return 2 if postgres else 1


def _is_postgres(url: str | None) -> bool:
    return url is not None and url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def _bench_ingest(
    per_agent: int, agents: int, note_bytes: int, workers: int, database_url: str | None, workdir: Path | None
) -> dict[str, Any]:
    root = _workdir(workdir)
    lab = Lab(root, database_url=database_url)
    names = [f"bench-{i + 1}" for i in range(agents)]
    try:
        lab.start_broker()
        lab.write_controller_config(batch_max=1000, batch_wait_ms=10)
        for name in names:
            lab.add_agent(name, resend_after_s=120, max_inflight=1000, heartbeat_interval_s=60)
        payload = _sample_event_bytes(lab.pki_dir, names[0], note_bytes)
        console.print(f"{agents} publisher process(es), {workers} subscriber process(es), {len(payload)}-byte events")

        # (a) the raw baseline
        pki = PkiPaths.at(lab.pki_dir)
        ctl_tls = TlsFiles(str(pki.ca_cert), str(pki.controller_cert), str(pki.controller_key))
        raw = run_baseline(
            lab.broker.port,
            ctl_tls,
            [
                (topics.topic(n, topics.EVENTS), tls_for_dir(AgentCredentials.at(lab.pki_dir, n).directory))
                for n in names
            ],
            payload,
            per_agent,
            "$share/bench/" + topics.all_agents(topics.EVENTS),
            subscriber_port=lab.broker.controller_port,
            subscribers=workers,
        )
        console.print(f"raw baseline: {raw.messages} messages in {raw.seconds:.2f} s = {raw.rate:,.0f} msg/s")

        # (b) durable: pre-filled outboxes drained through the controller into the store
        for name in names:
            _prefill(lab, name, per_agent, note_bytes)
        lab.register_agents(*names)
        url = _db_url(lab)
        controller = lab.spawn_controller(http=True, worker_id="controller-1")
        extra = [lab.spawn_controller(worker_id=f"controller-{i + 2}") for i in range(workers - 1)]
        _wait_ready(lab, controller)
        time.sleep(1.0)  # let the extra workers subscribe too
        cpu_before = _cpu_seconds(lab, [controller, *extra])
        procs = [
            lab.spawn(
                "agent",
                "simulate",
                "--config",
                str(lab.agent_config(n)),
                "--count",
                "0",
                "--exit-when-drained",
                "--timeout",
                "900",
                log_name=n,
            )
            for n in names
        ]
        deadline = time.monotonic() + 900
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        drained_at = time.time()
        failed = [n for n, p in zip(names, procs, strict=True) if p.returncode != 0]
        rows, distinct, first = _distinct_counts(url)
        expected = per_agent * agents
        seconds = drained_at - first if first else float("nan")
        durable = rows / seconds if seconds and seconds > 0 else 0.0
        ratio = durable / raw.rate if raw.rate else 0.0
        table = Table("measure", "value", title="bench ingest")
        table.add_row("raw QoS 1 publish→subscribe (msg/s)", f"{raw.rate:,.0f}")
        table.add_row("durable outbox→stored+acked (events/s)", f"{durable:,.0f}")
        table.add_row("ratio", f"{ratio:.2f}")
        table.add_row("stored rows / expected / distinct", f"{rows} / {expected} / {distinct}")
        table.add_row("agents not drained", ", ".join(failed) or "none")
        table.add_row("controller workers", str(len(extra) + 1))
        table.add_row("store", url.split("://")[0])
        cpu = {k: v - cpu_before[k] for k, v in _cpu_seconds(lab, [controller, *extra]).items()}
        per_event = {k: f"{v / max(rows, 1) * 1e6:.0f} µs" for k, v in cpu.items()}
        table.add_row("CPU per stored event", ", ".join(f"{k} {v}" for k, v in per_event.items()))
        console.print(table)
        return {
            "raw_eps": round(raw.rate),
            "durable_eps": round(durable),
            "ratio": round(ratio, 3),
            "stored": distinct,
            "expected": expected,
            "duplicates": rows - distinct,
            "failed": failed,
        }
    finally:
        lab.stop_all()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _cpu_seconds(lab: Lab, controllers: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """CPU seconds used so far by the controllers, the broker and this process's reaped children (agents)."""

    def used(pid: int | None) -> float:
        if pid is None:
            return 0.0
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "controllers": sum(used(p.pid) for p in controllers),
        "broker": used(lab.broker.pid),
        "agents": children.ru_utime + children.ru_stime,
    }


def _db_url(lab: Lab) -> str:
    from sekisho.controller.config import load_config

    return load_config(lab.controller_config).resolved_database_url()


def _outbox_depth(path: Path) -> int:
    return Outbox.inspect(path).depth if path.exists() else 0


@bench_app.command(
    "outbox", help=_("Queue COUNT events with the broker down, then drain; report drain rate, loss, idle RSS and CPU.")
)
def bench_outbox(
    count: Annotated[int, typer.Option(min=100, help=_("events queued while the broker is down"))] = 1_000_000,
    note_bytes: Annotated[int, typer.Option(min=0, max=4096, help=_("filler bytes per event"))] = 64,
    idle_seconds: Annotated[float, typer.Option(min=2, help=_("how long to sample the idle agent"))] = 20,
    workdir: Annotated[Path | None, typer.Option(help=_("keep state here instead of a temp dir"))] = None,
) -> None:
    """Queue COUNT events with the broker down, then drain; report drain rate, loss, idle RSS and CPU."""
    root = _workdir(workdir)
    lab = Lab(root)
    name = "bench-outbox"
    try:
        lab.write_controller_config(batch_max=1000, batch_wait_ms=10)
        config = lab.add_agent(name, resend_after_s=120, heartbeat_interval_s=30)
        outbox_path = lab.root / "agents" / name / "state" / "outbox.sqlite3"
        # The agent itself buffers: it runs with the broker down and emits in bulk transactions.
        agent = lab.spawn(
            "agent",
            "simulate",
            "--config",
            str(config),
            "--count",
            str(count),
            "--note-bytes",
            str(note_bytes),
            "--exit-when-drained",
            "--timeout",
            "7200",
            log_name=name,
        )
        started = time.monotonic()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("queueing (broker down)", total=count)
            while (depth := _outbox_depth(outbox_path)) < count and agent.poll() is None:
                progress.update(task, completed=depth)
                time.sleep(0.5)
        queued_s = time.monotonic() - started
        console.print(f"queued {count:,} events with the broker down in {queued_s:.1f} s ({count / queued_s:,.0f}/s)")
        lab.start_broker()
        lab.register_agents(name)
        controller = lab.spawn_controller(http=True)
        _wait_ready(lab, controller)
        drain_start = time.monotonic()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("draining to the controller", total=count)
            shown = 0.0
            while agent.poll() is None and time.monotonic() - drain_start < 7200:
                # Counting the outbox costs the agent's disk: look every 2 s, but notice the end at once.
                if time.monotonic() - shown > 2:
                    progress.update(task, completed=count - _outbox_depth(outbox_path))
                    shown = time.monotonic()
                time.sleep(0.1)
        drained_at = time.time()
        url = _db_url(lab)
        rows, distinct, first = _distinct_counts(url)
        lost = count - distinct
        # From the first event stored to the agent's exit on its last ack: the agent's reconnect
        # backoff (up to reconnect_max_s after the broker comes back) is not drain throughput.
        drain_s = drained_at - first if first else float("nan")
        drain_eps = distinct / drain_s if drain_s > 0 else 0.0
        console.print(f"drained in {drain_s:.1f} s: {drain_eps:,.0f} events/s; stored {rows}, distinct {distinct}")

        # Idle: a running agent with an empty outbox and a connected link.
        idle = lab.spawn("agent", "run", "--config", str(config), "--log-level", "WARNING", log_name=f"{name}-idle")
        time.sleep(3)
        proc = psutil.Process(idle.pid)
        proc.cpu_percent(None)
        time.sleep(idle_seconds)
        cpu = proc.cpu_percent(None)
        rss_mb = proc.memory_info().rss / 2**20
        table = Table("measure", "value", title="bench outbox")
        table.add_row("queued (broker down)", f"{count:,} in {queued_s:.1f} s")
        table.add_row("drain rate (events/s)", f"{drain_eps:,.0f}")
        table.add_row("lost", str(lost))
        table.add_row("duplicates stored", str(rows - distinct))
        table.add_row(f"idle agent RSS (MB, after {idle_seconds:.0f} s)", f"{rss_mb:.1f}")
        table.add_row("idle agent CPU (%)", f"{cpu:.2f}")
        console.print(table)
        print(
            json.dumps(
                {
                    "drain_eps": round(drain_eps),
                    "lost": lost,
                    "idle_rss_mb": round(rss_mb, 1),
                    "idle_cpu_pct": round(cpu, 2),
                }
            )
        )
        if lost or rows != distinct:
            raise typer.Exit(1)
    finally:
        lab.stop_all()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


@bench_app.command(
    "usb", help=_("Time add event → decision written for COUNT simulated USB insertions, against a raw baseline.")
)
def bench_usb(
    count: Annotated[int, typer.Option(min=1, help=_("simulated insertions"))] = 1000,
    vs_usbguard: Annotated[
        bool, typer.Option("--vs-usbguard", help=_("also judge mocked plugs by the real usbguard-daemon, timed alike"))
    ] = False,
    usbguard_count: Annotated[
        int, typer.Option(min=3, max=1000, help=_("plugs into usbguard-daemon's umockdev testbed (--vs-usbguard)"))
    ] = 300,
) -> None:
    """Time add event → decision written for COUNT simulated USB insertions, against a raw baseline."""
    from sekisho.bench.usb import run_usb_bench

    if vs_usbguard:
        from sekisho.bench.usb_vs_usbguard import vs_usbguard_unavailable

        reason = vs_usbguard_unavailable()
        if reason is not None:
            console.print(f"[bold red]--vs-usbguard cannot run here:[/] {reason}", soft_wrap=True)
            raise typer.Exit(1)
    run_usb_bench(count, console, vs_usbguard=usbguard_count if vs_usbguard else 0)


@bench_app.command(
    "login",
    help=_(
        "Time card removal → lock command (real pcscd, vpcd), the whole PAM call and the decision without the human."
    ),
)
def bench_login(
    removals: Annotated[int, typer.Option(min=50, help=_("card removals through pcscd"))] = 50,
    logins: Annotated[int, typer.Option(min=20, help=_("whole PAM auth calls (and as many baseline ones)"))] = 30,
) -> None:
    """Time card removal → lock command (real pcscd, vpcd), the whole PAM call and the decision without the human."""
    from sekisho.bench.login import run_login_bench

    raise typer.Exit(run_login_bench(removals, console, logins=logins))


@bench_app.command(
    "doors",
    help=_("Time card → relay with the controller down, end to end over OSDP, set_relay, and during a reader flood."),
)
def bench_doors(
    taps: Annotated[int, typer.Option(min=1000, help=_("granted taps, controller down"))] = 1000,
    osdp_taps: Annotated[int, typer.Option(min=20, help=_("taps end to end through the OSDP and board stubs"))] = 200,
    relay_rounds: Annotated[int, typer.Option(min=20, help=_("set_relay round trips to the board stub"))] = 200,
    flood_taps: Annotated[int, typer.Option(min=20, help=_("valid taps while another reader floods"))] = 100,
) -> None:
    """Time card → relay with the controller down, end to end over OSDP, set_relay, and during a reader flood."""
    from sekisho.bench.doors import run_doors_bench

    run_doors_bench(taps, osdp_taps, console, relay_rounds=relay_rounds, flood_taps=flood_taps)


@bench_app.command(
    "fleet",
    help=_("Revoke a person → applied by every agent; broker restart → all reconnected, nothing lost; enrol N."),
)
def bench_fleet(
    agents: Annotated[int, typer.Option(min=2, max=5000, help=_("simulated agents (real runtime)"))] = 1000,
    rounds: Annotated[int, typer.Option(min=1, max=10, help=_("revocation rounds, each with its raw baseline"))] = 5,
    enrol: Annotated[int, typer.Option(min=0, max=1000, help=_("devices enrolled over HTTPS at the end"))] = 100,
    processes: Annotated[
        int | None,
        typer.Option(min=1, max=64, help=_("worker processes (default: one per 75 agents, at most 80 each)")),
    ] = None,
    events: Annotated[
        int, typer.Option(min=1, max=1000, help=_("events per agent before, and during, the outage"))
    ] = 5,
    outage_s: Annotated[float, typer.Option(min=0.5, max=120, help=_("how long the broker stays down"))] = 5.0,
    timeout_s: Annotated[float, typer.Option(min=10, max=3600, help=_("bound on every wait"))] = 300.0,
    workdir: Annotated[Path | None, typer.Option(help=_("keep state here instead of a temp dir"))] = None,
    heartbeat_s: Annotated[float, typer.Option(min=1, max=3600, help=_("the agents' heartbeat interval"))] = 30.0,
    full_agents: Annotated[
        bool, typer.Option("--full-agents", help=_("run the revocation on the full agent runtime, not on lean agents"))
    ] = False,
    lean_processes: Annotated[
        int | None,
        typer.Option(min=1, max=64, help=_("lean worker processes for the revocation (default: one per 250)")),
    ] = None,
    apply_threads: Annotated[
        int, typer.Option(min=0, max=64, help=_("threads per lean worker that offer bundles to the policy caches"))
    ] = 4,
) -> None:
    """Revoke a person → applied by every agent; broker restart → all reconnected, nothing lost; enrol N."""
    from sekisho.bench.fleet import FleetOptions, run_fleet_bench

    options = FleetOptions(
        agents=agents,
        rounds=rounds,
        enrol=enrol,
        processes=processes,
        events=events,
        outage_s=outage_s,
        timeout_s=timeout_s,
        workdir=workdir,
        heartbeat_s=heartbeat_s,
        full_agents=full_agents,
        lean_processes=lean_processes,
        apply_threads=apply_threads,
    )
    raise typer.Exit(run_fleet_bench(options, console))


@bench_app.command(
    "outage",
    help=_("Broker down for minutes while real agents buffer events; exact counts: lost, duplicated, chains verify."),
)
def bench_outage(
    agents: Annotated[int, typer.Option(min=1, max=200, help=_("agent processes (real runtime, durable outbox)"))] = 20,
    events: Annotated[
        int,
        typer.Option(min=1, max=10_000_000, help=_("events recorded by the agents in all while the broker is down")),
    ] = 100_000,
    down_s: Annotated[float, typer.Option(min=0, max=7200, help=_("how long the broker stays down"))] = 600.0,
    reconnect_max_s: Annotated[
        float, typer.Option(min=0.5, max=3600, help=_("the agents' longest wait between reconnect attempts"))
    ] = 30.0,
    timeout_s: Annotated[float, typer.Option(min=10, max=14_400, help=_("bound on every wait"))] = 1800.0,
    workdir: Annotated[Path | None, typer.Option(help=_("keep state here instead of a temp dir"))] = None,
) -> None:
    """Broker down for minutes while real agents buffer events; exact counts: lost, duplicated, chains verify."""
    from sekisho.bench.outage import OutageOptions, run_outage_bench

    options = OutageOptions(
        agents=agents,
        events=events,
        down_s=down_s,
        reconnect_max_s=reconnect_max_s,
        timeout_s=timeout_s,
        workdir=workdir,
    )
    raise typer.Exit(run_outage_bench(options, console))


@bench_app.command(
    "registers",
    help=_("Register/timeline queries, HTTP pages and CSV export memory over millions of projected events."),
)
def bench_registers(
    events: Annotated[
        int, typer.Option(min=1000, max=50_000_000, help=_("synthetic signed events loaded"))
    ] = 10_000_000,
    backend: Annotated[str, typer.Option(help=_("sqlite, postgres (a private cluster) or both"))] = "both",
    rounds: Annotated[int, typer.Option(min=3, max=1000, help=_("repetitions of each reading"))] = 50,
    csv_rows: Annotated[int, typer.Option(min=10, max=10_000_000, help=_("rows of the larger CSV export"))] = 100_000,
    deep_pages: Annotated[int, typer.Option(min=1, max=1000, help=_("pages read before the deep page"))] = 20,
    http: Annotated[bool, typer.Option(help=_("time full page responses over HTTP too"))] = True,
    workdir: Annotated[Path | None, typer.Option(help=_("keep state here instead of a temp dir"))] = None,
    keep: Annotated[
        bool,
        typer.Option(
            help=_("keep the loaded databases in --workdir; a later run with the same --events measures them again")
        ),
    ] = False,
) -> None:
    """Register/timeline queries, HTTP pages and CSV export memory over millions of projected events."""
    from sekisho.bench.registers import Options, run_registers_bench

    chosen = {"sqlite": ("sqlite",), "postgres": ("postgres",), "both": ("sqlite", "postgres")}.get(backend)
    if chosen is None:
        console.print(_("--backend: sqlite, postgres or both[/]"))
        raise typer.Exit(2)
    if keep and workdir is None:
        console.print(_("--keep needs --workdir (where the databases are kept)"))
        raise typer.Exit(2)
    options = Options(
        events=events,
        backends=chosen,
        rounds=rounds,
        csv_rows=csv_rows,
        deep_pages=deep_pages,
        http=http,
        workdir=workdir,
        keep=keep,
    )
    raise typer.Exit(run_registers_bench(options, console))


@bench_app.command(
    "alerts",
    help=_("Agent event → alert on the SSE stream and → e-mail accepted by SMTP, idle and under background load."),
)
def bench_alerts(
    probes: Annotated[int, typer.Option(min=5, max=10_000, help=_("forced-door probes per phase"))] = 200,
    background_eps: Annotated[
        int, typer.Option(min=0, max=20_000, help=_("background events per second during the loaded phase"))
    ] = 1000,
    publishers: Annotated[int, typer.Option(min=1, max=16, help=_("background agent processes"))] = 2,
    ingest_workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=8,
            help=_(
                "controller processes taking events (1: controller serve alone; more: controller ingest workers "
                "on the shared subscription)"
            ),
        ),
    ] = 1,
    probe_gap_s: Annotated[float, typer.Option(min=0.01, max=10, help=_("seconds between probes"))] = 0.25,
    workdir: Annotated[Path | None, typer.Option(help=_("keep state here instead of a temp dir"))] = None,
) -> None:
    """Agent event → alert on the SSE stream and → e-mail accepted by SMTP, idle and under background load."""
    from sekisho.bench.alerts import Options, run_alerts_bench

    options = Options(
        probes=probes,
        background_eps=background_eps,
        publishers=publishers,
        ingest_workers=ingest_workers,
        probe_gap_s=probe_gap_s,
        workdir=workdir,
    )
    raise typer.Exit(run_alerts_bench(options, console))


@bench_app.command(
    "scale",
    help=_(
        "Agents behind site brokers bridged to a central broker vs. the same agents direct: events/s, per-hop "
        "latency, lost and duplicated events."
    ),
)
def bench_scale(
    sites: Annotated[int, typer.Option(min=1, max=20, help=_("site brokers bridged to the central broker"))] = 3,
    agents_per_site: Annotated[int, typer.Option(min=1, max=200, help=_("agents behind each site broker"))] = 10,
    events: Annotated[int, typer.Option(min=1, help=_("events per agent in each phase"))] = 100,
    rate: Annotated[
        float, typer.Option(min=0, help=_("events per second per agent (0: as fast as the agents go)"))
    ] = 20.0,
    partition_s: Annotated[
        float,
        typer.Option(min=0, help=_("cut every site's link to the centre this many seconds during the bridged phase")),
    ] = 0.0,
    resend_after_s: Annotated[
        float, typer.Option(min=1, help=_("the agents' resend_after_s (publish again what is not acknowledged)"))
    ] = 30.0,
    database_url: Annotated[str | None, typer.Option(help=_("store URL (default: SQLite in the work dir)"))] = None,
    workdir: Annotated[Path | None, typer.Option(help=_("keep state here instead of a temp dir"))] = None,
) -> None:
    """Agents behind site brokers bridged to a central broker vs. the same agents direct."""
    from sekisho.bench.scale import Options, run_scale_bench

    options = Options(
        sites=sites,
        agents_per_site=agents_per_site,
        events=events,
        rate=rate,
        partition_s=partition_s,
        resend_after_s=resend_after_s,
        database_url=database_url,
        workdir=workdir,
        # The agents wait for their acks at most this long after the partition.
        timeout_s=600.0 + partition_s,
    )
    raise typer.Exit(run_scale_bench(options, console))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(bench_app())
