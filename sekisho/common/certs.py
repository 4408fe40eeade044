"""The one leaf-certificate builder: the installer's PKI (deploy/pki.py) and the controller's issuing sub-CA
(controller/fleet/issuing.py) both issue through it, so every certificate the product signs has the same
profile whoever signs it.

Profile: subject O=sekisho, CN=<name>; not a CA; digitalSignature only; a single extended key usage (OpenSSL
then refuses a broker's certificate as a client's and a client's as a server's); subject and authority key
identifiers; an optional subjectAltName; SHA-256; valid from a few minutes back (clocks of freshly booted
devices run a little behind) to the requested end, never past the issuer's own.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# A device whose clock is a little behind must still accept a certificate issued a moment ago.
BACKDATE: Final = dt.timedelta(minutes=5)
ORGANIZATION: Final = "sekisho"


def subject_name(common_name: str) -> x509.Name:
    """Return the subject every sekisho certificate carries: O=sekisho, CN=common_name."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def build_leaf(
    *,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
    not_after: dt.datetime,
    san: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    """Sign a leaf certificate for public_key (the profile above), ending at not_after or the issuer's end."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(not_after, issuer_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())
