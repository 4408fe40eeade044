"""`sekisho fleet …`: enrol, watch and retire the site's agents.

Each part of the fleet adds its own sub-commands here (tokens, status, revocation, …), so this module
stays the one place that names them.
"""

from __future__ import annotations

import typer

from sekisho.controller.fleet.revocation_cli import revocations_app, revoke
from sekisho.controller.fleet.status_cli import status
from sekisho.controller.fleet.token_cli import refusals, token_app

app = typer.Typer(help="エージェントの登録・状態・失効 / Enrol, watch and retire agents.", no_args_is_help=True)


@app.callback()
def _fleet() -> None:
    """Enrol, watch and retire agents."""


app.command("status")(status)
app.add_typer(token_app, name="token")
app.command("refusals")(refusals)
app.command("revoke")(revoke)
app.add_typer(revocations_app, name="revocations")
