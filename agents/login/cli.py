"""`sekisho-agent terminal` and `pam-auth` (the lead mounts ``pam_app`` into the agent CLI).

`sekisho-agent pam-auth` is dispatched to the lean client before typer is imported (sekisho/entry.py,
agents/login/__main__.py); the typer command below lists it in the help and runs the same client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sekisho.agents.login.pam_client import DEFAULT_SOCKET
from sekisho.common.i18n import _

pam_app = typer.Typer(help=_("Terminal login guard: the PAM entry point."), no_args_is_help=True)


@pam_app.command(
    "terminal", help=_("Run this terminal's agent: events, policy, PAM decisions, card-removal lock, USB media guard.")
)
def terminal_command(
    config: Annotated[Path, typer.Option("--config", "-c", help=_("agent TOML file (login.toml beside it)"))],
    terminal: Annotated[str, typer.Option("--terminal", "-t", help=_("terminal id in the site policy"))],
    usb: Annotated[bool, typer.Option("--usb/--no-usb", help=_("also run the USB media guard"))] = True,
    usb_rules: Annotated[Path | None, typer.Option("--usb-rules", help=_("admin USB rules (USBGuard syntax)"))] = None,
    log_level: Annotated[str, typer.Option("--log-level", help=_("DEBUG, INFO, WARNING or ERROR"))] = "INFO",
    log_format: Annotated[
        str | None, typer.Option("--log-format", help=_("text, json or journald; default: log_format in the config"))
    ] = None,
    pam_socket: Annotated[
        Path, typer.Option("--pam-socket", help=_("where pam-auth asks this agent (directory created 0700)"))
    ] = Path(DEFAULT_SOCKET),
) -> None:
    """Run this terminal's agent: events, policy, PAM decisions, card-removal lock, USB media guard."""
    from sekisho.agents.login.pam import LoginSetupError
    from sekisho.agents.login.run import run_terminal
    from sekisho.agents.runtime.agent import Agent
    from sekisho.agents.runtime.cli import setup_agent_logging
    from sekisho.agents.runtime.config import load_config
    from sekisho.agents.runtime.errors import AgentError
    from sekisho.agents.usb.rules import read_rules_text
    from sekisho.agents.usb.run import UsbGuardConfig

    setup_agent_logging(log_level, log_format, config)
    try:
        agent = Agent(load_config(config))
        rules = read_rules_text(usb_rules.read_bytes()) if usb_rules else None
    except (OSError, AgentError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(getattr(err, "exit_code", 2)) from err
    guard = UsbGuardConfig(terminal_id=terminal, rules_text=rules) if usb else None
    try:
        run_terminal(agent, config, terminal, usb=guard, pam_socket=pam_socket)
    except (OSError, LoginSetupError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


@pam_app.command(
    "pam-auth",
    help=_("For pam_exec: ask the running terminal agent to decide PAM_USER/PAM_TYPE; exit 0 grants, 1 refuses."),
)
def pam_auth_command(
    config: Annotated[Path, typer.Option("--config", "-c", help=_("agent TOML file (login.toml beside it)"))],
    terminal: Annotated[str, typer.Option("--terminal", "-t", help=_("terminal id in the site policy"))],
    socket: Annotated[Path, typer.Option("--socket", help=_("the terminal agent's PAM socket"))] = Path(DEFAULT_SOCKET),
) -> None:
    """For pam_exec: ask the running terminal agent to decide PAM_USER/PAM_TYPE; exit 0 grants, 1 refuses."""
    from sekisho.agents.login.pam_client import main

    raise typer.Exit(main(["--config", str(config), "--terminal", terminal, "--socket", str(socket)]))
