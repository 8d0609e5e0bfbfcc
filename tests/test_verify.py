"""Hermetic tests of `reprobuild verify` on a small signed DDI built directly with image.ddi.

The fixture image has what a bootable build has, in miniature: a root "file system" (4 MiB of
pseudo-random bytes: verity does not care what the data is), its dm-verity hash partition and
signature partition (signed with a test RSA key), and an ESP holding a UKI (a tiny PE built with
tests.test_pe.make_pe) whose .cmdline pins the root hash, Authenticode-signed. The manifest is
written as build.py writes it, the lock is signed with a test ed25519 key. Every tamper case
from issue 8 must fail with the named check and a non-zero exit status through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from reprobuild import keys
from reprobuild.build import lock_digest
from reprobuild.cli import main
from reprobuild.image import gpt, ids, verity, veritysig
from reprobuild.image.authenticode import sign_pe
from reprobuild.image.ddi import DdiSpec, build_ddi
from reprobuild.image.esp import make_esp
from reprobuild.image.uki import build_uki
from reprobuild.lockfile import Lock, LockedPackage, LockSource, PackageSet, dumps, save_lock
from reprobuild.signer import file_signer
from reprobuild.verify import VerifyOptions, verify_image
from reprobuild.x509 import generate_rsa_key_and_certificate
from tests.test_uki import fake_kernel, fake_stub

EPOCH = 1735689600
SEED = "0123456789abcdef0123456789abcdef"


def make_lock(seed: str = SEED, extra: str = "") -> Lock:
    source = LockSource(id="trixie/main", archive="debian", suite="trixie", codename="trixie", component="main",
                        date="Wed, 01 Jan 2025 00:00:00 UTC", snapshot="20250101T000000Z",
                        inrelease_sha256="1" * 64, packages_sha256="2" * 64)
    names = ["base-files", "dash", "libc6"] + ([extra] if extra else [])
    packages = tuple(
        LockedPackage(name=n, version="1.0-1", architecture="amd64", source="trixie/main", source_package=n,
                      source_version="1.0-1", path=f"pool/main/{n[0]}/{n}/{n}_1.0-1_amd64.deb", size=1000,
                      sha256=hashlib.sha256(n.encode()).hexdigest(), installed_size=10, essential=True,
                      priority="required", multi_arch="no", depends=(), pre_depends=(), reason="requested")
        for n in names)
    return Lock(config_digest="sha256:" + "3" * 64, distribution="debian", release="trixie", architecture="amd64",
                source_date_epoch=EPOCH, seed=seed, sources=(source,),
                sets=(PackageSet("image", "trixie", "minbase", tuple(names), False, packages),))


@dataclass(frozen=True)
class Fixture:
    dir: Path
    image: Path
    lock: Path
    pub: Path
    lock_key: Path
    verity_crt: Path
    sb_crt: Path
    other_verity: tuple[bytes, bytes]
    other_sb: tuple[bytes, bytes]

    def certs(self) -> list[Path]:
        return [self.verity_crt, self.sb_crt]


def build_image(out: Path, lock: Lock, verity_pair: tuple[bytes, bytes], sb_pair: tuple[bytes, bytes]) -> Path:
    """image.raw + manifest + roothash in ``out``, the way build.py lays them out."""
    out.mkdir(parents=True, exist_ok=True)
    seed = bytes.fromhex(lock.seed)
    rng = random.Random(lock.seed)
    root_fs = out / "root.img"
    root_fs.write_bytes(rng.randbytes(4 << 20))
    params = verity.VerityParams(ids.verity_salt(seed), ids.verity_superblock_uuid(seed))
    root_hash = verity.hash_file(root_fs, params).root_hash.hex()
    cmdline = f"roothash={root_hash} systemd.firstboot=off"
    uki = sign_pe(build_uki(fake_stub(), fake_kernel(), b"initrd", cmdline, "ID=debian\n", "6.1.0"),
                  file_signer(*sb_pair))
    esp = out / "esp.img"
    make_esp({"EFI/BOOT/BOOTX64.EFI": uki}, esp, volume_id=0x1234ABCD, label="ESP", epoch=EPOCH)
    (out / "verity.key").write_bytes(verity_pair[0])
    (out / "verity.crt").write_bytes(verity_pair[1])
    target = out / "image.raw"
    result = build_ddi(DdiSpec(architecture="x86-64", seed=seed, root_fs_image=root_fs, output=target,
                               verity="signed", key=out / "verity.key", certificate=out / "verity.crt",
                               esp_image=esp))
    manifest = {"format": "disk", "lock_digest": lock_digest(lock), "config_digest": lock.config_digest,
                "source_date_epoch": lock.source_date_epoch, "release": lock.release,
                "architecture": lock.architecture,
                "packages": [f"{p.name}={p.version}:{p.architecture}" for p in lock.package_set("image").packages],
                "boot": {"cmdline": cmdline, "uki_path": "EFI/BOOT/BOOTX64.EFI", "uki_signed": True,
                         "uki_sha256": hashlib.sha256(uki).hexdigest(), "bootloader": "uki"}}
    manifest.update(result.manifest())
    manifest["sha256"], manifest["size"] = result.sha256, result.size
    (out / "image.raw.manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / "image.roothash").write_text(result.root_hash + "\n")
    for tmp in (root_fs, esp, out / "verity.key"):
        tmp.unlink()
    return target


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    d = tmp_path_factory.mktemp("verify")
    lock_key, pub = keys.generate_keypair(d / "keys" / "lock")
    verity_pair = generate_rsa_key_and_certificate("test verity")
    sb_pair = generate_rsa_key_and_certificate("test secure boot")
    (d / "keys" / "verity.crt").write_bytes(verity_pair[1])
    (d / "keys" / "sb.crt").write_bytes(sb_pair[1])
    lock = make_lock()
    lock_path = d / "def" / "reprobuild.lock"
    data = save_lock(lock, lock_path)
    (d / "def" / "reprobuild.lock.sig").write_bytes(keys.sign_lock(data, keys.open_lock_signer(lock_key, {})))
    image = build_image(d / "out", lock, verity_pair, sb_pair)
    return Fixture(d, image, lock_path, pub, lock_key, d / "keys" / "verity.crt", d / "keys" / "sb.crt",
                   generate_rsa_key_and_certificate("other verity"), generate_rsa_key_and_certificate("other sb"))


@pytest.fixture
def fx(pristine: Fixture, tmp_path: Path) -> Fixture:
    """A private copy of the pristine image, lock and signature for one test to tamper with."""
    shutil.copytree(pristine.image.parent, tmp_path / "out")
    shutil.copytree(pristine.lock.parent, tmp_path / "def")
    return replace(pristine, image=tmp_path / "out" / "image.raw", lock=tmp_path / "def" / "reprobuild.lock")


def run_cli(fx: Fixture, capsys: pytest.CaptureFixture[str], *extra: str, pub: Path | None = None) -> tuple[int, dict]:
    argv = ["verify", str(fx.image), "--lock", str(fx.lock), "--trusted-key", str(pub or fx.pub),
            "--certificate", str(fx.verity_crt), "--certificate", str(fx.sb_crt), "--no-rebuild", "--json", *extra]
    code = call_main(argv)
    return code, json.loads(capsys.readouterr().out)


def call_main(argv: list[str]) -> int:
    """The CLI's exit status (main() returns normally on success)."""
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def partition(fx: Fixture, role: str) -> gpt.GptPartition:
    disk = gpt.read_gpt_path(fx.image)
    for p in disk.partitions:
        t = ids.type_by_guid(p.type_guid)
        if t is not None and t.role.value == role:
            return p
    raise AssertionError(role)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


