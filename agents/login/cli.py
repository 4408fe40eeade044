"""`sekisho-agent pam-auth`: the pam_exec entry point (the lead mounts ``pam_app`` into the agent CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sekisho.agents.login.pam import pam_auth

pam_app = typer.Typer(help="Terminal login guard: the PAM entry point.", no_args_is_help=True)


@pam_app.callback()
def _group() -> None:
    """Terminal login guard: the PAM entry point."""
    # An explicit callback keeps `pam-auth` a subcommand even while it is the only one.


@pam_app.command("terminal")
def terminal_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="agent TOML file (login.toml beside it)")],
    terminal: Annotated[str, typer.Option("--terminal", "-t", help="terminal id in the site policy")],
    usb: Annotated[bool, typer.Option("--usb/--no-usb", help="also run the USB media guard")] = True,
    usb_rules: Annotated[Path | None, typer.Option("--usb-rules", help="admin USB rules (USBGuard syntax)")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Run this terminal's agent: events, policy, card-removal lock of open sessions, USB media guard."""
    import logging
    import sys

    from sekisho.agents.login.run import run_terminal
    from sekisho.agents.runtime.agent import Agent
    from sekisho.agents.runtime.config import load_config
    from sekisho.agents.runtime.errors import AgentError
    from sekisho.agents.usb.rules import read_rules_text
    from sekisho.agents.usb.run import UsbGuardConfig

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr)
    try:
        agent = Agent(load_config(config))
        rules = read_rules_text(usb_rules.read_bytes()) if usb_rules else None
    except (OSError, AgentError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(getattr(err, "exit_code", 2)) from err
    guard = UsbGuardConfig(terminal_id=terminal, rules_text=rules) if usb else None
    run_terminal(agent, config, terminal, usb=guard)


@pam_app.command("pam-auth")
def pam_auth_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="agent TOML file (login.toml beside it)")],
    terminal: Annotated[str, typer.Option("--terminal", "-t", help="terminal id in the site policy")],
) -> None:
    """Decide one login for pam_exec from PAM_USER/PAM_TYPE; exit 0 grants, 1 refuses."""
    raise typer.Exit(pam_auth(config, terminal))
