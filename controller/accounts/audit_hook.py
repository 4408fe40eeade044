"""The accounts' link to the admin audit trail (controller/store/audit.py ``AuditRecords.record_admin``).

Every account change, sign-in failure and lock-out calls ``audit_hook``: it records through the store's
``record_admin`` when the store has it (the controller's ``Store`` does) and only logs otherwise (a bare
``Records`` in a tool). Passwords, hashes, session ids and tokens are never passed in.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Actor.via (how someone authenticated) → the trail's via (through what the change came).
VIA = {"session": "web", "token": "api", "dev": "api", "cli": "cli", "web": "web", "api": "api"}


def _printable(text: str, limit: int) -> str:
    # A typed login may hold anything; the trail takes one printable, bounded line.
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:limit] or "?"


def audit_hook(
    store: object,
    actor: str,
    via: str,
    client: str | None,
    action: str,
    target: str,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    detail: dict[str, Any] | None,
    *,
    strict: bool = True,
) -> None:
    """Record one admin action (who, how, from where, what, old → new) in the admin audit trail.

    strict=False (sign-in attempts): a row the trail refuses is logged, not raised — the attempt itself is
    in console_login_attempts already, and a refusal must not turn a failed sign-in into a server error.
    """
    record = getattr(store, "record_admin", None)
    if record is None:
        log.info("admin action %s by %s via %s from %s on %s", action, actor, via, client or "-", target)
        return
    try:
        record(_printable(actor, 200), VIA.get(via, "api"), client, action, _printable(target, 1000), old, new, detail)
    except ValueError:
        if strict:
            raise
        log.exception("admin audit refused the row of %s on %s", action, target)
