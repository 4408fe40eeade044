"""`sekisho doors …`: the key-lending register, door and locker log, who is inside, visits, and door commands."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Protocol, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from sekisho.common.i18n import _
from sekisho.controller.cli import cli_config, issue_command
from sekisho.controller.config import ControllerConfig
from sekisho.controller.doors import commands
from sekisho.controller.doors.commands import DoorCommand, TargetError
from sekisho.controller.doors.projector import DoorProjector
from sekisho.controller.doors.registers import DoorKind, DoorRegisters, loan_state
from sekisho.controller.media.cli import jst, parse_when
from sekisho.controller.media.service import JST
from sekisho.controller.store.audit import refuse_free_text
from sekisho.controller.store.store import Store
from sekisho.protocol import door_commands, mynumber, pin, timefmt
from sekisho.protocol.policy import SitePolicy

console = Console()
err_console = Console(stderr=True)
app = typer.Typer(
    help=_("Key loans, door log, presence, visits, door commands."),
    no_args_is_help=True,
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)]
LifetimeOpt = Annotated[int, typer.Option(min=1, max=600, help=_("seconds until the command expires"))]
ReasonOpt = Annotated[str | None, typer.Option(help=_("why (kept in the admin audit trail with your login)"))]
DoorsOpt = Annotated[list[str] | None, typer.Option("--door", help=_("door id (repeatable)"))]
AreaOpt = Annotated[str | None, typer.Option("--area", help=_("every door of this area"))]
AllOpt = Annotated[bool, typer.Option("--all", help=_("every door of the site"))]

_PAGE = 1000

_LOAN_LABELS = {
    "open": _("out"),
    "overdue": _("[red]overdue[/red]"),
    "returned": _("returned"),
    "return_only": _("[yellow]return without loan[/yellow]"),
}


def _open(config: Path) -> tuple[ControllerConfig, Store]:
    from sekisho.controller.service import open_store

    cfg = cli_config(config)
    return cfg, open_store(cfg)


def _caught_up(config: Path) -> DoorRegisters:
    """Open the registers after projecting what was stored since (the running controller does it every second)."""
    _cfg, store = _open(config)
    try:
        DoorProjector(store).run()
    except DBAPIError as err:
        # Showing the registers as they are beats showing nothing; say that they may lag.
        err_console.print(_("[yellow]could not bring the registers up to date: %(err)s[/yellow]", err=err))
    return DoorRegisters(store)


class _Row(Protocol):
    id: int


R = TypeVar("R", bound=_Row)


def _every(fetch: Callable[[int | None], list[R]]) -> list[R]:
    """Read every page of a register query (fetch takes after_id and returns at most _PAGE rows)."""
    rows: list[R] = []
    after: int | None = None
    while True:
        page = fetch(after)
        rows.extend(page)
        if len(page) < _PAGE:
            return rows
        after = page[-1].id


def _policy(store: Store) -> SitePolicy:
    row = store.current_policy_version()
    if row is None:
        err_console.print(_("[red]✗[/red] no site policy applied yet (sekisho policy apply)"))
        raise typer.Exit(1)
    return SitePolicy.model_validate(row.document)


@app.command("keys", help=_("Show the key-lending register."))
def keys(
    config: ConfigOpt,
    open_: Annotated[bool, typer.Option("--open", help=_("only keys not yet returned"))] = False,
    overdue: Annotated[bool, typer.Option("--overdue", help=_("only keys out past their due time"))] = False,
    person: Annotated[str | None, typer.Option(help=_("only this borrower"))] = None,
    key: Annotated[str | None, typer.Option(help=_("only this key"))] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help=_("show at most this many, the latest"))] = 500,
) -> None:
    """Show the key-lending register (鍵貸出管理簿)."""
    registers = _caught_up(config)
    now = timefmt.now()
    table = Table(
        "No.",
        _("cabinet"),
        _("slot"),
        _("key"),
        _("borrower"),
        _("taken (JST)"),
        _("due (JST)"),
        _("returned (JST)"),
        _("by"),
        _("state"),
        title=_("Key-lending register"),
    )
    loans = _every(
        lambda after: registers.loans(
            open_=True if open_ else None,
            overdue=True if overdue else None,
            person=person,
            key=key,
            after_id=after,
            limit=_PAGE,
            now=now,
        )
    )
    for loan in loans[-limit:]:
        state = _LOAN_LABELS[loan_state(loan, now)]
        if loan.wrong_slot:
            state += _(" [yellow]wrong slot %(returned_slot)s[/yellow]", returned_slot=loan.returned_slot)
        elif loan.returned_by and loan.person and loan.returned_by != loan.person:
            # The right slot, by someone other than the borrower: worth a note, not a warning.
            state += _(" returned by a colleague")
        table.add_row(
            str(loan.id),
            loan.cabinet,
            "—" if loan.slot is None else str(loan.slot),
            loan.key,
            loan.person or "—",
            jst(loan.taken_at),
            jst(loan.due_at),
            jst(loan.returned_at),
            loan.returned_by or "—",
            state,
        )
    console.print(table)


@app.command("log", help=_("Show the door log: grants, denials, openings, alarms, unlocks, mode changes."))
def door_log(
    config: ConfigOpt,
    door: Annotated[str | None, typer.Option(help=_("only this door"))] = None,
    kind: Annotated[DoorKind | None, typer.Option(help=_("room, locker (the locker log) or key_cabinet"))] = None,
    person: Annotated[str | None, typer.Option(help=_("only this person"))] = None,
    since: Annotated[
        str | None, typer.Option(help=_("from this time, ISO 8601 (JST if no offset; default: 7 days ago)"))
    ] = None,
    until: Annotated[str | None, typer.Option(help=_("before this time, ISO 8601 (JST if no offset)"))] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help=_("show at most this many, the latest"))] = 200,
) -> None:
    """Show the door log (入退室・ロッカー記録): grants, denials, openings, alarms, unlocks, mode changes."""
    start = parse_when(since) if since else timefmt.now() - timedelta(days=7)
    end = parse_when(until) if until else None
    registers = _caught_up(config)
    rows = _every(
        lambda after: registers.log(
            door=door, kind=kind, person=person, since=start, until=end, after_id=after, limit=_PAGE
        )
    )
    # Paged in arrival order; a register reads in the order things happened.
    rows.sort(key=lambda r: (r.occurred_at, r.id))
    table = Table(
        _("at (JST)"),
        _("door"),
        _("kind"),
        _("event"),
        _("person"),
        _("dir"),
        _("reason"),
        _("escort"),
        title=_("Door log"),
    )
    for row in rows[-limit:]:
        who = row.person or row.card_masked or "—"
        if row.visitor:
            who += _(" (visitor)")
        if row.second_person:
            who += f" + {row.second_person}"
        table.add_row(
            f"{row.occurred_at.astimezone(JST):%Y-%m-%d %H:%M:%S}",
            row.door,
            row.door_kind or "?",
            row.type.removeprefix("door."),
            who,
            row.direction or "—",
            row.reason or "—",
            row.escort or "—",
        )
    console.print(table)


@app.command("inside", help=_("Show who is inside each controlled area now."))
def inside(
    config: ConfigOpt,
    area: Annotated[str | None, typer.Argument(help=_("only this area"))] = None,
) -> None:
    """Show who is inside each controlled area now (在室者)."""
    registers = _caught_up(config)
    table = Table(
        _("area"),
        _("person"),
        _("since (JST)"),
        _("via door"),
        _("visitor"),
        _("escort"),
        title=_("Inside now"),
    )
    rows = registers.inside(area)
    for row in rows:
        table.add_row(
            row.area, row.person, jst(row.entered_at), row.door, "yes" if row.visitor else "—", row.escort or "—"
        )
    console.print(table)
    console.print(_("%(count)s person(s)", count=len(rows)))


@app.command("visits", help=_("Show the visitor log with escorts."))
def visits(
    config: ConfigOpt,
    open_: Annotated[bool, typer.Option("--open", help=_("only visitors not yet out"))] = False,
    since: Annotated[
        str | None, typer.Option(help=_("visits going on at or after this time (JST if no offset)"))
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help=_("show at most this many, the latest"))] = 500,
) -> None:
    """Show the visitor log (来訪者記録) with escorts."""
    registers = _caught_up(config)
    table = Table(
        "No.",
        _("visitor"),
        _("escorted by"),
        _("area"),
        _("in (JST)"),
        _("out (JST)"),
        _("doors"),
        title=_("Visitor log"),
    )
    start = parse_when(since) if since else None
    rows = _every(
        lambda after: registers.visits(open_=True if open_ else None, since=start, after_id=after, limit=_PAGE)
    )
    for row in rows[-limit:]:
        table.add_row(
            str(row.id),
            row.visitor,
            row.escort or "[yellow]—[/yellow]",
            row.area,
            jst(row.entered_at),
            jst(row.exited_at),
            ", ".join(row.doors),
        )
    console.print(table)


@app.command(
    "hash-pin",
    help=_("Ask for a door PIN twice and print its pin_hash for site.yaml (the PIN itself is never stored)."),
)
def hash_pin_command() -> None:
    """Ask for a door PIN twice and print its pin_hash for site.yaml (the PIN itself is never stored)."""
    entered = typer.prompt("PIN (4-8 digits)", hide_input=True, confirmation_prompt=True)
    if not pin.valid_pin(entered):
        err_console.print(_("a PIN is 4 to 8 digits[/red]"))
        raise typer.Exit(2)
    typer.echo(pin.hash_pin(entered))


@app.command(
    "rebuild", help=_("Rebuild every door register from the stored events (one transaction; ingest waits on SQLite).")
)
def rebuild(config: ConfigOpt) -> None:
    """Rebuild every door register from the stored events (one transaction; ingest waits on SQLite)."""
    _cfg, store = _open(config)
    count = DoorProjector(store).rebuild()
    console.print(_("rebuilt the door registers from %(count)s door and key event(s)", count=count))


@app.command(
    "check-overdue",
    help=_("Raise a finding for every overdue key that has none yet (the running controller does this every minute)."),
)
def check_overdue(config: ConfigOpt) -> None:
    """Raise a finding for every overdue key that has none yet (the running controller does this every minute)."""
    registers = _caught_up(config)
    created = registers.check_overdue()
    overdue = _every(lambda after: registers.loans(overdue=True, after_id=after, limit=_PAGE))
    for loan in overdue:
        console.print(
            _(
                "overdue: %(key)s (%(cabinet)s slot %(slot)s) → %(person)s, due %(jst)s",
                key=loan.key,
                cabinet=loan.cabinet,
                slot=loan.slot,
                person=loan.person,
                jst=jst(loan.due_at),
            )
        )
    console.print(_("%(overdue)s overdue, %(created)s new finding(s)", overdue=len(overdue), created=len(created)))


# --- remote commands: signed, expiring, single-use, through `sekisho controller send-command` ----------------


def _check_reason(reason: str | None) -> None:
    """Refuse a reason that looks like a My Number before anything is built or sent."""
    try:
        refuse_free_text("door command", reason=reason)
    except mynumber.MyNumberFound as err:
        err_console.print(f"[red]✗[/red] {err}")
        raise typer.Exit(2) from err


def _send(config: Path, built: list[DoorCommand], lifetime_s: int, reason: str | None = None) -> None:
    """Sign, record (with an audit row naming you) and publish each command; go on past an agent that fails."""
    cfg = cli_config(config)
    failed = []
    for command in built:
        try:
            issue_command(cfg, command.agent, command.name, command.args, lifetime_s=lifetime_s, reason=reason)
        except (ConnectionError, OSError, RuntimeError) as err:
            err_console.print(f"[red]✗[/red] {command.agent}: {err}")
            failed.append(command.agent)
    if failed:
        err_console.print(_("[red]✗[/red] not sent to: %(failed)s", failed=", ".join(failed)))
        raise typer.Exit(1)


def _targets(config: Path, build: Callable[[SitePolicy], list[DoorCommand]]) -> list[DoorCommand]:
    _cfg, store = _open(config)
    try:
        return build(_policy(store))
    except TargetError as err:
        err_console.print(f"[red]✗[/red] {err}")
        raise typer.Exit(2) from err
    finally:
        store.engine.dispose()


@app.command("unlock", help=_("Unlock one door once, remotely (door.unlock to the agent that drives it)."))
def unlock(
    door: Annotated[str, typer.Argument(help=_("door id"))],
    config: ConfigOpt,
    seconds: Annotated[int, typer.Option(min=1, max=door_commands.MAX_UNLOCK_S, help=_("unlock for this long"))] = 5,
    requested_by: Annotated[str | None, typer.Option(help=_("who asked for it (default: you)"))] = None,
    lifetime_s: LifetimeOpt = 60,
    reason: ReasonOpt = None,
) -> None:
    """Unlock one door once, remotely (door.unlock to the agent that drives it)."""
    _check_reason(reason)
    who = requested_by or getpass.getuser()
    built = _targets(config, lambda policy: [commands.unlock(policy, door, seconds, who)])
    _send(config, built, lifetime_s, reason)


@app.command(
    "emergency-unlock",
    help=_("Hold room doors unlocked for evacuation until `normal` (lockers and key cabinets stay locked)."),
)
def emergency_unlock(
    config: ConfigOpt,
    door: DoorsOpt = None,
    area: AreaOpt = None,
    all_: AllOpt = False,
    lifetime_s: LifetimeOpt = 60,
    reason: ReasonOpt = None,
) -> None:
    """Hold room doors unlocked for evacuation until `normal` (lockers and key cabinets stay locked)."""
    _check_reason(reason)
    built = _targets(
        config, lambda p: commands.set_mode(p, door_commands.EMERGENCY_UNLOCK, doors=door, area=area, all_doors=all_)
    )
    _send(config, built, lifetime_s, reason)


@app.command("lockdown", help=_("Lock doors and refuse every card until `normal`."))
def lockdown(
    config: ConfigOpt,
    door: DoorsOpt = None,
    area: AreaOpt = None,
    all_: AllOpt = False,
    lifetime_s: LifetimeOpt = 60,
    reason: ReasonOpt = None,
) -> None:
    """Lock doors and refuse every card until `normal`."""
    _check_reason(reason)
    built = _targets(
        config, lambda p: commands.set_mode(p, door_commands.LOCKDOWN, doors=door, area=area, all_doors=all_)
    )
    _send(config, built, lifetime_s, reason)


@app.command("normal", help=_("Return doors to normal operation after an emergency unlock or a lock-down."))
def normal(
    config: ConfigOpt,
    door: DoorsOpt = None,
    area: AreaOpt = None,
    all_: AllOpt = False,
    lifetime_s: LifetimeOpt = 60,
    reason: ReasonOpt = None,
) -> None:
    """Return doors to normal operation after an emergency unlock or a lock-down."""
    _check_reason(reason)
    built = _targets(
        config, lambda p: commands.set_mode(p, door_commands.NORMAL, doors=door, area=area, all_doors=all_)
    )
    _send(config, built, lifetime_s, reason)


@app.command("forgive-passback", help=_("Clear anti-passback state in an area (someone left without badging out)."))
def forgive_passback(
    area: Annotated[str, typer.Argument(help=_("area id"))],
    config: ConfigOpt,
    person: Annotated[str | None, typer.Option(help=_("only this person (default: everyone)"))] = None,
    lifetime_s: LifetimeOpt = 60,
    reason: ReasonOpt = None,
) -> None:
    """Clear anti-passback state in an area (someone left without badging out)."""
    _check_reason(reason)
    built = _targets(config, lambda policy: commands.forgive_passback(policy, area, person))
    _send(config, built, lifetime_s, reason)
