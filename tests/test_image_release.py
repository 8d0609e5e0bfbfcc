"""ImageId=/ImageVersion= without a build: the settings' grammar and digest, os-release editing,
and the over-long label refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reprobuild.config import load_spec
from reprobuild.errors import BuildError, ConfigError
from reprobuild.image.ddi import DdiError, DdiSpec, build_ddi
from reprobuild.rootfs.settings import set_image_release


def _spec(tmp_path: Path, build: str):
    (tmp_path / "reprobuild.conf").write_text(f"[Build]\n{build}")
    return load_spec(tmp_path)


def test_settings_enter_the_digest_only_when_set(tmp_path: Path) -> None:
    plain = _spec(tmp_path, "")
    assert "ImageId" not in plain.digest_input().get("Build", {})
    tagged = _spec(tmp_path, "ImageId=fooos\nImageVersion=2.1\n")
    assert tagged.digest_input()["Build"]["ImageId"] == "fooos" and tagged.digest() != plain.digest()
    assert tagged.build.versioned_name == "fooos_2.1"
    assert _spec(tmp_path, "ImageId=fooos\n").build.versioned_name is None
    assert _spec(tmp_path, "ImageVersion=3\n").digest() != _spec(tmp_path, "ImageVersion=4\n").digest()


@pytest.mark.parametrize("value", ["Foo", "a b", "-x", "x" * 35, "ä"])
def test_values_outside_the_os_release_grammar_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="ImageVersion="):
        _spec(tmp_path, f"ImageVersion={value}\n")


def test_os_release_gets_image_id_and_version(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "usr/lib/os-release").write_text('ID=debian\nIMAGE_VERSION="0"\nVERSION_ID="13"\n')
    os.symlink("../usr/lib/os-release", tree / "etc/os-release")
    assert set_image_release(tree, "fooos", "2", 86400) == ["usr/lib/os-release"]
    assert (tree / "usr/lib/os-release").read_text() == 'ID=debian\nVERSION_ID="13"\nIMAGE_ID=fooos\nIMAGE_VERSION=2\n'
    assert os.stat(tree / "usr/lib/os-release").st_mtime == 86400
    # /etc/os-release as a file of its own takes precedence (os-release(5)): edited too.
    os.unlink(tree / "etc/os-release")
    (tree / "etc/os-release").write_text("ID=debian\n")
    assert set_image_release(tree, None, "3", 0) == ["usr/lib/os-release", "etc/os-release"]
    assert (tree / "etc/os-release").read_text() == "ID=debian\nIMAGE_VERSION=3\n"


def test_os_release_outside_the_tree_is_never_touched(tmp_path: Path) -> None:
    outside = tmp_path / "host-os-release"
    outside.write_text("ID=host\n")
    tree = tmp_path / "tree"
    (tree / "usr").mkdir(parents=True)
    os.symlink(str(tmp_path), tree / "usr/lib")  # a hostile absolute symlink: resolved inside the tree
    with pytest.raises(BuildError, match="need os-release in the tree"):
        set_image_release(tree, "fooos", "2", 0)
    assert outside.read_text() == "ID=host\n"


def test_a_label_longer_than_gpt_allows_is_one_error(tmp_path: Path) -> None:
    fs = tmp_path / "root.img"
    fs.write_bytes(b"\0" * 8192)
    with pytest.raises(DdiError, match="longer than 36"):
        build_ddi(DdiSpec(architecture="amd64", seed=b"\1" * 16, root_fs_image=fs, output=tmp_path / "x.raw",
                          verity="hash", label="a" * 20 + "_" + "b" * 20))
    assert not (tmp_path / "x.raw").exists()


def test_write_release_takes_the_uki_from_the_esp_and_checks_the_manifest(tmp_path: Path) -> None:
    """A bootable DDI made here (ESP with a stand-in UKI, root + verity) split by write_release: the
    .efi is the ESP's file, and a manifest whose digests do not match is refused."""
    import hashlib
    import shutil
    import uuid

    from reprobuild.image.esp import make_esp
    from reprobuild.release import write_release

    if shutil.which("mkfs.vfat") is None or shutil.which("mcopy") is None:
        pytest.skip("dosfstools and mtools are needed")
    uki = b"MZ stand-in UKI " * 1000
    esp = tmp_path / "esp.img"
    make_esp({"EFI/Linux/fooos_2.efi": uki}, esp, epoch=0)
    fs = tmp_path / "root.img"
    fs.write_bytes(bytes(range(256)) * 64)
    result = build_ddi(DdiSpec(architecture="amd64", seed=b"\1" * 16, root_fs_image=fs, output=tmp_path / "img.raw",
                               verity="hash", esp_image=esp, label="fooos_2"))
    manifest = {**result.manifest(), "boot": {"uki_path": "EFI/Linux/fooos_2.efi",
                                              "uki_sha256": hashlib.sha256(uki).hexdigest()}}
    rel = write_release(result.path, manifest, tmp_path / "rel", "fooos_2")
    # Partitions carry their UUID in the name (sysupdate's @u); root and verity UUIDs are the root
    # hash's halves (DPS), which the UKI's roothash= finds them by.
    root_uuid, verity_uuid = (str(uuid.UUID(h)) for h in (result.root_hash[:32], result.root_hash[-32:]))
    assert [(a.file, a.source) for a in rel.artifacts] == [
        (f"fooos_2_{root_uuid}.root.raw", "root"), (f"fooos_2_{verity_uuid}.root-verity.raw", "root-verity"),
        ("fooos_2.efi", "uki")]
    assert (tmp_path / "rel/fooos_2.efi").read_bytes() == uki
    assert (tmp_path / f"rel/fooos_2_{root_uuid}.root.raw").read_bytes() == fs.read_bytes()
    assert sorted(p.label for p in result.partitions) == ["esp", "fooos_2", "fooos_2"]
    lied = {**manifest, "boot": {**manifest["boot"], "uki_sha256": "0" * 64}}
    with pytest.raises(BuildError, match="the UKI in .* differs from its manifest entry"):
        write_release(result.path, lied, tmp_path / "rel2", "fooos_2")
    lied = {**manifest, "partitions": [{**p, "sha256": "0" * 64} for p in manifest["partitions"]]}
    with pytest.raises(BuildError, match="partition root of .* differs"):
        write_release(result.path, lied, tmp_path / "rel3", "fooos_2")
    assert not any((tmp_path / "rel3").iterdir())  # the refused artifact is not left behind
