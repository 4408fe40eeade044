"""A small PKI for the MQTT transport: two CAs, the broker, the controller and one identity per agent.

Layout of a PKI directory::

    ca.crt, ca.key                         site CA (ECDSA P-256): the broker's and the agents' certificates
    controller-ca/ca.crt, ca.key           controller CA: the controller's client certificate only
    broker/tls.crt, broker/tls.key         server certificate (serverAuth), from the site CA
    controller/tls.crt, controller/tls.key client certificate, CN=controller (clientAuth), from the controller CA
    controller/signing.key, signing.pub    Ed25519: signs acks, policy bundles and commands
    api/tls.crt, api/tls.key               the controller API's HTTPS certificate (serverAuth), from the site CA
    issuing-ca/ca.crt, ca.key              optional issuing sub-CA (from the site CA): the controller signs
                                           enrolled agents' certificates with it, so ca.key can stay offline
    agents/NAME/tls.crt, tls.key           client certificate, CN=NAME (clientAuth)
    agents/NAME/signing.key, signing.pub   Ed25519: signs the agent's events
    agents/NAME/ca.crt                     copy, so an agent's directory is all it needs
    agents/NAME/controller-signing.pub     copy, to verify what the controller sends

The broker has one listener per CA (deploy/broker.py). On the agents' listener, which trusts only the site
CA, the certificate's CN becomes the MQTT username *and* the client id, and the ACL confines each
username to its own topics: the CN *is* the identity. The controllers' listener trusts only the controller
CA, so no agent certificate gets in where the controller's client ids live. Client ids share one namespace
across listeners, so agent names starting with ``controller`` (the prefix of every controller client id)
are refused, as are the other names that the ACL treats specially.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sekisho.common.certs import BACKDATE, build_leaf, subject_name
from sekisho.common.files import write_atomically
from sekisho.protocol import errors, signing, topics

CA_DAYS = 3650
# Leaf certificates are re-issued with `issue-agent --force`; about two years keeps rotation a routine
# chore rather than a once-a-decade surprise.
LEAF_DAYS = 825
# Tolerates an agent whose clock is a little behind the machine that issued its certificate.

CONTROLLER_CN = "controller"
BROKER_CN = "sekisho-broker"
API_CN = "sekisho-controller-api"
CONTROLLER_CA_DIR = "controller-ca"
ISSUING_CA_DIR = "issuing-ca"
ISSUING_CA_NAME = "sekisho issuing CA"
# An issuing CA lives on the API host, where it is more exposed than the offline site CA: it is replaced
# more often (re-run `sekisho pki issuing-ca --force`; agents move to the new one as they renew).
ISSUING_CA_DAYS = 2 * 365
CA_NAME = "sekisho CA"
CONTROLLER_CA_NAME = "sekisho controller CA"
# Site brokers bridge to the central broker with a certificate of their own CA, trusted only by the central
# broker's sites listener: neither an agent's nor a controller's certificate reaches that listener, and no
# site certificate reaches theirs (deploy/broker.py).
SITE_CA_DIR = "site-ca"
SITE_CA_NAME = "sekisho site bridge CA"
SITES_DIR = "sites"
# A site's CN is "site.NAME". It is the bridge's username and client id on the central broker; the dot
# keeps it out of the agents' names (no dot allowed) and the controllers' client ids ("controller...").
SITE_CN_PREFIX = "site."
# A certificate CN becomes the broker username: an agent called "controller" would get the controller's
# ACL, so these names are refused for agents.
RESERVED_NAMES = frozenset({CONTROLLER_CN, BROKER_CN, "broker", "ca"})
# An agent's CN is also its MQTT client id, and client ids are one namespace for the whole broker: every
# controller client id starts with this (controller.mqtt.make_client), so no agent name may.
RESERVED_PREFIX = topics.CONTROLLER_CLIENT_PREFIX
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PkiError(Exception):
    """A PKI operation that was refused (existing material, bad name, missing CA)."""


@dataclass(frozen=True)
class CaPaths:
    """Where a CA's certificate and private key live."""

    directory: Path
    cert: Path
    key: Path

    @classmethod
    def at(cls, directory: Path) -> CaPaths:
        """Return the CA layout inside a directory (nothing is read or written)."""
        return cls(directory=directory, cert=directory / "ca.crt", key=directory / "ca.key")


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate and its private key."""

    common_name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class PkiPaths:
    """Every file of a PKI directory except the agents'."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    controller_ca_cert: Path
    controller_ca_key: Path
    broker_cert: Path
    broker_key: Path
    controller_cert: Path
    controller_key: Path
    controller_signing_key: Path
    controller_signing_pub: Path

    @classmethod
    def at(cls, directory: Path) -> PkiPaths:
        """Return the PKI layout inside a directory (nothing is read or written)."""
        ca = CaPaths.at(directory)
        controller_ca = CaPaths.at(directory / CONTROLLER_CA_DIR)
        return cls(
            directory=directory,
            ca_cert=ca.cert,
            ca_key=ca.key,
            controller_ca_cert=controller_ca.cert,
            controller_ca_key=controller_ca.key,
            broker_cert=directory / "broker" / "tls.crt",
            broker_key=directory / "broker" / "tls.key",
            controller_cert=directory / "controller" / "tls.crt",
            controller_key=directory / "controller" / "tls.key",
            controller_signing_key=directory / "controller" / "signing.key",
            controller_signing_pub=directory / "controller" / "signing.pub",
        )


