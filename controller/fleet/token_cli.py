"""`sekisho fleet token …` and `sekisho fleet refusals`: enrolment tokens for administrators."""

from __future__ import annotations

import getpass
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sekisho.common.i18n import _
from sekisho.controller.audit.operators import cli_operator
from sekisho.protocol import timefmt

if TYPE_CHECKING:
    from sekisho.controller.fleet.enrol_service import EnrolmentService

token_app = typer.Typer(help=_("Enrolment tokens: create, list, revoke."), no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)]
_DURATION = re.compile(r"^(\d{1,4})([mhd])$")


def parse_duration(text: str) -> timedelta:
    """Parse 30m, 24h or 7d into a timedelta (ValueError otherwise)."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(_("%(text)s is not a duration like 30m, 24h or 7d", text=repr(text)))
    number, unit = int(match.group(1)), match.group(2)
    return {"m": timedelta(minutes=number), "h": timedelta(hours=number), "d": timedelta(days=number)}[unit]


def _service(config: Path) -> EnrolmentService:
    # Imported here: `sekisho --help` should not load the store.
    from sekisho.controller.cli import cli_config
    from sekisho.controller.fleet.enrol_service import EnrolmentService
    from sekisho.controller.service import open_store

    cfg = cli_config(config)
    return EnrolmentService(cfg, open_store(cfg))


@token_app.command("create", help=_("Create an enrolment token; it is shown once, only its hash is stored."))
def create(
    config: ConfigOpt,
    kind: Annotated[str, typer.Option("--kind", help=_("terminal or door"))],
    expires: Annotated[str, typer.Option("--expires", help=_("lifetime: 30m, 24h, 7d (at most 30d)"))] = "24h",
    uses: Annotated[int, typer.Option("--uses", help=_("how many devices may enrol with it"))] = 1,
    name: Annotated[str | None, typer.Option("--name", help=_("the agent name the device must take"))] = None,
    reenrol: Annotated[
        str | None,
        typer.Option("--reenrol", help=_("NAME: a token that replaces this existing agent (new device, keys)")),
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help=_("controller URL to put in the token (default enrol_url)"))
    ] = None,
) -> None:
    """Create an enrolment token; it is shown once, only its hash is stored."""
    from sekisho.controller.fleet.enrol_service import EnrolmentUnavailable

    if reenrol is not None and name is not None and name != reenrol:
        err_console.print("[red]--name と --reenrol が違います / --name and --reenrol differ[/red]")
        raise typer.Exit(2)
    service = _service(config)
    try:
        new = service.create_token(
            kind=kind,
            expires_in=parse_duration(expires),
            uses=uses,
            name=reenrol or name,
            reenrol=reenrol is not None,
            created_by=getpass.getuser(),
            controller_url=url,
            operator=cli_operator(),
        )
    except (ValueError, EnrolmentUnavailable) as err:
        err_console.print(_("[red]cannot create the token:[/red] %(err)s", err=escape(str(err))))
        raise typer.Exit(2) from err
    finally:
        service.store.engine.dispose()
    row = new.row
    who = f" for {row.name}" + (" (re-enrolment)" if row.reenrol else "") if row.name else ""
    console.print(
        f"token {row.id}: {row.kind}{who}, {row.uses} use(s), expires {timefmt.fmt(row.expires_at)}",
        soft_wrap=True,
        highlight=False,
    )
    console.print(f"CA sha256 {new.ca_fingerprint}", soft_wrap=True, highlight=False)
    console.print(_("shown once, keep it secret until used:"), highlight=False)
    # Plain print: a script takes the last line; no wrapping or markup may touch it.
    print(new.token)


@token_app.command("list", help=_("List enrolment tokens (never their secrets)."))
def list_tokens(config: ConfigOpt) -> None:
    """List enrolment tokens (never their secrets)."""
    service = _service(config)
    try:
        rows = service.store.list_tokens()
        now = service.clock()
    finally:
        service.store.engine.dispose()
    table = Table("id", "kind", "name", "uses left", "expires", "state", "created by")
    for row in rows:
        if row.revoked_at is not None:
            state = "revoked"
        elif row.expires_at <= now:
            state = "expired"
        elif row.uses_left == 0:
            state = "used"
        else:
            state = "usable"
        name = (row.name or "-") + (" (re-enrol)" if row.reenrol else "")
        table.add_row(
            row.id, row.kind, name, f"{row.uses_left}/{row.uses}", timefmt.fmt(row.expires_at), state, row.created_by
        )
    console.print(table)


@token_app.command("revoke", help=_("Revoke an enrolment token so no device can use it."))
def revoke(
    config: ConfigOpt, token_id: Annotated[str, typer.Argument(help=_("token id (t-…) from `token list`"))]
) -> None:
    """Revoke an enrolment token so no device can use it."""
    service = _service(config)
    try:
        done = service.store.revoke_token(token_id, service.clock(), operator=cli_operator())
    finally:
        service.store.engine.dispose()
    if not done:
        err_console.print(_("[red]no usable token %(token_id)s[/red]", token_id=escape(token_id)))
        raise typer.Exit(1)
    console.print(f"revoked {token_id}")


def refusals(
    config: ConfigOpt,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help=_("at most this many rows"))] = 50,
) -> None:
    """List refused enrolments and renewals with their reasons (newest first)."""
    service = _service(config)
    try:
        rows = service.store.list_refusals(limit)
    finally:
        service.store.engine.dispose()
    if not rows:
        console.print(_("no refusals recorded"))
    # One plain line each, whole: operators grep these and paste them into incident notes.
    for row in rows:
        console.print(
            f"{timefmt.fmt(row.at)} {row.reason} token={row.token_id or '-'} kind={row.kind or '-'} "
            f"name={row.name or '-'} client={row.client or '-'}: {row.detail}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
