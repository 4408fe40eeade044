"""The PAM call handler: decide one login from the cached signed policy, the card and the finger; fail closed.

``PamHelper`` handles one PAM call — ``PAM_USER``, ``PAM_SERVICE`` and ``PAM_TYPE`` as pam_exec passes them.
Only ``auth`` decides; ``open_session`` prints the notice of the day. Exit 0 grants, anything else refuses —
including every exception, so a bug can only lock out, never let in (the break-glass group in deploy/pam is
the way back in).

It runs inside the terminal agent (``PamService`` in pam_service.py), asked by the small process pam_exec
starts (``sekisho-agent pam-auth``, pam_client.py). The decision is recorded by appending a signed event to
the agent's outbox database, which the agent's sender publishes.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sekisho.agents.login.decision import (
    JST,
    CardCheck,
    FingerCheck,
    LoginDecision,
    PolicyState,
    decide_login,
    refuse_early,
)
from sekisho.agents.login.lock import DEFAULT_END_COMMAND, DEFAULT_LOCK_COMMAND
from sekisho.agents.login.messages import bilingual
from sekisho.agents.login.notices import notice_for
from sekisho.agents.login.pam_client import SIMULATION_ENV
from sekisho.agents.login.sessions import LoginSessions
from sekisho.agents.runtime.cards import enrolled_cards
from sekisho.agents.runtime.config import AgentConfig, load_config
from sekisho.agents.runtime.outbox import Outbox
from sekisho.agents.runtime.policy_cache import PolicyCache
from sekisho.common.files import write_atomically
from sekisho.drivers.biometric import BiometricError, FingerprintBackend, NotEnrolled, SimulatedFingerprint
from sekisho.drivers.smartcard import (
    CardError,
    CardTimeout,
    Deadline,
    SimulatedBackend,
    SimulatedCard,
    SmartCardBackend,
    authenticate,
    hash_uid,
    mask_uid,
)
from sekisho.protocol import errors, signing, timefmt
from sekisho.protocol.policy import Card, SitePolicy

log = logging.getLogger(__name__)

LOGIN_SETTINGS_NAME = "login.toml"
_LOGIN_NAME_MAX = 64
_SIM_FINGER = "sim-finger"
# The driver's own deadline falls this much before the helper's, so its reason and detail come first.
_CARD_MARGIN_S = 0.25


class LoginAgentSettings(BaseModel):
    """``login.toml`` next to agent.toml: this terminal's login-guard settings (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site_key_file: Path | None = Field(
        default=None, description="the site key that keys card UID hashes (same as the policy author's)"
    )
    reader: str | None = Field(default=None, description="PC/SC reader to use; default: the first with a card")
    card_timeout_s: float = Field(
        default=4.0,
        gt=0,
        le=30,
        description="the card part of a login (find, identify, challenge–response) is over within this; "
        "past it the login is refused as card_timeout (the fingerprint wait has its own bound)",
    )
    card_apdu_timeout_s: float = Field(default=2.0, gt=0, le=30, description="the card's answer to one command")
    fingerprint_timeout_s: float = Field(default=15.0, gt=0, le=120)
    fingerprint_max_attempts: int = Field(default=3, ge=1, le=10)
    fprintd_bus: str = Field(default="SYSTEM", description='"SYSTEM" or a unix:path=… D-Bus address')
    lock_command: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LOCK_COMMAND),
        min_length=1,
        description="run (no shell) when the login card leaves; {session} and {user} are substituted",
    )
    end_command: list[str] = Field(
        default_factory=lambda: list(DEFAULT_END_COMMAND),
        description="run when the card stays away past the policy's end_session_after_card_removed_s; []: never",
    )
    desktop_notice_file: Path | None = Field(
        default=None,
        description="open_session writes the notice of the day here (world-readable) for the desktop to show",
    )
    simulation_allowed: bool = Field(
        default=False, description=f"honour {SIMULATION_ENV} (tests and the demo only; never on a real terminal)"
    )


