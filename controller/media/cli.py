"""`sekisho media …`: lend, return and revoke registered media, list loans, take inventory, check overdue loans."""

from __future__ import annotations

import getpass
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sekisho.common.i18n import _
from sekisho.controller.audit.operators import cli_operator
from sekisho.controller.cli import cli_config, publish_now
from sekisho.controller.config import ControllerConfig
from sekisho.controller.media.service import JST, MediaError, MediaService, loan_state
from sekisho.controller.policy.service import PolicyService
from sekisho.protocol import mynumber, signing, timefmt

console = Console()
err_console = Console(stderr=True)
app = typer.Typer(help=_("Media register and loans."), no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)]

_STATE_LABELS = {
    "in_store": _("in store"),
    "on_loan": _("on loan"),
    "reserved": _("reserved"),
    "overdue": _("overdue"),
    "returned": _("returned"),
    "revoked": _("cancelled"),
    "lost": _("lost"),
    "retired": _("retired"),
    "disposed": _("disposed"),
}


def parse_when(text: str) -> datetime:
    """Parse an ISO 8601 time; without an offset it is read as JST (the site's time zone)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        shown = mynumber.redact(text)  # never repeat a My Number typed into the wrong option
        raise typer.BadParameter(_("not an ISO 8601 time: %(shown)r", shown=shown)) from err
    return moment.replace(tzinfo=JST) if moment.tzinfo is None else moment


def jst(moment: datetime | None) -> str:
    """Show a stored UTC time in JST for people."""
    return "—" if moment is None else f"{moment.astimezone(JST):%Y-%m-%d %H:%M} JST"


def _service(cfg: ControllerConfig) -> MediaService:
    from sekisho.controller.service import open_store

    store = open_store(cfg)
    return MediaService(store, PolicyService(store, signing.load_private_key(cfg.signing_key)))


def _publish(cfg: ControllerConfig, media: MediaService, version: int) -> None:
    bundles = media.policy.bundles()
    console.print(
        _(
            "stored policy version %(version)s; %(bundles)s agent bundle(s) signed",
            version=version,
            bundles=len(bundles),
        )
    )
    if publish_now(cfg, bundles, purpose="media-cli"):
        console.print(_("published (retained) to: ") + ", ".join(sorted(bundles)))


def _refused(err: MediaError) -> typer.Exit:
    # The service names fields, never values; redacting the message is the backstop.
    err_console.print(f"[red]✗[/red] {mynumber.redact(str(err))}")
    return typer.Exit(1)


@app.command(
    "lend", help=_("Lend a registered medium to a person for named terminals; terminals get the loan at once.")
)
def lend(
    medium: Annotated[str, typer.Argument(help=_("medium id from the register"))],
    config: ConfigOpt,
    person: Annotated[str, typer.Option(help=_("borrower (person id)"))],
    terminal: Annotated[list[str], typer.Option(help=_("terminal id where it may be used (repeatable)"))],
    until: Annotated[str, typer.Option(help=_("due back, ISO 8601 (JST if no offset)"))],
    purpose: Annotated[str, typer.Option(help=_("why it is lent"))],
    approved_by: Annotated[str, typer.Option(help=_("approving area_manager / chief_officer (person id)"))],
    from_: Annotated[str | None, typer.Option("--from", help=_("start, ISO 8601 (default: now)"))] = None,
    read_write: Annotated[bool, typer.Option("--read-write", help=_("allow writing (default: read-only)"))] = False,
) -> None:
    """Lend a registered medium to a person for named terminals; terminals get the loan at once."""
    cfg = cli_config(config)
    media = _service(cfg)
    try:
        loan_id, version = media.lend(
            medium,
            person,
            terminal,
            parse_when(from_) if from_ else None,
            parse_when(until),
            purpose,
            not read_write,
            approved_by,
            getpass.getuser(),
            operator=cli_operator(),
        )
    except MediaError as err:
        raise _refused(err) from err
    console.print(
        _(
            "recorded loan %(loan_id)s: %(medium)s → %(person)s until %(jst)s",
            loan_id=loan_id,
            medium=medium,
            person=person,
            jst=jst(parse_when(until)),
        )
    )
    _publish(cfg, media, version)


@app.command("return", help=_("Record that a lent medium came back; terminals stop allowing it at once."))
def return_(
    loan: Annotated[str, typer.Argument(help=_("loan id"))],
    config: ConfigOpt,
    received_by: Annotated[str | None, typer.Option(help=_("who received it back (default: you)"))] = None,
) -> None:
    """Record that a lent medium came back; terminals stop allowing it at once."""
    cfg = cli_config(config)
    media = _service(cfg)
    try:
        version = media.return_medium(loan, received_by=received_by or getpass.getuser(), operator=cli_operator())
    except MediaError as err:
        raise _refused(err) from err
    console.print(_("recorded the return of %(loan)s", loan=loan))
    _publish(cfg, media, version)


@app.command("revoke", help=_("End a loan early; terminals stop allowing the medium at once."))
def revoke(
    loan: Annotated[str, typer.Argument(help=_("loan id"))],
    config: ConfigOpt,
    reason: Annotated[str, typer.Option(help=_("why the loan ends early"))],
) -> None:
    """End a loan early; terminals stop allowing the medium at once."""
    cfg = cli_config(config)
    media = _service(cfg)
    try:
        version = media.revoke(loan, reason, revoked_by=getpass.getuser(), operator=cli_operator())
    except MediaError as err:
        raise _refused(err) from err
    console.print(_("revoked loan %(loan)s", loan=loan))
    _publish(cfg, media, version)


@app.command("list", help=_("List the loan register."))
def list_loans(
    config: ConfigOpt,
    active: Annotated[bool, typer.Option("--active", help=_("only loans not yet returned or revoked"))] = False,
    medium: Annotated[str | None, typer.Option(help=_("only this medium"))] = None,
    person: Annotated[str | None, typer.Option(help=_("only this borrower"))] = None,
) -> None:
    """List the loan register."""
    media = _service(cli_config(config))
    now = timefmt.now()
    table = Table(
        _("loan"),
        _("medium"),
        _("borrower"),
        _("terminals"),
        _("from (JST)"),
        _("due (JST)"),
        _("state"),
        _("approved by"),
        _("purpose"),
        title=_("Media loans"),
    )
    for loan in media.loans(active=active, medium=medium, person=person):
        state = _STATE_LABELS[loan_state(loan, now)]
        if loan.returned_at is not None:
            state += f" {jst(loan.returned_at)}"
        table.add_row(
            loan.id,
            loan.medium,
            loan.person,
            ", ".join(loan.terminals),
            jst(loan.starts_at),
            jst(loan.ends_at),
            state,
            loan.approved_by,
            loan.purpose,
        )
    console.print(table)


@app.command(
    "inventory", help=_("Take stock of every registered medium: where it is, whether overdue, when last seen.")
)
def inventory(config: ConfigOpt) -> None:
    """Take stock of every registered medium: where it is, whether overdue, when last seen."""
    media = _service(cli_config(config))
    table = Table(
        _("medium"),
        _("status"),
        _("lent to"),
        _("terminals"),
        _("due (JST)"),
        _("overdue"),
        _("last seen"),
        title=_("Media register"),
    )
    for line in media.inventory():
        loan = line.loan
        seen = f"{jst(line.last_seen_at)} {line.last_seen_agent}" if line.last_seen_at else "—"
        table.add_row(
            f"{line.medium.id} {line.medium.name}",
            _STATE_LABELS.get(line.state, line.state),
            loan.person if loan else "—",
            ", ".join(loan.terminals) if loan else "—",
            jst(loan.ends_at) if loan else "—",
            _("[red]yes[/red]") if line.overdue else "—",
            seen,
        )
    console.print(table)


@app.command(
    "check-overdue",
    help=_("Raise a finding for every overdue loan that has none yet (the running controller does this every minute)."),
)
def check_overdue(config: ConfigOpt) -> None:
    """Raise a finding for every overdue loan that has none yet (the running controller does this every minute)."""
    media = _service(cli_config(config))
    created = media.check_overdue()
    overdue = media.overdue()
    for loan in overdue:
        console.print(
            _(
                "overdue: %(id)s %(medium)s → %(person)s, due %(jst)s",
                id=loan.id,
                medium=loan.medium,
                person=loan.person,
                jst=jst(loan.ends_at),
            )
        )
    console.print(_("%(overdue)s overdue, %(created)s new finding(s)", overdue=len(overdue), created=len(created)))
