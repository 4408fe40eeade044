"""`sekisho-agent doors`: run a door agent (readers and lock board from doors.toml beside agent.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sekisho.common.i18n import _

doors_app = typer.Typer(help=_("Door agent: lockers, key cabinets and room doors."), no_args_is_help=True)


@doors_app.command(
    "doors", help=_("Run this box's door agent until SIGINT/SIGTERM: readers, lock board, decisions, events, commands.")
)
def doors_command(
    config: Annotated[Path, typer.Option("--config", "-c", help=_("agent TOML file (doors.toml beside it)"))],
    log_level: Annotated[str, typer.Option("--log-level", help=_("DEBUG, INFO, WARNING or ERROR"))] = "INFO",
    log_format: Annotated[
        str | None, typer.Option("--log-format", help=_("text, json or journald; default: log_format in the config"))
    ] = None,
) -> None:
    """Run this box's door agent until SIGINT/SIGTERM: readers, lock board, decisions, events, commands."""
    from sekisho.agents.doors.run import DoorsSetupError, run_doors
    from sekisho.agents.runtime.agent import Agent
    from sekisho.agents.runtime.cli import setup_agent_logging
    from sekisho.agents.runtime.config import load_config
    from sekisho.agents.runtime.errors import AgentError

    setup_agent_logging(log_level, log_format, config)
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


@doors_app.command(
    "doors-keyset",
    help=_("Give a new OSDP reader its own Secure Channel key (stop the door agent first: the line is exclusive)."),
)
def doors_keyset_command(
    config: Annotated[Path, typer.Option("--config", "-c", help=_("agent TOML file (doors.toml beside it)"))],
    reader: Annotated[str, typer.Option("--reader", "-r", help=_("reader id in doors.toml (install_mode = true)"))],
) -> None:
    """Give a new OSDP reader its own Secure Channel key (stop the door agent first: the line is exclusive)."""
    from sekisho.agents.doors.keys import install_reader_key
    from sekisho.agents.doors.run import DoorsSetupError, load_doors_settings
    from sekisho.drivers.osdp import OsdpError, OsdpReaderLink, ReaderConfig

    try:
        settings, base = load_doors_settings(config)
    except DoorsSetupError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    found = [(line, r) for line in settings.osdp for r in line.readers if r.reader_id == reader]
    if not found:
        typer.echo(f"error: no OSDP reader {reader!r} in doors.toml", err=True)
        raise typer.Exit(2)
    line, entry = found[0]
    if entry.scbk_file is None:
        typer.echo(f"error: reader {reader!r} has no scbk_file to keep its key in", err=True)
        raise typer.Exit(2)
    key_file = entry.scbk_file if entry.scbk_file.is_absolute() else base / entry.scbk_file
    link = OsdpReaderLink(
        line.device,
        [ReaderConfig(reader_id=reader, address=entry.address, install_mode=True)],
        baud_rate=line.baud_rate,
    )
    try:
        link.start()
        install_reader_key(link, reader, key_file)
    except OsdpError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    finally:
        link.stop()
    typer.echo(f"reader {reader}: keyed; key saved to {key_file}. Set install_mode = false in doors.toml.")
