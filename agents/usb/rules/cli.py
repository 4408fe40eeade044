"""`sekisho usb import-rules FILE`: check a USBGuard rules file and write the representable rules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sekisho.agents.usb.rules.importer import import_rules

app = typer.Typer(help="USB rules in the USBGuard-compatible language.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """USB rules in the USBGuard-compatible language."""


@app.command("import-rules")
def import_rules_command(
    file: Annotated[Path, typer.Argument(help="USBGuard rules file", exists=True, dir_okay=False, readable=True)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the representable rules here")] = None,
) -> None:
    """Import a USBGuard rules file; list every rule that cannot be represented and exit 1 if any."""
    # soft_wrap: one finding per line, whatever the terminal width, so the output stays greppable.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        console.print(f"[red]error:[/] cannot read {escape(str(file))}: {escape(str(err))}")
        raise typer.Exit(2) from err
    report = import_rules(text)
    for problem in report.problems:
        label = "cannot represent" if problem.kind == "unsupported" else "syntax error"
        console.print(f"[red]{label}[/] {escape(str(file))}:{problem.line}:{problem.column}: {escape(problem.reason)}")
        console.print(f"    {escape(problem.text)}", style="dim")
    for warning in report.warnings:
        console.print(f"[yellow]warning[/] {escape(str(file))}:{warning.line}: {escape(warning.reason)}")
    if output is not None:
        output.write_text(report.rules.to_text(), encoding="utf-8")
    console.print(f"{len(report.rules)} rule(s) imported, {len(report.problems)} not representable")
    if report.problems:
        raise typer.Exit(1)
