"""Lock-signing keys (ed25519, from a file or an ssh-agent) and lock signatures in the SSH format.

``reprobuild.lock.sig`` is an SSH signature (OpenSSH ``PROTOCOL.sshsig``, see
:mod:`reprobuild.sshsig`) over the exact bytes of the lock in the namespace ``reprobuild-lock``,
so ``ssh-keygen -Y verify -n reprobuild-lock`` checks it with no reprobuild installed. ed25519 is
deterministic: re-signing an unchanged lock with the same key gives the same file.

Signing keys are an OpenSSH private key file (what ``reprobuild keygen`` and ``ssh-keygen -t
ed25519`` write; unencrypted PKCS#8 PEM from older reprobuild versions is read too), or
``agent:`` / ``agent:COMMENT`` / ``agent:SHA256:…``: a key held by the ssh-agent at
``SSH_AUTH_SOCK``, which never hands out the private key.

Trusted keys (``--trusted-key``) are an allowed_signers file (ssh-keygen(1)), an OpenSSH public
key line (``.pub``) or a PEM public key. Signatures in reprobuild's first format (a JSON file with
a raw ed25519 signature) still verify; ``reprobuild lock --resign`` rewrites them as SSH signatures.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from reprobuild import sshsig
from reprobuild.errors import LockError, ReprobuildError, VerificationFailed
from reprobuild.fileio import ReadRefused, read_bounded
from reprobuild.sshagent import Agent, select_key

LOCK_NAMESPACE = "reprobuild-lock"
# Key, allowed_signers and signature files are a few KiB; anything larger is not one of them
# (and a FIFO or a device is refused before it is read).
MAX_KEY_FILE_BYTES = 1 << 20


def read_key_file(path: Path, what: str = "key file") -> bytes:
    """The bytes of a key, trusted-keys or signature file, bounded; KeyFileError if it cannot be
    one (missing, not a regular file, too large, unreadable)."""
    try:
        return read_bounded(Path(path), MAX_KEY_FILE_BYTES)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {what}") from None
    except ReadRefused as e:
        raise KeyFileError(f"{path}: not a {what} ({e.reason})") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the {what} ({e.strerror})") from None
AGENT_PREFIX = "agent:"


class KeyFileError(ReprobuildError):
    """A key file is missing, unreadable or of the wrong kind."""


# -- signing keys --------------------------------------------------------------------------------


class LockSigner(Protocol):
    """An ed25519 key that signs: ``public_key`` is its SSH key blob, ``sign`` the raw signature."""

    public_key: bytes
    description: str  # for messages: a path or "ssh-agent key SHA256:…"; never key material

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class FileLockSigner:
    key: Ed25519PrivateKey
    description: str

    @property
    def public_key(self) -> bytes:
        return sshsig.public_key_blob(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


@dataclass(frozen=True)
class AgentLockSigner:
    socket_path: str
    public_key: bytes
    description: str

    def sign(self, data: bytes) -> bytes:
        with Agent(self.socket_path) as agent:
            blob = agent.sign(self.public_key, data)
        signature = sshsig.SshSignature(self.public_key, LOCK_NAMESPACE, sshsig.HASH_ALGORITHM, blob)
        try:
            raw = signature.raw_signature()
        except sshsig.SshFormatError as e:
            raise KeyFileError(f"{self.description}: the agent's signature is unusable ({e})") from None
        if len(raw) != 64:
            raise KeyFileError(f"{self.description}: the agent's signature is not an ed25519 signature")
        return raw


def load_private_key(path: Path) -> Ed25519PrivateKey:
    if not Path(path).exists():
        raise KeyFileError(f"{path}: no such key file", hint="create one with reprobuild keygen --out PREFIX")
    data = read_key_file(path)
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: the key is encrypted", hint="add it to ssh-agent (ssh-add) and sign with "
                           "--sign-key agent:") from None  # fmt: skip
    except ValueError:
        raise KeyFileError(f"{path}: not an OpenSSH or PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: lock signing needs an ed25519 key, this is {type(key).__name__}")
    return key


def open_lock_signer(source: str | Path, environ: Mapping[str, str]) -> LockSigner:
    """The signer for a ``LockKey=`` / ``--sign-key`` value: a key file, or ``agent:[NAME]``."""
    text = str(source)
    if not text.startswith(AGENT_PREFIX):
        return FileLockSigner(load_private_key(Path(source)), str(source))
    socket_path = environ.get("SSH_AUTH_SOCK")
    if not socket_path:
        raise KeyFileError(f"{text}: SSH_AUTH_SOCK is not set, so there is no ssh-agent to ask",
                           hint="start one (eval $(ssh-agent)) and add the key with ssh-add")
    with Agent(socket_path) as agent:
        key = select_key(agent.identities(), text[len(AGENT_PREFIX):], sshsig.KEY_TYPE.encode())
    return AgentLockSigner(socket_path, key.blob, f"ssh-agent key {key.fingerprint} ({key.comment})")


def provenance_signer(source: str | Path | None, environ: Mapping[str, str],
                      what: str = "the provenance statement") -> tuple[LockSigner | None, str | None]:
    """The lock key for signing what a build writes (its provenance, a lock it re-made), or (None,
    a note why ``what`` stays unsigned): a build does not fail for want of the lock key, which
    often lives elsewhere."""
    if not source:
        return None, None
    if not str(source).startswith(AGENT_PREFIX) and not Path(source).exists():
        return None, f"note: {source} not found: {what} is not signed"
    try:
        return open_lock_signer(source, environ), None
    except ReprobuildError as e:
        return None, f"note: {what} is not signed: {e.message}"


def sign_lock(data: bytes, signer: LockSigner) -> bytes:
    """The armored SSH signature over ``data`` in the ``reprobuild-lock`` namespace."""
    raw = signer.sign(sshsig.signed_data(LOCK_NAMESPACE, data))
    return sshsig.encode(sshsig.make_signature(signer.public_key, LOCK_NAMESPACE, raw))


def generate_keypair(prefix: Path, comment: str = "") -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (OpenSSH private key, mode 0600) and ``PREFIX.pub`` (OpenSSH public
    key line). Refuses to overwrite either file."""
    private = Ed25519PrivateKey.generate()
    key_path = prefix.with_name(prefix.name + ".key")
    pub_path = prefix.with_name(prefix.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path} already exists; not overwriting a key")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    openssh = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())  # fmt: skip
    if comment:
        openssh = openssh_private_key_with_comment(openssh, comment)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(openssh)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(sshsig.public_key_line(sshsig.public_key_blob(private.public_key()), comment) + "\n")
    return key_path, pub_path


