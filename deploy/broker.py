"""Mosquitto for the MQTT transport: the ACLs, the configuration, and a managed broker for demos and tests.

Identity is bound by the listener a client reaches (mosquitto 2.0, ``per_listener_settings true``):

- the agents' listener trusts only the site CA (which issues agent certificates); the certificate's CN is
  the username (the plugin ``deploy/mosquitto/sekisho_agent_acl.c`` checks at CONNECT that the username an
  agent sends is its certificate's CN, and that the certificate is not revoked) *and* the client id
  (``use_username_as_clientid``), so an agent can neither take over another agent's persistent session nor
  disconnect anyone but itself. The plugin lets an agent subscribe to its own inbound topics only
  (mosquitto's acl_file grants every SUBSCRIBE, ``$share/...`` included), and the ACL limits what it
  publishes and receives. Revocations come from a file (``revocations`` in the state directory here) that
  the plugin re-reads when it changes: revoked agents are disconnected and refused without a restart;
- the controllers' listener trusts only the controller CA, so no agent certificate gets in there; the
  controller picks its own client ids (``controller-1-ingest``, …), all starting with ``controller``,
  a prefix no agent name may have (deploy/pki.py).

Sites (docs/operations.md, "Sites and the central broker"): a *site* broker serves its agents exactly as
above and bridges to the *central* broker (:class:`BridgeSpec`, :func:`render_bridge`) with a certificate
of the site bridge CA (``sekisho pki issue-site``). The central broker then has a third listener, the
sites listener, trusting only that CA; its ACL (:func:`render_sites_acl`) lets each site publish and
receive the topics of its own agents only.

Production brokers use ``deploy/mosquitto/*.example``; :class:`Broker` runs a private mosquitto on two
(three with sites) loopback ports with the same ACLs, plugin and settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sekisho.deploy.pki import CONTROLLER_CN, SITE_CA_DIR, CaPaths, PkiPaths, SiteCredentials, check_site_name
from sekisho.protocol import topics
from sekisho.protocol.messages import MAX_CONTROL_BYTES
from sekisho.protocol.revocations import RevocationList

# The largest message on the wire is a control message (policy bundle); the headroom covers the topic,
# MQTT properties and framing. Anything bigger is hostile, and the broker drops the client.
MAX_PACKET_BYTES = MAX_CONTROL_BYTES + 64 * 1024
# Per-client queue of QoS 1 messages beyond those in flight. The default (1000) would silently drop
# events queued for a controller that is offline for a few seconds under load; a million events of
# about 1 KiB is about 1 GiB of broker memory at worst, and agents resend anything not acknowledged.
MAX_QUEUED_MESSAGES = 1_000_000
# QoS 1 messages in flight per client. The default (20) throttles the controller's shared subscription
# to 20 unacknowledged events at a time; MQTT v5 clients lower it with their own Receive Maximum.
MAX_INFLIGHT_MESSAGES = 1000

CONFIG_NAME = "mosquitto.conf"
AGENT_ACL_NAME = "acl-agents"
CONTROLLER_ACL_NAME = "acl-controllers"
SITES_ACL_NAME = "acl-sites"
LOG_NAME = "mosquitto.log"
STDERR_NAME = "mosquitto.stderr"
DB_NAME = "mosquitto.db"
REVOCATIONS_NAME = "revocations"


# The agents' inbound channels: the only topics (their own) an agent may subscribe to.
AGENT_INBOUND = (topics.ACKS, topics.POLICY, topics.COMMANDS)
# What a bridge carries per agent: upstream (site → centre) and downstream (centre → site), with the QoS
# the agents and the controller use on each channel (heartbeats are QoS 0: only live ones mean anything).
BRIDGE_OUT = ((topics.EVENTS, 1), (topics.HEARTBEAT, 0))
BRIDGE_IN = ((topics.ACKS, 1), (topics.POLICY, 1), (topics.COMMANDS, 1))
# A site broker's window of events in flight to the centre. mosquitto 2.0.11 has no rate option for a
# bridge; its window (max_inflight_messages, which 2.0 applies to the bridge's outgoing messages) makes
# the central broker's PUBACKs pace a backlog, instead of the whole backlog being written at once
# (eclipse/mosquitto#1359). The agents' own windows (max_inflight) bound what waits behind it.
BRIDGE_INFLIGHT_MESSAGES = 100
BRIDGE_INFLIGHT_BYTES = 1024 * 1024
# Queue of a site broker's bridge while the centre is unreachable. Past it mosquitto drops silently, which
# loses nothing: agents keep every event until the controller's signed ack and publish again whatever is
# not acknowledged after resend_after_s. A bounded queue keeps a long partition from filling the site
# broker's memory (each agent keeps at most max_inflight events unacknowledged in flight anyway).
BRIDGE_QUEUED_MESSAGES = 100_000
BRIDGE_QUEUED_BYTES = 256 * 1024 * 1024
PLUGIN_NAME = "sekisho_agent_acl"
PLUGIN_SOURCE = Path(__file__).resolve().parent / "mosquitto" / f"{PLUGIN_NAME}.c"
PLUGIN_CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared")


class BrokerError(RuntimeError):
    """The broker could not be started, or was used in the wrong state."""


def render_agent_acl() -> str:
    """Return the ACL of the agents' listener: each agent publishes and receives on its own topics only."""
    own = f"{topics.ROOT}/%u"
    lines = [
        "# sekisho MQTT ACL of the agents' listener. The username is the CN of the client certificate",
        "# (checked at CONNECT by the sekisho_agent_acl plugin), issued by the site CA; the client id is the same name",
        "# (use_username_as_clientid). Anything not granted here is denied.",
        "",
        "# %u is the agent's own CN, so each agent reaches its own topics only, in one direction. Every",
        "# delivered message is checked against the read rules; the sekisho_agent_acl plugin refuses any",
        "# subscription but an agent's own acks, policy and commands (wildcards and $share included).",
        f"pattern write {own}/{topics.EVENTS}",
        f"pattern write {own}/{topics.HEARTBEAT}",
        f"pattern read {own}/{topics.ACKS}",
        f"pattern read {own}/{topics.POLICY}",
        f"pattern read {own}/{topics.COMMANDS}",
        "",
    ]
    return "\n".join(lines)


