"""`sekisho audit log`: read the admin audit trail (who changed what, when, from where, old → new)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sekisho.common.i18n import _
from sekisho.controller.store.models import AdminAuditEntry
from sekisho.protocol import timefmt

app = typer.Typer(help=_("The admin audit trail."), no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)]
# Rows fetched per query while printing: the trail is read page by page, never whole.
_PAGE = 1000


def _compact(value: Any) -> str:
    return "—" if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def entry_json(row: AdminAuditEntry) -> dict[str, Any]:
    """Return one audit row as the JSON `audit log --json` prints (times in UTC, ISO 8601)."""
    return {
        "id": row.id,
        "chain_index": row.chain_index,
        "at": timefmt.fmt(row.at),
        "actor": row.actor,
        "via": row.via,
        "client": row.client,
        "action": row.action,
        "target": row.target,
        "old": row.old,
        "new": row.new,
        "detail": row.detail,
        "hash": row.hash,
    }


@app.command("log", help=_("Show the admin audit trail, oldest first (`records verify` checks it)."))
def log_command(
    config: ConfigOpt,
    since: Annotated[str | None, typer.Option(help=_("from this time, ISO 8601 (JST if no offset)"))] = None,
    until: Annotated[str | None, typer.Option(help=_("before this time, ISO 8601 (JST if no offset)"))] = None,
    actor: Annotated[
        str | None, typer.Option(help=_('who, e.g. "cli:root@host" or "user:tanaka"; a trailing * matches a prefix'))
    ] = None,
    action: Annotated[
        str | None, typer.Option(help=_('what, e.g. "media.loan.create"; "media.*" matches every media action'))
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help=_("at most this many rows (oldest first)"))] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help=_("one JSON object per line"))] = False,
) -> None:
    """Show the admin audit trail, oldest first (`records verify` checks it)."""
    from sekisho.controller.cli import cli_config
    from sekisho.controller.media.cli import jst, parse_when
    from sekisho.controller.service import open_store

    start = parse_when(since) if since else None
    end = parse_when(until) if until else None
    cfg = cli_config(config)
    store = open_store(cfg)
    rows: list[AdminAuditEntry] = []
    try:
        after: int | None = None
        while len(rows) < limit:
            page = store.list_admin(
                since=start, until=end, actor=actor, action=action, after_id=after, limit=min(_PAGE, limit - len(rows))
            )
            rows.extend(page)
            if len(page) < _PAGE:
                break
            after = page[-1].id
    finally:
        store.engine.dispose()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(entry_json(row), ensure_ascii=False, sort_keys=True))
        return
    if not rows:
        console.print(_("no audit records match"))
        return
    table = Table(
        _("time (JST)"),
        _("actor"),
        _("via"),
        _("action"),
        _("target"),
        _("old"),
        _("new"),
        _("detail"),
        title=_("Admin audit trail"),
    )
    for row in rows:
        via = row.via if row.client is None else f"{row.via} {row.client}"
        cells = (row.actor, via, row.action, row.target, _compact(row.old), _compact(row.new), _compact(row.detail))
        # Stored text is data, never markup: a target like "[red]" must print as written.
        table.add_row(jst(row.at), *(escape(cell) for cell in cells))
    console.print(table, soft_wrap=True)
