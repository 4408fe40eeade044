"""Revocation that bites: the list the broker enforces, written by the controller or synced from it.

The store says who is refused (``AgentRecords.revocation_list``: revoked agents by name, certificates of
replaced keys by serial). This module writes it where the broker's plugin reads it (atomically: a new file
renamed over the old one, so the plugin never sees half a list), keeps it current from the running
controller, and, on a broker host without the controller, fetches the controller-signed list over HTTPS and
writes it after checking the signature (``sekisho fleet revocations sync``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import tempfile
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sekisho.common.i18n import _
from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.store.store import Store
from sekisho.protocol import errors, timefmt
from sekisho.protocol.revocations import MAX_LIST_BYTES, RevocationList, open_signed, parse_broker_text

log = logging.getLogger(__name__)

ROUTE = "/api/v1/fleet/revocations"


class RevocationSyncError(Exception):
    """The signed list could not be fetched or was not good: the broker keeps the list it has."""


def current_entries(path: Path) -> RevocationList | None:
    """Return the list a broker file holds now, or None if there is none or the plugin would refuse it."""
    try:
        return parse_broker_text(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def write_revocation_file(path: Path, revocations: RevocationList) -> bool:
    """Write the broker file atomically if its entries differ from what is there; return whether it was written."""
    held = current_entries(path)
    if held is not None and held.same_entries(revocations):
        return False
    text = revocations.broker_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".revocations.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # Readable by the broker's account; it holds no secret (names and certificate serials).
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return True


def publish_revocations(store: Store, path: Path | None) -> RevocationList:
    """Compute the list from the store and, if path is set, write it for the broker; return the list."""
    revocations = store.revocation_list()
    if path is not None and write_revocation_file(path, revocations):
        log.info(
            "revocation list written: %d agent(s), %d certificate(s) refused",
            len(revocations.names),
            len(revocations.serials),
        )
    return revocations


class RevocationKeeper(PeriodicJob):
    """Keeps the broker's revocation file equal to the store's (revocations made by any controller process)."""

    name = "revocation list"
    # Not leader-only: it writes the broker's file on this host (only a process whose host runs the broker
    # has revocation_list set), atomically and only when the entries changed, so every such process may.
    # A leader elsewhere would leave the broker's host without a writer.
    leader_only = False

    def __init__(self, store: Store, path: Path, every_s: float) -> None:
        self.store = store
        self.path = path
        self.every_s = every_s
        super().__init__()

    def run_once(self) -> None:
        """Write the list if it changed."""
        publish_revocations(self.store, self.path)


def reload_broker(pid_file: Path) -> None:
    """Send SIGHUP to the broker whose pid the file holds: its plugin re-reads the list and re-checks clients."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as err:
        raise RevocationSyncError(_("broker pid file %(path)s unreadable: %(err)s", path=pid_file, err=err)) from err
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as err:
        raise RevocationSyncError(_("cannot signal the broker (pid %(pid)s): %(err)s", pid=pid, err=err)) from err


def fetch_signed(
    controller_url: str, controller_key: Ed25519PublicKey, *, token: str | None, ca_file: Path | None, timeout: float
) -> RevocationList:
    """Fetch the controller-signed list and check its signature (RevocationSyncError if anything is off)."""
    url = controller_url.rstrip("/") + ROUTE
    if (
        not url.startswith("https://")
        and not url.startswith("http://127.0.0.1")
        and not url.startswith("http://localhost")
    ):
        raise RevocationSyncError(_("the controller URL must be https:// (plain http only to this host)"))
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked above
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            body = response.read(MAX_LIST_BYTES * 2 + 1)
    except (urllib.error.URLError, OSError, ssl.SSLError) as err:
        raise RevocationSyncError(_("fetching %(url)s failed: %(err)s", url=url, err=err)) from err
    if len(body) > MAX_LIST_BYTES * 2:
        raise RevocationSyncError(_("the signed list is larger than the bound"))
    try:
        return open_signed(body, controller_key)
    except errors.Rejected as err:
        raise RevocationSyncError(
            _(
                "the list from %(url)s was refused: %(reason)s: %(detail)s",
                url=url,
                reason=err.reason,
                detail=err.detail,
            )
        ) from err


def sync_once(
    controller_url: str,
    controller_key: Ed25519PublicKey,
    output: Path,
    *,
    token: str | None = None,
    ca_file: Path | None = None,
    timeout: float = 10.0,
) -> bool:
    """Fetch, check and write the list once; return whether the file changed.

    A signed list issued before the one the file was written from is refused (RevocationSyncError): whoever
    sits between the broker and the controller could otherwise replay an old list and lift a revocation.
    """
    revocations = fetch_signed(controller_url, controller_key, token=token, ca_file=ca_file, timeout=timeout)
    held_at = file_issued_at(output)
    if held_at is not None and (revocations.issued_at is None or revocations.issued_at < held_at):
        raise RevocationSyncError(
            f"the controller sent a list issued {revocations.issued_at}, older than the one in {output} "
            f"({held_at}): refused, the broker keeps its list"
        )
    return write_revocation_file(output, revocations)


def file_issued_at(path: Path) -> datetime | None:
    """Return the issue time a broker file records (its `# issued` line), or None."""
    try:
        lines = path.read_text().split("\n", 3)[:3]
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        if line.startswith("# issued "):
            try:
                return timefmt.parse(line.removeprefix("# issued ").strip())
            except ValueError:
                return None
    return None
