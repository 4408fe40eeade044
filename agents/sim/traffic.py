"""Demo traffic for terminal agents: people log in through the real login decision, as the policy allows.

Logins run the same card → finger → decision chain as the PAM helper (agents/sim/login_traffic.py);
door boxes run the real door agent on firmware stubs (agents/sim/doors.py). Everything goes through the
real runtime (outbox, signing, MQTT), decided from the real cached policy bundle. Card identifiers are
synthetic and only ever sent hashed and masked.
"""

from __future__ import annotations

import random
import threading

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.sim.login_traffic import login_scene, terminal_login

# The demo's synthetic card numbers (deploy/demo/site.yaml holds their keyed hashes).
DEMO_CARD_UIDS = [f"DEMO-CARD-{i:04d}" for i in range(1, 7)]


def run_traffic(agent: Agent, stop: threading.Event, *, mean_interval_s: float, seed: int | None = None) -> None:
    """Emit demo logins until stopped, waiting for a valid policy first (fail closed without one)."""
    rng = random.Random(seed)
    while not stop.is_set():
        bundle = agent.policy.in_force()
        if bundle is None:
            stop.wait(1.0)
            continue
        logins = login_scene(bundle.bundle.policy, DEMO_CARD_UIDS)
        if logins is not None:
            terminal_login(agent, logins, rng, stop)
        stop.wait(rng.expovariate(1 / mean_interval_s))