@dataclass(frozen=True)
class AgentCredentials:
    """Everything one agent needs, all inside its own directory."""

    name: str
    directory: Path
    tls_cert: Path
    tls_key: Path
    signing_key: Path
    signing_pub: Path
    ca_cert: Path
    controller_signing_pub: Path

    @classmethod
    def at(cls, pki_dir: Path, name: str) -> AgentCredentials:
        """Return the layout of an agent's directory inside a PKI (nothing is read or written)."""
        directory = pki_dir / "agents" / check_agent_name(name)
        return cls(
            name=name,
            directory=directory,
            tls_cert=directory / "tls.crt",
            tls_key=directory / "tls.key",
            signing_key=directory / "signing.key",
            signing_pub=directory / "signing.pub",
            ca_cert=directory / "ca.crt",
            controller_signing_pub=directory / "controller-signing.pub",
        )


@dataclass(frozen=True)
class SiteCredentials:
    """A site broker's bridge identity: its certificate, key, and the CA that signs the central broker's."""

    name: str
    common_name: str
    directory: Path
    tls_cert: Path
    tls_key: Path
    ca_cert: Path

    @classmethod
    def at(cls, pki_dir: Path, name: str) -> SiteCredentials:
        """Return the layout of a site's directory inside a PKI (nothing is read or written)."""
        directory = pki_dir / SITES_DIR / check_site_name(name)
        return cls(
            name=name,
            common_name=SITE_CN_PREFIX + name,
            directory=directory,
            tls_cert=directory / "tls.crt",
            tls_key=directory / "tls.key",
            ca_cert=directory / "ca.crt",
        )


def check_site_name(name: str) -> str:
    """Return the name if it can name a site (same characters as an agent id), else raise PkiError."""
    try:
        topics.check_agent_id(name)
    except errors.Rejected as err:
        raise PkiError(f"invalid site name {name!r}: lower-case letters, digits, '-', '_'") from err
    return name


def check_agent_name(name: str) -> str:
    """Return the name if it can be an agent's id and certificate CN, else raise PkiError."""
    try:
        topics.check_agent_id(name)
    except errors.Rejected as err:
        raise PkiError(f"invalid agent name {name!r}: lower-case letters, digits, '-', '_'") from err
    if name in RESERVED_NAMES:
        raise PkiError(f"agent name {name!r} is reserved")
    if name.startswith(RESERVED_PREFIX):
        raise PkiError(
            f"agent name {name!r} is reserved: names starting with {RESERVED_PREFIX!r} are the controllers' "
            "MQTT client ids"
        )
    return name


