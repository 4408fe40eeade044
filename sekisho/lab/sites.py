"""Sites bridged to a central broker on this machine: the central lab, site brokers, and cuttable links.

Each site broker bridges to the central broker's sites listener through a :class:`TcpProxy`, so a test or
a benchmark can cut the link between a site and the centre (a real network cut: connections reset, new
ones refused) and heal it, while the agents keep talking to their site broker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sekisho.deploy.broker import BridgeSpec, Broker
from sekisho.deploy.pki import AgentCredentials, SiteCredentials, issue_site
from sekisho.lab import Lab

_CHUNK = 64 * 1024


class TcpProxy:
    """Forward a loopback port to a target port, with a switch that cuts every connection and refuses new ones."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self._listener = socket.create_server((host, 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def is_cut(self) -> bool:
        """Whether the link is cut right now."""
        return self._cut

    def cut(self) -> None:
        """Cut the link: reset every open connection and refuse new ones until heal()."""
        with self._lock:
            self._cut = True
            sockets = list(self._open)
            self._open.clear()
        for sock in sockets:
            _reset(sock)

    def heal(self) -> None:
        """Let connections through again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._closed:
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                # A cut link: the connection is reset at once, as a dead route or a firewall's reject would.
                _reset(client)
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _reset(src)
            _reset(dst)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0 makes close() send a RST: both ends see the link die, not an orderly goodbye.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class SiteBroker:
    """One site: its broker (agents connect here), its bridge's link to the centre, and its agents."""

    name: str
    broker: Broker
    link: TcpProxy
    agents: tuple[str, ...]


@dataclass
class Federation:
    """A central lab (central broker with a sites listener, controller) and site brokers bridged to it.

    `sites` maps a site name to its agents' names. Agents of a site get configs pointing at their site
    broker; `direct` agents connect to the central broker's agents' listener as in a single-site lab.
    """

    root: Path
    sites: Mapping[str, Sequence[str]]
    direct: Sequence[str] = ()
    database_url: str | None = None
    max_queued_messages: int | None = None
    lab: Lab = field(init=False)
    site_brokers: dict[str, SiteBroker] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.lab = Lab(self.root / "centre", database_url=self.database_url)
        self.lab.broker = Broker(
            self.lab.pki_dir,
            self.lab.root / "broker",
            sites={name: tuple(agents) for name, agents in self.sites.items()},
        )

    def start(self, agent_options: dict[str, object] | None = None) -> None:
        """Start the central broker, the site brokers with their bridges, and write every agent's config."""
        options = agent_options or {}
        for site in self.sites:
            if not SiteCredentials.at(self.lab.pki_dir, site).tls_cert.exists():
                issue_site(self.lab.pki_dir, site)
        self.lab.start_broker()
        for site, agents in self.sites.items():
            link = TcpProxy(self.lab.broker.site_port)
            spec = BridgeSpec.for_site(self.lab.pki_dir, site, "127.0.0.1", link.port, agents)
            # Short backoff: a healed link is used again within seconds (production keeps the defaults).
            spec = dataclasses.replace(spec, restart_base_s=1, restart_cap_s=3)
            broker = Broker(
                self.lab.pki_dir,
                self.root / "sites" / site / "broker",
                bridge=spec,
                max_queued_messages=self.max_queued_messages,
            )
            broker.start()
            self.site_brokers[site] = SiteBroker(site, broker, link, tuple(agents))
            for agent in agents:
                self.lab.add_agent(agent, broker_port=broker.port, **options)
        for agent in self.direct:
            self.lab.add_agent(agent, **options)

    def register_agents(self) -> None:
        """Register every agent's signing key with the controller, in this process (one CLI run per agent
        would start an interpreter each: minutes for a few dozen agents on a small host)."""
        from sekisho.controller.config import load_config
        from sekisho.controller.service import open_store

        store = open_store(load_config(self.lab.controller_config))
        try:
            for name in self.agents():
                store.register_agent(name, AgentCredentials.at(self.lab.pki_dir, name).signing_pub.read_text())
        finally:
            store.engine.dispose()

    def agents(self) -> list[str]:
        """Every agent, bridged ones first."""
        return [a for agents in self.sites.values() for a in agents] + list(self.direct)

    def stop(self) -> None:
        """Stop every process, the site brokers, their links and the central broker."""
        self.lab.stop_all()
        for site in self.site_brokers.values():
            site.broker.stop()
            site.link.close()
