"""Enrolment and renewal: tokens for administrators, certificates for devices (issue 11, items 1-2).

The CLI (`sekisho fleet token …`) and the HTTPS API (controller/api/enrol.py) call this service. Devices
are trusted by what they prove, never by where they connect from:

- enrolment: a token secret (only its SHA-256 is stored, uses claimed atomically), the request signed with
  the Ed25519 key the device asks to register (it holds that key) and a CSR signed with its new TLS key;
- renewal: the request signed with the agent's *registered* Ed25519 key (as vouched for by the newest
  controller-signed line of its key history, the same trust ingest uses, so a revoked or replaced agent
  cannot renew), showing its current, unexpired certificate, and a CSR for a *new* TLS key. Signing with the
  Ed25519 key rather than mutual TLS on the API keeps renewal working through a TLS-terminating proxy and
  under uvicorn (which does not hand client certificates to the application), and ties it to the identity
  that revocation already withdraws.

Every refusal is recorded with its reason (enrol_refusals); the API counts unknown tokens and bad
signatures as failed authentications, so guessing is throttled like guessing API tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pydantic import ValidationError

from sekisho.controller.config import ControllerConfig
from sekisho.controller.fleet.issuing import IssuingCa, IssuingError, load_csr
from sekisho.controller.fleet.revocations import publish_revocations
from sekisho.controller.store.agents import REPLACE
from sekisho.controller.store.audit import Operator
from sekisho.controller.store.enrolment import EnrolRefused, Reason
from sekisho.controller.store.models import EnrolToken
from sekisho.controller.store.store import Store
from sekisho.protocol import enrolment, errors, signing, timefmt, topics

# Names the broker treats specially (deploy/pki.py RESERVED_NAMES): an agent so named would get their ACL.
RESERVED_NAMES = frozenset({"controller", "sekisho-broker", "broker", "ca"})
MAX_TOKEN_USES = 1000
MAX_TOKEN_LIFETIME = timedelta(days=30)


class EnrolmentUnavailable(Exception):
    """Enrolment is not configured on this controller (no issuing CA), or its CA files are unusable."""


def check_enrol_name(name: str) -> None:
    """Raise ValueError unless a device may enrol under this name (it becomes its CN and MQTT identity)."""
    try:
        topics.check_agent_id(name)
    except errors.Rejected as err:
        raise ValueError(f"invalid agent name {name!r}: lower-case letters, digits, '-', '_'") from err
    if name in RESERVED_NAMES or name.startswith(topics.CONTROLLER_CLIENT_PREFIX):
        raise ValueError(f"agent name {name!r} is reserved")


@dataclass(frozen=True)
class NewToken:
    """A token just made: its stored row and the one string to hand to the device (shown once)."""

    row: EnrolToken
    token: str
    ca_fingerprint: str


class EnrolmentService:
    """Tokens, enrolment and renewal over one store; time comes from `clock` (tests move it)."""

    def __init__(self, config: ControllerConfig, store: Store, *, clock: Callable[[], datetime] = timefmt.now) -> None:
        self.config = config
        self.store = store
        self.clock = clock

    # --- what the device pins -------------------------------------------------------------------------

    @cached_property
    def api_ca_pem(self) -> bytes:
        """The CA that signed the API's HTTPS certificate (PEM), which tokens name by its SHA-256."""
        path = self.config.api_ca_cert or self.config.ca_cert
        try:
            pem = path.read_bytes()
            x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError) as err:
            raise EnrolmentUnavailable(f"cannot read the API's CA {path}: {err}") from err
        return pem

    @property
    def api_ca_sha256(self) -> bytes:
        """The SHA-256 of the API's CA certificate (DER)."""
        return x509.load_pem_x509_certificate(self.api_ca_pem).fingerprint(hashes.SHA256())

    @cached_property
    def issuing(self) -> IssuingCa:
        """The CA that signs agents' certificates; EnrolmentUnavailable if not configured or unusable."""
        cfg = self.config
        if cfg.enrol_ca_cert is None or cfg.enrol_ca_key is None:
            raise EnrolmentUnavailable("enrolment is not configured (set enrol_ca_cert and enrol_ca_key)")
        try:
            return IssuingCa.load(cfg.enrol_ca_cert, cfg.enrol_ca_key, cfg.ca_cert)
        except IssuingError as err:
            raise EnrolmentUnavailable(str(err)) from err

    # --- tokens ---------------------------------------------------------------------------------------

    def create_token(
        self,
        *,
        kind: str,
        expires_in: timedelta,
        uses: int = 1,
        name: str | None = None,
        reenrol: bool = False,
        created_by: str,
        controller_url: str | None = None,
        operator: Operator | None = None,
    ) -> NewToken:
        """Make a token; ValueError for a bad kind, lifetime, use count or name (a taken name needs reenrol).

        operator: who made it; an admin audit row (fleet.token.create, never the secret) is stored with it.
        """
        if kind not in enrolment.KINDS:
            raise ValueError(f"kind must be one of {', '.join(enrolment.KINDS)}")
        if not timedelta(minutes=1) <= expires_in <= MAX_TOKEN_LIFETIME:
            raise ValueError("a token lives between one minute and 30 days")
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise ValueError(f"uses must be between 1 and {MAX_TOKEN_USES}")
        if name is not None:
            check_enrol_name(name)
            exists = self.store.agent_exists(name)
            if reenrol and not exists:
                raise ValueError(f"no agent named {name!r} to re-enrol")
            if exists and not reenrol:
                raise ValueError(f"an agent named {name!r} exists: use --reenrol {name} to replace it")
        elif reenrol:
            raise ValueError("--reenrol needs the name of the agent to replace")
        if reenrol and uses != 1:
            raise ValueError("a re-enrolment token replaces one agent: uses must be 1")
        url = controller_url or self.config.enrol_url
        token = enrolment.EnrolToken(
            secret=secrets.token_bytes(enrolment.SECRET_BYTES), ca_sha256=self.api_ca_sha256, controller_url=url
        )
        now = self.clock()
        row = EnrolToken(
            id="t-" + secrets.token_hex(5),
            secret_sha256=enrolment.secret_digest(token.secret_text),
            kind=kind,
            name=name,
            reenrol=reenrol,
            uses=uses,
            uses_left=uses,
            created_at=now,
            created_by=created_by[:128],
            expires_at=now + expires_in,
        )
        audit = None
        if operator is not None:
            audit = operator.action(
                "fleet.token.create",
                f"token:{row.id}",
                new={
                    "kind": kind,
                    "name": name,
                    "reenrol": reenrol,
                    "uses": uses,
                    "expires_at": row.expires_at,
                    "controller_url": url,
                },
            )
        self.store.add_token(row, audit=audit)
        return NewToken(row=row, token=token.encode(), ca_fingerprint=token.ca_fingerprint)

    # --- enrolment ------------------------------------------------------------------------------------

    def enrol(self, raw: bytes, client: str | None = None) -> enrolment.EnrolAnswer:
        """Enrol a device from its signed request; EnrolRefused (recorded) with the reason otherwise."""
        issuing = self.issuing
        now = self.clock()
        request: enrolment.EnrolRequest | None = None
        try:
            body, sig = enrolment.open_request("enrol", raw)
            request = enrolment.EnrolRequest.model_validate(body)
            device_key = signing.load_public_key_pem(request.signing_public_key.encode())
            enrolment.verify_request("enrol", device_key, body, sig)
            enrolment.check_fresh(request.issued_at, now)
            csr = load_csr(request.csr)
        except (errors.Rejected, ValidationError, ValueError, IssuingError) as err:
            refusal = EnrolRefused(Reason.BAD_REQUEST, f"malformed enrolment request: {_say(err)}")
            self._record(refusal, request, client, now)
            raise refusal from err
        try:
            done = self.store.enrol(
                secret_sha256=enrolment.secret_digest(request.token),
                kind=request.kind,
                name=request.name,
                machine_id_sha256=request.machine_id_sha256,
                public_key_pem=request.signing_public_key,
                now=now,
                check_name=check_enrol_name,
                issue=lambda agent_id: issuing.sign(csr, agent_id, now, self.config.agent_cert_days),
                issuer_sha256=issuing.sha256,
                # A re-enrolled device's outbox still holds events signed with its old key: accepted for the
                # same window as after `register-agent --replace` (controller/store/agents.py).
                key_grace=timedelta(seconds=self.config.key_rotation_grace_s),
            )
        except EnrolRefused as refusal:
            self._record(refusal, request, client, now)
            raise
        if done.action == REPLACE:
            # The old certificate is refused by serial at once, not at the next periodic refresh.
            publish_revocations(self.store, self.config.revocation_list)
        return enrolment.EnrolAnswer(
            agent_id=done.agent_id,
            kind=request.kind,
            certificate_chain=issuing.chain_pem(done.certificate),
            ca_certificate=issuing.root_pem(),
            controller_public_key=self._controller_public_pem(),
            broker_host=self.config.agent_broker_host or self.config.broker_host,
            broker_port=self.config.agent_broker_port,
            controller_url=self.config.enrol_url,
            not_after=timefmt.fmt(done.certificate.not_valid_after_utc),
        )

    def renew(self, raw: bytes, client: str | None = None) -> enrolment.RenewAnswer:
        """Renew an agent's certificate from a request signed with its registered key; EnrolRefused otherwise."""
        issuing = self.issuing
        now = self.clock()
        agent_id: str | None = None
        try:
            body, sig = enrolment.open_request("renew", raw)
            request = enrolment.RenewRequest.model_validate(body)
            agent_id = topics.check_agent_id(request.agent_id)
        except (errors.Rejected, ValidationError) as err:
            refusal = EnrolRefused(Reason.BAD_REQUEST, f"malformed renewal request: {_say(err)}")
            self._record_renewal(refusal, agent_id, client, now)
            raise refusal from err
        try:
            pem = self._registered_key(agent_id)
            try:
                enrolment.verify_request("renew", signing.load_public_key_pem(pem.encode()), body, sig)
            except errors.Rejected as err:
                raise EnrolRefused(
                    Reason.BAD_SIGNATURE,
                    "the request is not signed with this agent's registered key (was it re-enrolled elsewhere?)",
                    name=agent_id,
                ) from err
            enrolment.check_fresh(request.issued_at, now)
            current = x509.load_pem_x509_certificate(request.current_certificate.encode())
            csr = load_csr(request.csr)
            if _spki(csr.public_key()) == _spki(current.public_key()):
                raise EnrolRefused(Reason.SAME_KEY, "a renewal needs a new TLS key", name=agent_id)
            cert = self.store.renew(
                agent_id=agent_id,
                current_sha256=current.fingerprint(hashes.SHA256()).hex(),
                now=now,
                issue=lambda name: issuing.sign(csr, name, now, self.config.agent_cert_days),
                issuer_sha256=issuing.sha256,
            )
        except (errors.Rejected, ValueError, IssuingError) as err:
            refusal = EnrolRefused(Reason.BAD_REQUEST, f"renewal refused: {_say(err)}", name=agent_id)
            self._record_renewal(refusal, agent_id, client, now)
            raise refusal from err
        except EnrolRefused as refusal:
            self._record_renewal(refusal, agent_id, client, now)
            raise
        return enrolment.RenewAnswer(
            certificate_chain=issuing.chain_pem(cert), not_after=timefmt.fmt(cert.not_valid_after_utc)
        )

    # --- helpers --------------------------------------------------------------------------------------

    def _registered_key(self, agent_id: str) -> str:
        signer = self.store.signing_key
        if signer is None:
            raise EnrolmentUnavailable("the controller's signing key is unreadable: renewals cannot be checked")
        trusted, _refused = self.store.vouched_agent_keys(signing.Verifier(signer.public_key()))
        pem = trusted.get(agent_id)
        if pem is None:
            raise EnrolRefused(
                Reason.UNKNOWN_AGENT, f"agent {agent_id!r} is not enrolled, or is revoked or replaced", name=agent_id
            )
        return pem

    def _controller_public_pem(self) -> str:
        signer = self.store.signing_key
        if signer is None:
            raise EnrolmentUnavailable("the controller's signing key is unreadable")
        return signing.public_key_pem(signer.public_key()).decode()

    def _record(
        self, refusal: EnrolRefused, request: enrolment.EnrolRequest | None, client: str | None, now: datetime
    ) -> None:
        self.store.record_refusal(
            refusal.reason,
            refusal.message,
            at=now,
            token_id=refusal.token_id,
            kind=request.kind if request else None,
            name=refusal.name or (request.name if request else None),
            machine_id_sha256=request.machine_id_sha256 if request else None,
            client=client,
        )

    def _record_renewal(self, refusal: EnrolRefused, agent_id: str | None, client: str | None, now: datetime) -> None:
        self.store.record_refusal(refusal.reason, "renewal: " + refusal.message, at=now, name=agent_id, client=client)


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined, no-any-return]


def _say(err: Exception) -> str:
    # One short line: pydantic's messages name the field; never echo the request (it holds the token).
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(str(p) for p in first.get('loc', ())) or 'body'}: {first.get('msg', 'invalid')}"
    if isinstance(err, errors.Rejected):
        return err.detail
    return str(err)[:200]
