"""MQTT client helpers for tests: connect with mutual TLS and wait, with a timeout, for every answer."""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from sekisho.deploy.pki import CONTROLLER_CN, AgentCredentials, PkiPaths

TIMEOUT = 5.0
NOT_AUTHORIZED = 135


@dataclass(frozen=True)
class TlsFiles:
    """The CA to trust and the client certificate to present (None: present none)."""

    ca_cert: Path
    cert: Path | None = None
    key: Path | None = None


def tls_files(pki_dir: Path, identity: str) -> TlsFiles:
    """Return the TLS files of the controller or of an agent in a PKI directory."""
    pki = PkiPaths.at(pki_dir)
    if identity == CONTROLLER_CN:
        return TlsFiles(pki.ca_cert, pki.controller_cert, pki.controller_key)
    agent = AgentCredentials.at(pki_dir, identity)
    return TlsFiles(agent.ca_cert, agent.tls_cert, agent.tls_key)


class ConnectRefused(Exception):
    """The broker refused the connection (TLS failure, CONNACK failure, or closed before CONNACK)."""

    def __init__(self, detail: str, reason: ReasonCode | None = None) -> None:
        super().__init__(detail)
        self.reason = reason


class SyncClient(mqtt.Client):
    """A paho client whose publish/subscribe can wait for the broker's answer; messages go to a queue."""

    def __init__(self, client_id: str) -> None:
        # No automatic reconnection: a test decides when to reconnect, and a refusal stays a refusal.
        super().__init__(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, reconnect_on_failure=False
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self._acks: dict[int, Any] = {}
        self._acked = threading.Condition()
        self.on_message = self._record_message
        self.on_publish = self._record_ack
        self.on_subscribe = self._record_suback
        self.on_socket_open = _nodelay

    def _record_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _record_ack(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._acked:
            self._acks[mid] = reason
            self._acked.notify_all()

    def _record_suback(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self._record_ack(client, userdata, mid, list(reasons), props)

    def _wait_ack(self, mid: int, timeout: float, what: str) -> Any:
        # Callbacks run on the network thread and may fire before we start waiting: results are kept
        # by message id, so none is missed.
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, timeout):
                raise TimeoutError(f"no {what} for message id {mid} within {timeout}s")
            return self._acks.pop(mid)

    def publish_wait(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 1,
        *,
        retain: bool = False,
        timeout: float = TIMEOUT,
    ) -> ReasonCode:
        """Publish and return the broker's PUBACK reason code (QoS 0: success once written)."""
        info = self.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        reason = self._wait_ack(info.mid, timeout, "PUBACK")
        if isinstance(reason, ReasonCode):
            return reason
        return ReasonCode(PacketTypes.PUBACK, identifier=0)

    def subscribe_wait(self, topic: str, qos: int = 1, *, timeout: float = TIMEOUT) -> list[ReasonCode]:
        """Subscribe and return the SUBACK reason codes."""
        rc, mid = self.subscribe(topic, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"subscribe to {topic} failed: {mqtt.error_string(rc)}")
        reasons: list[ReasonCode] = self._wait_ack(mid, timeout, "SUBACK")
        return reasons

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        """Return the next received message, raising TimeoutError if none arrives in time."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self._client_id!r} received no message within {timeout}s") from None

    def received(self) -> list[mqtt.MQTTMessage]:
        """Return (and remove) every message received so far."""
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Disconnect (keeping any persistent session) and stop the network thread."""
        self.disconnect()
        self.loop_stop()


def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # Nagle's algorithm would add ~40 ms to each QoS 1 round trip and make timing-based tests slow.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_client(
    tls: Path | TlsFiles | None,
    port: int,
    client_id: str,
    *,
    identity: str | None = None,
    clean_start: bool = True,
    session_expiry: int = 0,
    host: str = "127.0.0.1",
    timeout: float = TIMEOUT,
) -> SyncClient:
    """Connect an MQTT v5 client with mutual TLS and wait for CONNACK; raise ConnectRefused on refusal.

    `tls` is a PKI directory (the certificate of `identity`, default `client_id`, is used), explicit
    TlsFiles, or None for plain TCP without TLS.
    """
    if isinstance(tls, Path):
        tls = tls_files(tls, identity or client_id)
    client = SyncClient(client_id)
    # The agents' listener checks that the username is the certificate's name (the controllers' ignores it).
    client.username_pw_set(identity or client_id)
    if tls is not None:
        client.tls_set(
            ca_certs=str(tls.ca_cert),
            certfile=str(tls.cert) if tls.cert else None,
            keyfile=str(tls.key) if tls.key else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.connect_timeout = timeout

    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        outcome.setdefault("connack", reason)
        client.session_present = bool(flags.session_present)
        answered.set()

    def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        outcome.setdefault("disconnect", reason)
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    props = Properties(PacketTypes.CONNECT)
    if session_expiry:
        props.SessionExpiryInterval = session_expiry
    try:
        client.connect(host, port, keepalive=30, clean_start=clean_start, properties=props)
    except (OSError, ssl.SSLError) as err:
        raise ConnectRefused(f"{client_id}: connect failed: {err!r}") from err
    client.loop_start()
    if answered.wait(timeout) and "connack" in outcome and not outcome["connack"].is_failure:
        client.on_connect = None
        return client
    client.close()
    if "connack" in outcome:
        reason = outcome["connack"]
        raise ConnectRefused(f"{client_id}: CONNACK {reason} ({reason.value})", reason)
    if "disconnect" in outcome:
        raise ConnectRefused(f"{client_id}: connection closed before CONNACK ({outcome['disconnect']})")
    raise ConnectRefused(f"{client_id}: no CONNACK within {timeout}s")
