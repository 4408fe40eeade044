"""`sekisho usb import-rules FILE`: check a USBGuard rules file and write the rules sekisho enforces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sekisho.agents.usb.rules.importer import import_rules
from sekisho.agents.usb.rules.parser import printable, read_rules_text
from sekisho.common.i18n import _

app = typer.Typer(help=_("USB rules in the USBGuard rule language."), no_args_is_help=True)

_LABELS = {"syntax": "syntax error", "unsupported": "cannot represent", "mass_storage": "refused"}


@app.callback(help=_("USB rules in the USBGuard rule language."))
def main() -> None:
    """USB rules in the USBGuard rule language."""


@app.command(
    "import-rules",
    help=_("Import a USBGuard rules file; report every line that is refused (with line and reason) and exit 1 if any."),
)
def import_rules_command(
    file: Annotated[Path, typer.Argument(help=_("USBGuard rules file"), exists=True, dir_okay=False, readable=True)],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help=_("write the imported rules here (only if all were taken)"))
    ] = None,
    allow_mass_storage_outside_register: Annotated[
        bool,
        typer.Option(
            "--allow-mass-storage-outside-register",
            help=_(
                "import allow rules that could let unregistered USB storage in (the media register still "
                "outranks them on My Number terminals)"
            ),
        ),
    ] = False,
) -> None:
    """Import a USBGuard rules file; report every line that is refused (with line and reason) and exit 1 if any."""
    # soft_wrap: one finding per line, whatever the terminal width, so the output stays greppable.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        text = read_rules_text(file.read_bytes())
    except OSError as err:
        console.print(f"[red]error:[/] cannot read {escape(str(file))}: {escape(str(err))}")
        raise typer.Exit(2) from err
    report = import_rules(text, allow_mass_storage_outside_register=allow_mass_storage_outside_register)
    for problem in report.problems:
        label = _LABELS.get(problem.kind, problem.kind)
        console.print(f"[red]{label}[/] {escape(str(file))}:{problem.line}:{problem.column}: {escape(problem.reason)}")
        console.print(f"    {escape(printable(problem.text))}", style="dim")
    for warning in report.warnings:
        console.print(f"[yellow]warning[/] {escape(str(file))}:{warning.line}: {escape(warning.reason)}")
    if report.problems:
        console.print(
            f"{len(report.problems)} line(s) refused, {len(report.rules)} rule(s) parsed; nothing imported"
            + (f" ({escape(str(output))} not written)" if output is not None else "")
        )
        raise typer.Exit(1)
    if output is not None:
        output.write_text(report.rules.to_text(), encoding="utf-8", errors="surrogateescape")
    console.print(f"{len(report.rules)} rule(s) imported")
