"""The whole login chain on the real stacks: pamtester → pam_exec → sekisho-agent pam-auth → pcscd + fprintd.

No simulation: the helper reads a software PIV card through our own pcscd and vpcd (challenge–response
against the enrolled key) and verifies the finger through the real fprintd with libfprint's virtual
sensor on a private system bus (login.toml points it there). Each case must end in the right signed event.
Cards that stop answering (mid challenge–response, at all, or with an empty frame) are refused as
card_timeout while they are still silent — the deadline decides, not the card.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fprintd import FprintdStack, missing_prerequisites
from test_login_pam import _REASON as PAM_REASON
from test_login_pam import Terminal, make_terminal

from sekisho.agents.login.messages import message
from sekisho.firmware_stubs.piv_card import INS_GENERAL_AUTHENTICATE, INS_SELECT, Fault, VirtualCard, make_certificate
from sekisho.lab.pcscd import VPCD_READER

_FP_REASON = missing_prerequisites()
pytestmark = [
    pytest.mark.skipif(PAM_REASON is not None, reason=PAM_REASON or ""),
    pytest.mark.skipif(_FP_REASON is not None, reason=f"fprintd stack: {_FP_REASON}"),
    pytest.mark.timeout(180),
]

ALICE_FINGER = "alice-finger"


@pytest.fixture(scope="module")
def fprintd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FprintdStack]:
    """The real fprintd on a private bus, alice's finger enrolled through fprintd-enroll."""
    with FprintdStack(tmp_path_factory.mktemp("fp")) as stack:
        stack.enroll("alice", ALICE_FINGER)
        yield stack


@pytest.fixture(scope="module")
def real(
    pki: Path, pcscd: object, fprintd: FprintdStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Terminal]:
    """A terminal whose helper uses the real pcscd reader and the private fprintd (no simulation)."""
    login_toml = (
        f'reader = "{VPCD_READER}"\n'
        f'fprintd_bus = "{fprintd.address}"\n'
        "fingerprint_timeout_s = 8\n"
        "fingerprint_max_attempts = 2\n"
        "card_timeout_s = 3\n"
        "card_apdu_timeout_s = 2\n"
    )
    with make_terminal(pki, tmp_path_factory.mktemp("real"), login_toml=login_toml, simulated=False) as t:
        t.install_bundle(1, t.policy_doc())
        yield t


def _card_seen(present: bool, timeout: float = 5.0) -> None:
    from sekisho.drivers.smartcard import CardError
    from sekisho.drivers.smartcard.pcsc import PcscBackend

    backend = PcscBackend()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            backend.connect(VPCD_READER).close()
            seen = True
        except CardError:
            seen = False
        if seen == present:
            return
        time.sleep(0.05)
    raise AssertionError(f"pcscd did not report the card {'in' if present else 'out'} within {timeout} s")