def render_controller_acl() -> str:
    """Return the ACL of the controllers' listener: the controller reaches every agent's topics."""
    lines = [
        "# sekisho MQTT ACL of the controllers' listener, which only certificates of the controller CA reach.",
        "# Anything not granted here is denied.",
        "",
        "# The controller reads events and heartbeats and writes acks, policy and commands of every agent.",
        f"user {CONTROLLER_CN}",
        f"topic readwrite {topics.ROOT}/#",
        "",
    ]
    return "\n".join(lines)


def render_sites_acl(sites: Mapping[str, Sequence[str]]) -> str:
    """Return the ACL of the central broker's sites listener: each site reaches its own agents' topics only.

    `sites` maps a site name to the agents behind its broker. A site's bridge may publish its agents'
    events and heartbeats and receive their acks, policy and commands; nothing of another site's agents.
    """
    lines = [
        "# sekisho MQTT ACL of the central broker's sites listener, which only certificates of the site bridge CA",
        "# reach (username and client id: the certificate's CN, site.NAME). Anything not granted here is denied.",
        "# Regenerate it (and the site's bridge) when an agent joins or leaves a site.",
        "",
    ]
    seen: dict[str, str] = {}
    for site, agents in sorted(sites.items()):
        check_site_name(site)
        lines.append(f"user {SiteCredentials.at(Path(), site).common_name}")
        for agent in sorted(agents):
            topics.check_agent_id(agent)
            # One agent behind two sites' bridges would let either speak for it: refuse the configuration.
            if agent in seen and seen[agent] != site:
                raise ValueError(f"agent {agent!r} is listed for sites {seen[agent]!r} and {site!r}")
            seen[agent] = site
            lines += [f"topic write {topics.topic(agent, channel)}" for channel, _qos in BRIDGE_OUT]
            lines += [f"topic read {topics.topic(agent, channel)}" for channel, _qos in BRIDGE_IN]
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class BridgeSpec:
    """A site broker's bridge to the central broker: where the centre is, who the site is, which agents."""

    site: str
    central_host: str
    central_port: int
    agents: tuple[str, ...]
    cert: Path
    key: Path
    cafile: Path
    # Reconnect backoff (mosquitto's decorrelated jitter between base and cap seconds).
    restart_base_s: int = 2
    restart_cap_s: int = 30
    keepalive_s: int = 15

    @classmethod
    def for_site(
        cls, pki_dir: Path, site: str, central_host: str, central_port: int, agents: Sequence[str]
    ) -> BridgeSpec:
        """Return the bridge of a site whose credentials `sekisho pki issue-site` wrote into the PKI."""
        creds = SiteCredentials.at(pki_dir, site)
        return cls(site, central_host, central_port, tuple(agents), creds.tls_cert, creds.tls_key, creds.ca_cert)


