"""The PC/SC backend against the real pcscd, with vpcd's virtual reader and a software card from tests/support.

pcscd has one system-wide socket, so this module starts its own pcscd for the session and refuses to share
one it did not start (it skips, saying why, rather than killing someone else's). Do not run it in parallel.
"""

from __future__ import annotations

import importlib.util
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sekisho.firmware_stubs.piv_card import INS_GENERAL_AUTHENTICATE, INS_SELECT, PIV_ATR, Fault, VirtualCard

# Only drivers/ imports pyscard; the test just needs to know whether the driver can load it.
if importlib.util.find_spec("smartcard") is None:
    _REASON = "PC/SC tier skipped: pyscard is not installed (pip install -e '.[agent]')"
    print(_REASON)
    pytest.skip(_REASON, allow_module_level=True)

# PC/SC's documented SCARD_E_NO_SMARTCARD, written out so the test does not import pyscard.
SCARD_E_NO_SMARTCARD = 0x8010000C

from sekisho.drivers.smartcard import (  # noqa: E402 - only after the pyscard check above
    CardEvent,
    CardRemoved,
    CardTimeout,
    Deadline,
    EnrolledCard,
    MalformedResponse,
    ReaderEvent,
    StatusWordError,
    authenticate,
    enrol_card,
    hash_uid,
    identify_by_uid,
)
from sekisho.drivers.smartcard.auth import select_piv  # noqa: E402
from sekisho.drivers.smartcard.pcsc import PcscBackend  # noqa: E402
from sekisho.lab.pcscd import VPCD_PORT_2, VPCD_READER, VPCD_READER_2  # noqa: E402

READER = VPCD_READER
SITE_KEY = b"site-key-for-tests-0123456789abcdef"
GENUINE_UID = bytes.fromhex("04A1B2C3D4E5F6")


class Recorder:
    """Collects diffs from an observer callback and waits, bounded, for one matching a predicate."""

    def __init__(self) -> None:
        self.events: list[tuple[float, CardEvent]] = []
        self._changed = threading.Condition()

    def __call__(self, event: CardEvent) -> None:
        with self._changed:
            self.events.append((time.monotonic(), event))
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[CardEvent], bool], *, since: int = 0, timeout: float = 5.0) -> float:
        """Return the arrival time of the first event after index ``since`` matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for arrived, event in self.events[since:]:
                    if predicate(event):
                        return arrived
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching card event within {timeout} s; saw {self.events[since:]}")
                self._changed.wait(remaining)


@pytest.fixture
def backend(pcscd: subprocess.Popen[bytes]) -> Iterator[PcscBackend]:
    """A PC/SC backend whose monitor has seen pcscd once."""
    with PcscBackend() as running:
        assert running.wait_until_monitoring(5)
        yield running


@pytest.fixture
def recorder(backend: PcscBackend) -> Iterator[Recorder]:
    """An observer subscribed to the backend's card diffs."""
    rec = Recorder()
    unsubscribe = backend.subscribe(rec)
    yield rec
    unsubscribe()


def _added(event: CardEvent, reader: str = READER) -> bool:
    return any(card.reader == reader for card in event.added)


def _removed(event: CardEvent, reader: str = READER) -> bool:
    return any(card.reader == reader for card in event.removed)


class Inserted:
    """Insert a software card and wait until pcscd reports it; remove it and wait for the removal on exit."""

    def __init__(self, card: VirtualCard, recorder: Recorder, reader: str = READER) -> None:
        self.card = card
        self.recorder = recorder
        self.reader = reader

    def __enter__(self) -> VirtualCard:
        since = len(self.recorder.events)
        self.card.insert()
        self.recorder.wait_for(lambda event: _added(event, self.reader), since=since)
        return self.card

    def __exit__(self, *exc: object) -> None:
        since = len(self.recorder.events)
        self.card.remove()
        self.recorder.wait_for(lambda event: _removed(event, self.reader), since=since)


