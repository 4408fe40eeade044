"""The door PIN hash format: PBKDF2-SHA256 as ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``.

The controller writes it (``sekisho doors hash-pin`` for site.yaml), the policy model checks its shape
(``Person.pin_hash``) and the door agent verifies a PIN against it in constant time; all three use
this module, so the format is written down once.

A 4–8 digit PIN has at most 10^8 values, so no hash makes a leaked bundle safe against an offline
search; the hash only keeps PINs out of plain sight in the policy and its backups. What protects a PIN
is the bundle's confidentiality and the door's lock-out after repeated wrong entries (docs/doors.md).
The iteration count is a trade between that and the keypad's response time on a small door controller.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 100_000
# The format has 4 to 7 digits of iterations.
MIN_ITERATIONS = 1_000
MAX_ITERATIONS = 9_999_999
SALT_BYTES = 16
# The shape of a stored hash, for the policy model (Person.pin_hash) and for verify_pin.
PIN_HASH_PATTERN = r"^pbkdf2_sha256\$([0-9]{4,7})\$([0-9a-f]{32})\$([0-9a-f]{64})$"
_PIN = re.compile(r"[0-9]{4,8}")
_HASH = re.compile(PIN_HASH_PATTERN)


def valid_pin(pin: str) -> bool:
    """Tell whether a string has the shape of a door PIN (4 to 8 ASCII digits)."""
    return isinstance(pin, str) and _PIN.fullmatch(pin) is not None


def hash_pin(pin: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """Return ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>`` for a PIN of 4 to 8 digits."""
    if not valid_pin(pin):
        raise ValueError("a door PIN is 4 to 8 digits")
    if isinstance(iterations, bool) or not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the salt is {SALT_BYTES} bytes")
    digest = hashlib.pbkdf2_hmac("sha256", pin.encode("ascii"), salt, iterations)
    return f"{ALGORITHM}${iterations}${salt.hex()}${digest.hex()}"


def verify_pin(pin: str, pin_hash: str) -> bool:
    """Tell whether a PIN matches its hash; comparison in constant time, a malformed PIN never matches."""
    match = _HASH.fullmatch(pin_hash) if isinstance(pin_hash, str) else None
    if match is None:
        raise ValueError("not a pbkdf2_sha256 PIN hash")
    if not valid_pin(pin):
        return False
    iterations, salt, expected = int(match[1]), bytes.fromhex(match[2]), bytes.fromhex(match[3])
    digest = hashlib.pbkdf2_hmac("sha256", pin.encode("ascii"), salt, iterations)
    return hmac.compare_digest(digest, expected)
