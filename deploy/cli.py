"""`sekisho pki`: create the PKI of the MQTT transport and issue agent credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sekisho.common.i18n import _
from sekisho.deploy import broker, emqx, pki
from sekisho.protocol import errors as sekisho_errors
from sekisho.protocol import signing

app = typer.Typer(
    help=_("Create the MQTT transport's PKI (CA, broker, controller) and issue agent credentials."),
    no_args_is_help=True,
)

DirOption = Annotated[Path, typer.Option("--dir", help=_("PKI directory."), file_okay=False)]
DEFAULT_DIR = Path("./var/pki")


def _describe(path: Path) -> str:
    # Only public facts are shown: certificate subject, expiry and fingerprint, signing key id.
    if path.name.endswith(".crt"):
        cert = pki.load_cert(path)
        expires = cert.not_valid_after_utc.date().isoformat()
        return (
            f"certificate {escape(cert.subject.rfc4514_string())}, expires {expires}, "
            f"sha256 {pki.cert_fingerprint(path)}"
        )
    if path.name.endswith(".pub"):
        return f"Ed25519 public key, key id {signing.key_id(signing.load_public_key(path))}"
    return "private key (mode 0600, keep secret)"


def _report(console: Console, title: str, paths: list[Path]) -> None:
    console.print(f"[bold green]{escape(title)}[/]", soft_wrap=True)
    for path in paths:
        # soft_wrap keeps fingerprints and key ids on one line, whole, whatever the terminal width.
        console.print(f"  {escape(str(path))}: {_describe(path)}", soft_wrap=True)


def _fail(err: Exception) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
    return typer.Exit(code=1)


@app.command(
    "init",
    help=_("Create the site CA, the controller CA, the broker's and the controller's certificates and signing key."),
)
def init_command(
    directory: DirOption = DEFAULT_DIR,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help=_("Extra broker host name or IP address (repeatable).")),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help=_("Replace an existing CA (every agent must then be re-issued)."))
    ] = False,
) -> None:
    """Create the site CA, the controller CA, the broker's and the controller's certificates and signing key."""
    try:
        paths = pki.init_pki(directory, hosts=host or (), force=force)
    except pki.PkiError as err:
        raise _fail(err) from err
    _report(
        Console(),
        f"PKI written to {paths.directory}",
        [
            paths.ca_cert,
            paths.ca_key,
            paths.controller_ca_cert,
            paths.controller_ca_key,
            paths.broker_cert,
            paths.broker_key,
            paths.controller_cert,
            paths.controller_key,
            paths.controller_signing_pub,
            paths.controller_signing_key,
        ],
    )
    if force:
        Console().print("[yellow]The CA changed: issue every agent again (issue-agent NAME --force).[/]")


@app.command(
    "upgrade",
    help=_("Bring an existing PKI up to date: add the controller CA and re-issue the controller's certificate."),
)
def upgrade_command(directory: DirOption = DEFAULT_DIR) -> None:
    """Bring an existing PKI up to date: add the controller CA and re-issue the controller's certificate.

    The site CA, the broker's and the agents' certificates stay as they are. Run it once when upgrading a
    site made before the controller CA existed (docs/operations.md); running it again changes nothing.
    """
    try:
        result = pki.upgrade_pki(directory)
    except pki.PkiError as err:
        raise _fail(err) from err
    console = Console()
    paths = result.paths
    if not (result.created_controller_ca or result.reissued_controller_cert):
        console.print(f"[bold green]{escape(str(paths.directory))} is up to date[/]", soft_wrap=True)
    else:
        changed = []
        if result.created_controller_ca:
            changed += [paths.controller_ca_cert, paths.controller_ca_key]
        changed += [paths.controller_cert, paths.controller_key]
        _report(console, f"PKI upgraded in {paths.directory}", changed)
        console.print(
            "[yellow]Install controller-ca/ca.crt on the broker (controllers' listener) and the new "
            "controller/tls.crt and tls.key on every controller host.[/]",
            soft_wrap=True,
        )
    if result.reserved_agents:
        names = escape(", ".join(result.reserved_agents))
        Console(stderr=True).print(
            f"[bold red]warning:[/] reserved agent names (their client ids could take over a controller's): {names}. "
            "Issue these agents again under new names and revoke the old certificates.",
            soft_wrap=True,
        )


@app.command("issue-agent", help=_("Issue an agent's TLS certificate and signing key into DIR/agents/NAME."))
def issue_agent_command(
    name: Annotated[str, typer.Argument(help=_("Agent id; also the certificate CN and the MQTT username."))],
    directory: DirOption = DEFAULT_DIR,
    force: Annotated[bool, typer.Option("--force", help=_("Replace the agent's existing credentials."))] = False,
) -> None:
    """Issue an agent's TLS certificate and signing key into DIR/agents/NAME."""
    try:
        creds = pki.issue_agent(directory, name, force=force)
    except pki.PkiError as err:
        raise _fail(err) from err
    _report(
        Console(),
        f"Agent {name} written to {creds.directory} (copy this directory to the agent)",
        [
            creds.tls_cert,
            creds.tls_key,
            creds.signing_pub,
            creds.signing_key,
            creds.ca_cert,
            creds.controller_signing_pub,
        ],
    )


CaKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-key", help=_("The site CA's key where it is kept offline (default: DIR/ca.key)."), dir_okay=False
    ),
]


