"""`sekisho bench alerts`: event published by an agent → alert on the SSE stream, and → e-mail accepted by SMTP.

One lab site: mosquitto with mTLS, one controller process (its HTTP API, the alert engine and the delivery
job), a local SMTP server (aiosmtpd) in this process, and a policy whose one escalation step mails a
contact at once. A probe is a door agent's signed ``door.alarm`` (forced_open) for a door of its own, published
over the broker with the door agent's certificate; it opens a new alert. This process reads the API's alert
stream (``/api/v1/alerts/stream``, a security user's token) and the SMTP server's arrivals, and times both from
the moment of publishing, on the host's wall clock (the store's own times split each probe's way:
stored by ingest, alert opened by the rules, seen on the stream).

Baseline, same run: the probes on an idle site. Then again while background agents publish
``--background-eps`` signed events per second (``test.synthetic``, signed before the start by publisher
processes holding the agents' certificates and keys, so the load is the controller's and not the load
generator's), which ingest verifies and stores and the engine reads past. The background rate reported is
what the store actually took during the probes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing as mp
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from sekisho.deploy.broker import find_free_port
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab
from sekisho.protocol import signing, topics
from sekisho.protocol.events import build_event

SSE_GOAL_MS = 1000.0
EMAIL_GOAL_MS = 5000.0
SECURITY_LOGIN = "bench.keibi"
PROBE_AGENT = "door-bench"

SITE_YAML = """
site: {name: ベンチ事業所}
alerts:
  contacts:
    - {id: guard, name: 警備室, email: guard@example.invalid}
  escalations:
    - id: now
      steps: [{after_minutes: 0, notify: [guard]}]
      repeat: 0
  default_escalation: now
