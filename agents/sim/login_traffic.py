"""Demo logins through the real login decision: simulated reader and sensor, real driver and policy code.

Each visit scripts a simulated card (right card, someone else's, a stranger's or none) and a simulated
finger (match, mismatch or nobody touching), then runs the same ``check_card`` → ``check_finger`` →
``decide_login`` chain the PAM helper runs, records the same events, and for a granted login shows the
notice, locks on card removal with the real ``CardRemovalLock``, and ends in a re-insert or a logout.
Demo card keys are derived from the synthetic card names: obviously not secret, never used outside the demo.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from sekisho.agents.login.decision import JST, PolicyState, decide_login, refuse_early
from sekisho.agents.login.lock import CardRemovalLock
from sekisho.agents.login.notices import notice_for
from sekisho.agents.login.pam import PamRequest, check_card, check_finger, decision_event
from sekisho.agents.runtime.agent import Agent
from sekisho.drivers.biometric import SimulatedFingerprint
from sekisho.drivers.smartcard import SimulatedBackend, SimulatedCard
from sekisho.protocol import timefmt
from sekisho.protocol.policy import SitePolicy

DEMO_SITE_KEY = b"demo-site-key"
READER = "Demo Reader 0"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def demo_card_key(uid: str) -> ec.EllipticCurvePrivateKey:
    """Return the demo card's P-256 key, derived from its synthetic name (demo only: anyone can derive it)."""
    scalar = int.from_bytes(hashlib.sha256(b"sekisho-demo-card:" + uid.encode()).digest()) % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def demo_card_public_pem(uid: str) -> str:
    """Return the PEM public key site.yaml enrols for a demo card."""
    public = demo_card_key(uid).public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass
class LoginScene:
    """The terminal's policy and the demo cards it knows (uid → card id)."""

    policy: SitePolicy
    uids: list[str]


def _finger(rng: random.Random, user: str) -> SimulatedFingerprint:
    sensor = SimulatedFingerprint()
    sensor.enroll(user, "demo-finger")
    roll = rng.random()
    if roll < 0.85:
        sensor.touch("demo-finger")
    elif roll < 0.95:
        for _ in range(3):
            sensor.touch("someone-else")
    # else: nobody touches the sensor (timeout)
    return sensor


def terminal_login(agent: Agent, scene: LoginScene, rng: random.Random, stop: threading.Event) -> None:
    """One login attempt at one of the agent's terminals, decided and recorded like the PAM helper does."""
    policy = scene.policy
    terminal = rng.choice(policy.terminals)
    handlers = [p for p in policy.people if p.id in terminal.handlers and p.logins]
    if not handlers:
        return
    person = rng.choice(handlers)
    user = person.logins[0]
    own = [c for c in policy.cards if c.person == person.id]
    roll = rng.random()
    uid: str | None
    if roll < 0.75 and own:
        uid = next((u for u in scene.uids if _hash(u) == own[0].uid_hash), None)
    elif roll < 0.85:
        uid = rng.choice(scene.uids)  # someone's card, maybe not theirs
    elif roll < 0.93:
        uid = "DEMO-STRANGER-01"
    else:
        uid = None  # forgot the card
    backend = SimulatedBackend((READER,))
    card_in_hand = SimulatedCard(uid=uid.encode(), key=demo_card_key(uid)) if uid is not None else None
    if card_in_hand is not None:
        backend.insert(card_in_hand, READER)
    now = timefmt.now()
    state: PolicyState = "valid"
    request = PamRequest(user, "gdm-password", "auth")
    extra: dict[str, Any] = {}
    decision = refuse_early(policy, state, None, terminal.id, user, now)
    if decision is None:
        card = check_card(backend, list(policy.cards), site_key=DEMO_SITE_KEY, allow_uid_only=False, reader=READER)
        extra["card_masked"] = card.uid_masked
        decision = refuse_early(policy, state, None, terminal.id, user, now, card)
        if decision is None:
            finger = check_finger(_finger(rng, user), user, timeout_s=0.2, max_attempts=3)
            extra["fingerprint_attempts"] = finger.attempts
            decision = decide_login(policy, state, None, terminal.id, user, card, finger, timefmt.now())
    agent.emit(*decision_event(decision, terminal.id, request, extra))
    if decision.granted and card_in_hand is not None:
        _session(agent, policy, terminal.id, user, backend, card_in_hand, rng, stop, now)


def _hash(uid: str) -> str:
    from sekisho.drivers.smartcard import hash_uid

    return hash_uid(uid.encode(), DEMO_SITE_KEY)


def _session(
    agent: Agent,
    policy: SitePolicy,
    terminal: str,
    user: str,
    backend: SimulatedBackend,
    card: SimulatedCard,
    rng: random.Random,
    stop: threading.Event,
    now: datetime,
) -> None:
    day = now.astimezone(JST).date()
    notice = notice_for(day, policy.login.notices)
    if notice is not None:
        index = policy.login.notices.index(notice)
        agent.emit(
            "login.notice_shown", {"terminal": terminal, "user": user, "day": day.isoformat(), "notice_index": index}
        )
    lock = CardRemovalLock(
        backend,
        reader=READER,
        terminal=terminal,
        user=user,
        emit=agent.emit,
        end_after_s=float(policy.login.end_session_after_card_removed_s),
        lock_command=["true"],  # the demo has no desktop to lock; the event is what it shows
        end_command=None,
    )
    lock.start()
    try:
        if stop.wait(rng.uniform(1.0, 3.0)):
            return
        if rng.random() < 0.5:
            backend.remove(READER)  # stepped away with the card: the session locks
            if stop.wait(rng.uniform(0.5, 2.0)):
                return
            if rng.random() < 0.6:
                backend.insert(card, READER)  # back at the desk: the end timer is cancelled
                stop.wait(rng.uniform(0.5, 1.5))
    finally:
        lock.stop()
    agent.emit("session.ended", {"terminal": terminal, "user": user, "cause": "logout"})


def login_scene(policy_doc: dict[str, Any], uids: list[str]) -> LoginScene | None:
    """Build the scene from a bundle's policy; None when it holds no terminal (or is not a site policy)."""
    try:
        policy = SitePolicy.model_validate(policy_doc)
    except ValidationError:
        return None
    return LoginScene(policy, uids) if policy.terminals else None
