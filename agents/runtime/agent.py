"""The agent process: outbox, MQTT link, sender, policy cache, commands and heartbeats put together.

Capabilities (login, USB, doors) get an `Agent` and use three things from it: `emit` to record an
event, `policy` to decide, and `commands.register` to accept remote instructions.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sekisho.agents.runtime.cert_renewal import CertificateRenewer, renewal_enabled
from sekisho.agents.runtime.commands import CommandDispatcher
from sekisho.agents.runtime.config import AgentConfig, check_key_files
from sekisho.agents.runtime.errors import AlreadyRunning, ConfigError, OutboxFull
from sekisho.agents.runtime.heartbeat import Health, Heartbeater
from sekisho.agents.runtime.link import MqttLink, tls_context
from sekisho.agents.runtime.outbox import Outbox
from sekisho.agents.runtime.policy_cache import PolicyCache, PolicyChange
from sekisho.agents.runtime.receipts import ReceiptKeeper
from sekisho.agents.runtime.sender import ClockEstimate, Sender
from sekisho.agents.runtime.textfile import AgentVitals, write_textfile
from sekisho.agents.runtime.vitals import CertificateExpiry, ErrorLogHandler, ErrorNote
from sekisho.common.i18n import _
from sekisho.common.sdnotify import serve_until
from sekisho.protocol import errors, signing, topics

log = logging.getLogger(__name__)

LOCK_NAME = "agent.lock"


@dataclass(frozen=True, slots=True)
class AgentStats:
    """A snapshot of the agent's counters (tests and benchmarks read these)."""

    published: int
    resent: int
    acked: int
    forged_acks: int
    inflight: int
    outbox_depth: int
    next_seq: int
    heartbeats: int
    connected: bool


def _load_keys(config: AgentConfig) -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    try:
        own = signing.load_private_key(config.signing_key)
    except (ValueError, TypeError, OSError) as err:
        # The message names the file only: key parsing errors can quote key material.
        raise ConfigError(f"signing_key {config.signing_key} is not an Ed25519 private key") from err
    try:
        controller = signing.load_public_key(config.controller_public_key)
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(f"controller_public_key {config.controller_public_key} is not an Ed25519 public key") from err
    return own, controller


def _check_tls(config: AgentConfig) -> None:
    try:
        tls_context(config)
    except (ssl.SSLError, OSError, ValueError) as err:
        raise ConfigError(
            f"TLS files unusable (ca_cert {config.ca_cert}, tls_cert {config.tls_cert}, tls_key {config.tls_key}): "
            f"{getattr(err, 'reason', None) or type(err).__name__}"
        ) from err