def _login(t: Terminal, fprintd: FprintdStack, fingers: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pamtester while a person touches the sensor with ``fingers`` (one per attempt)."""
    touched: list[BaseException] = []

    def touch() -> None:
        try:
            for finger in fingers:
                fprintd.scan(finger, timeout=20)  # retries until the helper has claimed the sensor
                time.sleep(0.3)
        except BaseException as err:  # reported by the test, not lost in the thread
            touched.append(err)

    toucher = threading.Thread(target=touch, daemon=True)
    toucher.start()
    result = t.pamtester("alice")
    toucher.join(30)
    assert not touched, touched
    return result


def test_enrolled_card_and_finger_log_in(real: Terminal, fprintd: FprintdStack) -> None:
    uid, key = real.cards["c-alice"]
    with VirtualCard(uid=uid, key=key):
        _card_seen(True)
        result = _login(real, fprintd, [ALICE_FINGER])
    assert result.returncode == 0, result.stdout + result.stderr + (real.dir / "helper.log").read_text()
    event = real.last_event()
    assert event.type == "login.granted"
    assert (event.payload["person"], event.payload["card"], event.payload["methods"]) == (
        "p-alice",
        "c-alice",
        ["card", "fingerprint"],
    )
    assert event.payload["weak"] is False and event.payload["fingerprint_attempts"] == 1
    _card_seen(False)


def test_wrong_finger_is_refused(real: Terminal, fprintd: FprintdStack) -> None:
    uid, key = real.cards["c-alice"]
    with VirtualCard(uid=uid, key=key):
        _card_seen(True)
        result = _login(real, fprintd, ["bob-finger", "bob-finger"])
    assert result.returncode != 0
    event = real.last_event()
    assert (event.type, event.payload["reason"], event.payload["fingerprint_attempts"]) == (
        "login.denied",
        "fingerprint_mismatch",
        2,
    )
    _card_seen(False)


def test_cloned_card_is_refused_before_the_finger(real: Terminal, fprintd: FprintdStack) -> None:
    uid, key = real.cards["c-alice"]
    with VirtualCard(uid=uid, key=key, mode="wrong_key"):
        _card_seen(True)
        result = real.pamtester("alice")
    assert result.returncode != 0
    event = real.last_event()
    assert (event.type, event.payload["reason"]) == ("login.denied", "card_auth_failed")
    _card_seen(False)


def test_no_card_is_refused(real: Terminal) -> None:
    _card_seen(False)
    result = real.pamtester("alice")
    assert result.returncode != 0
    event = real.last_event()
    assert (event.type, event.payload["reason"]) == ("login.denied", "no_card")


@pytest.mark.parametrize(
    ("mode", "fault", "ins"),
    [("wrong_key", "stall", INS_GENERAL_AUTHENTICATE), ("piv", "stall", None), ("piv", "empty", INS_SELECT)],
    ids=["stalls mid challenge-response", "never answers", "answers with an empty frame"],
)
def test_card_that_stops_answering_is_refused_card_timeout(
    real: Terminal, mode: str, fault: Fault, ins: int | None
) -> None:
    uid, key = real.cards["c-alice"]
    card = VirtualCard(uid=uid, key=key, mode=mode, fault=fault, fault_ins=ins)  # type: ignore[arg-type]
    with card:
        _card_seen(True)
        result = real.pamtester("alice")
        # Refused while the card still owes its answer: the helper's deadline ended the wait.
        assert card.stalled.is_set() and not card.stall_answered.is_set()
    assert result.returncode != 0
    assert message("card_timeout") in result.stdout + result.stderr
    event = real.last_event()
    assert (event.type, event.payload["reason"]) == ("login.denied", "card_timeout")
    assert event.payload.get("fingerprint_attempts") is None  # no finger asked for after a failed card
    _card_seen(False)


def test_enrolled_card_that_stalls_is_refused_and_the_reader_recovers(real: Terminal, fprintd: FprintdStack) -> None:
    uid, key = real.cards["c-alice"]
    # Alice's own card, which would sign correctly, but only after the deadline.
    slow = VirtualCard(uid=uid, key=key, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE, stall_s=30)
    with slow:
        _card_seen(True)
        result = real.pamtester("alice")
        assert slow.stalled.is_set() and not slow.stall_answered.is_set()
    assert result.returncode != 0
    event = real.last_event()
    assert (event.type, event.payload["reason"], event.payload.get("card")) == (
        "login.denied",
        "card_timeout",
        "c-alice",
    )
    _card_seen(False)
    # Once the stalled card has left, the same reader serves the next login as usual.
    with VirtualCard(uid=uid, key=key):
        _card_seen(True)
        granted = _login(real, fprintd, [ALICE_FINGER])
    assert granted.returncode == 0, granted.stdout + granted.stderr
    assert real.last_event().type == "login.granted"
    _card_seen(False)


def test_clone_with_copied_certificate_that_will_not_sign_is_card_auth_failed(real: Terminal) -> None:
    _, key = real.cards["c-alice"]
    # Not alice's UID: only the copied (public) certificate names her card, and the clone cannot sign.
    clone = VirtualCard(uid=bytes.fromhex("08C0FFEE"), certificate=make_certificate(key), mode="refuses_to_sign")
    with clone:
        _card_seen(True)
        result = real.pamtester("alice")
    assert result.returncode != 0
    event = real.last_event()
    assert (event.type, event.payload["reason"], event.payload.get("card")) == (
        "login.denied",
        "card_auth_failed",
        "c-alice",
    )
    _card_seen(False)


def test_card_pulled_mid_challenge_is_no_card(real: Terminal) -> None:
    uid, key = real.cards["c-alice"]
    card = VirtualCard(uid=uid, key=key, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE)

    def pull_when_challenged() -> None:
        if card.stalled.wait(30):
            card.remove()

    card.insert()
    _card_seen(True)
    puller = threading.Thread(target=pull_when_challenged, daemon=True)
    puller.start()
    try:
        result = real.pamtester("alice")
    finally:
        puller.join(30)
        card.remove()
    assert card.stalled.is_set()
    assert result.returncode != 0
    event = real.last_event()
    assert (event.type, event.payload["reason"]) == ("login.denied", "no_card")
    _card_seen(False)
