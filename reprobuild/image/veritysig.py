"""The root-verity-sig partition, byte-identical to what systemd-repart writes (docs/formats.md §6).

Content: compact JSON ``{"rootHash":…,"certificateFingerprint":…,"signature":…}`` NUL-padded to
16 KiB, where ``signature`` is base64 of a detached PKCS#7 SignedData over the ASCII hex root hash,
without signed attributes, certificate embedded (``PKCS7_DETACHED|PKCS7_NOATTR|PKCS7_BINARY``).
With an RSA key the whole partition is deterministic.

Verification is done natively: with no signed attributes the PKCS#7 signature is a plain RSA
PKCS#1 v1.5 signature over sha256(hex root hash), so a tiny DER walk finds it. `check_verity_sig_openssl`
cross-checks with ``openssl smime -verify``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from reprobuild.errors import BuildError, FormatError, ToolMissing, VerificationFailed
from reprobuild.image.authenticode import (
    OID_RSA_ENCRYPTION,
    OID_SHA256,
    OID_SIGNED_DATA,
    der_context,
    der_integer,
    der_null,
    der_octet_string,
    der_oid,
    der_sequence,
    der_set,
    der_tlv,
)
from reprobuild.signer import Signer
from reprobuild.x509 import certificate_fingerprint

VERITY_SIG_SIZE = 16384  # repart's fixed sig partition size
OID_DATA = "1.2.840.113549.1.7.1"


class VeritySigInvalid(FormatError):
    """The sig partition is not the expected JSON/PKCS#7 structure."""


class VeritySigMismatch(VerificationFailed):
    """The signature does not verify, or is for another root hash or certificate."""


class SigningKeyUnsuitable(BuildError):
    """The key cannot produce a reproducible verity signature."""


@dataclass(frozen=True)
class VeritySignature:
    """Decoded sig partition. ``root_hash`` is lowercase hex; ``signature`` is the PKCS#7 DER."""

    root_hash: str
    certificate_fingerprint: str | None
    signature: bytes


# -- signing -------------------------------------------------------------------------------------


def sign_root_hash(root_hash: bytes, signer: Signer) -> bytes:
    """Detached PKCS#7 (DER) over the lowercase hex root hash, no attributes, cert embedded.

    Same bytes as OpenSSL's ``PKCS7_sign(cert, key, NULL, data, DETACHED|NOATTR|BINARY)`` (checked
    against ``openssl smime -sign -noattr -binary``). NoAttributes matters for reproducibility:
    with signed attributes OpenSSL would add signingTime = now. Without attributes the signature
    is RSA PKCS#1 v1.5 / SHA-256 over the content itself, which ``signer`` computes (from a key
    file or in a PKCS#11 token). RFC 2315 §9:

        ContentInfo { signedData, [0] SignedData { version 1, digestAlgorithms { sha256 },
            contentInfo { data }, certificates [0] { cert },
            signerInfos { { version 1, issuerAndSerialNumber, sha256, rsaEncryption,
                            encryptedDigest } } } }
    """
    certificate = signer.certificate
    if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
        # ECDSA signatures use a random nonce: the partition would differ on every build.
        raise SigningKeyUnsuitable("verity signing key must be RSA (PKCS#1 v1.5 is deterministic; ECDSA is not)")
    signature = signer.sign(root_hash.hex().encode("ascii"))
    sha256 = der_sequence(der_oid(OID_SHA256), der_null())
    signer_info = der_sequence(
        der_integer(1),
        der_sequence(certificate.issuer.public_bytes(), der_integer(certificate.serial_number)),
        sha256,
        der_sequence(der_oid(OID_RSA_ENCRYPTION), der_null()),
        der_octet_string(signature),
    )
    content = der_sequence(
        der_integer(1),
        der_set(sha256),
        der_sequence(der_oid(OID_DATA)),
        der_tlv(0xA0, certificate.public_bytes(serialization.Encoding.DER)),
        der_set(signer_info),
    )
    return der_sequence(der_oid(OID_SIGNED_DATA), der_context(0, content))