def render_bridge(spec: BridgeSpec) -> str:
    """Return the bridge section of a site broker's mosquitto.conf (it must come last: it opens a block)."""
    v = _config_value
    check_site_name(spec.site)
    name = SiteCredentials.at(Path(), spec.site).common_name
    lines = [
        f"# Bridge of site {spec.site} to the central broker's sites listener (mutual TLS, certificate CN {name}).",
        f"connection {v(name)}",
        f"address {v(spec.central_host)}:{int(spec.central_port)}",
        "bridge_protocol_version mqttv311",
        "# mosquitto-to-mosquitto bridge flag: the centre keeps the retain flag of the policies it forwards.",
        "try_private true",
        "# A persistent session on both ends: what is queued for the site while the link is down waits at the",
        "# centre, and what the agents sent meanwhile waits here, up to the queue limits (max_queued_*).",
        "cleansession false",
        "local_cleansession false",
        f"remote_clientid {v(name)}",
        f"local_clientid {v('local.' + name)}",
        "start_type automatic",
        f"restart_timeout {int(spec.restart_base_s)} {int(spec.restart_cap_s)}",
        f"keepalive_interval {int(spec.keepalive_s)}",
        "# The centre's ACL grants a site nothing under $SYS: no connection notifications there.",
        "notifications false",
        "bridge_attempt_unsubscribe false",
        f"bridge_max_packet_size {MAX_PACKET_BYTES}",
        f"bridge_cafile {v(spec.cafile)}",
        f"bridge_certfile {v(spec.cert)}",
        f"bridge_keyfile {v(spec.key)}",
        "bridge_insecure false",
        "bridge_require_ocsp false",
        "# One topic per agent and channel, no wildcard: the bridge asks the centre for its own agents' topics",
        "# only, which is all the centre's ACL lets it have.",
    ]
    for agent in spec.agents:
        topics.check_agent_id(agent)
        lines += [f"topic {topics.topic(agent, channel)} out {qos}" for channel, qos in BRIDGE_OUT]
        lines += [f"topic {topics.topic(agent, channel)} in {qos}" for channel, qos in BRIDGE_IN]
    lines.append("")
    return "\n".join(lines)


def _config_value(value: object) -> str:
    text = str(value)
    # One option per line: a newline in a path would let it smuggle in further options.
    if "\n" in text or "\r" in text:
        raise ValueError(f"configuration value contains a line break: {text!r}")
    return text