@pytest.fixture(scope="module")
def genuine_key() -> ec.EllipticCurvePrivateKey:
    """The enrolled card's private key."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def genuine(genuine_key: ec.EllipticCurvePrivateKey) -> VirtualCard:
    """The site's genuine PIV card."""
    return VirtualCard(uid=GENUINE_UID, key=genuine_key)


def _enrol(backend: PcscBackend, recorder: Recorder, card: VirtualCard, card_id: str = "card-1") -> EnrolledCard:
    with Inserted(card, recorder), backend.connect(READER) as conn:
        return enrol_card(conn, card_id=card_id, site_key=SITE_KEY).as_enrolled()


def test_virtual_reader_is_listed(backend: PcscBackend) -> None:
    assert READER in backend.readers()
    seen: list[ReaderEvent] = []
    unsubscribe = backend.subscribe_readers(seen.append)
    unsubscribe()
    assert seen and READER in seen[0].added


def test_insertion_and_removal_arrive_as_diffs(backend: PcscBackend, recorder: Recorder, genuine: VirtualCard) -> None:
    since = len(recorder.events)
    genuine.insert()
    try:
        recorder.wait_for(_added, since=since)
        added = next(event for _, event in recorder.events[since:] if _added(event)).added[0]
        assert added.atr == PIV_ATR.hex().upper()
        # A late subscriber is told about the card already present.
        late: list[CardEvent] = []
        backend.subscribe(late.append)()
        assert late and late[0].added[0].reader == READER
    finally:
        since = len(recorder.events)
        genuine.remove()
    recorder.wait_for(_removed, since=since)


def test_enrolment_record_keeps_no_raw_uid(backend: PcscBackend, recorder: Recorder, genuine: VirtualCard) -> None:
    with Inserted(genuine, recorder), backend.connect(READER) as conn:
        record = enrol_card(conn, card_id="card-1", site_key=SITE_KEY)
    assert record.uid_hash == hash_uid(GENUINE_UID, SITE_KEY)
    assert record.uid_masked == "****-E5F6"
    assert GENUINE_UID.hex() not in repr(record).lower()
    assert record.public_key_pem is not None and "BEGIN PUBLIC KEY" in record.public_key_pem
    assert record.fingerprint is not None and len(record.fingerprint) == 64


def test_enrolled_card_authenticates(backend: PcscBackend, recorder: Recorder, genuine: VirtualCard) -> None:
    enrolled = _enrol(backend, recorder, genuine)
    with Inserted(genuine, recorder), backend.connect(READER) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    assert (result.ok, result.reason, result.card_id, result.weak) == (True, "ok", "card-1", False)
    # The challenge–response really went over the wire: SELECT then GENERAL AUTHENTICATE.
    assert [apdu[1] for apdu in genuine.commands if apdu[1] in (0xA4, 0x87)][-2:] == [0xA4, 0x87]


def test_unknown_card_is_refused(backend: PcscBackend, recorder: Recorder, genuine: VirtualCard) -> None:
    enrolled = _enrol(backend, recorder, genuine)
    stranger = VirtualCard(uid=bytes.fromhex("04000000000099"))
    with Inserted(stranger, recorder), backend.connect(READER) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    assert (result.ok, result.reason) == (False, "unknown_card")


def test_cloned_uid_with_wrong_key_fails(backend: PcscBackend, recorder: Recorder, genuine: VirtualCard) -> None:
    enrolled = _enrol(backend, recorder, genuine)
    clone = VirtualCard(uid=GENUINE_UID, certificate=genuine.certificate, mode="wrong_key")
    with Inserted(clone, recorder), backend.connect(READER) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    assert (result.ok, result.reason, result.card_id) == (False, "card_auth_failed", "card-1")
    assert GENUINE_UID.hex() not in result.detail.lower()


