"""`sekisho fleet …`: enrol, watch and retire the site's agents.

Each part of the fleet adds its own sub-commands here (tokens, status, revocation, …), so this module
stays the one place that names them.
"""

from __future__ import annotations

import typer

from sekisho.common.i18n import _
from sekisho.controller.fleet.revocation_cli import revocations_app, revoke
from sekisho.controller.fleet.status_cli import status
from sekisho.controller.fleet.token_cli import refusals, token_app

app = typer.Typer(help=_("Enrol, watch and retire agents."), no_args_is_help=True)


@app.callback(help=_("Enrol, watch and retire agents."))
def _fleet() -> None:
    """Enrol, watch and retire agents."""


app.command("status", help=_("Show each agent's state (online/stale/offline/revoked) and last reported health."))(
    status
)
app.add_typer(token_app, name="token")
app.command("refusals", help=_("List refused enrolments and renewals with their reasons (newest first)."))(refusals)
app.command("revoke", help=_("Revoke an agent (same as `sekisho controller revoke-agent`)."))(revoke)
app.add_typer(revocations_app, name="revocations")
