"""The lock stage: an :class:`ImageSpec` and verified repository metadata → a :class:`Lock`.

Steps: fetch and verify every suite's InRelease (concurrently) and Packages index (cached in the
store), build one resolver universe per release (cached too, keyed by the indices' hashes), resolve
each package set (``image``, and ``initrd`` for bootable images), and pin the result with the
epoch, the seed and the config digest.

With an existing lock the resolution keeps every pinned version that is still available
(cargo-style): only what the configuration change needs moves. ``update=True`` re-resolves
everything; ``update_packages`` frees only the named packages.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from reprobuild.config import ImageSpec
from reprobuild.errors import LockError, LockOutOfDate, RepositoryError, ReprobuildError
from reprobuild.lockfile import Lock, LockedPackage, LockSource, PackageSet, build_set_problems

if TYPE_CHECKING:
    from reprobuild.debian.repository import RepositorySource
    from reprobuild.keys import LockSigner
    from reprobuild.resolve import Resolution, ResolveRequest, Universe

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# What a bootable image's initrd needs to find its DPS partitions and set up verity, on top of
# the Essential set: systemd as the initrd's init, udev to find devices, kmod to load modules.
INITRD_PACKAGES = ("systemd", "udev", "kmod")
# From trixie on, systemd-veritysetup lives in its own package; bookworm ships it in systemd.
INITRD_OPTIONAL_PACKAGES = ("systemd-cryptsetup",)
KERNEL_PACKAGE_PREFIXES = ("linux-image-",)
# The tools set (ToolsTree=lock): every program that shapes the output bytes (reprobuild.tools),
# on top of the Essential set. [Tools] Packages= adds to it.
TOOLS_PACKAGES = ("erofs-utils", "squashfs-tools", "e2fsprogs", "dosfstools", "mtools")

Progress = Callable[[str], None]
# A request to resolve while the InReleases are on the wire: known, or made from the universe.
Speculation: TypeAlias = "ResolveRequest | Callable[[Universe], ResolveRequest]"


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
class _Fetched:
    """One release's verified metadata: the resolver universe plus the lock sources it came from,
    and the resolutions already made on it (while the InReleases were on the wire)."""

    universe: Universe
    sources: list[LockSource]
    dates: list[datetime]
    resolved: list[tuple[ResolveRequest, Resolution]] = field(default_factory=list)


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


def universe_key(architecture: str, indices: Sequence[tuple[str, str, str | None]]) -> str:
    """The cache key of the universe built from ``indices`` — (origin, Packages sha256, binary-all
    sha256 or None) in suite order — for ``architecture``: a sha256 over them and every version
    that shapes the result (index parser, universe format), so a key never names stale data."""
    from reprobuild.debian.repository import PARSER_VERSION
    from reprobuild.resolve import UNIVERSE_FORMAT

    h = hashlib.sha256(f"reprobuild universe\0{PARSER_VERSION}\0{UNIVERSE_FORMAT}\0{architecture}\n".encode())
    for origin, sha256, all_sha256 in indices:
        h.update(f"{origin}\0{sha256}\0{all_sha256 or ''}\n".encode())
    return h.hexdigest()


def _fetch_release_universe(spec: ImageSpec, release: str, session, options: LockOptions,
                            speculative: Sequence[Speculation] = ()) -> _Fetched:
    """Verify every suite's InRelease (concurrently: on a warm lock these round trips are all the
    network work) and load the universe of their Packages indices.

    Warm path: the universe table cached under :func:`universe_key` of the indices the verified
    Releases name is loaded (~30 ms) over the cached index texts (mmap'd) — no index is read or
    parsed, and only the stanzas of the names the resolution touches are ever decoded. Cold
    path: every index is fetched (decompressed while it downloads) or read from the cache,
    scanned for its stanzas' offsets (``Universe.from_indices``), and the table is cached. Both
    give the same universe.
    """
    from reprobuild.debian import repository

    keyrings = list(spec.distribution.keyring) or [DEFAULT_KEYRING]
    arch = spec.distribution.debian_architecture
    cache = repository.IndexCache(options.index_cache) if options.index_cache else None
    repo_sources: list[repository.RepositorySource] = []
    configured: list[bool] = []  # whether the configuration named each source's mirror
    for ref in suites_for(release, spec.distribution.updates):
        try:
            base_url, named = _mirror_for(spec, ref.archive, options.host_root)
        except RepositoryError:
            if ref.archive == "debian-security":
                raise RepositoryError(
                    f"no mirror for {ref.suite}: the host's apt sources name no debian-security archive",
                    hint="set SecurityMirror= in [Distribution], or Updates=no",
                ) from None
            raise
        repo_sources.append(repository.RepositorySource(
            archive=ref.archive, base_url=base_url, suite=ref.suite,
            components=tuple(spec.distribution.repositories), architecture=arch, keyrings=tuple(keyrings),
        ))
        configured.append(named)
    # Speculation: while the InReleases are on the wire, load the universe the previous lock of
    # these same sources used and resolve the ``speculative`` requests on it. It is used only if
    # the verified Releases name exactly its indices (same key), so the result never depends on
    # the guess (a resolution is a function of the universe and the request): only the waiting
    # is overlapped.
    origins_key = _origins_key(arch, repo_sources)
    guessed_indices = _last_universe_indices(cache, origins_key)
    guessed_key = universe_key(arch, guessed_indices) if guessed_indices is not None else None
    with contextlib.ExitStack() as stack:
        guess = None
        if guessed_key is not None:
            from concurrent.futures import ThreadPoolExecutor

            loader = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="universe"))
            guess = loader.submit(_guess, cache, guessed_key, guessed_indices, speculative)
        verified_releases = repository.fetch_releases(session, repo_sources, cache, options.now,
                                                      progress=options.progress)
        guessed = guess.result() if guess is not None else None
    sources: list[LockSource] = []
    dates: list[datetime] = []
    indices: list[tuple[str, str, str | None]] = []
    for source, verified, named in zip(repo_sources, verified_releases, configured, strict=True):
        date = verified.release.date
        dates.append(date)
        for component in spec.distribution.repositories:
            entry, all_entry = repository.index_entries(source, verified, component, arch)
            source_id = source.origin(component)
            indices.append((source_id, entry.sha256, all_entry.sha256 if all_entry else None))
            sources.append(LockSource(
                id=source_id, archive=source.archive, suite=source.suite,
                codename=verified.release.codename or source.suite, component=component,
                date=email.utils.format_datetime(date.astimezone(UTC), usegmt=True).replace("GMT", "UTC"),
                snapshot=repository.snapshot_id(date), inrelease_sha256=verified.inrelease_sha256,
                packages_sha256=entry.sha256,
                mirror=source.base_url if named else None,
            ))
    key = universe_key(arch, indices)
    universe, resolved = guessed if guessed is not None and key == guessed_key else (None, [])
    if universe is None:
        universe = _cached_universe(cache, key, indices)
    if universe is None:
        universe = _build_universe(session, spec, repo_sources, verified_releases, cache, options.progress)
        if cache is not None:
            cache.put_derived("universe", key, universe.to_bytes())
    elif options.progress:
        options.progress(f"using the cached universe ({len(universe)} package names)")
    if cache is not None and key != guessed_key:
        cache.put_derived("latest", origins_key, json.dumps(indices).encode())
    return _Fetched(universe, sources, dates, resolved)


def _build_universe(session, spec: ImageSpec, repo_sources: Sequence[RepositorySource], verified_releases,
                    cache, progress: Progress | None) -> Universe:
    """Cold path: every index text from the cache or the mirror (then kept in the cache), and the
    universe over them. The indices are fetched side by side (trixie's -updates and -security
    ones arrive while main's is still decompressing); texts are written to the cache (and
    fsync'd) while the others download and the universe is built; every write has finished when
    this returns. Errors are raised in suite order."""
    from concurrent.futures import ThreadPoolExecutor

    from reprobuild.debian import repository
    from reprobuild.resolve import IndexText, Universe

    arch = spec.distribution.debian_architecture
    wanted = []  # (source, verified, component, entry, binary_all) in suite order
    for source, verified in zip(repo_sources, verified_releases, strict=True):
        for component in spec.distribution.repositories:
            entry, all_entry = repository.index_entries(source, verified, component, arch)
            for index_entry, binary_all in ((entry, False), (all_entry, True)):
                if index_entry is not None:
                    wanted.append((source, verified, component, index_entry, binary_all))
    texts: list[IndexText] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-text") as writer, \
            ThreadPoolExecutor(max_workers=len(wanted) or 1, thread_name_prefix="index-fetch") as fetcher:  # fmt: skip
        writes = []
        fetches: list = []  # per index: (text, None) from the cache, a Future, or None: fetched here
        largest = max(range(len(wanted)), key=lambda i: wanted[i][3].size, default=None)
        for i, (source, verified, _, index_entry, _) in enumerate(wanted):
            text = cache.get_text(index_entry.sha256) if cache is not None else None
            if text is not None:
                fetches.append((text, None))
            elif i == largest:  # in this thread, so what its scan allocates is reused by the universe
                fetches.append(None)
            else:
                fetches.append(fetcher.submit(repository.fetch_index_text, session, source, verified, index_entry,
                                              progress=progress))  # fmt: skip
        for (source, verified, component, index_entry, binary_all), fetched in zip(wanted, fetches, strict=True):
            if isinstance(fetched, tuple):
                text, heads = fetched
            else:
                text, heads = fetched.result() if fetched is not None else repository.fetch_index_text(
                    session, source, verified, index_entry, progress=progress)
                if cache is not None:
                    writes.append(writer.submit(cache.put_text, index_entry.sha256, text))
            texts.append(IndexText(source.origin(component), text, f"{source.suite} {index_entry.path}",
                                   binary_all, heads))
        if progress:
            progress(f"building the universe of {len(texts)} indices "
                     f"({sum(len(t.text) for t in texts) / (1 << 20):.0f} MiB)")
        universe = Universe.from_indices(texts, arch)
        for write in writes:
            write.result()
    return universe


def _origins_key(architecture: str, sources: Sequence[RepositorySource]) -> str:
    """Names the set of suites a universe is built from (not their content): the key under which
    the last universe key used for them is remembered."""
    h = hashlib.sha256(f"reprobuild latest universe\0{architecture}\n".encode())
    for source in sources:
        h.update(f"{source.base_url}\0{source.suite}\0{' '.join(source.components)}\n".encode())
    return h.hexdigest()


def _last_universe_indices(cache, origins_key: str) -> list[tuple[str, str, str | None]] | None:
    """The indices (as :func:`universe_key` takes them) of the last universe of these suites, or
    None when there is none or the record is unreadable."""
    data = cache.get_derived("latest", origins_key) if cache is not None else None
    if data is None:
        return None
    try:
        indices = json.loads(data)
    except ValueError:
        return None
    if not isinstance(indices, list) or not all(
        isinstance(i, list) and len(i) == 3 and isinstance(i[0], str) and _is_hex(i[1])
        and (i[2] is None or _is_hex(i[2])) for i in indices
    ):  # fmt: skip
        return None
    return [(origin, sha256, all_sha256) for origin, sha256, all_sha256 in indices]


def _is_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _guess(cache, key: str, indices: Sequence[tuple[str, str, str | None]],
           requests: Sequence[Speculation]) -> tuple[Universe, list[tuple[ResolveRequest, Resolution]]] | None:
    """The universe cached under ``key`` and the resolutions of ``requests`` on it (a callable
    request is made from that universe first), as far as they succeed (a failing one is left to
    the real resolution, which raises it again)."""
    from reprobuild.resolve import resolve

    universe = _cached_universe(cache, key, indices)
    if universe is None:
        return None
    resolved = []
    for speculation in requests:
        request = speculation(universe) if callable(speculation) else speculation
        try:
            resolved.append((request, resolve(universe, request)))
        except ReprobuildError:
            break
    return universe, resolved


def _cached_universe(cache, key: str, indices: Sequence[tuple[str, str, str | None]]) -> Universe | None:
    """The universe cached under ``key`` over its index texts, or None when absent or unreadable
    (then rebuilt). ``indices`` are the (origin, sha256, binary-all sha256) the key was made of."""
    from reprobuild.resolve import Universe

    data = cache.get_derived("universe", key) if cache is not None else None
    if data is None:
        return None
    texts = []
    for _, sha256, all_sha256 in indices:
        for index_sha256 in (sha256, all_sha256):
            if index_sha256 is not None:
                text = cache.get_text(index_sha256)
                if text is None:
                    return None
                texts.append(text)
    try:
        return Universe.from_bytes(data, texts)
    except ValueError:
        return None


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


def _request(base_set: str, requested: Sequence[str], recommends: bool, pins: dict[str, str]) -> ResolveRequest:
    from reprobuild.resolve import ResolveRequest

    return ResolveRequest(packages=tuple(requested), base_set=base_set, recommends=recommends, pins=pins)


def _resolve_set(universe, name: str, release: str, base_set: str, requested: Sequence[str], recommends: bool,
                 pins: dict[str, str], sources: dict[str, LockSource],
                 resolved: Sequence[tuple[ResolveRequest, Resolution]] = ()) -> PackageSet:
    """Resolve one set; a resolution of the same request on the same universe in ``resolved``
    (made while the InReleases were on the wire) is the same result and is used as it is."""
    from reprobuild.resolve import resolve

    request = _request(base_set, requested, recommends, pins)
    resolution = next((r for known, r in resolved if known == request), None) or resolve(universe, request)
    packages = tuple(sorted((_locked(r, sources) for r in resolution.packages), key=lambda p: p.name))
    return PackageSet(name=name, release=release, base_set=base_set, requested=tuple(requested),
                      recommends=recommends, packages=packages)


def wants_build_set(spec: ImageSpec) -> bool:
    """Whether the lock gets a ``build`` set: the definition builds software (BuildScripts=) or
    names build-only packages (BuildPackages=)."""
    return bool(spec.content.build_scripts or spec.content.build_packages)


def _resolve_build_set(universe, release: str, spec: ImageSpec, image_set: PackageSet, pins: dict[str, str],
                       sources: dict[str, LockSource]) -> PackageSet:
    """The build environment: the image's packages, each held at exactly its image-set version
    (``name=version`` roots, so the headers match the libraries the image ships), plus
    ``BuildPackages=`` and whatever they need, resolved together. Image packages keep the image
    set's reasons (so apt's auto-installed marks agree); the rest are the resolver's."""
    build_packages = [p for p in spec.content.build_packages if p not in image_set.requested]
    held = [f"{p.name}={p.version}" for p in image_set.packages]
    build_only_pins = {n: v for n, v in pins.items() if n not in image_set.by_name()}
    resolved = _resolve_set(universe, "build", release, image_set.base_set, held + build_packages,
                            image_set.recommends, build_only_pins, sources)
    image = image_set.by_name()
    packages = tuple(replace(p, reason=image[p.name].reason) if p.name in image else p for p in resolved.packages)
    build_set = replace(resolved, requested=tuple(image_set.requested) + tuple(build_packages), packages=packages)
    problems = build_set_problems(image_set, build_set)
    if problems:
        raise LockError(f"the build set does not hold the image's packages as locked: {'; '.join(problems[:5])}",
                        hint="a BuildPackages= entry needs other versions of the image's packages")
    return build_set


def derive_seed(image_set: PackageSet) -> str:
    """A seed that depends only on the locked package set, so a re-lock of the same set keeps it."""
    h = hashlib.sha256(b"reprobuild seed v1\0")
    for p in image_set.packages:
        h.update(f"{p.name}\0{p.version}\0{p.architecture}\0{p.sha256}\n".encode())
    return h.hexdigest()[:32]


def has_kernel(package_set: PackageSet) -> bool:
    return any(p.name.startswith(KERNEL_PACKAGE_PREFIXES) and not p.name.endswith("-dbg")
               for p in package_set.packages)


def _initrd_requested(spec: ImageSpec, universe: Universe) -> list[str]:
    """The initrd set's request: the fixed packages, the optional ones some index lists ("available"
    = a real package of that name is in the universe: an arch index holds only native and arch:all
    packages), then ``[Initrd] Packages=``."""
    requested = list(INITRD_PACKAGES) + [p for p in INITRD_OPTIONAL_PACKAGES if universe.versions(p)]
    return requested + [p for p in spec.initrd.packages if p not in requested]


def _may_boot(spec: ImageSpec) -> bool:
    """Whether the image will likely be bootable (only decides what is speculated, never a result):
    ``Bootable=yes``, or ``auto`` with a kernel named in ``Packages=``."""
    return spec.content.bootable == "yes" or (
        spec.content.bootable == "auto" and any(p.startswith("linux-image") for p in spec.content.packages))


def wants_boot(spec: ImageSpec, image_set: PackageSet) -> bool:
    if spec.content.bootable == "yes":
        return True
    if spec.content.bootable == "no":
        return False
    return has_kernel(image_set)


def check_update_names(previous: Lock | None, names: Sequence[str]) -> None:
    """``lock --update NAME…``: every NAME must be a package of the existing lock."""
    if not names:
        return
    if previous is None:
        raise LockError(f"--update {' '.join(names)}: there is no lock to update",
                        hint="run reprobuild lock first (or --update without names)")
    locked = {p.name for s in previous.sets for p in s.packages}
    unknown = [n for n in names if n not in locked]
    if unknown:
        shown = ", ".join(repr(n) if len(n) <= 60 else repr(n[:57] + "...") for n in unknown[:5])
        raise LockError(f"--update: {shown} {'is' if len(unknown) == 1 else 'are'} not a package of the lock",
                        hint="name packages as the lock lists them, or use --update alone to re-resolve everything")


def lock_spec(spec: ImageSpec, previous: Lock | None = None, options: LockOptions = LockOptions(),
              session=None) -> LockResult:
    """Resolve ``spec`` against verified repository metadata into a new :class:`Lock`."""
    if session is None:
        import requests  # deferred: ~0.1 s, and only a real lock needs it

        session = requests.Session()
    release = spec.distribution.release
    progress = options.progress or (lambda _msg: None)
    check_update_names(previous, options.update_packages)
    tools_requested = list(TOOLS_PACKAGES) + [p for p in spec.tools.packages if p not in TOOLS_PACKAGES]
    speculative: list[Speculation] = [
        _request(spec.content.base_set, spec.content.packages, spec.content.recommends, _pins(previous, "image", options))]
    if spec.tools.tools_tree == "lock" and (spec.tools.release or release) == release:
        speculative.append(_request("essential", tools_requested, False, _pins(previous, "tools", options)))
    if _may_boot(spec):  # the initrd's request is made from the universe, so it is resolved there too
        initrd_pins = _pins(previous, "initrd", options)
        speculative.append(lambda universe: _request("essential", _initrd_requested(spec, universe), False,
                                                     initrd_pins))
    fetched = _fetch_release_universe(spec, release, session, options, speculative)
    universe = fetched.universe  # one universe for both sets: its dependency cache is shared
    progress("resolving")
    sources = {s.id: s for s in fetched.sources}

    image_set = _resolve_set(universe, "image", release, spec.content.base_set, spec.content.packages,
                             spec.content.recommends, _pins(previous, "image", options), sources, fetched.resolved)
    sets = [image_set]
    if wants_boot(spec, image_set):
        if not has_kernel(image_set):
            raise LockError("Bootable=yes but the package set has no kernel",
                            hint="add linux-image-amd64 (or -arm64) to Packages=")
        sets.append(_resolve_set(universe, "initrd", release, "essential", _initrd_requested(spec, universe), False,
                                 _pins(previous, "initrd", options), sources, fetched.resolved))

    if wants_build_set(spec):
        sets.append(_resolve_build_set(universe, release, spec, image_set, _pins(previous, "build", options),
                                       sources))

    all_sources = list(fetched.sources)
    if spec.tools.tools_tree == "lock":
        tools_release = spec.tools.release or release
        if tools_release == release:
            tools_universe, tools_sources = universe, sources
        else:
            progress(f"fetching the {tools_release} indices for the tools tree")
            other = _fetch_release_universe(spec, tools_release, session, options)
            tools_universe = other.universe
            tools_sources = {s.id: s for s in other.sources}
            all_sources += [s for s in other.sources if s.id not in sources]
        sets.append(_resolve_set(tools_universe, "tools", tools_release, "essential", tools_requested, False,
                                 _pins(previous, "tools", options), tools_sources,
                                 fetched.resolved if tools_universe is universe else ()))

    # The epoch comes from the image's release only: the tools' release does not date the image.
    epoch = spec.build.source_date_epoch
    if epoch is None:
        epoch = int(max(fetched.dates).timestamp())
    seed = spec.build.seed or derive_seed(image_set)
    lock = Lock(
        config_digest=spec.digest(), distribution=spec.distribution.distribution, release=release,
        architecture=spec.distribution.debian_architecture, source_date_epoch=epoch, seed=seed,
        sources=tuple(all_sources), sets=tuple(sets), config=spec.digest_input(),
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
        raise LockOutOfDate(f"lock is out of date: run reprobuild lock{detail}")
    if lock.architecture != spec.distribution.debian_architecture:
        raise LockError(f"the lock is for {lock.architecture}, the configuration for "
                        f"{spec.distribution.debian_architecture}: run reprobuild lock")
    if lock.distribution != spec.distribution.distribution or lock.release != spec.distribution.release:
        raise LockError(f"the lock is for {lock.distribution} {lock.release}, the configuration for "
                        f"{spec.distribution.distribution} {spec.distribution.release}: run reprobuild lock")


@dataclass(frozen=True)
class SavedLock:
    """What :func:`save_signed_lock` did: the bytes written, whether they differ from the previous
    lock, whether a signature over them was written, and whether a stale one was removed."""

    data: bytes
    changed: bool
    signed: bool
    removed_signature: bool


def unsigned_note(sig_path: Path) -> str:
    """The one line said when a changed lock loses its stale signature."""
    return (f"note: the lock changed and no signing key is configured: removed the stale {sig_path.name}, "
            "the lock is now unsigned (sign it with reprobuild lock --sign-key KEY, or [Signing] LockKey=)")


def save_signed_lock(lock: Lock, path: Path, signer: LockSigner | None) -> SavedLock:
    """Write ``lock`` to ``path`` and keep its ``.sig`` true to it: re-signed with ``signer``
    (opened by the caller before resolving, so a bad key fails before anything is written) when
    one is given; otherwise, if the bytes changed, the old signature (now stale) is removed. An
    unchanged lock keeps its signature."""
    from reprobuild.fileio import write_atomic
    from reprobuild.lockfile import SIGNATURE_SUFFIX, save_lock

    sig_path = path.with_name(path.name + SIGNATURE_SUFFIX)
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = None
    data = save_lock(lock, path)
    changed = old != data
    if signer is not None:
        from reprobuild import keys  # only when signing: cryptography costs ~50 ms of imports

        write_atomic(sig_path, keys.sign_lock(data, signer))
        return SavedLock(data, changed, True, False)
    removed = False
    if changed and sig_path.exists():
        sig_path.unlink()
        removed = True
    return SavedLock(data, changed, False, removed)
