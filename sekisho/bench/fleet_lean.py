"""Lean simulated agents for part (a) of ``sekisho bench fleet``: an MQTT client and a policy cache each.

What issue 11 asks of a simulated agent for the revocation figure, and no more: a real MQTT v5 client over
mutual TLS with the agent's own certificate (CN = agent id, confined by the broker's ACL plugin to its
topics), subscribed to its policy topic at QoS 1, handing every bundle to the real ``PolicyCache`` (verify
the controller's signature and the addressee, refuse rollback, persist atomically with fsync). No outbox,
sender, heartbeats or commands: those are the full runtime's (``fleet_agents``), which part (b) uses.

The full runtime costs ~4 threads per agent, and a thousand agents' threads on two vCPUs measure the
simulation's GIL and scheduler contention, not the fleet. Here one worker process drives all its agents'
paho clients from one event loop (``selectors``: epoll on Linux, so no 1024-descriptor limit as with paho's
own ``select()`` loop) through paho's external-loop API (``loop_read``/``loop_write``/``loop_misc`` and the
socket callbacks). The same loop answers the bench's requests on its pipe. Bundles are offered to the
policy cache by a few apply threads (``apply_threads``, a fixed number whatever the agent count; agent i
always on thread i mod n, so each agent's bundles are offered in arrival order): verification is CPU, but
persisting waits ~10 ms on two fsyncs, which a real agent does on its own disk while the others do theirs;
one thread would queue every agent of the process behind the others' fsyncs. ``apply_threads=0`` offers
in the loop itself.

Timing points are those of the full agents: arrival in the client's message callback (before
verification), applied when the cache's listener hears "applied" (after the persist). Baseline messages
(``RAW_MARK``) are set aside in the callback, before any verification.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sekisho.agents.runtime.backoff import ReconnectBackoff
from sekisho.agents.runtime.config import AgentConfig, load_config
from sekisho.agents.runtime.link import KEEPALIVE_S, tls_context
from sekisho.agents.runtime.policy_cache import PolicyCache, PolicyChange
from sekisho.bench.fleet_agents import RAW_MARK, WORKER_IDLE_LIMIT_S, WORKER_NICE, raise_nofile_limit
from sekisho.protocol import signing, topics

log = logging.getLogger(__name__)

# Agents per lean worker process when the bench is not told (epoll has no descriptor limit; each agent
# holds one socket). A few processes spread the verification over both cores and the other processes.
LEAN_AGENTS_PER_PROCESS = 250
DEFAULT_APPLY_THREADS = 4
# How often the loop runs paho's keep-alive bookkeeping and due reconnects when nothing else wakes it.
_MISC_INTERVAL_S = 0.5
# Reads of decrypted bytes TLS already holds (the socket is then not readable again) before yielding.
_MAX_PENDING_READS = 1000


@dataclass(frozen=True)
class LeanSpec:
    """The agents one lean worker process runs, where it logs, and how many apply threads it uses."""

    configs: list[str]
    log_path: str
    apply_threads: int = DEFAULT_APPLY_THREADS


class LeanAgent:
    """One simulated agent: its own paho client (mutual TLS, its certificate) and the real policy cache."""

    def __init__(self, index: int, config: AgentConfig, fleet: LeanFleet) -> None:
        self.index = index
        self.config = config
        self.fleet = fleet
        self.agent_id = config.agent_id
        self.policy_topic = topics.topic(config.agent_id, topics.POLICY)
        # As the agent does at start: its state directory is its own (0700), made if missing.
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        controller_key = signing.load_public_key(config.controller_public_key)
        self.policy = PolicyCache(config.state_dir, controller_key, self.agent_id)
        self.backoff = ReconnectBackoff(config.reconnect_min_s, config.reconnect_max_s)
        self.connected = False
        self.reconnect_at: float | None = None
        # Written by the loop and the apply threads, read by the loop: plain assignments, atomic in CPython.
        self.arrival_ns = 0
        self.applied_ns: dict[int, int] = {}
        self.apply_cost_ns: dict[int, int] = {}
        self.raw_ns: dict[str, int] = {}
        self.connected_ns: int | None = None
        self.rejected: list[tuple[str | None, int | None]] = []

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.agent_id, protocol=mqtt.MQTTv5)
        client.tls_set_context(tls_context(config))
        # The broker checks that the username is the certificate's name (its CN, the agent id) at CONNECT.
        client.username_pw_set(self.agent_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        # A clean session that ends with the connection: the full agents, which use the same identities
        # after (a), start from their own persistent sessions, not from this one.
        client.connect_async(config.broker_host, config.broker_port, keepalive=KEEPALIVE_S, clean_start=True)
        self.client = client
        self.policy.subscribe(self._on_change)

    # --- connecting (loop thread) -----------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection (TCP and TLS handshake, blocking) and queue CONNECT; on failure, retry later."""
        self.reconnect_at = None
        try:
            self.client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as err:
            log.debug("%s: connect failed: %s", self.agent_id, err)
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if not self.fleet.stopping:
            # The agents' own jittered back-off, as shipped.
            self.reconnect_at = time.monotonic() + self.backoff.next_delay()

    # --- paho callbacks (loop thread) ----------------------------------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            # Nagle's algorithm would hold small packets (PUBACK, SUBSCRIBE) back ~40 ms, as in the link.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fleet.selector.register(sock, selectors.EVENT_READ, self)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.fleet.selector.unregister(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.fleet.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.fleet.selector.modify(sock, selectors.EVENT_READ, self)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("%s: connection refused (%s)", self.agent_id, reason)
            return  # paho closes the socket; _on_disconnect schedules the retry
        client.subscribe(self.policy_topic, qos=1)
        self.backoff.reset()
        self.connected = True
        self.connected_ns = time.monotonic_ns()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected = False
        if not self.fleet.stopping:
            log.warning("%s: connection lost (%s)", self.agent_id, reason)
            self._schedule_reconnect()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic_ns()
        if msg.topic != self.policy_topic:
            return
        payload = bytes(msg.payload)
        if payload.startswith(RAW_MARK):
            tag = payload[len(RAW_MARK) : len(RAW_MARK) + 16].split(b"/", 1)[0].decode()
            self.raw_ns.setdefault(tag, now)
            return  # the baseline: never offered to the policy cache
        if not payload:
            return  # an empty retained message clears the topic; it is not a bundle (as the agent does)
        self.arrival_ns = now
        self.fleet.offer(self, payload)

    # --- the policy cache (an apply thread, or the loop) ------------------------------------------------------

    def offer(self, payload: bytes) -> None:
        """Hand a bundle to the policy cache, as the agent's control thread does; note a refusal."""
        outcome = self.policy.offer(payload)
        if outcome.status == "rejected":
            log.warning("%s: policy bundle refused: %s", self.agent_id, outcome.reason)
            self.rejected.append((outcome.reason, outcome.version))

    def _on_change(self, change: PolicyChange) -> None:
        if change.kind != "applied":
            return
        now = time.monotonic_ns()
        version = change.bundle.bundle.version
        self.applied_ns.setdefault(version, now)
        if self.arrival_ns:
            self.apply_cost_ns.setdefault(version, now - self.arrival_ns)


