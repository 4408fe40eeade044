"""The PC/SC backend against the real pcscd, with vpcd's virtual reader and a software card from tests/support.

pcscd has one system-wide socket, so this module starts its own pcscd for the session and refuses to share
one it did not start (it skips, saying why, rather than killing someone else's). Do not run it in parallel.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sekisho.firmware_stubs.piv_card import PIV_ATR, VirtualCard

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
from sekisho.lab.pcscd import VPCD_READER  # noqa: E402

pytest_plugins = ["pcsc_fixtures"]

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


def _added(event: CardEvent) -> bool:
    return any(card.reader == READER for card in event.added)


def _removed(event: CardEvent) -> bool:
    return any(card.reader == READER for card in event.removed)


class Inserted:
    """Insert a software card and wait until pcscd reports it; remove it and wait for the removal on exit."""

    def __init__(self, card: VirtualCard, recorder: Recorder) -> None:
        self.card = card
        self.recorder = recorder

    def __enter__(self) -> VirtualCard:
        since = len(self.recorder.events)
        self.card.insert()
        self.recorder.wait_for(_added, since=since)
        return self.card

    def __exit__(self, *exc: object) -> None:
        since = len(self.recorder.events)
        self.card.remove()
        self.recorder.wait_for(_removed, since=since)


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
    assert result.reason in {"no_card", "card_auth_failed"}, result
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


def test_removal_detection_latency(backend: PcscBackend, recorder: Recorder) -> None:
    latencies = []
    for i in range(20):
        card = VirtualCard(uid=bytes([0x04, i, 0xAA, 0x55]))
        since = len(recorder.events)
        card.insert()
        recorder.wait_for(_added, since=since)
        # Remove at varied phases of pcscd's polling, as a person would.
        time.sleep(0.03 * (i % 7))
        since = len(recorder.events)
        started = time.monotonic()
        card.remove()
        latencies.append((recorder.wait_for(_removed, since=since) - started) * 1000)
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(
        f"\nPC/SC removal detection over {len(latencies)} removals: p50 {statistics.median(latencies):.0f} ms, "
        f"p95 {p95:.0f} ms, max {latencies[-1]:.0f} ms"
    )
