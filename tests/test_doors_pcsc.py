"""A PC/SC reader serving a door, through the real pcscd with vpcd and the software PIV card.

The door adapter uses the login guard's driver path: a card enrolled with a key must prove it by
challenge–response (a clone with the right UID and the wrong key is refused as card_auth_failed, all the way
through the door decision), a card enrolled without a key is recognised by its UID hash and flagged weak.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sekisho.agents.doors.attach import PcscDoorReaders
from sekisho.agents.doors.checks import CardEvidence, check_card
from sekisho.drivers.smartcard import CardError, hash_uid
from sekisho.drivers.smartcard.protocol import CardEvent
from sekisho.firmware_stubs.piv_card import VirtualCard
from sekisho.lab.pcscd import VPCD_READER
from sekisho.protocol.policy import Card, Door, DoorReader, Person, Site, SitePolicy

pytest_plugins = ["pcsc_fixtures"]

SITE_KEY = b"pcsc-door-site-key-0123456789abc"
PIV_UID = bytes.fromhex("04D0012345AB01")
FELICA_UID = bytes.fromhex("0102030405060708")
KEY = ec.generate_private_key(ec.SECP256R1())


def _public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw.decode()


POLICY = SitePolicy(
    site=Site(name="pcsc doors"),
    people=[Person(id="p-piv", name="PIV holder"), Person(id="p-felica", name="FeliCa holder")],
    cards=[
        Card(
            id="c-piv",
            person="p-piv",
            kind="piv",
            uid_hash=hash_uid(PIV_UID, SITE_KEY),
            public_key_pem=_public_pem(KEY),
        ),
        Card(id="c-felica", person="p-felica", kind="felica", uid_hash=hash_uid(FELICA_UID, SITE_KEY)),
    ],
    doors=[
        Door(
            id="locker-1",
            name="locker",
            kind="locker",
            agent="door-pcsc",
            allowed=["p-piv", "p-felica"],
            readers=[DoorReader(id="rdr-pcsc")],
        )
    ],
)


class Taps:
    """What the adapter reported, one evidence per card placed."""

    def __init__(self, backend: Any = None) -> None:
        self.backend = backend
        self.seen: list[tuple[str, CardEvidence]] = []
        self.event = threading.Event()

    def __call__(self, reader_id: str, evidence: CardEvidence) -> None:
        self.seen.append((reader_id, evidence))
        self.event.set()

    def _wait_reader_empty(self) -> None:
        # pcscd notices a removal on its next presence check (~400 ms with vpcd): a card put down before
        # then would never be seen as a new card.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.backend.connect(VPCD_READER).close()
            except CardError:
                return
            time.sleep(0.05)
        raise AssertionError("the reader still reports a card")

    def place(self, card: VirtualCard) -> CardEvidence:
        self._wait_reader_empty()
        self.event.clear()
        with card:
            assert self.event.wait(5), "no tap for the card placed on the reader"
        self._wait_reader_empty()
        return self.seen[-1][1]


@pytest.fixture
def taps(pcscd: object) -> Iterator[Taps]:
    """Door reader "rdr-pcsc" on the vpcd reader."""
    from sekisho.drivers.smartcard.pcsc import PcscBackend

    with PcscBackend() as backend:
        collected = Taps(backend)
        assert backend.wait_until_monitoring(5)
        readers = PcscDoorReaders(
            backend, {VPCD_READER: "rdr-pcsc"}, site_key=SITE_KEY, cards=lambda: list(POLICY.cards)
        )
        readers.start(collected)
        try:
            yield collected
        finally:
            readers.stop()


def _verdict(evidence: CardEvidence) -> str | None:
    return check_card(POLICY, "valid", "rdr-pcsc", evidence, datetime(2026, 11, 24, 10, tzinfo=UTC)).reason


def test_enrolled_piv_card_proves_its_key(taps: Taps) -> None:
    evidence = taps.place(VirtualCard(uid=PIV_UID, key=KEY))
    assert (evidence.card_id, evidence.weak, evidence.auth_failed) == ("c-piv", False, False)
    assert evidence.card_masked == "****-AB01" and PIV_UID.hex() not in evidence.card_hash
    assert _verdict(evidence) is None  # granted
    assert taps.seen[-1][0] == "rdr-pcsc"


def test_cloned_uid_with_the_wrong_key_is_refused(taps: Taps) -> None:
    evidence = taps.place(VirtualCard(uid=PIV_UID, key=KEY, mode="wrong_key"))
    assert evidence.auth_failed and evidence.card_id == "c-piv"
    assert _verdict(evidence) == "card_auth_failed"


def test_uid_only_card_is_recognised_and_weak(taps: Taps) -> None:
    evidence = taps.place(VirtualCard(uid=FELICA_UID, mode="felica_uid_only"))
    assert (evidence.card_id, evidence.weak, evidence.auth_failed) == ("c-felica", True, False)
    assert _verdict(evidence) is None


def test_stranger_is_unknown(taps: Taps) -> None:
    evidence = taps.place(VirtualCard(uid=bytes.fromhex("04FFEEDDCCBBAA")))
    assert evidence.card_id is None and evidence.weak
    assert _verdict(evidence) == "unknown_card"


def test_unmapped_reader_is_ignored(pcscd: object) -> None:
    from sekisho.drivers.smartcard.pcsc import PcscBackend

    seen = Taps()
    arrived = threading.Event()

    def watch(event: CardEvent) -> None:
        if any(card.reader == VPCD_READER for card in event.added):
            arrived.set()

    with PcscBackend() as backend:
        assert backend.wait_until_monitoring(5)
        readers = PcscDoorReaders(backend, {"Some Other Reader 00 00": "rdr-x"}, site_key=SITE_KEY, cards=list)
        readers.start(seen)
        # Subscribed after the door readers: the backend calls its observers in order within one delivery,
        # so once this one has seen the card, the door readers have handled (and ignored) it.
        unsubscribe = backend.subscribe(watch)
        try:
            with VirtualCard(uid=PIV_UID):
                assert arrived.wait(10), "pcscd never reported the card"
                assert seen.seen == [] and not seen.event.is_set()
        finally:
            unsubscribe()
            readers.stop()
