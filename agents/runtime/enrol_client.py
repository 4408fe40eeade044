"""The device's side of enrolment and renewal, on the standard library only (no HTTP client in the agent install).

Enrolment (`sekisho-agent enrol`): the TLS key and the event-signing key are made here and written 0600 in
a 0700 directory before anything is sent; they never leave the device. The CA is first fetched without
trust and accepted only if its SHA-256 equals the token's; every later byte goes over TLS that trusts
exactly that CA. Renewal: a CSR for a new TLS key, signed with the agent's registered Ed25519 key.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from sekisho.agents.runtime.errors import AgentError
from sekisho.common.files import write_atomically
from sekisho.protocol import enrolment, signing, timefmt

MACHINE_ID_PATHS = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
TIMEOUT_S = 20.0
# File names inside an enrolled agent's directory.
TLS_FILE = "tls.pem"  # the TLS key, then the certificate and its chain: one file, so renewal swaps both at once
SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
CA_FILE = "ca.crt"
CONTROLLER_CA_FILE = "controller-ca.crt"
CONTROLLER_PUB = "controller-signing.pub"
CONFIG_FILE = "agent.toml"


class EnrolError(AgentError):
    """Enrolment or renewal failed; the message says why and what to do."""


class EnrolRefusedError(EnrolError):
    """The controller refused: reason is its stable code (token_used, clone, duplicate_name, …)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason


@dataclass(frozen=True)
class Enrolled:
    """Where an enrolled agent's files are, and who it is."""

    agent_id: str
    kind: str
    directory: Path
    config_path: Path
    not_after: datetime


def read_machine_id(paths: tuple[Path, ...] = MACHINE_ID_PATHS) -> str:
    """Return this machine's id (systemd's /etc/machine-id), EnrolError if there is none."""
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            return text
    raise EnrolError("no machine-id on this host (/etc/machine-id): run systemd-machine-id-setup first")


# --- HTTPS ---------------------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, int, str]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise EnrolError(f"the controller URL must be https://HOST[:PORT], not {url!r}")
    return parsed.hostname, parsed.port or 443, parsed.path.rstrip("/")


