"""The CA the controller signs enrolled agents' certificates with: the site CA, or an issuing sub-CA under it.

Only the public key of a CSR is used: the subject, extensions and lifetime come from here, so a device can
ask for nothing but a client certificate for the name its token allows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sekisho.common.certs import build_leaf

# Curves a device's TLS key may use (the broker and Python's ssl handle both).
CURVES = ("secp256r1", "secp384r1")


class IssuingError(Exception):
    """The issuing CA is missing or unusable, or a CSR cannot be signed."""


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class IssuingCa:
    """The issuing CA's certificate and key, the site CA above it, and the chain agents present."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    root: x509.Certificate

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, root_path: Path) -> IssuingCa:
        """Load the issuing CA and check that it is a CA, that the key is its own and that it chains to the root."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            root = x509.load_pem_x509_certificate(root_path.read_bytes())
        except (OSError, ValueError) as err:
            raise IssuingError(f"cannot load the issuing CA ({cert_path}, {key_path}, {root_path}): {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise IssuingError(f"{key_path} is not the ECDSA key of {cert_path}")
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise IssuingError(f"{cert_path} is not a CA certificate")
        if cert != root:
            try:
                cert.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature) as err:
                raise IssuingError(f"{cert_path} was not issued by the site CA {root_path}") from err
        return cls(cert=cert, key=key, root=root)

    @property
    def chain(self) -> list[x509.Certificate]:
        """The intermediates an agent presents after its own certificate (none when the site CA issues)."""
        return [] if self.cert == self.root else [self.cert]

    @property
    def sha256(self) -> str:
        """The issuing CA's SHA-256 fingerprint (hex)."""
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def chain_pem(self, leaf: x509.Certificate) -> str:
        """Return the leaf and its intermediates as one PEM text."""
        return "".join(_pem(c) for c in (leaf, *self.chain))

    def root_pem(self) -> str:
        """Return the site CA as PEM."""
        return _pem(self.root)

    def sign(
        self, csr: x509.CertificateSigningRequest, common_name: str, now: dt.datetime, days: int
    ) -> x509.Certificate:
        """Issue a clientAuth certificate for common_name to the CSR's key, valid `days` (within the CA's life)."""
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
            raise IssuingError(f"the CSR's key must be ECDSA on {' or '.join(CURVES)}")
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        if not_after <= now:
            raise IssuingError("the issuing CA has expired: create a new one (sekisho pki issuing-ca --force)")
        # Client only: the broker takes the CN as the agent's identity; it must never serve TLS.
        return build_leaf(
            issuer_cert=self.cert,
            issuer_key=self.key,
            public_key=public,
            common_name=common_name,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            now=now,
            not_after=not_after,
        )


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature (proof that the device holds the key), else IssuingError."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as err:
        raise IssuingError("the CSR is not a PEM certificate signing request") from err
    if not csr.is_signature_valid:
        raise IssuingError("the CSR's signature does not verify")
    return csr
