"""Make arbitrary received bytes safe to keep: no My-Number-looking value is ever written to the store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from functools import lru_cache

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sekisho.protocol import mynumber

BASE64_PREFIX = "base64:"
# HKDF label of the dead-letter MAC key. Changing it (or the signing key) changes every later MAC.
LETTER_MAC_INFO = b"sekisho/v1/dead-letter-mac"


@lru_cache(maxsize=4)
def letter_mac_key(signing_key: Ed25519PrivateKey) -> bytes:
    """Derive the dead-letter MAC key from the controller's signing key (HKDF-SHA256, fixed label)."""
    seed = signing_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LETTER_MAC_INFO).derive(seed)


def letter_mac(signing_key: Ed25519PrivateKey | None, raw: bytes) -> str | None:
    """Return HMAC-SHA256 (hex) of received bytes under the dead-letter key, or None without a key.

    A plain digest of the refused bytes would let anyone who reads the database confirm a guessed My
    Number in a redacted payload (about 10**n guesses for n hidden digits); the MAC needs the key, which
    only the controller holds. It still tells repeated deliveries of the same message apart from others.
    """
    if signing_key is None:
        return None
    return hmac.new(letter_mac_key(signing_key), raw, hashlib.sha256).hexdigest()


def _scrub_text(text: str) -> str:
    return str(mynumber.redact(text))


def redact_payload(raw: bytes) -> str:
    """Render received bytes as storable text with every My-Number-like value replaced.

    JSON is parsed so that escaped or nested values are found too. Clean JSON and clean text are
    kept byte for byte (so a dead-lettered event's signature can still be checked); JSON that needs
    redaction is re-serialised from the redacted document; other UTF-8 text is scrubbed as text;
    anything else is stored as "base64:" + base64 of the scrubbed bytes.
    """
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            doc = json.loads(text)
            redacted = mynumber.redact(doc)
            # ASCII output escapes NUL and lone surrogates, which PostgreSQL text cannot hold.
            rendered = json.dumps(redacted)
        except (ValueError, RecursionError):
            pass
        else:
            if redacted == doc and not mynumber.contains_my_number(text):
                return text
            # The text pass catches forms the JSON walk leaves alone, e.g. 123456789018.0.
            return _scrub_text(rendered)
        if "\x00" not in text:
            return _scrub_text(text)
    # Scrub the readable parts before encoding, so base64 never hides a My Number either.
    scrubbed = _scrub_text(raw.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
    # Base64 text can, by chance, contain a valid-looking 12-digit run; the last pass removes that too.
    return _scrub_text(BASE64_PREFIX + base64.b64encode(scrubbed).decode("ascii"))


def clean_text(value: str | None, limit: int) -> str | None:
    """Make a short caller-supplied string (topic, id, detail) safe and storable on every backend."""
    if value is None:
        return None
    safe = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return _scrub_text(safe)[:limit]