class LeanFleet:
    """Every lean agent of one worker process, driven by one selector loop on the calling thread."""

    def __init__(self, configs: Sequence[Path], apply_threads: int = DEFAULT_APPLY_THREADS) -> None:
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.agents = [LeanAgent(i, load_config(path), self) for i, path in enumerate(configs)]
        self._queues: list[queue.SimpleQueue[tuple[LeanAgent, bytes] | None]] = []
        self._threads: list[threading.Thread] = []
        for n in range(apply_threads):
            q: queue.SimpleQueue[tuple[LeanAgent, bytes] | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._apply_loop, args=(q,), name=f"lean-apply-{n + 1}", daemon=True)
            thread.start()
            self._queues.append(q)
            self._threads.append(thread)

    def offer(self, agent: LeanAgent, payload: bytes) -> None:
        """Offer a bundle to an agent's policy cache, on its apply thread (or here when there are none)."""
        if not self._queues:
            agent.offer(payload)
            return
        self._queues[agent.index % len(self._queues)].put((agent, payload))

    @staticmethod
    def _apply_loop(q: queue.SimpleQueue[tuple[LeanAgent, bytes] | None]) -> None:
        while (item := q.get()) is not None:
            agent, payload = item
            try:
                agent.offer(payload)
            except Exception:  # a failing disk for one agent must not stop the others' applies
                log.exception("%s: offering a bundle failed", agent.agent_id)

    def start(self) -> None:
        """Open every agent's connection (the CONNECT packets go out from the loop)."""
        for agent in self.agents:
            agent.connect()

    # --- the loop ------------------------------------------------------------------------------------------

    def _service(self, agent: LeanAgent, mask: int) -> None:
        client = agent.client
        sock = client.socket()
        if mask & selectors.EVENT_READ and sock is not None:
            client.loop_read()
            # TLS may have decrypted more than one MQTT packet: the socket will not be readable for those.
            for _ in range(_MAX_PENDING_READS):
                sock = client.socket()
                if not isinstance(sock, ssl.SSLSocket) or sock.pending() <= 0:
                    break
                client.loop_read()
        if mask & selectors.EVENT_WRITE and client.socket() is not None:
            client.loop_write()

    def _misc(self) -> None:
        now = time.monotonic()
        for agent in self.agents:
            if agent.client.socket() is not None:
                agent.client.loop_misc()
            elif agent.reconnect_at is not None and now >= agent.reconnect_at:
                agent.connect()

    def run(self, conn: Connection) -> None:
        """Serve the agents' sockets and the bench's requests on conn until told to stop."""
        self.selector.register(conn, selectors.EVENT_READ, None)
        last_request = time.monotonic()
        next_misc = 0.0
        while not self.stopping:
            for key, mask in self.selector.select(timeout=_MISC_INTERVAL_S):
                if key.data is None:
                    last_request = time.monotonic()
                    self._request(conn)
                else:
                    self._service(key.data, mask)
            now = time.monotonic()
            if now >= next_misc:
                self._misc()
                next_misc = now + _MISC_INTERVAL_S
            if now - last_request > WORKER_IDLE_LIMIT_S:
                log.warning("no request from the bench for %.0f s: stopping", WORKER_IDLE_LIMIT_S)
                self.stopping = True

    def _request(self, conn: Connection) -> None:
        try:
            command, *args = conn.recv()
        except EOFError:
            self.stopping = True  # the bench went away
            return
        if command == "stop":
            self.stopping = True
            return
        try:
            answer: tuple[str, Any] = ("ok", self.handle(command, args))
        except Exception as err:  # report, keep serving: the bench decides whether to go on
            log.exception("request %s failed", command)
            answer = ("error", f"{type(err).__name__}: {err}")
        conn.send(answer)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect every client cleanly (DISCONNECT sent from the loop), then end the apply threads."""
        self.stopping = True
        for agent in self.agents:
            if agent.client.socket() is not None:
                agent.client.disconnect()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(a.client.socket() is not None for a in self.agents):
            for key, mask in self.selector.select(timeout=0.1):
                if key.data is not None:
                    self._service(key.data, mask)
        for agent in self.agents:
            sock = agent.client.socket()
            if sock is not None:
                # Did not get its DISCONNECT out in time: close the socket (the broker sees a lost connection).
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(sock)
                with contextlib.suppress(OSError):
                    sock.close()
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self.selector.close()

    # --- the bench's requests ----------------------------------------------------------------------------------

    def handle(self, command: str, args: Sequence[Any]) -> Any:
        """Answer one request of the bench (the same requests as the full agents' worker, where they apply)."""
        if command == "status":
            versions: dict[int, int] = {}
            for agent in self.agents:
                v = agent.policy.version or 0
                versions[v] = versions.get(v, 0) + 1
            return {"connected": sum(a.connected for a in self.agents), "versions": versions}
        if command == "applied":
            version = int(args[0])
            return [(a.applied_ns.get(version), a.apply_cost_ns.get(version)) for a in self.agents]
        if command == "raw":
            return [a.raw_ns.get(str(args[0])) for a in self.agents]
        if command == "rejected":
            return {a.agent_id: list(a.rejected) for a in self.agents}
        if command == "threads":
            return threading.active_count()
        raise ValueError(f"unknown command {command!r}")


def lean_worker_main(conn: Connection, spec: LeanSpec) -> None:
    """Run the lean agents of one worker process and answer the bench's requests until told to stop."""
    raise_nofile_limit()
    os.nice(WORKER_NICE)
    logging.basicConfig(
        filename=spec.log_path, level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    fleet: LeanFleet | None = None
    try:
        fleet = LeanFleet([Path(p) for p in spec.configs], spec.apply_threads)
        fleet.start()
        conn.send(("ok", len(fleet.agents)))
        fleet.run(conn)
    except Exception as err:
        log.exception("lean worker failed")
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        if fleet is not None:
            fleet.stop()
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stopped", None))
        conn.close()
