"""The whole login chain on the real stacks: pamtester → pam_exec → sekisho-agent pam-auth → pcscd + fprintd.

No simulation: the helper reads a software PIV card through our own pcscd and vpcd (challenge–response
against the enrolled key) and verifies the finger through the real fprintd with libfprint's virtual
sensor on a private system bus (login.toml points it there). Each case must end in the right signed event.
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

from sekisho.firmware_stubs.piv_card import VirtualCard
from sekisho.lab.pcscd import VPCD_READER

pytest_plugins = ["pcsc_fixtures"]

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
