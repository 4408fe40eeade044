"""Certificates whose renewal keeps failing become findings, and a renewal resolves them (issue 11, item 2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from store_fixtures import MakeAgent

from sekisho.controller.fleet.expiry import EXPIRED, EXPIRING, check_cert_expiry
from sekisho.controller.fleet.health import Thresholds
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt

NOW = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)


def heartbeat(store: Store, agent_id: str, not_after: datetime, at: datetime) -> None:
    """Record a heartbeat (as ingest does) reporting the agent's certificate end."""
    info = {"version": "1.0", "kind": "terminal", "interval_s": 30, "cert_not_after": timefmt.fmt(not_after)}
    assert store.record_heartbeat(agent_id, info, at)


def open_kinds(store: Store, agent_id: str) -> set[str]:
    return {f.kind for f in store.list_findings(open_only=True, agent_id=agent_id)}


def test_failing_renewal_raises_expiring_then_expired_and_a_renewal_resolves(
    store: Store, make_agent: MakeAgent
) -> None:
    healthy, failing = make_agent(store), make_agent(store)
    heartbeat(store, healthy.agent_id, NOW + timedelta(days=12), NOW)  # renewed on time: ~10+ days left
    heartbeat(store, failing.agent_id, NOW + timedelta(days=3), NOW)
    raised = check_cert_expiry(store, warn_days=7, now=NOW, thresholds=Thresholds())
    assert raised == {failing.agent_id: EXPIRING}
    assert open_kinds(store, healthy.agent_id) == set()
    assert open_kinds(store, failing.agent_id) == {EXPIRING}
    (finding,) = store.list_findings(open_only=True, agent_id=failing.agent_id)
    assert finding.detail["days_left"] == 3.0 and finding.detail["not_after"].startswith("2026-12-10")

    # Another round while nothing changed groups into the same finding instead of raising a second one.
    check_cert_expiry(store, warn_days=7, now=NOW + timedelta(hours=1), thresholds=Thresholds())
    (finding,) = store.list_findings(open_only=True, agent_id=failing.agent_id)
    assert finding.detail["count"] == 2

    # Past its end: cert_expired, and the expiring one is closed in its favour.
    later = NOW + timedelta(days=4)
    assert check_cert_expiry(store, warn_days=7, now=later, thresholds=Thresholds()) == {failing.agent_id: EXPIRED}
    assert open_kinds(store, failing.agent_id) == {EXPIRED}

    # The device is re-enrolled / renewed: its next heartbeat reports a fresh certificate, the finding resolves.
    heartbeat(store, failing.agent_id, later + timedelta(days=30), later + timedelta(minutes=1))
    assert check_cert_expiry(store, warn_days=7, now=later + timedelta(minutes=2), thresholds=Thresholds()) == {}
    assert open_kinds(store, failing.agent_id) == set()
    resolved = store.list_findings(kind=EXPIRED, agent_id=failing.agent_id)
    assert resolved[0].resolution is not None and resolved[0].resolution.startswith("renewed")


def test_revoked_agents_and_agents_without_a_reported_certificate_raise_nothing(
    store: Store, make_agent: MakeAgent
) -> None:
    revoked, silent = make_agent(store), make_agent(store)
    heartbeat(store, revoked.agent_id, NOW - timedelta(days=1), NOW)
    store.revoke_agent(revoked.agent_id)
    assert check_cert_expiry(store, warn_days=7, now=NOW, thresholds=Thresholds()) == {}
    assert open_kinds(store, revoked.agent_id) == set() and open_kinds(store, silent.agent_id) == set()