"""


@dataclass(frozen=True)
class Options:
    """Probes per phase, the background rate and publishers, the gap between probes."""

    probes: int = 200
    background_eps: int = 1000
    publishers: int = 2
    ingest_workers: int = 1  # controller processes taking events: serve, then `controller ingest` workers
    probe_gap_s: float = 0.25
    wait_s: float = 30.0
    workdir: Path | None = None


@dataclass
class Arrivals:
    """What arrived, by probe door: SSE receipt time and SMTP acceptance time (this process's clock)."""

    sse: dict[str, float] = field(default_factory=dict)
    email: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Mailbox:
    """The aiosmtpd handler: note when each alert e-mail was accepted, keyed by the probe door in its subject."""

    def __init__(self, arrivals: Arrivals) -> None:
        self.arrivals = arrivals

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Record the acceptance time of one message, then accept it."""
        at = time.time()
        message = message_from_bytes(envelope.content, policy=default_policy)
        subject = str(message.get("Subject", ""))
        with self.arrivals.lock:
            for door in _doors_in(subject):
                self.arrivals.email.setdefault(door, at)
        return "250 OK"


def _doors_in(text: str) -> list[str]:
    return [word.strip(":()[],") for word in text.split() if word.strip(":()[],").startswith("probe-")]


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stream(base: str, token: str, arrivals: Arrivals, stop: threading.Event) -> None:
    """Read the alert stream; note the first time each probe door's alert is seen.

    A stream that ends (its lifetime, or a read timeout) is reopened with the last event id seen, as a
    browser's EventSource does, so nothing that changed in between is lost.
    """
    host = base.removeprefix("http://")
    last_id: str | None = None
    while not stop.is_set():
        conn = http.client.HTTPConnection(host, timeout=40)  # the stream sends a heartbeat every 15 s
        headers = {"Authorization": f"Bearer {token}"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            conn.request("GET", "/api/v1/alerts/stream", headers=headers)
            answer = conn.getresponse()
            if answer.status != 200:
                raise RuntimeError(f"alert stream answered {answer.status}")
            while not stop.is_set():
                line = answer.readline()
                if not line:
                    break
                if line.startswith(b"id:"):
                    last_id = line[3:].strip().decode() or last_id
                    continue
                if not line.startswith(b"data:"):
                    continue
                at = time.time()
                try:
                    alert = json.loads(line[5:])
                except ValueError:
                    continue
                door = str(dict(alert.get("labels") or {}).get("door", ""))
                if alert.get("rule") == "door_forced" and door.startswith("probe-"):
                    with arrivals.lock:
                        arrivals.sse.setdefault(door, at)
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
        finally:
            conn.close()


class Prober:
    """The door agent: signs door.alarm events and publishes them over the broker with its own certificate."""

    def __init__(self, lab: Lab) -> None:
        creds = AgentCredentials.at(lab.pki_dir, PROBE_AGENT)
        self.key = signing.load_private_key(creds.signing_key)
        self.seq = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=PROBE_AGENT, protocol=mqtt.MQTTv5)
        self.client.tls_set(
            ca_certs=str(creds.ca_cert),
            certfile=str(creds.tls_cert),
            keyfile=str(creds.tls_key),
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        self.client.username_pw_set(PROBE_AGENT)
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: ready.set()
        self.client.connect("127.0.0.1", lab.broker.port, clean_start=True)
        self.client.loop_start()
        if not ready.wait(15):
            raise ConnectionError("the probe agent could not connect to the broker")
        self.topic = topics.topic(PROBE_AGENT, topics.EVENTS)

    def probe(self, door: str) -> float:
        """Publish one forced-door alarm for ``door`` (QoS 1); return the time just before publishing."""
        self.seq += 1
        raw = build_event(
            self.key, agent=PROBE_AGENT, seq=self.seq, type="door.alarm", payload={"door": door, "alarm": "forced_open"}
        )
        at = time.time()
        self.client.publish(self.topic, raw, qos=1)
        return at

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def site_yaml(doors: int) -> str:
    """The bench policy: the alerts section and one door per probe, driven by the probe agent (ingest accepts a
    door's alarm only from the agent that drives it)."""
    rows = "".join(
        f"  - {{id: probe-{i:05d}, name: プローブ扉 {i}, kind: room, agent: {PROBE_AGENT}}}\n" for i in range(doors)
    )
    return SITE_YAML + "doors:\n" + rows


def background_publisher(port: int, pki_dir: str, agent: str, rate: float, seconds: float, go: Any) -> None:
    """Publish ``rate`` signed test.synthetic events a second for ``seconds`` as ``agent`` (own process).

    The events are signed before the start signal, so the load costs this process a publish each, not a
    signature: what the controller receives is what an agent sends, at a steady rate.
    """
    creds = AgentCredentials.at(Path(pki_dir), agent)
    key = signing.load_private_key(creds.signing_key)
    count = int(rate * seconds)
    payloads = [
        build_event(key, agent=agent, seq=n, type="test.synthetic", payload={"n": n}) for n in range(1, count + 1)
    ]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=agent, protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(creds.ca_cert),
        certfile=str(creds.tls_cert),
        keyfile=str(creds.tls_key),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    client.username_pw_set(agent)
    client.max_inflight_messages_set(1000)
    ready = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: ready.set()
    client.connect("127.0.0.1", port, clean_start=True)
    client.loop_start()
    if not ready.wait(15):
        raise ConnectionError(f"{agent} could not connect")
    topic = topics.topic(agent, topics.EVENTS)
    go.wait(120)
    start = time.monotonic()
    for index, raw in enumerate(payloads):
        # Paced against the start, so a slow moment is caught up rather than lowering the rate.
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.publish(topic, raw, qos=1)
    client.loop_stop()
    client.disconnect()


def _prepare_store(lab: Lab, doors: int) -> str:
    """Apply the bench policy and make a security user with an API token; return the token."""
    from sekisho.controller.accounts.roles import Role
    from sekisho.controller.accounts.service import AccountService, AccountSettings
    from sekisho.controller.config import load_config
    from sekisho.controller.policy.loader import parse_policy
    from sekisho.controller.policy.service import PolicyService
    from sekisho.controller.store import Store, make_engine, upgrade

    config = load_config(lab.controller_config)
    engine = make_engine(config.resolved_database_url())
    try:
        upgrade(engine)
        key = signing.load_private_key(config.signing_key)
        store = Store(engine, signing_key=key)
        PolicyService(store, key).apply(
            parse_policy(site_yaml(doors)), source_sha256="0" * 64, created_by="bench alerts"
        )
        accounts = AccountService(store, AccountSettings())
        accounts.create_user(
            login=SECURITY_LOGIN,
            display_name="試験 警備",
            kana="しけん けいび",
            role=Role("security"),
            password="bench-alerts-" + signing.generate_key().private_bytes_raw().hex()[:16],
            created_by="bench",
        )
        return accounts.create_token(SECURITY_LOGIN, "bench", None, by="bench").token
    finally:
        engine.dispose()


def _stored_synthetic(lab: Lab) -> int:
    from sqlalchemy import func, select

    from sekisho.controller.config import load_config
    from sekisho.controller.store import make_engine
    from sekisho.controller.store.models import Event

    engine = make_engine(load_config(lab.controller_config).resolved_database_url())
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(Event.type == "test.synthetic")).scalar_one())
    finally:
        engine.dispose()


