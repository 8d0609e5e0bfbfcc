"""root-verity-sig partition and the X.509 helper: repart format, determinism, openssl cross-checks."""

import base64
import dataclasses
import json
import shutil
import subprocess

import pytest
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs7

from reprobuild import x509
from reprobuild.errors import BuildError
from reprobuild.image import veritysig
from reprobuild.signer import file_signer

ROOT = bytes.fromhex("9aaa750b24ed1124a8ab9fdf60df67422c9617a9fbbedf05ae83abc758faffd1")


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    key_pem, cert_pem = x509.generate_rsa_key_and_certificate("reprobuild test")
    (d / "key.pem").write_bytes(key_pem)
    (d / "cert.pem").write_bytes(cert_pem)
    return d, x509.load_key(key_pem), x509.load_certificate(cert_pem)


def test_certificate_is_deterministic_and_clock_free(keypair):
    _, key, cert = keypair
    assert x509.make_certificate(key, "reprobuild test") == cert
    assert cert.not_valid_before_utc.year == 1970 and cert.not_valid_after_utc.year == 9999
    assert cert.serial_number == x509.serial_for_key(key) > 0
    eku = cert.extensions.get_extension_for_class(cx509.ExtendedKeyUsage).value
    assert cx509.oid.ExtendedKeyUsageOID.CODE_SIGNING in eku
    assert len(x509.certificate_fingerprint(cert)) == 64
    assert x509.key_matches_certificate(key, cert)


def test_load_errors_are_domain_errors():
    with pytest.raises(x509.CertificateInvalid):
        x509.load_certificate(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with pytest.raises(x509.CertificateInvalid):
        x509.load_key(b"not a key")


def test_sig_partition_format(keypair):
    _, key, cert = keypair
    blob = veritysig.make_verity_sig(ROOT, file_signer(key, cert))
    assert len(blob) == 16384
    text = blob.rstrip(b"\0")
    assert set(blob[len(text):]) == {0}
    doc = json.loads(text)
    assert list(doc) == ["rootHash", "certificateFingerprint", "signature"]
    assert text == json.dumps(doc, separators=(",", ":")).encode()  # compact, no newline
    assert doc["rootHash"] == ROOT.hex()
    assert doc["certificateFingerprint"] == x509.certificate_fingerprint(cert)
    base64.b64decode(doc["signature"], validate=True)


def test_signature_is_deterministic(keypair):
    _, key, cert = keypair
    assert veritysig.make_verity_sig(ROOT, file_signer(key, cert)) == veritysig.make_verity_sig(ROOT, file_signer(key, cert))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_same_bytes_as_openssl_pkcs7_sign(keypair, tmp_path):
    """OpenSSL's PKCS7_sign(DETACHED|NOATTR|BINARY), which repart calls, gives identical DER."""
    d, key, cert = keypair
    (tmp_path / "content").write_bytes(ROOT.hex().encode())
    subprocess.run(["openssl", "smime", "-sign", "-binary", "-noattr", "-outform", "DER", "-md", "sha256",
                    "-signer", str(d / "cert.pem"), "-inkey", str(d / "key.pem"),
                    "-in", str(tmp_path / "content"), "-out", str(tmp_path / "o.der")], check=True)
    assert (tmp_path / "o.der").read_bytes() == veritysig.sign_root_hash(ROOT, file_signer(key, cert))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_verify_native_and_openssl(keypair):
    d, key, cert = keypair
    sig = veritysig.parse_verity_sig(veritysig.make_verity_sig(ROOT, file_signer(key, cert)))
    veritysig.check_verity_sig(sig, ROOT, cert)
    veritysig.check_verity_sig_openssl(sig, d / "cert.pem")
    broken = dataclasses.replace(sig, signature=sig.signature[:-1] + bytes([sig.signature[-1] ^ 1]))
    with pytest.raises(veritysig.VeritySigMismatch):
        veritysig.check_verity_sig(broken, ROOT, cert)
    with pytest.raises(veritysig.VeritySigMismatch):
        veritysig.check_verity_sig_openssl(broken, d / "cert.pem")
    with pytest.raises(veritysig.VeritySigMismatch, match="root hash"):
        veritysig.check_verity_sig(sig, bytes(32), cert)


def test_other_certificate_rejected(keypair):
    _, key, cert = keypair
    sig = veritysig.parse_verity_sig(veritysig.make_verity_sig(ROOT, file_signer(key, cert)))
    _, other_pem = x509.generate_rsa_key_and_certificate("someone else")
    other = x509.load_certificate(other_pem)
    with pytest.raises(veritysig.VeritySigMismatch, match="names certificate"):
        veritysig.check_verity_sig(sig, ROOT, other)
    anonymous = dataclasses.replace(sig, certificate_fingerprint=None)
    with pytest.raises(veritysig.VeritySigMismatch, match="does not verify"):
        veritysig.check_verity_sig(anonymous, ROOT, other)


def test_ecdsa_key_refused(keypair):
    _, _, cert = keypair
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(BuildError, match="RSA"):
        file_signer(ec_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), cert)


@pytest.mark.parametrize("blob,message", [
    (b"\0" * 16384, "not JSON"),
    (b"[1,2]", "not an object"),
    (b'{"rootHash":"zz","signature":""}', "rootHash"),
    (b'{"rootHash":"00","signature":"***"}', "base64"),
    (b'{"rootHash":"00","certificateFingerprint":"ab","signature":""}', "certificateFingerprint"),
    (b'{"rootHash":"00"}', "signature missing"),
    (b'{"rootHash":"00",\0"signature":""}', "NUL"),
], ids=["all-zero", "array", "bad-hex", "bad-base64", "short-fingerprint", "no-signature", "inner-nul"])
def test_hostile_sig_blobs(blob, message):
    with pytest.raises(veritysig.VeritySigInvalid, match=message):
        veritysig.parse_verity_sig(blob)


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x06\x01\x00", b"\x30\x84\xff\xff\xff\xff", b"\x04\x00"],
                         ids=["empty", "not-signed-data", "huge-length", "wrong-tag"])
def test_hostile_pkcs7(keypair, der):
    _, _, cert = keypair
    sig = veritysig.VeritySignature(ROOT.hex(), None, der)
    with pytest.raises(veritysig.VeritySigInvalid):
        veritysig.check_verity_sig(sig, ROOT, cert)


def test_pkcs7_equals_cryptography_builder(keypair):
    """Our DER SignedData (built around the signer's one RSA signature) is byte-identical to
    cryptography's PKCS7SignatureBuilder with the same options (and so to OpenSSL's PKCS7_sign)."""
    _, key, cert = keypair
    opts = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.NoAttributes, pkcs7.PKCS7Options.Binary]
    theirs = (pkcs7.PKCS7SignatureBuilder().set_data(ROOT.hex().encode()).add_signer(cert, key, hashes.SHA256())
              .sign(serialization.Encoding.DER, opts))  # fmt: skip
    assert veritysig.sign_root_hash(ROOT, file_signer(key, cert)) == theirs
