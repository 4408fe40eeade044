"""`sekisho alerts …`: the alert book at a terminal, for IT admins and security staff.

List and read alerts as the console shows them (unresolved first, severity, newest; times in JST; titles and
words in the command line's language), acknowledge, resolve and reopen them, add and end silences and
maintenance windows, list and replay notifications that could not be delivered, and open incident reports and
export them as PDF. Reading goes through controller/alerts/listing.py and every change through the book
(controller/alerts/book.py) in one transaction with its admin-trail row, the operator being
``cli:<os-user>@<host>``: the same functions the console and the JSON API call. ``--json`` prints the API's
shapes (controller/api/alerts.py), so a script reads the same fields from either.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sekisho.common.i18n import N_, _, process_lang

if TYPE_CHECKING:
    from sekisho.controller.store.store import Store

app = typer.Typer(
    help=_("Alerts: list and handle them, silences, undelivered notifications, incident reports."),
    no_args_is_help=True,
)
silence_app = typer.Typer(
    help=_("Silences and maintenance windows: matching alerts are recorded and notify nobody."), no_args_is_help=True
)
notifications_app = typer.Typer(
    help=_("Notifications that could not be delivered (the dead-letter list), and their replay."),
    invoke_without_command=True,
)
incident_app = typer.Typer(help=_("Incident reports (breach reports) built from alerts."), no_args_is_help=True)
app.add_typer(silence_app, name="silence")
app.add_typer(notifications_app, name="notifications")
app.add_typer(incident_app, name="incident")

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help=_("one JSON object per line"))]
AlertIdArg = Annotated[int, typer.Argument(help=_("alert id"))]

STATE_WORDS: Final = {
    "open": N_("Not acknowledged"),
    "acknowledged": N_("Acknowledged"),
    "resolved": N_("Resolved"),
}
CONDITION_WORDS: Final = {
    "active": N_("Condition still active"),
    "cleared": N_("Condition cleared"),
    "none": N_("No lasting condition"),
}
CAUSE_WORDS: Final = {
    "intrusion": N_("Intrusion"),
    "misuse": N_("Misuse"),
    "device_fault": N_("Device fault"),
    "operational": N_("Normal operation"),
    "false_alarm": N_("False alarm"),
    "test": N_("Test"),
    "other": N_("Other"),
}
KIND_WORDS: Final = {"silence": N_("Silence"), "maintenance": N_("Maintenance window")}
HISTORY_WORDS: Final = {
    "alert.opened": N_("Opened"),
    "alert.acknowledged": N_("Acknowledged"),
    "alert.resolved": N_("Resolved"),
    "alert.reopened": N_("Reopened"),
    "alert.condition_cleared": N_("Condition cleared"),
    "alert.retriggered": N_("Open again: not resolved in time after the acknowledgement"),
    "alert.uninhibited": N_("No longer held back by an offline agent"),
    "alert.unsilenced": N_("Silence ended: notifications resume"),
    "alert.escalated": N_("Escalated to the next contacts"),
    "alert.notified": N_("Notification delivered"),
    "alert.notification_dead": N_("Notification could not be delivered"),
    "alert.notification_replayed": N_("Notification queued again"),
}
# The book's refusals (AlertRefused.kind, via listing.refusal) in the command line's words; the options named
# are this command line's. A refusal without words here is shown as the book wrote it.
REFUSALS: Final = {
    "required": N_("%(option)s is required"),
    "too_long": N_("%(option)s: at most %(limit)s characters"),
    "bad_cause": N_("--cause: one of %(causes)s"),
    "not_found": N_("there is no alert %(id)s"),
    "not_open": N_("alert %(id)s is not open: someone has acknowledged or resolved it (see `sekisho alerts show`)"),
    "already_resolved": N_("alert %(id)s is already resolved"),
    "not_resolved": N_("alert %(id)s is not resolved: only a resolved alert can be reopened"),
    "needs_override": N_(
        "alert %(id)s: its condition is still active (for example the door still stands open); "
        "to resolve it anyway, say why with --override"
    ),
    "newer_live": N_("alert %(id)s: a newer alert about the same subject is open; work on that one"),
    "bad_period": N_("the end must be after the start"),
    "silence_too_long": N_("a silence lasts at most 31 days; to stop a rule for longer, disable it in the site policy"),
    "silence_everything": N_("name a rule (--rule) or at least one label (--label): a silence never covers everything"),
    "silence_not_active": N_("silence %(id)s is not active: it has ended, or there is no such silence"),
    "not_dead": N_("notification %(id)s is not in the dead-letter list"),
}
OPTIONS: Final = {"comment": "--comment", "note": "--note", "reason": "--reason", "override": "--override"}


# --- shared pieces ----------------------------------------------------------------------------------------


@contextmanager
def _opened(config: Path, *, writing: bool = False) -> Iterator[Store]:
    """Open the controller's store for one command (and close it); a write needs the signing key."""
    from sekisho.controller.cli import cli_config
    from sekisho.controller.service import open_store

    cfg = cli_config(config)
    store = open_store(cfg)
    try:
        if writing:
            if store.signing_key is None:
                err_console.print(
                    _(
                        "[red]cannot read the controller's signing key %(path)s:[/red] the admin trail's checkpoints "
                        "are signed with it (run this as the controller's user)",
                        path=escape(str(cfg.signing_key)),
                    ),
                    soft_wrap=True,
                )
                raise typer.Exit(2)
            # The book appends to the checkpoint log, which must have begun (a controller seals it at start).
            store.seal_existing()
        yield store
    finally:
        store.engine.dispose()


