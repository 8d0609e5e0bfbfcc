"""``reprobuild release`` end to end, hermetic: the one-package fixture definition
(tests/check_fixture.py) as a signed-verity disk with ImageId=/ImageVersion=, released twice
through the real command line with a test OpenPGP key made here by gpg.

* IMAGE_ID=/IMAGE_VERSION= land in os-release (read back from the released root file system),
  the partition labels (read by sfdisk) and the manifest;
* two releases give identical artifacts, SHA256SUMS and SHA256SUMS.gpg;
* gpgv accepts the signature with the test key and refuses it after a one-byte edit;
* the split root partition is byte for byte the partition inside image.raw (offsets from sfdisk);
* sha256sum -c accepts SHA256SUMS; without ImageVersion= the release is refused in one line.
* ``--compress xz`` and ``gzip`` give the same bytes twice, which xz(1)/gzip(1) unpack to the
  artifacts and the image's transfers match; ``zstd``, which the image's systemd-pull cannot read,
  is refused for this image with transfers and written for one without.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

from fixtures.make_host_base import build_host_base
from reprobuild.compression import SUFFIXES
from reprobuild.config import load_spec
from reprobuild.image.sysupdate import source_patterns
from reprobuild.lockfile import load_lock, save_lock
from reprobuild.progress import Update
from reprobuild.release import format_sums, write_release
from tests.check_fixture import make_definition
from tests.test_sysupdate import _matches

REPO = Path(__file__).resolve().parent.parent
NAME = "fixture-os_1.2"
OS_RELEASE = 'ID=debian\nNAME="Fixture"\nIMAGE_ID=old\n'
SOURCE = "file:///run/fixture-updates/"


def _resave_lock(d: Path) -> None:
    spec = load_spec(d)
    save_lock(replace(load_lock(d / "reprobuild.lock"), config_digest=spec.digest(), config=spec.digest_input()),
              d / "reprobuild.lock")


def _run(*argv: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "reprobuild", *argv], env=env, text=True, capture_output=True,
                       timeout=600, cwd=REPO, check=False)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict:
    for tool in ("mkfs.erofs", "gpg", "gpg-agent", "gpgv", "sfdisk", "fsck.erofs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tmp = tmp_path_factory.mktemp("release")
    d = make_definition(tmp / "fx", "http://127.0.0.1:9/unused", leak=False, base_deb=build_host_base(tmp / "hb"))
    (d / "extra/usr/lib").mkdir(parents=True)
    (d / "extra/usr/lib/os-release").write_text(OS_RELEASE)
    (d / "extra/etc").mkdir()
    os.symlink("../usr/lib/os-release", d / "extra/etc/os-release")
    keys = tmp / "keys"
    subprocess.run([sys.executable, "-m", "reprobuild", "keygen", "--verity", "--out", str(keys / "verity")],
                   check=True, capture_output=True, cwd=REPO)
    gnupg = tmp / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = {**os.environ, "REPROBUILD_STORE": str(tmp / "fx/store"), "GNUPGHOME": str(gnupg)}
    env.pop("SOURCE_DATE_EPOCH", None)
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Release Test <release@example.invalid>",
                    "ed25519", "sign", "never"], env=env, check=True, capture_output=True)
    conf = (d / "reprobuild.conf").read_text().replace("Format=tar", "Format=disk\nImageId=fixture-os\nImageVersion=1.2")
    conf += "\n[Content]\nExtraTrees=extra\n"
    conf += f"\n[Signing]\nVerityKey={keys}/verity.key\nVerityCertificate={keys}/verity.crt\n"
    conf += f"\n[Updates]\nSource={SOURCE}\nPublicKey={tmp}/pub.gpg\nSlotSize=64M\n"
    (d / "reprobuild.conf").write_text(conf)
    _resave_lock(d)
    try:
        subprocess.run(["gpg", "--batch", "--export", "--output", str(tmp / "pub.gpg")], env=env, check=True,
                       capture_output=True)
        runs = [json.loads(_run("release", "-C", str(d), "--offline", "-o", str(tmp / name), "--build-output",
                                str(tmp / f"{name}-build"), "--sign-key", "release@example.invalid", "--json",
                                *extra, env=env).stdout)
                for name, extra in (("a", ()), ("b", ("--no-cache",)))]  # b: every stage built again
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True)
    return {"tmp": tmp, "def": d, "env": env, "runs": runs, "pub": tmp / "pub.gpg"}


def _root_artifact(released: dict) -> Path:
    (root,) = (released["tmp"] / "a").glob(f"{NAME}_*.root.raw")
    return root


def test_two_releases_are_identical_and_named_by_id_and_version(released: dict) -> None:
    a, b = released["tmp"] / "a", released["tmp"] / "b"
    files = sorted(p.name for p in a.iterdir())
    uuids = {p["role"]: p["uuid"] for p in json.loads((released["tmp"] / "a-build/image.raw.manifest.json")
                                                       .read_text())["partitions"] if p["label"] == NAME}
    assert files == sorted([f"{NAME}_{uuids['root']}.root.raw", f"{NAME}_{uuids['root-verity']}.root-verity.raw",
                            f"{NAME}_{uuids['root-verity-sig']}.root-verity-sig.raw", "SHA256SUMS", "SHA256SUMS.gpg"])
    assert sorted(p.name for p in b.iterdir()) == files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # SHA256SUMS is what sha256sum(1) checks, sorted by name, and names every artifact.
    subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=a, check=True, capture_output=True)
    arts = {x["file"]: x["sha256"] for x in released["runs"][0]["artifacts"]}
    assert (a / "SHA256SUMS").read_bytes() == format_sums(arts)
    lines = (a / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == sorted(arts)


def test_gpgv_accepts_the_signature_and_refuses_an_edited_sums_file(released: dict, tmp_path: Path) -> None:
    a = released["tmp"] / "a"
    keyring = tmp_path / "trusted.gpg"
    shutil.copy(released["pub"], keyring)
    ok = subprocess.run(["gpgv", "--keyring", str(keyring), str(a / "SHA256SUMS.gpg"), str(a / "SHA256SUMS")],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    edited = tmp_path / "SHA256SUMS"
    data = bytearray((a / "SHA256SUMS").read_bytes())
    data[0] = ord("0") if data[0] != ord("0") else ord("1")
    edited.write_bytes(bytes(data))
    bad = subprocess.run(["gpgv", "--keyring", str(keyring), str(a / "SHA256SUMS.gpg"), str(edited)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "BAD signature" in bad.stderr


def test_split_partitions_are_the_partitions_of_the_image_and_labelled(released: dict) -> None:
    image = released["tmp"] / "a-build/image.raw"
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    manifest = json.loads((released["tmp"] / "a-build/image.raw.manifest.json").read_text())
    by_uuid = {p["uuid"]: p for p in manifest["partitions"]}
    roots = [p for p in table["partitions"] if p["type"].lower() == "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"]
    assert [p["name"] for p in roots] == [NAME, "_empty"]  # root x86-64 (the fixture is amd64): slots A and B
    root = roots[0]
    assert root["size"] * sector == 64 << 20  # SlotSize=64M
    with open(image, "rb") as f:
        f.seek(root["start"] * sector)
        inside = f.read(by_uuid[root["uuid"].lower()]["payload_size"])
    # The artifact is what was written into the slot (the file system), not the slot's padding.
    assert _root_artifact(released).read_bytes() == inside
    assert len(inside) == manifest["filesystem"]["size"]
    # Root, verity, signature carry <id>_<version> (sysupdate's pattern); their twins are free slots.
    assert sorted(p["name"] for p in table["partitions"]) == ["_empty"] * 3 + [NAME] * 3
    assert sorted(p["label"] for p in manifest["partitions"]) == ["_empty"] * 3 + [NAME] * 3
    assert released["runs"][0]["name"] == NAME


def test_image_id_and_version_in_os_release_and_manifest(released: dict, tmp_path: Path) -> None:
    from tests.test_pipeline import validate_manifest

    out = tmp_path / "root"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(_root_artifact(released))], check=True, capture_output=True)
    os_release = (out / "usr/lib/os-release").read_text()
    assert os_release == 'ID=debian\nNAME="Fixture"\nIMAGE_ID=fixture-os\nIMAGE_VERSION=1.2\n'
    assert os.readlink(out / "etc/os-release") == "../usr/lib/os-release"
    manifest = json.loads((released["tmp"] / "a-build/image.raw.manifest.json").read_text())
    validate_manifest(manifest)
    assert (manifest["image_id"], manifest["image_version"]) == ("fixture-os", "1.2")
    assert {"path": "/usr/lib/os-release", "action": "changed",
            "cause": "ImageId=fixture-os ImageVersion=1.2"} in manifest["added_files"]


def test_a_release_needs_image_id_and_version(released: dict, tmp_path: Path) -> None:
    d = tmp_path / "def"
    shutil.copytree(released["def"], d, symlinks=True)
    conf = (d / "reprobuild.conf").read_text().replace("ImageVersion=1.2\n", "")
    (d / "reprobuild.conf").write_text(conf)
    r = _run("release", "-C", str(d), "--offline", "-o", str(tmp_path / "rel"), env=released["env"], check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("error: a release needs [Build] ImageId= and ImageVersion=") and "Traceback" not in r.stderr
    assert not (tmp_path / "rel").exists()


_UNPACK = {"xz": lambda b: lzma.decompress(b, format=lzma.FORMAT_XZ), "gzip": gzip.decompress,
           "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}
_TOOL = {"xz": ["xz", "-dc"], "gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dcq"]}


@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_compressed_release_decompresses_to_the_same_artifacts(released: dict, compression: str) -> None:
    tmp = released["tmp"]
    suffix = SUFFIXES[compression]
    for name in ("c", "d"):
        _run("release", "-C", str(released["def"]), "--offline", "-o", str(tmp / f"{name}-{compression}"),
             "--build-output", str(tmp / "a-build"), "--compress", compression, "-q", env=released["env"])
    c, d = tmp / f"c-{compression}", tmp / f"d-{compression}"
    raw = sorted(p.name for p in (tmp / "a").glob("*.raw"))
    assert sorted(p.name for p in c.iterdir()) == sorted([*(n + suffix for n in raw), "SHA256SUMS"])
    for n in raw:
        packed = (c / f"{n}{suffix}").read_bytes()
        assert packed == (d / f"{n}{suffix}").read_bytes()  # fixed parameters: the same bytes
        assert _UNPACK[compression](packed) == (tmp / "a" / n).read_bytes()
        # The format's own tool reads it as well (systemd-pull uses the same libraries).
        unpacked = subprocess.run([*_TOOL[compression], str(c / f"{n}{suffix}")], capture_output=True, check=True)
        assert unpacked.stdout == (tmp / "a" / n).read_bytes()
    subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=c, check=True, capture_output=True)
    # ... and every file is one the image's transfers match (the [Source] patterns of its root).
    patterns = {role: source_patterns("fixture-os", role).split() for role in ("root", "root-verity", "root-verity-sig")}
    for n in raw:
        role = n.split(".")[-2]
        assert any(_matches(p, n + suffix) for p in patterns[role]), (n, patterns[role])


def test_zstd_is_refused_for_an_image_with_transfers_and_written_for_others(released: dict, tmp_path: Path) -> None:
    tmp = released["tmp"]
    r = _run("release", "-C", str(released["def"]), "--offline", "-o", str(tmp_path / "rel"), "--build-output",
             str(tmp / "a-build"), "--compress", "zstd", env=released["env"], check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --compress zstd: the image's systemd-sysupdate could not read these files")
    assert not (tmp_path / "rel").exists()
    # Without transfers to match, zstd is a plain choice: the same split, one frame per artifact.
    manifest = json.loads((tmp / "a-build/image.raw.manifest.json").read_text())
    messages: list[str] = []
    result = write_release(tmp / "a-build/image.raw", manifest, tmp_path / "zst", NAME, "zstd", messages.append)
    # Progress: per artifact a start, then (for a large one) steps in MiB, and one end that closes the stage.
    updates = [m for m in messages if isinstance(m, Update)]
    assert all(u.stage.startswith("compressing ") and u.unit == "MiB" for u in updates)
    assert [u.final for u in updates].count(True) == len(result.artifacts) and updates[-1].final
    assert [u.stage for u in updates if u.done == 0 and not u.final] == [f"compressing {a.file}"
                                                                         for a in result.artifacts]
    assert all(u.total >= 1 for u in updates)
    assert sorted(a.file for a in result.artifacts) == sorted(p.name + ".zst" for p in (tmp / "a").glob("*.raw"))
    for art in result.artifacts:
        unpacked = subprocess.run([*_TOOL["zstd"], str(tmp_path / "zst" / art.file)], capture_output=True, check=True)
        assert unpacked.stdout == (tmp / "a" / art.file.removesuffix(".zst")).read_bytes()
        assert _UNPACK["zstd"]((tmp_path / "zst" / art.file).read_bytes()) == unpacked.stdout


def test_an_unknown_release_key_is_refused_before_the_build(released: dict, tmp_path: Path) -> None:
    env = released["env"]
    try:
        r = _run("release", "-C", str(released["def"]), "--offline", "-o", str(tmp_path / "rel"), "--build-output",
                 str(tmp_path / "build"), "--sign-key", "nobody@example.invalid", env=env, check=False)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: release key 'nobody@example.invalid': no such secret key in the keyring of ")
    assert not (tmp_path / "build").exists() and not (tmp_path / "rel").exists()


def test_the_released_root_carries_transfers_and_the_release_key(released: dict, tmp_path: Path) -> None:
    """[Updates]: the transfer files in the image match this release's file names, and the image
    trusts the key that signed SHA256SUMS (gpgv with the image's own keyring)."""
    from tests.test_sysupdate import _parse

    out = tmp_path / "root"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(_root_artifact(released))], check=True, capture_output=True)
    transfers = sorted(p.name for p in (out / "usr/lib/sysupdate.d").iterdir())
    assert transfers == ["40-root-verity-sig.transfer", "50-root-verity.transfer", "60-root.transfer"]  # no kernel: no UKI
    files = sorted(p.name for p in (released["tmp"] / "a").glob("*.raw"))
    for name in transfers:
        t = _parse((out / "usr/lib/sysupdate.d" / name).read_bytes())
        assert (t["Source"]["Type"], t["Source"]["Path"], t["Transfer"]["Verify"]) == ("url-file", SOURCE, "yes")
        patterns = t["Source"]["MatchPattern"].split()  # the name as released, .xz and .gz
        found = [m for f in files for p in patterns if (m := _matches(p, f))]
        assert len(found) == 1 and found[0]["v"] == "1.2", (name, files)
        assert _matches(t["Target"]["MatchPattern"], NAME) == {"v": "1.2"}  # the partition labels
    keyring = out / "etc/systemd/import-pubring.gpg"
    assert keyring.read_bytes() == released["pub"].read_bytes()
    a = released["tmp"] / "a"
    ok = subprocess.run(["gpgv", "--keyring", str(keyring), str(a / "SHA256SUMS.gpg"), str(a / "SHA256SUMS")],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((released["tmp"] / "a-build/image.raw.manifest.json").read_text())
    assert {"path": "/etc/systemd/import-pubring.gpg", "action": "written",
            "cause": f"[Updates] Source={SOURCE}"} in manifest["added_files"]


def test_verify_checks_an_ab_image_against_its_manifest(released: dict) -> None:
    """reprobuild verify on the image with A/B slots: the GPT (empty slots included) and every
    partition's hash as in the manifest, and the verity checks on slot A, not on its empty twin."""
    from reprobuild.verify import VerifyOptions, verify_image

    report = verify_image(released["tmp"] / "a-build/image.raw", released["def"] / "reprobuild.lock",
                          certificates=[released["tmp"] / "keys/verity.crt"],
                          options=VerifyOptions(allow_unsigned=frozenset({"lock"})))
    status = {c.name: c.status for c in report.checks}
    for name in ("gpt", "partition-hashes", "verity-root-hash", "verity-signature"):
        assert status.get(name) == "passed", (name, report.check(name).detail if name in status else status)