@app.command("issue-api-cert", help=_("Issue the controller API's HTTPS certificate into DIR/api."))
def issue_api_cert_command(
    host: Annotated[list[str], typer.Option("--host", help=_("Host name or IP address devices use (repeatable)."))],
    directory: DirOption = DEFAULT_DIR,
    ca_key: CaKeyOption = None,
    force: Annotated[bool, typer.Option("--force", help=_("Replace an existing API certificate."))] = False,
) -> None:
    """Issue the controller API's HTTPS certificate into DIR/api.

    It comes from the site CA, whose fingerprint every enrolment token carries: set api_tls_cert and
    api_tls_key in controller.toml to these files.
    """
    try:
        ident = pki.issue_api_cert(directory, host, force=force, ca_key_path=ca_key)
    except pki.PkiError as err:
        raise _fail(err) from err
    _report(Console(), f"API certificate written to {ident.cert.parent}", [ident.cert, ident.key])


@app.command("issuing-ca", help=_("Create the issuing sub-CA that signs enrolled agents' certificates."))
def issuing_ca_command(
    directory: DirOption = DEFAULT_DIR,
    ca_key: CaKeyOption = None,
    force: Annotated[bool, typer.Option("--force", help=_("Replace the existing issuing CA."))] = False,
) -> None:
    """Create the issuing sub-CA that signs enrolled agents' certificates.

    Copy DIR/issuing-ca/ to the controller's API host (enrol_ca_cert, enrol_ca_key) and keep the site CA's
    ca.key offline: the broker trusts the site CA, agents present their certificate with this CA as chain.
    """
    try:
        issuing = pki.init_issuing_ca(directory, force=force, ca_key_path=ca_key)
    except pki.PkiError as err:
        raise _fail(err) from err
    _report(Console(), f"Issuing CA written to {issuing.directory}", [issuing.cert, issuing.key])


@app.command("issue-site", help=_("Issue a site broker's bridge certificate (CN site.NAME) into DIR/sites/NAME."))
def issue_site_command(
    name: Annotated[str, typer.Argument(help=_("Site name: lower-case letters, digits, '-', '_'."))],
    directory: DirOption = DEFAULT_DIR,
    force: Annotated[bool, typer.Option("--force", help=_("Replace the site's existing certificate."))] = False,
) -> None:
    """Issue a site broker's bridge certificate (CN site.NAME) into DIR/sites/NAME.

    The first site also creates the site bridge CA (DIR/site-ca), which only the central broker's sites
    listener trusts (docs/operations.md, "Sites and the central broker").
    """
    try:
        creds = pki.issue_site(directory, name, force=force)
    except pki.PkiError as err:
        raise _fail(err) from err
    _report(
        Console(),
        f"Site {name} written to {creds.directory} (copy this directory to the site broker)",
        [creds.tls_cert, creds.tls_key, creds.ca_cert],
    )


def _write_or_print(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=False)
    else:
        pki.write_public(out, text.encode())
        Console(stderr=True).print(f"written to {escape(str(out))}", soft_wrap=True)


OutOption = Annotated[
    Path | None, typer.Option("--out", help=_("Write to this file instead of standard output."), dir_okay=False)
]


@app.command("site-bridge", help=_("Print the bridge section of a site broker's mosquitto.conf."))
def site_bridge_command(
    name: Annotated[str, typer.Argument(help=_("Site name, as given to issue-site."))],
    central: Annotated[str, typer.Option("--central", help=_("The central broker's sites listener, HOST:PORT."))],
    agent: Annotated[list[str], typer.Option("--agent", help=_("An agent behind this site broker (repeatable)."))],
    certs_dir: Annotated[
        Path,
        typer.Option("--certs-dir", help=_("Where the site broker keeps DIR/sites/NAME's files."), file_okay=False),
    ] = Path("/etc/mosquitto/sekisho/site"),
    out: OutOption = None,
) -> None:
    """Print the bridge section of a site broker's mosquitto.conf (append it at the end of that file)."""
    host, sep, port = central.rpartition(":")
    try:
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--central {central!r}: expected HOST:PORT")
        pki.check_site_name(name)
        spec = broker.BridgeSpec(
            site=name,
            central_host=host.strip("[]"),
            central_port=int(port),
            agents=tuple(agent),
            cert=certs_dir / "tls.crt",
            key=certs_dir / "tls.key",
            cafile=certs_dir / "ca.crt",
        )
        text = broker.render_bridge(spec)
    except (ValueError, pki.PkiError, sekisho_errors.Rejected) as err:
        raise _fail(err) from err
    _write_or_print(text, out)


@app.command("sites-acl", help=_("Print the ACL of the central broker's sites listener."))
def sites_acl_command(
    site: Annotated[
        list[str], typer.Option("--site", help=_("NAME=AGENT,AGENT,...: a site and the agents behind it (repeatable)."))
    ],
    out: OutOption = None,
    for_emqx: Annotated[
        bool, typer.Option("--emqx", help=_("Write EMQX's acl.conf (the whole central tier's rules) instead."))
    ] = False,
) -> None:
    """Print the ACL of the central broker's sites listener: each site reaches its own agents' topics only."""
    sites: dict[str, list[str]] = {}
    try:
        for entry in site:
            name, sep, agents = entry.partition("=")
            if not sep or name in sites:
                raise ValueError(f"--site {entry!r}: expected NAME=AGENT,AGENT,... once per site")
            sites[name] = [a for a in agents.split(",") if a]
        text = emqx.render_acl(sites) if for_emqx else broker.render_sites_acl(sites)
    except (ValueError, pki.PkiError, sekisho_errors.Rejected) as err:
        raise _fail(err) from err
    _write_or_print(text, out)
