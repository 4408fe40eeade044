"""The PAM path end to end: real pamtester, a throwaway /etc/pam.d service with pam_exec, the helper's verdict.

pam_exec runs `pam-auth`, which asks the terminal agent's PAM service (started here, on a socket in the
temp directory, as `sekisho-agent terminal` runs it) to decide, against a temp agent (issued from the session
PKI) with a real signed policy bundle in its cache and simulated card and finger scripted by a scenario file.
Every decision must show up in the agent's outbox as a signed event with the precise reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import write_agent_config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_login_decision import make_policy

from sekisho.agents.login.decision import JST
from sekisho.agents.login.messages import message
from sekisho.agents.login.pam import SIMULATION_ENV
from sekisho.agents.login.pam_service import PamService
from sekisho.agents.login.sessions import LoginSessions
from sekisho.agents.runtime.outbox import Outbox
from sekisho.agents.runtime.policy_cache import CACHE_NAME
from sekisho.common.files import write_atomically
from sekisho.deploy.pki import AgentCredentials, PkiPaths, issue_agent
from sekisho.drivers.smartcard import hash_uid, mask_uid
from sekisho.protocol import events, messages, signing

REPO = Path(__file__).resolve().parent.parent
TERMINAL = "t-hr-01"
PAM_DIR = Path("/etc/pam.d")


def _pam_exec_present() -> bool:
    return any(
        Path(d, "pam_exec.so").exists()
        for d in (
            "/lib/x86_64-linux-gnu/security",
            "/usr/lib/x86_64-linux-gnu/security",
            "/lib/security",
            "/usr/lib/security",
        )
    )


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to write a throwaway service into /etc/pam.d"
    if shutil.which("pamtester") is None:
        return "pamtester is not installed (apt-get install pamtester)"
    if not _pam_exec_present():
        return "pam_exec.so not found (libpam-modules)"
    return None


_REASON = _skip_reason()
if _REASON:
    print(f"test_login_pam: skipped: {_REASON}", file=sys.stderr)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_private(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_public(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass
class Terminal:
    """A temp agent with a login.toml, a wrapper script and a throwaway PAM service pointing at it."""

    agent: str
    dir: Path
    config: Path
    service: str
    scenario: Path
    site_key: bytes
    controller_key: Any
    cards: dict[str, tuple[bytes, ec.EllipticCurvePrivateKey]]
    pam: PamService | None = None

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def policy_doc(
        self, *, handlers: list[str] | None = None, schedule: dict | None = None, inactive: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Return the site policy (as the controller slices it for this agent) with real card keys."""
        base = make_policy()
        people = [p.model_dump(mode="json") | ({"active": False} if p.id in inactive else {}) for p in base.people]
        cards = []
        for card_id, person in (("c-alice", "p-alice"), ("c-bob", "p-bob")):
            uid, key = self.cards[card_id]
            cards.append(
                {
                    "id": card_id,
                    "person": person,
                    "kind": "piv",
                    "uid_hash": hash_uid(uid, self.site_key),
                    "public_key_pem": _pem_public(key),
                }
            )
        terminal: dict[str, Any] = {
            "id": TERMINAL,
            "name": "人事PC",
            "agent": self.agent,
            "handlers": handlers if handlers is not None else ["p-alice", "p-bob"],
            "schedule": None,
        }
        schedules = []
        if schedule is not None:
            schedules = [schedule]
            terminal["schedule"] = schedule["id"]
        policy = make_policy(
            login={
                "expired_policy_grace_hours": 4,
                "notices": ["離席時はICカードを抜いてください。", "画面ののぞき見に注意。"],
            },
            cards=cards,
            terminals=[terminal],
            schedules=schedules,
            people=people,
        )
        return policy.for_agent(self.agent)

    def install_bundle(
        self, version: int, policy: dict[str, Any], *, issued_at: datetime | None = None, lifetime=timedelta(days=1)
    ) -> None:
        """Write a signed bundle straight into the policy cache, as the running agent would have."""
        raw = messages.build_bundle(
            self.controller_key,
            agent=self.agent,
            version=version,
            policy=policy,
            lifetime=lifetime,
            issued_at=issued_at,
        )
        self.state.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state / CACHE_NAME, raw)

    def set_scenario(self, card: str | None, finger: str = "match", *, uid: bytes | None = None, key=None) -> None:
        """Script the simulated reader and sensor for the next login."""
        card_doc: dict[str, Any] | None = None
        if card is not None:
            card_uid, card_key = self.cards[card]
            card_doc = {"uid": (uid or card_uid).hex(), "private_key_pem": _pem_private(key or card_key)}
        elif uid is not None:
            card_doc = {"uid": uid.hex(), "private_key_pem": _pem_private(key or _key())}
        self.scenario.write_text(json.dumps({"card": card_doc, "finger": {"outcome": finger, "timeout_s": 0.3}}))

    def pamtester(self, user: str, *ops: str) -> subprocess.CompletedProcess[str]:
        """Run the real pamtester against the throwaway service (default operation: authenticate)."""
        return subprocess.run(
            ["pamtester", "-v", self.service, user, *(ops or ("authenticate",))],
            input="\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def last_event(self) -> events.DecodedEvent:
        """Return the newest event in the agent's outbox, its signature verified with the agent's key."""
        outbox = Outbox(
            self.state / "outbox.sqlite3",
            signing_key=signing.generate_key(),  # reading only; nothing is signed with it
            agent_id=self.agent,
        )
        try:
            rows = outbox.pending(limit=100_000)
        finally:
            outbox.close()
        assert rows, "no event in the outbox"
        decoded = events.decode_event(rows[-1][1], topic_agent=self.agent)
        return decoded

    def event_count(self) -> int:
        path = self.state / "outbox.sqlite3"
        return Outbox.inspect(path).next_seq - 1 if path.exists() else 0


@contextlib.contextmanager
def make_terminal(pki: Path, base: Path, *, login_toml: str, simulated: bool = True) -> Iterator[Terminal]:
    """Set up the agent, wrapper and /etc/pam.d/sekisho-test-<random>; remove the PAM file afterwards."""
    agent = f"lg-{secrets.token_hex(4)}"
    creds = issue_agent(pki, agent)
    config = write_agent_config(base / "agent.toml", creds, 8883)
    site_key = secrets.token_hex(32).encode()
    (base / "site.key").write_bytes(site_key)
    (base / "login.toml").write_text('site_key_file = "site.key"\n' + login_toml)
    scenario = base / "scenario.json"
    wrapper = base / "sekisho-pam-auth"
    simulation = f"export {SIMULATION_ENV}={scenario}\n" if simulated else ""
    socket_path = base / "pam" / "pam.sock"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"cd {REPO}\n"
        f"{simulation}"
        f"exec {sys.executable} -m sekisho.agents.login pam-auth --config {config} --terminal {TERMINAL} "
        f"--socket {socket_path} 2>>{base / 'helper.log'}\n"
    )
    wrapper.chmod(0o755)
    service = f"sekisho-test-{secrets.token_hex(6)}"
    pam_file = PAM_DIR / service
    pam_file.write_text(
        f"auth required pam_exec.so stdout quiet {wrapper}\n"
        "account required pam_permit.so\n"
        f"session optional pam_exec.so stdout quiet type=open_session {wrapper}\n"
        f"session optional pam_exec.so quiet type=close_session {wrapper}\n"
    )
    pam = PamService(config, TERMINAL, socket_path=socket_path)
    try:
        cards = {
            "c-alice": (bytes.fromhex("04A1B2C3D4E5F6"), _key()),
            "c-bob": (bytes.fromhex("04B0B0B0B0B0B0"), _key()),
        }
        controller_key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
        # The terminal agent's side: it decides what pam-auth asks (sekisho-agent terminal runs the same).
        pam.start()
        yield Terminal(agent, base, config, service, scenario, site_key, controller_key, cards, pam)
    finally:
        pam.stop()
        pam_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def terminal(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terminal]:
    """A terminal whose card and finger are simulated, scripted per test by a scenario file."""
    toml = 'simulation_allowed = true\ndesktop_notice_file = "run/notice.txt"\n'
    with make_terminal(pki, tmp_path_factory.mktemp("login"), login_toml=toml) as t:
        yield t