def test_copied_certificate_without_uid_match_fails(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard
) -> None:
    # Contact PIV cards have no stable UID, so the certificate identifies them; copying it must not be enough.
    enrolled = _enrol(backend, recorder, genuine)
    clone = VirtualCard(uid=bytes.fromhex("08123456"), certificate=genuine.certificate, mode="wrong_key")
    with Inserted(clone, recorder), backend.connect(READER) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    assert (result.ok, result.reason, result.card_id) == (False, "card_auth_failed", "card-1")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("one_byte", {"malformed_response"}),
        ("bad_signature_tlv", {"malformed_response"}),
        ("endless_61", {"malformed_response"}),
        ("garbage", {"malformed_response", "card_auth_failed"}),
    ],
)
def test_malformed_card_fails_clearly(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard, kind: str, expected: set[str]
) -> None:
    enrolled = _enrol(backend, recorder, genuine)
    broken = VirtualCard(uid=GENUINE_UID, key=genuine.key, mode="malformed", malformed=kind)  # type: ignore[arg-type]
    with Inserted(broken, recorder), backend.connect(READER) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    assert not result.ok
    assert result.reason in expected, result


def test_mute_card_pulled_mid_exchange_ends_the_wait(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard
) -> None:
    # pcscd waits for a silent card as long as the reader does; pulling the card must end that wait cleanly.
    enrolled = _enrol(backend, recorder, genuine)
    mute = VirtualCard(uid=GENUINE_UID, key=genuine.key, mode="malformed", malformed="mute")
    since = len(recorder.events)
    mute.insert()
    recorder.wait_for(_added, since=since)
    threading.Timer(0.5, mute.remove).start()
    with backend.connect(READER) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    assert not result.ok
    assert result.reason == "no_card", result
    recorder.wait_for(_removed, since=since)


def test_malformed_certificate_raises_malformed_response(backend: PcscBackend, recorder: Recorder) -> None:
    broken = VirtualCard(uid=bytes.fromhex("04BADBAD"), mode="malformed", malformed="bad_tlv")
    with Inserted(broken, recorder), backend.connect(READER) as conn:
        with pytest.raises(MalformedResponse, match="53"):
            enrol_card(conn, card_id="broken", site_key=SITE_KEY)
        result = authenticate(conn, [], site_key=SITE_KEY)
    assert result.reason == "malformed_response"


def test_one_byte_answer_is_malformed_response(backend: PcscBackend, recorder: Recorder) -> None:
    broken = VirtualCard(uid=bytes.fromhex("04BADBAD"), mode="malformed", malformed="one_byte")
    with Inserted(broken, recorder), backend.connect(READER) as conn, pytest.raises(MalformedResponse):
        select_piv(conn)


def test_uid_only_card_gives_keyed_hash_flagged_weak(backend: PcscBackend, recorder: Recorder) -> None:
    idm = bytes.fromhex("0114A1B2C3D4E5F6")
    felica = VirtualCard(uid=idm, mode="felica_uid_only")
    with Inserted(felica, recorder), backend.connect(READER) as conn:
        identity = identify_by_uid(conn, SITE_KEY)
        record = enrol_card(conn, card_id="felica-1", site_key=SITE_KEY, kind="uid_only")
        allowed = authenticate(conn, [record.as_enrolled()], site_key=SITE_KEY, allow_uid_only=True)
        refused = authenticate(conn, [record.as_enrolled()], site_key=SITE_KEY)
        as_piv = authenticate(conn, [EnrolledCard(card_id="x", uid_hash=None, public_key_pem=None)], site_key=SITE_KEY)
    assert identity.uid_hash == hash_uid(idm, SITE_KEY) and identity.weak is True
    assert identity.uid_masked == "****-E5F6"
    assert record.public_key_pem is None and record.uid_hash == identity.uid_hash
    assert (allowed.ok, allowed.reason, allowed.weak, allowed.card_id) == (True, "uid_only_weak", True, "felica-1")
    assert (refused.ok, refused.reason, refused.weak) == (False, "uid_only_not_allowed", True)
    assert (as_piv.ok, as_piv.reason) == (False, "unknown_card")


