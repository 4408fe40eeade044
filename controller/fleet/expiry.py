"""Certificates near their end become findings: an agent whose renewal keeps failing is noticed in time.

Agents renew at two thirds of their certificate's lifetime (controller/fleet/enrol_service.py), so with
the default 30 days a healthy agent never has fewer than ~10 days left. Fewer than ``cert_warn_days`` left
means renewal is failing (no route to the API, a refused request, a stopped agent) and a person must act
before the broker refuses the device: `cert_expiring`, then `cert_expired` once it is past. The agent's
certificate end comes from its signed heartbeat (controller/fleet/health.py); a renewed certificate resolves
the finding on the next round. Revoked agents are left alone: their certificate ending is wanted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sekisho.controller.fleet.health import Thresholds, fleet_health
from sekisho.controller.periodic import PeriodicJob
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt

log = logging.getLogger(__name__)

EXPIRING, EXPIRED = "cert_expiring", "cert_expired"


def check_cert_expiry(store: Store, *, warn_days: float, now: datetime, thresholds: Thresholds) -> dict[str, str]:
    """Raise or resolve the certificate findings of every agent at ``now``; return {agent: finding kind}."""
    raised: dict[str, str] = {}
    for agent in fleet_health(store, thresholds, now):
        if agent.state == "revoked" or agent.cert_not_after is None or agent.cert_days_left is None:
            continue
        if agent.cert_days_left >= warn_days:
            for kind in (EXPIRING, EXPIRED):
                if store.resolve_findings(kind, agent.id, "renewed: the certificate has time left again"):
                    log.info("agent %s: certificate renewed, %s resolved", agent.id, kind)
            continue
        kind = EXPIRED if agent.cert_not_after <= now else EXPIRING
        detail = {"not_after": timefmt.fmt(agent.cert_not_after), "days_left": agent.cert_days_left}
        store.note_finding(kind, agent.id, None, detail)
        if kind == EXPIRED:
            store.resolve_findings(EXPIRING, agent.id, "expired: see the cert_expired finding")
        raised[agent.id] = kind
    return raised


class CertExpiryWatch(PeriodicJob):
    """Runs check_cert_expiry every hour in a background thread."""

    name = "certificate expiry check"
    # One process raises the findings: two sweeps at once could both find no open finding and raise it twice.
    leader_only = True

    def __init__(
        self,
        store: Store,
        *,
        warn_days: float,
        thresholds: Thresholds,
        every_s: float = 3600.0,
        clock: Callable[[], datetime] = timefmt.now,
    ) -> None:
        self.store = store
        self.warn_days = warn_days
        self.thresholds = thresholds
        self.every_s = every_s
        self.clock = clock
        super().__init__()

    def run_once(self) -> None:
        """Raise or resolve the certificate findings once."""
        check_cert_expiry(self.store, warn_days=self.warn_days, now=self.clock(), thresholds=self.thresholds)
