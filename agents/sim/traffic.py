"""Demo traffic: people tap cards at doors and log in at terminals, as the agent's policy allows.

Door visits stand in for the door capability in this module; logins run the real login decision
(agents/sim/login_traffic.py). Everything goes through the real runtime (outbox, signing, MQTT),
decided from the real cached policy bundle. Card identifiers are synthetic and only ever sent hashed and masked.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import threading
from dataclasses import dataclass
from typing import Any

from agents.runtime.agent import Agent
from agents.sim.login_traffic import login_scene, terminal_login

DEMO_SITE_KEY = b"demo-site-key"
DEMO_CARD_UIDS = [f"DEMO-CARD-{i:04d}" for i in range(1, 7)]


def card_hash(uid: str) -> str:
    """Keyed hash of a card UID, as the site policy stores it."""
    return hmac.new(DEMO_SITE_KEY, uid.encode(), hashlib.sha256).hexdigest()


def masked(uid: str) -> str:
    """Masked card identifier for display: only the last four characters."""
    return "****-" + uid[-4:]


@dataclass
class Scene:
    """What the agent's current policy says about people, cards, doors and terminals."""

    people: dict[str, dict[str, Any]]
    cards_by_hash: dict[str, dict[str, Any]]
    doors: list[dict[str, Any]]
    terminals: list[dict[str, Any]]

    @classmethod
    def from_policy(cls, policy: dict[str, Any]) -> Scene:
        """Index a bundle's policy for the simulation."""
        return cls(
            people={p["id"]: p for p in policy.get("people", [])},
            cards_by_hash={c["uid_hash"]: c for c in policy.get("cards", [])},
            doors=policy.get("doors", []),
            terminals=policy.get("terminals", []),
        )

    def identify(self, uid: str) -> tuple[dict[str, Any] | None, str | None]:
        """Return (card, denial reason) for a tapped card."""
        card = self.cards_by_hash.get(card_hash(uid))
        if card is None:
            return None, "unknown_card"
        if card["status"] != "active":
            return card, f"card_{card['status']}"
        person = self.people.get(card["person"])
        if person is None or not person.get("active", True):
            return card, "person_inactive"
        return card, None


def door_visit(agent: Agent, scene: Scene, rng: random.Random) -> None:
    """One person taps a card at one door; on a grant the door opens and closes."""
    door = rng.choice(scene.doors)
    uid = rng.choice(DEMO_CARD_UIDS)
    agent.emit(
        "card.presented", {"reader": f"{door['id']}-reader", "card_hash": card_hash(uid), "card_masked": masked(uid)}
    )
    card, reason = scene.identify(uid)
    if reason is None and card is not None and card["person"] not in door.get("allowed", []):
        reason = "not_allowed_here"
    if reason is not None:
        agent.emit(
            "door.access_denied",
            {
                "door": door["id"],
                "reason": reason,
                "person": card["person"] if card else None,
                "card_masked": masked(uid),
            },
        )
        return
    assert card is not None
    agent.emit(
        "door.access_granted",
        {
            "door": door["id"],
            "person": card["person"],
            "card_masked": masked(uid),
            "rule": f"doors.{door['id']}.allowed",
        },
    )
    agent.emit("door.opened", {"door": door["id"], "forced": False})
    agent.emit("door.closed", {"door": door["id"], "open_seconds": rng.randint(2, 25)})


def run_traffic(agent: Agent, stop: threading.Event, *, mean_interval_s: float, seed: int | None = None) -> None:
    """Emit demo traffic until stopped, waiting for a valid policy first (fail closed without one)."""
    rng = random.Random(seed)
    while not stop.is_set():
        bundle = agent.policy.in_force()
        if bundle is None:
            stop.wait(1.0)
            continue
        scene = Scene.from_policy(bundle.bundle.policy)
        logins = login_scene(bundle.bundle.policy, DEMO_CARD_UIDS)
        if scene.doors and (logins is None or rng.random() < 0.5):
            door_visit(agent, scene, rng)
        elif logins is not None:
            terminal_login(agent, logins, rng, stop)
        stop.wait(rng.expovariate(1 / mean_interval_s))
