"""Live: lock, build and boot real Debian images from the host's mirror (``-m live``).

Each image is built once per session, twice (see tests/live_images.py), and every test reuses
those builds. Reproducibility is proved by sha256 equality of the two builds.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from fixtures.apt_reference import MINBASE_PATTERNS, AptRoot
from reprobuild.debian.sources import host_mirror_for
from reprobuild.image.gpt import read_gpt_path
from reprobuild.lockfile import load_lock
from tests.live_images import (
    BuiltPair,
    Keys,
    build_pair,
    make_definition,
    require_tools,
    run_reprobuild,
)

pytestmark = pytest.mark.live


def test_minbase_lock_equals_what_apt_installs(minimal_trixie: Path, tmp_path: Path) -> None:
    """The cross-check of the resolver: apt, on an empty system, from the same mirror state."""
    apt = AptRoot(tmp_path / "aptroot", "trixie", host_mirror_for("debian"), host_mirror_for("debian-security"))
    apt.setup()
    apt.update()
    theirs = apt.simulate_install(MINBASE_PATTERNS)
    lock = load_lock(minimal_trixie / "reprobuild.lock")
    ours = {p.name: p.version for p in lock.package_set("image").packages}
    assert ours == theirs


def test_lock_is_signed_and_current(minimal_trixie: Path, live_keys: Keys) -> None:
    result = run_reprobuild("lock", "-C", str(minimal_trixie), "--verify", "--trusted-key", str(live_keys.lock_pub))
    assert re.search(r"signature verified \(SHA256:\S+ .*\), configuration current", result.stdout), result.stdout
    lock_text = (minimal_trixie / "reprobuild.lock").read_text()
    assert "://" not in lock_text, "no mirror URL in a lock whose config names none"


def test_minbase_tar_is_reproducible(minimal_tar: BuiltPair) -> None:
    a, b = minimal_tar.sha256("image.tar")
    assert a == b
    listing = subprocess.run(["tar", "-tvf", str(minimal_tar.output_a / "image.tar")], capture_output=True,
                             text=True, check=True).stdout
    assert "./usr/bin/dpkg" in listing and "./etc/machine-id" in listing


def test_minbase_disk_is_reproducible_and_a_valid_ddi(minimal_disk: BuiltPair, tmp_path: Path) -> None:
    check_reproducible_ddi(minimal_disk, tmp_path)


@pytest.mark.parametrize("filesystem", ["squashfs", "ext4"])
def test_minbase_disk_with_other_root_filesystems(filesystem: str, live_root: Path, live_keys: Keys,
                                                  warm_store: Path, tmp_path: Path) -> None:
    """RootFilesystem=squashfs and ext4: the same proof as for the default erofs."""
    directory = make_definition(live_root / f"defs-{filesystem}", "minimal", live_keys,
                                extra_conf=f"[Build]\nRootFilesystem={filesystem}\n")
    run_reprobuild("lock", "-C", str(directory), "--store", str(warm_store), "-q")
    pair = build_pair(directory, warm_store, live_root / f"store-cold-{filesystem}", "disk", "disk")
    manifest = check_reproducible_ddi(pair, tmp_path)
    assert manifest["filesystem"]["type"] == filesystem


def check_reproducible_ddi(minimal_disk: BuiltPair, tmp_path: Path) -> dict:
    """Both builds identical; systemd-dissect, veritysetup and openssl accept the image."""
    require_tools("systemd-dissect", "veritysetup", "openssl")
    a, b = minimal_disk.sha256("image.raw")
    assert a == b
    image = minimal_disk.output_a / "image.raw"
    manifest = json.loads((minimal_disk.output_a / "image.raw.manifest.json").read_text())
    assert manifest["sha256"] == a
    dissect = subprocess.run(["systemd-dissect", "--json=short", str(image)], capture_output=True, text=True,
                             check=False)
    assert dissect.returncode == 0, dissect.stderr
    designators = {p["designator"] for p in json.loads(dissect.stdout)["mounts"]}
    assert {"root", "root-verity", "root-verity-sig"} <= designators

    # veritysetup verify on the extracted root and hash partitions, with image.roothash.
    disk = read_gpt_path(image)
    parts = {p.name: p for p in disk.partitions}
    root_hash = (minimal_disk.output_a / "image.roothash").read_text().strip()
    assert root_hash == manifest["root_hash"]
    for label, name in (("root-x86-64", "root.img"), ("root-x86-64-verity", "verity.img"),
                        ("root-x86-64-verity-sig", "sig.img")):
        part = parts[label]
        with open(image, "rb") as src, open(tmp_path / name, "wb") as dst:
            src.seek(part.offset(disk.sector_size))
            dst.write(src.read(part.size(disk.sector_size)))
    subprocess.run(["veritysetup", "verify", str(tmp_path / "root.img"), str(tmp_path / "verity.img"), root_hash],
                   check=True, capture_output=True)

    # The signature partition verifies against the certificate with OpenSSL.
    sig = json.loads((tmp_path / "sig.img").read_bytes().rstrip(b"\0"))
    assert sig["rootHash"] == root_hash
    import base64

    (tmp_path / "sig.der").write_bytes(base64.b64decode(sig["signature"]))
    (tmp_path / "content").write_text(root_hash)
    cert = next(Path(line.split("=", 1)[1]) for line in
                (minimal_disk.directory / "reprobuild.conf").read_text().splitlines()
                if line.startswith("VerityCertificate="))
    subprocess.run(["openssl", "smime", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / "sig.der"),
                    "-content", str(tmp_path / "content"), "-CAfile", str(cert), "-purpose", "any",
                    "-out", "/dev/null"], check=True, capture_output=True)
    return manifest


def test_bootable_disk_is_reproducible_with_signed_uki(bootable_disk: BuiltPair, tmp_path: Path,
                                                       live_keys: Keys) -> None:
    require_tools("sbverify", "mcopy")
    a, b = bootable_disk.sha256("image.raw")
    assert a == b, "two builds of the bootable image differ"
    manifest = json.loads((bootable_disk.output_a / "image.raw.manifest.json").read_text())
    boot = manifest["boot"]
    assert boot["uki_signed"] and boot["cmdline"].startswith(f"roothash={manifest['root_hash']} ")
    # Extract the UKI from the ESP and check its Authenticode signature with sbverify.
    image = bootable_disk.output_a / "image.raw"
    disk = read_gpt_path(image)
    esp = next(p for p in disk.partitions if p.name == "esp")
    with open(image, "rb") as src, open(tmp_path / "esp.img", "wb") as dst:
        src.seek(esp.offset(disk.sector_size))
        dst.write(src.read(esp.size(disk.sector_size)))
    subprocess.run(["mcopy", "-i", str(tmp_path / "esp.img"), "::/EFI/BOOT/BOOTX64.EFI", str(tmp_path / "uki.efi")],
                   check=True, capture_output=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    subprocess.run(["sbverify", "--cert", str(live_keys.sb_crt), str(tmp_path / "uki.efi")], check=True,
                   capture_output=True)


def test_bootable_rebuild_with_another_verity_key_reuses_fs_initrd_and_esp(bootable_disk: BuiltPair,
                                                                            live_root: Path,
                                                                            tmp_path: Path) -> None:
    """Only the verity signing key changes: the cached file system (with its root hash) and UKI+ESP
    are reused from build A's store (the tree and initrd are not even made), and the new signature partition verifies with the new
    certificate over the same root hash."""
    import base64
    import shutil

    d = tmp_path / "def"
    shutil.copytree(bootable_disk.directory, d, symlinks=True, ignore=shutil.ignore_patterns("out-*"))
    run_reprobuild("keygen", "--verity", "--out", str(tmp_path / "v2"))
    conf = []
    for line in (d / "reprobuild.conf").read_text().splitlines():
        if line.startswith("VerityKey="):
            line = f"VerityKey={tmp_path / 'v2.key'}"
        elif line.startswith("VerityCertificate="):
            line = f"VerityCertificate={tmp_path / 'v2.crt'}"
        conf.append(line)
    (d / "reprobuild.conf").write_text("\n".join(conf) + "\n")
    store = live_root / "store-cold-boot"  # build A's: its cache holds every stage
    run_reprobuild("lock", "-C", str(d), "--store", str(store), "-q")  # new config digest, same pins
    r = run_reprobuild("build", "-C", str(d), "--locked", "-o", str(tmp_path / "out"), "--store", str(store),
                       "--json", timeout=900)
    doc = json.loads(r.stdout)
    outcomes = {s["stage"]: s["outcome"] for s in doc["stages"]}
    # The disk is rebuilt around the cached file system and ESP; nothing before them is even made.
    assert outcomes["ddi"] == "built" and outcomes["fs"] == "hit" and outcomes["esp"] == "hit", outcomes
    assert {outcomes[n] for n in ("tools", "install", "tree", "initrd")} == {"not needed"}, outcomes
    before = json.loads((bootable_disk.output_a / "image.raw.manifest.json").read_text())
    after = doc["manifest"]
    assert after["root_hash"] == before["root_hash"] and after["boot"] == before["boot"]
    assert after["sha256"] != before["sha256"]  # the signature partition changed
    image = tmp_path / "out/image.raw"
    disk = read_gpt_path(image)
    sig_part = next(p for p in disk.partitions if p.name.endswith("verity-sig"))
    with open(image, "rb") as f:
        f.seek(sig_part.offset(disk.sector_size))
        sig = json.loads(f.read(sig_part.size(disk.sector_size)).rstrip(b"\0"))
    assert sig["rootHash"] == before["root_hash"]
    (tmp_path / "sig.der").write_bytes(base64.b64decode(sig["signature"]))
    (tmp_path / "content").write_text(sig["rootHash"])
    subprocess.run(["openssl", "smime", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / "sig.der"),
                    "-content", str(tmp_path / "content"), "-CAfile", str(tmp_path / "v2.crt"), "-purpose", "any",
                    "-out", "/dev/null"], check=True, capture_output=True)


def _boot(image: Path, secure_boot: bool, cert: Path | None, log: Path) -> str:
    from reprobuild.vm import QemuConfig
    from tests.guest_boot import boot_until

    config = QemuConfig(image=image, secure_boot=secure_boot,
                        secure_boot_cert=cert.read_bytes() if cert else None, serial_log=log, memory="2G")
    boot = boot_until(config, b"REPROBUILD-MARKER-END", timeout=900)
    assert boot.found, f"the image did not reach multi-user; console tail:\n{boot.tail()}"
    return boot.console.decode(errors="replace")


def test_bootable_image_boots_to_multi_user_with_verity_root(bootable_disk: BuiltPair, tmp_path: Path) -> None:
    console = _boot(bootable_disk.output_a / "image.raw", False, None, tmp_path / "console.log")
    line = next(l for l in console.splitlines() if "REPROBUILD-MARKER " in l)
    assert "root=/dev/mapper/root ro" in line, line


def test_bootable_image_boots_with_secure_boot_enforced(bootable_disk: BuiltPair, tmp_path: Path,
                                                        live_keys: Keys) -> None:
    console = _boot(bootable_disk.output_b / "image.raw", True, live_keys.sb_crt, tmp_path / "console-sb.log")
    assert "Secure boot enabled" in console
    line = next(l for l in console.splitlines() if "REPROBUILD-MARKER " in l)
    assert "root=/dev/mapper/root ro" in line, line


def test_bookworm_minbase_locks_and_builds(minimal_bookworm: Path, warm_store: Path, tmp_path: Path) -> None:
    lock = load_lock(minimal_bookworm / "reprobuild.lock")
    names = {p.name for p in lock.package_set("image").packages}
    assert {"dpkg", "apt", "base-files", "libc6"} <= names
    assert lock.release == "bookworm"
    run_reprobuild("build", "-C", str(minimal_bookworm), "--locked", "-f", "tar", "-o", str(tmp_path / "out"),
                   "--store", str(warm_store), "-q", timeout=900)
    listing = subprocess.run(["tar", "-tf", str(tmp_path / "out/image.tar")], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert "./usr/bin/dpkg" in listing
    # bookworm's usrmerge converts the tree: /bin is a symlink to usr/bin.
    verbose = subprocess.run(["tar", "-tvf", str(tmp_path / "out/image.tar"), "./bin"], capture_output=True,
                             text=True, check=False).stdout
    assert "./bin -> usr/bin" in verbose
