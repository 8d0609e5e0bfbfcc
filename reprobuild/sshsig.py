"""The SSH signature format (SSHSIG) and OpenSSH public keys and allowed_signers files (pure).

The format is OpenSSH's ``PROTOCOL.sshsig`` (the one ``ssh-keygen -Y sign`` writes and ``git``
uses for signed commits); docs/lockfile.md describes it. A signature over MESSAGE in NAMESPACE is

    byte[6] "SSHSIG", uint32 1, string publickey, string namespace, string reserved (empty),
    string hash_algorithm ("sha512"), string signature

armored as ``-----BEGIN SSH SIGNATURE-----``, base64 in lines of 70 characters, ``-----END SSH
SIGNATURE-----``. What the key signs is

    byte[6] "SSHSIG", string namespace, string reserved, string hash_algorithm, string H(MESSAGE)

``string`` is RFC 4251's uint32 length + bytes; a key and a signature are RFC 4253 blobs (for
ed25519, RFC 8709: ``string "ssh-ed25519", string key(32)`` / ``string "ssh-ed25519",
string signature(64)``). ed25519 signatures are deterministic, so the same key signing the same
message in the same namespace always gives the same armored bytes.

Only ed25519 keys are accepted for signing and verification: they are what ``reprobuild keygen``
writes and their signatures are reproducible.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.errors import FormatError, VerificationFailed

MAGIC = b"SSHSIG"
VERSION = 1
HASH_ALGORITHM = "sha512"
KEY_TYPE = "ssh-ed25519"
BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"
LINE_WIDTH = 70  # what ssh-keygen writes (sshbuf_dtob64 with wrapping)


class SshFormatError(FormatError):
    """An SSH signature, public key or allowed_signers line is malformed or of an unsupported kind."""


class SshSignatureInvalid(VerificationFailed):
    """An SSH signature does not verify, or is by a key or in a namespace that is not allowed."""


# -- RFC 4251 wire encoding ----------------------------------------------------------------------


def ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def ssh_uint32(value: int) -> bytes:
    return value.to_bytes(4, "big")


class Reader:
    """Reads RFC 4251 ``uint32`` and ``string`` fields; raises SshFormatError past the end."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SshFormatError(f"{self.what}: truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        return self.take(self.uint32())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SshFormatError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


# -- keys ----------------------------------------------------------------------------------------