# -- a correct image -----------------------------------------------------------------------------


def test_correct_image_verifies(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_cli(fx, capsys)
    s = statuses(report)
    assert code == 0 and report["ok"], report
    for name in ("lock-signature", "manifest-lock", "image-digest", "gpt", "partition-hashes", "verity-root-hash",
                 "verity-hash-tree", "verity-signature", "uki-signature", "uki-roothash"):
        assert s[name] == "passed", (name, report)
    assert s["rebuild"] == "skipped"


def test_text_output_names_each_check(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    code = call_main(["verify", str(fx.image), "--lock", str(fx.lock), "--trusted-key", str(fx.pub), "--no-rebuild",
                      "--certificate", str(fx.verity_crt), "--certificate", str(fx.sb_crt)])
    out = capsys.readouterr().out
    assert code == 0
    assert "PASS  verity-root-hash" in out and "SKIP  rebuild" in out
    assert out.strip().splitlines()[-1] == (f"{fx.image}: verified: 10 checks passed; "
                                            "not checked: rebuild (--no-rebuild)")


def test_without_trust_anchors_present_signatures_fail(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    """Fail closed: the lock .sig, the verity signature and the signed UKI are present, none can be
    checked without a key/certificate, so each fails and the exit status is 1."""
    report = verify_image(fx.image, fx.lock)
    s = {c.name: c.status for c in report.checks}
    assert s["lock-signature"] == s["verity-signature"] == s["uki-signature"] == "failed"
    assert "embedded certificate" in report.check("verity-signature").detail
    assert "--allow-unsigned verity" in report.check("verity-signature").detail
    assert not report.ok
    code = call_main(["verify", str(fx.image), "--lock", str(fx.lock), "--no-rebuild"])
    out = capsys.readouterr().out
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert "NOT verified: 3 of " in last and "lock-signature, verity-signature, uki-signature" in last
    assert last.endswith("not checked: rebuild (--no-rebuild)")


def test_allow_unsigned_names_what_it_allows(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["verify", str(fx.image), "--lock", str(fx.lock), "--no-rebuild", "--allow-unsigned", "lock",
            "--allow-unsigned", "verity"]
    assert call_main(argv) == 1  # the UKI's signature is still unchecked and not allowed
    assert "(uki-signature)" in capsys.readouterr().out
    assert call_main([*argv, "--allow-unsigned", "uki"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"{fx.image}: verified: 7 checks passed; not checked: lock-signature (--allow-unsigned lock), "
                    "verity-signature (--allow-unsigned verity), uki-signature (--allow-unsigned uki), "
                    "rebuild (--no-rebuild)")
    code = call_main([*argv, "--allow-unsigned", "uki", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["summary"] == last.split(": ", 1)[1]
    assert {"name": "rebuild", "reason": "--no-rebuild"} in data["not_checked"]


def test_unsigned_lock_without_key_is_reported_not_failed(fx: Fixture) -> None:
    fx.lock.with_name("reprobuild.lock.sig").unlink()
    report = verify_image(fx.image, fx.lock, None, fx.certs())
    c = report.check("lock-signature")
    assert c.passed is None and c.reason == "the lock is unsigned"
    assert report.ok and "lock-signature (the lock is unsigned)" in report.summary


def test_quiet_prints_nothing_on_success_and_the_verdict_on_failure(fx: Fixture,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ok = ["verify", str(fx.image), "--lock", str(fx.lock), "--trusted-key", str(fx.pub), "--no-rebuild",
          "--certificate", str(fx.verity_crt), "--certificate", str(fx.sb_crt), "-q"]
    assert call_main(ok) == 0
    assert capsys.readouterr().out == ""
    assert call_main(["verify", str(fx.image), "--lock", str(fx.lock), "--no-rebuild", "-q"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(ln.startswith("FAIL") for ln in lines[:3])
    assert "NOT verified" in lines[-1] and "not checked: rebuild (--no-rebuild)" in lines[-1]


# -- each tamper case fails with the right check named -------------------------------------------


def _expect(code: int, report: dict, *names: str) -> None:
    s = statuses(report)
    assert code == 1 and not report["ok"]
    for name in names:
        assert s[name] == "failed", (name, s)


def test_lock_edited_after_signing(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    text = fx.lock.read_text().replace('"dash"', '"dash-evil"', 1)
    fx.lock.write_text(text)
    code, report = run_cli(fx, capsys)
    _expect(code, report, "lock-signature")
    assert "changed after signing" in {c["name"]: c["detail"] for c in report["checks"]}["lock-signature"]


def test_wrong_trusted_key(fx: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, other_pub = keys.generate_keypair(tmp_path / "other")
    code, report = run_cli(fx, capsys, pub=other_pub)
    _expect(code, report, "lock-signature")
    assert statuses(report)["manifest-lock"] == "passed"


def test_root_partition_byte_flipped(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    p = partition(fx, "root")
    flip(fx.image, p.offset(512) + 123457)
    code, report = run_cli(fx, capsys)
    _expect(code, report, "image-digest", "partition-hashes", "verity-root-hash")
    assert statuses(report)["gpt"] == "passed"


def test_hash_partition_altered(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    p = partition(fx, "root-verity")
    flip(fx.image, p.offset(512) + 4096 + 7)  # level 0 of the stored tree, after the superblock
    code, report = run_cli(fx, capsys)
    _expect(code, report, "verity-hash-tree", "partition-hashes")
    assert statuses(report)["verity-root-hash"] == "passed"  # the data still gives the signed root hash


def test_signature_partition_from_another_key(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    p = partition(fx, "root-verity-sig")
    manifest = json.loads(fx.image.with_name("image.raw.manifest.json").read_text())
    signer = file_signer(*fx.other_verity)
    write_at(fx.image, p.offset(512), veritysig.make_verity_sig(bytes.fromhex(manifest["root_hash"]), signer))
    code, report = run_cli(fx, capsys)
    _expect(code, report, "verity-signature")
    assert statuses(report)["verity-root-hash"] == "passed"


def test_uki_resigned_with_another_key(fx: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = json.loads(fx.image.with_name("image.raw.manifest.json").read_text())
    uki = sign_pe(build_uki(fake_stub(), fake_kernel(), b"initrd", manifest["boot"]["cmdline"], "ID=debian\n",
                            "6.1.0"), file_signer(*fx.other_sb))
    esp = tmp_path / "esp.img"
    p = partition(fx, "esp")
    make_esp({"EFI/BOOT/BOOTX64.EFI": uki}, esp, size=p.size(512), volume_id=0x1234ABCD, label="ESP", epoch=EPOCH)
    write_at(fx.image, p.offset(512), esp.read_bytes())
    code, report = run_cli(fx, capsys)
    _expect(code, report, "uki-signature")
    assert statuses(report)["uki-roothash"] == "passed"


def test_uki_pinning_another_root_hash(fx: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    other = "ab" * 32
    uki = sign_pe(build_uki(fake_stub(), fake_kernel(), b"initrd", f"roothash={other}", "ID=debian\n", "6.1.0"),
                  file_signer(*fx.other_sb))
    esp = tmp_path / "esp.img"
    p = partition(fx, "esp")
    make_esp({"EFI/BOOT/BOOTX64.EFI": uki}, esp, size=p.size(512), volume_id=0x1234ABCD, label="ESP", epoch=EPOCH)
    write_at(fx.image, p.offset(512), esp.read_bytes())
    code, report = run_cli(fx, capsys)
    _expect(code, report, "uki-roothash")


def test_manifest_edited(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    path = fx.image.with_name("image.raw.manifest.json")
    manifest = json.loads(path.read_text())
    manifest["packages"][1] = "dash=9.9-9:amd64"
    path.write_text(json.dumps(manifest))
    code, report = run_cli(fx, capsys)
    _expect(code, report, "manifest-lock")


def test_manifest_root_hash_edited(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    path = fx.image.with_name("image.raw.manifest.json")
    manifest = json.loads(path.read_text())
    manifest["root_hash"] = "00" * 32
    path.write_text(json.dumps(manifest))
    code, report = run_cli(fx, capsys)
    _expect(code, report, "verity-root-hash")


def test_image_built_from_another_lock(fx: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    other = make_lock(seed="fe" * 16, extra="hello")
    other_image = build_image(tmp_path / "other-out", other, fx.other_verity, fx.other_sb)
    code, report = run_cli(replace(fx, image=other_image), capsys)
    _expect(code, report, "manifest-lock", "gpt")
    detail = {c["name"]: c["detail"] for c in report["checks"]}
    assert "lock_digest" in detail["manifest-lock"] and "hello" in detail["manifest-lock"]
    assert "seed" in detail["gpt"]


def test_missing_signature_file_fails(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    fx.lock.with_name("reprobuild.lock.sig").unlink()
    code, report = run_cli(fx, capsys)
    _expect(code, report, "lock-signature")


def test_truncated_image_fails_cleanly(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    with open(fx.image, "r+b") as f:
        f.truncate(fx.image.stat().st_size - 4096)
    code, report = run_cli(fx, capsys)
    _expect(code, report, "gpt", "image-digest")


def test_library_report_api(fx: Fixture) -> None:
    report = verify_image(fx.image, fx.lock, fx.pub, fx.certs(), VerifyOptions())
    assert report.ok and not report.failures
    assert report.check("verity-root-hash").passed is True
    assert report.as_json()["schema"] == "reprobuild-verify/1"
    assert lock_digest(make_lock()) == "sha256:" + hashlib.sha256(dumps(make_lock())).hexdigest()


def test_trusted_key_given_a_certificate_says_so(fx: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    code = call_main(["verify", str(fx.image), "--lock", str(fx.lock), "--trusted-key", str(fx.verity_crt),
                      "--certificate", str(fx.verity_crt), "--certificate", str(fx.sb_crt), "--no-rebuild", "--json"])
    detail = {c["name"]: c["detail"] for c in json.loads(capsys.readouterr().out)["checks"]}["lock-signature"]
    assert code == 1 and "X.509 certificate, not the lock's ed25519 public key" in detail
    assert "private key" not in detail
