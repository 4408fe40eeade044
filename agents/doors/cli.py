"""`sekisho-agent doors`: run a door agent (readers and lock board from doors.toml beside agent.toml)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

doors_app = typer.Typer(help="Door agent: lockers, key cabinets and room doors.", no_args_is_help=True)


@doors_app.command("doors")
def doors_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="agent TOML file (doors.toml beside it)")],
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Run this box's door agent until SIGINT/SIGTERM: readers, lock board, decisions, events, commands."""
    from agents.doors.run import DoorsSetupError, run_doors
    from agents.runtime.agent import Agent
    from agents.runtime.config import load_config
    from agents.runtime.errors import AgentError

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr)
    try:
        agent = Agent(load_config(config))
    except AgentError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(getattr(err, "exit_code", 2)) from err
    try:
        run_doors(agent, config)
    except DoorsSetupError as err:
        agent.stop()
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
