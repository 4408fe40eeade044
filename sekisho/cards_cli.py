"""`sekisho cards enrol`: read a card at a PC/SC reader and print (or write into site.yaml) its card entry.

It puts the layers together on an administrator's workstation: the smart-card driver reads the card (the
same reads the login and door checks make), the controller's policy code updates site.yaml. The raw UID is
never printed or stored: only its keyed hash (HMAC-SHA256 with the site key, as the agents compute it) and
a masked form.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
import yaml
from rich.console import Console

from sekisho.common.i18n import _

app = typer.Typer(help=_("Card enrolment (PC/SC reader)."), no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

_POLL_S = 0.2


def site_key_id(site_key: bytes) -> str:
    """Return a short id of the site key (a keyed digest: it tells keys apart without revealing one)."""
    return hmac.new(site_key, b"sekisho/site-key-id", hashlib.sha256).hexdigest()[:16]


def _read_site_key(path: Path) -> bytes:
    try:
        # As the agents read site_key_file (doors.toml, login.toml): the bytes, surrounding blanks dropped.
        key = path.read_bytes().strip()
    except OSError as err:
        err_console.print(
            _("[red]cannot read the site key %(path)s:[/red] %(strerror)s", path=path, strerror=err.strerror)
        )
        raise typer.Exit(2) from err
    if len(key) < 16:
        err_console.print(_("[red]the site key in %(path)s is shorter than 16 bytes[/red]", path=path))
        raise typer.Exit(2)
    return key


@app.command(
    "enrol",
    help=_("Read the card in READER and print the person's card entry; with --policy, write it into site.yaml."),
)
def enrol(
    reader: Annotated[str, typer.Option("--reader", "-r", help=_("PC/SC reader name (as pcsc_scan shows it)"))],
    person: Annotated[str, typer.Option("--person", "-p", help=_("person id in the site policy"))],
    site_key: Annotated[Path, typer.Option("--site-key", help=_("the site key file (the agents' site_key_file)"))],
    policy: Annotated[
        Path | None, typer.Option("--policy", help=_("site.yaml to add or update the card in"), dir_okay=False)
    ] = None,
    card_id: Annotated[str | None, typer.Option("--card-id", help=_("card id (default: the person's card)"))] = None,
    kind: Annotated[
        Literal["piv", "felica", "mifare"], typer.Option(help=_("piv: challenge–response; felica/mifare: UID only"))
    ] = "piv",
    wait_s: Annotated[float, typer.Option("--wait", min=1, max=300, help=_("seconds to wait for the card"))] = 30,
) -> None:
    """Read the card in READER and print the person's card entry; with --policy, write it into site.yaml."""
    from sekisho.controller.policy.cards import CardEntry, upsert_card
    from sekisho.controller.policy.loader import PolicyError
    from sekisho.drivers.smartcard import CardError, Deadline, EnrolmentError, enrol_card, pcsc_backend

    key = _read_site_key(site_key)
    try:
        backend = pcsc_backend()
    except ImportError as err:
        err_console.print(_("pyscard is not installed (install the agent extras)[/red]"))
        raise typer.Exit(2) from err
    with contextlib.closing(backend):
        try:
            readers = backend.readers()
        except CardError as err:
            err_console.print(_("cannot reach pcscd:[/red] %(err)s", err=err))
            raise typer.Exit(2) from err
        if reader not in readers:
            err_console.print(
                _("[red]no reader %(reader)r[/red]; readers: %(readers)s", reader=reader, readers=", ".join(readers))
            )
            raise typer.Exit(2)
        console.print(_("present the card to %(reader)s …", reader=reader))
        until = time.monotonic() + wait_s
        record = None
        last: CardError | None = None
        while record is None and time.monotonic() < until:
            try:
                with contextlib.closing(backend.connect(reader, deadline=Deadline.within(10))) as conn:
                    record = enrol_card(
                        conn, card_id=card_id or "card", site_key=key, kind="piv" if kind == "piv" else "uid_only"
                    )
            except EnrolmentError as err:
                err_console.print(_("[red]this card cannot be enrolled as %(kind)s:[/red] %(err)s", kind=kind, err=err))
                raise typer.Exit(1) from err
            except CardError as err:
                # No card yet (or pulled while read): wait for the next presentation.
                last = err
                time.sleep(_POLL_S)
    if record is None or (record.uid_hash is None and record.public_key_pem is None):
        err_console.print(_("[red]no card read within %(wait_s)g s[/red] (%(last)s)", wait_s=wait_s, last=last))
        raise typer.Exit(1)
    if record.uid_hash is None:
        # A contact PIV card without a UID: its certificate's key is what identifies it.
        err_console.print(_("the card has no UID to key; use a contactless card[/red]"))
        raise typer.Exit(1)
    entry = CardEntry(person=person, kind=kind, uid_hash=record.uid_hash, public_key_pem=record.public_key_pem)
    console.print(f"site key id: {site_key_id(key)}")
    console.print(f"uid (masked): {record.uid_masked}")
    if record.fingerprint:
        console.print(f"public key sha256: {record.fingerprint}")
    if policy is None:
        card = {"id": card_id or f"c-{person.removeprefix('p-')}", **entry.fields()}
        console.print(yaml.safe_dump({"cards": [card]}, allow_unicode=True, sort_keys=False), markup=False)
        return
    try:
        chosen, action = upsert_card(policy, entry, card_id=card_id)
    except (PolicyError, OSError) as err:
        problems = err.problems if isinstance(err, PolicyError) else [str(err)]
        for problem in problems:
            err_console.print(f"[red]✗[/red] {problem}", markup=True)
        raise typer.Exit(1) from err
    values = {"card": chosen, "person": person, "policy": str(policy), "backup": f"{policy.name}.bak"}
    done = (
        _("added card %(card)s for %(person)s in %(policy)s (previous: %(backup)s)", **values)
        if action == "added"
        else _("updated card %(card)s for %(person)s in %(policy)s (previous: %(backup)s)", **values)
    )
    console.print(done, markup=False)
    console.print(_("distribute it with `sekisho policy apply`"))
