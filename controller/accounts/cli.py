"""`sekisho users …`: console accounts, their roles, TOTP and per-user API tokens (run on the controller host)."""

from __future__ import annotations

import getpass
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sekisho.common.i18n import _
from sekisho.controller.accounts.roles import ADMIN_ROLES, ROLE_LABELS, Actor, Role, parse_role
from sekisho.protocol import timefmt

JST = timezone(timedelta(hours=9), "JST")

if TYPE_CHECKING:
    from sekisho.controller.accounts.service import AccountService

app = typer.Typer(help=_("Console users: accounts, roles, TOTP, API tokens."), no_args_is_help=True)
token_app = typer.Typer(help=_("Per-user API tokens: create, list, revoke."), no_args_is_help=True)
app.add_typer(token_app, name="token")
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)]
LoginOpt = Annotated[str, typer.Option("--login", help=_("login"))]
AreaOpt = Annotated[list[str] | None, typer.Option("--area", help=_("area id"))]
StdinOpt = Annotated[bool, typer.Option("--password-stdin", help=_("read the password from stdin (one line)"))]


def _service(config: Path) -> AccountService:
    # Imported here: `sekisho --help` should not load the store.
    from sekisho.controller.accounts.service import AccountService, AccountSettings
    from sekisho.controller.cli import cli_config
    from sekisho.controller.service import open_store

    cfg = cli_config(config)
    return AccountService(open_store(cfg), AccountSettings.from_config(cfg))


def _jst(moment: datetime | None) -> str:
    return moment.astimezone(JST).strftime("%Y/%m/%d %H:%M") if moment is not None else "-"


def _by() -> str:
    return Actor.cli().audit_name


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]{escape(message)}[/red]")
    return typer.Exit(2)


def _role(text: str) -> Role:
    try:
        return parse_role(text)
    except ValueError as err:
        raise _fail(str(err)) from err


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass(_("Password: "))
    if getpass.getpass(_("Again: ")) != first:
        raise _fail(_("the passwords differ"))
    return first


@app.callback(help=_("Console users."))
def _users() -> None:
    """Console users."""


@app.command("create", help=_("Create a console user (the first one: --role it-admin)."))
def create(
    config: ConfigOpt,
    role: Annotated[str, typer.Option("--role", help=_("it-admin, facility-manager, security, auditor, area-manager"))],
    login: LoginOpt,
    name: Annotated[str, typer.Option("--name", help=_("name, e.g. %(example)s", example="山田 太郎"))],
    kana: Annotated[str, typer.Option("--kana", help=_("reading, e.g. %(example)s", example="やまだ たろう"))],
    area: AreaOpt = None,
    language: Annotated[str, typer.Option("--language", help=_("ja or en"))] = "ja",
    password_stdin: StdinOpt = False,
) -> None:
    """Create a console user (the first one: --role it-admin)."""
    from sekisho.controller.accounts.passwords import PasswordRejected
    from sekisho.controller.accounts.service import AccountError

    chosen = _role(role)
    service = _service(config)
    try:
        user = service.create_user(
            login=login, display_name=name, kana=kana, role=chosen, areas=area or [], language=language,
            password=_password(password_stdin), created_by=_by(),
        )  # fmt: skip
    except (AccountError, PasswordRejected) as err:
        raise _fail(_("cannot create the user: %(err)s", err=err)) from err
    console.print(_("created: %(user)s (%(role)s)", user=escape(user.login), role=_(ROLE_LABELS[chosen])))
    if chosen in ADMIN_ROLES:
        console.print(
            _(
                "this role must enrol TOTP before signing in: `sekisho users totp-enrol --login %(user)s`",
                user=escape(user.login),
            )
        )


@app.command("list", help=_("List console users."))
def list_users(config: ConfigOpt) -> None:
    """List console users."""
    table = Table("login", _("name"), _("kana"), "role", "areas", "TOTP", _("state"))
    for user in _service(config).users():
        table.add_row(
            escape(user.login), escape(user.display_name), escape(user.kana), user.role, ", ".join(user.areas),
            "✓" if user.totp_secret else "-", _("disabled") if user.disabled_at else _("active"),
        )  # fmt: skip
    console.print(table)


def _set_disabled(config: Path, login: str, disabled: bool) -> None:
    from sekisho.controller.accounts.service import AccountError

    try:
        _service(config).set_disabled(login, disabled, by=_by())
    except AccountError as err:
        raise _fail(str(err)) from err
    console.print((_("disabled: ") if disabled else _("enabled: ")) + escape(login))


@app.command("disable", help=_("Disable a user: sessions end, API tokens stop working."))
def disable(config: ConfigOpt, login: LoginOpt) -> None:
    """Disable a user: sessions end, API tokens stop working."""
    _set_disabled(config, login, True)


@app.command("enable", help=_("Enable a disabled user again."))
def enable(config: ConfigOpt, login: LoginOpt) -> None:
    """Enable a disabled user again."""
    _set_disabled(config, login, False)