class LoginSetupError(Exception):
    """The helper cannot be set up as configured (bad login.toml, refused simulation, missing site key)."""


def load_login_settings(agent_toml: Path) -> LoginAgentSettings:
    """Load login.toml beside the agent TOML (defaults when absent); relative paths resolve against it."""
    path = agent_toml.resolve().parent / LOGIN_SETTINGS_NAME
    if not path.exists():
        return LoginAgentSettings()
    mode = path.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        # It can switch on simulated hardware: anyone who may write it could grant themselves a login.
        raise LoginSetupError(f"{path} is writable by group or others; refusing it")
    try:
        data = tomllib.loads(path.read_text())
        settings = LoginAgentSettings(**data)
    except (OSError, tomllib.TOMLDecodeError, ValidationError, TypeError) as err:
        raise LoginSetupError(f"invalid {path}: {err}") from err
    for name in ("site_key_file", "desktop_notice_file"):
        value = getattr(settings, name)
        if value is not None and not value.is_absolute():
            settings = settings.model_copy(update={name: path.parent / value})
    return settings


# --- hardware: real or scripted by a simulation scenario -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hardware:
    """The card and fingerprint backends one login uses."""

    cards: SmartCardBackend
    fingers: FingerprintBackend
    reader: str | None = None
    fingerprint_timeout_s: float = 15.0


# Builds the hardware for one login (user, settings): the real one unless a caller (the benchmark) says otherwise.
HardwareFactory = Callable[[str, LoginAgentSettings], Hardware]


