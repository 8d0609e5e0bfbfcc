"""Live: tools from the lock and the build cache, on a copy of lock/minimal (two real builds).

* build U: ``--no-cache``, with the host's mkfs.erofs, mksquashfs, mkfs.vfat/mkfs.fat, mke2fs,
  mcopy and mmd shadowed by failing scripts on PATH (the tools tree must be used);
* build C: cache on, cold (the staged tree path), same shadow;
* build W: cache on, warm, into a new directory (the disk is made around the cached file system).

U, C and W must be byte-identical; the manifest must list every tool with its locked version.
Then an extra-tree edit must reuse the installed packages and rebuild only what follows, and a
ToolsTree=host copy must really reach the (shadowed) host tools — proof that the shadow works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from reprobuild.lockfile import load_lock
from tests.live_images import sha256_file

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parent.parent
SHADOWED = ("mkfs.erofs", "mksquashfs", "mkfs.vfat", "mkfs.fat", "mke2fs", "mcopy", "mmd", "debugfs", "dumpe2fs")


@dataclass(frozen=True)
class Builds:
    directory: Path
    store: Path
    env: dict[str, str]
    uncached: dict
    cold: dict
    warm: dict
    out: dict[str, Path]


def _shadow_dir(root: Path) -> Path:
    shadow = root / "shadow-bin"
    shadow.mkdir()
    for tool in SHADOWED:
        script = shadow / tool
        script.write_text(f"#!/bin/sh\necho 'host {tool} must not run' >&2\nexit 97\n")
        script.chmod(0o755)
    return shadow


def _definition(root: Path, name: str, tools_tree: str) -> Path:
    d = root / name
    (d / "extra/etc").mkdir(parents=True)
    (d / "extra/etc/reprobuild-test").write_text("first\n")
    conf = (REPO / "lock/minimal/reprobuild.conf").read_text()
    conf = "\n".join(line for line in conf.splitlines() if not line.startswith("LockKey"))
    (d / "reprobuild.conf").write_text(conf + f"\n[Content]\nExtraTrees=extra\n\n[Tools]\nToolsTree={tools_tree}\n")
    return d


def _reprobuild(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "reprobuild", *args], check=False, env=env, text=True, capture_output=True,
                       timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"reprobuild {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _build(d: Path, out: Path, env: dict[str, str], *extra: str) -> dict:
    r = _reprobuild("build", "-C", str(d), "--locked", "-o", str(out), "--json", *extra, env=env)
    return json.loads(r.stdout)


@pytest.fixture(scope="session")
def cache_builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    root = tmp_path_factory.mktemp("cache-live")
    store = root / "store"
    base = {k: v for k, v in os.environ.items() if k not in ("SOURCE_DATE_EPOCH",)}
    env = {**base, "REPROBUILD_STORE": str(store)}
    d = _definition(root, "minimal-tools", "lock")
    _reprobuild("lock", "-C", str(d), env=env)
    shadowed = {**env, "PATH": f"{_shadow_dir(root)}:{env.get('PATH', '/usr/bin:/bin')}"}
    out = {"uncached": root / "out-uncached", "cold": root / "out-cold", "warm": root / "out-warm"}
    uncached = _build(d, out["uncached"], shadowed, "--no-cache")
    cold = _build(d, out["cold"], shadowed)
    warm = _build(d, out["warm"], shadowed)
    return Builds(d, store, shadowed, uncached, cold, warm, out)


def test_cached_and_uncached_builds_are_identical_without_host_tools(cache_builds: Builds) -> None:
    digests = {name: sha256_file(path / "image.raw") for name, path in cache_builds.out.items()}
    assert len(set(digests.values())) == 1, digests
    assert cache_builds.uncached["manifest"] == cache_builds.cold["manifest"] == cache_builds.warm["manifest"]
    for name in ("image.roothash", "image.raw.manifest.json"):
        contents = {(p / name).read_bytes() for p in cache_builds.out.values()}
        assert len(contents) == 1, name


def test_cache_hits_follow_the_stages(cache_builds: Builds) -> None:
    assert cache_builds.uncached["cache_hits"] == []
    assert "tree" not in cache_builds.cold["cache_hits"] and "ddi" not in cache_builds.cold["cache_hits"]
    # Into a new directory: the store keeps a receipt of the disk, not a copy, so the disk is made
    # again around the cached file system; nothing before it is even looked at.
    assert cache_builds.warm["cache_hits"] == ["fs"]
    assert cache_builds.warm["timings"].get("tree") is None


def test_manifest_lists_every_tool_with_its_locked_version(cache_builds: Builds) -> None:
    lock = load_lock(cache_builds.directory / "reprobuild.lock")
    locked = {p.name: p.version for p in lock.package_set("tools").packages}
    manifest = cache_builds.warm["manifest"]
    tools = manifest["tools"]
    assert tools["tree"] == "lock" and tools["release"] == lock.release
    for tool in ("mkfs.erofs", "mksquashfs", "mke2fs", "mkfs.vfat", "mcopy"):
        entry = tools["tools"][tool]
        assert entry["version"] == locked[entry["package"]], tool
    assert manifest["filesystem"]["version"] == locked["erofs-utils"]
    assert sorted(tools["packages"]) == sorted(f"{p.name}={p.version}:{p.architecture}"
                                               for p in lock.package_set("tools").packages)


def test_extra_tree_edit_reuses_the_installed_packages(cache_builds: Builds) -> None:
    root = cache_builds.directory.parent
    (cache_builds.directory / "extra/etc/reprobuild-test").write_text("edited\n")
    try:
        edited = _build(cache_builds.directory, root / "out-edited", cache_builds.env)
        # The same edit without the cache: the copy of the cached tree changed nothing else.
        edited_uncached = _build(cache_builds.directory, root / "out-edited-uncached", cache_builds.env, "--no-cache")
    finally:
        (cache_builds.directory / "extra/etc/reprobuild-test").write_text("first\n")
    assert "install" in edited["cache_hits"] and "tree" not in edited["cache_hits"]
    assert "tools" in edited["cache_hits"]
    assert edited["manifest"]["sha256"] != cache_builds.warm["manifest"]["sha256"]
    assert edited["manifest"]["sha256"] == edited_uncached["manifest"]["sha256"]
    assert sha256_file(root / "out-edited/image.raw") == sha256_file(root / "out-edited-uncached/image.raw")


def test_host_mode_really_reaches_the_shadowed_tools(cache_builds: Builds) -> None:
    """The control: with ToolsTree=host the same shadow makes the build fail in mkfs, so the
    identical images above did not come from the host's tools."""
    d = _definition(cache_builds.directory.parent, "minimal-host", "host")
    _reprobuild("lock", "-C", str(d), env=cache_builds.env)
    r = _reprobuild("build", "-C", str(d), "--locked", "-o", str(d / "out"), env=cache_builds.env, check=False)
    assert r.returncode != 0
    assert "mkfs.erofs" in r.stderr and "97" in r.stderr


def test_store_verify_finds_the_real_extracted_trees_intact(cache_builds: Builds) -> None:
    """No false alarm on real trees (setuid files, capabilities in xattrs, hard links, symlinks):
    every extracted tree equals its object, and nothing is removed. The installed image tree is
    cached as its tar only (stages/install.py); it is extracted here as the cache extracts the
    trees it keeps (Cache.tree_dir), so that the richest real tree is checked too."""
    from reprobuild.cache import Cache
    from reprobuild.store import Store

    cache = Cache(Store(cache_builds.store))
    for entry_file in sorted((cache_builds.store / "cache/install").glob("*.json")):
        entry = cache.get("install", entry_file.stem, record=False)
        assert entry is not None
        cache.tree_dir(entry)
    r = _reprobuild("store", "verify", "--json", env={**cache_builds.env, "REPROBUILD_STORE": str(cache_builds.store)})
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["trees_removed"] == [] and doc["corrupt"] == []
    trees = sorted(p.name for p in (cache_builds.store / "trees").iterdir())
    assert len(trees) >= 2  # the installed image tree (extracted above) and the tools tree
