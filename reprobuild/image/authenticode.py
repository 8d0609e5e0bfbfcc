"""Deterministic Authenticode signing of PE32+ (EFI) images, and a pure-Python verifier.

Why our own signer (docs/formats.md §8): sbsign goes through OpenSSL's PKCS7_dataFinal, which adds a
``signingTime = now`` authenticated attribute, so two runs give different bytes. Here the
signature is a pure function of (image, key, certificate): no signingTime, RSA PKCS#1 v1.5
(deterministic), DER (canonical: SET OF elements sorted).

Structure (Authenticode PE spec; sbsigntools ``src/idc.c`` for the exact SpcPeImageData):

    ContentInfo { signedData, [0] SignedData {
        version 1, digestAlgorithms {sha256},
        contentInfo { spcIndirectDataContent (1.3.6.1.4.1.311.2.1.4), [0] SpcIndirectDataContent {
            SpcAttributeTypeAndOptionalValue { spcPEImageData (…2.1.15),
                SpcPeImageData { flags BIT STRING '', [0] SpcLink [2] SpcString [0] "<<<Obsolete>>>" } },
            DigestInfo { sha256, OCTET STRING authenticode_digest(image) } } },
        certificates [0] { cert },
        signerInfos { SignerInfo { version 1, issuerAndSerialNumber, sha256,
            [0] { contentType = spcIndirectDataContent, messageDigest = sha256(IDC value) },
            rsaEncryption, OCTET STRING RSA-PKCS1v15-SHA256(SET { attributes }) } } } }

The messageDigest covers the SpcIndirectDataContent *value* (its DER without tag and length),
as Authenticode requires and sbsign does (``BIO_write(sigbio, buf+2, len-2)``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from reprobuild.errors import FormatError
from reprobuild.image.pe import (
    DATA_DIRECTORY,
    IMAGE_DIRECTORY_ENTRY_SECURITY,
    OPTIONAL_HEADER_64,
    WIN_CERT_REVISION_2_0,
    WIN_CERT_TYPE_PKCS_SIGNED_DATA,
    WIN_CERTIFICATE,
    PeInvalid,
    authenticode_digest,
    parse_pe,
    pe_checksum,
    round_up,
)
from reprobuild.signer import Signer

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
OID_SPC_PE_IMAGE_DATA = "1.3.6.1.4.1.311.2.1.15"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
# "<<<Obsolete>>>" as a BMPString, exactly what sbsign and signtool put in SpcPeImageData.
OBSOLETE_BMP = "<<<Obsolete>>>".encode("utf-16-be")


class SignatureInvalid(FormatError):
    """An Authenticode signature blob is malformed."""


# ---- a minimal DER encoder (X.690): only what SignedData needs ------------------------------

TAG_INTEGER, TAG_BIT_STRING, TAG_OCTET_STRING, TAG_NULL, TAG_OID = 0x02, 0x03, 0x04, 0x05, 0x06
TAG_SEQUENCE, TAG_SET = 0x30, 0x31


def der_tlv(tag: int, value: bytes) -> bytes:
    """Tag, definite length (short form below 128, else long form, minimal), value."""
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + value


def der_sequence(*items: bytes) -> bytes:
    return der_tlv(TAG_SEQUENCE, b"".join(items))


def der_set(*items: bytes) -> bytes:
    # DER: the elements of a SET OF are sorted by their encodings (X.690 11.6).
    return der_tlv(TAG_SET, b"".join(sorted(items)))


def der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"invalid OID {dotted!r}")
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return der_tlv(TAG_OID, bytes(body))


def der_integer(value: int) -> bytes:
    # Two's complement, minimal: a leading 0x00 only when the top bit would read as a sign.
    size = value.bit_length() // 8 + 1 if value >= 0 else (value + 1).bit_length() // 8 + 1
    return der_tlv(TAG_INTEGER, value.to_bytes(size, "big", signed=True))


def der_octet_string(value: bytes) -> bytes:
    return der_tlv(TAG_OCTET_STRING, value)


def der_null() -> bytes:
    return der_tlv(TAG_NULL, b"")


def der_context(number: int, value: bytes, constructed: bool = True) -> bytes:
    """A context-specific tag [number] around ``value`` (EXPLICIT when constructed wraps TLVs)."""
    return der_tlv((0xA0 if constructed else 0x80) | number, value)


# ---- a minimal DER decoder, for verification and tests ---------------------------------------


@dataclass(frozen=True)
class Tlv:
    tag: int
    value: bytes
    raw: bytes  # the whole encoding, tag and length included

    def children(self) -> list[Tlv]:
        return der_decode_all(self.value)


def der_decode(data: bytes, pos: int = 0) -> tuple[Tlv, int]:
    """Decode one TLV at ``pos``; return it and the position after it. Definite lengths only."""
    try:
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise SignatureInvalid("DER: multi-byte tags are not supported")
        first = data[pos + 1]
        at = pos + 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4:
                raise SignatureInvalid("DER: indefinite or absurd length")
            length = int.from_bytes(data[at : at + n], "big")
            at += n
    except IndexError as e:
        raise SignatureInvalid("DER: truncated header") from e
    end = at + length
    if end > len(data):
        raise SignatureInvalid("DER: value runs past the end")
    return Tlv(tag, data[at:end], data[pos:end]), end


def der_decode_all(data: bytes) -> list[Tlv]:
    items, pos = [], 0
    while pos < len(data):
        item, pos = der_decode(data, pos)
        items.append(item)
    return items


def der_decode_oid(value: bytes) -> str:
    arcs, acc = [], 0
    for b in value:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    if not arcs:
        raise SignatureInvalid("DER: empty OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


# ---- Authenticode structures -----------------------------------------------------------------


def _algorithm(oid: str) -> bytes:
    return der_sequence(der_oid(oid), der_null())


def spc_indirect_data_content(image_digest: bytes) -> bytes:
    """The DER SpcIndirectDataContent for a SHA-256 image hash (byte-identical to sbsign's)."""
    link = der_context(2, der_tlv(0x80, OBSOLETE_BMP))  # SpcLink.file [2] -> SpcString.unicode [0]
    pe_image_data = der_sequence(der_tlv(TAG_BIT_STRING, b"\x00"), der_context(0, link))
    return der_sequence(
        der_sequence(der_oid(OID_SPC_PE_IMAGE_DATA), pe_image_data),
        der_sequence(_algorithm(OID_SHA256), der_octet_string(image_digest)),
    )


def _attribute(oid: str, value: bytes) -> bytes:
    return der_sequence(der_oid(oid), der_set(value))


def _content_value(tlv_bytes: bytes) -> bytes:
    tlv, _ = der_decode(tlv_bytes)
    return tlv.value


def signed_data(image_digest: bytes, signer: Signer) -> bytes:
    """The PKCS#7 ContentInfo (DER) signing ``image_digest``; deterministic for fixed inputs.

    ``signer`` computes the one RSA PKCS#1 v1.5 / SHA-256 signature (over the signed attributes),
    from a key file or in a PKCS#11 token; the certificate comes from it too."""
    cert = signer.certificate
    idc = spc_indirect_data_content(image_digest)
    # No signingTime: that attribute is exactly what makes sbsign's output differ run to run.
    attributes = [
        _attribute(OID_CONTENT_TYPE, der_oid(OID_SPC_INDIRECT_DATA)),
        _attribute(OID_MESSAGE_DIGEST, der_octet_string(hashlib.sha256(_content_value(idc)).digest())),
    ]
    signed_attrs = der_set(*attributes)  # signed as a universal SET (RFC 2315 9.3)
    signature = signer.sign(signed_attrs)
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    issuer_and_serial = der_sequence(cert.issuer.public_bytes(), der_integer(cert.serial_number))
    signer_info = der_sequence(
        der_integer(1),
        issuer_and_serial,
        _algorithm(OID_SHA256),
        der_tlv(0xA0, _content_value(signed_attrs)),  # [0] IMPLICIT SET OF Attribute
        _algorithm(OID_RSA_ENCRYPTION),
        der_octet_string(signature),
    )
    content = der_sequence(
        der_integer(1),
        der_set(_algorithm(OID_SHA256)),
        der_sequence(der_oid(OID_SPC_INDIRECT_DATA), der_context(0, idc)),
        der_tlv(0xA0, cert_der),  # certificates [0] IMPLICIT SET OF Certificate
        der_set(signer_info),
    )
    return der_sequence(der_oid(OID_SIGNED_DATA), der_context(0, content))


def _as_cert(cert: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(cert, bytes):
        return x509.load_pem_x509_certificate(cert) if b"-----BEGIN" in cert else x509.load_der_x509_certificate(cert)
    return cert


def sign_pe(pe: bytes, signer: Signer) -> bytes:
    """Return ``pe`` with one Authenticode signature attached, as sbsign would lay it out.

    The image is zero-padded to 8 bytes, a WIN_CERTIFICATE {dwLength = 8 + len(DER), revision
    0x0200, type PKCS_SIGNED_DATA} + DER + zero padding to 8 is appended, certificate directory =
    (offset, padded length), and the PE checksum is recomputed. Refuses already-signed images.
    Deterministic: same inputs, same bytes. Cost: one hash pass, one checksum pass, one RSA signature
    (``signer.sign``: a key file or a PKCS#11 token; UEFI db verification is RSA-only).
    """
    image = parse_pe(pe)
    if image.cert_table.size or image.cert_table.virtual_address:
        raise PeInvalid("PE: image is already signed; refusing to add a second signature")
    body = bytearray(pe) + bytes(-len(pe) % 8)
    der = signed_data(authenticode_digest(body), signer)
    entry = WIN_CERTIFICATE.pack({"dwLength": WIN_CERTIFICATE.size + len(der), "wRevision": WIN_CERT_REVISION_2_0,
                                  "wCertificateType": WIN_CERT_TYPE_PKCS_SIGNED_DATA}) + der  # fmt: skip
    entry += bytes(-len(entry) % 8)
    offset = len(body)
    body += entry
    DATA_DIRECTORY.put(body, image.cert_dir_offset, "VirtualAddress", offset)  # a file offset for this entry
    DATA_DIRECTORY.put(body, image.cert_dir_offset, "Size", len(entry))
    OPTIONAL_HEADER_64.put(body, image.optional_offset, "CheckSum", pe_checksum(body, image.checksum_offset))
    return bytes(body)


@dataclass(frozen=True)
class Signature:
    """One parsed signature: the signed image hash, the signer's issuer+serial and the raw DER."""

    image_digest: bytes
    issuer_der: bytes
    serial: int
    der: bytes
    idc_value: bytes
    signed_attrs: bytes  # re-encoded as a universal SET, which is what was signed
    message_digest: bytes
    signature: bytes


def _parse_signed_data(der: bytes) -> Signature:
    try:
        content_info = der_decode(der)[0].children()
        if der_decode_oid(content_info[0].value) != OID_SIGNED_DATA:
            raise SignatureInvalid("not PKCS#7 SignedData")
        sd = content_info[1].children()[0].children()
        encap = sd[2].children()
        if der_decode_oid(encap[0].value) != OID_SPC_INDIRECT_DATA:
            raise SignatureInvalid("content is not SpcIndirectDataContent")
        idc = encap[1].children()[0]
        digest_info = idc.children()[1].children()
        if der_decode_oid(digest_info[0].children()[0].value) != OID_SHA256:
            raise SignatureInvalid("image digest is not SHA-256")
        signer = sd[-1].children()[0].children()
        issuer_serial = signer[1].children()
        attrs_tlv = signer[3]
        if attrs_tlv.tag != 0xA0:
            raise SignatureInvalid("signer info has no authenticated attributes")
        message_digest = b""
        for attr in attrs_tlv.children():
            oid_tlv, values = attr.children()
            if der_decode_oid(oid_tlv.value) == OID_MESSAGE_DIGEST:
                message_digest = values.children()[0].value
        return Signature(
            image_digest=digest_info[1].value,
            issuer_der=issuer_serial[0].raw,
            serial=int.from_bytes(issuer_serial[1].value, "big", signed=True),
            der=der,
            idc_value=idc.value,
            signed_attrs=der_tlv(TAG_SET, attrs_tlv.value),
            message_digest=message_digest,
            signature=signer[5].value,
        )
    except (IndexError, ValueError) as e:
        raise SignatureInvalid(f"malformed Authenticode signature: {e}") from e


def read_signatures(pe: bytes) -> list[Signature]:
    """Every PKCS#7 signature in the image's certificate table (empty list when unsigned)."""
    image = parse_pe(pe)
    table = image.cert_table
    sigs, pos, end = [], table.virtual_address, table.virtual_address + table.size
    while table.size and pos + WIN_CERTIFICATE.size <= end:
        head = WIN_CERTIFICATE.unpack(pe, pos)
        length = int(head["dwLength"])
        if length < WIN_CERTIFICATE.size or pos + length > end:
            raise SignatureInvalid(f"WIN_CERTIFICATE at {pos:#x} has a bad length {length}")
        if head["wCertificateType"] == WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            sigs.append(_parse_signed_data(pe[pos + WIN_CERTIFICATE.size : pos + length]))
        pos = round_up(pos + length, 8)
    return sigs


def verify_pe_signature(pe: bytes, cert: x509.Certificate | bytes) -> bool:
    """True if some signature in ``pe`` was made by ``cert``'s key over this exact image.

    Checks: image hash == the signed DigestInfo, sha256(IDC value) == messageDigest, signer's
    issuer+serial == cert's, and the RSA PKCS#1 v1.5 signature over the attributes. No chain or
    time checks (UEFI db semantics). Malformed signatures count as not verifying.
    """
    cert = _as_cert(cert)
    try:
        sigs = read_signatures(pe)
        digest = authenticode_digest(pe)
    except FormatError:
        return False
    public_key = cert.public_key()
    for sig in sigs:
        if sig.image_digest != digest or hashlib.sha256(sig.idc_value).digest() != sig.message_digest:
            continue
        if sig.issuer_der != cert.issuer.public_bytes() or sig.serial != cert.serial_number:
            continue
        if not isinstance(public_key, rsa.RSAPublicKey):
            continue
        try:
            public_key.verify(sig.signature, sig.signed_attrs, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return True
    return False


__all__ = [
    "IMAGE_DIRECTORY_ENTRY_SECURITY",
    "Signature",
    "SignatureInvalid",
    "read_signatures",
    "sign_pe",
    "signed_data",
    "spc_indirect_data_content",
    "verify_pe_signature",
]
