"""The agent's MQTT connection: MQTT v5 over mutual TLS, a persistent session, automatic reconnects.

The link only moves bytes. It knows nothing about the outbox: what to (re)send and when is the
sender's business, and what an incoming message means is the agent's.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, _ConnectionState
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sekisho.agents.runtime.backoff import ReconnectBackoff
from sekisho.agents.runtime.config import AgentConfig
from sekisho.protocol import topics

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
# Publishes awaiting the broker's PUBACK. paho ignores the broker's Receive Maximum, so this must stay
# within what the broker grants (1000 in deploy.broker). paho scans this window on every PUBACK, so
# bigger costs CPU; 200 keeps a loopback or LAN link full (measured: 20 → ~3,000/s, 200 → ~4,200/s).
MQTT_INFLIGHT = 200
INBOUND = (topics.ACKS, topics.POLICY, topics.COMMANDS)

OnConnected = Callable[[bool], None]
OnDisconnected = Callable[[], None]
OnMessage = Callable[[str, bytes], None]


def tls_context(config: AgentConfig) -> ssl.SSLContext:
    """Return a client TLS context: the site CA only, the agent's certificate, TLS 1.2 or later."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return ctx


def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # Nagle's algorithm holds small QoS 1 packets back ~40 ms waiting for more data to coalesce.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_GIVING_UP = (_ConnectionState.MQTT_CS_DISCONNECTING, _ConnectionState.MQTT_CS_DISCONNECTED)


class JitteredClient(mqtt.Client):
    """paho's client with its reconnect wait drawn from a ReconnectBackoff (jittered), not a fixed doubling.

    paho offers no hook for the delay, so this replaces its private ``_reconnect_wait`` (paho is pinned to
    2.x in the locks; tests/test_agent_reconnect.py fails if paho stops calling it).
    """

    def __init__(self, *args: Any, backoff: ReconnectBackoff, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backoff = backoff
        # The last delays drawn, for diagnostics and the tests.
        self.recent_delays: collections.deque[float] = collections.deque(maxlen=32)

    def _reconnect_wait(self) -> None:
        delay = self.backoff.next_delay()
        self.recent_delays.append(delay)
        deadline = time.monotonic() + delay
        # Wake up early on stop() or disconnect(), as paho's own wait does.
        while not self._thread_terminate and self._state not in _GIVING_UP:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.25))


class MqttLink:
    """One paho-mqtt client for one agent, with the agent's callbacks for connect, disconnect and messages."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        on_connected: OnConnected,
        on_disconnected: OnDisconnected,
        on_message: OnMessage,
        backoff: ReconnectBackoff | None = None,
    ) -> None:
        self.config = config
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_message = on_message
        self._agent = config.agent_id
        self._events_topic = topics.topic(self._agent, topics.EVENTS)
        self._heartbeat_topic = topics.topic(self._agent, topics.HEARTBEAT)
        self._inbound = {topics.topic(self._agent, ch): ch for ch in INBOUND}
        self._connected = threading.Event()
        self._stopping = False
        # "Log a failure once and its recovery once": these remember that we are in a failure spell.
        self._failing_since: float | None = None
        self._ever_connected = False

        self.backoff = backoff or ReconnectBackoff(config.reconnect_min_s, config.reconnect_max_s)
        client = JitteredClient(
            CallbackAPIVersion.VERSION2, client_id=self._agent, protocol=mqtt.MQTTv5, backoff=self.backoff
        )
        # Kept: renewal loads the new certificate into this same context (reload_tls).
        self.tls = tls_context(config)
        client.tls_set_context(self.tls)
        # The broker checks that the username is the certificate's name (its CN, the agent id) at CONNECT.
        client.username_pw_set(self._agent)
        client.on_socket_open = _nodelay
        client.max_inflight_messages_set(min(MQTT_INFLIGHT, config.max_inflight))
        # No cap on paho's own queue: the sender never has more than max_inflight unacknowledged events
        # out, so the queue is bounded by it, and a cap would turn a publish into a silent drop.
        client.max_queued_messages_set(0)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background; paho keeps reconnecting with backoff until stop()."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        self._client.connect_async(
            self.config.broker_host,
            self.config.broker_port,
            keepalive=KEEPALIVE_S,
            # A persistent session: acks and commands sent while we were away wait at the broker.
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the session stays at the broker) and stop the network thread."""
        self._stopping = True
        if self._connected.is_set():
            info = self._client.disconnect()
            if info == MQTTErrorCode.MQTT_ERR_SUCCESS:
                deadline = time.monotonic() + timeout
                while self._connected.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
        self._client.loop_stop()
        self._connected.clear()

    def reload_tls(self) -> None:
        """Load the certificate and key files again (after a renewal): the next connection presents them."""
        # paho makes every connection from this context; the current one keeps its certificate.
        self.tls.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))

    @property
    def recent_reconnect_delays(self) -> list[float]:
        """Return the last reconnect delays drawn, oldest first."""
        return list(self._client.recent_delays)

    @property
    def connected(self) -> bool:
        """Tell whether the broker has accepted the connection and it has not dropped since."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected; return False on timeout."""
        return self._connected.wait(timeout)

    # --- sending ----------------------------------------------------------------------------------

    def publish_event(self, wire: bytes) -> bool:
        """Publish one signed event at QoS 1; False if paho refused it (it is then resent later)."""
        info = self._client.publish(self._events_topic, wire, qos=1)
        # NO_CONN still queues a QoS 1 message inside paho, which sends it after reconnecting.
        return info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)

    def publish_heartbeat(self, wire: bytes) -> bool:
        """Publish a heartbeat at QoS 0 (only while connected: a stale heartbeat means nothing)."""
        if not self._connected.is_set():
            return False
        info = self._client.publish(self._heartbeat_topic, wire, qos=0)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # --- paho callbacks (network thread) ----------------------------------------------------------

    def _fail(self, what: str) -> None:
        if self._stopping:
            return
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "broker %s:%d: %s; retrying with backoff up to %.0f s",
                self.config.broker_host,
                self.config.broker_port,
                what,
                self.config.reconnect_max_s,
            )
        else:
            log.debug("broker still unavailable: %s", what)

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._fail(f"connection refused ({reason})")
            return
        client.subscribe([(name, 1) for name in self._inbound])
        self.backoff.reset()
        if self._failing_since is not None:
            log.info("broker connection restored after %.1f s", time.monotonic() - self._failing_since)
            self._failing_since = None
        elif not self._ever_connected:
            log.info("connected to broker %s:%d as %s", self.config.broker_host, self.config.broker_port, self._agent)
        self._ever_connected = True
        self._connected.set()
        self._on_connected(bool(getattr(flags, "session_present", False)))

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._fail("cannot connect")

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            self._fail(f"connection lost ({reason})")
            self._on_disconnected()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        channel = self._inbound.get(msg.topic)
        if channel is None:
            log.debug("ignoring message on unexpected topic %s", msg.topic)
            return
        self._on_message(channel, bytes(msg.payload))