def _fail(text: str) -> typer.Exit:
    # One line on stderr, never wrapped, whatever the terminal's width; the text is data, not markup.
    err_console.print(f"[red]✗[/red] {escape(text)}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


def _refused(err: Exception, ident: int | None = None) -> typer.Exit:
    """Show a refusal of the book (or of the My Number guard) as one line; return the exit to raise (status 1)."""
    from sekisho.controller.alerts import listing
    from sekisho.controller.alerts.book import CAUSES, MAX_TEXT, AlertRefused

    if not isinstance(err, AlertRefused):
        return _fail(str(err))  # MyNumberFound: already in this process's language, never the value
    kind, field = listing.refusal(err)
    if kind not in REFUSALS:
        return _fail(str(err))
    values: dict[str, Any] = {"id": ident, "option": OPTIONS.get(field or "", field or ""), "causes": ", ".join(CAUSES)}
    values["limit"] = MAX_TEXT
    return _fail(_(REFUSALS[kind], **values))


def _when(moment: datetime | None) -> str:
    """Show a stored moment in JST as the console does: `2026/12/06 (日) 14:03` (Japanese)."""
    from sekisho.controller.console.formats import jst

    return jst(moment, process_lang()) or "—"


def _words(table: dict[str, str], key: str | None) -> str:
    return "—" if key is None else _(table[key]) if key in table else key


def _severity(severity: str) -> str:
    from sekisho.controller.alerts.texts import SEVERITY_NAMES

    return _(SEVERITY_NAMES[severity]) if severity in SEVERITY_NAMES else severity


def _title(row: Any) -> str:
    from sekisho.controller.alerts import listing, texts

    return texts.title(process_lang(), row.rule, listing.labels_of(row))


def _compact(value: Any) -> str:
    if value is None or value == {}:
        return "—"
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def _labels(labels: dict[str, Any] | None) -> str:
    # The site is the same for every alert of a controller: only the labels that say where within it.
    return ", ".join(f"{k}={v}" for k, v in sorted((labels or {}).items()) if k != "site") or "—"


def _change(entry: Any) -> str:
    """Return a trail row's old → new and detail on one line, without what the alert's header already shows."""

    def kept(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: v for k, v in value.items() if v is not None and k not in ("labels", "rule", "severity")}

    old, new, detail = kept(entry.old), kept(entry.new), kept(entry.detail)
    parts = [f"{_compact(old)} → {_compact(new)}"] if old else [_compact(new)] if new else []
    if detail:
        parts.append(_compact(detail))
    return " ".join(parts) or "—"


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False, sort_keys=True))


def _api_json(name: str) -> Callable[[Any], Any]:
    """Return a row → JSON model function of the API (imported only when --json asks: it loads FastAPI)."""

    def to_json(row: Any) -> Any:
        from sekisho.controller.api import alerts as api

        return getattr(api, name)(row)

    return to_json