@contextlib.contextmanager
def _smtp(arrivals: Arrivals) -> Iterator[int]:
    try:
        from aiosmtpd.controller import Controller as SmtpController
    except ImportError as err:  # a controller host without the dev set
        raise RuntimeError("bench alerts needs aiosmtpd (the dev set: ./dev.sh installs it)") from err
    port = find_free_port()
    server = SmtpController(_Mailbox(arrivals), hostname="127.0.0.1", port=port)
    server.start()
    try:
        yield port
    finally:
        server.stop()


@dataclass
class Phase:
    """One phase's figures."""

    name: str
    sse_ms: list[float]
    email_ms: list[float]
    missing_sse: int
    missing_email: int
    background_eps: float
    # Where the time went, per probe: published → stored by ingest → alert opened by the engine → on the stream.
    stages: dict[str, list[float]] = field(default_factory=dict)


def _phase(name: str, prober: Prober, arrivals: Arrivals, opts: Options, first: int, lab: Lab) -> Phase:
    sent: dict[str, float] = {}
    stored_before = _stored_synthetic(lab)
    started = time.time()
    for index in range(first, first + opts.probes):
        door = f"probe-{index:05d}"
        sent[door] = prober.probe(door)
        time.sleep(opts.probe_gap_s)
    took = time.time() - started
    stored_after = _stored_synthetic(lab)
    deadline = time.monotonic() + opts.wait_s
    while time.monotonic() < deadline:
        with arrivals.lock:
            if all(d in arrivals.sse and d in arrivals.email for d in sent):
                break
        time.sleep(0.1)
    with arrivals.lock:
        sse = [(arrivals.sse[d] - t) * 1000 for d, t in sent.items() if d in arrivals.sse]
        email = [(arrivals.email[d] - t) * 1000 for d, t in sent.items() if d in arrivals.email]
    with arrivals.lock:
        seen = {d: arrivals.sse[d] for d in sent if d in arrivals.sse}
    return Phase(
        name,
        sse,
        email,
        len(sent) - len(sse),
        len(sent) - len(email),
        (stored_after - stored_before) / took if took > 0 else 0.0,
        _stages(lab, sent, seen),
    )


def _stages(lab: Lab, sent: dict[str, float], seen: dict[str, float]) -> dict[str, list[float]]:
    """Split each probe's way by the store's own times: ingest, the rules, the stream (ms, wall clock)."""
    from sqlalchemy import select

    from sekisho.controller.config import load_config
    from sekisho.controller.store import make_engine
    from sekisho.controller.store.models import Alert, Event

    engine = make_engine(load_config(lab.controller_config).resolved_database_url())
    stages: dict[str, list[float]] = {"ingest": [], "rules": [], "stream": []}
    try:
        with engine.connect() as conn:
            stored = {
                str(row.payload.get("door")): row.stored_at.timestamp()
                for row in conn.execute(
                    select(Event.payload, Event.stored_at).where(
                        Event.agent_id == PROBE_AGENT, Event.type == "door.alarm"
                    )
                )
            }
            opened = {
                str(row.labels.get("door")): row.opened_at.timestamp()
                for row in conn.execute(select(Alert.labels, Alert.opened_at).where(Alert.rule == "door_forced"))
            }
    finally:
        engine.dispose()
    for door, at in sent.items():
        if door in stored and door in opened and door in seen:
            stages["ingest"].append((stored[door] - at) * 1000)
            stages["rules"].append((opened[door] - stored[door]) * 1000)
            stages["stream"].append((seen[door] - opened[door]) * 1000)
    return stages


