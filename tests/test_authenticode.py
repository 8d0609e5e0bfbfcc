"""Deterministic Authenticode signing: DER vectors, sbverify/sbsign cross-checks, tampering."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from reprobuild.image.authenticode import (
    der_decode,
    der_integer,
    der_oid,
    der_set,
    der_tlv,
    read_signatures,
    sign_pe,
    spc_indirect_data_content,
    verify_pe_signature,
)
from reprobuild.image.pe import PeInvalid, authenticode_digest, parse_pe, pe_checksum
from reprobuild.signer import file_signer
from reprobuild.x509 import generate_rsa_key_and_certificate
from tests.test_pe import make_pe


@pytest.fixture(scope="module")
def keypair() -> tuple[bytes, bytes]:
    return generate_rsa_key_and_certificate("reprobuild test Secure Boot")


@pytest.fixture(scope="module")
def other_keypair() -> tuple[bytes, bytes]:
    return generate_rsa_key_and_certificate("someone else")


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (der_oid("1.2.840.113549.1.7.2"), "06092a864886f70d010702"),
        (der_oid("1.3.6.1.4.1.311.2.1.4"), "060a2b060104018237020104"),
        (der_oid("2.16.840.1.101.3.4.2.1"), "0609608648016503040201"),
        (der_integer(0), "020100"),
        (der_integer(127), "02017f"),
        (der_integer(128), "02020080"),
        (der_integer(256), "02020100"),
        (der_integer(-1), "0201ff"),
        (der_integer(-128), "020180"),
        (der_integer(-129), "0202ff7f"),
        (der_tlv(0x04, bytes(127))[:2], "047f"),
        (der_tlv(0x04, bytes(200))[:3], "0481c8"),
        (der_tlv(0x04, bytes(300))[:4], "0482012c"),
        (der_set(b"\x02\x01\x02", b"\x02\x01\x01"), "3106020101020102"),
    ],
)
def test_der_vectors(encoded: bytes, expected: str) -> None:
    assert encoded.hex() == expected


def _files(tmp_path: Path, keypair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    key, cert = keypair
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "cert.pem").write_bytes(cert)
    return tmp_path / "key.pem", tmp_path / "cert.pem"


def _sbverify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sbverify", *args], capture_output=True, text=True, check=False)


def test_sign_verifies_with_sbverify(tmp_path: Path, keypair: tuple[bytes, bytes]) -> None:
    _, cert_path = _files(tmp_path, keypair)
    image = make_pe([(".text", b"\x90" * 3000), (".data", b"D" * 777)])
    signed = sign_pe(image, file_signer(*keypair))
    (tmp_path / "s.efi").write_bytes(signed)
    result = _sbverify("--cert", str(cert_path), str(tmp_path / "s.efi"))
    assert result.returncode == 0, result.stderr
    listing = _sbverify("--list", str(tmp_path / "s.efi")).stdout
    assert re.findall(r"^signature \d+$", listing, re.MULTILINE) == ["signature 1"] and "reprobuild test Secure Boot" in listing
    assert verify_pe_signature(signed, keypair[1])
    pe = parse_pe(signed)
    assert pe.cert_table.virtual_address == len(image) and pe.cert_table.size % 8 == 0
    assert len(signed) == pe.cert_table.virtual_address + pe.cert_table.size
    assert pe.optional["CheckSum"] == pe_checksum(signed, pe.checksum_offset)
    # The signed image hash is that of the unsigned image.
    assert read_signatures(signed)[0].image_digest == authenticode_digest(image)


def test_signing_is_deterministic(keypair: tuple[bytes, bytes]) -> None:
    image = make_pe()
    assert sign_pe(image, file_signer(*keypair)) == sign_pe(image, file_signer(*keypair))


def test_tampered_section_fails(tmp_path: Path, keypair: tuple[bytes, bytes]) -> None:
    _, cert_path = _files(tmp_path, keypair)
    signed = bytearray(sign_pe(make_pe([(".text", b"\x90" * 3000)]), file_signer(*keypair)))
    text = parse_pe(signed).section(".text")
    assert text is not None
    signed[text.pointer_to_raw_data + 10] ^= 0x01
    (tmp_path / "t.efi").write_bytes(signed)
    assert _sbverify("--cert", str(cert_path), str(tmp_path / "t.efi")).returncode != 0
    assert not verify_pe_signature(bytes(signed), keypair[1])


def test_wrong_certificate_fails(tmp_path: Path, keypair: tuple[bytes, bytes], other_keypair: tuple[bytes, bytes]) -> None:
    signed = sign_pe(make_pe(), file_signer(*keypair))
    (tmp_path / "s.efi").write_bytes(signed)
    (tmp_path / "other.pem").write_bytes(other_keypair[1])
    assert _sbverify("--cert", str(tmp_path / "other.pem"), str(tmp_path / "s.efi")).returncode != 0
    assert not verify_pe_signature(signed, other_keypair[1])


def test_refuses_signed_image(keypair: tuple[bytes, bytes]) -> None:
    with pytest.raises(PeInvalid, match="already signed"):
        sign_pe(sign_pe(make_pe(), file_signer(*keypair)), file_signer(*keypair))


def test_matches_sbsign_structure_and_verifies_sbsign(tmp_path: Path, keypair: tuple[bytes, bytes]) -> None:
    """sbsign's SpcIndirectDataContent is byte-identical to ours; our verifier accepts sbsign's output."""
    key_path, cert_path = _files(tmp_path, keypair)
    image = make_pe([(".text", b"\x90" * 3000)])
    (tmp_path / "u.efi").write_bytes(image)
    subprocess.run(["sbsign", "--key", str(key_path), "--cert", str(cert_path), "--output", str(tmp_path / "sb.efi"),
                    str(tmp_path / "u.efi")], check=True, capture_output=True)  # fmt: skip
    theirs = (tmp_path / "sb.efi").read_bytes()
    assert verify_pe_signature(theirs, keypair[1])
    (sig,) = read_signatures(theirs)
    ours = spc_indirect_data_content(authenticode_digest(image))
    assert der_decode(ours)[0].value == sig.idc_value
    # Everything before the signature is what sbsign produced, except CheckSum and the cert directory.
    mine = sign_pe(image, file_signer(*keypair))
    pe = parse_pe(mine)
    skip = set(range(pe.checksum_offset, pe.checksum_offset + 4)) | set(range(pe.cert_dir_offset, pe.cert_dir_offset + 8))
    assert all(mine[i] == theirs[i] for i in range(len(image)) if i not in skip)


def test_no_signing_time_attribute(keypair: tuple[bytes, bytes]) -> None:
    signed = sign_pe(make_pe(), file_signer(*keypair))
    assert bytes.fromhex("06092a864886f70d010905") not in read_signatures(signed)[0].der  # signingTime OID


def test_signing_time_large_image(keypair: tuple[bytes, bytes]) -> None:
    image = make_pe([(".text", b"\x90" * 1000), (".linux", bytes(range(256)) * 60000)])  # ~15 MiB
    start = time.perf_counter()
    signed = sign_pe(image, file_signer(*keypair))
    elapsed = time.perf_counter() - start
    assert verify_pe_signature(signed, x509.load_pem_x509_certificate(keypair[1]))
    assert elapsed < 5, f"signing 15 MiB took {elapsed:.2f}s"