def public_key_blob(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return ssh_string(KEY_TYPE.encode()) + ssh_string(raw)


def ed25519_from_blob(blob: bytes) -> Ed25519PublicKey:
    r = Reader(blob, "public key")
    kind = r.string()
    if kind != KEY_TYPE.encode():
        raise SshFormatError(f"public key type {kind.decode(errors='replace')!r} is not supported "
                             f"(lock signatures use {KEY_TYPE})")
    raw = r.string()
    r.end()
    if len(raw) != 32:
        raise SshFormatError("ssh-ed25519 public key is not 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(blob: bytes) -> str:
    """OpenSSH's key fingerprint, ``SHA256:`` + unpadded base64 of sha256(blob) (as ``ssh-keygen -l``)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def public_key_line(blob: bytes, comment: str = "") -> str:
    """``ssh-ed25519 AAAA… comment`` (the ``.pub`` / authorized_keys format)."""
    kind = Reader(blob, "public key").string().decode()
    return f"{kind} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


def parse_public_key_line(line: str, what: str) -> bytes:
    """The key blob of ``KEYTYPE BASE64 [COMMENT]``; the type in front must match the blob's."""
    parts = line.split()
    if len(parts) < 2:
        raise SshFormatError(f"{what}: not an OpenSSH public key line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise SshFormatError(f"{what}: the key is not base64") from None
    if Reader(blob, what).string() != parts[0].encode():
        raise SshFormatError(f"{what}: key type {parts[0]!r} does not match the key")
    return blob


# -- signatures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshSignature:
    public_key: bytes  # the signer's key blob
    namespace: str
    hash_algorithm: str
    signature: bytes  # the signature blob: string key type, string raw signature

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def raw_signature(self) -> bytes:
        r = Reader(self.signature, "signature blob")
        kind = r.string()
        if kind != KEY_TYPE.encode():
            raise SshFormatError(f"signature type {kind.decode(errors='replace')!r} is not supported")
        raw = r.string()
        r.end()
        return raw


def message_hash(message: bytes, hash_algorithm: str = HASH_ALGORITHM) -> bytes:
    if hash_algorithm not in ("sha256", "sha512"):
        raise SshFormatError(f"SSH signature hash algorithm {hash_algorithm!r} is not sha256 or sha512")
    return hashlib.new(hash_algorithm, message).digest()


def signed_data(namespace: str, message: bytes, hash_algorithm: str = HASH_ALGORITHM) -> bytes:
    """What the key signs (PROTOCOL.sshsig "Signed Data, of which the signature goes into the blob")."""
    if not namespace:
        raise SshFormatError("an SSH signature needs a namespace")
    return (MAGIC + ssh_string(namespace.encode()) + ssh_string(b"") + ssh_string(hash_algorithm.encode())
            + ssh_string(message_hash(message, hash_algorithm)))


def make_signature(public_key: bytes, namespace: str, raw_signature: bytes) -> SshSignature:
    """The signature record for an ed25519 signature over ``signed_data(namespace, message)``."""
    return SshSignature(public_key, namespace, HASH_ALGORITHM,
                        ssh_string(KEY_TYPE.encode()) + ssh_string(raw_signature))


def encode(sig: SshSignature) -> bytes:
    """The armored signature file, byte-identical to ``ssh-keygen -Y sign``'s."""
    blob = (MAGIC + ssh_uint32(VERSION) + ssh_string(sig.public_key) + ssh_string(sig.namespace.encode())
            + ssh_string(b"") + ssh_string(sig.hash_algorithm.encode()) + ssh_string(sig.signature))
    text = base64.b64encode(blob).decode()
    lines = [text[i:i + LINE_WIDTH] for i in range(0, len(text), LINE_WIDTH)]
    return ("\n".join([BEGIN, *lines, END]) + "\n").encode()


def is_armored(data: bytes) -> bool:
    return data.lstrip().startswith(BEGIN.encode())


def decode(data: bytes, what: str) -> SshSignature:
    """Parse an armored SSH signature. Raises SshFormatError."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SshFormatError(f"{what}: not an SSH signature (not ASCII)") from None
    if not (text.startswith(BEGIN) and text.endswith(END)):
        raise SshFormatError(f"{what}: not an SSH signature (no BEGIN/END SSH SIGNATURE lines)")
    try:
        blob = base64.b64decode("".join(text[len(BEGIN):-len(END)].split()), validate=True)
    except binascii.Error:
        raise SshFormatError(f"{what}: the SSH signature is not base64") from None
    r = Reader(blob, what)
    if r.take(6) != MAGIC:
        raise SshFormatError(f"{what}: no SSHSIG preamble")
    version = r.uint32()
    if version != VERSION:
        raise SshFormatError(f"{what}: SSH signature version {version} is not supported")
    public_key, namespace, _reserved, hash_algorithm, signature = (r.string() for _ in range(5))
    r.end()
    try:
        return SshSignature(public_key, namespace.decode(), hash_algorithm.decode(), signature)
    except UnicodeDecodeError:
        raise SshFormatError(f"{what}: namespace or hash algorithm is not text") from None


def check_signature(message: bytes, sig: SshSignature, namespace: str) -> None:
    """The signature is its own key's over ``message`` in ``namespace`` (who the key is: the caller's
    business, see :func:`allowed_principals`). Raises SshSignatureInvalid or SshFormatError."""
    if sig.namespace != namespace:
        raise SshSignatureInvalid(f"the signature is for namespace {sig.namespace!r}, not {namespace!r}")
    key = ed25519_from_blob(sig.public_key)
    try:
        key.verify(sig.raw_signature(), signed_data(namespace, message, sig.hash_algorithm))
    except InvalidSignature:
        raise SshSignatureInvalid(f"the signature by {sig.fingerprint} does not match the signed bytes "
                                  "(they were changed after signing)") from None


# -- allowed_signers (ssh-keygen(1), ALLOWED SIGNERS) --------------------------------------------


@dataclass(frozen=True)
class AllowedSigner:
    principals: tuple[str, ...]  # patterns
    namespaces: tuple[str, ...] | None  # patterns; None: any namespace
    public_key: bytes
    cert_authority: bool
    where: str

    def allows(self, public_key: bytes, namespace: str) -> bool:
        if self.cert_authority or public_key != self.public_key:
            return False
        return self.namespaces is None or any(fnmatch.fnmatchcase(namespace, p) for p in self.namespaces)


def _split_options(text: str) -> tuple[str, str]:
    """Split off a leading options field (which may hold quoted spaces) from the rest of the line."""
    quoted, i = False, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            quoted = not quoted
        elif c.isspace() and not quoted:
            break
        i += 1
    return text[:i], text[i:].strip()


def _parse_options(options: str, where: str) -> tuple[tuple[str, ...] | None, bool]:
    namespaces, cert_authority = None, False
    items, current, quoted = [], "", False
    for c in options:
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            items.append(current)
            current = ""
        else:
            current += c
    items.append(current)
    for item in items:
        name, _, value = item.partition("=")
        name = name.lower()
        value = value.strip('"')
        if name == "namespaces":
            namespaces = tuple(v for v in value.split(",") if v)
        elif name == "cert-authority":
            cert_authority = True
        elif name in ("valid-after", "valid-before"):
            # A validity window would make verification depend on the clock; refuse it rather
            # than ignore it.
            raise SshFormatError(f"{where}: {name}= is not supported (verification does not read the clock)")
        else:
            raise SshFormatError(f"{where}: unknown allowed_signers option {name!r}")
    return namespaces, cert_authority


def parse_allowed_signers(text: str, origin: str) -> list[AllowedSigner]:
    """Parse an allowed_signers file: ``PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`` per line."""
    signers = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{origin}:{number}"
        principals, _, rest = line.partition(" ")
        rest = rest.strip()
        namespaces, cert_authority = None, False
        first = rest.split(None, 1)[0] if rest else ""
        if not first.startswith(("ssh-", "ecdsa-", "sk-")):
            options, rest = _split_options(rest)
            namespaces, cert_authority = _parse_options(options, where)
        if rest.split(None, 1)[0:1] != [KEY_TYPE]:
            continue  # other key types cannot have made a lock signature; ssh-keygen still reads them
        signers.append(AllowedSigner(tuple(p for p in principals.split(",") if p), namespaces,
                                     parse_public_key_line(rest, where), cert_authority, where))
    return signers


def allowed_principals(signers: list[AllowedSigner], sig: SshSignature, namespace: str) -> list[str]:
    """The principal patterns under which ``sig``'s key may sign in ``namespace`` (empty: none)."""
    return [p for s in signers if s.allows(sig.public_key, namespace) for p in s.principals]