def test_status_words_are_translated_keeping_the_code(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard
) -> None:
    with Inserted(genuine, recorder), backend.connect(READER) as conn:
        select_piv(conn)
        with pytest.raises(StatusWordError) as missing:
            conn.transmit(bytes.fromhex("00CB3FFF055C035FC10500"), name="GET DATA 5FC105")
        with pytest.raises(StatusWordError) as unsupported:
            conn.transmit(bytes.fromhex("00E2000000"), name="APPEND RECORD")
    assert (missing.value.sw, missing.value.sw1, missing.value.sw2) == (0x6A82, 0x6A, 0x82)
    text = str(missing.value)
    assert "6A82" in text and "not found" in text and "GET DATA 5FC105" in text
    assert unsupported.value.sw == 0x6D00 and "instruction" in str(unsupported.value)


def test_response_chaining_and_wrong_le_over_pcscd(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard
) -> None:
    with Inserted(genuine, recorder), backend.connect(READER) as conn:
        # 6Cxx: the card says the right Le and the driver asks again.
        assert conn.transmit(bytes.fromhex("FFCA000002"), name="GET DATA UID") == GENUINE_UID
        select_piv(conn)
        conn.transmit(bytes.fromhex("00CB3FFF055C035FC10100"), name="GET DATA 5FC101")
    # 61xx: the certificate object is longer than the card's chunk, so GET RESPONSE was needed.
    assert any(apdu[1] == 0xC0 for apdu in genuine.commands)


def test_removed_card_raises_card_removed_with_pcsc_code(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard
) -> None:
    with Inserted(genuine, recorder):
        conn = backend.connect(READER)
    try:
        with pytest.raises(CardRemoved) as removed:
            conn.get_uid()
        assert removed.value.pcsc_code is not None
        assert authenticate(conn, [], site_key=SITE_KEY).reason == "no_card"
    finally:
        conn.close()
    with pytest.raises(CardRemoved) as empty:
        backend.connect(READER)
    assert empty.value.pcsc_code == SCARD_E_NO_SMARTCARD


# --- time-outs: a card that stops answering ends the check, within the deadline, as card_timeout ----------

STALLS: list[tuple[str, Fault, int | None]] = [
    ("stalls mid challenge-response", "stall", INS_GENERAL_AUTHENTICATE),
    ("never answers", "stall", None),
    ("answers with an empty frame", "empty", INS_SELECT),
]


@pytest.mark.parametrize(("fault", "ins"), [(f, i) for _, f, i in STALLS], ids=[name for name, _, _ in STALLS])
@pytest.mark.parametrize(
    "deadline",
    [lambda: Deadline(apdu_s=0.5), lambda: Deadline.within(1.0, apdu_s=30)],
    ids=["per command", "whole check"],
)
def test_card_that_stops_answering_times_out(
    backend: PcscBackend,
    recorder: Recorder,
    genuine: VirtualCard,
    fault: Fault,
    ins: int | None,
    deadline: Callable[[], Deadline],
) -> None:
    enrolled = _enrol(backend, recorder, genuine)
    # The enrolled card itself (right UID, right key), failing the same way.
    silent = VirtualCard(uid=GENUINE_UID, key=genuine.key, fault=fault, fault_ins=ins)
    with Inserted(silent, recorder):
        conn = backend.connect(READER, deadline=deadline())
        try:
            result = authenticate(conn, [enrolled], site_key=SITE_KEY)
            # Decided while the card still owes its answer: the deadline ended the wait, not the card.
            assert silent.stalled.is_set() and not silent.stall_answered.is_set()
            assert (result.ok, result.reason) == (False, "card_timeout"), result
            if ins == INS_GENERAL_AUTHENTICATE:
                assert result.card_id == "card-1"  # identified before it fell silent
            # The session is over: nothing more is sent to the card, and closing does not wait for it.
            with pytest.raises(CardTimeout):
                conn.transmit(bytes.fromhex("FFCA000000"))
        finally:
            conn.close()
        # pcscd is still waiting for that card, so a new session on the reader is refused in time as well.
        with pytest.raises(CardTimeout):
            backend.connect(READER, deadline=Deadline.within(0.5, apdu_s=0.5))
    # Once the silent card has left, the reader serves the next one.
    with Inserted(genuine, recorder), backend.connect(READER, deadline=Deadline.within(5.0)) as conn:
        assert authenticate(conn, [enrolled], site_key=SITE_KEY).reason == "ok"