def simulated_hardware(scenario_path: Path, user: str) -> Hardware:
    """Build simulated backends scripted by a scenario file (see docs/login.md for its format)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    scenario: dict[str, Any] = json.loads(scenario_path.read_text())
    cards = SimulatedBackend()
    card = scenario.get("card")
    if card is not None:
        key = None
        if card.get("private_key_pem"):
            loaded = load_pem_private_key(card["private_key_pem"].encode(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise LoginSetupError("scenario card key must be ECC P-256")
            key = loaded
        cards.insert(SimulatedCard(uid=bytes.fromhex(card["uid"]), key=key, uid_only=bool(card.get("uid_only"))))
    finger = scenario.get("finger", {})
    outcome = finger.get("outcome", "match")
    max_attempts = int(finger.get("max_attempts", 3))
    sensor = SimulatedFingerprint()
    if outcome != "not_enrolled":
        sensor.enroll(user, _SIM_FINGER)
    if outcome == "unavailable":
        sensor.available = False
    elif outcome == "match":
        sensor.touch(_SIM_FINGER)
    elif outcome == "no_match":
        for _ in range(max_attempts):
            sensor.touch("someone-else")
    # "timeout": nobody touches the sensor.
    return Hardware(cards, sensor, fingerprint_timeout_s=float(finger.get("timeout_s", 0.3)))


def real_hardware(settings: LoginAgentSettings) -> Hardware:
    """Return pcscd and fprintd backends (imported only here: pyscard and jeepney are agent extras)."""
    from sekisho.drivers.biometric import FprintdBackend
    from sekisho.drivers.smartcard import pcsc_backend

    return Hardware(
        pcsc_backend(),
        FprintdBackend(bus_address=settings.fprintd_bus),
        reader=settings.reader,
        fingerprint_timeout_s=settings.fingerprint_timeout_s,
    )


def check_card(
    backend: SmartCardBackend,
    cards: list[Card],
    *,
    site_key: bytes,
    allow_uid_only: bool,
    reader: str | None = None,
    deadline: Deadline | None = None,
) -> CardCheck:
    """Find a card in the reader(s), identify it among the policy's cards and run challenge–response.

    Every exchange with the card keeps to ``deadline``; a card that stops answering is ``timed_out``.
    """
    readers = [reader] if reader else backend.readers()
    for name in readers:
        try:
            conn = backend.connect(name, deadline=deadline)
        except CardTimeout as err:
            # pcscd is still busy with a card in this reader that does not answer: fail closed.
            return CardCheck(present=True, timed_out=True, reader=name, detail=f"card_timeout: {err}")
        except CardError:
            continue  # no card in this reader (or it vanished): try the next one
        break
    else:
        return CardCheck(present=False, detail=f"no card in {len(readers)} reader(s)")
    try:
        uid_hash = uid_masked = None
        try:
            uid = conn.get_uid()
            uid_hash, uid_masked = hash_uid(uid, site_key), mask_uid(uid)
        except CardError:
            pass  # contact cards have no UID; authenticate() identifies them by certificate
        result = authenticate(conn, enrolled_cards(cards), site_key=site_key, allow_uid_only=allow_uid_only)
    finally:
        conn.close()
    common: dict[str, Any] = {
        "card_id": result.card_id,
        "uid_hash": uid_hash,
        "uid_masked": uid_masked,
        "reader": name,
    }
    if result.reason in ("no_card", "reader_unavailable"):
        return CardCheck(present=False, detail=f"{result.reason}: {result.detail}")
    if result.reason == "card_timeout":
        return CardCheck(present=True, timed_out=True, detail=f"{result.reason}: {result.detail}", **common)
    if result.reason == "ok":
        return CardCheck(present=True, authenticated=True, **common)
    if result.reason == "uid_only_weak":
        return CardCheck(present=True, authenticated=True, weak=True, **common)
    if result.reason == "uid_only_not_allowed":
        return CardCheck(present=True, authenticated=False, weak=True, **common)
    if result.reason == "unknown_card":
        # Only what the driver matched counts: a UID hash alone must not identify a card it could not match.
        return CardCheck(present=True, reader=name, uid_masked=uid_masked, detail=result.detail)
    return CardCheck(present=True, authenticated=False, detail=f"{result.reason}: {result.detail}", **common)


def check_card_within(
    backend: SmartCardBackend,
    cards: list[Card],
    *,
    until: float,
    apdu_timeout_s: float,
    site_key: bytes,
    allow_uid_only: bool,
    reader: str | None = None,
) -> CardCheck:
    """Run ``check_card`` to be over by ``until`` (``time.monotonic()``); past it, the card is ``timed_out``.

    The driver bounds each exchange with the card (per command, and the whole check a little before
    ``until``); this bounds everything else as well (pcscd not answering at all, a driver fault), so the
    helper never waits for the card longer than it was configured to. A check still running at ``until`` is
    left behind on its daemon thread: the helper decides, records and exits.
    """
    margin = min(_CARD_MARGIN_S, (until - time.monotonic()) / 4)
    deadline = Deadline(apdu_s=apdu_timeout_s, at=until - max(margin, 0.0))
    done: list[CardCheck] = []
    failed: list[Exception] = []

    def run() -> None:
        try:
            done.append(
                check_card(
                    backend,
                    cards,
                    site_key=site_key,
                    allow_uid_only=allow_uid_only,
                    reader=reader,
                    deadline=deadline,
                )
            )
        except Exception as err:  # raised again on the helper's thread: refused as an internal error
            failed.append(err)

    worker = threading.Thread(target=run, name="login-card-check", daemon=True)
    worker.start()
    worker.join(max(0.0, until - time.monotonic()))
    if failed:
        raise failed[0]
    if done:
        return done[0]
    return CardCheck(
        present=True, timed_out=True, reader=reader, detail="card_timeout: the card check did not finish in time"
    )


def check_finger(backend: FingerprintBackend, user: str, *, timeout_s: float, max_attempts: int) -> FingerCheck:
    """Verify the user's finger; sensor trouble becomes ``unavailable``, never an exception."""
    try:
        if not backend.enrolled(user):
            return FingerCheck(outcome="not_enrolled")
    except BiometricError as err:
        return FingerCheck(outcome="unavailable", detail=str(err))
    result = backend.verify(user, timeout_s=timeout_s, max_attempts=max_attempts)
    if result.outcome == "unavailable" and isinstance(result.error, NotEnrolled):
        return FingerCheck(outcome="not_enrolled", detail=result.detail)
    return FingerCheck(outcome=result.outcome, attempts=result.attempts, detail=result.detail)


