"""`sekisho fleet revoke` and `sekisho fleet revocations …`: retire an agent, and keep a broker's list current."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sekisho.common.i18n import _
from sekisho.controller.cli import ConfigOpt, cli_config, revoke_agent
from sekisho.controller.fleet.revocations import (
    RevocationSyncError,
    current_entries,
    publish_revocations,
    reload_broker,
    sync_once,
)
from sekisho.protocol import signing

console = Console()
err_console = Console(stderr=True)
revocations_app = typer.Typer(help=_("The broker's revocation list."), no_args_is_help=True)


def revoke(config: ConfigOpt, name: Annotated[str, typer.Argument(help=_("agent name"))]) -> None:
    """Revoke an agent (same as `sekisho controller revoke-agent`)."""
    revoke_agent(config, name)


@revocations_app.command(
    "show", help=_("Print the list the broker must enforce (and write it if revocation_list is set).")
)
def show(config: ConfigOpt) -> None:
    """Print the list the broker must enforce (and write it if revocation_list is set)."""
    from sekisho.controller.cli import _signing_store

    cfg = cli_config(config)
    store = _signing_store(cfg)
    try:
        revocations = publish_revocations(store, cfg.revocation_list)
    finally:
        store.engine.dispose()
    console.print(revocations.broker_text(), end="", markup=False, highlight=False)


@revocations_app.command(
    "sync", help=_("Fetch the controller-signed revocation list, check it and write it for the broker on this host.")
)
def sync(
    controller: Annotated[str, typer.Option(help=_("the controller's https:// URL"))],
    output: Annotated[Path, typer.Option(help=_("the file the broker's plugin reads"))],
    controller_key: Annotated[
        Path,
        typer.Option(help=_("the controller's signing.pub"), exists=True, dir_okay=False),
    ],
    ca_file: Annotated[Path | None, typer.Option(help=_("CA of the controller's HTTPS"))] = None,
    token_file: Annotated[Path | None, typer.Option(help=_("file holding an API read token"), dir_okay=False)] = None,
    interval: Annotated[float, typer.Option(help=_("repeat every N seconds (0: once)"))] = 0.0,
    reload_pid_file: Annotated[Path | None, typer.Option(help=_("SIGHUP this broker when the list changed"))] = None,
) -> None:
    """Fetch the controller-signed revocation list, check it and write it for the broker on this host."""
    key = signing.load_public_key(controller_key)
    token = token_file.read_text().strip() if token_file is not None else None
    failing = False
    while True:
        try:
            changed = sync_once(controller, key, output, token=token, ca_file=ca_file)
            if changed:
                held = current_entries(output)
                count = (len(held.names), len(held.serials)) if held else (0, 0)
                console.print(
                    _("written: %(count)s agent(s), %(count2)s certificate(s) refused", count=count[0], count2=count[1])
                )
                if reload_pid_file is not None:
                    reload_broker(reload_pid_file)
            if failing:
                console.print(_("syncing again"))
            failing = False
        except RevocationSyncError as err:
            # The broker keeps the list it has: a revocation already applied is never lifted by a failed sync.
            if not failing or interval <= 0:
                err_console.print(_("[red]sync failed:[/red] %(err)s", err=err))
            failing = True
            if interval <= 0:
                raise typer.Exit(1) from err
        if interval <= 0:
            return
        time.sleep(max(interval, 1.0))
