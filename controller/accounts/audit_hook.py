"""The accounts' link to the admin audit trail (controller/store/audit.py, built alongside).

Every account change, sign-in failure and lock-out calls ``audit_hook``. It records through the store's
``record_admin`` (``AuditRecords``) once the store has it, and only logs (never a secret) until then.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


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
) -> None:
    """Record one admin action (who, how, from where, what, old → new) in the admin audit trail."""
    record = getattr(store, "record_admin", None)
    if record is None:
        log.info("admin action %s by %s via %s from %s on %s", action, actor, via, client or "-", target)
        return
    record(actor, via, client, action, target, old, new, detail)