@app.command("set-role", help=_("Change a user's role (and areas); their sessions end."))
def set_role(
    config: ConfigOpt,
    login: LoginOpt,
    role: Annotated[str, typer.Option("--role", help=_("the new role"))],
    area: AreaOpt = None,
) -> None:
    """Change a user's role (and areas); their sessions end."""
    from sekisho.controller.accounts.service import AccountError

    try:
        user = _service(config).set_role(login, _role(role), area or [], by=_by())
    except AccountError as err:
        raise _fail(str(err)) from err
    console.print(_("changed: %(user)s → %(role)s", user=escape(user.login), role=_(ROLE_LABELS[Role(user.role)])))


@app.command("reset-password", help=_("Set a new password for a user; all of their sessions end."))
def reset_password(config: ConfigOpt, login: LoginOpt, password_stdin: StdinOpt = False) -> None:
    """Set a new password for a user; all of their sessions end."""
    from sekisho.controller.accounts.passwords import PasswordRejected
    from sekisho.controller.accounts.service import AccountError

    service = _service(config)
    try:
        service.user(login)
        service.reset_password(login, _password(password_stdin), by=_by())
    except (AccountError, PasswordRejected) as err:
        raise _fail(str(err)) from err
    console.print(_("password reset: %(login)s", login=escape(login)))


@app.command(
    "totp-enrol", help=_("Give a user a new TOTP secret; the URI and secret are shown once (add them to an app).")
)
def totp_enrol(config: ConfigOpt, login: LoginOpt) -> None:
    """Give a user a new TOTP secret; the URI and secret are shown once (add them to an app)."""
    from sekisho.controller.accounts.service import AccountError

    try:
        secret, uri = _service(config).enrol_totp(login, by=_by())
    except AccountError as err:
        raise _fail(str(err)) from err
    console.print(_("add to the authenticator app (shown once):"))
    typer.echo(uri)
    typer.echo(f"secret: {secret}")


@app.command("attempts", help=_("Show recent sign-in attempts, failures and lock-outs."))
def attempts(
    config: ConfigOpt,
    login: Annotated[str | None, typer.Option("--login", help=_("only this login"))] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help=_("at most this many rows"))] = 50,
) -> None:
    """Show recent sign-in attempts, failures and lock-outs."""
    table = Table("at (JST)", "login", "client", "outcome")
    for row in _service(config).attempts(login, limit):
        table.add_row(_jst(row.at), escape(row.login), escape(row.client), row.outcome)
    console.print(table)


@token_app.command(
    "create", help=_("Create an API token acting with the user's role; shown once, only its hash is stored.")
)
def token_create(
    config: ConfigOpt,
    login: LoginOpt,
    name: Annotated[str, typer.Option("--name", help=_("what the token is for, e.g. prometheus"))],
    expires: Annotated[str, typer.Option("--expires", help=_("lifetime: 30m, 24h, 90d, or never"))] = "90d",
) -> None:
    """Create an API token acting with the user's role; shown once, only its hash is stored."""
    from sekisho.controller.accounts.service import AccountError
    from sekisho.controller.fleet.token_cli import parse_duration

    try:
        lifetime = None if expires.strip().lower() == "never" else parse_duration(expires)
        new = _service(config).create_token(login, name, lifetime, by=_by())
    except (AccountError, ValueError) as err:
        raise _fail(_("cannot create the token: %(err)s", err=err)) from err
    until = _jst(new.expires_at) if new.expires_at else _("never")
    console.print(
        _("token %(id)s (%(name)s), expires %(until)s; shown once:", id=new.id, name=escape(new.name), until=until)
    )
    typer.echo(new.token)


@token_app.command("list", help=_("List API tokens with their last use."))
def token_list(
    config: ConfigOpt, login: Annotated[str | None, typer.Option("--login", help=_("only this user's"))] = None
) -> None:
    """List API tokens with their last use."""
    table = Table("id", "login", "name", "created (JST)", "expires", "last used", "from", "state")
    now = timefmt.now()
    for token, owner in _service(config).tokens(login):
        expired = token.expires_at is not None and token.expires_at <= now
        state = _("revoked") if token.revoked_at else _("expired") if expired else _("active")
        table.add_row(
            token.id, escape(owner), escape(token.name), _jst(token.created_at), _jst(token.expires_at),
            _jst(token.last_used_at), token.last_used_client or "-", state,
        )  # fmt: skip
    console.print(table)


@token_app.command("revoke", help=_("Revoke an API token at once."))
def token_revoke(config: ConfigOpt, token_id: Annotated[str, typer.Argument(help=_("the token's id"))]) -> None:
    """Revoke an API token at once."""
    from sekisho.controller.accounts.service import AccountError

    try:
        _service(config).revoke_token(token_id, by=_by())
    except AccountError as err:
        raise _fail(str(err)) from err
    console.print(_("revoked: %(token_id)s", token_id=escape(token_id)))
