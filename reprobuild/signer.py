"""RSA signing keys for verity signatures and Secure Boot: one small interface, two key sources.

A :class:`Signer` has a ``certificate`` and ``sign(data)``: RSA PKCS#1 v1.5 with SHA-256 over
``data`` (deterministic, so the same key gives the same bytes wherever it lives). The key is a
PEM file (:class:`FileSigner`) or a key in a PKCS#11 token (``pkcs11:`` URI,
:class:`reprobuild.pkcs11key.Pkcs11Signer`), whose private half never leaves the token.

``identity`` is what a cache key records of a key: for a file the sha256 of its bytes, for a
token key the sha256 of the certificate and the URI without its PIN source. A PIN is never part
of an identity, a description or a message.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from reprobuild.errors import BuildError
from reprobuild.pkcs11uri import KeySource, is_uri, parse_uri

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

# cryptography's X.509 code (and reprobuild.x509 with it) is imported where a signer is made, not
# with this module: `reprobuild lock` reads only the key-file helpers below, and importing it costs
# ~12 ms of a warm lock's ~0.3 s.


class SigningConfig(Protocol):
    """The ``[Signing]`` settings these helpers read (config.SigningConfig has them)."""

    lock_key: KeySource | None
    verity_key: KeySource | None
    verity_certificate: Path | None
    secure_boot_key: KeySource | None
    secure_boot_certificate: Path | None


class Signer(Protocol):
    certificate: x509.Certificate

    @property
    def description(self) -> str: ...  # a path or a URI, for messages

    @property
    def identity(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class FileSigner:
    key: rsa.RSAPrivateKey = field(repr=False)
    certificate: x509.Certificate
    description: str
    identity: str

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def file_signer(key_pem: bytes | rsa.RSAPrivateKey, cert: bytes | x509.Certificate,
                description: str = "key") -> FileSigner:  # fmt: skip
    """A signer from a PEM/DER key (bytes, or a loaded key) and its certificate (checked to match)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from reprobuild.x509 import key_matches_certificate, load_certificate, load_key

    if not isinstance(key_pem, bytes):
        key_pem = key_pem.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    key = load_key(key_pem)
    certificate = cert if isinstance(cert, x509.Certificate) else load_certificate(cert)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BuildError(f"{description}: signing needs an RSA key (PKCS#1 v1.5 is deterministic; "
                         f"this is {type(key).__name__})")  # fmt: skip
    if not key_matches_certificate(key, certificate):
        raise BuildError(f"{description} is not the key of its certificate")
    return FileSigner(key, certificate, description, hashlib.sha256(key_pem).hexdigest())


def open_signer(source: KeySource, certificate: Path, environ: Mapping[str, str]) -> Signer:
    """The signer for a ``VerityKey=`` / ``SecureBootKey=`` value and its certificate file."""
    from reprobuild.x509 import CertificateInvalid, load_certificate

    try:
        cert = load_certificate(Path(certificate).read_bytes())
    except OSError as e:
        raise BuildError(f"{certificate}: cannot read the certificate ({e.strerror})") from None
    except CertificateInvalid as e:
        raise BuildError(f"{certificate}: {e.message}") from None
    if is_uri(source):
        # python-pkcs11 is loaded only when a token key is used (it costs ~0.2 s at start-up).
        from reprobuild.pkcs11key import open_pkcs11_signer

        return open_pkcs11_signer(str(source), cert, environ)
    try:
        key_pem = Path(source).read_bytes()
    except OSError as e:
        raise BuildError(f"{source}: cannot read the key ({e.strerror})") from None
    try:
        return file_signer(key_pem, cert, str(source))
    except CertificateInvalid:
        raise BuildError(f"{source}: not a PEM or DER private key") from None


def key_identity(source: KeySource | None) -> str | None:
    """What a cache key records of a key source without opening it: sha256 of a key file's bytes,
    or the URI without its PIN source (the certificate is recorded beside it)."""
    if source is None:
        return None
    if is_uri(source):
        return parse_uri(str(source)).identity()
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError as e:
        raise BuildError(f"{source}: {e.strerror}") from None


def key_file_warning(source: KeySource | None) -> str | None:
    """A warning when a private key file (or a token key's PIN file) can be read by its group or
    by others, else None."""
    if source is None or str(source).startswith("agent:"):
        return None
    what, path = "private key", source
    if is_uri(source):
        pin_source = parse_uri(str(source)).pin_source
        if pin_source is None or pin_source.startswith("env:"):
            return None
        what, path = "PIN file", pin_source.removeprefix("file:")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return (f"warning: {what} {path} is readable by its group or others (mode {mode:04o}): chmod 600 it"
                + (", or keep the key in a token or agent" if what == "private key" else ""))
    return None


def check_token_keys(signing: SigningConfig, environ: Mapping[str, str]) -> None:
    """Log in to each configured token key once and check it against its certificate, so that a
    wrong PIN or a missing token fails before the build starts rather than when it signs."""
    for source, certificate in ((signing.verity_key, signing.verity_certificate),
                                (signing.secure_boot_key, signing.secure_boot_certificate)):  # fmt: skip
        if source is not None and is_uri(source) and certificate is not None:
            open_signer(source, certificate, environ)


def key_file_warnings(signing: SigningConfig) -> list[str]:
    """One warning per configured private key file that its group or others can read."""
    sources = dict.fromkeys(s for s in (signing.lock_key, signing.verity_key, signing.secure_boot_key) if s)
    return [w for w in map(key_file_warning, sources) if w]
