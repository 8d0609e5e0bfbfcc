import json
from pathlib import Path

import pytest

from reprobuild import keys
from reprobuild.errors import LockError, VerificationFailed
from reprobuild.lockfile import (
    Lock,
    LockedPackage,
    LockSource,
    PackageSet,
    dumps,
    load_lock,
    loads,
    save_lock,
)
from reprobuild.mirrors import Mirrors, package_urls


def make_lock(version: str = "1.0-1") -> Lock:
    source = LockSource(id="stable/main", archive="debian", suite="stable", codename="stable", component="main",
                        date="Sat, 01 Nov 2025 10:00:00 UTC", snapshot="20251101T100000Z",
                        inrelease_sha256="a" * 64, packages_sha256="b" * 64)
    pkgs = (
        LockedPackage(name="base", version=version, architecture="amd64", source="stable/main", source_package="base",
                      source_version=version, path="pool/main/b/base/base_1.0-1_amd64.deb", size=10, sha256="c" * 64,
                      installed_size=1, essential=True, priority="required", multi_arch="no", depends=(),
                      pre_depends=()),
        LockedPackage(name="app", version="2", architecture="all", source="stable/main", source_package="app",
                      source_version="2", path="pool/main/a/app/app_2_all.deb", size=20, sha256="d" * 64,
                      installed_size=2, essential=False, priority="optional", multi_arch="foreign",
                      depends=("base",), pre_depends=("base",)),
    )
    return Lock(config_digest="sha256:" + "e" * 64, distribution="debian", release="stable", architecture="amd64",
                source_date_epoch=1761991200, seed="0" * 32, sources=(source,),
                sets=(PackageSet("image", "stable", "minbase", ("app",), False, pkgs),))


def test_canonical_round_trip() -> None:
    lock = make_lock()
    data = dumps(lock)
    assert data.endswith(b"\n") and data == dumps(loads(data))
    assert loads(data) == lock
    raw = json.loads(data)
    assert list(raw) == sorted(raw), "keys are sorted"
    assert b'\n  "config"' in data, "two-space indent"
    assert "mirror" not in raw["sources"][0], "no host name unless configured"


def test_atomic_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "reprobuild.lock"
    save_lock(make_lock(), path)
    assert load_lock(path) == make_lock()
    assert [p.name for p in tmp_path.iterdir()] == ["reprobuild.lock"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d.pop("sources"), "invalid lockfile: sources: missing"),
        (lambda d: d["sets"][0]["packages"][0].update(sha256="zz"), r"packages\[0\]\.sha256: expected 64 lowercase hex"),
        (lambda d: d["sets"][0]["packages"][0].update(path="../../etc/passwd"), "relative, normalised pool path"),
        (lambda d: d["sets"][0]["packages"][1].update(depends=["ghost"]), "depends on ghost"),
        (lambda d: d["sets"][0]["packages"][1].update(source="nowhere/main"), "unknown source"),
    ],
    ids=["version", "missing-field", "bad-sha", "path-traversal", "dangling-dep", "unknown-source"],
)
def test_malformed_locks_are_refused(mutate, message) -> None:
    data = json.loads(dumps(make_lock()))
    mutate(data)
    with pytest.raises(LockError, match=message):
        loads(json.dumps(data).encode())


def test_not_json() -> None:
    with pytest.raises(LockError, match="not a JSON lockfile"):
        loads(b"\x00garbage")


def test_sign_and_verify(tmp_path: Path) -> None:
    key_path, pub_path = keys.generate_keypair(tmp_path / "k")
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    data = dumps(make_lock())
    signer = keys.open_lock_signer(key_path, {})
    sig = keys.sign_lock(data, signer)
    assert keys.sign_lock(data, signer) == sig, "ed25519 is deterministic"
    trusted = keys.load_trusted_keys(pub_path)
    assert keys.verify_lock(data, sig, "sig", trusted).startswith("SHA256:")
    with pytest.raises(VerificationFailed, match="changed after signing"):
        keys.verify_lock(dumps(make_lock("1.0-2")), sig, "sig", trusted)
    _, other_pub = keys.generate_keypair(tmp_path / "other")
    with pytest.raises(VerificationFailed, match="does not trust"):
        keys.verify_lock(data, sig, "sig", keys.load_trusted_keys(other_pub))

def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    keys.generate_keypair(tmp_path / "k")
    with pytest.raises(keys.KeyFileError, match="already exists"):
        keys.generate_keypair(tmp_path / "k")


def test_package_urls_order() -> None:
    lock = make_lock()
    pkg = lock.sets[0].packages[0]
    mirrors = Mirrors((("debian", "http://127.0.0.1:9/debian"),), snapshot_base="http://127.0.0.1:8/archive")
    assert package_urls(lock, pkg, mirrors) == (
        "http://127.0.0.1:9/debian/pool/main/b/base/base_1.0-1_amd64.deb",
        "http://127.0.0.1:8/archive/debian/20251101T100000Z/pool/main/b/base/base_1.0-1_amd64.deb",
    )
