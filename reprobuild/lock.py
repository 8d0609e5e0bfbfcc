"""The lock stage: an :class:`ImageSpec` and verified repository metadata → a :class:`Lock`.

Steps: fetch and verify every suite's InRelease and Packages index (cached in the store), build
one resolver universe per release, resolve each package set (``image``, and ``initrd`` for
bootable images), and pin the result with the epoch, the seed and the config digest.

With an existing lock the resolution keeps every pinned version that is still available
(cargo-style): only what the configuration change needs moves. ``update=True`` re-resolves
everything; ``update_packages`` frees only the named packages.
"""

from __future__ import annotations

import email.utils
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from reprobuild.config import ImageSpec
from reprobuild.debian.package import BinaryPackage
from reprobuild.errors import LockError, RepositoryError
from reprobuild.lockfile import Lock, LockedPackage, LockSource, PackageSet

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# What a bootable image's initrd needs to find its DPS partitions and set up verity, on top of
# the Essential set: systemd as the initrd's init, udev to find devices, kmod to load modules.
INITRD_PACKAGES = ("systemd", "udev", "kmod")
# From trixie on, systemd-veritysetup lives in its own package; bookworm ships it in systemd.
INITRD_OPTIONAL_PACKAGES = ("systemd-cryptsetup",)
KERNEL_PACKAGE_PREFIXES = ("linux-image-",)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SuiteRef:
    archive: str  # "debian" | "debian-security"
    suite: str


def suites_for(release: str, updates: bool) -> tuple[SuiteRef, ...]:
    """The suites a release is locked from: the release, then -updates and -security."""
    suites = [SuiteRef("debian", release)]
    if updates and release not in ("sid", "unstable"):
        suites.append(SuiteRef("debian", f"{release}-updates"))
        suites.append(SuiteRef("debian-security", f"{release}-security"))
    return tuple(suites)


@dataclass(frozen=True)
class PackageChange:
    name: str
    old: str | None
    new: str | None


@dataclass(frozen=True)
class LockResult:
    lock: Lock
    changes: tuple[PackageChange, ...]  # relative to the previous lock of the image set (empty if none)


@dataclass
class _Universe:
    """One release's fetched indices: packages plus the lock sources they came from."""

    packages: list[BinaryPackage]
    sources: list[LockSource]
    dates: list[datetime]


@dataclass(frozen=True)
class LockOptions:
    update: bool = False
    update_packages: tuple[str, ...] = ()
    now: datetime | None = None
    progress: Progress | None = None
    index_cache: Path | None = None
    host_root: Path = Path("/")


def _mirror_for(spec: ImageSpec, archive: str, host_root: Path) -> tuple[str, bool]:
    """(base URL, whether the configuration named it)."""
    from reprobuild.debian.sources import host_mirror_for

    configured = spec.distribution.mirror if archive == "debian" else spec.distribution.security_mirror
    if configured:
        return configured, True
    return host_mirror_for(archive, root=host_root), False


def _fetch_release_universe(spec: ImageSpec, release: str, session, options: LockOptions) -> _Universe:
    from reprobuild.debian import repository

    keyrings = list(spec.distribution.keyring) or [DEFAULT_KEYRING]
    arch = spec.distribution.debian_architecture
    cache = repository.IndexCache(options.index_cache) if options.index_cache else None
    packages: list[BinaryPackage] = []
    sources: list[LockSource] = []
    dates: list[datetime] = []
    for ref in suites_for(release, spec.distribution.updates):
        try:
            base_url, configured = _mirror_for(spec, ref.archive, options.host_root)
        except RepositoryError:
            if ref.archive == "debian-security":
                raise RepositoryError(
                    f"no mirror for {ref.suite}: the host's apt sources name no debian-security archive",
                    hint="set SecurityMirror= in [Distribution], or Updates=no",
                ) from None
            raise
        source = repository.RepositorySource(
            archive=ref.archive, base_url=base_url, suite=ref.suite,
            components=tuple(spec.distribution.repositories), architecture=arch, keyrings=tuple(keyrings),
        )
        verified = repository.fetch_release(session, source, cache, now=options.now, progress=options.progress)
        date = verified.release.date
        dates.append(date)
        for component in spec.distribution.repositories:
            index = repository.fetch_packages(session, source, verified, component, arch, cache,
                                              progress=options.progress)
            source_id = f"{ref.suite}/{component}"
            sources.append(LockSource(
                id=source_id, archive=ref.archive, suite=ref.suite,
                codename=verified.release.codename or ref.suite, component=component,
                date=email.utils.format_datetime(date.astimezone(timezone.utc), usegmt=True).replace("GMT", "UTC"),
                snapshot=repository.snapshot_id(date), inrelease_sha256=verified.inrelease_sha256,
                packages_sha256=index.sha256, mirror=base_url if configured else None,
            ))
            packages.extend(_with_origin(p, source_id) for p in index.packages)
    return _Universe(packages, sources, dates)


def _with_origin(package: BinaryPackage, origin: str) -> BinaryPackage:
    if package.origin == origin:
        return package
    from dataclasses import replace

    return replace(package, origin=origin)


