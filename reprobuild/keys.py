"""ed25519 keys and detached signatures for lockfiles.

A signature file (``reprobuild.lock.sig``) is a small JSON document naming the algorithm, the
key id (first 16 hex digits of the sha256 of the raw public key) and the base64 signature over
the exact bytes of the lock. ed25519 signatures are deterministic, so re-signing the same lock
with the same key gives the same file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from reprobuild.errors import LockError, ReprobuildError, VerificationFailed


class KeyFileError(ReprobuildError):
    """A key file is missing, unreadable or of the wrong kind."""


@dataclass(frozen=True)
class Signature:
    algorithm: str
    key_id: str
    signature: bytes

    def to_bytes(self) -> bytes:
        data = {"algorithm": self.algorithm, "key_id": self.key_id,
                "signature": base64.b64encode(self.signature).decode()}
        return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, origin: str) -> Signature:
        try:
            raw = json.loads(data)
            return cls(raw["algorithm"], raw["key_id"], base64.b64decode(raw["signature"], validate=True))
        except (ValueError, KeyError, TypeError) as e:
            raise LockError(f"{origin}: malformed signature file ({e})") from None


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(prefix: Path) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (PKCS#8 PEM, mode 0600) and ``PREFIX.pub`` (SubjectPublicKeyInfo PEM)."""
    private = Ed25519PrivateKey.generate()
    key_path = prefix.with_name(prefix.name + ".key")
    pub_path = prefix.with_name(prefix.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; not overwriting a key")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file", hint="create one with reprobuild keygen --out PREFIX") from None
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: lock signing needs an ed25519 key, this is {type(key).__name__}")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such public key file") from None
    if b"-----BEGIN CERTIFICATE-----" in data:
        raise KeyFileError(f"{path}: this is an X.509 certificate, not the lock's ed25519 public key",
                           hint="--trusted-key takes the .pub that reprobuild keygen wrote beside the lock key; "
                                "certificates (verity, Secure Boot) go to --certificate")  # fmt: skip
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise KeyFileError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: expected an ed25519 public key, got {type(key).__name__}")
    return key


def sign(data: bytes, private_key: Ed25519PrivateKey) -> Signature:
    return Signature("ed25519", key_id(private_key.public_key()), private_key.sign(data))


def verify(data: bytes, signature: Signature, public_key: Ed25519PublicKey) -> None:
    """Raise :class:`VerificationFailed` unless ``signature`` is ``public_key``'s over ``data``."""
    if signature.algorithm != "ed25519":
        raise VerificationFailed(f"unsupported signature algorithm {signature.algorithm!r}")
    expected = key_id(public_key)
    if signature.key_id != expected:
        raise VerificationFailed(
            f"the lock is signed by key {signature.key_id}, not by the trusted key {expected}")
    try:
        public_key.verify(signature.signature, data)
    except InvalidSignature:
        raise VerificationFailed(
            f"the lock signature by key {signature.key_id} does not match the lock's bytes "
            "(the lock was changed after signing)") from None
