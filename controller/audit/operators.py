"""Derive the operator of an admin action at the edge it came through: the CLI's OS user and host, the API's caller."""

from __future__ import annotations

import getpass
import socket
from typing import Any

from sekisho.controller.store.audit import MAX_ACTOR, MAX_CLIENT, Operator

# How the accounts layer's Actor.via maps to the trail's via (a session is the web console).
_VIA = {"session": "web", "token": "api", "dev": "api", "cli": "cli"}


def _printable(text: str, limit: int) -> str:
    # OS user and host names come from the environment: keep them to one printable, bounded line.
    cleaned = "".join(ch if ch.isprintable() and not ch.isspace() else "?" for ch in text)
    return cleaned[:limit] or "?"


def cli_operator() -> Operator:
    """Return the operator of a CLI command: ``cli:<os-user>@<host>`` (the login, not $USER alone)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return Operator(f"cli:{_printable(user, 64)}@{_printable(socket.gethostname(), 100)}", "cli")


def api_operator(caller: Any, client: str | None) -> Operator:
    """Return the operator of an API or console request from the caller the auth layer authenticated.

    The accounts layer's ``Actor`` names itself (``audit_name``: user:<login> for a session, token:<name> for a
    service token…; a user's personal token is token:<login>/<token id>) and says how it came (``via``: a
    session is the web console); anything else is named by its ``name`` as a token.
    """
    address = None if client is None else _printable(client, MAX_CLIENT)
    name = getattr(caller, "audit_name", None)
    if isinstance(name, str) and name:
        how = str(getattr(caller, "via", "token"))
        return Operator(_printable(name, MAX_ACTOR), _VIA.get(how, "api"), address)
    legacy = getattr(caller, "name", None)
    return Operator(_printable(f"token:{legacy or 'unknown'}", MAX_ACTOR), "api", address)