def test_enrolled_card_that_answers_too_late_is_refused(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard
) -> None:
    # It would sign correctly, only after the deadline: a stalled login must not be granted late.
    enrolled = _enrol(backend, recorder, genuine)
    slow = VirtualCard(uid=GENUINE_UID, key=genuine.key, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE, stall_s=60)
    with Inserted(slow, recorder), backend.connect(READER, deadline=Deadline.within(1.0)) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
        assert not slow.stall_answered.is_set()
    assert (result.ok, result.reason, result.card_id) == (False, "card_timeout", "card-1")


def test_card_pulled_mid_challenge_is_no_card(backend: PcscBackend, recorder: Recorder, genuine: VirtualCard) -> None:
    enrolled = _enrol(backend, recorder, genuine)
    card = VirtualCard(uid=GENUINE_UID, key=genuine.key, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE)
    since = len(recorder.events)
    card.insert()
    recorder.wait_for(_added, since=since)

    def pull_when_challenged() -> None:
        if card.stalled.wait(30):
            card.remove()

    puller = threading.Thread(target=pull_when_challenged, daemon=True)
    puller.start()
    try:
        with backend.connect(READER, deadline=Deadline.within(30)) as conn:
            result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    finally:
        puller.join(30)
        card.remove()
    assert card.stalled.is_set()
    assert (result.ok, result.reason) == (False, "no_card"), result
    recorder.wait_for(_removed, since=since)


@pytest.mark.parametrize("same_uid", [True, False], ids=["cloned UID", "certificate only"])
def test_clone_that_refuses_to_sign_fails_authentication(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard, same_uid: bool
) -> None:
    # The copied (public) certificate identifies the enrolled card; refusing to sign is failing to prove it.
    enrolled = _enrol(backend, recorder, genuine)
    uid = GENUINE_UID if same_uid else bytes.fromhex("08C0FFEE")
    clone = VirtualCard(uid=uid, certificate=genuine.certificate, mode="refuses_to_sign")
    with Inserted(clone, recorder), backend.connect(READER) as conn:
        result = authenticate(conn, [enrolled], site_key=SITE_KEY)
    assert (result.ok, result.reason, result.card_id) == (False, "card_auth_failed", "card-1")
    assert "6982" in result.detail


def test_a_stalled_reader_does_not_hold_up_the_other(
    backend: PcscBackend, recorder: Recorder, genuine: VirtualCard
) -> None:
    enrolled = _enrol(backend, recorder, genuine)
    stuck = VirtualCard(uid=GENUINE_UID, key=genuine.key, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE)
    other = VirtualCard(uid=GENUINE_UID, key=genuine.key, port=VPCD_PORT_2)
    stuck_result: list[str] = []

    def check_stuck() -> None:
        with backend.connect(READER, deadline=Deadline.within(30, apdu_s=30)) as conn:
            stuck_result.append(authenticate(conn, [enrolled], site_key=SITE_KEY).reason)

    with Inserted(stuck, recorder):
        checker = threading.Thread(target=check_stuck, daemon=True)
        checker.start()
        assert stuck.stalled.wait(10)
        with Inserted(other, recorder, VPCD_READER_2), backend.connect(VPCD_READER_2) as conn:
            assert authenticate(conn, [enrolled], site_key=SITE_KEY).reason == "ok"
        # The other reader's card was checked while this one's check was still waiting for its card.
        assert checker.is_alive() and not stuck_result
    checker.join(10)
    assert stuck_result == ["no_card"]
