"""A simulated backend: in-process cards with a P-256 key, inserted and removed programmatically.

Same interface as the PC/SC backend, for the demo and the login logic's unit tests. The cards answer the
same APDUs the real backend sends (GET DATA UID, SELECT PIV, GET DATA 5FC101, GENERAL AUTHENTICATE), so
``drivers.smartcard.auth`` runs unchanged on top of it.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from sekisho.drivers.observers import ObserverList
from sekisho.drivers.smartcard.apdu import encode_tlv, parse_tlv, transmit_apdu
from sekisho.drivers.smartcard.errors import CardRemoved, CardTimeout, MalformedResponse, ReaderUnavailable
from sekisho.drivers.smartcard.protocol import (
    GET_UID_APDU,
    CardEvent,
    CardObserver,
    CardPresence,
    Deadline,
    ReaderEvent,
    ReaderObserver,
    mask_uid,
)

_PIV_AID = bytes.fromhex("A000000308000010000100")
_SW_OK = b"\x90\x00"


def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


@dataclass(eq=False)
class SimulatedCard:
    """An in-process card: a UID and, unless ``uid_only``, a PIV card-auth key and its certificate."""

    uid: bytes
    key: ec.EllipticCurvePrivateKey | None = None
    certificate: bytes | None = None
    uid_only: bool = False
    atr: bytes = bytes.fromhex("3B8080010101")
    _selected: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.uid_only:
            self.key, self.certificate = None, None
            return
        if self.key is None:
            self.key = ec.generate_private_key(ec.SECP256R1())
        if self.certificate is None:
            self.certificate = _self_signed(self.key, f"simulated card {mask_uid(self.uid)}")

    @classmethod
    def clone_of(cls, original: SimulatedCard) -> SimulatedCard:
        """Return a clone: same UID and certificate, but a key of its own (what a real cloner can make)."""
        return cls(uid=original.uid, key=ec.generate_private_key(ec.SECP256R1()), certificate=original.certificate)

    def public_key_pem(self) -> str:
        """Return the card-auth public key in PEM."""
        if self.key is None:
            raise ValueError("a UID-only card has no key")
        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def respond(self, apdu: bytes) -> bytes:
        """Answer one command APDU with a response APDU."""
        if apdu[:2] == b"\xff\xca":
            return self.uid + _SW_OK
        if self.uid_only:
            return b"\x6a\x82" if apdu[1] == 0xA4 else b"\x6d\x00"
        body = apdu[5 : 5 + apdu[4]] if len(apdu) > 5 else b""
        if apdu[1] == 0xA4:
            self._selected = body == _PIV_AID
            return _SW_OK if self._selected else b"\x6a\x82"
        if not self._selected:
            return b"\x69\x85"
        if apdu[1] == 0xCB:
            if body != encode_tlv(0x5C, bytes.fromhex("5FC101")) or self.certificate is None:
                return b"\x6a\x82"
            return encode_tlv(0x53, encode_tlv(0x70, self.certificate) + encode_tlv(0x71, b"\x00")) + _SW_OK
        if apdu[1] == 0x87 and self.key is not None:
            try:
                template = dict(parse_tlv(dict(parse_tlv(body)).get(0x7C, b"")))
            except MalformedResponse:
                return b"\x6a\x80"
            challenge = template.get(0x81)
            if challenge is None or len(challenge) != 32:
                return b"\x6a\x80"
            signature = self.key.sign(challenge, ec.ECDSA(Prehashed(hashes.SHA256())))
            return encode_tlv(0x7C, encode_tlv(0x82, signature)) + _SW_OK
        return b"\x6d\x00"


class SimulatedConnection:
    """A session with a simulated card; fails with CardRemoved once the card leaves the reader."""

    def __init__(self, backend: SimulatedBackend, reader: str, card: SimulatedCard) -> None:
        self.reader = reader
        self._backend = backend
        self._card: SimulatedCard | None = card

    def _raw(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise CardRemoved("transmit on a closed connection")
        if self._backend.card_in(self.reader) is not self._card:
            raise CardRemoved(f"card removed from {self.reader!r}")
        return self._card.respond(apdu)

    def transmit(self, apdu: bytes, *, name: str = "APDU") -> bytes:
        """Send a command APDU, return the response data; raise StatusWordError on anything but 9000."""
        return transmit_apdu(self._raw, apdu, name=name)

    def get_uid(self) -> bytes:
        """Return the card's UID (GET DATA ``FF CA 00 00 00``); never log it unmasked."""
        uid = self.transmit(GET_UID_APDU, name="GET DATA UID")
        if not uid:
            raise MalformedResponse("GET DATA UID returned no bytes")
        return uid

    def close(self) -> None:
        """End the session; idempotent."""
        self._card = None


