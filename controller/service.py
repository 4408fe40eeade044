"""The running controller: store + ingest + policy keeper + HTTP API in one process.

Nothing here is state another worker would need: versions, keys and records live in the database,
so several `serve`/`ingest` processes can share one store behind an MQTT shared subscription.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sekisho.common.i18n import _
from sekisho.common.sdnotify import LivenessCheck, ServiceNotifier
from sekisho.controller.alerts.bell import Bell
from sekisho.controller.alerts.delivery import Channels, DeliveryJob
from sekisho.controller.alerts.engine import AlertEngine
from sekisho.controller.alerts.rules import EVENT_TYPES
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.api.https import tls_options
from sekisho.controller.api.sse import close_streams
from sekisho.controller.config import ControllerConfig
from sekisho.controller.doors.jobs import DoorRegisterKeeper
from sekisho.controller.doors.projector import DoorProjector
from sekisho.controller.doors.registers import DoorRegisters
from sekisho.controller.fleet.expiry import CertExpiryWatch
from sekisho.controller.fleet.health import Thresholds
from sekisho.controller.fleet.metrics import PublicationStats
from sekisho.controller.fleet.revocations import RevocationKeeper
from sekisho.controller.heads import HeadsExport
from sekisho.controller.ingest.worker import IngestWorker
from sekisho.controller.leader import Elector, Identity, elector_for
from sekisho.controller.media.overdue import OverdueWatch
from sekisho.controller.media.service import MediaService
from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.policy.floor import MAX_REPORTED_JUMP, record_published
from sekisho.controller.policy.service import PolicyService, publish_bundles
from sekisho.controller.processes import ProcessBeat, ProcessReport, forget
from sekisho.controller.reports.verify import PointRefresher
from sekisho.controller.store.db import make_engine, private_dir, upgrade
from sekisho.controller.store.store import Store
from sekisho.protocol import messages, signing, timefmt, topics

log = logging.getLogger(__name__)
# How long a leader's proof of its lock counts, in leader_check_s (controller/leader.py).
LEASE_CHECKS = 3.0
# What wakes the alert engine early: the event types its rules read (refused messages wait for its sweep).
WAKING_TYPES = EVENT_TYPES


def open_store(config: ControllerConfig) -> Store:
    """Open the configured database and bring its schema up to date (var_dir: 0700, SQLite files: 0600)."""
    private_dir(config.var_dir)
    engine = make_engine(
        config.resolved_database_url(),
        pool_size=config.database_pool_size,
        max_overflow=config.database_max_overflow,
        application_name=f"sekisho-{config.worker_id}",
    )
    upgrade(engine)
    return Store(engine, signing_key=controller_signing_key(config))


def controller_signing_key(config: ControllerConfig) -> Ed25519PrivateKey | None:
    """Return the controller's signing key if this process can read it, else None.

    It signs the checkpoint log and the agents' key lines (controller/store/checkpoints.py). A command that
    only reads may run without it; the controller's ingest refuses to start without it, and the commands
    that write key lines or verify the log say so.
    """
    try:
        return signing.load_private_key(config.signing_key)
    except OSError:
        return None


@dataclass
class _Published:
    version: int
    at: float
    # The bundles signed for this publication, re-sent as they are to an agent that reports an older version.
    bundles: dict[str, bytes] = field(default_factory=dict)


class PolicyKeeper(PeriodicJob):
    """Publishes the current policy's bundles: on a new version, before they expire, and to stale agents."""

    name = "policy publication"
    every_s = 5.0
    # One publisher: two would sign and publish every version twice, and could re-issue above a restore twice.
    leader_only = True
    STALE_AGENT_COOLDOWN_S = 60.0

    def __init__(self, config: ControllerConfig, store: Store, worker: IngestWorker) -> None:
        self.service = PolicyService(store, signing.load_private_key(config.signing_key))
        self.var_dir = config.var_dir
        self.worker = worker
        self._published: _Published | None = None
        self._stale_sent: dict[str, float] = {}
        self.publications = PublicationStats()
        self._lock = threading.Lock()
        # Revoked agents whose retained bundle this process has cleared (a revoked agent gets no policy).
        self._cleared: set[str] = set()
        super().__init__()

    def run_once(self) -> None:
        """Publish when needed (see check)."""
        self.check()

    def leadership_changed(self, leading: bool) -> None:
        """Forget what this process published: a new leader publishes the version in force at once."""
        with self._lock:
            self._published = None
            self._stale_sent.clear()
            self._cleared = set()

    def check(self) -> None:
        """Publish bundles if the version changed or half their lifetime has passed (on the leader only).

        Called from the API after a loan too: a process that does not lead leaves it to the leader's next
        check (within every_s).
        """
        if not self.leads():
            return
        current = self.service.current()
        if current is None or not self.worker.stats.connected:
            return
        self._clear_revoked()
        version, policy = current
        refresh_after = policy.bundle_lifetime_hours * 3600 / 2
        with self._lock:
            fresh = self._published and self._published.version == version
            if fresh and time.monotonic() - self._published.at < refresh_after:  # type: ignore[union-attr]
                return
            signed = self.service.signed_bundles()
            if signed is None:
                return
            # The version the bundles carry (an apply may have landed since `current` above).
            version = signed.version
            # The floor outside the database: a restore must never issue this number again (policy/floor.py).
            record_published(self.var_dir, version)
            # Each bundle leaves as soon as it is signed; the ones sent are kept for stale heartbeats.
            bundles = publish_bundles(self.worker.client, signed.pairs)
            self._published = _Published(version, time.monotonic(), bundles)
            self.publications.published(version)
        log.info("published policy version %d bundles", version)

    def _clear_revoked(self) -> None:
        """Delete the retained bundle of every newly revoked agent, so nothing hands it policy any more."""
        revoked = self.service.revoked_agents()
        for agent in sorted(revoked - self._cleared):
            # An empty retained message deletes the retained one; the broker also refuses the agent itself.
            info = self.worker.client.publish(topics.topic(agent, topics.POLICY), b"", qos=1, retain=True)
            info.wait_for_publish(10)
            log.info("revoked agent %s: retained policy bundle cleared", agent)
        self._cleared = revoked

    def on_heartbeat(self, hb: messages.Heartbeat) -> None:
        """Re-send the bundle to an agent that reports an older policy version (at most once a minute)."""
        if not self.leads():
            return  # the leader re-sends when one of this agent's heartbeats reaches it
        published = self._published
        if published is None or hb.policy_version == published.version:
            return
        now = time.monotonic()
        if now - self._stale_sent.get(hb.agent, 0.0) < self.STALE_AGENT_COOLDOWN_S:
            return
        self._stale_sent[hb.agent] = now
        if hb.policy_version is not None and hb.policy_version > published.version:
            self._agent_ahead(hb.agent, hb.policy_version)
            return
        # Called on the ingest thread for every heartbeat: re-signing the whole fleet's bundles here (as it once
        # did) stalled ingest for seconds per stale agent. The bundle signed at publication is re-sent as it is;
        # only an agent registered since then gets one signed for it alone. Not waited for: QoS 1 and retained,
        # the broker has it or the next heartbeat asks again.
        if hb.agent in self._cleared:
            return  # revoked since the publication: its cached bundle must not go out again
        bundle = published.bundles.get(hb.agent) or self.service.bundle_for(hb.agent)
        if bundle is not None:
            self.worker.client.publish(topics.topic(hb.agent, topics.POLICY), bundle, qos=1, retain=True)

    def _agent_ahead(self, agent: str, reported: int) -> None:
        """An agent holds a newer version than the store's newest (a restore lost it): re-issue above it."""
        current = self.service.current()
        newest = current[0] if current is not None else 0
        if reported <= newest:
            return  # another worker re-issued already; the next check publishes it
        store = self.service.store
        if reported - newest > MAX_REPORTED_JUMP:
            store.note_finding(
                "policy_version_implausible",
                agent,
                None,
                {"reported": reported, "newest_stored": newest, "max_jump": MAX_REPORTED_JUMP},
            )
            log.warning("agent %s reports policy version %d, far above %d: not followed", agent, reported, newest)
            return
        version = self.service.reissue_above(
            reported,
            created_by="controller",
            comment=f"re-issued: agent {agent} holds version {reported}, newer than the store's {newest} (restore?)",
        )
        store.note_finding(
            "policy_version_reissued", agent, None, {"reported": reported, "newest_stored": newest, "issued": version}
        )
        self.check()


