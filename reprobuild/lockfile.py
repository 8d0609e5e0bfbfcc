"""The lockfile: what exactly goes into an image, pinned, hashed and signed.

Pure data and canonical JSON (sorted keys, two-space indent, trailing newline), so the same lock
always has the same bytes and a signature over those bytes is meaningful. The format is
documented field by field in ``docs/lockfile.md``; bump :data:`LOCK_VERSION` on any change that
an older reader would misread.

Mirror host names are *not* part of a lock unless the configuration names a mirror: each package
records its pool path relative to its source, and the source records its archive name and the
snapshot id of its Release date, so URLs are formed at fetch time from the host's apt sources,
a configured mirror, or a snapshot archive.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.errors import LockError
from reprobuild.fileio import write_atomic

LOCK_VERSION = 1
LOCK_NAME = "reprobuild.lock"
SIGNATURE_SUFFIX = ".sig"


@dataclass(frozen=True)
class LockSource:
    """One suite/component index the packages were resolved from."""

    id: str  # e.g. "trixie-security/main"
    archive: str  # "debian" or "debian-security": which archive root serves it
    suite: str  # e.g. "trixie-security"
    codename: str
    component: str
    date: str  # Release Date, RFC 2822
    snapshot: str  # snapshot id from the Release date, YYYYMMDDTHHMMSSZ
    inrelease_sha256: str
    packages_sha256: str  # the Packages index the resolver read
    mirror: str | None = None  # written only when the configuration names a mirror


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    architecture: str
    source: str  # LockSource.id
    source_package: str
    source_version: str
    path: str  # pool path relative to the archive root
    size: int
    sha256: str
    installed_size: int
    essential: bool
    priority: str
    multi_arch: str
    depends: tuple[str, ...]  # names of locked packages its Depends chose
    pre_depends: tuple[str, ...]  # names of locked packages its Pre-Depends chose
    reason: str = ""
    urls: tuple[str, ...] = ()  # absolute URLs, only when a mirror is configured

    @property
    def pin(self) -> str:
        """``name=version:architecture``, the form manifests and messages name a package in."""
        return f"{self.name}={self.version}:{self.architecture}"

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


@dataclass(frozen=True)
class PackageSet:
    """A resolved set: ``image`` (the root tree), ``initrd``, ``tools``."""

    name: str
    release: str
    base_set: str
    requested: tuple[str, ...]
    recommends: bool
    packages: tuple[LockedPackage, ...]

    def by_name(self) -> dict[str, LockedPackage]:
        return {p.name: p for p in self.packages}


@dataclass(frozen=True)
class Lock:
    config_digest: str
    distribution: str
    release: str
    architecture: str  # Debian architecture, e.g. amd64
    source_date_epoch: int
    seed: str  # 32 hex digits
    sources: tuple[LockSource, ...]
    sets: tuple[PackageSet, ...]
    config: dict[str, Any] = field(default_factory=dict)  # the digest input, for humans and diff
    generator: str = "reprobuild"
    version: int = LOCK_VERSION

    def package_set(self, name: str) -> PackageSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise LockError(f"the lock has no package set {name!r} (it has: {', '.join(s.name for s in self.sets)})")

    def has_set(self, name: str) -> bool:
        return any(s.name == name for s in self.sets)

    def source(self, source_id: str) -> LockSource:
        for s in self.sources:
            if s.id == source_id:
                return s
        raise LockError(f"a package names source {source_id!r}, which the lock does not list")

    def all_packages(self) -> Iterator[LockedPackage]:
        """Every distinct package (by sha256) across all sets, in a stable order."""
        seen: set[str] = set()
        for package_set in self.sets:
            for package in package_set.packages:
                if package.sha256 not in seen:
                    seen.add(package.sha256)
                    yield package


# --------------------------------------------------------------------------------------------
# Canonical JSON


def lock_to_data(lock: Lock) -> dict[str, Any]:
    data = asdict(lock)
    for source in data["sources"]:
        if source["mirror"] is None:
            del source["mirror"]
    for package_set in data["sets"]:
        for package in package_set["packages"]:
            if not package["urls"]:
                del package["urls"]
    return data


def dumps(lock: Lock) -> bytes:
    """Canonical bytes: sorted keys, two-space indent, UTF-8, trailing newline."""
    return (json.dumps(lock_to_data(lock), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def loads(data: bytes, origin: str = "lock") -> Lock:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LockError(f"{origin}: not a JSON lockfile ({e})") from None
    if not isinstance(raw, dict):
        raise LockError(f"{origin}: not a lockfile (top level is not an object)")
    version = raw.get("version")
    if version != LOCK_VERSION:
        raise LockError(
            f"{origin}: lockfile version {version!r} is not supported (this reprobuild reads version {LOCK_VERSION})",
            hint="upgrade reprobuild, or run reprobuild lock to write a new lock",
        )
    try:
        sources = tuple(LockSource(**s) for s in raw["sources"])
        sets = tuple(
            PackageSet(
                name=s["name"],
                release=s["release"],
                base_set=s["base_set"],
                requested=tuple(s["requested"]),
                recommends=bool(s["recommends"]),
                packages=tuple(
                    LockedPackage(
                        **{
                            **p,
                            "depends": tuple(p["depends"]),
                            "pre_depends": tuple(p["pre_depends"]),
                            "urls": tuple(p.get("urls", ())),
                        }
                    )
                    for p in s["packages"]
                ),
            )
            for s in raw["sets"]
        )
        lock = Lock(
            config_digest=raw["config_digest"],
            distribution=raw["distribution"],
            release=raw["release"],
            architecture=raw["architecture"],
            source_date_epoch=int(raw["source_date_epoch"]),
            seed=raw["seed"],
            sources=sources,
            sets=sets,
            config=raw.get("config", {}),
            generator=raw.get("generator", "reprobuild"),
            version=version,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LockError(f"{origin}: malformed lockfile: {type(e).__name__}: {e}") from None
    _check_consistency(lock, origin)
    return lock


def _check_consistency(lock: Lock, origin: str) -> None:
    source_ids = {s.id for s in lock.sources}
    for package_set in lock.sets:
        names = set()
        for p in package_set.packages:
            if p.source not in source_ids:
                raise LockError(f"{origin}: package {p.name} names unknown source {p.source!r}")
            if len(p.sha256) != 64 or any(c not in "0123456789abcdef" for c in p.sha256):
                raise LockError(f"{origin}: package {p.name} has a malformed sha256")
            if p.path.startswith("/") or ".." in p.path.split("/"):
                raise LockError(f"{origin}: package {p.name} has an unsafe pool path {p.path!r}")
            names.add(p.name)
        for p in package_set.packages:
            missing = [d for d in p.depends + p.pre_depends if d not in names]
            if missing:
                raise LockError(f"{origin}: package {p.name} depends on {', '.join(missing)}, not in set {package_set.name}")


def build_set_problems(image: PackageSet, build: PackageSet) -> list[str]:
    """Why ``build`` is not a build environment for ``image`` (empty when it is): it must hold
    every image package at the image's version and sha256, so that what is compiled against its
    headers runs against the image's libraries. Pure."""
    have = build.by_name()
    problems = []
    for p in image.packages:
        other = have.get(p.name)
        if other is None:
            problems.append(f"{p.name} is missing")
        elif (other.version, other.architecture, other.sha256) != (p.version, p.architecture, p.sha256):
            problems.append(f"{p.name} is {other.version} ({other.sha256[:12]}), the image has {p.version} "
                            f"({p.sha256[:12]})")
    return problems


def load_lock(path: Path) -> Lock:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LockError(f"{path}: no lockfile", hint="run reprobuild lock first") from None
    return loads(data, str(path))


def save_lock(lock: Lock, path: Path) -> bytes:
    data = dumps(lock)
    write_atomic(path, data)
    return data


def lock_digest(lock: Lock) -> str:
    """``sha256:<hex>`` of the lock's canonical bytes: what manifests and provenance name it by."""
    return "sha256:" + hashlib.sha256(dumps(lock)).hexdigest()