# --- files -----------------------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    # Only directories created here get 0700; an existing directory chosen by the user keeps its mode.
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write a file atomically with the given mode, replacing any previous one."""
    _make_dir(path.parent)
    write_atomically(path, data, mode=mode)


def write_private(path: Path, data: bytes) -> None:
    """Write private key material with mode 0600."""
    _write_file(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key with mode 0644 (still inside a 0700 directory)."""
    _write_file(path, data, 0o644)


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise PkiError(f"refusing to overwrite {', '.join(existing)} (use force)")


# --- certificates ----------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(ca: CaPaths, ca_key_path: Path | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key_path = ca_key_path or ca.key
    if not ca.cert.exists() or not key_path.exists():
        raise PkiError(f"no CA at {ca.directory} (run init first)")
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an ECDSA key")
    if cert.public_key() != key.public_key():
        raise PkiError(f"{key_path} does not belong to {ca.cert}")
    return cert, key


def _general_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Validate host names and addresses and turn them into SAN entries (an empty list for no hosts)."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host.isascii() or len(host) > 253 or not all(_HOSTNAME_LABEL.match(p) for p in host.split(".")):
                raise PkiError(f"invalid host name {host!r}") from None
            names.append(x509.DNSName(host.lower()))
    return names


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    # cryptography 51 refuses an empty SubjectAlternativeName, and RFC 5280 (4.2.1.6) wants at least one
    # name in it: a certificate without hosts must leave the extension out, not carry an empty one.
    names = _general_names(hosts)
    if not names:
        raise PkiError("a SubjectAlternativeName needs at least one host")
    return x509.SubjectAlternativeName(names)


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _ec_key()
    now = _now()
    cert = build_leaf(
        issuer_cert=ca_cert,
        issuer_key=ca_key,
        public_key=key.public_key(),
        common_name=common_name,
        usage=usage,
        now=now,
        not_after=now + dt.timedelta(days=LEAF_DAYS),
        san=san,
    )
    return cert, key


# --- public API --------------------------------------------------------------------------------------


def init_ca(directory: Path, *, force: bool = False, common_name: str = CA_NAME, path_length: int = 0) -> CaPaths:
    """Create a self-signed CA (ca.crt, ca.key) in a directory; refuse to replace one unless force.

    path_length 0: the CA signs leaf certificates only; 1: it may also sign one issuing sub-CA.
    """
    ca = CaPaths.at(directory)
    _refuse_existing([ca.cert, ca.key], force)
    _make_dir(directory)
    key = _ec_key()
    now = _now()
    name = subject_name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a ca.crt without its key would look like a usable CA to the next run.
    write_private(ca.key, _key_pem(key))
    write_public(ca.cert, _cert_pem(cert))
    return ca


def issue_client_cert(
    directory: Path,
    common_name: str,
    out_dir: Path,
    ca_key_path: Path | None = None,
    *,
    force: bool = False,
) -> TlsIdentity:
    """Issue a clientAuth certificate (out_dir/tls.crt, tls.key) from the CA in `directory`."""
    ca_cert, ca_key = _load_ca(CaPaths.at(directory), ca_key_path)
    ident = TlsIdentity(common_name=common_name, cert=out_dir / "tls.crt", key=out_dir / "tls.key")
    _refuse_existing([ident.cert, ident.key], force)
    cert, key = _issue(ca_cert, ca_key, common_name, ExtendedKeyUsageOID.CLIENT_AUTH)
    write_private(ident.key, _key_pem(key))
    write_public(ident.cert, _cert_pem(cert))
    return ident


def issue_server_cert(
    directory: Path,
    hosts: Sequence[str],
    out_dir: Path,
    ca_key_path: Path | None = None,
    *,
    force: bool = False,
    common_name: str = BROKER_CN,
) -> TlsIdentity:
    """Issue a serverAuth certificate for the given host names and addresses."""
    ca_cert, ca_key = _load_ca(CaPaths.at(directory), ca_key_path)
    ident = TlsIdentity(common_name=common_name, cert=out_dir / "tls.crt", key=out_dir / "tls.key")
    _refuse_existing([ident.cert, ident.key], force)
    san = _san([*DEFAULT_HOSTS, *hosts])
    cert, key = _issue(ca_cert, ca_key, common_name, ExtendedKeyUsageOID.SERVER_AUTH, san)
    write_private(ident.key, _key_pem(key))
    write_public(ident.cert, _cert_pem(cert))
    return ident


