"""The lock stage's fast path: concurrent InRelease checks and the cached universe.

Hermetic: a signed fixture repository with three suites (release, -updates, -security) served
over file://. What must hold: a warm lock reads no Packages index and resolves exactly what a
cold lock (and a lock without any cache) resolves; a stale or damaged cache entry, or a guess
that no longer matches the verified Releases, never changes the result.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from fixtures.make_repo import DEFAULT_SUITES, FixturePackage, make_repo
from reprobuild.config import load_spec
from reprobuild.debian import repository
from reprobuild.lock import LockOptions, lock_spec, universe_key

SECURITY = [FixturePackage("hello", "2.10-3+deb12u1", depends="libc6 (>= 2.36)")]


def _suites(hello_version: str | None = None) -> dict[str, list[FixturePackage]]:
    security = (
        SECURITY if hello_version is None else [dataclasses.replace(SECURITY[0], version=hello_version)]
    )
    return {**DEFAULT_SUITES, "stable-security": security}


@pytest.fixture
def repo(tmp_path: Path):
    return make_repo(tmp_path / "repo", _suites(), gnupg_home=tmp_path / "gnupg")


@pytest.fixture
def image(tmp_path: Path, repo) -> Path:
    directory = tmp_path / "image"
    directory.mkdir()
    url = repo.root.as_uri()
    (directory / "reprobuild.conf").write_text(
        "[Distribution]\nDistribution=debian\nRelease=stable\nArchitecture=x86-64\nUpdates=yes\n"
        f"Mirror={url}\nSecurityMirror={url}\nKeyring={repo.keyring_path}\n"
        "[Content]\nBaseSet=minbase\nPackages=hello mail-user\n"
        "[Tools]\nToolsTree=host\n"
    )
    return directory


def _lock(image: Path, cache: Path | None, messages: list[str] | None = None):
    options = LockOptions(index_cache=cache, progress=messages.append if messages is not None else None)
    return lock_spec(load_spec(image), None, options).lock


def _versions(lock) -> dict[str, dict[str, str]]:
    return {s.name: {p.name: p.version for p in s.packages} for s in lock.sets}


def _forbid_index_reads(monkeypatch) -> None:
    def no_index(*args, **kwargs):
        raise AssertionError("a Packages index was read on a warm lock")

    monkeypatch.setattr(repository, "fetch_packages", no_index)
    monkeypatch.setattr(repository, "fetch_index_text", no_index)


def test_warm_lock_reads_no_index_and_resolves_the_same(image, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    uncached = _lock(image, None)
    cold_messages: list[str] = []
    cold = _lock(image, cache, cold_messages)
    assert cold == uncached
    assert _versions(cold)["image"]["hello"] == "2.10-3+deb12u1"  # the -security version won
    assert [s.id for s in cold.sources] == ["stable/main", "stable-updates/main", "stable-security/main"]
    assert any("building the universe" in m for m in cold_messages)
    assert len(list((cache / "derived" / "universe").iterdir())) == 1

    _forbid_index_reads(monkeypatch)
    warm_messages: list[str] = []
    warm = _lock(image, cache, warm_messages)
    assert warm == cold
    assert any("using the cached universe" in m for m in warm_messages)
    # Every suite's InRelease is still fetched and verified on a warm lock.
    assert sum("InRelease" in m for m in warm_messages) == 3


def test_damaged_cached_universe_is_rebuilt(image, tmp_path):
    cache = tmp_path / "cache"
    cold = _lock(image, cache)
    (entry,) = (cache / "derived" / "universe").iterdir()
    entry.write_bytes(b"bit rot")
    messages: list[str] = []
    assert _lock(image, cache, messages) == cold
    assert any("building the universe" in m for m in messages)
    assert _lock(image, cache) == cold  # and cached again


def test_stale_guess_is_not_used(image, tmp_path, monkeypatch):
    """The "last universe" pointer names another universe (as after a mirror update): the
    verified Releases decide, so the right universe is loaded, not the guessed one."""
    cache = tmp_path / "cache"
    cold = _lock(image, cache)
    (pointer,) = (cache / "derived" / "latest").iterdir()
    (real_key,) = (p.name for p in (cache / "derived" / "universe").iterdir())
    real_indices = json.loads(pointer.read_text())
    # The pointer names another -security index (its text and universe are cached too, so the
    # guess loads: it must still be dropped, because the verified Releases name other indices).
    stale = [*real_indices[:-1], [real_indices[-1][0], "0" * 64, None]]
    other = universe_key("amd64", [tuple(i) for i in stale])
    assert other != real_key
    shutil.copy(cache / "derived" / "universe" / real_key, cache / "derived" / "universe" / other)
    shutil.copy(repository.IndexCache(cache).text_path(real_indices[-1][1]),
                repository.IndexCache(cache).text_path("0" * 64))
    pointer.write_text(json.dumps(stale))
    loaded: list[str] = []
    real_get = repository.IndexCache.get_derived
    monkeypatch.setattr(repository.IndexCache, "get_derived",
                        lambda self, kind, key: loaded.append(key) or real_get(self, kind, key))  # fmt: skip
    _forbid_index_reads(monkeypatch)
    assert _lock(image, cache) == cold
    assert other in loaded and real_key in loaded
    assert json.loads(pointer.read_text()) == real_indices  # the pointer follows the verified indices again


def test_a_request_made_from_the_universe_is_speculated_too(image, tmp_path):
    """The initrd's request depends on the universe (its optional packages): it is speculated as
    a callable, made from the guessed universe and resolved there, giving what resolving it
    directly gives."""
    from reprobuild import lock as lock_module
    from reprobuild.resolve import ResolveRequest, resolve

    cache = tmp_path / "cache"
    _lock(image, cache)
    index_cache = repository.IndexCache(cache)
    (pointer,) = (cache / "derived" / "latest").iterdir()
    indices = [tuple(i) for i in json.loads(pointer.read_text())]
    made: list[int] = []

    def from_universe(universe) -> ResolveRequest:
        made.append(len(universe))
        return ResolveRequest(packages=("hello",), base_set="essential")

    guessed = lock_module._guess(index_cache, universe_key("amd64", indices), indices, [from_universe])
    assert guessed is not None
    universe, resolved = guessed
    assert made == [len(universe)]
    ((request, resolution),) = resolved
    assert request == ResolveRequest(packages=("hello",), base_set="essential")
    assert resolution == resolve(universe, request)


@pytest.mark.parametrize(("bootable", "packages", "speculated"), [
    ("yes", "hello", True), ("auto", "hello linux-image-amd64", True), ("auto", "hello", False),
    ("no", "linux-image-amd64", False)])
def test_the_initrd_is_speculated_only_for_images_that_will_likely_boot(image, bootable, packages, speculated):
    from reprobuild import lock as lock_module

    conf = image / "reprobuild.conf"
    conf.write_text(conf.read_text().replace("Packages=hello mail-user", f"Packages={packages}\nBootable={bootable}"))
    assert lock_module._may_boot(load_spec(image)) is speculated


def test_changed_mirror_content_is_never_served_from_the_cache(image, tmp_path, repo):
    cache = tmp_path / "cache"
    before = _lock(image, cache)
    # The mirror publishes a new -security hello: same URLs, new InRelease and index hashes.
    shutil.rmtree(repo.root)
    republished = make_repo(repo.root, _suites("2.10-3+deb12u2"), gnupg_home=tmp_path / "gnupg2")
    assert republished.keyring_path == repo.keyring_path  # the configured Keyring= (a new key)
    after = _lock(image, cache)
    assert _versions(before)["image"]["hello"] == "2.10-3+deb12u1"
    assert _versions(after)["image"]["hello"] == "2.10-3+deb12u2"
    assert after.sources[2].packages_sha256 != before.sources[2].packages_sha256
    assert len(list((cache / "derived" / "universe").iterdir())) == 2


def test_warm_lock_resolves_while_the_inreleases_are_checked(image, tmp_path, monkeypatch):
    """On a warm lock the image set is resolved on the guessed universe in the loader thread,
    and that resolution is the one used (the same lock as a cold one)."""
    import threading

    from reprobuild import resolve as resolve_module

    cache = tmp_path / "cache"
    cold = _lock(image, cache)
    threads: list[str] = []
    real_resolve = resolve_module.resolve

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_resolve(*args, **kwargs)

    monkeypatch.setattr(resolve_module, "resolve", spy)
    assert _lock(image, cache) == cold
    assert len(threads) == 1 and threads[0].startswith("universe")  # one set (ToolsTree=host), speculated
