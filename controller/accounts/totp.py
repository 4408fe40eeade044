"""TOTP second factor (RFC 6238, 30 s steps, 6 digits) for the admin roles; a code is accepted once."""

from __future__ import annotations

import hmac
from datetime import datetime

import pyotp

ISSUER = "sekisho"
# One step either side: a phone clock a little off still works, a code lives at most ~90 s.
WINDOW = 1


def new_secret() -> str:
    """Return a new random base32 secret (160 bits)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, login: str) -> str:
    """Return the otpauth:// URI an authenticator app scans (as a QR code) or imports."""
    return pyotp.TOTP(secret).provisioning_uri(name=login, issuer_name=ISSUER)


def matching_step(secret: str, code: str, at: datetime, after_step: int | None) -> int | None:
    """Return the time step the code belongs to if it is valid at ``at`` and newer than after_step, else None.

    Refusing a step at or before the last accepted one stops a code seen over someone's shoulder from
    being used again within its lifetime.
    """
    code = code.strip().replace(" ", "")
    if not (code.isascii() and code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret)
    now_step = totp.timecode(at)
    found: int | None = None
    for step in range(now_step - WINDOW, now_step + WINDOW + 1):
        # Compare every candidate (constant work whichever matches).
        if hmac.compare_digest(totp.generate_otp(step), code) and found is None:
            found = step
    if found is None or (after_step is not None and found <= after_step):
        return None
    return found