def run_alerts_bench(opts: Options, console: Console) -> int:
    """Run the baseline and the loaded phase; print a table and the JSON line; return the exit code."""
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="sekisho-bench-alerts-"))
    root.mkdir(parents=True, exist_ok=True)
    lab = Lab(root)
    arrivals = Arrivals()
    stop = threading.Event()
    background: list[mp.process.BaseProcess] = []
    names = [f"bg-{i + 1}" for i in range(opts.publishers)]
    try:
        with _smtp(arrivals) as smtp_port:
            lab.start_broker()
            lab.write_controller_config(
                batch_max=1000,
                batch_wait_ms=10,
                alerts={
                    "every_s": 0.1,
                    "condition_every_s": 60,
                    "delivery_every_s": 0.1,
                    "smtp": {"host": "127.0.0.1", "port": smtp_port, "sender": "Sekisho <alerts@example.invalid>"},
                },
            )
            for name in [*names, PROBE_AGENT]:
                lab.add_agent(name, heartbeat_interval_s=60)
            lab.register_agents(*names, PROBE_AGENT)
            token = _prepare_store(lab, 2 * opts.probes)
            controller = lab.spawn_controller(http=True)
            from sekisho.bench.cli import _wait_ready

            _wait_ready(lab, controller)
            # Extra ingest-only workers share the event subscription with serve's own (the scale path's shape).
            for n in range(2, opts.ingest_workers + 1):
                lab.spawn_controller(http=False, worker_id=f"controller-{n}")
            reader = threading.Thread(
                target=_stream, args=(f"http://127.0.0.1:{lab.http_port}", token, arrivals, stop), daemon=True
            )
            reader.start()
            time.sleep(1.0)  # the stream is open before the first probe
            prober = Prober(lab)
            try:
                with console.status("baseline: probes on an idle site"):
                    idle = _phase("idle", prober, arrivals, opts, 0, lab)
                per_agent = opts.background_eps / opts.publishers
                duration = opts.probes * opts.probe_gap_s + opts.wait_s + 15
                context = mp.get_context("spawn")  # no paho thread forked
                go = context.Event()
                for name in names:
                    proc = context.Process(
                        target=background_publisher,
                        args=(lab.broker.port, str(lab.pki_dir), name, per_agent, duration, go),
                        daemon=True,
                    )
                    proc.start()
                    background.append(proc)
                go.set()
                time.sleep(5.0)  # the background reaches its rate before the probes
                with console.status(f"loaded: probes during {opts.background_eps} events/s"):
                    loaded = _phase("loaded", prober, arrivals, opts, opts.probes, lab)
            finally:
                prober.close()
                stop.set()
                for publisher in background:
                    publisher.terminate()
                    publisher.join(10)
    finally:
        lab.stop_all()
        if opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    table = Table(
        "phase",
        "background (events/s)",
        "SSE p50 / p99",
        "e-mail p50 / p99",
        "ingest / rules / stream p50",
        "missing SSE / e-mail",
    )
    for phase in (idle, loaded):
        stages = " / ".join(f"{_p(phase.stages.get(k, []), 0.5):.0f}" for k in ("ingest", "rules", "stream"))
        table.add_row(
            phase.name,
            f"{phase.background_eps:,.0f}",
            f"{_p(phase.sse_ms, 0.5):.0f} / {_p(phase.sse_ms, 0.99):.0f} ms",
            f"{_p(phase.email_ms, 0.5):.0f} / {_p(phase.email_ms, 0.99):.0f} ms",
            f"{stages} ms",
            f"{phase.missing_sse} / {phase.missing_email}",
        )
    console.print(table)
    missing = {"sse": loaded.missing_sse + idle.missing_sse, "email": loaded.missing_email + idle.missing_email}
    summary: dict[str, Any] = {
        "background_eps": round(loaded.background_eps),
        "sse_p50_ms": round(_p(loaded.sse_ms, 0.5), 1),
        "sse_p99_ms": round(_p(loaded.sse_ms, 0.99), 1),
        "email_p50_ms": round(_p(loaded.email_ms, 0.5), 1),
        "email_p99_ms": round(_p(loaded.email_ms, 0.99), 1),
        "baseline": {
            "sse_p50_ms": round(_p(idle.sse_ms, 0.5), 1),
            "sse_p99_ms": round(_p(idle.sse_ms, 0.99), 1),
            "email_p99_ms": round(_p(idle.email_ms, 0.99), 1),
        },
        "stages_p50_ms": {k: round(_p(v, 0.5), 1) for k, v in loaded.stages.items()},
        "stages_p99_ms": {k: round(_p(v, 0.99), 1) for k, v in loaded.stages.items()},
        "probes": opts.probes,
        "ingest_workers": opts.ingest_workers,
        "missing": missing,
        "goals": {"sse_p99_ms": SSE_GOAL_MS, "email_p99_ms": EMAIL_GOAL_MS},
    }
    print(json.dumps(summary, ensure_ascii=False))
    return 1 if missing["sse"] or missing["email"] else 0