def _write_signing_key(key_path: Path, pub_path: Path) -> None:
    key = signing.generate_key()
    write_private(key_path, signing.private_key_pem(key))
    write_public(pub_path, signing.public_key_pem(key.public_key()))


def _issue_controller_cert(paths: PkiPaths) -> TlsIdentity:
    return issue_client_cert(paths.controller_ca_cert.parent, CONTROLLER_CN, paths.controller_cert.parent, force=True)


def init_pki(directory: Path, *, hosts: Sequence[str] = (), force: bool = False) -> PkiPaths:
    """Create both CAs, the broker and controller material; refuse to replace an existing CA unless force.

    With force every file is regenerated: agents issued before then no longer chain to the CA and must
    be issued again.
    """
    paths = PkiPaths.at(directory)
    _refuse_existing([paths.ca_cert, paths.ca_key, paths.controller_ca_cert, paths.controller_ca_key], force)
    _general_names(hosts)  # validate before anything is written
    # The site CA may sign one issuing sub-CA (init_issuing_ca), so that its own key can stay offline; the
    # controller CA signs the controller's certificate only.
    init_ca(directory, force=force, path_length=1)
    init_ca(paths.controller_ca_cert.parent, force=True, common_name=CONTROLLER_CA_NAME)
    issue_server_cert(directory, hosts, paths.broker_cert.parent, force=True)
    _issue_controller_cert(paths)
    _write_signing_key(paths.controller_signing_key, paths.controller_signing_pub)
    _make_dir(directory / "agents")
    return paths


@dataclass(frozen=True)
class PkiUpgrade:
    """What :func:`upgrade_pki` did, and the agents whose names are now reserved."""

    paths: PkiPaths
    created_controller_ca: bool
    reissued_controller_cert: bool
    reserved_agents: tuple[str, ...]


def _issued_by(cert_path: Path, ca_path: Path) -> bool:
    try:
        load_cert(cert_path).verify_directly_issued_by(load_cert(ca_path))
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True


def upgrade_pki(directory: Path) -> PkiUpgrade:
    """Bring a PKI made before the controller CA existed up to date; a PKI already up to date is left alone.

    Adds the controller CA if it is missing and re-issues the controller's client certificate from it (same
    CN, new key; the controller's Ed25519 signing key is kept). The site CA, the broker's and the agents'
    certificates do not change. Also lists agents whose names are now reserved: they must be renamed.
    """
    paths = PkiPaths.at(directory)
    if not paths.ca_cert.exists():
        raise PkiError(f"no CA at {directory} (run init first)")
    created = False
    if not paths.controller_ca_cert.exists() or not paths.controller_ca_key.exists():
        _refuse_existing([paths.controller_ca_cert, paths.controller_ca_key], force=False)
        init_ca(paths.controller_ca_cert.parent, common_name=CONTROLLER_CA_NAME)
        created = True
    reissued = False
    if not _issued_by(paths.controller_cert, paths.controller_ca_cert):
        _issue_controller_cert(paths)
        reissued = True
    agents_dir = directory / "agents"
    names = sorted(p.name for p in agents_dir.iterdir() if p.is_dir()) if agents_dir.is_dir() else []
    reserved = tuple(n for n in names if n in RESERVED_NAMES or n.startswith(RESERVED_PREFIX))
    return PkiUpgrade(paths, created, reissued, reserved)


