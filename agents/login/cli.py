"""`sekisho-agent pam-auth`: the pam_exec entry point (the lead mounts ``pam_app`` into the agent CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agents.login.pam import pam_auth

pam_app = typer.Typer(help="Terminal login guard: the PAM entry point.", no_args_is_help=True)


@pam_app.callback()
def _group() -> None:
    """Terminal login guard: the PAM entry point."""
    # An explicit callback keeps `pam-auth` a subcommand even while it is the only one.


@pam_app.command("pam-auth")
def pam_auth_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="agent TOML file (login.toml beside it)")],
    terminal: Annotated[str, typer.Option("--terminal", "-t", help="terminal id in the site policy")],
) -> None:
    """Decide one login for pam_exec from PAM_USER/PAM_TYPE; exit 0 grants, 1 refuses."""
    raise typer.Exit(pam_auth(config, terminal))
