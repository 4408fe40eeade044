"""Card authentication: PIV-style challenge–response against the enrolled key, and flagged-weak UID identification.

Identification and authentication are separate on purpose. The UID (keyed-hashed with the site key) or the
certificate's fingerprint only says which enrolment to check; the card then has to sign a fresh random
challenge with the private key behind the *enrolled* public key. A clone that copies the UID and the
(public) certificate still fails, because it cannot produce that signature.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from sekisho.drivers.smartcard.apdu import encode_tlv, find_tlv, parse_tlv
from sekisho.drivers.smartcard.errors import (
    CardError,
    CardRemoved,
    CardTimeout,
    MalformedResponse,
    ReaderUnavailable,
    StatusWordError,
)
from sekisho.drivers.smartcard.protocol import CardConnection, mask_uid

PIV_AID = bytes.fromhex("A000000308000010000100")
CARD_AUTH_CERT_OBJECT = bytes.fromhex("5FC101")
ALGORITHM_ECC_P256 = 0x11
KEY_CARD_AUTH = 0x9E
CHALLENGE_BYTES = 32

CardKind = Literal["piv", "uid_only"]
AuthReason = Literal[
    "ok",
    "no_card",
    "unknown_card",
    "card_auth_failed",
    "malformed_response",
    "uid_only_weak",
    "uid_only_not_allowed",
    "reader_unavailable",
    "card_timeout",
]
Rng = Callable[[int], bytes]


class EnrolmentError(CardError):
    """The card cannot be enrolled for challenge–response (no PIV card-auth certificate, unsupported key)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrolledCard:
    """A card as the site policy knows it: never the raw UID, only its keyed hash."""

    card_id: str
    uid_hash: str | None
    public_key_pem: str | None
    kind: CardKind = "piv"


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrolmentRecord:
    """What enrolment reads from a card for the policy author: keyed UID hash, public key, fingerprint."""

    card_id: str
    uid_hash: str | None
    uid_masked: str | None
    public_key_pem: str | None
    fingerprint: str | None
    kind: CardKind

    def as_enrolled(self) -> EnrolledCard:
        """Return the part of the record the agents' policy carries."""
        return EnrolledCard(
            card_id=self.card_id, uid_hash=self.uid_hash, public_key_pem=self.public_key_pem, kind=self.kind
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UidIdentity:
    """A card identified by its UID alone: anyone can clone a UID, so this is always weak."""

    uid_hash: str
    uid_masked: str
    weak: Literal[True] = True


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResult:
    """The outcome of checking a card: ``ok``, a machine reason, the matched card id, and whether it was weak."""

    ok: bool
    reason: AuthReason
    card_id: str | None = None
    weak: bool = False
    detail: str = ""


def hash_uid(uid: bytes, site_key: bytes) -> str:
    """Return the site-keyed HMAC-SHA256 of a card UID in hex (matchable, not reversible without the key)."""
    if not site_key:
        raise ValueError("an empty site key would make the UID hash a plain, guessable digest")
    # Plain HMAC(site key, UID) as protocol.policy.Card documents it, so hashes made elsewhere still match.
    return hmac.new(site_key, uid, hashlib.sha256).hexdigest()


def public_key_fingerprint(public_key_pem: str) -> str:
    """Return the SHA-256 of the DER SubjectPublicKeyInfo in hex, as shown to administrators."""
    key = serialization.load_pem_public_key(public_key_pem.encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def select_piv(conn: CardConnection) -> None:
    """Select the PIV application."""
    conn.transmit(bytes([0x00, 0xA4, 0x04, 0x00, len(PIV_AID)]) + PIV_AID + b"\x00", name="SELECT PIV")


def read_card_auth_certificate(conn: CardConnection) -> bytes:
    """Return the DER certificate in the PIV card-authentication object (5FC101); PIV must be selected."""
    tag_list = encode_tlv(0x5C, CARD_AUTH_CERT_OBJECT)
    data = conn.transmit(bytes([0x00, 0xCB, 0x3F, 0xFF, len(tag_list)]) + tag_list + b"\x00", name="GET DATA 5FC101")
    container = find_tlv(data, 0x53)
    certificate = find_tlv(container, 0x70)
    info = dict(parse_tlv(container))
    if info.get(0x71, b"\x00")[:1] not in (b"\x00", b""):
        # CertInfo 01 means a gzip-compressed certificate; our sites' cards do not use it, so say so clearly.
        raise MalformedResponse("compressed PIV certificates are not supported")
    return certificate


def _load_p256_public_key(certificate_der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
    except ValueError as err:
        raise MalformedResponse(f"card-auth certificate does not parse: {err}") from err
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EnrolmentError(f"card-auth key is {type(key).__name__}, only ECC P-256 is supported")
    return key


def general_authenticate(conn: CardConnection, challenge: bytes) -> bytes:
    """Ask the card to sign ``challenge`` with its card-auth key (9E, ECC P-256); return the DER signature."""
    template = encode_tlv(0x7C, encode_tlv(0x82, b"") + encode_tlv(0x81, challenge))
    apdu = bytes([0x00, 0x87, ALGORITHM_ECC_P256, KEY_CARD_AUTH, len(template)]) + template + b"\x00"
    response = conn.transmit(apdu, name="GENERAL AUTHENTICATE")
    signature = find_tlv(find_tlv(response, 0x7C), 0x82)
    if not signature:
        raise MalformedResponse("GENERAL AUTHENTICATE returned an empty signature")
    return signature


def identify_by_uid(conn: CardConnection, site_key: bytes) -> UidIdentity:
    """Identify a card by its UID alone (FeliCa IDm, MIFARE UID); weak — only where policy explicitly allows it."""
    uid = conn.get_uid()
    return UidIdentity(uid_hash=hash_uid(uid, site_key), uid_masked=mask_uid(uid))


def enrol_card(conn: CardConnection, *, card_id: str, site_key: bytes, kind: CardKind = "piv") -> EnrolmentRecord:
    """Read what the policy needs from a site's existing card: keyed UID hash, card-auth public key, fingerprint."""
    uid_hash: str | None = None
    uid_masked: str | None = None
    try:
        uid = conn.get_uid()
        uid_hash, uid_masked = hash_uid(uid, site_key), mask_uid(uid)
    except StatusWordError:
        # Contact PIV cards have no UID (the reader refuses FF CA); they are found by certificate instead.
        if kind == "uid_only":
            raise
    if kind == "uid_only":
        return EnrolmentRecord(
            card_id=card_id, uid_hash=uid_hash, uid_masked=uid_masked, public_key_pem=None, fingerprint=None, kind=kind
        )
    select_piv(conn)
    key = _load_p256_public_key(read_card_auth_certificate(conn))
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return EnrolmentRecord(
        card_id=card_id,
        uid_hash=uid_hash,
        uid_masked=uid_masked,
        public_key_pem=pem,
        fingerprint=public_key_fingerprint(pem),
        kind=kind,
    )


def authenticate(
    conn: CardConnection | None,
    enrolled: Iterable[EnrolledCard],
    *,
    site_key: bytes,
    rng: Rng = secrets.token_bytes,
    allow_uid_only: bool = False,
) -> AuthResult:
    """Identify the card among the enrolled ones and prove it holds the enrolled key; never raises on card faults.

    A fault after the card was matched to an enrolment keeps that card's id in the result, so a clone that
    presents a copied certificate and then will not sign is a failed authentication of that card, not an
    unknown card. A card that left during the check is ``no_card``; one that stopped answering within the
    connection's deadline is ``card_timeout``.
    """
    if conn is None:
        return AuthResult(ok=False, reason="no_card")
    cards = list(enrolled)
    matched: list[str] = []
    try:
        return _authenticate(conn, cards, site_key=site_key, rng=rng, allow_uid_only=allow_uid_only, matched=matched)
    except CardTimeout as err:
        return AuthResult(ok=False, reason="card_timeout", card_id=_last(matched), detail=str(err))
    except CardRemoved as err:
        return AuthResult(ok=False, reason="no_card", detail=str(err))
    except ReaderUnavailable as err:
        return AuthResult(ok=False, reason="reader_unavailable", detail=str(err))
    except MalformedResponse as err:
        return AuthResult(ok=False, reason="malformed_response", card_id=_last(matched), detail=str(err))
    except CardError as err:
        return AuthResult(ok=False, reason="card_auth_failed", card_id=_last(matched), detail=str(err))


def _last(matched: list[str]) -> str | None:
    return matched[-1] if matched else None


def _authenticate(
    conn: CardConnection,
    cards: list[EnrolledCard],
    *,
    site_key: bytes,
    rng: Rng,
    allow_uid_only: bool,
    matched: list[str],
) -> AuthResult:
    uid_hash: str | None = None
    try:
        uid_hash = hash_uid(conn.get_uid(), site_key)
    except StatusWordError:
        uid_hash = None
    match = next((card for card in cards if uid_hash is not None and card.uid_hash == uid_hash), None)
    if match is not None:
        matched.append(match.card_id)

    if match is not None and match.kind == "uid_only":
        if allow_uid_only:
            return AuthResult(ok=True, reason="uid_only_weak", card_id=match.card_id, weak=True)
        return AuthResult(ok=False, reason="uid_only_not_allowed", card_id=match.card_id, weak=True)

    try:
        select_piv(conn)
    except StatusWordError as err:
        if match is None:
            return AuthResult(ok=False, reason="unknown_card", detail=str(err))
        return AuthResult(ok=False, reason="card_auth_failed", card_id=match.card_id, detail=str(err))

    if match is None:
        # No UID (contact card) or an unknown UID: an enrolled certificate may still identify the card.
        try:
            presented = _load_p256_public_key(read_card_auth_certificate(conn))
        except StatusWordError as err:
            return AuthResult(ok=False, reason="unknown_card", detail=str(err))
        fingerprint = hashlib.sha256(
            presented.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ).hexdigest()
        candidates = (card for card in cards if card.kind == "piv" and card.public_key_pem)
        match = next((c for c in candidates if public_key_fingerprint(c.public_key_pem or "") == fingerprint), None)
        if match is None:
            return AuthResult(ok=False, reason="unknown_card")
        matched.append(match.card_id)

    if not match.public_key_pem:
        return AuthResult(ok=False, reason="card_auth_failed", card_id=match.card_id, detail="no key enrolled")
    enrolled_key = serialization.load_pem_public_key(match.public_key_pem.encode())
    if not isinstance(enrolled_key, ec.EllipticCurvePublicKey):
        return AuthResult(ok=False, reason="card_auth_failed", card_id=match.card_id, detail="enrolled key not ECC")

    challenge = rng(CHALLENGE_BYTES)
    if len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"rng returned {len(challenge)} bytes, expected {CHALLENGE_BYTES}")
    signature = general_authenticate(conn, challenge)
    try:
        # Always the *enrolled* key, never the one in the certificate the card just presented.
        enrolled_key.verify(signature, challenge, ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError) as err:
        return AuthResult(ok=False, reason="card_auth_failed", card_id=match.card_id, detail=f"signature: {err!r}")
    return AuthResult(ok=True, reason="ok", card_id=match.card_id)
