"""The build cache end to end, hermetic: the one-package fixture definition (tests/check_fixture.py)
with an extra tree, built as a tar through the real command line.

* cached (the installed tree restored from its cached tar), uncached and copy-fallback builds of
  the same definition give the same bytes, before and after an extra-tree edit;
* the cached installed tree is never modified by the configuration stage;
* an output already in place is not copied again, and any change to it is noticed;
* ``store gc`` and ``store verify`` remove extracted trees whose object is gone or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from reprobuild.store import Store
from tests.check_fixture import make_definition

REPO = Path(__file__).resolve().parent.parent
# Runs the CLI with overlays reported unavailable: the copy fallback.
NO_OVERLAY = ("import sys, reprobuild.rootfs.overlay as o; o.unavailable_reason = lambda *a: 'disabled by the test'; "
              "from reprobuild.cli import main; sys.argv[0] = 'reprobuild'; main()")


@pytest.fixture(scope="module")
def base_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_host_base(tmp_path_factory.mktemp("hostbase"))


def _definition(root: Path, base_deb: Path) -> tuple[Path, Path]:
    d = make_definition(root, "http://127.0.0.1:9/unused", leak=False, base_deb=base_deb)
    (d / "extra/etc").mkdir(parents=True)
    (d / "extra/etc/motd").write_text("first\n")
    (d / "extra/etc/hostname-note").write_text("kept\n")
    with open(d / "reprobuild.conf", "a") as f:
        f.write("\n[Content]\nExtraTrees=extra\nRemoveFiles=/etc/issue\n")
    # The lock records the configuration's digest: re-save it for the new configuration.
    from reprobuild.config import load_spec
    from reprobuild.lockfile import load_lock, save_lock

    spec = load_spec(d)
    lock = load_lock(d / "reprobuild.lock")
    from dataclasses import replace

    save_lock(replace(lock, config_digest=spec.digest(), config=spec.digest_input()), d / "reprobuild.lock")
    return d, root / "store"


def _build(d: Path, store: Path, out: Path, *extra: str, overlay: bool | str = True, messages: bool = False) -> dict:
    """Build through the CLI; returns its --json document, or (``messages``) its progress lines
    in ``stderr`` and the manifest it wrote. ``overlay``: False (unavailable) or a -c program."""
    head = ([sys.executable, "-m", "reprobuild"] if overlay is True else
            [sys.executable, "-c", NO_OVERLAY if overlay is False else overlay])
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    env.pop("SOURCE_DATE_EPOCH", None)
    mode = () if messages else ("--json",)
    r = subprocess.run([*head, "build", "-C", str(d), "--locked", "--offline", "-o", str(out), *mode, *extra],
                       env=env, text=True, capture_output=True, timeout=600, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    if messages:
        return {"stderr": r.stderr, "manifest": json.loads((out / "image.tar.manifest.json").read_text())}
    return json.loads(r.stdout)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cached_uncached_and_copy_fallback_builds_agree(tmp_path: Path, base_deb: Path) -> None:
    d, store = _definition(tmp_path / "fx", base_deb)
    uncached = _build(d, store, tmp_path / "u", "--no-cache")
    cold = _build(d, store, tmp_path / "c", messages=True)
    assert "copied, not overlaid" not in cold["stderr"]
    tar = "image.tar"
    assert _sha(tmp_path / "u" / tar) == _sha(tmp_path / "c" / tar) == uncached["manifest"]["sha256"]

    # The installed tree is cached as its tar only (stages/install.py: made in memory, not kept
    # extracted on the store's file system).
    assert list(Store(store).iter_trees()) == []
    (install_entry,) = (store / "cache/install").glob("*.json")
    installed = json.loads(install_entry.read_text())["object"]

    (d / "extra/etc/motd").write_text("edited\n")
    (d / "extra/etc/hostname-note").unlink()
    edited = _build(d, store, tmp_path / "e")
    assert edited["cache_hits"] == ["install"], edited["cache_hits"]
    edited_uncached = _build(d, store, tmp_path / "eu", "--no-cache")
    fallback = _build(d, store, tmp_path / "ef", "--no-cache", overlay=False)
    assert _sha(tmp_path / "e" / tar) == _sha(tmp_path / "eu" / tar) == _sha(tmp_path / "ef" / tar)
    assert _sha(tmp_path / "e" / tar) != _sha(tmp_path / "c" / tar)
    assert edited["manifest"]["sha256"] == _sha(tmp_path / "e" / tar)
    assert fallback["manifest"]["sha256"] == edited_uncached["manifest"]["sha256"]
    # The configuration stage changed its own copy: the cached installed tree is unchanged.
    assert _sha(Store(store).path(installed)) == installed
    assert list(Store(store).iter_trees()) == []
    assert not any(Path(store, "tmp").iterdir()), "scratch directories left behind"


def test_copy_fallback_with_the_cache_on(tmp_path: Path, base_deb: Path) -> None:
    d, store = _definition(tmp_path / "fx", base_deb)
    cached = _build(d, store, tmp_path / "c")
    (d / "extra/etc/motd").write_text("edited\n")
    fallback = _build(d, store, tmp_path / "f", overlay=False, messages=True)
    assert "copied, not overlaid (disabled by the test)" in fallback["stderr"]
    assert "install: cached" in fallback["stderr"]
    uncached = _build(d, store, tmp_path / "o", "--no-cache")
    assert _sha(tmp_path / "f/image.tar") == _sha(tmp_path / "o/image.tar") == uncached["manifest"]["sha256"]
    assert uncached["manifest"]["sha256"] != cached["manifest"]["sha256"]


def test_output_in_place_is_not_copied_again_unless_it_changed(tmp_path: Path, base_deb: Path) -> None:
    d, store = _definition(tmp_path / "fx", base_deb)
    out = tmp_path / "out"
    first = _build(d, store, out)
    image = out / "image.tar"
    inode = image.stat().st_ino
    again = _build(d, store, out, messages=True)
    assert "image.tar: up to date" in again["stderr"] and image.stat().st_ino == inode
    assert again["manifest"]["sha256"] == first["manifest"]["sha256"]

    # Same bytes rewritten in place (new ctime): copied again.
    image.write_bytes(image.read_bytes())
    rewritten = _build(d, store, out, messages=True)
    assert "image.tar: cached" in rewritten["stderr"]
    # Damaged: repaired from the cache.
    with open(image, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    repaired = _build(d, store, out, messages=True)
    assert "image.tar: cached" in repaired["stderr"]
    assert _sha(image) == first["manifest"]["sha256"]


def _extract_installed_tree(store_path: Path) -> str:
    """Keep the cached installed tree extracted in the store, as the cache does for the stages
    that keep theirs (the tools tree, the build environment); returns its object."""
    from reprobuild.cache import Cache

    cache = Cache(Store(store_path))
    (entry_file,) = (store_path / "cache/install").glob("*.json")
    entry = cache.get("install", entry_file.stem, record=False)
    assert entry is not None and entry.object is not None
    cache.tree_dir(entry)
    return entry.object


def test_gc_and_verify_drop_extracted_trees_with_their_object(tmp_path: Path, base_deb: Path) -> None:
    d, store_path = _definition(tmp_path / "fx", base_deb)
    _build(d, store_path, tmp_path / "out")
    store = Store(store_path)
    extracted = _extract_installed_tree(store_path)
    (sha,) = store.iter_trees()
    assert sha == extracted
    # verify: a corrupt object takes its extracted tree with it.
    obj = store.path(sha)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"rot")
    report = store.verify()
    assert not report.ok and not store.tree_path(sha).exists()
    # Rebuilt by the next build that needs it (the index entry's object is gone: a miss).
    (d / "extra/etc/motd").write_text("edited\n")
    _build(d, store_path, tmp_path / "out2")
    assert store.has(sha) and _extract_installed_tree(store_path) == sha
    (sha2,) = store.iter_trees()
    assert sha2 == sha
    # gc: once no root keeps the object, object and tree go together.
    for name in list(store.roots()):
        store.unregister_root(name)
    report = store.gc()
    assert sha in report.removed and report.trees_removed == 1 and not store.tree_path(sha).exists()


@pytest.mark.parametrize("damage", ["content", "mode", "added", "removed"])
def test_store_verify_removes_an_extracted_tree_that_differs_from_its_object(tmp_path: Path, base_deb: Path,
                                                                             damage: str) -> None:
    d, store_path = _definition(tmp_path / "fx", base_deb)
    _build(d, store_path, tmp_path / "out")
    store = Store(store_path)
    sha = _extract_installed_tree(store_path)
    tree = store.tree_path(sha)
    env = {**os.environ, "REPROBUILD_STORE": str(store_path)}

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reprobuild", "store", "verify", "--json"], env=env, text=True,
                              capture_output=True, timeout=300, cwd=REPO, check=False)

    clean = verify()
    assert clean.returncode == 0, clean.stdout
    assert json.loads(clean.stdout)["trees_removed"] == [] and tree.is_dir()

    victim = next(p for p in sorted(tree.rglob("*")) if p.is_file() and not p.is_symlink() and p.stat().st_size > 0)
    if damage == "content":
        data = bytearray(victim.read_bytes())
        data[0] ^= 1
        victim.write_bytes(bytes(data))
        os.utime(victim, ns=(0, int(victim.lstat().st_mtime) * 10**9))  # keep the mtime: content alone
    elif damage == "mode":
        victim.chmod(victim.stat().st_mode ^ 0o001)
    elif damage == "added":
        (victim.parent / "intruder").write_text("x\n")
    else:
        victim.unlink()
    r = verify()
    assert r.returncode == 1, r.stdout
    doc = json.loads(r.stdout)
    assert [t["object"] for t in doc["trees_removed"]] == [sha] and not doc["ok"]
    assert "extracted tree(s)" in r.stderr and not tree.exists()
    assert store.has(sha)  # the object itself was fine


def test_verify_rebuild_ignores_a_poisoned_cache_in_a_shared_store(tmp_path: Path, base_deb: Path) -> None:
    """`verify --store S` rebuilds without the build cache: an entry of S pointing at other bytes
    (a poisoned or stale cache) cannot make the "independent rebuild" a copy of itself."""
    from reprobuild.lockfile import load_lock
    from reprobuild.verify import VerifyOptions, rebuild_and_compare

    d, store_path = _definition(tmp_path / "fx", base_deb)
    first = _build(d, store_path, tmp_path / "out")
    image = tmp_path / "out/image.tar"
    index = store_path / "cache"
    (install_entry,) = (index / "install").glob("*.json")
    install = json.loads(install_entry.read_text())
    for entry in (index / "tar").glob("*.json"):  # the tar stage's entry is the output
        doc = json.loads(entry.read_text())
        doc.update(object=install["object"], size=install["size"])
        entry.write_text(json.dumps(doc))
    poisoned = _build(d, store_path, tmp_path / "poisoned")
    assert poisoned["manifest"]["sha256"] != first["manifest"]["sha256"]  # the poison works on builds

    lock_path = d / "reprobuild.lock"
    check, summary, _ = rebuild_and_compare(image, "tar", load_lock(lock_path), lock_path,
                                            VerifyOptions(rebuild=True, store=store_path, definition=d),
                                            lambda _m: None)
    assert check.passed, (check.detail, summary)
    # …and the poisoned output is caught by the same rebuild.
    check, summary, _ = rebuild_and_compare(tmp_path / "poisoned/image.tar", "tar", load_lock(lock_path), lock_path,
                                            VerifyOptions(rebuild=True, store=store_path, definition=d),
                                            lambda _m: None)
    assert check.passed is False and summary


def test_two_images_share_the_unpacked_package(tmp_path: Path, base_deb: Path) -> None:
    """The per-.deb stage: the package's payload is decompressed once per store, whatever uses it."""
    d, store_path = _definition(tmp_path / "fx", base_deb)
    _build(d, store_path, tmp_path / "one")
    (entry,) = (store_path / "cache/unpacked").glob("*.json")
    doc = json.loads(entry.read_text())
    obj = Store(store_path).path(doc["object"])
    made = obj.stat().st_mtime_ns
    with open(d / "reprobuild.conf", "a") as f:  # another image: other hostname, so another tree
        f.write("\n[Content]\nHostname=other\n")
    from dataclasses import replace

    from reprobuild.config import load_spec
    from reprobuild.lockfile import load_lock, save_lock

    spec = load_spec(d)
    save_lock(replace(load_lock(d / "reprobuild.lock"), config_digest=spec.digest(), config=spec.digest_input()),
              d / "reprobuild.lock")
    other = _build(d, store_path, tmp_path / "two")
    assert other["cache_hits"] == []  # a new image: no install, tree or output entry fits
    assert list((store_path / "cache/unpacked").glob("*.json")) == [entry]
    assert obj.stat().st_mtime_ns == made  # not decompressed again
    from reprobuild.debian.deb import DebFile

    with DebFile(obj) as deb:
        assert [m.name for m in deb.members][-1] == "data.tar"  # the decompressed member, for dpkg


def test_gc_after_an_unchanged_rebuild_keeps_what_the_next_edit_needs(tmp_path: Path, base_deb: Path) -> None:
    """A rebuild served whole from the output cache never looks at the earlier stages; gc after it
    must still keep them (the image directory's root keeps the previous build's objects)."""
    d, store_path = _definition(tmp_path / "fx", base_deb)
    out = tmp_path / "out"
    _build(d, store_path, out)
    assert _build(d, store_path, out)["cache_hits"] == ["tar"]  # nothing but the output is looked at
    report = Store(store_path).gc()
    assert report.removed == ()
    (d / "extra/etc/motd").write_text("edited\n")
    assert _build(d, store_path, out)["cache_hits"] == ["install"]
