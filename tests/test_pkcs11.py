"""RSA signing keys in a real PKCS#11 token (SoftHSM2): Authenticode and verity signatures made in
the token are byte-identical to those made from the same keys as files; PIN handling; URIs.

The token is initialised by the test in a temporary directory (SOFTHSM2_CONF points there) and
holds the verity and Secure Boot keys, imported from the PEM files the file-key signatures use.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reprobuild.config import load_spec
from reprobuild.errors import ConfigError
from reprobuild.image import veritysig
from reprobuild.image.authenticode import sign_pe, verify_pe_signature
from reprobuild.pkcs11key import Pkcs11Signer
from reprobuild.pkcs11uri import TokenError, parse_uri
from reprobuild.signer import key_identity, open_signer
from reprobuild.x509 import generate_rsa_key_and_certificate
from tests.test_pe import make_pe

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN = "reprobuild-test"
PIN, SO_PIN = "4711", "0815"
ROOT_HASH = bytes.fromhex("9aaa750b24ed1124a8ab9fdf60df67422c9617a9fbbedf05ae83abc758faffd1")

pytestmark = pytest.mark.skipif(not MODULE.exists() or shutil.which("softhsm2-util") is None,
                                reason="needs softhsm2")  # fmt: skip


@dataclass(frozen=True)
class Token:
    directory: Path
    conf: Path
    pin_file: Path
    keys: dict[str, tuple[Path, Path]]  # name -> (key file, certificate file)

    def uri(self, name: str, pin_source: str | None = None) -> str:
        source = pin_source or f"file:{self.pin_file}"
        return f"pkcs11:token={TOKEN};object={name}?module-path={MODULE}&pin-source={source}"


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN,
                        "--so-pin", SO_PIN], check=True, capture_output=True)  # fmt: skip
        keys = {}
        for number, name in enumerate(("verity", "secure-boot"), 1):
            key_pem, cert_pem = generate_rsa_key_and_certificate(f"reprobuild {name} (token test)")
            key, cert = d / f"{name}.key", d / f"{name}.crt"
            key.write_bytes(key_pem)
            key.chmod(0o600)
            cert.write_bytes(cert_pem)
            subprocess.run(["softhsm2-util", "--import", str(key), "--token", TOKEN, "--label", name,
                            "--id", f"{number:02x}", "--pin", PIN], check=True, capture_output=True)  # fmt: skip
            keys[name] = (key, cert)
        pin_file = d / "pin"
        pin_file.write_text(PIN + "\n")
        pin_file.chmod(0o600)
        yield Token(d, conf, pin_file, keys)


def _env(token: Token, **extra: str) -> dict[str, str]:
    return {"SOFTHSM2_CONF": str(token.conf), **extra}


def test_authenticode_from_token_is_byte_identical(token: Token, tmp_path: Path) -> None:
    key, cert = token.keys["secure-boot"]
    in_token = open_signer(token.uri("secure-boot"), cert, _env(token))
    from_file = open_signer(key, cert, {})
    image = make_pe([(".text", b"\x90" * 5000), (".data", bytes(range(256)) * 8)])
    signed = sign_pe(image, in_token)
    assert signed == sign_pe(image, from_file)
    assert verify_pe_signature(signed, cert.read_bytes())
    if shutil.which("sbverify"):
        (tmp_path / "signed.efi").write_bytes(signed)
        result = subprocess.run(["sbverify", "--cert", str(cert), str(tmp_path / "signed.efi")],
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_verity_signature_from_token_is_byte_identical(token: Token) -> None:
    key, cert = token.keys["verity"]
    in_token = open_signer(token.uri("verity", "env:TOKEN_PIN"), cert, _env(token, TOKEN_PIN=PIN))
    blob = veritysig.make_verity_sig(ROOT_HASH, in_token)
    assert blob == veritysig.make_verity_sig(ROOT_HASH, open_signer(key, cert, {}))
    sig = veritysig.parse_verity_sig(blob)
    veritysig.check_verity_sig_openssl(sig, cert)


def test_token_without_the_hashing_mechanism_path(token: Token) -> None:
    """CKM_RSA_PKCS over the DER DigestInfo (for tokens without CKM_SHA256_RSA_PKCS): same bytes."""
    key, cert = token.keys["verity"]
    signer = open_signer(token.uri("verity"), cert, _env(token))
    assert isinstance(signer, Pkcs11Signer)
    raw = dataclasses.replace(signer, hash_in_token=False)
    assert raw.sign(b"root hash") == signer.sign(b"root hash") == open_signer(key, cert, {}).sign(b"root hash")


def test_wrong_pin_is_a_one_line_error_without_the_pin(token: Token) -> None:
    _, cert = token.keys["verity"]
    with pytest.raises(TokenError) as e:
        open_signer(token.uri("verity", "env:TOKEN_PIN"), cert, _env(token, TOKEN_PIN="98765"))
    message = e.value.format_message()
    assert "wrong PIN" in message and "\n" not in message and "98765" not in message and PIN not in message
    with pytest.raises(TokenError, match="TOKEN_PIN is not set"):
        open_signer(token.uri("verity", "env:TOKEN_PIN"), cert, _env(token))
    with pytest.raises(TokenError, match="cannot read the PIN file"):
        open_signer(token.uri("verity", "file:/nonexistent/pin"), cert, _env(token))


def test_token_key_must_match_the_certificate(token: Token) -> None:
    _, sb_cert = token.keys["secure-boot"]
    with pytest.raises(TokenError, match="is not the key of the certificate"):
        open_signer(token.uri("verity"), sb_cert, _env(token))
    with pytest.raises(TokenError, match="no RSA private key"):
        open_signer(token.uri("nothing-here"), sb_cert, _env(token))
    with pytest.raises(TokenError, match="no such token"):
        open_signer(token.uri("verity").replace(TOKEN, "other-token"), sb_cert, _env(token))


def test_uri_parsing() -> None:
    uri = parse_uri("pkcs11:token=My%20Token;id=%01%02;object=k?module-path=/m.so&pin-source=env:X")
    assert uri.text("token") == "My Token" and uri.get("id") == b"\x01\x02" and uri.module_path == "/m.so"
    assert uri.identity() == "pkcs11:id=0102;object=k;token=My Token"
    for bad, why in (("pkcs11:object=k", "name the token"), ("pkcs11:token=t", "name the key"),
                     ("pkcs11:token=t;object=k;type=public", "type=private"),
                     ("pkcs11:token=t;object=k;color=red", "unsupported"),
                     ("pkcs11:token=t;object=k?pin-value=1234", "pin-value")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_uri(bad)


def test_config_accepts_uris_and_refuses_pins(tmp_path: Path) -> None:
    uri = "pkcs11:token=t;object=sb?pin-source=file:/run/pin"
    (tmp_path / "reprobuild.conf").write_text(f"[Signing]\nSecureBootKey={uri}\nVerityKey=keys/v.key\n"
                                              "LockKey=agent:release@example\n")  # fmt: skip
    spec = load_spec(tmp_path)
    assert spec.signing.secure_boot_key == uri and spec.signing.lock_key == "agent:release@example"
    assert spec.signing.verity_key == tmp_path / "keys/v.key"
    (tmp_path / "reprobuild.conf").write_text("[Signing]\nVerityKey=pkcs11:token=t;object=v?pin-value=secret99\n")
    with pytest.raises(ConfigError) as e:
        load_spec(tmp_path)
    assert "pin-value" in e.value.message and "secret99" not in e.value.message


def test_readable_pin_file_warns(token: Token, tmp_path: Path) -> None:
    from reprobuild.config import SigningConfig
    from reprobuild.signer import key_file_warnings

    pin = tmp_path / "pin"
    pin.write_text(PIN + "\n")
    pin.chmod(0o640)
    warnings = key_file_warnings(SigningConfig(verity_key=token.uri("verity", f"file:{pin}")))
    assert len(warnings) == 1 and "PIN file" in warnings[0] and PIN not in warnings[0]
    assert key_file_warnings(SigningConfig(verity_key=token.uri("verity"))) == []  # the fixture's is 0600


def test_cache_identity_is_key_and_uri_never_pin(token: Token) -> None:
    a = key_identity(token.uri("verity", "file:/one"))
    assert a == key_identity(token.uri("verity", "env:OTHER")) == "pkcs11:object=verity;token=" + TOKEN
    assert a != key_identity(token.uri("secure-boot"))
    assert PIN not in repr(open_signer(token.uri("verity"), token.keys["verity"][1], _env(token)))


# -- a whole build with the token's key ----------------------------------------------------------


def _disk_definition(root: Path, key: str, cert: Path) -> tuple[Path, Path]:
    """The hermetic one-package fixture as a signed-verity disk image, keyed by ``key``."""
    from dataclasses import replace

    from fixtures.make_host_base import build_host_base
    from reprobuild.lockfile import load_lock, save_lock
    from tests.check_fixture import make_definition

    root.mkdir(parents=True)
    d = make_definition(root, "http://127.0.0.1:9/unused", leak=False, base_deb=build_host_base(root))
    conf = (d / "reprobuild.conf").read_text().replace("Format=tar", "Format=disk\nVerity=signed")
    (d / "reprobuild.conf").write_text(conf + f"\n[Signing]\nVerityKey={key}\nVerityCertificate={cert}\n")
    spec = load_spec(d)
    lock = load_lock(d / "reprobuild.lock")
    save_lock(replace(lock, config_digest=spec.digest(), config=spec.digest_input()), d / "reprobuild.lock")
    return d, root / "store"


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os
    import sys

    full = {**os.environ, **env}
    full.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run([sys.executable, "-m", "reprobuild", *args], env=full, text=True, capture_output=True,
                          timeout=600, check=False)  # fmt: skip


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="needs erofs-utils")
def test_disk_built_with_the_token_key_is_byte_identical(token: Token, tmp_path: Path) -> None:
    key, cert = token.keys["verity"]
    outputs = {}
    for name, source in (("token", token.uri("verity", "env:TOKEN_PIN")), ("file", str(key))):
        d, store = _disk_definition(tmp_path / name, source, cert)
        env = {**_env(token, TOKEN_PIN=PIN), "REPROBUILD_STORE": str(store)}
        if name == "file":
            key.chmod(0o644)  # a readable key file: the build warns, once
        try:
            r = _cli(["build", "-C", str(d), "--locked", "--offline", "-o", str(tmp_path / name / "out")], env)
        finally:
            key.chmod(0o600)
        assert r.returncode == 0, r.stderr[-3000:]
        warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: private key")]
        assert len(warnings) == (1 if name == "file" else 0), r.stderr
        outputs[name] = tmp_path / name / "out" / "image.raw"
        manifest = (tmp_path / name / "out" / "image.raw.manifest.json").read_text()
        assert PIN not in manifest and PIN not in r.stderr and PIN not in r.stdout
        verified = _cli(["verify", str(outputs[name]), "--lock", str(d / "reprobuild.lock"), "--certificate", str(cert),
                         "--store", str(store), "--json"], env)  # fmt: skip
        assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-2000:]
    assert outputs["token"].read_bytes() == outputs["file"].read_bytes()
    # A wrong PIN: a one-line error, exit 1, no image, the PIN nowhere.
    d, store = _disk_definition(tmp_path / "wrong", token.uri("verity", "env:TOKEN_PIN"), cert)
    env = {**_env(token, TOKEN_PIN="13579"), "REPROBUILD_STORE": str(store)}
    r = _cli(["build", "-C", str(d), "--locked", "--offline", "-o", str(tmp_path / "wrong" / "out")], env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "wrong PIN" in errors[0], r.stderr[-2000:]
    assert "13579" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "wrong" / "out" / "image.raw").exists()
    assert "building the root tree" not in r.stderr, "the PIN is checked before the build starts"
