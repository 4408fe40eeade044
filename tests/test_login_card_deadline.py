"""The login helper's own deadline on the card part: it refuses as card_timeout even if the driver never returns.

The driver bounds every exchange with a card (tests/test_smartcard_pcsc.py, tests/test_login_pam_real.py);
``check_card_within`` bounds everything else too — here a backend whose connect never comes back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from test_login_decision import TERMINAL, WORKDAY, make_policy

from sekisho.agents.login.decision import CardCheck, refuse_early
from sekisho.agents.login.pam import LoginAgentSettings, check_card_within
from sekisho.drivers.smartcard import CardConnection, Deadline
from sekisho.drivers.smartcard.protocol import CardObserver, ReaderObserver


class WedgedBackend:
    """A smart-card backend whose connect hangs until released (as pcscd would with a wedged reader)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.connecting = threading.Event()
        self.deadlines: list[Deadline | None] = []

    def readers(self) -> list[str]:
        return ["Wedged Reader 0"]

    def subscribe(self, observer: CardObserver) -> Callable[[], None]:
        return lambda: None

    def subscribe_readers(self, observer: ReaderObserver) -> Callable[[], None]:
        return lambda: None

    def connect(self, reader: str, *, deadline: Deadline | None = None) -> CardConnection:
        self.deadlines.append(deadline)
        self.connecting.set()
        self.release.wait()
        raise ConnectionError("released by the test")

    def close(self) -> None:
        self.release.set()


def test_card_part_is_refused_at_its_deadline_even_if_the_driver_hangs() -> None:
    backend = WedgedBackend()
    try:
        until = time.monotonic() + 0.5
        card = check_card_within(backend, [], until=until, apdu_timeout_s=2.0, site_key=b"k" * 32, allow_uid_only=False)
        # Decided while the backend is still stuck in connect: the helper's deadline ended the wait.
        assert backend.connecting.is_set() and not backend.release.is_set()
    finally:
        backend.close()
    assert card == CardCheck(present=True, timed_out=True, detail="card_timeout: the card check did not finish in time")
    # The driver got a deadline of its own, a little before the helper's, with the per-command bound.
    (given,) = backend.deadlines
    assert given is not None and given.apdu_s == 2.0 and given.at is not None and given.at < until
    decision = refuse_early(make_policy(), "valid", None, TERMINAL, "alice", WORKDAY, card)
    assert decision is not None and (decision.granted, decision.reason) == (False, "card_timeout")
    assert decision.person_id == "p-alice"


def test_default_card_deadline_is_at_most_five_seconds() -> None:
    settings = LoginAgentSettings()
    assert settings.card_timeout_s <= 5
    assert settings.card_apdu_timeout_s <= settings.card_timeout_s