# --- the helper ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PamRequest:
    """What pam_exec passed: the user, the service and the PAM call type."""

    user: str
    service: str | None
    pam_type: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PamRequest:
        """Read PAM_USER, PAM_SERVICE and PAM_TYPE."""
        return cls(env.get("PAM_USER", ""), env.get("PAM_SERVICE") or None, env.get("PAM_TYPE", ""))


def _event_user(user: str) -> str:
    # PAM_USER is whatever was typed at the prompt: keep events small and printable.
    text = "".join(ch for ch in user if ch.isprintable())
    return text[:_LOGIN_NAME_MAX] or "(empty)"


class LoginRecorder:
    """Appends login events to the agent's outbox, signed with the agent's key."""

    def __init__(self, config: AgentConfig) -> None:
        self._outbox = Outbox(
            config.outbox_path,
            signing_key=signing.load_private_key(config.signing_key),
            agent_id=config.agent_id,
            sync=config.outbox_sync,
        )

    def append(self, type_: str, payload: dict[str, Any]) -> int:
        """Store one event; a typed user name that looks like a My Number is redacted, never stored."""
        try:
            return self._outbox.append(type_, payload)
        except errors.Rejected as err:
            if err.reason != errors.MY_NUMBER:
                raise
            return self._outbox.append(type_, {**payload, "user": "(redacted)"})

    def close(self) -> None:
        """Close the outbox."""
        self._outbox.close()