def render_config(
    *,
    port: int,
    controller_port: int,
    pki_dir: Path,
    state_dir: Path,
    agent_acl_path: Path,
    controller_acl_path: Path,
    plugin_path: Path,
    revocations_path: Path,
    bind: str = "127.0.0.1",
    controller_bind: str | None = None,
    log_path: Path | None = None,
    user: str | None = None,
    site_port: int | None = None,
    sites_acl_path: Path | None = None,
    bridge: BridgeSpec | None = None,
    max_inflight_messages: int | None = None,
    max_queued_messages: int | None = None,
    max_queued_bytes: int | None = None,
) -> str:
    """Return a mosquitto.conf: the agents' and the controllers' mutual-TLS listeners, each with its CA,
    identity rules and ACL, then persistence and throughput settings.

    `controller_bind` defaults to `bind`. `user` is the account mosquitto switches to when started as root
    (mosquitto's default is "mosquitto"; "root" keeps root). A central broker gets `site_port` and
    `sites_acl_path` (the sites listener); a site broker gets `bridge`, and then the bridge's window and
    queue limits unless the max_* arguments say otherwise.
    """
    pki = PkiPaths.at(pki_dir)
    log = log_path if log_path is not None else state_dir / LOG_NAME
    v = _config_value
    lines = [
        "# Generated by deploy.broker.render_config.",
        "",
        "# Each listener has its own CA, identity rules, ACL and plugin: who may connect where decides who",
        "# a client is. Persisted sessions find their listener again by its port after a restart, so the two",
        "# ports must stay the same (a session whose listener is gone gets no access at all).",
        "per_listener_settings true",
    ]
    if user is not None:
        lines += ["# Account the broker runs as once it has read this file (when started as root).", f"user {v(user)}"]
    tls = [
        f"certfile {v(pki.broker_cert)}",
        f"keyfile {v(pki.broker_key)}",
        "tls_version tlsv1.2",
        "require_certificate true",
    ]
    lines += [
        "",
        "# Agents: mutual TLS with a certificate from the site CA only. TLS 1.2 is the minimum; 1.3 is",
        "# preferred when both ends have it. The certificate's CN is the username the ACL matches and also",
        "# the client id, whatever the client asks for: an agent cannot take over another agent's",
        "# persistent session, nor a controller's (no agent name starts with 'controller').",
        f"listener {int(port)} {v(bind)}",
        f"cafile {v(pki.ca_cert)}",
        *tls,
        "# The plugin checks at every CONNECT that the username is the certificate's CN and that the",
        "# certificate is not revoked; with use_identity_as_username mosquitto would ask no plugin at CONNECT.",
        "use_identity_as_username false",
        "allow_anonymous false",
        "use_username_as_clientid true",
        f"acl_file {v(agent_acl_path)}",
        "# Subscriptions: an agent may subscribe to its own acks, policy and commands and nothing else (the",
        "# acl_file grants every SUBSCRIBE, so an agent could join the controllers' $share group and have",
        "# events assigned to it, then dropped). Revocations: the file the controller (or",
        "# `sekisho fleet revocations sync`) writes; re-read when it changes, at once on SIGHUP.",
        f"plugin {v(plugin_path)}",
        f"plugin_opt_topic_root {topics.ROOT}",
        f"plugin_opt_inbound {','.join(AGENT_INBOUND)}",
        f"plugin_opt_revocations {v(revocations_path)}",
        "",
        "# Controllers: mutual TLS with a certificate from the controller CA only, so no agent certificate",
        "# connects where the controllers' client ids (controller-1-ingest, ...) live.",
        f"listener {int(controller_port)} {v(controller_bind if controller_bind is not None else bind)}",
        f"cafile {v(pki.controller_ca_cert)}",
        *tls,
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {v(controller_acl_path)}",
        "",
    ]
    if site_port is not None:
        if sites_acl_path is None:
            raise ValueError("a sites listener needs its ACL")
        lines += [
            render_sites_listener(
                port=site_port, pki_dir=pki_dir, sites_acl_path=sites_acl_path, plugin_path=plugin_path, bind=bind
            )
        ]
    inflight = max_inflight_messages or (BRIDGE_INFLIGHT_MESSAGES if bridge is not None else MAX_INFLIGHT_MESSAGES)
    queued = max_queued_messages or (BRIDGE_QUEUED_MESSAGES if bridge is not None else MAX_QUEUED_MESSAGES)
    queued_bytes = max_queued_bytes or (BRIDGE_QUEUED_BYTES if bridge is not None else 0)
    lines += [
        "# Persistence: queued QoS 1 messages, retained policies and persistent sessions survive a",
        '# restart or a crash. "Every second" is in practice about every two (mosquitto compares whole',
        "# seconds), so a crash loses up to ~2 s of broker state (agents resend unacknowledged events).",
        "persistence true",
        f"persistence_location {v(state_dir)}/",
        f"persistence_file {DB_NAME}",
        "autosave_interval 1",
        "",
        "# Throughput: Nagle's algorithm adds ~40 ms per QoS 1 request/response hop.",
        "set_tcp_nodelay true",
        f"max_inflight_messages {int(inflight)}",
        *([f"max_inflight_bytes {BRIDGE_INFLIGHT_BYTES}"] if bridge is not None else []),
        f"max_queued_messages {int(queued)}",
        *([f"max_queued_bytes {int(queued_bytes)}"] if queued_bytes else []),
        f"max_packet_size {MAX_PACKET_BYTES}",
        "# Heartbeats are QoS 0 and only mean something live: never queue them for offline clients.",
        "queue_qos0_messages false",
        "",
        "log_dest file " + v(log),
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
    ]
    if bridge is not None:
        lines.append(render_bridge(bridge))
    return "\n".join(lines)


