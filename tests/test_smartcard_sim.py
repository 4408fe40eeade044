"""The simulated smart-card backend, APDU framing (61xx/6Cxx, status words, TLV) and fuzzing of the response parsers."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sekisho.drivers.smartcard import (
    CardError,
    CardEvent,
    CardRemoved,
    MalformedResponse,
    ReaderEvent,
    ReaderUnavailable,
    SimulatedBackend,
    SimulatedCard,
    StatusWordError,
    authenticate,
    enrol_card,
    hash_uid,
    identify_by_uid,
    mask_uid,
)
from sekisho.drivers.smartcard.apdu import encode_tlv, find_tlv, parse_tlv, split_response, transmit_apdu
from sekisho.drivers.smartcard.auth import general_authenticate, read_card_auth_certificate
from sekisho.drivers.smartcard.simulated import SimulatedConnection

SITE_KEY = b"simulated-site-key-0123456789"
READER = "Simulated Reader 0"


def scripted(*answers: bytes) -> tuple[Callable[[bytes], bytes], list[bytes]]:
    """A raw transmit function that returns ``answers`` in order and records the commands it got."""
    sent: list[bytes] = []
    queue = list(answers)

    def raw(apdu: bytes) -> bytes:
        sent.append(apdu)
        return queue.pop(0)

    return raw, sent


# -- APDU framing ----------------------------------------------------------------------------------


def test_61xx_is_followed_with_get_response() -> None:
    raw, sent = scripted(b"\x01\x02\x61\x03", b"\x03\x04\x05\x90\x00")
    assert transmit_apdu(raw, bytes.fromhex("00CB3FFF00")) == b"\x01\x02\x03\x04\x05"
    assert sent[1] == bytes.fromhex("00C0000003")


def test_6cxx_resends_with_the_cards_le_once() -> None:
    raw, sent = scripted(b"\x6c\x07", b"1234567\x90\x00")
    assert transmit_apdu(raw, bytes.fromhex("FFCA000002")) == b"1234567"
    assert sent[1] == bytes.fromhex("FFCA000007")
    raw, _ = scripted(b"\x6c\x07", b"\x6c\x07")
    with pytest.raises(StatusWordError) as err:
        transmit_apdu(raw, bytes.fromhex("FFCA000002"))
    assert err.value.sw == 0x6C07


def test_6cxx_on_a_case_4_command_replaces_le() -> None:
    raw, sent = scripted(b"\x6c\x10", b"\x90\x00")
    transmit_apdu(raw, bytes.fromhex("00CB3FFF025C0100"))
    assert sent[1] == bytes.fromhex("00CB3FFF025C0110")


def test_endless_chaining_is_malformed_not_a_hang() -> None:
    with pytest.raises(MalformedResponse, match="chaining"):
        transmit_apdu(lambda _apdu: b"\x61\x10", bytes.fromhex("00CB3FFF00"))


@pytest.mark.parametrize(
    ("sw", "words"),
    [
        (0x6A82, "not found"),
        (0x6982, "security status not satisfied"),
        (0x6A86, "P1-P2"),
        (0x6D00, "instruction code not supported"),
        (0x6E00, "class not supported"),
        (0x6700, "wrong length"),
        (0x63C2, "2 retries left"),
        (0x6983, "blocked"),
    ],
)
def test_status_words_are_translated(sw: int, words: str) -> None:
    raw, _ = scripted(sw.to_bytes(2, "big"))
    with pytest.raises(StatusWordError) as err:
        transmit_apdu(raw, bytes.fromhex("0020008000"), name="VERIFY")
    assert err.value.sw == sw and words in str(err.value) and "VERIFY" in str(err.value)
    assert isinstance(err.value, CardError)


def test_retries_and_blocked_are_readable() -> None:
    assert StatusWordError(0x63, 0xC2, "VERIFY").retries_left == 2
    assert StatusWordError(0x69, 0x83, "VERIFY").blocked
    assert StatusWordError(0x6A, 0x82, "SELECT").retries_left is None


def test_pcsc_code_is_shown_unsigned() -> None:
    assert "0x80100069" in str(CardRemoved("gone", pcsc_code=0x80100069))


@pytest.mark.parametrize("response", [b"", b"\x90"])
def test_response_without_status_word_is_malformed(response: bytes) -> None:
    with pytest.raises(MalformedResponse):
        split_response(response)


# Good and bad BER-TLV corpora, USBGuard style.
GOOD_TLV = [
    (b"", []),
    (b"\x53\x00", [(0x53, b"")]),
    (b"\x5f\xc1\x01\x01\xaa", [(0x5FC101, b"\xaa")]),
    (b"\x70\x81\x01\x01\x71\x01\x00", [(0x70, b"\x01"), (0x71, b"\x00")]),
    (b"\x00\x53\x82\x00\x01\xff", [(0x53, b"\xff")]),
]
BAD_TLV = [b"\x53", b"\x53\x05\x01", b"\x5f", b"\x5f\xc1", b"\x53\x81", b"\x53\x84\x00\x00\x00\x01\x00", b"\x53\x80"]


@pytest.mark.parametrize(("data", "items"), GOOD_TLV)
def test_tlv_good_corpus(data: bytes, items: list[tuple[int, bytes]]) -> None:
    assert parse_tlv(data) == items


@pytest.mark.parametrize("data", BAD_TLV)
def test_tlv_bad_corpus(data: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_tlv(data)


def test_tlv_round_trip_for_long_values() -> None:
    value = bytes(range(256)) * 3
    assert find_tlv(encode_tlv(0x53, value), 0x53) == value


# -- fuzzing ---------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_tlv_parser(data: bytes) -> None:
    with contextlib.suppress(MalformedResponse):
        parse_tlv(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=70))
def test_fuzz_transmit_framing(answers: list[bytes]) -> None:
    queue = list(answers)

    def raw(_apdu: bytes) -> bytes:
        return queue.pop(0) if queue else b"\x6f\x00"

    with contextlib.suppress(MalformedResponse, StatusWordError):
        transmit_apdu(raw, bytes.fromhex("00CB3FFF055C035FC10100"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_piv_response_parsers(body: bytes) -> None:
    class Garbage:
        reader = READER

        def transmit(self, apdu: bytes, *, name: str = "APDU") -> bytes:
            return transmit_apdu(lambda _apdu: body + b"\x90\x00", apdu, name=name)

        def get_uid(self) -> bytes:
            return self.transmit(bytes.fromhex("FFCA000000"))

        def close(self) -> None:
            return None

    for parse in (read_card_auth_certificate, lambda conn: general_authenticate(conn, bytes(32))):
        with contextlib.suppress(MalformedResponse):
            parse(Garbage())
    # Authentication over garbage is a refusal with a reason, never an exception.
    result = authenticate(Garbage(), [], site_key=SITE_KEY)
    assert not result.ok


# -- simulated backend -----------------------------------------------------------------------------


@pytest.fixture
def backend() -> SimulatedBackend:
    """A simulated terminal with one reader."""
    return SimulatedBackend()


def test_insert_and_remove_are_diffs_with_masked_uid(backend: SimulatedBackend) -> None:
    events: list[CardEvent] = []
    backend.subscribe(events.append)
    card = SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"))
    backend.insert(card)
    backend.remove()
    assert [len(e.added) for e in events] == [1, 0] and [len(e.removed) for e in events] == [0, 1]
    assert events[0].added[0].uid_masked == "****-E5F6" == mask_uid(card.uid)
    assert "04A1B2C3" not in repr(events)


def test_late_subscriber_sees_present_cards_and_readers(backend: SimulatedBackend) -> None:
    backend.insert(SimulatedCard(uid=b"\x01\x02\x03\x04"))
    cards: list[CardEvent] = []
    readers: list[ReaderEvent] = []
    backend.subscribe(cards.append)
    backend.subscribe_readers(readers.append)
    assert cards[0].added[0].reader == READER and readers[0].added == [READER]


def test_swapping_cards_reports_removed_and_added(backend: SimulatedBackend) -> None:
    events: list[CardEvent] = []
    backend.insert(SimulatedCard(uid=b"\x01\x02\x03\x04"))
    backend.subscribe(events.append)
    backend.insert(SimulatedCard(uid=b"\x05\x06\x07\x08"))
    assert events[-1].removed[0].uid_masked == "****-0304" and events[-1].added[0].uid_masked == "****-0708"


def test_unplugging_a_reader_removes_its_card(backend: SimulatedBackend) -> None:
    cards: list[CardEvent] = []
    readers: list[ReaderEvent] = []
    backend.add_reader("Door 2")
    backend.insert(SimulatedCard(uid=b"\x01\x02\x03\x04"), "Door 2")
    backend.subscribe(cards.append)
    backend.subscribe_readers(readers.append)
    backend.remove_reader("Door 2")
    assert cards[-1].removed[0].reader == "Door 2" and readers[-1].removed == ["Door 2"]
    with pytest.raises(ReaderUnavailable):
        backend.connect("Door 2")


def test_a_failing_observer_does_not_starve_others(backend: SimulatedBackend) -> None:
    seen: list[CardEvent] = []

    def broken(_event: CardEvent) -> None:
        raise RuntimeError("observer bug")

    backend.subscribe(broken)
    backend.subscribe(seen.append)
    backend.insert(SimulatedCard(uid=b"\x01\x02\x03\x04"))
    assert len(seen) == 1


def test_enrolled_card_authenticates_and_clone_fails(backend: SimulatedBackend) -> None:
    genuine = SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"))
    backend.insert(genuine)
    record = enrol_card(backend.connect(READER), card_id="card-1", site_key=SITE_KEY)
    assert record.public_key_pem == genuine.public_key_pem()
    enrolled = [record.as_enrolled()]
    assert authenticate(backend.connect(READER), enrolled, site_key=SITE_KEY).ok

    backend.insert(SimulatedCard.clone_of(genuine))
    result = authenticate(backend.connect(READER), enrolled, site_key=SITE_KEY)
    assert (result.ok, result.reason, result.card_id) == (False, "card_auth_failed", "card-1")

    backend.insert(SimulatedCard(uid=b"\x09\x09\x09\x09"))
    assert authenticate(backend.connect(READER), enrolled, site_key=SITE_KEY).reason == "unknown_card"


def test_challenge_comes_from_the_given_rng(backend: SimulatedBackend) -> None:
    genuine = SimulatedCard(uid=b"\x01\x02\x03\x04")
    backend.insert(genuine)
    enrolled = [enrol_card(backend.connect(READER), card_id="c", site_key=SITE_KEY).as_enrolled()]
    asked: list[int] = []

    def rng(n: int) -> bytes:
        asked.append(n)
        return b"\x42" * n

    assert authenticate(backend.connect(READER), enrolled, site_key=SITE_KEY, rng=rng).ok
    assert asked == [32]


def test_no_card_and_removed_mid_session(backend: SimulatedBackend) -> None:
    assert authenticate(None, [], site_key=SITE_KEY).reason == "no_card"
    with pytest.raises(CardRemoved):
        backend.connect(READER)
    backend.insert(SimulatedCard(uid=b"\x01\x02\x03\x04"))
    conn = backend.connect(READER)
    backend.remove()
    assert authenticate(conn, [], site_key=SITE_KEY).reason == "no_card"


def test_uid_only_card_is_weak(backend: SimulatedBackend) -> None:
    idm = bytes.fromhex("0114A1B2C3D4E5F6")
    backend.insert(SimulatedCard(uid=idm, uid_only=True))
    conn: SimulatedConnection = backend.connect(READER)
    identity = identify_by_uid(conn, SITE_KEY)
    assert identity.uid_hash == hash_uid(idm, SITE_KEY) and identity.weak
    record = enrol_card(conn, card_id="felica", site_key=SITE_KEY, kind="uid_only")
    allowed = authenticate(conn, [record.as_enrolled()], site_key=SITE_KEY, allow_uid_only=True)
    refused = authenticate(conn, [record.as_enrolled()], site_key=SITE_KEY)
    assert (allowed.ok, allowed.reason, allowed.weak) == (True, "uid_only_weak", True)
    assert (refused.ok, refused.reason) == (False, "uid_only_not_allowed")


def test_uid_hash_depends_on_the_site_key() -> None:
    uid = b"\x01\x02\x03\x04"
    assert hash_uid(uid, SITE_KEY) != hash_uid(uid, b"another-site-key-0123456789")
    with pytest.raises(ValueError, match="empty site key"):
        hash_uid(uid, b"")
    # The same plain HMAC the policy documents (and the demo traffic uses), so hashes interoperate.
    assert hash_uid(uid, b"k") == hmac.new(b"k", uid, hashlib.sha256).hexdigest()
    assert mask_uid(b"\x01\x02") == "****"