def issue_agent(
    directory: Path, name: str, *, force: bool = False, ca_key_path: Path | None = None
) -> AgentCredentials:
    """Issue an agent's certificate and signing key into agents/NAME; refuse if it exists unless force."""
    creds = AgentCredentials.at(directory, name)
    pki = PkiPaths.at(directory)
    if creds.directory.exists() and not force:
        raise PkiError(f"agent {name!r} already exists at {creds.directory} (use force)")
    if not pki.controller_signing_pub.exists():
        raise PkiError(f"no controller signing key in {directory} (run init first)")
    issue_client_cert(directory, name, creds.directory, ca_key_path, force=True)
    _write_signing_key(creds.signing_key, creds.signing_pub)
    write_public(creds.ca_cert, pki.ca_cert.read_bytes())
    write_public(creds.controller_signing_pub, pki.controller_signing_pub.read_bytes())
    return creds


def issue_site(directory: Path, name: str, *, force: bool = False, ca_key_path: Path | None = None) -> SiteCredentials:
    """Issue a site broker's bridge certificate (CN site.NAME) into sites/NAME, creating the site CA once.

    ca_key_path: the site bridge CA's key where it is kept offline (default: site-ca/ca.key).
    """
    creds = SiteCredentials.at(directory, name)
    paths = PkiPaths.at(directory)
    if creds.directory.exists() and not force:
        raise PkiError(f"site {name!r} already exists at {creds.directory} (use force)")
    if not paths.ca_cert.exists():
        raise PkiError(f"no CA at {directory} (run init first)")
    site_ca = CaPaths.at(directory / SITE_CA_DIR)
    if not site_ca.cert.exists():
        init_ca(site_ca.directory, common_name=SITE_CA_NAME)
    issue_client_cert(site_ca.directory, creds.common_name, creds.directory, ca_key_path, force=True)
    # The bridge checks the central broker's server certificate, which the (agents') site CA signs.
    write_public(creds.ca_cert, paths.ca_cert.read_bytes())
    return creds


def api_identity(directory: Path) -> TlsIdentity:
    """Return where the controller API's HTTPS certificate lives in a PKI (nothing is read or written)."""
    return TlsIdentity(common_name=API_CN, cert=directory / "api" / "tls.crt", key=directory / "api" / "tls.key")


def issue_api_cert(
    directory: Path, hosts: Sequence[str], *, force: bool = False, ca_key_path: Path | None = None
) -> TlsIdentity:
    """Issue the controller API's HTTPS certificate (api/tls.crt, tls.key) from the site CA.

    Devices pin the site CA by the fingerprint in their enrolment token, so the API's certificate must come
    from it (not from the issuing sub-CA: the device trusts exactly one CA, and one that signs no chain).
    """
    ident = api_identity(directory)
    return issue_server_cert(directory, hosts, ident.cert.parent, ca_key_path, force=force, common_name=API_CN)


def init_issuing_ca(
    directory: Path, *, force: bool = False, ca_key_path: Path | None = None, days: int = ISSUING_CA_DAYS
) -> CaPaths:
    """Create the issuing sub-CA (issuing-ca/ca.crt, ca.key), signed by the site CA.

    The controller signs enrolled agents' certificates with it and hands out the chain (leaf + this CA); the
    broker keeps trusting only the site CA. Copy issuing-ca/ to the API host, keep ca.key (the site CA's)
    offline. ca_key_path: the site CA's key where it is kept (e.g. removable media).
    """
    site = CaPaths.at(directory)
    issuing = CaPaths.at(directory / ISSUING_CA_DIR)
    _refuse_existing([issuing.cert, issuing.key], force)
    root_cert, root_key = _load_ca(site, ca_key_path)
    basic = root_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if basic.path_length == 0:
        raise PkiError(
            f"the site CA {site.cert} may not sign another CA (pathLen 0: made before issuing CAs existed); "
            "keep issuing from the site CA on the API host, or create a new PKI and re-enrol the agents"
        )
    _make_dir(issuing.directory)
    key = _ec_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject_name(ISSUING_CA_NAME))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), root_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    write_private(issuing.key, _key_pem(key))
    write_public(issuing.cert, _cert_pem(cert))
    return issuing


def load_cert(path: Path) -> x509.Certificate:
    """Load a PEM certificate."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def cert_fingerprint(path: Path) -> str:
    """Return the SHA-256 fingerprint of a PEM certificate as colon-separated hex."""
    return load_cert(path).fingerprint(hashes.SHA256()).hex(":")