def decision_event(
    decision: LoginDecision, terminal: str, request: PamRequest, extra: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Return the (type, payload) of the event that records a decision."""
    payload: dict[str, Any] = {"terminal": terminal, "user": _event_user(request.user), "weak": decision.weak}
    if request.service:
        payload["service"] = request.service[:64]
    if decision.card_id:
        payload["card"] = decision.card_id
    payload.update({k: v for k, v in extra.items() if v is not None})
    if decision.granted:
        assert decision.person_id is not None
        return "login.granted", {**payload, "person": decision.person_id, "methods": list(decision.methods)}
    if decision.person_id:
        payload["person"] = decision.person_id
    return "login.denied", {**payload, "reason": decision.reason, "detail": decision.detail[:300]}


@dataclass
class PamHelper:
    """One PAM call: set up from the agent's files, decide, record, print, return the exit code.

    ``config`` and ``recorder`` are the running agent's when it handles the call (pam_service.py); left out,
    they are loaded from ``config_path`` and the recorder is closed at the end.
    """

    config_path: Path
    terminal: str
    env: Mapping[str, str]
    out: TextIO = sys.stdout
    now: Callable[[], datetime] = timefmt.now
    config: AgentConfig | None = None
    recorder: LoginRecorder | None = None
    hardware: HardwareFactory | None = None

    def run(self) -> int:
        """Run the PAM call; exit code 0 grants, 1 refuses (also on any error: fail closed)."""
        request = PamRequest.from_env(self.env)
        recorder = self.recorder
        try:
            config = self.config if self.config is not None else load_config(self.config_path)
            if recorder is None:
                recorder = LoginRecorder(config)
            if request.pam_type == "auth":
                return self._auth(config, recorder, request)
            if request.pam_type == "open_session":
                self._notice(config, recorder, request)
                return 0
            if request.pam_type == "close_session":
                self._logout(config, recorder, request)
                return 0
            # account/password stacks are not ours to decide: a misconfigured line refuses, loudly.
            raise LoginSetupError(f"PAM_TYPE {request.pam_type!r} is not handled (use auth or open_session)")
        except Exception as err:
            log.exception("login helper failed; refusing")
            return self._failed(request, recorder, err)
        finally:
            if recorder is not None and recorder is not self.recorder:
                recorder.close()

    def refuse(self, err: Exception) -> int:
        """Refuse the call as ``internal_error`` without deciding it (recorded when the outbox can be opened)."""
        request = PamRequest.from_env(self.env)
        recorder = self.recorder
        try:
            if recorder is None:
                try:
                    config = self.config if self.config is not None else load_config(self.config_path)
                    recorder = LoginRecorder(config)
                except Exception:
                    log.exception("cannot open the outbox to record the refusal")
            log.error("refusing: %s", err)
            return self._failed(request, recorder, err)
        finally:
            if recorder is not None and recorder is not self.recorder:
                recorder.close()

    def _failed(self, request: PamRequest, recorder: LoginRecorder | None, err: Exception) -> int:
        self._print("internal_error")
        if recorder is not None and request.pam_type == "auth":
            try:
                failed = LoginDecision(granted=False, reason="internal_error", detail=f"{type(err).__name__}: {err}")
                recorder.append(*decision_event(failed, self.terminal, request, {}))
            except Exception:
                log.exception("could not record the internal error either")
        return 1

    def _print(self, reason: str) -> None:
        print(bilingual(reason), file=self.out, flush=True)

    def _policy(self, config: AgentConfig) -> tuple[SitePolicy | None, PolicyState, datetime | None]:
        cache = PolicyCache(
            config.state_dir, signing.load_public_key(config.controller_public_key), config.agent_id, now=self.now
        )
        bundle = cache.current()
        if bundle is None:
            return None, "none", None
        try:
            policy = SitePolicy.model_validate(bundle.bundle.policy)
        except ValidationError:
            # Signed but not a site policy this agent understands: no policy, fail closed.
            log.warning("cached bundle %d does not hold a valid site policy", bundle.bundle.version)
            return None, "none", None
        return policy, cache.state(), bundle.expires_at

    def _hardware(self, user: str, settings: LoginAgentSettings) -> Hardware:
        scenario = self.env.get(SIMULATION_ENV)
        if scenario:
            if not settings.simulation_allowed:
                raise LoginSetupError(f"{SIMULATION_ENV} is set but login.toml does not allow simulation")
            return simulated_hardware(Path(scenario), user)
        if self.hardware is not None:
            return self.hardware(user, settings)
        return real_hardware(settings)

    def _auth(self, config: AgentConfig, recorder: LoginRecorder, request: PamRequest) -> int:
        settings = load_login_settings(self.config_path)
        policy, state, expires_at = self._policy(config)
        now = self.now()
        args = (policy, state, expires_at, self.terminal, request.user)
        decision = refuse_early(*args, now)
        extra: dict[str, Any] = {}
        reader: str | None = None
        if decision is None:
            assert policy is not None
            if settings.site_key_file is None:
                raise LoginSetupError("login.toml has no site_key_file: card UIDs cannot be matched")
            # The card part's deadline counts from here: a card (or pcscd) that stops answering ends the
            # login as card_timeout by then, never later.
            card_until = time.monotonic() + settings.card_timeout_s
            site_key = settings.site_key_file.read_bytes().strip()
            hardware = self._hardware(request.user, settings)
            card = check_card_within(
                hardware.cards,
                list(policy.cards),
                until=card_until,
                apdu_timeout_s=settings.card_apdu_timeout_s,
                site_key=site_key,
                allow_uid_only=policy.login.allow_uid_only,
                reader=hardware.reader,
            )
            extra["card_masked"] = card.uid_masked
            reader = card.reader
            decision = refuse_early(*args, now, card)
            if decision is None:
                self._print("touch_sensor")
                finger = check_finger(
                    hardware.fingers,
                    request.user,
                    timeout_s=hardware.fingerprint_timeout_s,
                    max_attempts=settings.fingerprint_max_attempts,
                )
                extra["fingerprint_attempts"] = finger.attempts
                decision = decide_login(*args, card, finger, self.now())
        recorder.append(*decision_event(decision, self.terminal, request, extra))
        if decision.granted:
            assert decision.person_id is not None
            # The running agent watches this reader for the card's removal once the session opens.
            sessions = LoginSessions(config.state_dir)
            try:
                sessions.granted(request.user, decision.person_id, reader, decision.card_id)
            finally:
                sessions.close()
        log.info("login %s for %s: %s", "granted" if decision.granted else "denied", request.user, decision.reason)
        self._print("granted_weak" if decision.granted and decision.weak else decision.reason)
        return 0 if decision.granted else 1

    def _logout(self, config: AgentConfig, recorder: LoginRecorder, request: PamRequest) -> None:
        sessions = LoginSessions(config.state_dir)
        try:
            ended = sessions.closed(request.user)
        finally:
            sessions.close()
        if ended is not None:
            recorder.append(
                "session.ended", {"terminal": self.terminal, "user": _event_user(request.user), "cause": "logout"}
            )

    def _notice(self, config: AgentConfig, recorder: LoginRecorder, request: PamRequest) -> None:
        sessions = LoginSessions(config.state_dir)
        try:
            sessions.opened(request.user, self.env.get("XDG_SESSION_ID") or None)
        finally:
            sessions.close()
        policy, state, _ = self._policy(config)
        if policy is None or state != "valid":
            return
        day = self.now().astimezone(JST).date()
        notice = notice_for(day, policy.login.notices)
        if notice is None:
            return
        print(f"{bilingual('notice_heading').splitlines()[0]}\n{notice}", file=self.out, flush=True)
        target = load_login_settings(self.config_path).desktop_notice_file
        if target is not None:
            # The notice is public text; the policy it comes from stays in the private state directory.
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, f"{notice}\n".encode(), mode=0o644)
        payload: dict[str, Any] = {
            "terminal": self.terminal,
            "user": _event_user(request.user),
            "day": day.isoformat(),
            "notice_index": policy.login.notices.index(notice),
        }
        if request.service:
            payload["service"] = request.service[:64]
        recorder.append("login.notice_shown", payload)


def _forget_agent_overrides() -> None:
    # pam_exec passes the PAM environment, which pam_env may fill from user files: it must not be able to
    # override the agent config (e.g. point controller_public_key at a key of the user's own).
    for name in [n for n in os.environ if n.startswith("SEKISHO_AGENT_")]:
        del os.environ[name]


def pam_auth(config_path: Path, terminal: str, env: Mapping[str, str] | None = None, out: TextIO | None = None) -> int:
    """Handle one PAM call for ``terminal`` in this process; return the exit code (0 grant, 1 refuse)."""
    if env is None:
        _forget_agent_overrides()
    return PamHelper(config_path, terminal, os.environ if env is None else env, out or sys.stdout).run()


def without_agent(config_path: Path, terminal: str, env: Mapping[str, str], detail: str) -> int:
    """What ``pam-auth`` does when the terminal agent could not be asked (pam_client.py); the exit code.

    ``auth`` is refused and recorded as ``internal_error``: never decided here, because a login the agent
    does not know of would have no card-removal lock. ``open_session`` and ``close_session`` keep the session
    registry and the logout record in this process, as the agent would have.
    """
    logging.basicConfig(level=logging.WARNING, format="sekisho-pam-auth %(levelname)s %(name)s: %(message)s")
    _forget_agent_overrides()
    helper = PamHelper(config_path, terminal, env, sys.stdout)
    if PamRequest.from_env(env).pam_type in ("open_session", "close_session"):
        return helper.run()
    return helper.refuse(LoginSetupError(f"the terminal agent did not decide: {detail}"))
