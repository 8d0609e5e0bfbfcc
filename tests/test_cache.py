"""The build cache: content digests and the cache's storage in the store (stage keys: test_pipeline)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from reprobuild import cache as c
from reprobuild.fileio import THREADED_HASH_MIN
from reprobuild.store import Store

REPO = Path(__file__).resolve().parent.parent
EPOCH = 1700000000


def _key(data: dict) -> str:
    return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()


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


# -- the cache in a store ------------------------------------------------------------------------------


def test_put_get_copy_out_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    cache = c.Cache(store)
    key = _key({"x": 1})
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


@pytest.mark.parametrize("size", [10000, THREADED_HASH_MIN + 1], ids=["inline-hash", "threaded-hash"])
def test_corrupt_object_is_caught_on_use_and_by_verify(tmp_path: Path, size: int) -> None:
    store = Store(tmp_path / "store")
    cache = c.Cache(store)
    key = _key({"x": 1})
    src = tmp_path / "img"
    src.write_bytes(b"A" * size)
    entry = cache.put_file("output", key, src)
    cache.copy_out(entry, tmp_path / "good")
    assert (tmp_path / "good").read_bytes() == src.read_bytes()
    obj = store.path(entry.object)
    obj.chmod(0o644)
    obj.write_bytes(b"A" * (size - 1) + b"B")  # same size, the last byte: only the hash can tell
    with pytest.raises(c.CacheMiss):
        cache.copy_out(cache.get("output", key), tmp_path / "out")
    assert not list(tmp_path.glob(".out.*"))
    assert not [t for t in threading.enumerate() if t.name == "copy-hash"]
    report = store.verify()
    assert not report.ok
    assert cache.get("output", key) is None  # quarantined: a miss, not an error


def test_a_cached_file_is_read_in_place_once_its_hash_is_checked(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    cache = c.Cache(store)
    src = tmp_path / "fs.img"
    src.write_bytes(b"F" * 50000)
    entry = cache.put_file("fs", _key({"x": 2}), src)
    path = cache.verified_path(entry)
    assert path == store.path(entry.object) and path.read_bytes() == src.read_bytes()
    path.chmod(0o644)
    path.write_bytes(b"F" * 49999 + b"G")  # same size: only the hash can tell
    with pytest.raises(c.CacheMiss, match="corrupt"):
        cache.verified_path(entry)


def test_a_corrupt_cached_tree_is_a_miss_and_leaves_nothing(tmp_path: Path) -> None:
    """restore_tree hashes the object in a second reader while it extracts: a byte changed inside
    a file's content (the tar still parses, the size is the same) is found, and the half-made
    tree is removed."""
    store = Store(tmp_path / "store")
    cache = c.Cache(store)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("original\n")
    entry = cache.put_tree("install", _key({"t": 1}), tree, epoch=0)
    assert entry is not None
    good = tmp_path / "good"
    cache.restore_tree(entry, good)
    assert (good / "etc" / "hostname").read_text() == "original\n"
    obj = store.path(entry.object)
    data = obj.read_bytes()
    obj.chmod(0o644)
    obj.write_bytes(data.replace(b"original\n", b"tampered\n"))
    bad = tmp_path / "bad"
    with pytest.raises(c.CacheMiss):
        cache.restore_tree(entry, bad)
    assert not bad.exists()


def test_gc_keeps_the_latest_build_and_frees_superseded_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    first = c.Cache(store)
    first.put_file("fs", _key({"v": 1}), old)
    first.register_root("cache-x")
    second = c.Cache(store)
    second.put_file("fs", _key({"v": 2}), new)
    second.register_root("cache-x")  # same image directory: replaces the root
    report = store.gc()
    assert hashlib.sha256(b"old").hexdigest() in report.removed
    assert c.Cache(store).get("fs", _key({"v": 1})) is None
    assert c.Cache(store).get("fs", _key({"v": 2})) is not None


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
    key = _key({"t": 1})
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
