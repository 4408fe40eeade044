"""A complete local site on this machine: PKI, broker, controller and agent configs, process control.

The demo, the benchmarks and the integration tests all build their world with this, so the three
exercise the same set-up an administrator would do by hand (docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sekisho.deploy.broker import Broker, find_free_port
from sekisho.deploy.pki import AgentCredentials, PkiPaths, init_pki, issue_agent, upgrade_pki


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _toml_lines(values: dict[str, object], section: str = "") -> list[str]:
    scalars = [f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None and not isinstance(v, dict)]
    lines = ([f"[{section}]\n"] if section and scalars else []) + scalars
    for key, value in values.items():
        if isinstance(value, dict):
            # Keys are the configs' own names (no dots or quotes to escape); a table's tables follow it.
            lines += _toml_lines(value, f"{section}.{key}" if section else key)
    return lines


def write_toml(path: Path, values: dict[str, object]) -> Path:
    """Write a TOML file: scalars and lists first, then a dict value as a table (``[alerts]``, ``[alerts.smtp]``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_toml_lines(values)))
    return path


@dataclass
class Lab:
    """A site rooted in one directory: `pki/`, `broker/`, `controller/`, `agents/NAME/`."""

    root: Path
    database_url: str | None = None
    http_port: int | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.pki_dir = self.root / "pki"
        if not (self.pki_dir / "ca.crt").exists():
            init_pki(self.pki_dir)
        else:
            # A site made before the controller CA existed is upgraded as an administrator would.
            upgrade_pki(self.pki_dir)
        self.pki = PkiPaths.at(self.pki_dir)
        self.broker = Broker(
            self.pki_dir,
            self.root / "broker",
            port=self._saved_port("port"),
            controller_port=self._saved_port("controller-port"),
        )
        self.controller_config = self.root / "controller" / "controller.toml"

    def _saved_port(self, name: str) -> int | None:
        saved = self.root / "broker" / name
        return int(saved.read_text()) if saved.exists() else None

    def start_broker(self) -> None:
        """Start the broker and remember its ports, so a restarted lab reuses them."""
        self.broker.start()
        (self.root / "broker" / "port").write_text(str(self.broker.port))
        (self.root / "broker" / "controller-port").write_text(str(self.broker.controller_port))

    def write_controller_config(self, **overrides: object) -> Path:
        """Write controller.toml for this lab (dev profile: no API tokens needed on loopback)."""
        if self.http_port is None:
            self.http_port = find_free_port()
        values: dict[str, object] = {
            "profile": "dev",
            "var_dir": str(self.root / "controller"),
            "database_url": self.database_url,
            "broker_host": "127.0.0.1",
            # The controllers' listener: it trusts only the controller CA (deploy/broker.py).
            "broker_port": self.broker.controller_port,
            "ca_cert": str(self.pki.ca_cert),
            "tls_cert": str(self.pki.controller_cert),
            "tls_key": str(self.pki.controller_key),
            "signing_key": str(self.pki.controller_signing_key),
            "http_port": self.http_port,
            # The broker runs here: the controller writes the list its plugin enforces.
            "revocation_list": str(self.broker.revocations_path),
        }
        values.update(overrides)
        return write_toml(self.controller_config, values)

    def add_agent(self, name: str, **overrides: object) -> Path:
        """Issue an agent's credentials (once) and write its agent.toml; return the config path."""
        creds = AgentCredentials.at(self.pki_dir, name)
        if not creds.tls_cert.exists():
            issue_agent(self.pki_dir, name)
        values: dict[str, object] = {
            "agent_id": name,
            "broker_host": "127.0.0.1",
            "broker_port": self.broker.port,
            "ca_cert": str(creds.ca_cert),
            "tls_cert": str(creds.tls_cert),
            "tls_key": str(creds.tls_key),
            "signing_key": str(creds.signing_key),
            "controller_public_key": str(creds.controller_signing_pub),
            "state_dir": str(self.root / "agents" / name / "state"),
        }
        values.update(overrides)
        return write_toml(self.root / "agents" / name / "agent.toml", values)

    def agent_config(self, name: str) -> Path:
        """Path of an agent's config."""
        return self.root / "agents" / name / "agent.toml"

    def sekisho(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a `sekisho` command to completion (as an administrator would)."""
        return subprocess.run(
            [sys.executable, "-m", "sekisho", *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register_agents(self, *names: str) -> None:
        """Register agents' signing keys with the controller."""
        for name in names:
            creds = AgentCredentials.at(self.pki_dir, name)
            self.sekisho(
                "controller",
                "register-agent",
                name,
                "--public-key",
                str(creds.signing_pub),
                "--config",
                str(self.controller_config),
                "--replace",
            )

    def spawn(
        self, *args: str, log_name: str, env: dict[str, str] | None = None, module: str = "sekisho"
    ) -> subprocess.Popen[bytes]:
        """Start a long-running `python -m MODULE ARGS` (default: sekisho) in the background, logging to logs/."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{log_name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Everything a lab starts is in lab mode: simulated backends are allowed (agents/runtime/lab_mode.py).
                env={**os.environ, "SEKISHO_LAB": "1", **(env or {})},
            )
        self.processes.append(proc)
        return proc

    def spawn_controller(
        self, *, http: bool = False, worker_id: str = "controller-1", http_port: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `controller serve` (with HTTP) or `controller ingest` (worker only) as one named worker.

        ``http_port`` overrides the config's for this process (several web processes on one host).
        """
        args = ["controller", "serve" if http else "ingest", "--config", str(self.controller_config)]
        env = {"SEKISHO_CONTROLLER_WORKER_ID": worker_id}
        if http_port is not None:
            env["SEKISHO_CONTROLLER_HTTP_PORT"] = str(http_port)
        return self.spawn(*args, log_name=worker_id, env=env)

    def stop_all(self, timeout: float = 15) -> None:
        """Stop every process this lab started (SIGTERM, then SIGKILL), then the broker."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.broker.is_running():
            self.broker.stop()
