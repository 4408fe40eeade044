"""The raw MQTT baseline: plain paho QoS 1 publish → subscribe through the same broker and TLS set-up.

Publishers and the subscriber run in their own processes (spawned, so no paho thread is forked),
exactly as many as the durable run uses, with the same payload bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sekisho.protocol import topics


@dataclass(frozen=True)
class TlsFiles:
    """Client certificate material for one connection."""

    ca: str
    cert: str
    key: str


def _client(client_id: str, tls: TlsFiles) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    # The agents' listener checks that the username is the certificate's name (the agents' ids are theirs).
    client.username_pw_set(client_id)
    client.max_inflight_messages_set(1000)

    def nodelay(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = nodelay
    return client


def _connect(client: mqtt.Client, port: int) -> None:
    ready = threading.Event()
    refused: list[str] = []

    def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        if rc.is_failure:
            refused.append(str(rc))
        ready.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, clean_start=True)
    client.loop_start()
    if not ready.wait(10):
        raise ConnectionError("baseline client could not connect")
    if refused:
        client.loop_stop()
        raise ConnectionError(f"the broker refused the baseline client: {refused[0]}")


def publisher(port: int, tls: TlsFiles, topic: str, payload: bytes, count: int, go: Any) -> None:
    """Publish `count` copies of `payload` with QoS 1 as fast as paho allows, then wait for all PUBACKs."""
    # The agents' listener admits a certificate only under its own name (username = client id = CN).
    client = _client(topics.parse(topic)[0], tls)
    _connect(client, port)
    go.wait(30)
    infos = [client.publish(topic, payload, qos=1) for _ in range(count)]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def subscriber(
    index: int,
    port: int,
    tls: TlsFiles,
    topic_filter: str,
    total: Any,
    expected: int,
    ready: Any,
    out: Any,
    timeout: float,
) -> None:
    """Count QoS 1 messages until all subscribers together saw `expected`; report (count, first, last)."""
    state = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        with total.get_lock():
            total.value += 1
            finished = total.value >= expected
        if finished:
            done.set()

    def watch_total() -> None:
        # Another subscriber may receive the last message: stop when the shared count is complete.
        while not done.wait(0.05):
            if total.value >= expected:
                done.set()

    threading.Thread(target=watch_total, daemon=True).start()

    client = _client(f"bench-sub-{index}", tls)
    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
    _connect(client, port)
    client.subscribe(topic_filter, qos=1)
    subscribed.wait(10)
    ready.set()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    out.put((state["n"], state["first"], state["last"]))


@dataclass(frozen=True)
class RawResult:
    """What the baseline measured."""

    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        """Messages per second, first to last arrival."""
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def run_baseline(
    port: int,
    subscriber_tls: TlsFiles,
    publishers: list[tuple[str, TlsFiles]],
    payload: bytes,
    per_publisher: int,
    topic_filter: str,
    *,
    subscriber_port: int | None = None,
    subscribers: int = 1,
    timeout: float = 300,
) -> RawResult:
    """Run the baseline: `subscribers` processes on one shared subscription, one process per publisher.

    Publishers connect to `port`, subscribers to `subscriber_port` (default `port`): on a sekisho broker the
    agents' and the controllers' listeners are two ports.
    """
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    out: Any = ctx.Queue()
    total = ctx.Value("q", 0)
    expected = per_publisher * len(publishers)
    subs = []
    for index in range(subscribers):
        ready = ctx.Event()
        sub = ctx.Process(
            target=subscriber,
            args=(index, subscriber_port or port, subscriber_tls, topic_filter, total, expected, ready, out, timeout),
        )
        sub.start()
        subs.append(sub)
        if not ready.wait(30):
            for started in subs:
                started.terminate()
            raise RuntimeError("baseline subscriber did not start")
    pubs = [
        ctx.Process(target=publisher, args=(port, tls, topic, payload, per_publisher, go)) for topic, tls in publishers
    ]
    for p in pubs:
        p.start()
    time.sleep(1.0)  # let every publisher finish its TLS handshake so the clock measures traffic only
    go.set()
    try:
        reports = [out.get(timeout=timeout + 30) for _ in subs]
    except queue.Empty as err:
        raise RuntimeError("baseline subscriber did not report") from err
    finally:
        for p in [*pubs, *subs]:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    seen = [r for r in reports if r[0]]
    count = sum(r[0] for r in reports)
    if count < expected:
        # A rate over part of the messages would compare the durable path against a baseline that broke.
        raise RuntimeError(f"baseline delivered {count} of {expected} messages (see the publishers' errors above)")
    return RawResult(count, max(r[2] for r in seen) - min(r[1] for r in seen)) if seen else RawResult(0, 0.0)


def tls_for_dir(directory: Path) -> TlsFiles:
    """TLS files of an agent directory made by `sekisho pki issue-agent`."""
    return TlsFiles(str(directory / "ca.crt"), str(directory / "tls.crt"), str(directory / "tls.key"))