class SimulatedBackend:
    """Readers with cards that tests and the demo insert and remove; observers are called synchronously."""

    def __init__(self, readers: tuple[str, ...] = ("Simulated Reader 0",)) -> None:
        self._readers = list(readers)
        self._slots: dict[str, SimulatedCard] = {}
        self._lock = threading.RLock()
        self._card_observers: ObserverList[CardEvent] = ObserverList("smart-card card")
        self._reader_observers: ObserverList[ReaderEvent] = ObserverList("smart-card reader")

    def readers(self) -> list[str]:
        """Return the names of the readers present now."""
        with self._lock:
            return list(self._readers)

    def card_in(self, reader: str) -> SimulatedCard | None:
        """Return the card in ``reader``, if any."""
        with self._lock:
            return self._slots.get(reader)

    def _presence(self, reader: str, card: SimulatedCard) -> CardPresence:
        return CardPresence(reader=reader, atr=card.atr.hex().upper(), uid_masked=mask_uid(card.uid))

    def insert(self, card: SimulatedCard, reader: str | None = None) -> None:
        """Put ``card`` into ``reader`` (the first reader by default), replacing any card there."""
        with self._lock:
            name = reader if reader is not None else self._readers[0]
            if name not in self._readers:
                raise ReaderUnavailable(f"no reader {name!r}")
            previous = self._slots.get(name)
            self._slots[name] = card
            removed = [self._presence(name, previous)] if previous is not None else []
            self._card_observers.deliver(CardEvent(added=[self._presence(name, card)], removed=removed))

    def remove(self, reader: str | None = None) -> None:
        """Take the card out of ``reader`` (the first reader by default); no-op when it is empty."""
        with self._lock:
            name = reader if reader is not None else self._readers[0]
            card = self._slots.pop(name, None)
            if card is not None:
                self._card_observers.deliver(CardEvent(removed=[self._presence(name, card)]))

    def add_reader(self, name: str) -> None:
        """Plug in a reader."""
        with self._lock:
            if name not in self._readers:
                self._readers.append(name)
                self._reader_observers.deliver(ReaderEvent(added=[name]))

    def remove_reader(self, name: str) -> None:
        """Unplug a reader; a card in it is reported removed first."""
        with self._lock:
            if name in self._readers:
                self.remove(name)
                self._readers.remove(name)
                self._reader_observers.deliver(ReaderEvent(removed=[name]))

    def subscribe(self, observer: CardObserver) -> Callable[[], None]:
        """Deliver card diffs to ``observer`` (the current cards first, as added); return an unsubscriber."""
        with self._lock:
            unsubscribe = self._card_observers.add(observer)
            if self._slots:
                current = [self._presence(name, card) for name, card in self._slots.items()]
                self._card_observers.deliver_to(observer, CardEvent(added=current))
        return unsubscribe

    def subscribe_readers(self, observer: ReaderObserver) -> Callable[[], None]:
        """Deliver reader diffs to ``observer`` (the current readers first, as added); return an unsubscriber."""
        with self._lock:
            unsubscribe = self._reader_observers.add(observer)
            if self._readers:
                self._reader_observers.deliver_to(observer, ReaderEvent(added=list(self._readers)))
        return unsubscribe

    def connect(self, reader: str, *, deadline: Deadline | None = None) -> SimulatedConnection:
        """Open a session with the card in ``reader``; raise CardRemoved if there is none.

        Simulated cards answer at once, so ``deadline`` only refuses a check whose time is already up.
        """
        if deadline is not None and deadline.remaining() <= 0:
            raise CardTimeout(f"no time left to connect to {reader!r}")
        with self._lock:
            if reader not in self._readers:
                raise ReaderUnavailable(f"no reader {reader!r}")
            card = self._slots.get(reader)
            if card is None:
                raise CardRemoved(f"no card in {reader!r}")
            return SimulatedConnection(self, reader, card)

    def close(self) -> None:
        """Nothing to release; present for interface parity."""
