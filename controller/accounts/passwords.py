"""Passwords: the policy a new one must meet, and argon2id hashing (argon2-cffi's PasswordHasher)."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from sekisho.common.i18n import M_

MIN_LENGTH = 12
# Bounds the work one request can cause (argon2 hashes whatever it is given).
MAX_LENGTH = 1024

# argon2-cffi's defaults are RFC 9106's second recommendation (argon2id, t=3, 64 MiB, p=4).
_HASHER = PasswordHasher()
# Verified when the login is unknown, so an unknown login takes as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("sekisho: no such user, timing only")


class PasswordRejected(ValueError):
    """A new password does not meet the policy; the message says why (never the password)."""


def check_policy(password: str, login: str) -> None:
    """Raise PasswordRejected unless the password is long enough and is not the login."""
    if len(password) < MIN_LENGTH:
        raise PasswordRejected(M_("the password needs at least %(min)s characters", min=MIN_LENGTH))
    if len(password) > MAX_LENGTH:
        raise PasswordRejected(M_("the password is longer than %(max)s characters", max=MAX_LENGTH))
    if password.strip().casefold() == login.strip().casefold():
        raise PasswordRejected(M_("the password must not be the login"))


def hash_password(password: str) -> str:
    """Return the argon2id hash of a password (salted; the encoded string carries its parameters)."""
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Tell whether password matches the stored hash; without a hash, spend the same time and say no."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(stored_hash if stored_hash is not None else _DUMMY_HASH, password) and (
            stored_hash is not None
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """Tell whether a hash was made with weaker parameters than today's (rehash it at the next sign-in)."""
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True
