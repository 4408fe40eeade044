"""A PC/SC reader serving a door, through the real pcscd with vpcd and the software PIV card.

The door adapter uses the login guard's driver path: a card enrolled with a key must prove it by
challenge–response (a clone with the right UID and the wrong key is refused as card_auth_failed, all the way
through the door decision), a card enrolled without a key is recognised by its UID hash and flagged weak.
A card that stops answering is refused as card_timeout, holds up no other reader of the door box (vpcd's two
slots are two readers for pcscd), and leaves its reader serving the next card once it has gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sekisho.agents.doors.attach import AttachedDoors, PcscDoorReaders
from sekisho.agents.doors.checks import CardEvidence, check_card
from sekisho.agents.doors.service import DoorAgentCore
from sekisho.drivers.locker import SimulatedLockerBoard
from sekisho.drivers.smartcard import CardError, hash_uid
from sekisho.drivers.smartcard.protocol import CardEvent
from sekisho.firmware_stubs.piv_card import INS_GENERAL_AUTHENTICATE, INS_SELECT, Fault, VirtualCard
from sekisho.lab.pcscd import VPCD_PORT_2, VPCD_READER, VPCD_READER_2
from sekisho.protocol.policy import Card, Door, DoorReader, Person, Site, SitePolicy

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
            backend,
            {VPCD_READER: "rdr-pcsc"},
            site_key=SITE_KEY,
            cards=lambda: list(POLICY.cards),
            card_timeout_s=2.0,
            apdu_timeout_s=1.5,
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


# --- cards that stop answering ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "ins"),
    [("stall", INS_GENERAL_AUTHENTICATE), ("stall", None), ("empty", INS_SELECT)],
    ids=["stalls mid challenge-response", "never answers", "answers with an empty frame"],
)
def test_card_that_stops_answering_is_refused_card_timeout(taps: Taps, fault: Fault, ins: int | None) -> None:
    silent = VirtualCard(uid=PIV_UID, key=KEY, fault=fault, fault_ins=ins)
    evidence = taps.place(silent)
    assert evidence.timed_out and silent.stalled.is_set()
    assert _verdict(evidence) == "card_timeout"
    # The silent card has gone: the reader serves the next card as before.
    follow = taps.place(VirtualCard(uid=PIV_UID, key=KEY))
    assert (follow.card_id, follow.timed_out) == ("c-piv", False)
    assert _verdict(follow) is None


def test_clone_with_a_copied_certificate_that_will_not_sign_is_card_auth_failed(taps: Taps) -> None:
    genuine = VirtualCard(uid=PIV_UID, key=KEY)
    # Another UID (so only the copied certificate names the enrolled card), and a refusal to sign.
    clone = VirtualCard(uid=bytes.fromhex("08ABCDEF"), certificate=genuine.certificate, mode="refuses_to_sign")
    evidence = taps.place(clone)
    assert (evidence.card_id, evidence.auth_failed) == ("c-piv", True)
    assert _verdict(evidence) == "card_auth_failed"


def test_card_pulled_mid_challenge_is_no_tap(taps: Taps) -> None:
    card = VirtualCard(uid=PIV_UID, key=KEY, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE)
    taps.event.clear()
    card.insert()
    try:
        assert card.stalled.wait(10), "the door reader never challenged the card"
    finally:
        card.remove()
    # Pulled before its check was over: no tap at all. Proven by the next card's tap being the first one.
    evidence = taps.place(VirtualCard(uid=PIV_UID, key=KEY))
    assert [e for _, e in taps.seen] == [evidence] and evidence.card_id == "c-piv"


BOX_POLICY = SitePolicy(
    site=Site(name="pcsc door box"),
    people=[Person(id="p-piv", name="PIV holder")],
    cards=[
        Card(
            id="c-piv",
            person="p-piv",
            kind="piv",
            uid_hash=hash_uid(PIV_UID, SITE_KEY),
            public_key_pem=_public_pem(KEY),
        )
    ],
    doors=[
        Door(
            id="room-1",
            name="records room",
            kind="room",
            agent="door-pcsc",
            allowed=["p-piv"],
            readers=[DoorReader(id="rdr-in"), DoorReader(id="rdr-side")],
            relay=1,
        )
    ],
)


class Outbox:
    """The door box's events in order, waited for by predicate."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = threading.Condition()

    def emit(self, type_: str, payload: dict[str, Any]) -> int:
        with self._changed:
            self.events.append((type_, payload))
            self._changed.notify_all()
            return len(self.events)

    def decisions(self, reader: str) -> list[tuple[str, dict[str, Any]]]:
        with self._changed:
            return [(t, p) for t, p in self.events if t.startswith("door.access_") and p.get("reader") == reader]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, timeout), f"not recorded; events so far: {self.events}"


@pytest.fixture
def door_box(pcscd: object, tmp_path: Path) -> Iterator[Outbox]:
    """A door box: one room door with two PC/SC readers (vpcd's two slots) and a lock board, events recorded."""
    from sekisho.drivers.smartcard.pcsc import PcscBackend

    outbox = Outbox()
    holder: dict[str, AttachedDoors] = {}
    with PcscBackend() as backend:
        assert backend.wait_until_monitoring(5)
        core = DoorAgentCore(
            policy=lambda: (BOX_POLICY, "valid", None),
            emit=outbox.emit,
            set_relay=lambda index, on, max_on_ms: holder["doors"].set_relay(index, on, max_on_ms),
            feedback=lambda reader_id, ok: None,
            state_dir=tmp_path,
        )
        pcsc = PcscDoorReaders(
            backend,
            {VPCD_READER: "rdr-in", VPCD_READER_2: "rdr-side"},
            site_key=SITE_KEY,
            cards=lambda: list(BOX_POLICY.cards),
            card_timeout_s=6.0,  # long enough that the other reader is certainly decided first
            apdu_timeout_s=6.0,
        )
        doors = AttachedDoors(core, [], SimulatedLockerBoard(relays=2, doors=0), SITE_KEY, pcsc)
        holder["doors"] = doors
        doors.start()
        try:
            yield outbox
        finally:
            doors.stop()


def test_a_stalling_card_does_not_delay_another_reader_of_the_box(door_box: Outbox) -> None:
    stalling = VirtualCard(uid=PIV_UID, key=KEY, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE)
    enrolled = VirtualCard(uid=PIV_UID, key=KEY, port=VPCD_PORT_2)
    with stalling:
        assert stalling.stalled.wait(10), "the door box never challenged the stalling card"
        with enrolled:
            door_box.wait_for(lambda: bool(door_box.decisions("rdr-side")))
            # Granted at the other reader while this reader's card is still being waited for.
            assert [t for t, _ in door_box.decisions("rdr-side")] == ["door.access_granted"]
            assert door_box.decisions("rdr-in") == [] and not stalling.stall_answered.is_set()
            door_box.wait_for(lambda: bool(door_box.decisions("rdr-in")))
    ((decision, payload),) = door_box.decisions("rdr-in")
    assert (decision, payload["reason"], payload["door"]) == ("door.access_denied", "card_timeout", "room-1")
    # Every decision follows its own card.presented, and the stalled card was recorded too.
    presented = [p["reader"] for t, p in door_box.events if t == "card.presented"]
    assert presented == ["rdr-side", "rdr-in"]
