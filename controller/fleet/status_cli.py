"""`sekisho fleet status`: every agent's state and health, as a table or as JSON."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sekisho.common.i18n import _
from sekisho.controller.fleet.health import (
    STATES,
    AgentHealth,
    Thresholds,
    count_states,
    fingerprint_text,
    fleet_health,
)
from sekisho.protocol import errors, timefmt

_STYLE = {"online": "green", "stale": "yellow", "offline": "red", "revoked": "dim"}
# Days of certificate life left below which the table shows the expiry in red.
CERT_WARN_DAYS = 7.0


def _parse_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return timefmt.parse(text, "--at")
    except errors.Rejected as err:
        raise typer.BadParameter("ISO 8601 UTC ending in Z, e.g. 2025-01-31T09:00:00Z", param_hint="--at") from err


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _policy(agent: AgentHealth) -> str:
    applied = "-" if agent.policy_version is None else str(agent.policy_version)
    if agent.current_policy_version is None:
        return applied
    mark = "" if agent.policy_current else " [yellow]≠[/yellow]"
    return f"{applied}/{agent.current_policy_version}{mark}"


def _cert(agent: AgentHealth) -> str:
    if agent.cert_days_left is None:
        return "-"
    text = f"{agent.cert_days_left:.0f} d"
    return f"[red]{text}[/red]" if agent.cert_days_left < CERT_WARN_DAYS else text


def render_table(agents: list[AgentHealth], console: Console) -> None:
    """Print the fleet as a Rich table with a one-line count per state underneath."""
    table = Table(title=_("Fleet status"))
    table.add_column("agent", no_wrap=True)
    for header in (
        "kind",
        _("state"),
        "last seen",
        "version",
        "outbox",
        "skew",
        "policy",
        "cert",
        "last error",
        "fingerprints",
    ):
        table.add_column(header)
    for a in agents:
        error = f"{a.last_error.code} ({timefmt.fmt(a.last_error.at)[:19]}Z)" if a.last_error else "-"
        table.add_row(
            a.id,
            a.kind or "-",
            f"[{_STYLE[a.state]}]{a.state}[/{_STYLE[a.state]}]",
            _age(a.last_seen_age_s),
            a.version or "-",
            "-" if a.outbox_depth is None else str(a.outbox_depth),
            "-" if a.clock_offset_ms is None else f"{a.clock_offset_ms} ms",
            _policy(a),
            _cert(a),
            error,
            fingerprint_text(a.fingerprints),
        )
    console.print(table)
    counts = count_states(agents)
    console.print("  ".join(f"{state}: {counts[state]}" for state in STATES))


def status(
    config: Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help=_("one JSON document on stdout instead of a table"))] = False,
    state: Annotated[
        str | None, typer.Option("--state", help=_("only agents in this state: online, stale, offline or revoked"))
    ] = None,
    at: Annotated[str | None, typer.Option("--at", help=_("judge the states at this UTC time (default: now)"))] = None,
) -> None:
    """Show each agent's state (online/stale/offline/revoked) and last reported health."""
    from sekisho.controller.cli import cli_config
    from sekisho.controller.service import open_store

    if state is not None and state not in STATES:
        raise typer.BadParameter(f"one of {', '.join(STATES)}", param_hint="--state")
    moment = _parse_at(at) or timefmt.now()
    cfg = cli_config(config)
    store = open_store(cfg)
    try:
        agents = fleet_health(store, Thresholds.from_config(cfg), moment)
    finally:
        store.engine.dispose()
    if state is not None:
        agents = [a for a in agents if a.state == state]
    if as_json:
        doc = {
            "at": timefmt.fmt(moment),
            "counts": count_states(agents),
            "agents": [a.model_dump(mode="json") for a in agents],
        }
        typer.echo(json.dumps(doc, ensure_ascii=False, indent=2))
        return
    # Piped or redirected output (a log, a ticket) gets the whole table instead of 80 cut columns.
    render_table(agents, Console() if sys.stdout.isatty() else Console(width=240))
