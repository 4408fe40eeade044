"""The enrolment contract between a device and the controller's HTTPS API: tokens, requests, answers.

A token is ``sek1.<secret>.<ca-sha256>[.<controller-url>]`` (each part unpadded URL-safe base64). The
secret is 32 random bytes; the controller keeps only its SHA-256. The CA hash names the CA that signed the
controller API's HTTPS certificate, so the device trusts exactly that CA before it sends anything secret:
it first fetches the CA without trust (``CA_PATH``), compares its hash with the token's, and from then on
talks only over TLS that trusts that CA alone.

Requests are signed with the device's new Ed25519 event-signing key (proof that it holds the key it asks
the controller to register); the CSR inside is signed with its new TLS key. A renewal is signed with the
agent's *registered* Ed25519 key, the identity the controller already trusts through its signed key history.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from sekisho.protocol import errors, signing, timefmt
from sekisho.protocol.canonical import canonical_bytes, loads_strict

TOKEN_PREFIX = "sek1"  # noqa: S105 (the format tag, not a secret)
SECRET_BYTES = 32
CA_PATH = "/api/v1/enrol/ca"
ENROL_PATH = "/api/v1/enrol"
RENEW_PATH = "/api/v1/enrol/renew"
KINDS = ("terminal", "door")
AgentKind = Literal["terminal", "door"]
# A request carries a CSR and a public key: a few KiB. Anything much bigger is not one.
MAX_REQUEST_BYTES = 32 * 1024
MAX_ANSWER_BYTES = 256 * 1024
# A signed request older or newer than this is refused: a captured renewal cannot be replayed later.
REQUEST_SKEW = timedelta(minutes=10)
_MACHINE_ID_DOMAIN = b"sekisho machine-id v1\n"


class TokenError(ValueError):
    """A string that is not an enrolment token (the message says what is wrong, never the secret)."""


class EnrolToken(BaseModel):
    """The parts of an enrolment token."""

    model_config = ConfigDict(frozen=True)

    secret: bytes = Field(min_length=SECRET_BYTES, max_length=SECRET_BYTES)
    ca_sha256: bytes = Field(min_length=32, max_length=32)
    controller_url: str | None = None

    def encode(self) -> str:
        """Return the token as the one string an administrator hands to a device."""
        parts = [TOKEN_PREFIX, signing.b64(self.secret), signing.b64(self.ca_sha256)]
        if self.controller_url:
            parts.append(signing.b64(self.controller_url.encode()))
        return ".".join(parts)

    @property
    def secret_text(self) -> str:
        """The secret as sent to the controller (base64)."""
        return signing.b64(self.secret)

    @property
    def ca_fingerprint(self) -> str:
        """The CA's SHA-256 as colon-separated hex (as `sekisho pki` prints it)."""
        return self.ca_sha256.hex(":")


def _unb64(text: str, what: str) -> bytes:
    try:
        return signing.unb64(text)
    except errors.Rejected as err:
        raise TokenError(f"enrolment token: {what} is not base64") from err


def parse_token(text: str) -> EnrolToken:
    """Parse an enrolment token, raising TokenError with what is wrong."""
    parts = text.strip().split(".")
    if len(parts) not in (3, 4) or parts[0] != TOKEN_PREFIX:
        raise TokenError(f"not an enrolment token (expected {TOKEN_PREFIX}.SECRET.CA-SHA256[.URL])")
    secret = _unb64(parts[1], "the secret")
    ca = _unb64(parts[2], "the CA fingerprint")
    if len(secret) != SECRET_BYTES or len(ca) != 32:
        raise TokenError("enrolment token: the secret or the CA fingerprint has the wrong length (copied whole?)")
    url = None
    if len(parts) == 4:
        try:
            url = _unb64(parts[3], "the controller URL").decode()
        except UnicodeDecodeError as err:
            raise TokenError("enrolment token: the controller URL is not text") from err
    return EnrolToken(secret=secret, ca_sha256=ca, controller_url=url)


def secret_digest(secret_text: str) -> str:
    """Return the SHA-256 (hex) of a token secret as sent: what the controller stores and looks up."""
    return hashlib.sha256(secret_text.encode()).hexdigest()


def machine_id_digest(machine_id: str) -> str:
    """Return the hash of a machine-id that leaves the device (systemd asks that the id itself stay private)."""
    return hashlib.sha256(_MACHINE_ID_DOMAIN + machine_id.strip().encode()).hexdigest()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EnrolRequest(_Body):
    """What a device sends to enrol (signed with the Ed25519 key it asks to register)."""

    token: str = Field(max_length=64)
    kind: AgentKind
    name: str | None = Field(default=None, max_length=64)
    machine_id_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    csr: str = Field(max_length=8192)
    signing_public_key: str = Field(max_length=1024)
    issued_at: str = Field(max_length=40)


class RenewRequest(_Body):
    """What an enrolled agent sends to renew its certificate (signed with its registered Ed25519 key)."""

    agent_id: str = Field(max_length=64)
    csr: str = Field(max_length=8192)
    current_certificate: str = Field(max_length=8192)
    issued_at: str = Field(max_length=40)


class EnrolAnswer(BaseModel):
    """What the controller returns to a newly enrolled device."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    agent_id: str
    kind: AgentKind
    certificate_chain: str = Field(description="PEM: the agent's certificate, then any intermediate CA")
    ca_certificate: str = Field(description="PEM: the site CA (trusted for the broker and this API)")
    controller_public_key: str = Field(description="PEM: the controller's Ed25519 key (acks, policy, commands)")
    broker_host: str
    broker_port: int
    controller_url: str | None
    not_after: str


class RenewAnswer(BaseModel):
    """What the controller returns for a renewal."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    certificate_chain: str
    not_after: str


class Refusal(BaseModel):
    """Why a request was refused: a stable reason code and a message for people."""

    reason: str
    message: str


def seal(kind: Literal["enrol", "renew"], key: Ed25519PrivateKey, body: EnrolRequest | RenewRequest) -> bytes:
    """Return a request as wire bytes: ``{kind: body, "sig": signature}``."""
    data = body.model_dump(mode="json")
    return canonical_bytes({kind: data, "sig": signing.sign(key, kind, data)})


def open_request(kind: Literal["enrol", "renew"], raw: bytes) -> tuple[dict[str, object], str]:
    """Return a request's body (not yet validated or verified) and its signature; Rejected if malformed."""
    doc = loads_strict(raw, max_size=MAX_REQUEST_BYTES)
    if not isinstance(doc, dict) or set(doc) != {kind, "sig"} or not isinstance(doc[kind], dict):
        raise errors.Rejected(errors.MALFORMED, f'expected {{"{kind}": {{...}}, "sig": "..."}}')
    if not isinstance(doc["sig"], str):
        raise errors.Rejected(errors.MALFORMED, "sig is not a string")
    return doc[kind], doc["sig"]


def verify_request(kind: Literal["enrol", "renew"], key: Ed25519PublicKey, body: dict[str, object], sig: str) -> None:
    """Verify a request's signature, raising Rejected(bad_signature)."""
    signing.verify(key, kind, body, sig)


def check_fresh(issued_at: str, now: datetime) -> None:
    """Raise Rejected unless a request was issued within REQUEST_SKEW of now."""
    when = timefmt.parse(issued_at, "issued_at")
    if abs(when - now) > REQUEST_SKEW:
        raise errors.Rejected(errors.SCHEMA, "issued_at is too far from the controller's clock (check the time)")
