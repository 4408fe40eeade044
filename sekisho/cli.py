"""The `sekisho` command line: one entry point for agents, controller, PKI, policy, records, bench, demo."""

from __future__ import annotations

import typer

from agents.runtime.cli import app as agent_app
from agents.usb.rules.cli import app as usb_app
from controller.cli import controller_app, policy_app, records_app
from controller.doors.cli import app as doors_app
from controller.media.cli import app as media_app
from deploy.cli import app as pki_app
from sekisho.bench import bench_app
from sekisho.demo import demo

app = typer.Typer(
    name="sekisho",
    help="sekisho (関所): card, fingerprint, USB and door control for My Number handling sites.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold keys; never print them
)
app.add_typer(pki_app, name="pki", help="Create the CA, broker, controller and agent certificates.")
app.add_typer(agent_app, name="agent", help="Run an endpoint agent.")
app.add_typer(controller_app, name="controller")
app.add_typer(policy_app, name="policy")
app.add_typer(records_app, name="records")
app.add_typer(media_app, name="media")
app.add_typer(doors_app, name="doors")
app.add_typer(usb_app, name="usb", help="USB media guard tools (rule import).")
app.add_typer(bench_app, name="bench")
app.command("demo")(demo)