def encode_verity_sig(sig: VeritySignature, size: int = VERITY_SIG_SIZE) -> bytes:
    """Compact JSON in repart's key order, NUL-padded to ``size`` bytes (pure)."""
    doc = {"rootHash": sig.root_hash}
    if sig.certificate_fingerprint is not None:
        doc["certificateFingerprint"] = sig.certificate_fingerprint
    doc["signature"] = base64.b64encode(sig.signature).decode("ascii")
    text = json.dumps(doc, separators=(",", ":")).encode("ascii")
    if len(text) > size:
        raise SigningKeyUnsuitable(f"verity signature JSON ({len(text)} bytes) does not fit in {size} bytes")
    return text.ljust(size, b"\0")


def make_verity_sig(root_hash: bytes, signer: Signer, size: int = VERITY_SIG_SIZE) -> bytes:
    """The whole sig partition content for ``root_hash``."""
    sig = VeritySignature(root_hash.hex(), certificate_fingerprint(signer.certificate),
                          sign_root_hash(root_hash, signer))  # fmt: skip
    return encode_verity_sig(sig, size)


# -- parsing -------------------------------------------------------------------------------------


def parse_verity_sig(blob: bytes) -> VeritySignature:
    """Decode a sig partition: JSON followed only by NUL bytes. Raises VeritySigInvalid."""
    text = blob.rstrip(b"\0")
    if b"\0" in text:
        raise VeritySigInvalid("verity signature: NUL byte inside the JSON text")
    try:
        doc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise VeritySigInvalid(f"verity signature is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise VeritySigInvalid("verity signature JSON is not an object")
    root, fpr, sig = doc.get("rootHash"), doc.get("certificateFingerprint"), doc.get("signature")
    if not isinstance(root, str) or not _is_hex(root):
        raise VeritySigInvalid("verity signature: rootHash missing or not hex")
    if fpr is not None and (not isinstance(fpr, str) or not _is_hex(fpr) or len(fpr) != 64):
        raise VeritySigInvalid("verity signature: certificateFingerprint is not a sha256 hex digest")
    if not isinstance(sig, str):
        raise VeritySigInvalid("verity signature: signature missing")
    try:
        der = base64.b64decode(sig, validate=True)
    except binascii.Error as e:
        raise VeritySigInvalid(f"verity signature: bad base64: {e}") from e
    return VeritySignature(root.lower(), fpr.lower() if fpr else None, der)


def _is_hex(s: str) -> bool:
    return len(s) % 2 == 0 and len(s) > 0 and all(c in "0123456789abcdefABCDEF" for c in s)


# -- minimal DER walk over PKCS#7 SignedData (RFC 2315 §9) ----------------------------------------


def _tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) at ``pos``; raises VeritySigInvalid."""
    try:
        tag = buf[pos]
        n = buf[pos + 1]
        pos += 2
        if n & 0x80:
            k = n & 0x7F
            if k == 0 or k > 4:
                raise VeritySigInvalid("PKCS#7: unsupported DER length")
            n = int.from_bytes(buf[pos:pos + k], "big")
            pos += k
    except IndexError:
        raise VeritySigInvalid("PKCS#7: truncated DER") from None
    if pos + n > len(buf):
        raise VeritySigInvalid("PKCS#7: truncated DER")
    return tag, pos, pos + n


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        t = _tlv(buf, start)
        if t[2] > end:
            raise VeritySigInvalid("PKCS#7: element overruns its container")
        out.append(t)
        start = t[2]
    return out


_OID_SIGNED_DATA = bytes.fromhex("2a864886f70d010702")
_OID_SHA256 = bytes.fromhex("608648016503040201")


@dataclass(frozen=True)
class _SignerInfo:
    digest_oid: bytes
    has_attributes: bool
    encrypted_digest: bytes


def _signer_infos(der: bytes) -> list[_SignerInfo]:
    tag, s, e = _tlv(der, 0)
    if tag != 0x30:
        raise VeritySigInvalid("PKCS#7: not a ContentInfo SEQUENCE")
    ci = _children(der, s, e)
    if len(ci) < 2 or ci[0][0] != 0x06 or der[ci[0][1]:ci[0][2]] != _OID_SIGNED_DATA or ci[1][0] != 0xA0:
        raise VeritySigInvalid("PKCS#7: not SignedData")
    inner = _children(der, ci[1][1], ci[1][2])
    if not inner or inner[0][0] != 0x30:
        raise VeritySigInvalid("PKCS#7: malformed SignedData")
    sd = _children(der, inner[0][1], inner[0][2])
    # version, digestAlgorithms, contentInfo, [0] certificates?, [1] crls?, signerInfos
    if len(sd) < 4 or sd[-1][0] != 0x31:
        raise VeritySigInvalid("PKCS#7: SignedData without signerInfos")
    content = _children(der, sd[2][1], sd[2][2])
    if len(content) > 1:
        raise VeritySigInvalid("PKCS#7: signature is not detached")
    infos = []
    for tag, s, e in _children(der, sd[-1][1], sd[-1][2]):
        f = _children(der, s, e)
        # version, issuerAndSerialNumber, digestAlgorithm, [0] authenticatedAttributes?,
        # digestEncryptionAlgorithm, encryptedDigest, [1] unauthenticatedAttributes?
        if tag != 0x30 or len(f) < 5:
            raise VeritySigInvalid("PKCS#7: malformed SignerInfo")
        alg = _children(der, f[2][1], f[2][2])
        has_attrs = f[3][0] == 0xA0
        if has_attrs and len(f) < 6:
            raise VeritySigInvalid("PKCS#7: malformed SignerInfo")
        enc = f[5] if has_attrs else f[4]
        if enc[0] != 0x04 or not alg or alg[0][0] != 0x06:
            raise VeritySigInvalid("PKCS#7: malformed SignerInfo")
        infos.append(_SignerInfo(der[alg[0][1]:alg[0][2]], has_attrs, der[enc[1]:enc[2]]))
    if not infos:
        raise VeritySigInvalid("PKCS#7: no signer")
    return infos


# -- verification --------------------------------------------------------------------------------


def check_verity_sig(sig: VeritySignature, root_hash: bytes | str, certificate: x509.Certificate) -> None:
    """Check that ``sig`` is a valid signature by ``certificate`` over ``root_hash``.

    Checks the rootHash field, the fingerprint (when present) and the RSA PKCS#1 v1.5 / SHA-256
    signature over the hex string. Signatures with signed attributes are not produced by repart
    and are rejected. Raises VeritySigMismatch or VeritySigInvalid.
    """
    expected = root_hash.lower() if isinstance(root_hash, str) else bytes(root_hash).hex()
    if not hmac.compare_digest(sig.root_hash, expected):
        raise VeritySigMismatch(f"signature is for root hash {sig.root_hash}, not {expected}")
    fpr = certificate_fingerprint(certificate)
    if sig.certificate_fingerprint is not None and sig.certificate_fingerprint != fpr:
        raise VeritySigMismatch(f"signature names certificate {sig.certificate_fingerprint}, not {fpr}")
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise VeritySigMismatch("only RSA certificates are supported for verity signatures")
    for info in _signer_infos(sig.signature):
        if info.has_attributes:
            raise VeritySigInvalid("PKCS#7 signer has signed attributes (repart never writes them)")
        if info.digest_oid != _OID_SHA256:
            continue
        try:
            public.verify(info.encrypted_digest, expected.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
            return
        except InvalidSignature:
            continue
    raise VeritySigMismatch("the PKCS#7 signature does not verify with the given certificate")


def check_verity_sig_openssl(sig: VeritySignature, certificate_pem: Path) -> None:
    """Cross-check with ``openssl smime -verify -binary -inform DER -purpose any`` (as the kernel would)."""
    exe = shutil.which("openssl")
    if exe is None:
        raise ToolMissing("openssl", "openssl", "to verify verity signatures")
    with tempfile.TemporaryDirectory(prefix="reprobuild-sig-") as tmp:
        content, der = Path(tmp, "roothash"), Path(tmp, "sig.p7s")
        content.write_bytes(sig.root_hash.encode("ascii"))
        der.write_bytes(sig.signature)
        r = subprocess.run([exe, "smime", "-verify", "-binary", "-inform", "DER", "-in", str(der),
                            "-content", str(content), "-CAfile", str(certificate_pem), "-purpose", "any",
                            "-out", "/dev/null"], check=False, capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        raise VeritySigMismatch(f"openssl smime -verify failed: {r.stderr.strip().splitlines()[-1:]}")