class Controller:
    """Owns the store, the ingest worker and the policy keeper; `serve` adds the HTTP API."""

    def __init__(self, config: ControllerConfig, *, with_policy: bool = True) -> None:
        self.config = config
        self.store = open_store(config)
        self.worker = IngestWorker(config, self.store, on_heartbeat=self._on_heartbeat, on_stored=self._on_stored)
        self.identity = Identity.here(config.worker_id)
        # Only `serve` runs background jobs; its leader-only ones run where this process holds their lock.
        self.elector: Elector | None = (
            elector_for(
                config.resolved_database_url(),
                self.identity,
                check_s=config.leader_check_s,
                lease_s=config.leader_check_s * LEASE_CHECKS,
            )
            if with_policy
            else None
        )
        self.report = ProcessReport(
            self.identity,
            "serve" if with_policy else "ingest",
            timefmt.now(),
            self.worker.stats,
            leading=self.elector.leading if self.elector is not None else list,
        )
        self.beat = ProcessBeat(self.store, self.report, every_s=config.process_beat_s)
        self.keeper = PolicyKeeper(config, self.store, self.worker) if with_policy else None
        self.overdue = OverdueWatch(MediaService(self.store, self.keeper.service)) if self.keeper else None
        # The registers follow the events table, whichever worker stored them (see controller.doors.jobs).
        self.doors = DoorRegisterKeeper(DoorProjector(self.store), DoorRegisters(self.store)) if with_policy else None
        # Certificates whose renewal keeps failing become findings before the broker refuses the device.
        self.expiry = (
            CertExpiryWatch(self.store, warn_days=config.cert_warn_days, thresholds=Thresholds.from_config(config))
            if with_policy
            else None
        )
        # The broker's revocation list, when the broker reads it on this host (controller/fleet/revocations.py).
        self.revocations = (
            RevocationKeeper(self.store, config.revocation_list, float(config.key_refresh_s))
            if with_policy and config.revocation_list is not None
            else None
        )

        # The chain walks, out of the console's requests (controller/reports/verify.py): incremental from the
        # signed points every chain_verify_every_s, from the start every chain_verify_full_every_s.
        self.chain_points = (
            PointRefresher(
                self.store,
                config.worker_id,
                every_s=float(config.chain_verify_every_s),
                full_every_s=float(config.chain_verify_full_every_s),
            )
            if with_policy and self.store.signing_key is not None
            else None
        )

        # Signed checkpoint heads kept outside the database (issue 14; controller/heads.py).
        self.heads = (
            HeadsExport(self.store, config.heads_file, float(config.heads_every_s))
            if with_policy and config.heads_file is not None
            else None
        )

        # Alerts (issue 13): rules over the events and conditions, escalation, and the outbox's delivery.
        alerts = config.alerts
        # Rung by the engine when it changed alerts; this process's live streams listen (controller/alerts/bell.py).
        self.alert_bell = Bell()
        self.alerts = (
            AlertEngine(
                self.store,
                thresholds=Thresholds.from_config(config),
                every_s=alerts.every_s,
                condition_every_s=alerts.condition_every_s,
                syslog=alerts.syslog is not None,
                on_change=self.alert_bell.ring,
            )
            if with_policy and alerts.enabled
            else None
        )
        self.delivery = (
            DeliveryJob(
                self.store,
                Channels.from_config(alerts),
                console_url=alerts.console_url,
                every_s=alerts.delivery_every_s,
            )
            if self.alerts is not None
            else None
        )

    def _on_stored(self, types: frozenset[str]) -> None:
        # Events a rule reads, stored by this process: the rules look now rather than at their next poll (other
        # processes' events are found by the poll, as before). Other events do not wake it: most are nobody's.
        alerts = getattr(self, "alerts", None)
        if alerts is not None and not types.isdisjoint(WAKING_TYPES):
            alerts.poke()

    def _on_heartbeat(self, hb: messages.Heartbeat) -> None:
        if self.keeper is not None:
            self.keeper.on_heartbeat(hb)

    def start(self) -> None:
        """Seal the records as they stand if the checkpoint log has not begun, connect ingest, publish policy."""
        genesis = self.store.seal_existing()
        if genesis is not None:
            log.warning("checkpoint log begun: the records as they stand now are sealed as genesis #%d", genesis)
        self.worker.start()
        jobs = self.jobs()
        if self.elector is not None:
            for job in jobs:
                if job.leader_only:
                    job.lead_by(self.elector)
            # Its first round runs here: a lone controller leads everything before its jobs start.
            self.elector.start()
        for job in jobs:
            job.start()
        self.beat.start()

    def stop(self) -> None:
        """Stop cleanly: finish the batch in hand, then disconnect."""
        for job in reversed(self.jobs()):
            job.stop()
        # After the jobs: their leaderships are free for another process only once no round is running here.
        if self.elector is not None:
            self.elector.stop()
        self.beat.stop()
        try:
            forget(self.store, self.identity.worker_id)
        except Exception:  # the row then stays with its last beat: status shows it silent, nothing worse
            log.warning("could not remove this process's row from controller_processes", exc_info=True)
        self.worker.stop()
        self.store.engine.dispose()
        log.info("controller %s stopped", self.config.worker_id)

    def alive(self) -> bool:
        """Tell whether ingest and the periodic jobs still run (the service watchdog asks)."""
        return self.worker.running and all(job.running for job in self.jobs())

    def jobs(self) -> list[PeriodicJob]:
        """Return this process's background jobs, in start order (each says whether it is leader_only)."""
        jobs = (
            self.keeper,
            self.overdue,
            self.doors,
            self.revocations,
            self.expiry,
            self.chain_points,
            self.heads,
            self.alerts,
            self.delivery,
        )
        return [job for job in jobs if job is not None]

    def service_status(self) -> str:
        """Return the one-line state shown by `systemctl status` (sd_notify STATUS)."""
        stats = self.worker.stats
        counts = {"stored": stats.stored, "waiting": stats.waiting, "dead": stats.dead_lettered}
        if stats.connected:
            return _("connected; stored %(stored)s, waiting %(waiting)s, dead letters %(dead)s", **counts)
        return _("broker unreachable; stored %(stored)s, waiting %(waiting)s, dead letters %(dead)s", **counts)

    def serve_http(self, notifier: ServiceNotifier | None = None) -> None:
        """Run the HTTP API in the foreground until interrupted; systemd hears READY=1 once it listens."""
        # Loans made over the API are published at once instead of at the keeper's next 5 s check.
        publish = self.keeper.check if self.keeper is not None else None
        publications = self.keeper.publications if self.keeper is not None else None
        app = create_app(
            AppState(
                self.config,
                self.store,
                self.worker.stats,
                on_policy_change=publish,
                publications=publications,
                alert_bell=self.alert_bell,
                process=self.report,
            )
        )
        config = uvicorn.Config(
            app,
            host=self.config.http_host,
            port=self.config.http_port,
            log_level="warning",
            **tls_options(self.config),
        )
        check = LivenessCheck(notifier if notifier is not None else ServiceNotifier(), self.alive, self.service_status)
        server = _SupervisedServer(config, check)
        if threading.current_thread() is not threading.main_thread():
            server.run()
            return
        # uvicorn re-raises the SIGTERM it caught once it has shut down; under the default handler that kills
        # the process before the caller's Controller.stop() finishes the ingest batch in hand and disconnects.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)


class _SupervisedServer(uvicorn.Server):
    """uvicorn's server that says READY=1 once it listens and proves liveness from its own main loop."""

    def __init__(self, config: uvicorn.Config, check: LivenessCheck) -> None:
        super().__init__(config)
        self._check = check

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind and start serving, then tell systemd (a failed bind exits before this)."""
        await super().startup(sockets)
        if self.started:
            self._check.ready()

    async def on_tick(self, counter: int) -> bool:
        """Run uvicorn's tick (every 0.1 s); once a second, ping the watchdog if the controller is alive."""
        if counter % 10 == 0:
            self._check.check()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Tell systemd the stop is on purpose, end the live streams, then let uvicorn finish the requests in hand."""
        self._check.notifier.stopping()
        close_streams(self.config.app)  # an open alerts page would otherwise hold the stop for its stream's lifetime
        await super().shutdown(sockets)
