"""The build cache: stage keys (pure), content digests, and the cache's storage in the store."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from reprobuild import cache as c
from reprobuild.build import tree_keys
from reprobuild.config import load_spec
from reprobuild.lockfile import load_lock
from reprobuild.store import Store

REPO = Path(__file__).resolve().parent.parent
EPOCH = 1700000000


# -- stage keys ------------------------------------------------------------------------------------


def test_stage_key_is_canonical_and_stage_specific() -> None:
    a = c.stage_key("fs", {"a": 1, "b": [1, 2]})
    assert a == c.stage_key("fs", {"b": [1, 2], "a": 1})  # dict order never matters
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != c.stage_key("tree", {"a": 1, "b": [1, 2]})
    assert a != c.stage_key("fs", {"a": 1, "b": [2, 1]})  # list order does
    with pytest.raises(ValueError):
        c.stage_key("nonsense", {})


FS_BASE = {"tree_key": "a" * 64, "kind": "erofs", "fs_uuid": "u", "label": "root", "read_only": True, "layout": "root",
               "efi_dir": False, "epoch": EPOCH, "tools_id": {"tree": "lock", "packages": [["erofs-utils", "1.8", "x"]]},
               "code": "c"}
FS_CHANGES = {"tree_key": "b" * 64, "kind": "squashfs", "fs_uuid": "v", "label": "usr", "read_only": False, "layout": "usr",
                  "efi_dir": True, "epoch": EPOCH + 1, "tools_id": {"tree": "host", "versions": {}}, "code": "d"}


@pytest.mark.parametrize("name", sorted(FS_CHANGES))
def test_every_fs_input_changes_the_key(name: str) -> None:
    base = c.stage_key("fs", c.fs_inputs(**FS_BASE))
    assert c.stage_key("fs", c.fs_inputs(**{**FS_BASE, name: FS_CHANGES[name]})) != base
    assert c.stage_key("fs", c.fs_inputs(**dict(FS_BASE))) == base


ESP_BASE = {"cmdline": "roothash=ab quiet", "kernel_sha256": "k" * 64, "stub_sha256": "s" * 64,
            "initrd_sha256": "i" * 64, "os_release": "ID=debian\n", "kernel_version": "6.12.1-amd64",
            "bootloader": "uki", "sdboot_sha256": None, "secure_boot_key": None, "secure_boot_cert": None,
            "seed": "00", "epoch": EPOCH, "tools_id": {"tree": "lock", "packages": []}, "code": "c"}
ESP_CHANGES = {"cmdline": "roothash=cd quiet", "kernel_sha256": "K" * 64, "stub_sha256": "S" * 64,
               "initrd_sha256": "I" * 64, "os_release": "ID=other\n", "kernel_version": "6.12.2-amd64",
               "bootloader": "systemd-boot", "sdboot_sha256": "b" * 64, "secure_boot_key": "1" * 64,
               "secure_boot_cert": "2" * 64, "seed": "01", "epoch": 1, "tools_id": {"tree": "host"}, "code": "d"}


@pytest.mark.parametrize("name", sorted(ESP_CHANGES))
def test_every_esp_input_changes_the_key(name: str) -> None:
    assert sorted(ESP_CHANGES) == sorted(ESP_BASE)
    base = c.stage_key("esp", c.esp_inputs(**ESP_BASE))
    assert c.stage_key("esp", c.esp_inputs(**{**ESP_BASE, name: ESP_CHANGES[name]})) != base


OUT_BASE = {"tree_key": "a" * 64, "fmt": "disk", "disk": {"verity": "signed", "seed": "00"}, "epoch": EPOCH,
                "tools_id": {"tree": "host", "versions": {"mkfs.erofs": "1.5-1"}}, "code": "c"}
OUT_CHANGES = {"tree_key": "b" * 64, "fmt": "cpio", "disk": {"verity": "hash", "seed": "00"}, "epoch": 1,
                   "tools_id": {"tree": "host", "versions": {"mkfs.erofs": "1.7-1"}}, "code": "d"}


@pytest.mark.parametrize("name", sorted(OUT_CHANGES))
def test_every_output_input_changes_the_key(name: str) -> None:
    base = c.stage_key("output", c.output_inputs(**OUT_BASE))
    assert c.stage_key("output", c.output_inputs(**{**OUT_BASE, name: OUT_CHANGES[name]})) != base


# -- tree keys from a real definition and lock -------------------------------------------------------


@pytest.fixture()
def definition(tmp_path: Path) -> Path:
    d = tmp_path / "def"
    (d / "extra/etc").mkdir(parents=True)
    (d / "extra/etc/motd").write_text("hello\n")
    conf = (REPO / "lock/minimal/reprobuild.conf").read_text()
    conf = "\n".join(line for line in conf.splitlines() if not line.startswith("LockKey"))
    (d / "reprobuild.conf").write_text(conf + "\n[Content]\nExtraTrees=extra\n")
    return d


def _keys(d: Path, lock=None, overrides=()):
    lock = lock or load_lock(REPO / "lock/minimal/reprobuild.lock")
    return tree_keys(load_spec(d, list(overrides)), lock, "code")


def test_tree_keys_are_stable_and_independent_of_the_checkout_place(definition: Path, tmp_path: Path) -> None:
    a = _keys(definition)
    assert a == _keys(definition)
    moved = tmp_path / "elsewhere" / "def"
    moved.parent.mkdir()
    os.rename(definition, moved)
    os.utime(moved / "extra/etc/motd", (1, 1))  # times and place are not inputs
    assert _keys(moved) == a


def test_extra_tree_edit_changes_only_the_tree_key(definition: Path) -> None:
    a = _keys(definition)
    (definition / "extra/etc/motd").write_text("edited\n")
    b = _keys(definition)
    assert b.install == a.install and b.tree != a.tree
    (definition / "extra/etc/motd").chmod(0o600)
    assert _keys(definition).tree not in (a.tree, b.tree)


def test_package_change_changes_both_keys(definition: Path) -> None:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    image = lock.package_set("image")
    first = image.packages[0]
    changed = dataclasses.replace(lock, sets=(dataclasses.replace(
        image, packages=(dataclasses.replace(first, sha256="0" * 64),) + image.packages[1:]),))
    a, b = _keys(definition, lock), _keys(definition, changed)
    assert a.install != b.install and a.tree != b.tree


@pytest.mark.parametrize("override, changes_install", [
    ("Content.Hostname=other", True),  # the sandbox hostname maintainer scripts see
    ("Content.Locale=de_DE.UTF-8", False),
    ("Content.RemoveFiles=/usr/share/doc/*", False),
    ("Content.RootPassword=secret", False),
    ("Content.CleanPackageMetadata=no", False),
])
def test_settings_change_the_right_keys(definition: Path, override: str, changes_install: bool) -> None:
    a, b = _keys(definition), _keys(definition, overrides=(override,))
    assert b.tree != a.tree
    assert (b.install != a.install) == changes_install


@pytest.mark.parametrize("override", [
    "Distribution.Mirror=http://mirror.invalid/debian",  # where bytes come from, not which bytes
    "Build.Substituters=http://cache.invalid",
    "Build.RootFilesystem=squashfs",  # a disk setting: not a tree input
    "Content.KernelCommandLine=quiet",
])
def test_non_tree_settings_do_not_change_tree_keys(definition: Path, override: str) -> None:
    assert _keys(definition, overrides=(override,)) == _keys(definition)


def test_epoch_changes_both_keys(definition: Path) -> None:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    a = _keys(definition, lock)
    b = _keys(definition, dataclasses.replace(lock, source_date_epoch=lock.source_date_epoch + 1))
    assert a.install != b.install and a.tree != b.tree


# -- content digests -----------------------------------------------------------------------------------


def test_content_digest_sees_bytes_modes_names_and_links_only(tmp_path: Path) -> None:
    d = tmp_path / "t"
    (d / "sub").mkdir(parents=True)
    (d / "sub/f").write_bytes(b"x")
    (d / "l").symlink_to("sub/f")
    base = c.content_digest(d)
    os.utime(d / "sub/f", (5, 5))
    os.chown(d / "sub/f", 1234, 1234) if os.geteuid() == 0 else None
    assert c.content_digest(d) == base
    for change in (lambda: (d / "sub/f").write_bytes(b"y"), lambda: (d / "sub/f").chmod(0o600),
                   lambda: ((d / "l").unlink(), (d / "l").symlink_to("sub")),
                   lambda: (d / "new").mkdir(), lambda: os.rename(d / "sub/f", d / "sub/g")):
        change()
        now = c.content_digest(d)
        assert now != base
        base = now
    # a single file (a script): bytes and mode
    s = tmp_path / "script"
    s.write_text("#!/bin/sh\n")
    one = c.content_digest(s)
    s.chmod(0o755)
    assert c.content_digest(s) != one


def test_code_digest_covers_the_sources(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "rootfs").mkdir(parents=True)
    (root / "rootfs/a.py").write_text("x = 1\n")
    (root / "verify.py").write_text("y = 1\n")
    first = c.code_digest(root)
    (root / "verify.py").write_text("y = 2\n")  # not stage code: the cache survives
    assert c.code_digest(root) == first
    (root / "rootfs/a.py").write_text("x = 2\n")
    assert c.code_digest(root) != first
    assert len(c.code_digest()) == 64


# -- the cache in a store ------------------------------------------------------------------------------


def test_put_get_copy_out_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    cache = c.Cache(store)
    key = c.stage_key("fs", {"x": 1})
    assert cache.get("fs", key) is None
    src = tmp_path / "img"
    src.write_bytes(b"image bytes" * 1000)
    cache.put_file("fs", key, src, {"fs": {"kind": "erofs"}})
    entry = cache.get("fs", key)
    assert entry is not None and entry.meta == {"fs": {"kind": "erofs"}}
    assert entry.object == hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "out.img"
    cache.copy_out(entry, out)
    assert out.read_bytes() == src.read_bytes() and (out.stat().st_mode & 0o777) == 0o644
    assert c.Cache(store, enabled=False).get("fs", key) is None
    assert c.Cache(store, enabled=False).put_file("fs", key, src) is None


def test_corrupt_object_is_caught_on_use_and_by_verify(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    cache = c.Cache(store)
    key = c.stage_key("output", {"x": 1})
    src = tmp_path / "img"
    src.write_bytes(b"A" * 10000)
    entry = cache.put_file("output", key, src)
    obj = store.path(entry.object)
    obj.chmod(0o644)
    obj.write_bytes(b"B" * 10000)  # same size: only the hash can tell
    with pytest.raises(c.CacheMiss):
        cache.copy_out(cache.get("output", key), tmp_path / "out")
    assert not list(tmp_path.glob(".out.*"))
    report = store.verify()
    assert not report.ok
    assert cache.get("output", key) is None  # quarantined: a miss, not an error


def test_gc_keeps_the_latest_build_and_frees_superseded_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    first = c.Cache(store)
    first.put_file("fs", c.stage_key("fs", {"v": 1}), old)
    first.register_root("cache-x")
    second = c.Cache(store)
    second.put_file("fs", c.stage_key("fs", {"v": 2}), new)
    second.register_root("cache-x")  # same image directory: replaces the root
    report = store.gc()
    assert hashlib.sha256(b"old").hexdigest() in report.removed
    assert c.Cache(store).get("fs", c.stage_key("fs", {"v": 1})) is None
    assert c.Cache(store).get("fs", c.stage_key("fs", {"v": 2})) is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and xattrs of a tree need root")
def test_tree_round_trip_is_exact(tmp_path: Path) -> None:
    from reprobuild.rootfs.archive import write_tar

    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/ping").write_bytes(b"\x7fELF")
    (tree / "usr/bin/ping").chmod(0o4755)
    os.setxattr(tree / "usr/bin/ping", "security.capability",
                bytes.fromhex("0000000200200000000000000000000000000000"))
    os.link(tree / "usr/bin/ping", tree / "usr/bin/ping2")
    (tree / "etc").mkdir()
    (tree / "etc/shadow").write_text("root:*:1::::::\n")
    os.chown(tree / "etc/shadow", 0, 42)
    (tree / "etc/shadow").chmod(0o640)
    (tree / "lib").symlink_to("usr/lib")
    for p in (tree / "etc/shadow", tree / "usr/bin/ping"):
        os.utime(p, (EPOCH + 99, EPOCH + 99))  # newer than the epoch: clamped, as normalisation does
    store = Store(tmp_path / "store")
    cache = c.Cache(store)
    key = c.stage_key("tree", {"t": 1})
    entry = cache.put_tree("tree", key, tree, EPOCH)
    restored = tmp_path / "restored"
    cache.restore_tree(cache.get("tree", key), restored)
    write_tar(restored, tmp_path / "again.tar", EPOCH)
    assert hashlib.sha256((tmp_path / "again.tar").read_bytes()).hexdigest() == entry.object
    assert os.stat(restored / "usr/bin/ping").st_ino == os.stat(restored / "usr/bin/ping2").st_ino
    assert os.getxattr(restored / "usr/bin/ping", "security.capability")[:4] == bytes.fromhex("00000002")


def test_root_name_depends_on_the_directory(tmp_path: Path) -> None:
    assert c.root_name(tmp_path / "a") != c.root_name(tmp_path / "b")
    assert c.root_name(tmp_path / "a").startswith("cache-")