def render_sites_listener(
    *, port: int, pki_dir: Path, sites_acl_path: Path, plugin_path: Path, bind: str = "127.0.0.1"
) -> str:
    """Return the central broker's sites listener: the site bridge CA's certificates only, the sites ACL."""
    pki = PkiPaths.at(pki_dir)
    v = _config_value
    lines = [
        "# Sites: the bridges of site brokers, mutual TLS with a certificate of the site bridge CA only (no",
        "# agent or controller certificate gets in). The CN (site.NAME) is the username and the client id;",
        "# the ACL lets a site publish and receive its own agents' topics only. Site brokers reach it over",
        "# the network, as agents reach theirs: it binds where the agents' listener does.",
        f"listener {int(port)} {v(bind)}",
        f"cafile {v(CaPaths.at(pki.directory / SITE_CA_DIR).cert)}",
        f"certfile {v(pki.broker_cert)}",
        f"keyfile {v(pki.broker_key)}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"acl_file {v(sites_acl_path)}",
        "# The acl_file grants every SUBSCRIBE (it checks read rules only at delivery): a site certificate could",
        "# join the controllers' $share group and take a share of every site's events. The plugin in sites mode",
        "# refuses $ topics and wildcard filters; a bridge subscribes to its agents' exact topics only.",
        f"plugin {v(plugin_path)}",
        "plugin_opt_mode sites",
        "",
    ]
    return "\n".join(lines)