def _locked(resolved, universe_sources: dict[str, LockSource]) -> LockedPackage:
    p = resolved.package
    source = universe_sources[p.origin]
    urls = (f"{source.mirror}/{p.filename}",) if source.mirror else ()
    return LockedPackage(
        name=p.name, version=p.version, architecture=p.architecture, source=p.origin,
        source_package=p.source, source_version=p.source_version, path=p.filename, size=p.size,
        sha256=p.sha256, installed_size=p.installed_size, essential=p.essential, priority=p.priority,
        multi_arch=p.multi_arch, depends=tuple(resolved.dependencies),
        pre_depends=tuple(resolved.pre_dependencies), reason=resolved.reason, urls=urls,
    )


def _pins(previous: Lock | None, set_name: str, options: LockOptions) -> dict[str, str]:
    if previous is None or options.update or not previous.has_set(set_name):
        return {}
    freed = set(options.update_packages)
    return {p.name: p.version for p in previous.package_set(set_name).packages if p.name not in freed}


def _resolve_set(universe, name: str, release: str, base_set: str, requested: Sequence[str], recommends: bool,
                 pins: dict[str, str], sources: dict[str, LockSource]) -> PackageSet:
    from reprobuild.resolve import ResolveRequest, resolve

    resolution = resolve(universe, ResolveRequest(packages=tuple(requested), base_set=base_set,
                                                  recommends=recommends, pins=pins))
    packages = tuple(sorted((_locked(r, sources) for r in resolution.packages), key=lambda p: p.name))
    return PackageSet(name=name, release=release, base_set=base_set, requested=tuple(requested),
                      recommends=recommends, packages=packages)


def derive_seed(image_set: PackageSet) -> str:
    """A seed that depends only on the locked package set, so a re-lock of the same set keeps it."""
    h = hashlib.sha256(b"reprobuild seed v1\0")
    for p in image_set.packages:
        h.update(f"{p.name}\0{p.version}\0{p.architecture}\0{p.sha256}\n".encode())
    return h.hexdigest()[:32]


def has_kernel(package_set: PackageSet) -> bool:
    return any(p.name.startswith(KERNEL_PACKAGE_PREFIXES) and not p.name.endswith("-dbg")
               for p in package_set.packages)


def wants_boot(spec: ImageSpec, image_set: PackageSet) -> bool:
    if spec.content.bootable == "yes":
        return True
    if spec.content.bootable == "no":
        return False
    return has_kernel(image_set)


def lock_spec(spec: ImageSpec, previous: Lock | None = None, options: LockOptions = LockOptions(),
              session=None) -> LockResult:
    """Resolve ``spec`` against verified repository metadata into a new :class:`Lock`."""
    import requests

    from reprobuild.resolve import Universe

    session = session or requests.Session()
    release = spec.distribution.release
    progress = options.progress or (lambda _msg: None)
    fetched = _fetch_release_universe(spec, release, session, options)
    progress(f"resolving {len(fetched.packages)} index entries")
    universe = Universe.from_packages(fetched.packages, spec.distribution.debian_architecture)
    sources = {s.id: s for s in fetched.sources}

    image_set = _resolve_set(universe, "image", release, spec.content.base_set, spec.content.packages,
                             spec.content.recommends, _pins(previous, "image", options), sources)
    sets = [image_set]
    if wants_boot(spec, image_set):
        if not has_kernel(image_set):
            raise LockError("Bootable=yes but the package set has no kernel",
                            hint="add linux-image-amd64 (or -arm64) to Packages=")
        available = {p.name for p in fetched.packages}
        initrd_requested = list(INITRD_PACKAGES) + [p for p in INITRD_OPTIONAL_PACKAGES if p in available]
        initrd_requested += [p for p in spec.initrd.packages if p not in initrd_requested]
        sets.append(_resolve_set(universe, "initrd", release, "essential", initrd_requested, False,
                                 _pins(previous, "initrd", options), sources))

    epoch = spec.build.source_date_epoch
    if epoch is None:
        epoch = int(max(fetched.dates).timestamp())
    seed = spec.build.seed or derive_seed(image_set)
    lock = Lock(
        config_digest=spec.digest(), distribution=spec.distribution.distribution, release=release,
        architecture=spec.distribution.debian_architecture, source_date_epoch=epoch, seed=seed,
        sources=tuple(fetched.sources), sets=tuple(sets), config=spec.digest_input(),
    )
    return LockResult(lock, package_changes(previous, lock))


def package_changes(old: Lock | None, new: Lock, set_name: str = "image") -> tuple[PackageChange, ...]:
    if old is None or not old.has_set(set_name):
        return ()
    before = {p.name: p.version for p in old.package_set(set_name).packages}
    after = {p.name: p.version for p in new.package_set(set_name).packages}
    return tuple(
        PackageChange(name, before.get(name), after.get(name))
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    )


def check_lock_current(spec: ImageSpec, lock: Lock) -> None:
    """Refuse a lock whose configuration digest no longer matches the definition."""
    if lock.config_digest != spec.digest():
        changed = sorted(
            f"{section}.{key}"
            for section, values in spec.digest_input().items()
            for key, value in values.items()
            if lock.config.get(section, {}).get(key) != value
        )
        detail = f" (changed: {', '.join(changed)})" if changed else ""
        raise LockError(f"lock is out of date: run reprobuild lock{detail}")
