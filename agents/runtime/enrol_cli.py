"""`sekisho-agent enrol` and `sekisho-agent renew`: join the site with a one-time token, renew the certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sekisho.common.i18n import _

enrol_app = typer.Typer(help=_("Enrolment: join the site with a token; renew the certificate."), no_args_is_help=True)


@enrol_app.command("enrol", help=_("Enrol this device: keys are made here and never leave it; writes agent.toml."))
def enrol_command(
    token: Annotated[
        str,
        typer.Option(
            "--token",
            "-t",
            help=_("enrolment token from `sekisho fleet token create` (or env SEKISHO_TOKEN)"),
            envvar="SEKISHO_TOKEN",
        ),
    ],
    kind: Annotated[str, typer.Option("--kind", help=_("terminal or door (as the token says)"))] = "terminal",
    controller: Annotated[
        str | None,
        typer.Option("--controller", help=_("https://HOST:PORT of the controller (default: from the token)")),
    ] = None,
    directory: Annotated[
        Path, typer.Option("--dir", help=_("where keys, certificate and agent.toml go (made 0700)"), file_okay=False)
    ] = Path("/etc/sekisho/agent"),
    name: Annotated[str | None, typer.Option("--name", help=_("agent name, if the token names none"))] = None,
    force: Annotated[bool, typer.Option("--force", help=_("replace an agent already enrolled in --dir"))] = False,
) -> None:
    """Enrol this device: keys are made here and never leave it; writes agent.toml."""
    from sekisho.agents.runtime.enrol_client import EnrolError, enrol

    try:
        done = enrol(token, directory, kind=kind, controller_url=controller, name=name, force=force)
    except EnrolError as err:
        typer.echo(_("enrolment failed: %(err)s", err=err), err=True)
        raise typer.Exit(1) from err
    typer.echo(
        _(
            "enrolled as %(agent_id)s (%(kind)s); certificate valid until %(done)s, renewed "
            "automatically. Config: %(config_path)s",
            agent_id=done.agent_id,
            kind=done.kind,
            done=done.not_after.isoformat(),
            config_path=done.config_path,
        )
    )


@enrol_app.command(
    "renew", help=_("Renew this agent's certificate now (the running agent uses it from its next connection).")
)
def renew_command(
    config: Annotated[Path, typer.Option("--config", "-c", help=_("agent TOML file"))],
) -> None:
    """Renew this agent's certificate now (the running agent uses it from its next connection)."""
    from sekisho.agents.runtime.cert_renewal import CertificateRenewer, renewal_enabled
    from sekisho.agents.runtime.config import load_config
    from sekisho.agents.runtime.errors import AgentError

    try:
        cfg = load_config(config)
        why = renewal_enabled(cfg)
        if why is not None:
            typer.echo(_("cannot renew: %(why)s", why=why), err=True)
            raise typer.Exit(2)
        leaf = CertificateRenewer(cfg).renew_now()
    except AgentError as err:
        typer.echo(_("renewal failed: %(err)s", err=err), err=True)
        raise typer.Exit(1) from err
    typer.echo(_("renewed: valid until %(leaf)s", leaf=leaf.not_valid_after_utc.isoformat()))