@pytest.fixture
def login(terminal: Terminal) -> Terminal:
    """The terminal with a fresh valid policy (v1) and the right card and finger scripted."""
    terminal.install_bundle(1, terminal.policy_doc())
    terminal.set_scenario("c-alice", "match")
    registry = LoginSessions(terminal.state)
    try:
        for session in registry.active():  # earlier tests' grants
            registry.closed(session.user)
    finally:
        registry.close()
    return terminal


def assert_denied(t: Terminal, user: str, reason: str) -> events.DecodedEvent:
    before = t.event_count()
    result = t.pamtester(user)
    assert result.returncode != 0, result.stdout + result.stderr
    assert t.event_count() == before + 1
    event = t.last_event()
    assert (event.type, event.payload["reason"], event.payload["user"]) == ("login.denied", reason, user)
    assert event.payload["terminal"] == TERMINAL
    assert message(reason) in result.stdout + result.stderr
    return event


def test_designated_handler_with_right_card_and_finger_is_granted(login: Terminal) -> None:
    result = login.pamtester("alice")
    assert result.returncode == 0, result.stdout + result.stderr
    assert message("granted") in result.stdout + result.stderr
    event = login.last_event()
    uid, _ = login.cards["c-alice"]
    assert event.type == "login.granted"
    assert {k: event.payload[k] for k in ("terminal", "person", "user", "methods", "card", "card_masked", "weak")} == {
        "terminal": TERMINAL,
        "person": "p-alice",
        "user": "alice",
        "methods": ["card", "fingerprint"],
        "card": "c-alice",
        "card_masked": mask_uid(uid),
        "weak": False,
    }
    assert uid.hex() not in event.raw.decode().lower()  # the UID itself never reaches an event


