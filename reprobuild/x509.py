"""Self-signed RSA certificates for verity signatures and Secure Boot, reproducible from the key.

Only key generation uses randomness. Everything in the certificate is a function of the key and
the common name: fixed validity (not the clock), serial number derived from the public key, and
an RSA PKCS#1 v1.5 signature (deterministic). Re-issuing a certificate for the same key and name
therefore gives the same bytes.
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reprobuild.errors import FormatError

# Reproducibility: validity is fixed, never taken from the clock. 9999-12-31 23:59:59 is RFC 5280's
# "no well-defined expiration date" value (4.1.2.5); UEFI firmware ignores validity anyway.
NOT_BEFORE = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class CertificateInvalid(FormatError):
    """A key or certificate could not be parsed."""


def _public_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip


def serial_for_key(key: rsa.RSAPrivateKey) -> int:
    """Positive 159-bit serial from sha256(SubjectPublicKeyInfo): unique per key, no clock or RNG."""
    return int.from_bytes(hashlib.sha256(_public_der(key)).digest()[:20], "big") >> 1 or 1


def make_certificate(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    """Self-signed certificate for ``key``; deterministic for a given key and name.

    Extensions follow ``openssl req -x509`` (v3_ca: subject/authority key id, CA:TRUE) plus key
    usage digitalSignature/keyCertSign and extended key usage codeSigning, which suits PKCS#7
    verity signatures (``openssl smime -verify -purpose any``) and Secure Boot db/sbsign.
    """
    if not common_name:
        raise ValueError("the certificate needs a common name")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial_for_key(key))
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    )
    # RSA PKCS#1 v1.5 with SHA-256 is deterministic: the signature depends only on key and TBS bytes.
    return builder.sign(key, hashes.SHA256())


def generate_rsa_key_and_certificate(common_name: str, bits: int = 2048) -> tuple[bytes, bytes]:
    """New RSA key (PKCS#8 PEM, unencrypted) and its self-signed certificate (PEM).

    Cost: RSA key generation, ~0.1 s for 2048 bits, a few seconds for 4096.
    """
    if bits < 2048:
        raise ValueError("RSA keys shorter than 2048 bits are not accepted")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    cert = make_certificate(key, common_name)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_key(data: bytes, password: bytes | None = None) -> PrivateKeyTypes:
    """Load a PEM (or DER) private key; errors become CertificateInvalid."""
    try:
        if data.lstrip().startswith(b"-----"):
            return serialization.load_pem_private_key(data, password)
        return serialization.load_der_private_key(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateInvalid(f"cannot load private key: {e}") from e


def load_certificate(data: bytes) -> x509.Certificate:
    """Load a PEM or DER X.509 certificate; errors become CertificateInvalid."""
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise CertificateInvalid(f"cannot load certificate: {e}") from e


def certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex sha256 of the DER certificate (repart's ``certificateFingerprint``)."""
    return hashlib.sha256(certificate_der(cert)).hexdigest()


def key_matches_certificate(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """True if ``cert`` carries the public half of ``key``."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)
