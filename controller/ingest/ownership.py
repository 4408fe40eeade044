"""Who may state which facts: a door, key, locker or area event only from the agent the policy gives it.

An agent's signature proves who sent an event, not that the sender drives the door it names. Without
this check, a terminal agent (or any enrolled device an attacker owns) could sign "p-0001 left room-1"
or "k-archive returned" and change who-is-inside and the key-lending register.

The owner is read from the policy version in force: the newest one, or the one in force when the event
happened (so the late events of a door box that has since been handed to another agent still count). A
fact no policy gives to its sender is refused as ``not_owner`` and raised as possible tampering.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from sekisho.controller.store.models import PolicyVersion
from sekisho.controller.store.store import Store
from sekisho.protocol import events
from sekisho.protocol.policy import SitePolicy


@dataclass(frozen=True)
class Owners:
    """The owners one policy version names: door → agent, terminal → agent, area → the agents at its doors."""

    version: int
    doors: dict[str, str] = field(default_factory=dict)
    terminals: dict[str, str] = field(default_factory=dict)
    areas: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, version: int, document: dict[str, Any]) -> Owners:
        """Read the owners out of a stored policy document."""
        policy = SitePolicy.model_validate(document)
        areas: dict[str, set[str]] = {}
        for door in policy.doors:
            if door.area is not None:
                areas.setdefault(door.area, set()).add(door.agent)
        return cls(
            version=version,
            doors={d.id: d.agent for d in policy.doors},
            terminals={t.id: t.agent for t in policy.terminals},
            areas={area: frozenset(agents) for area, agents in areas.items()},
        )

    def refusal(self, agent: str, payload: dict[str, Any]) -> str | None:
        """Return why this agent may not state this payload's facts, or None when it may."""
        door, terminal, area = payload.get("door"), payload.get("terminal"), payload.get("area")
        if door is not None and self.doors.get(door) != agent:
            return f"door {door!r} is not driven by {agent} in policy version {self.version}"
        if terminal is not None and self.terminals.get(terminal) != agent:
            return f"terminal {terminal!r} is not served by {agent} in policy version {self.version}"
        if area is not None and agent not in self.areas.get(area, frozenset()):
            return f"area {area!r} has no door driven by {agent} in policy version {self.version}"
        return None


# The payload fields that name something an agent must own. An event that names none of them
# (agent.*, card.presented at a reader of no door, test.synthetic) states nothing about anyone's door.
OWNED_FIELDS = ("door", "terminal", "area")


class OwnershipCheck:
    """Decide whether an event's sender owns what it names, caching parsed policy versions."""

    def __init__(self, store: Store, refresh_s: float, cache_size: int = 8) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._parsed: OrderedDict[int, Owners | None] = OrderedDict()
        # (version, created_at) of every stored version, newest last; re-read every refresh_s.
        self._versions: list[tuple[int, datetime]] = []
        self._loaded_at = float("-inf")

    def refusal(self, event: events.DecodedEvent) -> str | None:
        """Return why the event's agent may not state its facts, or None when it may (or names nothing)."""
        if not any(event.payload.get(name) is not None for name in OWNED_FIELDS):
            return None
        reason = self._refusal(event)
        if reason is not None and time.monotonic() - self._loaded_at > 1.0:
            # A policy applied moments ago may give this door to this agent: look again before refusing.
            self.forget()
            reason = self._refusal(event)
        return reason

    def _refusal(self, event: events.DecodedEvent) -> str | None:
        versions = self._candidate_versions(event.occurred_at)
        if not versions:
            return "no policy version gives any door, terminal or area to any agent yet"
        reasons = []
        for version in versions:
            owners = self._owners(version)
            if owners is None:
                continue
            reason = owners.refusal(event.agent, event.payload)
            if reason is None:
                return None
            reasons.append(reason)
        return reasons[0] if reasons else "the policy in force could not be read"

    def _candidate_versions(self, occurred_at: datetime) -> list[int]:
        now = time.monotonic()
        with self._lock:
            if now - self._loaded_at > self._refresh_s:
                with self._store.engine.connect() as conn:
                    found = conn.execute(
                        select(PolicyVersion.version, PolicyVersion.created_at).order_by(PolicyVersion.version)
                    ).all()
                self._versions = [(int(v), created) for v, created in found]
                self._loaded_at = now
            versions = self._versions
        if not versions:
            return []
        newest = versions[-1][0]
        at_the_time = [v for v, created in versions if created <= occurred_at]
        candidates = [newest]
        if at_the_time and at_the_time[-1] != newest:
            candidates.append(at_the_time[-1])
        return candidates

    def _owners(self, version: int) -> Owners | None:
        with self._lock:
            if version in self._parsed:
                self._parsed.move_to_end(version)
                return self._parsed[version]
        row = self._store.get_policy_version(version)
        try:
            owners = Owners.of(version, row.document) if row is not None else None
        except ValueError:
            # A stored version that no longer validates names no owner: fail closed, refuse the fact.
            owners = None
        with self._lock:
            self._parsed[version] = owners
            while len(self._parsed) > self._cache_size:
                self._parsed.popitem(last=False)
        return owners

    def forget(self) -> None:
        """Drop the cache (after a policy change, so the next event reads the new version at once)."""
        with self._lock:
            self._loaded_at = float("-inf")