def _request(
    url: str, path: str, ctx: ssl.SSLContext, *, body: bytes | None = None, timeout: float = TIMEOUT_S
) -> tuple[int, bytes]:
    host, port, prefix = _split_url(url)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request("POST" if body is not None else "GET", prefix + path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(enrolment.MAX_ANSWER_BYTES + 1)
        if len(data) > enrolment.MAX_ANSWER_BYTES:
            raise EnrolError(f"the controller at {url} sent an answer too large to be one")
        return response.status, data
    except ssl.SSLCertVerificationError as err:
        raise EnrolError(
            f"the controller at {url} did not prove itself with a certificate from the pinned CA: {err.verify_message}"
        ) from err
    except (OSError, http.client.HTTPException) as err:
        raise EnrolError(f"cannot reach the controller at {url}: {err}") from err
    finally:
        conn.close()


def fetch_ca_untrusted(url: str, *, timeout: float = TIMEOUT_S) -> bytes:
    """Fetch the controller's CA without checking anything: the caller compares it with the token first."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    status, data = _request(url, enrolment.CA_PATH, ctx, timeout=timeout)
    if status != 200:
        raise EnrolError(f"the controller at {url} does not offer its CA ({status}): is enrolment configured?")
    return data


def pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    """Return a TLS client context that trusts exactly this CA (and checks the host name)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def check_pin(ca_pem: bytes, expected_sha256: bytes) -> x509.Certificate:
    """Return the CA if its SHA-256 matches the token's; EnrolError (nothing was sent) otherwise."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as err:
        raise EnrolError("the controller sent something that is not a CA certificate; nothing was sent") from err
    got = ca.fingerprint(hashes.SHA256())
    if not hmac.compare_digest(got, expected_sha256):
        raise EnrolError(
            "the controller's CA does not match the enrolment token: got sha256 "
            f"{got.hex(':')}, the token names {expected_sha256.hex(':')}. Refusing: this may not be your controller "
            "(or the token belongs to another site). Nothing was sent."
        )
    return ca


def _post(url: str, path: str, ctx: ssl.SSLContext, raw: bytes, timeout: float) -> bytes:
    status, data = _request(url, path, ctx, body=raw, timeout=timeout)
    if status == 200:
        return data
    try:
        detail = json.loads(data).get("detail")
        refusal = enrolment.Refusal.model_validate(detail)
    except (ValueError, AttributeError, ValidationError):
        raise EnrolError(f"the controller answered {status}: {data[:200].decode(errors='replace')}") from None
    raise EnrolRefusedError(refusal.reason, refusal.message)


# --- keys and files --------------------------------------------------------------------------------------


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """Return a new TLS key (ECDSA P-256)."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_pem(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    """Return a CSR for the key (the controller uses only its key and sets the name itself)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def private_dir(directory: Path) -> None:
    """Create a directory 0700 (an existing one is tightened to 0700: it will hold private keys)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def check_issued(
    chain_pem: str, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[x509.Certificate, bytes]:
    """Return the leaf and the chain as PEM if the leaf is for our key and chains to the CA, else EnrolError."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError as err:
        raise EnrolError("the controller's certificate chain is not PEM") from err
    if not chain:
        raise EnrolError("the controller sent no certificate")
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        raise EnrolError("the controller's certificate is not for the key this device made")
    try:
        for child, parent in zip(chain, [*chain[1:], ca], strict=True):
            child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise EnrolError("the controller's certificate does not chain to the site CA") from err
    return leaf, "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain).encode()


def write_identity(path: Path, key: ec.EllipticCurvePrivateKey, chain: bytes = b"") -> None:
    """Write the TLS key and its certificate chain as one 0600 file, atomically (old or new, never a mix)."""
    write_atomically(path, _key_pem(key) + chain, mode=0o600)


def _toml(values: dict[str, object]) -> str:
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a JSON string is a valid TOML basic string
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


# --- enrolment -------------------------------------------------------------------------------------------


def enrol(
    token_text: str,
    directory: Path,
    *,
    kind: str,
    controller_url: str | None = None,
    name: str | None = None,
    machine_id: str | None = None,
    force: bool = False,
    timeout: float = TIMEOUT_S,
    clock: Callable[[], datetime] = timefmt.now,
) -> Enrolled:
    """Enrol this device: make its keys here, send CSR and public key over pinned HTTPS, write agent.toml."""
    try:
        token = enrolment.parse_token(token_text)
    except enrolment.TokenError as err:
        raise EnrolError(str(err)) from err
    url = controller_url or token.controller_url
    if not url:
        raise EnrolError("the token names no controller: pass --controller https://HOST:PORT")
    _split_url(url)
    if kind not in enrolment.KINDS:
        raise EnrolError(f"kind must be one of {', '.join(enrolment.KINDS)}")
    config_path = directory / CONFIG_FILE
    if config_path.exists() and not force:
        raise EnrolError(f"{config_path} exists: this directory holds an enrolled agent (use --force to replace it)")
    machine = machine_id if machine_id is not None else read_machine_id()

    ca_pem = fetch_ca_untrusted(url, timeout=timeout)
    ca = check_pin(ca_pem, token.ca_sha256)
    ctx = pinned_context(ca_pem)

    private_dir(directory)
    tls_key = new_tls_key()
    signing_key = signing.generate_key()
    # On disk before anything is sent: a crash after the controller said yes must not lose the keys.
    write_identity(directory / TLS_FILE, tls_key)
    write_atomically(directory / SIGNING_KEY, signing.private_key_pem(signing_key), mode=0o600)
    public_pem = signing.public_key_pem(signing_key.public_key())
    write_atomically(directory / SIGNING_PUB, public_pem, mode=0o600)

    request = enrolment.EnrolRequest(
        token=token.secret_text,
        kind=kind,  # type: ignore[arg-type]
        name=name,
        machine_id_sha256=enrolment.machine_id_digest(machine),
        csr=csr_pem(tls_key, name or "enrolling"),
        signing_public_key=public_pem.decode(),
        issued_at=timefmt.fmt(clock()),
    )
    raw = _post(url, enrolment.ENROL_PATH, ctx, enrolment.seal("enrol", signing_key, request), timeout)
    try:
        answer = enrolment.EnrolAnswer.model_validate_json(raw)
    except ValidationError as err:
        raise EnrolError("the controller's answer is not an enrolment answer") from err
    try:
        site_ca = x509.load_pem_x509_certificate(answer.ca_certificate.encode())
        signing.load_public_key_pem(answer.controller_public_key.encode())
    except ValueError as err:
        raise EnrolError("the controller's answer holds an unreadable CA or key") from err
    leaf, chain = check_issued(answer.certificate_chain, tls_key, site_ca)

    write_identity(directory / TLS_FILE, tls_key, chain)
    write_atomically(directory / CA_FILE, answer.ca_certificate.encode(), mode=0o644)
    write_atomically(directory / CONTROLLER_PUB, answer.controller_public_key.encode(), mode=0o644)
    controller_ca = None
    if site_ca != ca:
        write_atomically(directory / CONTROLLER_CA_FILE, ca_pem, mode=0o644)
        controller_ca = CONTROLLER_CA_FILE
    values: dict[str, object] = {
        "agent_id": answer.agent_id,
        "broker_host": answer.broker_host,
        "broker_port": answer.broker_port,
        "ca_cert": CA_FILE,
        "tls_cert": TLS_FILE,
        "tls_key": TLS_FILE,
        "signing_key": SIGNING_KEY,
        "controller_public_key": CONTROLLER_PUB,
        "state_dir": "state",
        "controller_url": answer.controller_url or url,
        "controller_ca_cert": controller_ca,
    }
    header = f"# Written by `sekisho-agent enrol` ({answer.kind}); certificates renew themselves via controller_url.\n"
    write_atomically(config_path, (header + _toml(values)).encode(), mode=0o600)
    return Enrolled(
        agent_id=answer.agent_id,
        kind=answer.kind,
        directory=directory,
        config_path=config_path,
        not_after=leaf.not_valid_after_utc,
    )


# --- renewal ---------------------------------------------------------------------------------------------


def request_renewal(
    *,
    agent_id: str,
    controller_url: str,
    controller_ca: Path,
    site_ca: Path,
    signing_key: Ed25519PrivateKey,
    current_chain_pem: bytes,
    now: datetime,
    timeout: float = TIMEOUT_S,
) -> tuple[ec.EllipticCurvePrivateKey, bytes, x509.Certificate]:
    """Ask the controller for a certificate for a new TLS key; return (key, chain PEM, leaf). EnrolError if not."""
    current = x509.load_pem_x509_certificates(current_chain_pem)[0]
    key = new_tls_key()
    request = enrolment.RenewRequest(
        agent_id=agent_id,
        csr=csr_pem(key, agent_id),
        current_certificate=current.public_bytes(serialization.Encoding.PEM).decode(),
        issued_at=timefmt.fmt(now),
    )
    ctx = pinned_context(controller_ca.read_bytes())
    raw = _post(controller_url, enrolment.RENEW_PATH, ctx, enrolment.seal("renew", signing_key, request), timeout)
    try:
        answer = enrolment.RenewAnswer.model_validate_json(raw)
    except ValidationError as err:
        raise EnrolError("the controller's answer is not a renewal answer") from err
    leaf, chain = check_issued(answer.certificate_chain, key, x509.load_pem_x509_certificate(site_ca.read_bytes()))
    return key, chain, leaf
