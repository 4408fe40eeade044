"""Ed25519 signing of wire messages, with domain separation per message kind."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sekisho.protocol import errors
from sekisho.protocol.canonical import canonical_bytes

# Every signature covers the kind of message too, so a signed ack can never pass as a policy bundle.
# "checkpoint" and "agent_key" never go on the wire: the controller signs its own records with them
# (controller/store/checkpoints.py), and their own kinds keep those signatures from passing as messages.
# "enrol" and "renew" sign a device's requests to the controller's enrolment API (protocol/enrolment.py).
# "backup" signs the manifest of a controller backup (controller/backup/archive.py); it never goes on the wire.
# "revocations" signs the broker's revocation list served to brokers on other hosts (protocol/revocations.py).
KINDS = (
    "event",
    "ack",
    "heartbeat",
    "command",
    "bundle",
    "checkpoint",
    "agent_key",
    "enrol",
    "renew",
    "backup",
    "revocations",
    "verified_point",
)


def signing_input(kind: str, body: Any) -> bytes:
    """Return the exact bytes signed for a message body of the given kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}")
    return b"sekisho/v1/" + kind.encode() + b"\n" + canonical_bytes(body)


def signing_input_canonical(kind: str, body_bytes: bytes) -> bytes:
    """Return the signed bytes for a body already in canonical form (canonical_bytes of the body)."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}")
    return b"sekisho/v1/" + kind.encode() + b"\n" + body_bytes


def sign_canonical(key: Ed25519PrivateKey, kind: str, body_bytes: bytes) -> str:
    """Sign a body given as its canonical bytes (serialised once by the caller); return base64."""
    return b64(key.sign(signing_input_canonical(kind, body_bytes)))


def b64(data: bytes) -> str:
    """Encode bytes as unpadded URL-safe base64."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """Decode unpadded URL-safe base64, raising Rejected on bad input."""
    if not isinstance(text, str) or len(text) > 200:
        raise errors.Rejected(errors.MALFORMED, "signature is not a short base64 string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as err:
        raise errors.Rejected(errors.MALFORMED, "signature is not base64") from err


def sign(key: Ed25519PrivateKey, kind: str, body: Any) -> str:
    """Sign a message body; return the signature as base64."""
    return b64(key.sign(signing_input(kind, body)))


def verify(key: Ed25519PublicKey, kind: str, body: Any, signature: str) -> None:
    """Verify a signature, raising Rejected(bad_signature) if it does not match."""
    raw = unb64(signature)
    try:
        key.verify(raw, signing_input(kind, body))
    except InvalidSignature as err:
        raise errors.Rejected(errors.BAD_SIGNATURE, f"{kind} signature does not verify") from err


class Verifier:
    """An Ed25519 public key prepared for the ingest hot path.

    libsodium (PyNaCl) verifies about twice as fast as OpenSSL through cryptography on the machines
    measured (docs/benchmarks.md), and it also refuses non-canonical signatures and small-order keys.
    """

    __slots__ = ("_errors", "_key")

    def __init__(self, key: Ed25519PublicKey) -> None:
        # Imported here: only the controller needs it, and every megabyte counts in an idle agent.
        import nacl.exceptions
        import nacl.signing

        self._key = nacl.signing.VerifyKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        self._errors = (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise InvalidSignature unless the signature over message verifies."""
        try:
            self._key.verify(message, signature)
        except self._errors as err:
            raise InvalidSignature from err


def verify_canonical(key: Ed25519PublicKey | Verifier, kind: str, canonical_body: bytes, signature: str) -> None:
    """Verify a signature over an already-canonical body (saves re-serialising on the ingest hot path)."""
    try:
        key.verify(unb64(signature), b"sekisho/v1/" + kind.encode() + b"\n" + canonical_body)
    except InvalidSignature as err:
        raise errors.Rejected(errors.BAD_SIGNATURE, f"{kind} signature does not verify") from err


def generate_key() -> Ed25519PrivateKey:
    """Create a new Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """Serialise a private key to unencrypted PKCS#8 PEM (the file is protected by mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """Serialise a public key to SubjectPublicKeyInfo PEM."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from PEM bytes."""
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file."""
    return load_public_key_pem(path.read_bytes())


def key_id(key: Ed25519PublicKey) -> str:
    """Return a short, stable fingerprint of a public key (for logs and docs, never for trust)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
