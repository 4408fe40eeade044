"""`sekisho agent …`: run an agent, drive it with synthetic load, or look at its state."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.agents.runtime.errors import AgentError, ConfigError
from sekisho.agents.runtime.outbox import Outbox
from sekisho.agents.runtime.policy_cache import PolicyCache
from sekisho.agents.runtime.receipts import RECEIPTS_FILE
from sekisho.agents.runtime.receipts import describe as describe_receipts
from sekisho.common.i18n import _
from sekisho.common.logs import setup_logging
from sekisho.protocol import signing

app = typer.Typer(help=_("Endpoint agent: durable outbox, MQTT link, policy cache, commands."), no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("agent TOML file"))]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help=_("DEBUG, INFO, WARNING or ERROR"))]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format", help=_("text, json (one object a line) or journald; default: the config's log_format")
    ),
]

# How many events one transaction carries when `simulate` produces as fast as it can.
_BULK = 500
# With --rate, events due within one slice are written in one transaction: it models many producers.
_SLICE_S = 0.01


def setup_agent_logging(level: str, log_format: str | None, config_path: Path | None = None) -> None:
    """Set up logging from --log-level and --log-format, else the config's log_format (text if unreadable)."""
    chosen = log_format
    if chosen is None and config_path is not None:
        try:
            chosen = load_config(config_path, check_files=False).log_format
        except ConfigError:
            chosen = None  # the command reports the bad config itself, in text
    try:
        setup_logging(level, chosen or "text", identifier="sekisho-agent", stream=sys.stderr)
    except ValueError as err:
        typer.echo(f"error: --log-format: {err}", err=True)
        raise typer.Exit(2) from err


def _setup_logging(level: str, log_format: str | None = None, config_path: Path | None = None) -> None:
    setup_agent_logging(level, log_format, config_path)


def _fail(err: AgentError) -> typer.Exit:
    # Plain text: a supervisor's log should get the whole message on one line, unwrapped.
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(err.exit_code)


def _open_agent(config_path: Path) -> Agent:
    try:
        return Agent(load_config(config_path))
    except AgentError as err:
        raise _fail(err) from err


@app.command(help=_("Run the agent until SIGINT or SIGTERM."))
def run(config: ConfigOpt, log_level: LogLevelOpt = "INFO", log_format: LogFormatOpt = None) -> None:
    """Run the agent until SIGINT or SIGTERM."""
    _setup_logging(log_level, log_format, config)
    agent = _open_agent(config)
    try:
        agent.run_forever()
    except AgentError as err:
        raise _fail(err) from err


def _emit_synthetic(agent: Agent, count: int, rate: float | None, note: str, stop: threading.Event) -> int:
    emitted = 0
    started = time.monotonic()
    while emitted < count and not stop.is_set():
        if rate:
            due = min(count, int((time.monotonic() - started) * rate) + 1)
            if due <= emitted:
                time.sleep(_SLICE_S)
                continue
            batch = due - emitted
        else:
            batch = min(_BULK, count - emitted)
        agent.emit_many([("test.synthetic", {"n": emitted + i, "note": note}) for i in range(batch)])
        emitted += batch
    return emitted


@app.command(help=_("Run the agent and emit COUNT synthetic events; print a JSON summary line on stdout at the end."))
def simulate(
    config: ConfigOpt,
    count: Annotated[int, typer.Option(min=0, help=_("number of test.synthetic events"))] = 1000,
    rate: Annotated[float | None, typer.Option(min=0.001, help=_("events per second (default: flat out)"))] = None,
    note_bytes: Annotated[int, typer.Option(min=0, max=4096, help=_("filler bytes per event"))] = 0,
    exit_when_drained: Annotated[
        bool, typer.Option(help=_("exit 0 once the controller acknowledged everything"))
    ] = False,
    timeout: Annotated[float | None, typer.Option(min=0.1, help=_("give up (exit 1) after this many seconds"))] = None,
    log_level: LogLevelOpt = "WARNING",
    log_format: LogFormatOpt = None,
) -> None:
    """Run the agent and emit COUNT synthetic events; print a JSON summary line on stdout at the end."""
    _setup_logging(log_level, log_format, config)
    agent = _open_agent(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    deadline = None if timeout is None else time.monotonic() + timeout
    started = time.monotonic()
    drained = False
    try:
        agent.start()
        emitted = _emit_synthetic(agent, count, rate, "x" * note_bytes, stop)
        emitted_at = time.monotonic()
        while not stop.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if exit_when_drained:
                if agent.wait_drained(min(left, 0.5) if left is not None else 0.5):
                    drained = True
                    break
            else:
                stop.wait(min(left, 1.0) if left is not None else 1.0)
        stats = agent.stats()
    except AgentError as err:
        raise _fail(err) from err
    finally:
        agent.stop()
    summary = {
        "agent": agent.config.agent_id,
        "emitted": emitted,
        "emit_s": round(emitted_at - started, 3),
        "total_s": round(time.monotonic() - started, 3),
        "drained": drained,
        "published": stats.published,
        "resent": stats.resent,
        "acked": stats.acked,
        "forged_acks": stats.forged_acks,
        "outbox_depth": stats.outbox_depth,
    }
    typer.echo(json.dumps(summary))
    if exit_when_drained and not drained:
        raise typer.Exit(1)


@app.command(help=_("Show outbox depth, next sequence number and the cached policy."))
def status(config: ConfigOpt) -> None:
    """Show outbox depth, next sequence number and the cached policy."""
    try:
        cfg = load_config(config)
        outbox = Outbox.inspect(cfg.outbox_path) if cfg.outbox_path.exists() else None
        try:
            controller_key = signing.load_public_key(cfg.controller_public_key)
        except ValueError as err:
            raise ConfigError(f"controller_public_key {cfg.controller_public_key} is not an Ed25519 key") from err
        policy = PolicyCache(cfg.state_dir, controller_key, cfg.agent_id)
    except AgentError as err:
        raise _fail(err) from err
    table = Table(title=f"agent {cfg.agent_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("broker", f"{cfg.broker_host}:{cfg.broker_port}")
    table.add_row("state dir", str(cfg.state_dir))
    if outbox is None:
        table.add_row("outbox", "not created yet")
    else:
        table.add_row("outbox depth", str(outbox.depth))
        table.add_row("next seq", str(outbox.next_seq))
        age = "-" if outbox.oldest_created_at is None else f"{max(0, time.time() - outbox.oldest_created_at):.0f} s"
        table.add_row("oldest unacked", age)
    table.add_row("policy state", policy.state())
    table.add_row("policy version", "-" if policy.version is None else str(policy.version))
    current = policy.current()
    if current is not None:
        table.add_row("policy expires", current.bundle.expires_at)
    if policy.load_error is not None:
        table.add_row("policy cache error", f"{policy.load_error.reason}: {policy.load_error.detail}")
    # The controller's signed receipts an auditor collects for `sekisho records verify --receipts`.
    table.add_row("receipts", describe_receipts(cfg.state_dir / RECEIPTS_FILE))
    Console().print(table)
