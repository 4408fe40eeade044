"""Policy versions: diff, store, sign per-agent bundles, publish them retained."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import messages, timefmt, topics
from protocol.policy import SitePolicy

if TYPE_CHECKING:
    from controller.store.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyDiff:
    """What a new policy changes compared with the current version."""

    current_version: int | None
    unified: str
    changes: dict[str, dict[str, list[str]]]

    @property
    def empty(self) -> bool:
        """Tell whether the new policy is identical to the current one."""
        return not self.unified


def _render(doc: dict[str, Any] | None) -> list[str]:
    if doc is None:
        return []
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=True, default_flow_style=False).splitlines(keepends=True)


def diff_policy(current: dict[str, Any] | None, new: SitePolicy, current_version: int | None) -> PolicyDiff:
    """Compare a new policy with the stored one: a unified diff and per-section added/removed/changed ids."""
    new_doc = new.model_dump(mode="json")
    unified = "".join(
        difflib.unified_diff(
            _render(current),
            _render(new_doc),
            fromfile=f"version {current_version}" if current_version else "(none)",
            tofile="new",
        )
    )
    changes: dict[str, dict[str, list[str]]] = {}
    for section in ("people", "cards", "areas", "terminals", "doors"):
        old_items = {i["id"]: i for i in (current or {}).get(section, [])}
        new_items = {i["id"]: i for i in new_doc.get(section, [])}
        entry = {
            "added": sorted(set(new_items) - set(old_items)),
            "removed": sorted(set(old_items) - set(new_items)),
            "changed": sorted(k for k in set(old_items) & set(new_items) if old_items[k] != new_items[k]),
        }
        if any(entry.values()):
            changes[section] = entry
    return PolicyDiff(current_version, unified, changes)


def sign_bundles(
    key: Ed25519PrivateKey,
    policy: SitePolicy,
    version: int,
    *,
    extra_agents: set[str] | frozenset[str] = frozenset(),
) -> dict[str, bytes]:
    """Sign one bundle per agent; agents no longer in the policy get an empty one (they then deny all)."""
    lifetime = timedelta(hours=policy.bundle_lifetime_hours)
    issued = timefmt.now()
    empty = SitePolicy(site=policy.site, bundle_lifetime_hours=policy.bundle_lifetime_hours).model_dump(mode="json")
    bundles: dict[str, bytes] = {}
    for agent in sorted(set(policy.agent_ids()) | set(extra_agents)):
        part = policy.for_agent(agent) if agent in policy.agent_ids() else empty
        bundles[agent] = messages.build_bundle(
            key, agent=agent, version=version, policy=part, lifetime=lifetime, issued_at=issued
        )
    return bundles


def publish_bundles(client: mqtt.Client, bundles: dict[str, bytes], timeout: float = 10) -> None:
    """Publish bundles retained with QoS 1 and wait until the broker has them all."""
    infos = [
        client.publish(topics.topic(agent, topics.POLICY), raw, qos=1, retain=True) for agent, raw in bundles.items()
    ]
    for info in infos:
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError("broker did not confirm a policy bundle in time")


class PolicyService:
    """Applies site policy versions and keeps every agent's retained bundle current and unexpired."""

    def __init__(self, store: Store, key: Ed25519PrivateKey) -> None:
        self.store = store
        self.key = key

    def current(self) -> tuple[int, SitePolicy] | None:
        """Return the version and model of the policy in force, if any."""
        row = self.store.current_policy_version()
        if row is None:
            return None
        return row.version, SitePolicy.model_validate(row.document)

    def plan(self, policy: SitePolicy) -> PolicyDiff:
        """Diff a candidate policy against the current one without changing anything."""
        row = self.store.current_policy_version()
        return diff_policy(row.document if row else None, policy, row.version if row else None)

    def apply(self, policy: SitePolicy, *, source_sha256: str, created_by: str, comment: str = "") -> int | None:
        """Store the policy as a new version unless it is unchanged; return the new version or None."""
        if self.plan(policy).empty:
            return None
        row = self.store.add_policy_version(
            policy.model_dump(mode="json"), source_sha256=source_sha256, created_by=created_by, comment=comment
        )
        return row.version

    def bundles(self) -> dict[str, bytes]:
        """Sign fresh bundles for the current version, including empty ones for agents dropped from it."""
        current = self.current()
        if current is None:
            return {}
        version, policy = current
        known = {a.id for a in self.store.list_agents()}
        return sign_bundles(self.key, policy, version, extra_agents=known)