def openssh_private_key_with_comment(pem: bytes, comment: str) -> bytes:
    """Put ``comment`` into an unencrypted ``openssh-key-v1`` private key (OpenSSH's PROTOCOL.key:
    the comment sits in the private section, which is padded 1, 2, 3… to 8 bytes). cryptography
    writes keys without one; ssh-add shows it, and ``agent:COMMENT`` selects by it."""
    lines = pem.decode("ascii").strip().splitlines()
    blob = base64.b64decode("".join(lines[1:-1]))
    magic = b"openssh-key-v1\0"
    r = sshsig.Reader(blob[len(magic):], "OpenSSH private key")
    cipher, kdf, kdf_options = r.string(), r.string(), r.string()
    if blob[:len(magic)] != magic or cipher != b"none" or r.uint32() != 1:
        raise KeyFileError("not an unencrypted single-key OpenSSH private key")
    public, private = r.string(), sshsig.Reader(r.string(), "OpenSSH private section")
    check1, check2 = private.uint32(), private.uint32()
    fields = [private.string() for _ in range(3)]  # key type, public key, private key (ed25519)
    section = (sshsig.ssh_uint32(check1) + sshsig.ssh_uint32(check2) + b"".join(map(sshsig.ssh_string, fields))
               + sshsig.ssh_string(comment.encode()))
    section += bytes(range(1, 1 + (-len(section) % 8)))
    out = (magic + sshsig.ssh_string(cipher) + sshsig.ssh_string(kdf) + sshsig.ssh_string(kdf_options)
           + sshsig.ssh_uint32(1) + sshsig.ssh_string(public) + sshsig.ssh_string(section))
    text = base64.b64encode(out).decode()
    return "\n".join([lines[0], *(text[i:i + 70] for i in range(0, len(text), 70)), lines[-1]]).encode() + b"\n"


def allowed_signers_line(public_key: bytes, identity: str) -> str:
    """The allowed_signers line trusting ``public_key`` as ``identity`` for lock signatures."""
    return f'{identity} namespaces="{LOCK_NAMESPACE}" {sshsig.public_key_line(public_key)}'


# -- trusted keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedKeys:
    signers: tuple[sshsig.AllowedSigner, ...]
    origin: str

    def keys_for(self, namespace: str) -> list[bytes]:
        return [s.public_key for s in self.signers if s.allows(s.public_key, namespace)]