def render_bridge_limits() -> str:
    """Return a site broker's window and queue limits (they replace the central values in its mosquitto.conf)."""
    lines = [
        "# A site broker's limits, in place of the central values: the bridge's window paces a backlog through",
        "# the centre's PUBACKs, and its queue is bounded while the centre is unreachable (agents resend).",
        f"max_inflight_messages {BRIDGE_INFLIGHT_MESSAGES}",
        f"max_inflight_bytes {BRIDGE_INFLIGHT_BYTES}",
        f"max_queued_messages {BRIDGE_QUEUED_MESSAGES}",
        f"max_queued_bytes {BRIDGE_QUEUED_BYTES}",
        "",
    ]
    return "\n".join(lines)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on the host right now (another process may still take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str:
    """Return the mosquitto executable: $SEKISHO_MOSQUITTO, then PATH, then the usual sbin folders."""
    configured = os.environ.get("SEKISHO_MOSQUITTO")
    if configured:
        return configured
    # Debian installs mosquitto in /usr/sbin, which is not on an unprivileged user's PATH.
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        raise BrokerError("mosquitto not found: install it (Debian: mosquitto) or set SEKISHO_MOSQUITTO")
    return found


def _service_user() -> str | None:
    # Started as root, mosquitto opens its certificates, ACL, log and database only after switching to
    # the "mosquitto" account, which cannot enter private 0700 directories (the PKI, pytest's temporary
    # directories). A broker for demos and tests keeps root instead; it listens on loopback and its
    # files stay private. Production uses the packaged service, which drops privileges as usual.
    return "root" if os.geteuid() == 0 else None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sekisho"


def agent_acl_plugin(cache_dir: Path | None = None) -> Path:
    """Return the compiled sekisho_agent_acl plugin: $SEKISHO_MOSQUITTO_PLUGIN, else built once from source.

    The build (a C compiler and mosquitto's plugin headers: Debian gcc, mosquitto-dev, libmosquitto-dev) is
    kept in the cache directory under the hash of the source and flags, so it happens once per change.
    """
    configured = os.environ.get("SEKISHO_MOSQUITTO_PLUGIN")
    if configured:
        return Path(configured)
    try:
        source = PLUGIN_SOURCE.read_bytes()
    except OSError as err:
        raise BrokerError(f"plugin source {PLUGIN_SOURCE} missing: set SEKISHO_MOSQUITTO_PLUGIN") from err
    digest = hashlib.sha256(source + "\0".join(PLUGIN_CFLAGS).encode()).hexdigest()[:16]
    directory = cache_dir if cache_dir is not None else _cache_dir()
    target = directory / f"{PLUGIN_NAME}-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise BrokerError("no C compiler to build the mosquitto plugin: install gcc (or set SEKISHO_MOSQUITTO_PLUGIN)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Built beside the target and renamed over it, so concurrent builds never load a half-written file.
    partial = directory / f".{target.name}.{os.getpid()}.tmp"
    built = subprocess.run(
        [compiler, *PLUGIN_CFLAGS, "-o", str(partial), str(PLUGIN_SOURCE)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BrokerError(
            "building the mosquitto plugin failed (Debian: apt-get install gcc mosquitto-dev libmosquitto-dev):\n"
            + built.stderr[-2000:]
        )
    partial.chmod(0o755)
    os.replace(partial, target)
    return target


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    # Safety net at interpreter exit or garbage collection: never leave a broker behind.
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Broker:
    """One mosquitto process for demos, tests and benchmarks, with its state kept in `state_dir`."""

    def __init__(
        self,
        pki_dir: Path,
        state_dir: Path,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        bind: str = "127.0.0.1",
        sites: Mapping[str, Sequence[str]] | None = None,
        site_port: int | None = None,
        bridge: BridgeSpec | None = None,
        max_queued_messages: int | None = None,
    ) -> None:
        self.pki_dir = Path(pki_dir)
        self.state_dir = Path(state_dir)
        self.bind = bind
        self._port = port
        self._controller_port = controller_port
        # A central broker: the sites listener and its ACL (site name → the agents behind its bridge).
        self.sites = {name: tuple(agents) for name, agents in sites.items()} if sites is not None else None
        self._site_port = site_port
        # A site broker: its bridge to the centre (rendered at the end of its configuration).
        self.bridge = bridge
        self.max_queued_messages = max_queued_messages
        # A port we picked may be taken by someone else before mosquitto binds it; then we pick again,
        # but only before the first successful start, so the ports stay the same across restarts.
        self._may_repick = (port is None, controller_port is None, site_port is None)
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Broker] | None = None

    @property
    def port(self) -> int:
        """The TCP port of the agents' listener (fixed once chosen)."""
        if self._port is None:
            self._port = find_free_port(self.connect_host)
        return self._port

    @property
    def controller_port(self) -> int:
        """The TCP port of the controllers' listener (fixed once chosen)."""
        while self._controller_port is None:
            candidate = find_free_port(self.connect_host)
            if candidate != self.port:
                self._controller_port = candidate
        return self._controller_port

    @property
    def site_port(self) -> int:
        """The TCP port of the sites listener of a central broker (fixed once chosen)."""
        if self.sites is None:
            raise BrokerError("this broker has no sites listener")
        while self._site_port is None:
            candidate = find_free_port(self.connect_host)
            if candidate not in (self.port, self.controller_port):
                self._site_port = candidate
        return self._site_port

    @property
    def sites_acl_path(self) -> Path:
        """The rendered ACL of the sites listener."""
        return self.state_dir / SITES_ACL_NAME

    @property
    def connect_host(self) -> str:
        """The address clients on this machine should connect to."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.bind, self.bind)  # noqa: S104

    @property
    def config_path(self) -> Path:
        """The rendered mosquitto.conf."""
        return self.state_dir / CONFIG_NAME

    @property
    def agent_acl_path(self) -> Path:
        """The rendered ACL of the agents' listener."""
        return self.state_dir / AGENT_ACL_NAME

    @property
    def controller_acl_path(self) -> Path:
        """The rendered ACL of the controllers' listener."""
        return self.state_dir / CONTROLLER_ACL_NAME

    @property
    def revocations_path(self) -> Path:
        """The revocation list the agents' listener enforces (an empty one is written if there is none)."""
        return self.state_dir / REVOCATIONS_NAME

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return self.state_dir / LOG_NAME

    @property
    def db_path(self) -> Path:
        """The persistence database."""
        return self.state_dir / DB_NAME

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        """Return whether the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        """Write mosquitto.conf and both ACLs into the state directory (building the plugin if needed)."""
        pki = PkiPaths.at(self.pki_dir)
        if not pki.controller_ca_cert.exists():
            raise BrokerError(f"{self.pki_dir} has no controller CA: run `sekisho pki upgrade --dir {self.pki_dir}`")
        if self.sites is not None and not CaPaths.at(self.pki_dir / SITE_CA_DIR).cert.exists():
            raise BrokerError(
                f"{self.pki_dir} has no site bridge CA: run `sekisho pki issue-site NAME --dir {self.pki_dir}`"
            )
        plugin = agent_acl_plugin()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.agent_acl_path.write_text(render_agent_acl())
        self.controller_acl_path.write_text(render_controller_acl())
        if self.sites is not None:
            self.sites_acl_path.write_text(render_sites_acl(self.sites))
        if not self.revocations_path.exists():
            # A new site has revoked nobody. Without any list the plugin refuses every agent (fail closed).
            self.revocations_path.write_text(RevocationList().broker_text())
        self.config_path.write_text(
            render_config(
                port=self.port,
                controller_port=self.controller_port,
                pki_dir=self.pki_dir.resolve(),
                state_dir=self.state_dir.resolve(),
                agent_acl_path=self.agent_acl_path.resolve(),
                controller_acl_path=self.controller_acl_path.resolve(),
                plugin_path=plugin.resolve(),
                revocations_path=self.revocations_path.resolve(),
                bind=self.bind,
                log_path=self.log_path.resolve(),
                user=_service_user(),
                site_port=self.site_port if self.sites is not None else None,
                sites_acl_path=self.sites_acl_path.resolve() if self.sites is not None else None,
                bridge=self.bridge,
                max_queued_messages=self.max_queued_messages,
            )
        )

    def start(self, timeout: float = 10) -> None:
        """Start mosquitto and wait until it completes a TLS handshake; raise BrokerError otherwise."""
        if self.is_running():
            raise BrokerError("broker already running")
        attempts = 3
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                self._may_repick = (False, False, False)
                return
            except BrokerError as err:
                # The port in use may be one we were given: then the last attempt's error says so.
                if not (any(self._may_repick) and "Address already in use" in str(err)) or attempt == attempts - 1:
                    raise
                if self._may_repick[0]:
                    self._port = None
                if self._may_repick[1]:
                    self._controller_port = None
                if self._may_repick[2]:
                    self._site_port = None

    def _start_once(self, timeout: float) -> None:
        self.write_config()
        executable = find_mosquitto()
        probe = self._probe_context()
        log_mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        stderr_path = self.state_dir / STDERR_NAME
        with stderr_path.open("wb") as stderr:
            # Errors before the log file is open (a bad configuration) only reach stderr.
            self._proc = subprocess.Popen(
                [executable, "-c", str(self.config_path.resolve())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc)
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                self._proc.wait()
                raise BrokerError(f"mosquitto exited with {self._proc.returncode}:\n{self._diagnostics(log_mark)}")
            # Another process may already listen on a port and answer the probe: only our own broker's
            # "running" line (logged once both listeners are bound) makes the probe meaningful. The probe
            # uses the controllers' listener, the one whose certificate this broker's PKI holds.
            if self._logged_running(log_mark) and self._handshake(probe) and self.is_running():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto not ready after {timeout}s:\n{self._diagnostics(log_mark)}")
            time.sleep(0.05)

    def _logged_running(self, log_mark: int) -> bool:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(log_mark)
                return any(line.endswith(b" running") for line in fh.read().splitlines())
        except OSError:
            return False

    def _diagnostics(self, log_mark: int) -> str:
        log = ""
        with contextlib.suppress(OSError), self.log_path.open("rb") as fh:
            fh.seek(log_mark)
            log = "\n".join(fh.read().decode(errors="replace").splitlines()[-30:])
        return "\n".join(part for part in (_tail(self.state_dir / STDERR_NAME), log) if part)

    def _probe_context(self) -> ssl.SSLContext:
        # The controller's certificate: the PKI always has it, while it may have no agent yet.
        pki = PkiPaths.at(self.pki_dir)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.controller_cert), str(pki.controller_key))
        return ctx

    def _handshake(self, ctx: ssl.SSLContext) -> bool:
        # A full mutual-TLS handshake proves the listener is up and the certificates were loaded;
        # merely accepting TCP connections does not.
        try:
            with (
                socket.create_connection((self.connect_host, self.controller_port), timeout=1) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                # TLS 1.3 finishes the client side before the server has checked our certificate;
                # a short read surfaces a rejection as an error instead of a false success.
                tls.settimeout(0.1)
                with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                    if tls.recv(1) == b"":
                        return False
                # A clean TLS close keeps OpenSSL "unexpected eof" errors out of the broker log.
                with contextlib.suppress(OSError, ssl.SSLError):
                    tls.unwrap()
                return True
        except (OSError, ssl.SSLError):
            return False

    def stop(self, timeout: float = 10) -> None:
        """Stop the broker with SIGTERM (it saves its database), escalating to SIGKILL after timeout."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._forget()

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash would (only what autosave wrote survives)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self._forget()

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None

    def reload(self) -> None:
        """Send SIGHUP: mosquitto re-reads its configuration, and the plugin its revocation list at once."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise BrokerError("broker not running")
        proc.send_signal(signal.SIGHUP)

    def restart(self, timeout: float = 10) -> None:
        """Stop the broker gracefully and start it again on the same ports."""
        self.stop()
        self.start(timeout)

    def wait_saved(self, since: float | None = None, timeout: float = 5) -> None:
        """Wait until the database has been written after `since` (time.time(), default now)."""
        mark = time.time() if since is None else since
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                # mosquitto writes a new file and renames it over the old one, so the mtime is the end
                # of a complete save; the save and message handling share one thread, so a save that
                # ends after `mark` contains every message acknowledged before `mark`.
                if self.db_path.stat().st_mtime > mark:
                    return
            time.sleep(0.05)
        raise BrokerError(f"persistence database not written within {timeout}s")

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