def test_granted_event_is_signed_by_the_agent(login: Terminal, pki: Path) -> None:
    assert login.pamtester("alice").returncode == 0
    login.last_event().verify(signing.load_public_key(AgentCredentials.at(pki, login.agent).signing_pub))


def test_no_card(login: Terminal) -> None:
    login.set_scenario(None)
    assert_denied(login, "alice", "no_card")


def test_unknown_card(login: Terminal) -> None:
    login.set_scenario(None, uid=bytes.fromhex("04DEADBEEF0001"))
    event = assert_denied(login, "alice", "unknown_card")
    assert (event.payload["card_masked"], event.payload.get("card")) == ("****-0001", None)


def test_card_of_someone_else(login: Terminal) -> None:
    login.set_scenario("c-bob")
    event = assert_denied(login, "alice", "card_bound_to_other")
    assert event.payload["person"] == "p-alice"


def test_cloned_card_fails_authentication(login: Terminal) -> None:
    login.set_scenario("c-alice", key=_key())  # same UID, a key of the cloner's own
    assert_denied(login, "alice", "card_auth_failed")


def test_fingerprint_mismatch(login: Terminal) -> None:
    login.set_scenario("c-alice", "no_match")
    event = assert_denied(login, "alice", "fingerprint_mismatch")
    assert event.payload["fingerprint_attempts"] == 3


def test_fingerprint_timeout(login: Terminal) -> None:
    login.set_scenario("c-alice", "timeout")
    assert_denied(login, "alice", "fingerprint_timeout")


def test_not_designated(login: Terminal) -> None:
    # carol has a login on the site but handles no terminal of this agent: the least-privilege slice does
    # not carry her, only her login name in the site's login directory, so she is "not designated" here.
    assert_denied(login, "carol", "not_designated")
    assert_denied(login, "nobody", "unknown_user")
    login.install_bundle(2, login.policy_doc(inactive=("p-alice",)))
    assert_denied(login, "alice", "not_designated")


def test_outside_hours(login: Terminal) -> None:
    today = datetime.now(JST).date().isoformat()
    closed_today = {
        "id": "closed",
        "name": "休業日",
        "weekdays": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        "start": "00:00",
        "end": "23:59",
        "on_public_holidays": True,
        "exception_days": [today],
    }
    login.install_bundle(2, login.policy_doc(schedule=closed_today))
    assert_denied(login, "alice", "outside_hours")


