"""Where a locked package's bytes can be downloaded from.

A lock names each package's pool path relative to its source's archive root. The base URL of
that root comes, in order, from the lock itself (only when the configuration named ``Mirror=``),
the configuration, or the host's apt sources; a configured snapshot archive adds
``<snapshot base>/<archive>/<snapshot id>/<path>`` as a fallback that keeps working after the
mirror has dropped a superseded version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import RepositoryError
from reprobuild.lockfile import Lock, LockedPackage


@dataclass(frozen=True)
class Mirrors:
    """Base URLs by archive name ("debian", "debian-security"), plus an optional snapshot base."""

    archives: tuple[tuple[str, str], ...]
    snapshot_base: str | None = None

    def base_for(self, archive: str) -> str | None:
        for name, url in self.archives:
            if name == archive:
                return url
        return None


def host_mirrors(
    configured: dict[str, str | None], snapshot_base: str | None = None, root: Path = Path("/")
) -> Mirrors:
    """Mirrors for each archive: the configured URL, else the host's apt sources (lazily read)."""
    from reprobuild.debian.sources import host_mirror_for

    archives = []
    for archive, url in sorted(configured.items()):
        if url is None:
            try:
                url = host_mirror_for(archive, root=root)
            except (RepositoryError, ValueError, OSError):  # no host source for it: other URLs may work
                url = None
        if url:
            archives.append((archive, url.rstrip("/")))
    return Mirrors(tuple(archives), snapshot_base.rstrip("/") if snapshot_base else None)


def package_urls(lock: Lock, package: LockedPackage, mirrors: Mirrors) -> tuple[str, ...]:
    """Every URL to try for ``package``, best first, without duplicates."""
    source = lock.source(package.source)
    urls: list[str] = list(package.urls)
    base = source.mirror or mirrors.base_for(source.archive)
    if base:
        urls.append(f"{base}/{package.path}")
    if mirrors.snapshot_base and source.snapshot:
        urls.append(f"{mirrors.snapshot_base}/{source.archive}/{source.snapshot}/{package.path}")
    return tuple(dict.fromkeys(urls))


def mirrors_for_spec(spec, root: Path = Path("/")) -> Mirrors:
    """Mirrors from an image definition (``Mirror=``, ``SecurityMirror=``, ``SnapshotMirror=``)."""
    configured: dict[str, str | None] = {"debian": None, "debian-security": None}
    if spec is not None:
        configured = {"debian": spec.distribution.mirror, "debian-security": spec.distribution.security_mirror}
    snapshot = spec.distribution.snapshot_mirror if spec is not None else None
    return host_mirrors(configured, snapshot, root)


def fetch_items(lock: Lock, mirrors: Mirrors, set_names: tuple[str, ...] | None = None) -> list:
    """One :class:`reprobuild.fetch.FetchItem` per distinct package of the lock (or of some sets)."""
    from reprobuild.fetch import FetchItem

    items = []
    seen: set[str] = set()
    for package_set in lock.sets:
        if set_names is not None and package_set.name not in set_names:
            continue
        for package in package_set.packages:
            if package.sha256 in seen:
                continue
            seen.add(package.sha256)
            items.append(FetchItem(name=f"{package.name} {package.version} ({package.architecture})",
                                   sha256=package.sha256, size=package.size,
                                   urls=package_urls(lock, package, mirrors)))
    return items
