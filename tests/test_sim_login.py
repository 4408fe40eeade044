"""The demo's login traffic runs the real decision chain on the demo site and records valid events."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from sekisho.agents.sim.login_traffic import login_scene, terminal_login
from sekisho.agents.sim.traffic import DEMO_CARD_UIDS
from sekisho.controller.policy.loader import load_policy_file
from sekisho.protocol.events import EVENT_TYPES

SITE = Path(__file__).resolve().parent.parent / "deploy" / "demo" / "site.yaml"


class NoWait(threading.Event):
    """A stop event that never waits: the visits run at full speed."""

    def wait(self, timeout: float | None = None) -> bool:
        return False


class Recorder:
    """Validates each payload against its schema, as the outbox would."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, type_: str, payload: dict[str, Any]) -> int:
        EVENT_TYPES[type_].model_validate(payload)
        self.events.append((type_, payload))
        return len(self.events)


def test_demo_logins_decide_for_real() -> None:
    policy = load_policy_file(SITE)[0]
    scene = login_scene(policy.for_agent("term-hr-01"), DEMO_CARD_UIDS)
    assert scene is not None
    agent = Recorder()
    rng = random.Random(7)
    for _ in range(40):
        terminal_login(agent, scene, rng, NoWait())
    kinds = Counter(t if t != "login.denied" else f"denied:{p['reason']}" for t, p in agent.events)
    # Granted logins proved the enrolled card key (challenge-response) and the finger: never weak.
    granted = [p for t, p in agent.events if t == "login.granted"]
    assert granted and all(p["methods"] == ["card", "fingerprint"] and p["weak"] is False for p in granted)
    assert {p["person"] for p in granted} <= {"p-0001", "p-0002"}  # the terminal's designated handlers
    assert kinds["session.locked"] >= 1 and kinds["session.ended"] == len(granted)
    assert any(k.startswith("denied:") for k in kinds), kinds