def test_expired_policy(login: Terminal) -> None:
    # Grace period 4 h (make_policy): expired 5 h ago is past it.
    issued = datetime.now(UTC) - timedelta(hours=6)
    login.install_bundle(2, login.policy_doc(), issued_at=issued, lifetime=timedelta(hours=1))
    assert_denied(login, "alice", "policy_expired")


def test_expired_policy_within_grace_still_decides(login: Terminal) -> None:
    issued = datetime.now(UTC) - timedelta(hours=2)
    login.install_bundle(2, login.policy_doc(), issued_at=issued, lifetime=timedelta(hours=1))
    assert login.pamtester("alice").returncode == 0


def test_revocation_in_a_new_bundle_refuses_the_next_login(login: Terminal) -> None:
    assert login.pamtester("alice").returncode == 0
    # Taken off this terminal's handlers: she leaves the agent's slice (only her login name stays known).
    login.install_bundle(2, login.policy_doc(handlers=["p-bob"]))
    assert_denied(login, "alice", "not_designated")
    login.set_scenario("c-bob")
    assert login.pamtester("bob").returncode == 0
    # Suspended as a person (still listed as handler): refused as not designated.
    login.install_bundle(3, login.policy_doc(inactive=("p-bob",)))
    assert_denied(login, "bob", "not_designated")


def test_corrupt_policy_cache_refuses_with_no_policy(login: Terminal) -> None:
    raw = (login.state / CACHE_NAME).read_bytes()
    (login.state / CACHE_NAME).write_bytes(raw[:-20] + b"garbage garbage!!!!!")
    assert_denied(login, "alice", "no_policy")
    (login.state / CACHE_NAME).write_bytes(b"\x00\xff not json")
    assert_denied(login, "alice", "no_policy")


def test_simulation_is_refused_unless_login_toml_allows_it(login: Terminal) -> None:
    settings = login.dir / "login.toml"
    original = settings.read_text()
    settings.write_text('site_key_file = "site.key"\n')
    try:
        event = assert_denied(login, "alice", "internal_error")
        assert "simulation" in event.payload["detail"]
    finally:
        settings.write_text(original)


def test_open_session_shows_the_notice_of_the_day(login: Terminal) -> None:
    result = login.pamtester("alice", "open_session")
    assert result.returncode == 0, result.stdout + result.stderr
    event = login.last_event()
    assert event.type == "login.notice_shown"
    notices = ["離席時はICカードを抜いてください。", "画面ののぞき見に注意。"]
    assert notices[event.payload["notice_index"]] in result.stdout + result.stderr
    assert event.payload["day"] == datetime.now(JST).date().isoformat()


def test_session_open_and_logout_are_recorded(login: Terminal) -> None:
    result = login.pamtester("alice", "authenticate", "open_session")
    assert result.returncode == 0, result.stdout + result.stderr
    registry = LoginSessions(login.state)
    try:
        (session,) = registry.active()
        # The running agent watches this reader for the card's removal (agents/login/watch.py).
        assert (session.user, session.person, session.state, session.card) == ("alice", "p-alice", "open", "c-alice")
        assert session.reader
        # The desktop's autostart entry shows the same notice (deploy/desktop/sekisho-notice.desktop).
        notice_file = login.dir / "run" / "notice.txt"
        assert notice_file.read_text().strip() in login.policy_doc()["login"]["notices"]
        assert notice_file.stat().st_mode & 0o777 == 0o644
        before = login.event_count()
        assert login.pamtester("alice", "close_session").returncode == 0
        assert registry.active() == []
    finally:
        registry.close()
    assert login.event_count() == before + 1
    logout = login.last_event()
    assert (logout.type, logout.payload["cause"], logout.payload["user"]) == ("session.ended", "logout", "alice")


def test_refused_login_opens_no_session(login: Terminal) -> None:
    login.set_scenario("c-alice", "no_match")
    assert login.pamtester("alice", "authenticate").returncode != 0
    registry = LoginSessions(login.state)
    try:
        assert [s.user for s in registry.active()] == []
    finally:
        registry.close()