def load_trusted_keys(path: Path) -> TrustedKeys:
    """An allowed_signers file, an OpenSSH public key (``.pub``) or a PEM public key."""
    data = read_key_file(path, "public key file")
    origin = str(path)
    if b"-----BEGIN CERTIFICATE-----" in data:
        raise KeyFileError(f"{path}: this is an X.509 certificate, not the lock's ed25519 public key",
                           hint="--trusted-key takes the .pub or allowed_signers file of the lock key; "
                                "certificates (verity, Secure Boot) go to --certificate")  # fmt: skip
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise KeyFileError(f"{path}: not a PEM public key (a private key is not accepted as trusted key)") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: expected an ed25519 public key, got {type(key).__name__}")
        return TrustedKeys((sshsig.AllowedSigner(("*",), None, sshsig.public_key_blob(key), False, origin),), origin)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not an OpenSSH public key or allowed_signers file") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) == 1 and lines[0].split()[0].startswith("ssh-"):
        blob = sshsig.parse_public_key_line(lines[0], origin)
        sshsig.ed25519_from_blob(blob)
        return TrustedKeys((sshsig.AllowedSigner(("*",), None, blob, False, origin),), origin)
    signers = tuple(sshsig.parse_allowed_signers(text, origin))
    if not signers:
        raise KeyFileError(f"{path}: no ssh-ed25519 key in this allowed_signers file")
    return TrustedKeys(signers, origin)


def ed25519_key(blob: bytes) -> Ed25519PublicKey:
    return sshsig.ed25519_from_blob(blob)


# -- verification --------------------------------------------------------------------------------


def legacy_key_id(blob: bytes) -> str:
    """The key id of the first (JSON) signature format: sha256 of the raw key, 16 hex digits."""
    raw = sshsig.Reader(blob, "public key")
    raw.string()
    return hashlib.sha256(raw.string()).hexdigest()[:16]


def _verify_legacy(data: bytes, sig_bytes: bytes, origin: str, trusted: TrustedKeys) -> str:
    try:
        raw = json.loads(sig_bytes)
        algorithm, key_id = raw["algorithm"], raw["key_id"]
        signature = base64.b64decode(raw["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as e:
        raise LockError(f"{origin}: malformed signature file ({e})") from None
    if algorithm != "ed25519":
        raise VerificationFailed(f"{origin}: unsupported signature algorithm {algorithm!r}")
    candidates = [b for b in trusted.keys_for(LOCK_NAMESPACE) if legacy_key_id(b) == key_id]
    if not candidates:
        raise VerificationFailed(f"the lock is signed by key {key_id}, which {trusted.origin} does not trust "
                                 f"for {LOCK_NAMESPACE}")  # fmt: skip
    try:
        ed25519_key(candidates[0]).verify(signature, data)
    except InvalidSignature:
        raise VerificationFailed(f"the lock signature by key {key_id} does not match the lock's bytes "
                                 "(the lock was changed after signing)") from None
    return f"{sshsig.fingerprint(candidates[0])} (old JSON signature format: reprobuild lock --resign rewrites it)"


def verify_lock(data: bytes, sig_bytes: bytes, origin: str, trusted: TrustedKeys) -> str:
    """Check a lock signature file against the trusted keys; return who signed (fingerprint and
    principals). Raises VerificationFailed (or LockError for a malformed file)."""
    if not sshsig.is_armored(sig_bytes):
        if sig_bytes.lstrip().startswith(b"{"):
            return _verify_legacy(data, sig_bytes, origin, trusted)
        raise LockError(f"{origin}: not an SSH signature")
    try:
        sig = sshsig.decode(sig_bytes, origin)
        principals = sshsig.allowed_principals(list(trusted.signers), sig, LOCK_NAMESPACE)
        if not principals:
            other = [s.where for s in trusted.signers if s.public_key == sig.public_key]
            why = (f" (listed at {', '.join(other)}, but not for namespace {LOCK_NAMESPACE})" if other else "")
            raise VerificationFailed(f"the lock is signed by {sig.fingerprint}, which {trusted.origin} "
                                     f"does not trust{why}")  # fmt: skip
        sshsig.check_signature(data, sig, LOCK_NAMESPACE)
    except sshsig.SshFormatError as e:
        raise LockError(e.message) from None
    return f"{sig.fingerprint} ({', '.join(principals)})"


def signature_record(sig_bytes: bytes, origin: str) -> dict[str, str]:
    """What the provenance statement records of a lock signature: format, key and signature."""
    if sshsig.is_armored(sig_bytes):
        sig = sshsig.decode(sig_bytes, origin)
        return {"format": "sshsig", "namespace": sig.namespace, "keyid": sig.fingerprint,
                "sig": base64.b64encode(sig.signature).decode()}  # fmt: skip
    try:
        raw = json.loads(sig_bytes)
        return {"algorithm": str(raw["algorithm"]), "keyid": str(raw["key_id"]), "sig": str(raw["signature"])}
    except (ValueError, KeyError, TypeError) as e:
        raise LockError(f"{origin}: malformed signature file ({e})") from None