def _print_rows(
    rows: Sequence[Any],
    *,
    as_json: bool,
    to_json: Callable[[Any], Any],
    empty: str,
    title: str,
    headings: Sequence[str],
    cells: Callable[[Any], Sequence[str]],
) -> None:
    """Print rows as JSON lines (the API's shape), else as a table, or say that there are none."""
    if as_json:
        for row in rows:
            _echo_json(to_json(row).model_dump(mode="json"))
        return
    if not rows:
        console.print(empty)
        return
    table = Table(*headings, title=title)
    for row in rows:
        table.add_row(*cells(row))
    console.print(table, soft_wrap=True)


def _choice(value: str | None, allowed: tuple[str, ...], option: str) -> None:
    if value is not None and value not in allowed:
        raise typer.BadParameter(_("one of %(choices)s", choices=", ".join(allowed)), param_hint=option)


def _now() -> datetime:
    from sekisho.protocol import timefmt

    return timefmt.now()


# --- reading ----------------------------------------------------------------------------------------------


@app.command("list", help=_("List alerts: unresolved first, then by severity and newest (the console's order)."))
def list_alerts(
    config: ConfigOpt,
    all_: Annotated[bool, typer.Option("--all", help=_("resolved alerts too (default: unresolved ones)"))] = False,
    state: Annotated[
        str | None, typer.Option(help=_("only alerts in this state: open, acknowledged, resolved, unresolved"))
    ] = None,
    severity: Annotated[
        str | None, typer.Option(help=_("only alerts of this severity: critical, high, medium, low"))
    ] = None,
    rule: Annotated[str | None, typer.Option(help=_("only alerts of this rule, e.g. door_forced"))] = None,
    # 50 is the console's page (listing.DEFAULT_LIMIT), written out: the backend loads only when a command runs.
    limit: Annotated[int, typer.Option(min=1, help=_("at most this many alerts"))] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List alerts: unresolved first, then by severity and newest (the console's order)."""
    from sekisho.controller.alerts import listing
    from sekisho.controller.alerts.rules import RULES

    _choice(state, listing.STATE_CHOICES, "--state")
    _choice(severity, listing.SEVERITIES, "--severity")
    _choice(rule, tuple(RULES), "--rule")
    flt = listing.AlertFilter(state=state or (None if all_ else "unresolved"), severity=severity, rule=rule)
    rows: list[Any] = []
    with _opened(config) as store, store.engine.connect() as conn:
        cursor: str | None = None
        while len(rows) < limit:
            found = listing.page(conn, flt, cursor=cursor, limit=min(listing.MAX_LIMIT, limit - len(rows)))
            rows += found.rows
            if found.next_cursor is None:
                break
            cursor = found.next_cursor
    _print_rows(
        rows,
        as_json=as_json,
        to_json=_api_json("alert_json"),
        empty=_("no alerts match"),
        title=_("Alerts"),
        headings=[
            _("id"),
            _("severity"),
            _("handling"),
            _("alert"),
            _("count"),
            _("first seen (JST)"),
            _("last seen (JST)"),
            _("condition"),
        ],
        cells=lambda row: [
            str(row.id),
            _severity(row.severity),
            _words(STATE_WORDS, row.state),
            escape(_title(row)),
            str(row.count),
            _when(row.first_at),
            _when(row.last_at),
            _words(CONDITION_WORDS, row.condition),
        ],
    )


def _detail_json(row: Any, events: list[Any], trail: list[Any]) -> dict[str, Any]:
    from sekisho.controller.alerts import texts
    from sekisho.controller.api.alerts import AlertEventPublic, HistoryPublic, alert_json, event_summary

    return {
        "alert": alert_json(row).model_dump(mode="json"),
        "procedure": {lang: texts.procedure(lang, row.rule) for lang in ("ja", "en")},
        "events": [
            AlertEventPublic(
                id=e.id,
                event_id=e.event_id,
                occurred_at=e.occurred_at,
                type=e.type,
                agent_id=e.agent_id,
                summary=event_summary(e.payload),
            ).model_dump(mode="json")
            for e in events
        ],
        "history": [
            HistoryPublic(
                at=h.at, actor=h.actor, via=h.via, action=h.action, old=h.old, new=h.new, detail=h.detail
            ).model_dump(mode="json")
            for h in trail
        ],
    }


@app.command("show", help=_("Show one alert: what and where, its handling, the procedure, its events and history."))
def show(alert_id: AlertIdArg, config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Show one alert: what and where, its handling, the procedure, its events and history."""
    from sekisho.controller.alerts import listing, texts
    from sekisho.controller.api.alerts import event_summary

    with _opened(config) as store, store.engine.connect() as conn:
        row = listing.get(conn, alert_id)
        if row is None:
            raise _fail(_(REFUSALS["not_found"], id=alert_id))
        events = listing.events_of(conn, alert_id)
        trail = listing.history(conn, alert_id)
    if as_json:
        _echo_json(_detail_json(row, events, trail))
        return
    console.print(f"[bold]#{row.id} {escape(_title(row))}[/bold]", soft_wrap=True)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row(_("severity"), _severity(row.severity))
    facts.add_row(_("handling"), _words(STATE_WORDS, row.state))
    facts.add_row(_("condition"), _words(CONDITION_WORDS, row.condition))
    facts.add_row(_("where"), escape(_labels(row.labels)))
    facts.add_row(_("count"), str(row.count))
    facts.add_row(_("first seen (JST)"), _when(row.first_at))
    facts.add_row(_("last seen (JST)"), _when(row.last_at))
    if row.silenced_by is not None:
        facts.add_row(_("silenced"), _("by silence %(id)s", id=row.silenced_by))
    if row.inhibited_by is not None:
        facts.add_row(_("held back"), escape(str(row.inhibited_by)))
    if row.acked_at is not None:
        facts.add_row(_("acknowledged"), f"{_when(row.acked_at)} {escape(str(row.acked_by))}")
        facts.add_row(_("comment"), escape(row.ack_comment or "—"))
    if row.resolved_at is not None:
        facts.add_row(_("resolved"), f"{_when(row.resolved_at)} {escape(str(row.resolved_by))}")
        facts.add_row(_("cause"), _words(CAUSE_WORDS, row.cause))
        facts.add_row(_("note"), escape(row.resolution or "—"))
        if row.override:
            facts.add_row(_("override"), escape(row.override))
    console.print(facts, soft_wrap=True)
    console.print()
    console.print(_("What to do:"), style="bold")
    console.print(escape(texts.procedure(process_lang(), row.rule)), soft_wrap=True)
    console.print()
    behind = Table(_("time (JST)"), _("event"), _("agent"), _("summary"), title=_("Events behind the alert"))
    for e in events:
        behind.add_row(
            _when(e.occurred_at), escape(e.type), escape(e.agent_id), escape(_labels(event_summary(e.payload)))
        )
    if row.count > len(events):
        behind.caption = _("%(shown)s of %(count)s occurrences kept", shown=len(events), count=row.count)
    console.print(behind, soft_wrap=True)
    history = Table(_("time (JST)"), _("who"), _("what"), _("details"), title=_("History"))
    for h in trail:
        history.add_row(_when(h.at), escape(h.actor), escape(_words(HISTORY_WORDS, h.action)), escape(_change(h)))
    console.print(history, soft_wrap=True)


# --- handling ---------------------------------------------------------------------------------------------


@app.command("ack", help=_("Acknowledge an open alert with what you are doing about it (its escalation stops)."))
def acknowledge(
    alert_id: AlertIdArg,
    config: ConfigOpt,
    comment: Annotated[str, typer.Option(help=_("what you are doing about it (kept in the admin trail)"))],
) -> None:
    """Acknowledge an open alert with what you are doing about it (its escalation stops)."""
    from sekisho.controller.alerts import book, listing
    from sekisho.controller.audit.operators import cli_operator
    from sekisho.controller.store.db import write_transaction
    from sekisho.protocol.mynumber import MyNumberFound

    with _opened(config, writing=True) as store:
        settings = listing.alert_settings(store)
        try:
            with write_transaction(store.engine) as conn:
                book.acknowledge(conn, store.signing_key, settings, alert_id, cli_operator(), comment, _now())
        except (book.AlertRefused, MyNumberFound) as err:
            raise _refused(err, alert_id) from err
    console.print(_("acknowledged alert %(id)s", id=alert_id))


@app.command("resolve", help=_("Resolve an alert with what was found and its cause."))
def resolve(
    alert_id: AlertIdArg,
    config: ConfigOpt,
    note: Annotated[str, typer.Option(help=_("what was found and done (kept in the admin trail)"))],
    cause: Annotated[
        str, typer.Option(help=_("the cause: intrusion, misuse, device_fault, operational, false_alarm, test, other"))
    ],
    override: Annotated[
        str | None, typer.Option(help=_("why resolve while its condition is still active (a door still open…)"))
    ] = None,
) -> None:
    """Resolve an alert with what was found and its cause."""
    from sekisho.controller.alerts import book

    _choice(cause, book.CAUSES, "--cause")
    from sekisho.controller.audit.operators import cli_operator
    from sekisho.controller.store.db import write_transaction
    from sekisho.protocol.mynumber import MyNumberFound

    with _opened(config, writing=True) as store:
        try:
            with write_transaction(store.engine) as conn:
                book.resolve(conn, store.signing_key, alert_id, cli_operator(), note, cause, _now(), override=override)
        except (book.AlertRefused, MyNumberFound) as err:
            raise _refused(err, alert_id) from err
    console.print(_("resolved alert %(id)s (%(cause)s)", id=alert_id, cause=_words(CAUSE_WORDS, cause)))


@app.command("reopen", help=_("Reopen a resolved alert (its escalation starts again)."))
def reopen(
    alert_id: AlertIdArg,
    config: ConfigOpt,
    reason: Annotated[str, typer.Option(help=_("why it is reopened (kept in the admin trail)"))],
) -> None:
    """Reopen a resolved alert (its escalation starts again)."""
    from sekisho.controller.alerts import book, listing
    from sekisho.controller.audit.operators import cli_operator
    from sekisho.controller.store.db import write_transaction
    from sekisho.protocol.mynumber import MyNumberFound

    with _opened(config, writing=True) as store:
        settings = listing.alert_settings(store)
        try:
            with write_transaction(store.engine) as conn:
                book.reopen(conn, store.signing_key, settings, alert_id, cli_operator(), reason, _now())
        except (book.AlertRefused, MyNumberFound) as err:
            raise _refused(err, alert_id) from err
    console.print(_("reopened alert %(id)s", id=alert_id))


# --- silences ---------------------------------------------------------------------------------------------


def _matchers(labels: list[str]) -> dict[str, str]:
    from sekisho.controller.api.alerts import MATCHER_KEYS

    out: dict[str, str] = {}
    for text in labels:
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in MATCHER_KEYS or not value:
            raise typer.BadParameter(
                _("KEY=VALUE with KEY one of %(keys)s", keys=", ".join(MATCHER_KEYS)), param_hint="--label"
            )
        if key in out and out[key] != value:
            raise typer.BadParameter(_("%(key)s given twice", key=key), param_hint="--label")
        out[key] = value
    return out


@silence_app.command("add", help=_("Add a silence or maintenance window: a rule and/or labels, at most 31 days."))
def silence_add(
    config: ConfigOpt,
    reason: Annotated[str, typer.Option(help=_("why (kept in the admin trail)"))],
    maintenance: Annotated[
        bool, typer.Option("--maintenance", help=_("a maintenance window rather than a silence"))
    ] = False,
    rule: Annotated[str | None, typer.Option(help=_("only alerts of this rule, e.g. door_forced"))] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help=_("KEY=VALUE: only alerts with this label (door, area, agent, person, terminal, reader)")),
    ] = None,
    start: Annotated[str | None, typer.Option(help=_("from, ISO 8601 (JST if no offset; default: now)"))] = None,
    until: Annotated[str | None, typer.Option(help=_("until, ISO 8601 (JST if no offset)"))] = None,
    hours: Annotated[float | None, typer.Option(help=_("for this many hours from the start"))] = None,
) -> None:
    """Add a silence or maintenance window: a rule and/or labels, at most 31 days."""
    from sekisho.controller.alerts import book
    from sekisho.controller.alerts.rules import RULES
    from sekisho.controller.audit.operators import cli_operator
    from sekisho.controller.media.cli import parse_when
    from sekisho.controller.store.db import write_transaction
    from sekisho.protocol.mynumber import MyNumberFound

    _choice(rule, tuple(RULES), "--rule")
    if (until is None) == (hours is None):
        raise typer.BadParameter(_("give either --until or --hours"), param_hint="--until / --hours")
    matchers = _matchers(label or [])
    now = _now()
    starts_at = parse_when(start) if start else now
    ends_at = parse_when(until) if until else starts_at + timedelta(hours=hours or 0)
    kind: Literal["silence", "maintenance"] = "maintenance" if maintenance else "silence"
    with _opened(config, writing=True) as store:
        try:
            with write_transaction(store.engine) as conn:
                silence_id = book.add_silence(
                    conn, store.signing_key, cli_operator(), kind=kind, rule=rule, matchers=matchers,
                    starts_at=starts_at, ends_at=ends_at, reason=reason, now=now,
                )  # fmt: skip
        except (book.AlertRefused, MyNumberFound) as err:
            raise _refused(err) from err
    console.print(
        _(
            "added %(kind)s %(id)s: %(start)s – %(end)s",
            kind=_(KIND_WORDS[kind]),
            id=silence_id,
            start=_when(starts_at),
            end=_when(ends_at),
        )
    )


@silence_app.command("list", help=_("List the silences and maintenance windows in force or still to come."))
def silence_list(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """List the silences and maintenance windows in force or still to come."""
    from sekisho.controller.alerts import book

    with _opened(config) as store, store.engine.connect() as conn:
        rows = book.active_silences(conn, _now())
    _print_rows(
        rows,
        as_json=as_json,
        to_json=_api_json("silence_json"),
        empty=_("no silence or maintenance window in force or to come"),
        title=_("Silences and maintenance windows"),
        headings=[
            _("id"),
            _("kind"),
            _("rule"),
            _("labels"),
            _("from (JST)"),
            _("until (JST)"),
            _("reason"),
            _("set by"),
        ],
        cells=lambda row: [
            str(row.id),
            _words(KIND_WORDS, row.kind),
            escape(row.rule or "—"),
            escape(_labels(row.matchers)),
            _when(row.starts_at),
            _when(row.ends_at),
            escape(row.reason),
            escape(row.created_by),
        ],
    )


@silence_app.command("end", help=_("End a silence or maintenance window now."))
def silence_end(
    silence_id: Annotated[int, typer.Argument(help=_("silence id"))],
    config: ConfigOpt,
) -> None:
    """End a silence or maintenance window now."""
    from sekisho.controller.alerts import book
    from sekisho.controller.audit.operators import cli_operator
    from sekisho.controller.store.db import write_transaction

    with _opened(config, writing=True) as store:
        try:
            with write_transaction(store.engine) as conn:
                book.end_silence(conn, store.signing_key, cli_operator(), silence_id, _now())
        except book.AlertRefused as err:
            raise _refused(err, silence_id) from err
    console.print(_("ended silence %(id)s", id=silence_id))


# --- notifications that could not be delivered --------------------------------------------------------------


@notifications_app.callback()
def notifications(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help=_("controller.toml"), exists=True, dir_okay=False),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the notifications that could not be delivered, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        raise typer.BadParameter(_("--config is required"), param_hint="--config")
    from sekisho.controller.alerts import delivery
    from sekisho.controller.alerts.texts import KIND_NAMES

    with _opened(config) as store:
        rows = delivery.dead_letters(store)
    _print_rows(
        rows,
        as_json=as_json,
        to_json=_api_json("notification_json"),
        empty=_("every notification was delivered (no dead letters)"),
        title=_("Notifications that could not be delivered"),
        headings=[
            _("id"),
            _("alert"),
            _("kind"),
            _("channel"),
            _("to"),
            _("attempts"),
            _("created (JST)"),
            _("last error"),
        ],
        cells=lambda row: [
            str(row.id),
            str(row.alert_id),
            _(KIND_NAMES[row.kind]) if row.kind in KIND_NAMES else escape(row.kind),
            escape(row.channel),
            escape(row.target if row.contact in (None, row.target) else f"{row.contact} ({row.target})"),
            str(row.attempts),
            _when(row.created_at),
            escape(row.last_error or "—"),
        ],
    )


@notifications_app.command(
    "replay", help=_("Put a dead notification back in the outbox: the controller sends it at its next round.")
)
def replay(
    notification_id: Annotated[int, typer.Argument(help=_("notification id"))],
    config: ConfigOpt,
) -> None:
    """Put a dead notification back in the outbox: the controller sends it at its next round."""
    from sekisho.controller.alerts import book, delivery
    from sekisho.controller.audit.operators import cli_operator

    with _opened(config, writing=True) as store:
        try:
            delivery.replay(store, notification_id, cli_operator(), _now())
        except book.AlertRefused as err:
            raise _refused(err, notification_id) from err
    console.print(_("notification %(id)s is queued again", id=notification_id))


# --- incident reports -----------------------------------------------------------------------------------------


@incident_app.command("list", help=_("List the incident reports, open ones first, newest discovery first."))
def incident_list(config: ConfigOpt) -> None:
    """List the incident reports, open ones first, newest discovery first."""
    from sekisho.controller.alerts import incidents

    with _opened(config) as store, store.engine.connect() as conn:
        rows = incidents.list_incidents(conn)
    if not rows:
        console.print(_("no incident reports"))
        return
    half = 0 if process_lang() == "ja" else 1
    table = Table(
        _("id"),
        _("title"),
        _("status"),
        _("found (JST)"),
        _("occurred (JST)"),
        _("final report due (JST)"),
        _("updated by"),
        title=_("Incident reports"),
    )
    for row in rows:
        due = incidents.deadlines(row.found_at, bool(row.malicious)).final
        table.add_row(
            str(row.id),
            escape(row.title),
            incidents.STATUS_LABELS[row.status][half] if row.status in incidents.STATUS_LABELS else row.status,
            _when(row.found_at),
            _when(row.occurred_at),
            "—" if row.status in ("final", "closed") else _when(due),
            escape(row.updated_by),
        )
    console.print(table, soft_wrap=True)


@incident_app.command("create", help=_("Open a draft incident report from one or more alerts."))
def incident_create(
    alert_ids: Annotated[list[int], typer.Argument(help=_("the alerts it is about"))],
    config: ConfigOpt,
    title: Annotated[str, typer.Option(help=_("the report's title (default: the first alert's title)"))] = "",
) -> None:
    """Open a draft incident report from one or more alerts."""
    from sqlalchemy import select

    from sekisho.controller.alerts import book, incidents
    from sekisho.controller.audit.operators import cli_operator
    from sekisho.controller.store.db import write_transaction
    from sekisho.protocol.mynumber import MyNumberFound

    with _opened(config, writing=True) as store:
        try:
            with write_transaction(store.engine) as conn:
                known = set(conn.execute(select(book.ALERTS.c.id).where(book.ALERTS.c.id.in_(alert_ids))).scalars())
                missing = sorted(set(alert_ids) - known)
                if missing:
                    raise _fail(_(REFUSALS["not_found"], id=missing[0]))
                incident_id = incidents.create_from_alerts(
                    conn, store.signing_key, cli_operator(), alert_ids, title, _now()
                )
        except (incidents.IncidentRefused, MyNumberFound) as err:
            raise _fail(str(err)) from err
    console.print(
        _("created incident report %(id)s (draft) from %(count)s alert(s)", id=incident_id, count=len(set(alert_ids)))
    )


@incident_app.command(
    "pdf", help=_("Export an incident report as an A4 PDF (the export is recorded in the admin trail).")
)
def incident_pdf(
    incident_id: Annotated[int, typer.Argument(help=_("incident report id"))],
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help=_("the PDF file to write"), dir_okay=False)],
) -> None:
    """Export an incident report as an A4 PDF (the export is recorded in the admin trail)."""
    from sekisho.common.files import write_atomically
    from sekisho.controller.alerts import incidents
    from sekisho.controller.audit.operators import cli_operator

    operator = cli_operator()
    with _opened(config, writing=True) as store:
        with store.engine.connect() as conn:
            try:
                found = incidents.read(conn, incident_id)
            except incidents.IncidentRefused as err:
                raise _fail(_("there is no incident report %(id)s", id=incident_id)) from err
        now = _now()
        pdf = incidents.render_pdf(found, exporter=operator.actor, exported_at=now)
        # Recorded before the file is written (as every export is): a refused record leaves no file behind.
        store.record_export(
            operator.actor,
            operator.via,
            operator.client,
            register=f"incident:{incident_id}",
            format="pdf",
            filters={"incident": incident_id},
            rows=len(found["alerts"]),
        )
    write_atomically(output, pdf, mode=0o600)
    console.print(_("wrote %(output)s", output=escape(str(output))))