def _lock_state_dir(config: AgentConfig) -> int:
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(config.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Two agents on one outbox would hand out the same sequence numbers; the kernel drops the lock
        # when the process dies, however it dies.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise AlreadyRunning(f"another agent is running on {config.state_dir}") from err
    return fd


class Agent:
    """One endpoint agent; construct it (fails fast on bad config or state), then start() it."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        check_key_files(config)
        self._signing_key, controller_key = _load_keys(config)
        _check_tls(config)
        self._lock_fd = _lock_state_dir(config)
        self._started = False
        self._stopped = threading.Event()
        # What the heartbeat says this agent is ("terminal", "door"; set by the runner) and, on a terminal,
        # who has fingerprints enrolled (agents/login/fingerprints.py).
        self.kind = "agent"
        self._fingerprints: Callable[[], dict[str, Any] | None] | None = None
        self.errors = ErrorNote()
        self._full_lock = threading.Lock()
        self._unrecorded = 0  # events refused since the outbox's disk filled up (0: not full)
        self._error_log = ErrorLogHandler(self.errors)
        self._cert = CertificateExpiry(config.tls_cert, self.errors)
        self._textfile_failing = False
        try:
            self.clock = ClockEstimate()
            self.outbox = Outbox(
                config.outbox_path,
                signing_key=self._signing_key,
                agent_id=config.agent_id,
                clock=self.clock.state,
                sync=config.outbox_sync,
            )
            # Expiry is judged by the later of the local and the controller's clock: a local clock set back
            # must not keep an expired bundle (a revoked card) in force; one set ahead only expires it early.
            self.policy = PolicyCache(
                config.state_dir, controller_key, config.agent_id, now=lambda: self.clock.fail_closed_now()
            )
            self.link = MqttLink(
                config,
                on_connected=self._on_connected,
                on_disconnected=self._on_disconnected,
                on_message=self._on_message,
            )
            # Enrolled agents renew their certificate themselves (agents/runtime/cert_renewal.py).
            self.renewer = (
                CertificateRenewer(config, on_renewed=self.link.reload_tls) if renewal_enabled(config) is None else None
            )
            self.sender = Sender(
                self.outbox,
                self.link.publish_event,
                agent_id=config.agent_id,
                controller_key=controller_key,
                clock=self.clock,
                max_inflight=config.max_inflight,
                resend_after_s=config.resend_after_s,
                receipts=ReceiptKeeper(config.state_dir, config.agent_id),
            )
            self.commands = CommandDispatcher(
                agent_id=config.agent_id,
                controller_key=controller_key,
                nonce_path=config.nonce_path,
                emit=self.emit,
                on_resend=self.sender.resend_all,
                # Commands carry the controller's timestamps: judge them by its clock, so that a jumped local
                # clock neither refuses every command (a lock-down among them) nor lets one live longer.
                now=lambda: self.clock.reference_now(),
            )
            self.heartbeats = Heartbeater(
                agent_id=config.agent_id,
                signing_key=self._signing_key,
                interval_s=config.heartbeat_interval_s,
                health=self.health,
                publish=self.link.publish_heartbeat,
                housekeeping=self._housekeeping,
                after_beat=self._write_textfile if config.metrics_textfile is not None else None,
            )
        except BaseException:
            for part in ("commands", "outbox"):
                if hasattr(self, part):
                    getattr(self, part).close()
            self._release()
            raise
        self._control: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._control_thread: threading.Thread | None = None
        self.policy.subscribe(self._on_policy_change)

    # --- the capability API -------------------------------------------------------------------------

    def emit(self, type: str, payload: dict[str, Any]) -> int:
        """Record an event; it is on disk when this returns. Raises Rejected for an invalid payload.

        Raises OutboxFull when the disk is full: the event was not recorded, and the caller must not act
        as if it had been (a door does not release; docs/operations.md, "Fault matrix").
        """
        try:
            seq = self.outbox.append(type, payload)
        except OutboxFull:
            self._outbox_refused(1)
            raise
        self._outbox_wrote()
        self.sender.notify_new()
        return seq

    def emit_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Record several events in one transaction (bulk producers and benchmarks)."""
        try:
            seqs = self.outbox.append_many(items)
        except OutboxFull:
            self._outbox_refused(len(items))
            raise
        self._outbox_wrote()
        self.sender.notify_new()
        return seqs

    def _outbox_refused(self, count: int) -> None:
        # The heartbeat carries the code (and how many errors), the log says it once per spell: a door
        # tapped a hundred times on a full disk must not write a hundred lines to a disk that is full.
        self.errors.note("outbox_full")
        with self._full_lock:
            first = self._unrecorded == 0
            self._unrecorded += count
        if first:
            log.error(
                "outbox %s: the disk is full; events cannot be recorded and are refused (doors do not release "
                "without a record); free space on it",
                self.config.outbox_path,
            )

    def _outbox_wrote(self) -> None:
        if self._unrecorded:
            with self._full_lock:
                refused, self._unrecorded = self._unrecorded, 0
            if refused:
                log.warning(
                    "outbox %s writable again; %d event(s) were refused while it was full",
                    self.config.outbox_path,
                    refused,
                )

    def describe(self, kind: str, *, fingerprints: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Say what this agent is in its heartbeats, and where a terminal's fingerprint status comes from."""
        self.kind = kind
        self._fingerprints = fingerprints

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Record the start, then begin draining, heartbeating and connecting."""
        if self._started:
            raise RuntimeError("agent already started")
        self._started = True
        self.emit(
            "agent.started",
            {
                "version": self.heartbeats.version[:32],
                "outbox_depth": self.outbox.depth(),
                "policy_version": self.policy.version,
            },
        )
        if self.policy.load_error is not None:
            err = self.policy.load_error
            self.emit("agent.policy_rejected", {"reason": err.reason, "detail": f"cached bundle: {err.detail}"[:300]})
        logging.getLogger("sekisho").addHandler(self._error_log)
        self._control_thread = threading.Thread(target=self._run_control, name="agent-control", daemon=True)
        self._control_thread.start()
        self.sender.start()
        self.heartbeats.start()
        self.link.start()
        if self.renewer is not None:
            self.renewer.start()
        log.info(
            "agent %s started (outbox depth %d, policy %s, version %s)",
            self.config.agent_id,
            self.outbox.depth(),
            self.policy.state(),
            self.policy.version or "-",
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cleanly: finish the work in hand, disconnect (the session stays), close the stores."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._started:
            if self.renewer is not None:
                self.renewer.stop(timeout)
            self.heartbeats.stop(timeout)
            self._control.put(None)
            if self._control_thread is not None:
                self._control_thread.join(timeout)
            self.sender.stop(timeout)
            # Disconnecting after the sender stopped lets paho write out what it already holds.
            self.link.stop(timeout)
            logging.getLogger("sekisho").removeHandler(self._error_log)
        self.commands.close()
        self.outbox.close()
        self._release()
        log.info("agent %s stopped", self.config.agent_id)

    def _release(self) -> None:
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = -1

    def run_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly."""
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            serve_until(stop, alive=self.alive, status=self.service_status)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def alive(self) -> bool:
        """Tell whether the agent's working threads (control, sender, heartbeat) all still run."""
        control = self._control_thread
        return control is not None and control.is_alive() and self.sender.running and self.heartbeats.running

    def service_status(self) -> str:
        """Return the one-line state shown by `systemctl status` (sd_notify STATUS)."""
        depth = self.outbox.depth()
        if self.link.connected:
            return _("connected; outbox %(depth)s", depth=depth)
        return _("broker unreachable, events kept on disk; outbox %(depth)s", depth=depth)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every recorded event has been acknowledged by the controller."""
        return self.sender.wait_drained(timeout)

    # --- status -------------------------------------------------------------------------------------

    def health(self) -> Health:
        """Return what the next heartbeat will report."""
        oldest = self.outbox.oldest_created_at()
        last_ack = self.sender.stats.last_ack_at
        return Health(
            outbox_depth=self.outbox.depth(),
            oldest_unacked_age_s=max(0, int(time.time() - oldest)) if oldest is not None else None,
            next_seq=self.outbox.next_seq,
            clock_offset_ms=self.clock.offset_ms,
            policy_version=self.policy.version,
            policy_state=self.policy.state(),
            kind=self.kind,
            cert_not_after=self._cert.not_after(),
            last_error=self._last_error(),
            fingerprints=self._fingerprint_status(),
            extra={"last_ack_age_s": None if last_ack is None else max(0.0, time.monotonic() - last_ack)},
        )

    def _last_error(self) -> dict[str, Any] | None:
        last = self.errors.last()
        if last is not None and self._unrecorded:
            # While the outbox is full that is the news, whatever a capability logged after it (a door's
            # "not unlocked" line would otherwise hide it from the fleet view).
            return {**last, "code": "outbox_full"}
        return last

    def _fingerprint_status(self) -> dict[str, Any] | None:
        if self._fingerprints is None:
            return None
        try:
            return self._fingerprints()
        except Exception:  # the census is a courtesy; a failing one must not cost the heartbeat
            log.exception("fingerprint enrolment status failed")
            return None

    def _write_textfile(self, health: Health) -> None:
        path = self.config.metrics_textfile
        if path is None:
            return
        last = health.last_error
        vitals = AgentVitals(
            agent=self.config.agent_id,
            kind=self.kind,
            outbox_depth=health.outbox_depth,
            oldest_unacked_age_s=health.oldest_unacked_age_s,
            last_ack_age_s=health.extra.get("last_ack_age_s"),
            policy_version=health.policy_version,
            cert_not_after=health.cert_not_after,
            heartbeats_sent=self.heartbeats.sent,
            errors=int(last["count"]) if last else 0,
            connected=self.link.connected,
        )
        try:
            write_textfile(path, vitals)
        except OSError as err:
            # Logged once per failure spell, and its end once (a full disk would otherwise log every beat).
            if not self._textfile_failing:
                log.warning("metrics textfile %s not written: %s", path, err.strerror or type(err).__name__)
            self._textfile_failing = True
            return
        if self._textfile_failing:
            log.info("metrics textfile %s written again", path)
            self._textfile_failing = False

    def stats(self) -> AgentStats:
        """Return the counters."""
        s = self.sender.stats
        return AgentStats(
            published=s.published,
            resent=s.resent,
            acked=s.acked,
            forged_acks=s.forged_acks,
            inflight=self.sender.inflight,
            outbox_depth=self.outbox.depth(),
            next_seq=self.outbox.next_seq,
            heartbeats=self.heartbeats.sent,
            connected=self.link.connected,
        )

    # --- callbacks ----------------------------------------------------------------------------------

    def _on_connected(self, session_present: bool) -> None:
        self.sender.on_connected()
        self.heartbeats.beat_now()

    def _on_disconnected(self) -> None:
        if not self._stopped.is_set():
            self.errors.note("broker_connection_lost")
        self.sender.on_disconnected()

    def _on_message(self, channel: str, payload: bytes) -> None:
        # Runs on paho's network thread: hand everything off so the socket keeps being served.
        if channel == topics.ACKS:
            self.sender.offer_ack(payload)
        else:
            self._control.put((channel, payload))

    def _run_control(self) -> None:
        while True:
            item = self._control.get()
            if item is None:
                return
            channel, payload = item
            try:
                if channel == topics.POLICY:
                    self._offer_policy(payload)
                elif channel == topics.COMMANDS:
                    self.commands.handle(payload)
            except Exception:  # a bad message or a failing store must not end the control loop
                log.exception("handling a %s message failed", channel)

    def _offer_policy(self, raw: bytes) -> None:
        if not raw:
            return  # an empty retained message clears the topic; it is not a bundle
        outcome = self.policy.offer(raw)
        if outcome.status == "rejected":
            log.warning("policy bundle refused: %s", outcome.reason)
            self.errors.note(f"policy_rejected:{outcome.reason or errors.MALFORMED}")
            payload: dict[str, Any] = {"reason": outcome.reason or errors.MALFORMED, "detail": outcome.detail[:300]}
            if outcome.version is not None:
                payload["policy_version"] = outcome.version
            self.emit("agent.policy_rejected", payload)

    def _on_policy_change(self, change: PolicyChange) -> None:
        version = change.bundle.bundle.version
        if change.kind == "expired":
            self.emit("agent.policy_expired", {"policy_version": version})
        else:
            self.emit("agent.policy_applied", {"policy_version": version, "previous_version": change.previous_version})
        self.heartbeats.beat_now()

    def _housekeeping(self) -> float | None:
        self.policy.check_expiry()
        left = self.policy.seconds_until_expiry()
        return left if left is not None and left > 0 else None
