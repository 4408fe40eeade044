"""The controller's MQTT client: mutual TLS, MQTT v5, TCP_NODELAY."""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sekisho.controller.config import ControllerConfig
from sekisho.protocol.topics import CONTROLLER_CLIENT_PREFIX


def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # Nagle's algorithm adds ~40 ms to every request/response hop on QoS 1 traffic.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(config: ControllerConfig, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """Create a TLS MQTT v5 client for the controller (not yet connected).

    The client id must start with "controller" (so `worker_id` does: "controller-1", "controller-2", …).
    """
    # An agent's client id is its certificate's CN, and no agent name starts with this prefix: a controller
    # client id that does can never be taken over by an agent, nor take over one.
    if not client_id.startswith(CONTROLLER_CLIENT_PREFIX):
        raise ValueError(
            f"controller client id {client_id!r} must start with {CONTROLLER_CLIENT_PREFIX!r} (set worker_id to "
            f"{CONTROLLER_CLIENT_PREFIX}-N): other names belong to agents"
        )
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    client.tls_set(
        ca_certs=str(config.ca_cert),
        certfile=str(config.tls_cert),
        keyfile=str(config.tls_key),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    client.on_socket_open = _nodelay
    client.max_inflight_messages_set(1000)
    client.reconnect_delay_set(1, 15)
    return client


def connect_properties(config: ControllerConfig, persistent: bool) -> Properties:
    """Return CONNECT properties (session expiry for persistent sessions)."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = config.session_expiry_s if persistent else 0
    return props


def connect_blocking(client: mqtt.Client, config: ControllerConfig, *, persistent: bool, timeout: float = 10) -> None:
    """Connect and start the network loop; raise if the broker refuses or does not answer in time."""
    done = threading.Event()
    result: dict[str, Any] = {}
    previous = client.on_connect

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result["reason"] = reason
        # The owner's callback first: when connect_blocking returns, the owner already knows it is connected.
        try:
            if previous is not None:
                previous(c, userdata, flags, reason, props)  # type: ignore[call-arg]
        finally:
            done.set()

    client.on_connect = on_connect
    client.connect_async(
        config.broker_host,
        config.broker_port,
        keepalive=30,
        clean_start=not persistent,
        properties=connect_properties(config, persistent),
    )
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise ConnectionError(f"broker {config.broker_host}:{config.broker_port} did not answer in {timeout}s")
    client.on_connect = previous
    reason = result["reason"]
    if reason.is_failure:
        client.loop_stop()
        raise ConnectionError(f"broker refused the controller: {reason}")
