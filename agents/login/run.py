"""Run a terminal agent: the agent runtime, the card-removal watch of open sessions, and the USB guard.

``sekisho-agent terminal --config agent.toml --terminal t-hr-01`` is what a My Number terminal runs as a
service. It also decides the logins: pam_exec's ``sekisho-agent pam-auth`` asks it over a root-only socket
(pam_service.py), and the decisions record which sessions are open in the session registry in the state
directory, which the watch follows.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sekisho.agents.login.fingerprints import FingerprintCensus
from sekisho.agents.login.pam import load_login_settings
from sekisho.agents.login.pam_service import PamService
from sekisho.agents.login.sessions import LoginSessions
from sekisho.agents.login.watch import LoginSessionWatcher, WatchSettings
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.usb.run import AttachedGuard, UsbGuardConfig, attach_usb_guard
from sekisho.common.sdnotify import serve_until
from sekisho.drivers.biometric.protocol import EnrolmentCensus
from sekisho.drivers.smartcard.protocol import SmartCardBackend
from sekisho.protocol.policy import LoginSettings, SitePolicy

log = logging.getLogger(__name__)


@dataclass
class TerminalAgent:
    """A started terminal: stop() stops the USB guard, the watch and the agent in that order."""

    agent: Agent
    watcher: LoginSessionWatcher
    sessions: LoginSessions
    usb: AttachedGuard | None
    pam: PamService | None = None

    def alive(self) -> bool:
        """Tell whether the agent's threads and the PAM service still run (the service watchdog asks)."""
        return self.agent.alive() and (self.pam is None or self.pam.running)

    def stop(self) -> None:
        """Stop everything; idempotent enough for signal handlers and finally blocks."""
        if self.pam is not None:
            self.pam.stop()
        if self.usb is not None:
            self.usb.stop()
        self.watcher.stop()
        self.sessions.close()
        self.agent.stop()


def _end_after(agent: Agent) -> float:
    bundle = agent.policy.current()
    if bundle is None:
        return float(LoginSettings().end_session_after_card_removed_s)
    try:
        return float(SitePolicy.model_validate(bundle.bundle.policy).login.end_session_after_card_removed_s)
    except ValueError:
        return float(LoginSettings().end_session_after_card_removed_s)


def start_terminal(
    agent: Agent,
    config_path: Path,
    terminal: str,
    *,
    backend: SmartCardBackend | None = None,
    usb: UsbGuardConfig | None = None,
    poll_s: float = 0.5,
    pam_socket: Path | None = None,
    fingerprints: EnrolmentCensus | None = None,
) -> TerminalAgent:
    """Start the agent, the session watch (real PC/SC unless a backend is given), the USB guard, and the
    PAM service on ``pam_socket`` (None: no PAM service, for tests of the rest). Heartbeats report the
    handlers' enrolled fingers from ``fingerprints`` (default: fprintd on login.toml's fprintd_bus)."""
    settings = load_login_settings(config_path)
    if fingerprints is None:
        from sekisho.drivers.biometric.fprintd import FprintdBackend

        fingerprints = FprintdBackend(bus_address=settings.fprintd_bus)
    census = FingerprintCensus(fingerprints, agent.policy, terminal)
    agent.describe("terminal", fingerprints=census.status)
    if backend is None:
        from sekisho.drivers.smartcard import pcsc_backend

        backend = pcsc_backend()
    sessions = LoginSessions(agent.config.state_dir)
    watcher = LoginSessionWatcher(
        backend,
        sessions,
        agent.emit,
        WatchSettings(
            terminal=terminal,
            lock_command=settings.lock_command,
            end_command=settings.end_command or None,
            poll_s=poll_s,
        ),
        end_after_s=lambda: _end_after(agent),
    )
    agent.start()
    watcher.start()
    running = TerminalAgent(agent, watcher, sessions, None)
    try:
        if usb is not None:
            # The USB guard lends media to the person the login guard authenticated (nobody while locked).
            running.usb = attach_usb_guard(agent, usb, session=watcher)
            running.usb.start()
        if pam_socket is not None:
            # Decisions land in the outbox through the service's own connection; wake the sender for them.
            running.pam = PamService(
                config_path,
                terminal,
                socket_path=pam_socket,
                config=agent.config,
                on_recorded=agent.sender.notify_new,
            ).start()
    except BaseException:
        running.stop()
        raise
    return running


def run_terminal(
    agent: Agent,
    config_path: Path,
    terminal: str,
    *,
    usb: UsbGuardConfig | None = None,
    pam_socket: Path | None = None,
) -> None:
    """Run a terminal agent until SIGINT or SIGTERM."""
    import signal

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    running = start_terminal(agent, config_path, terminal, usb=usb, pam_socket=pam_socket)
    try:
        # Ready once logins can be decided (the PAM socket is bound), with or without the broker.
        serve_until(stop, alive=running.alive, status=agent.service_status)
    finally:
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
