"""The `sekisho` command line: one entry point for agents, controller, PKI, policy, records, bench, demo."""

from __future__ import annotations

import typer

from sekisho.agents.runtime.cli import app as agent_app
from sekisho.agents.usb.rules.cli import app as usb_app
from sekisho.cards_cli import app as cards_app
from sekisho.common.i18n import _
from sekisho.controller.accounts.cli import app as users_app
from sekisho.controller.alerts.cli import app as alerts_app
from sekisho.controller.audit.cli import app as audit_app
from sekisho.controller.backup.cli import backup, restore
from sekisho.controller.cli import controller_app, policy_app, records_app
from sekisho.controller.doors.cli import app as doors_app
from sekisho.controller.fleet.cli import app as fleet_app
from sekisho.controller.media.cli import app as media_app
from sekisho.deploy.cli import app as pki_app

app = typer.Typer(
    name="sekisho",
    help=_("sekisho: card, fingerprint, USB and door control for My Number handling sites."),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold keys; never print them
)
app.add_typer(pki_app, name="pki", help=_("Create the CA, broker, controller and agent certificates."))
app.add_typer(agent_app, name="agent", help=_("Run an endpoint agent."))
controller_app.command(
    "backup", help=_("Copy the store consistently (SQLite online backup / pg_dump) with a signed manifest.")
)(backup)
controller_app.command(
    "restore",
    help=_("Verify a backup, replace the store with it, keep policy versions monotonic and name what was lost."),
)(restore)
app.add_typer(controller_app, name="controller")
app.add_typer(policy_app, name="policy")
app.add_typer(records_app, name="records")
app.add_typer(media_app, name="media")
app.add_typer(doors_app, name="doors")
app.add_typer(fleet_app, name="fleet")
app.add_typer(cards_app, name="cards")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.add_typer(alerts_app, name="alerts")
app.add_typer(usb_app, name="usb", help=_("USB media guard tools (rule import)."))

try:
    # The demo and the benchmarks (with the lab that runs them) live only in a source checkout: they are
    # not shipped in the agent or controller install, so those hosts get a clear word instead of a traceback.
    from sekisho.bench import bench_app
    from sekisho.lab.demo import demo
except ModuleNotFoundError as err:
    if err.name is None or not err.name.startswith(("sekisho.bench", "sekisho.lab", "sekisho.firmware_stubs")):
        raise

    @app.command(
        "demo",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help=_("Run from a source checkout: the demo and the benchmarks are not part of this install."),
    )
    @app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help=_("Run from a source checkout: the demo and the benchmarks are not part of this install."),
    )
    def _checkout_only() -> None:
        """Run from a source checkout: the demo and the benchmarks are not part of this install."""
        typer.echo(
            "sekisho demo / sekisho bench run from a source checkout (./dev.sh demo); "
            "this install carries the agent and controller only.",
            err=True,
        )
        raise typer.Exit(2) from None
else:
    app.add_typer(bench_app, name="bench")
    app.command(
        "demo", help=_("Run a demo site: its own mosquitto (mTLS + ACL), the controller on SQLite, simulated agents.")
    )(demo)
