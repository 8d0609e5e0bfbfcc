"""Debian repository client: verified Release metadata and Packages indices, with a local cache.

Trust chain (wiki.debian.org/DebianRepository/Format, docs/formats.md §10)::

    keyring ──gpgv──▶ InRelease (or Release + Release.gpg) ──SHA256 + size──▶ Packages.xz ──▶ packages

* ``fetch_release`` downloads ``dists/<suite>/InRelease``, verifies it with gpgv and parses only
  the bytes gpgv says were signed. It refuses a Release for another suite (replay of a signed
  file from elsewhere) and one past its ``Valid-Until`` unless ``allow_expired`` (snapshots).
* ``fetch_index_text`` picks ``Packages.xz`` (then ``.gz``, then plain) listed in that Release,
  downloads it **by hash** when the Release says ``Acquire-By-Hash: yes`` (no race with a mirror
  update), decompresses it while it downloads (the Blocks of an .xz file side by side,
  ``xzblocks``) and scans its stanzas (``stanzaindex``) as they arrive, and returns them only once the file's size and SHA-256 match the Release. A lock
  decodes only the stanzas it resolves (``Universe.from_indices``); ``fetch_packages`` decodes all.
* ``IndexCache`` keeps index texts under ``texts/<hex>.<format>`` (``<hex>`` = the verified
  file's SHA-256; read back as mmaps), raw InReleases under ``indices/sha256/<hex>``, and data
  derived from indices (the resolver's universe table) under ``derived/<kind>/<hex of its inputs>``,
  and gpgv's verdict on each InRelease (``derived/verified_inrelease/``: the signed text, reused
  for the very same bytes and keyrings for at most a day, :func:`verification_key`).
* ``fetch_releases`` checks several suites' InRelease concurrently (a warm lock's only network work).

All network access goes through a ``requests.Session``-like object (``get(url, stream=True,
timeout=…)``); ``file://`` URLs are read directly. Library code: no printing, progress goes to
the optional ``progress`` callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import lzma
import mmap
import os
import queue
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from reprobuild.debian.gpg import DEFAULT_KEYRING, SignatureError, verify_clearsigned, verify_detached
from reprobuild.debian.package import BinaryPackage
from reprobuild.debian.stanzaindex import (
    StanzaHead,
    StanzaScanner,
    decode_stanza,
    normalize_text,
    scan_stanzas,
)
from reprobuild.debian.xzblocks import (
    BlockSplitter,
    NotSplittable,
    block_stream_head,
    block_stream_tail,
    check_index,
)
from reprobuild.errors import RepositoryError

Progress = Callable[[str], None]

# (connect, read) seconds. The read timeout bounds each stall; sizes bound endless responses.
DEFAULT_TIMEOUT = (15.0, 60.0)
MAX_RELEASE_BYTES = 16 << 20  # sid's InRelease is ~0.3 MiB; anything this large is hostile
# How long gpgv's verdict on an InRelease is reused for the very same bytes and keyrings
# (``verification_key``): a key or signature that expires is noticed within this time.
VERIFIED_RELEASE_REUSE = timedelta(hours=24)
# Preference order for index compression: smallest download first (what apt does too).
INDEX_VARIANTS = (".xz", ".gz", "")
# Bump when the rules for reading an index change (stanzaindex): cached universes are then rebuilt.
PARSER_VERSION = 3
# Bump when the kept index text changes (stanzaindex.normalize_text): texts/<sha256>.<TEXT_FORMAT>.
TEXT_FORMAT = 1
# The largest decompressed index accepted when the Release does not list the plain size (sid's
# main/binary-amd64/Packages is ~60 MB): bounds what a hostile compressed index can expand to.
MAX_INDEX_TEXT_BYTES = 1 << 31
# xz Blocks of an index decompressed side by side (``_XzBlocks``): one per core of this kind of
# machine; each decoder of a Block with Debian's 8 MiB dictionary holds ~9 MiB.
XZ_DECODERS = 2
# Compressed bytes handed to a Block's decoder at a time: its output (~6× as much for a Packages
# text) then stays below glibc's mmap threshold and is recycled within the thread's heap.
XZ_PIECE = 1 << 14


class ExpiredRelease(RepositoryError):
    """A Release whose Valid-Until lies in the past (a stale or replayed mirror)."""


class CorruptIndex(RepositoryError):
    """An index whose size or SHA-256 differs from what the signed Release lists."""


# --------------------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class RepositorySource:
    """One suite of one archive on one mirror, as a lock names it."""

    archive: str  # "debian" | "debian-security" (a name, used to find a mirror at fetch time)
    base_url: str  # archive root: the directory holding dists/ and pool/
    suite: str  # "trixie", "trixie-updates", "trixie-security", "stable" …
    components: tuple[str, ...] = ("main",)
    architecture: str = "amd64"
    keyrings: tuple[Path, ...] = (DEFAULT_KEYRING,)

    @property
    def dists_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/dists/{self.suite}"

    def origin(self, component: str) -> str:
        """The id a package from ``component`` carries (``BinaryPackage.origin``): ``suite/component``."""
        return f"{self.suite}/{component}"


def snapshot_id(release_date: datetime) -> str:
    """The snapshot archive timestamp for a Release ``Date``: ``YYYYMMDDTHHMMSSZ`` (UTC)."""
    if release_date.tzinfo is None:
        raise ValueError("release_date must be timezone-aware")
    return release_date.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def snapshot_source(source: RepositorySource, snapshot_base: str, snapshot: str) -> RepositorySource:
    """``source`` served from a snapshot archive: ``<snapshot_base>/<archive>/<snapshot>``.

    ``snapshot_base`` is configuration (never a host name written into this code base). A
    snapshot's Release is usually past its Valid-Until: fetch it with ``allow_expired=True``.
    """
    base = f"{snapshot_base.rstrip('/')}/{source.archive}/{snapshot}"
    return dataclasses.replace(source, base_url=base)


# --------------------------------------------------------------------------------------- Release


@dataclass(frozen=True, slots=True)
class ReleaseEntry:
    path: str  # relative to dists/<suite>/, e.g. "main/binary-amd64/Packages.xz"
    size: int
    sha256: str


@dataclass(frozen=True)
class ReleaseFile:
    """The fields of a (verified) Release file that reprobuild uses."""

    suite: str
    codename: str
    date: datetime
    valid_until: datetime | None = None
    acquire_by_hash: bool = False
    architectures: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    no_support_for_architecture_all: str = ""
    origin: str = ""
    label: str = ""
    version: str = ""
    not_automatic: bool = False
    but_automatic_upgrades: bool = False
    sha256: Mapping[str, ReleaseEntry] = field(default_factory=dict, hash=False, repr=False)

    @property
    def arch_all_in_arch_indices(self) -> bool:
        """Whether ``Architecture: all`` packages are listed in each binary-<arch>/Packages.

        They are unless the archive lists ``all`` among its Architectures *and* does not say
        ``No-Support-for-Architecture-all: Packages`` (the field means: "arch:all packages are
        still duplicated into the per-arch indices"); then they are only in binary-all.
        """
        if "all" not in self.architectures:
            return True
        return self.no_support_for_architecture_all.strip() == "Packages"

    def index_entry(self, stem: str) -> ReleaseEntry | None:
        """The preferred listed variant of ``stem`` (e.g. ``main/binary-amd64/Packages``)."""
        for ext in INDEX_VARIANTS:
            entry = self.sha256.get(stem + ext)
            if entry is not None:
                return entry
        return None


def parse_release(text: bytes | str, what: str = "Release") -> ReleaseFile:
    """Parse Release text (pure). Requires ``Date`` and a ``SHA256`` list; raises RepositoryError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RepositoryError(f"{what} is not UTF-8 text: {e}") from e
    fields: dict[str, str] = {}
    entries: dict[str, ReleaseEntry] = {}
    current: str | None = None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if line[0] in " \t":
            if current is None:
                raise RepositoryError(f"{what}:{lineno}: continuation line before any field")
            if current == "SHA256":
                entry = _release_entry(line, what, lineno)
                entries[entry.path] = entry
            else:
                fields[current] += "\n" + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise RepositoryError(f"{what}:{lineno}: not a 'Field: value' line: {line[:60]!r}")
        current = name.strip()
        fields[current] = value.strip()
    if "Date" not in fields:
        raise RepositoryError(f"{what} has no Date field")
    if "SHA256" not in fields:
        raise RepositoryError(f"{what} has no SHA256 checksums (MD5/SHA1-only archives are not trusted)")
    return ReleaseFile(
        suite=fields.get("Suite", ""),
        codename=fields.get("Codename", ""),
        date=_parse_date(fields["Date"], "Date", what),
        valid_until=_parse_date(fields["Valid-Until"], "Valid-Until", what)
        if "Valid-Until" in fields
        else None,
        acquire_by_hash=fields.get("Acquire-By-Hash", "no").lower() == "yes",
        architectures=tuple(fields.get("Architectures", "").split()),
        components=tuple(fields.get("Components", "").split()),
        no_support_for_architecture_all=fields.get("No-Support-for-Architecture-all", ""),
        origin=fields.get("Origin", ""),
        label=fields.get("Label", ""),
        version=fields.get("Version", ""),
        not_automatic=fields.get("NotAutomatic", "no").lower() == "yes",
        but_automatic_upgrades=fields.get("ButAutomaticUpgrades", "no").lower() == "yes",
        sha256=entries,
    )


def _release_entry(line: str, what: str, lineno: int) -> ReleaseEntry:
    parts = line.split()
    if len(parts) != 3 or len(parts[0]) != 64 or not parts[1].isdigit():
        raise RepositoryError(f"{what}:{lineno}: malformed SHA256 line {line.strip()[:90]!r}")
    try:
        int(parts[0], 16)
    except ValueError:
        raise RepositoryError(f"{what}:{lineno}: SHA256 is not hexadecimal") from None
    return ReleaseEntry(path=parts[2], size=int(parts[1]), sha256=parts[0].lower())


def _parse_date(value: str, name: str, what: str) -> datetime:
    """RFC 2822 date as in Release files ("Sat, 09 Aug 2025 09:15:11 UTC"), always timezone-aware."""
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError) as e:
        raise RepositoryError(f"{what}: unparseable {name}: {value!r}") from e
    if parsed.tzinfo is None:  # "-0000" means UTC without a stated zone
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _fmt(when: datetime) -> str:
    return format_datetime(when.astimezone(UTC), usegmt=True).replace("GMT", "UTC")


def check_valid_until(release: ReleaseFile, suite: str, now: datetime, allow_expired: bool = False) -> None:
    """Refuse an expired Release (pure). ``allow_expired`` is for snapshot archives, pinned on purpose."""
    if allow_expired or release.valid_until is None:
        return
    if now > release.valid_until:
        raise ExpiredRelease(
            f"the Release of {suite} expired: Valid-Until {_fmt(release.valid_until)} is before now "
            f"({_fmt(now)}); it is dated {_fmt(release.date)}",
            hint="the mirror is out of date or replaying old metadata; use an up-to-date mirror "
            "(or a snapshot, where expired metadata is accepted on purpose)",
        )


# --------------------------------------------------------------------------------------- cache


class IndexCache:
    """Index files and what is made of them, in a plain directory.

    Layout: ``indices/sha256/<hex>`` (raw bytes, exactly as listed or served: the InReleases),
    ``texts/<hex>.<TEXT_FORMAT>`` (the text of the index file with SHA-256 ``<hex>``, as
    :func:`fetch_index_text` made it once the file was verified) and ``derived/<kind>/<key>``.
    Every write is atomic (temporary file, fsync, rename): a crash never leaves a truncated file
    under a final name. Not a security boundary: whoever can write the directory can feed the
    lock its texts and tables (read as data only: no code runs on load).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def raw_path(self, sha256: str) -> Path:
        return self.root / "indices" / "sha256" / _check_hex(sha256)

    def get(self, sha256: str) -> Path | None:
        """Path of the raw object if cached (not re-hashed here: readers verify what they use)."""
        path = self.raw_path(sha256)
        return path if path.is_file() else None

    def put_bytes(self, sha256: str, data: bytes) -> Path:
        """Store ``data`` under its hash after checking it; raises CorruptIndex on mismatch."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise CorruptIndex(f"refusing to cache data as sha256:{sha256}: its hash is {actual}")
        path = self.raw_path(sha256)
        if not path.is_file():
            _atomic_write(path, data)
        return path

    def text_path(self, sha256: str) -> Path:
        return self.root / "texts" / f"{_check_hex(sha256)}.{TEXT_FORMAT}"

    def get_text(self, sha256: str) -> Any:
        """The text of the index whose verified (compressed) file has ``sha256``, as a read-only
        mmap (pages are read as stanzas are decoded), or None when absent."""
        try:
            with self.text_path(sha256).open("rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:
            return None

    def put_text(self, sha256: str, text: bytes) -> Path:
        """Keep the text :func:`fetch_index_text` made of the index file with ``sha256`` (which it
        verified before decompressing was trusted)."""
        path = self.text_path(sha256)
        _atomic_write(path, text)
        return path

    def derived_path(self, kind: str, key: str) -> Path:
        """Where data of ``kind`` computed from indices is kept: ``derived/<kind>/<key>``.

        ``key`` must be a sha256 hex digest of everything the data depends on (the callers'
        job: e.g. the indices' hashes and the format versions), so a stale entry is never found.
        """
        if not kind.isidentifier():
            raise ValueError(f"not a cache kind: {kind!r}")
        return self.root / "derived" / kind / _check_hex(key)

    def get_derived(self, kind: str, key: str) -> bytes | None:
        """The bytes stored by :meth:`put_derived`, or None. Readers validate what they load."""
        try:
            return self.derived_path(kind, key).read_bytes()
        except OSError:
            return None

    def put_derived(self, kind: str, key: str, data: bytes) -> Path:
        path = self.derived_path(kind, key)
        _atomic_write(path, data)
        return path


def _check_hex(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a lowercase sha256 hex digest: {sha256!r}")
    return sha256


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class VerifiedRelease:
    """A Release whose signature verified, with the hash of the exact bytes fetched.

    ``inrelease_sha256`` is the SHA-256 of the InRelease file as served (or of ``Release`` when
    the archive only has a detached ``Release.gpg``); ``raw`` are those bytes.
    """

    release: ReleaseFile
    inrelease_sha256: str
    raw: bytes = field(repr=False)
    source: RepositorySource | None = None

    @property
    def snapshot_id(self) -> str:
        return snapshot_id(self.release.date)


@dataclass(frozen=True)
class PackagesIndex:
    """The packages of one component/architecture, and which verified index files they came from."""

    packages: list[BinaryPackage] = field(repr=False)
    sha256: str  # of the binary-<arch> index file used (as listed in the Release)
    path: str  # that file, relative to dists/<suite>/
    all_sha256: str | None = None  # of binary-all's index when arch:all packages live only there


def fetch_release(
    session: Any,
    source: RepositorySource,
    cache: IndexCache | None = None,
    now: datetime | None = None,
    *,
    allow_expired: bool = False,
    progress: Progress | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> VerifiedRelease:
    """Fetch, verify and parse ``dists/<suite>/InRelease`` (or ``Release`` + ``Release.gpg``).

    Raises SignatureError (unsigned/bad/unknown key), ExpiredRelease, or RepositoryError (network,
    wrong suite, malformed). Cost: one small download and one gpgv run.
    """
    now = now or datetime.now(UTC)
    if progress:
        progress(f"fetching {source.suite} InRelease…")
    keyrings = list(source.keyrings)
    raw = _download(session, f"{source.dists_url}/InRelease", MAX_RELEASE_BYTES, timeout)
    if raw is not None:
        signed = _verify_inrelease(raw, keyrings, cache, now, what=f"{source.suite} InRelease")
    else:
        raw = _download(session, f"{source.dists_url}/Release", MAX_RELEASE_BYTES, timeout)
        if raw is None:
            raise RepositoryError(
                f"{source.dists_url} has neither InRelease nor Release",
                hint=f"is {source.suite!r} a suite of this archive, and {source.base_url} its root?",
            )
        signature = _download(session, f"{source.dists_url}/Release.gpg", MAX_RELEASE_BYTES, timeout)
        if signature is None:
            raise SignatureError(f"{source.suite}: Release is not signed (no InRelease, no Release.gpg)")
        signed = verify_detached(raw, signature, keyrings, what=f"{source.suite} Release")
    release = parse_release(signed, what=f"{source.suite} Release")
    if source.suite not in (release.suite, release.codename):
        # A validly signed Release of another suite (e.g. an old stable replayed as testing).
        raise RepositoryError(
            f"{source.dists_url}/InRelease is for suite {release.suite!r} (codename {release.codename!r}), "
            f"not {source.suite!r}"
        )
    check_valid_until(release, source.suite, now, allow_expired)
    digest = hashlib.sha256(raw).hexdigest()
    if cache is not None:
        cache.put_bytes(digest, raw)
    return VerifiedRelease(release, digest, raw, source)


def _verify_inrelease(raw: bytes, keyrings: list[Path], cache: IndexCache | None, now: datetime,
                      what: str) -> bytes:  # fmt: skip
    """``verify_clearsigned(raw, keyrings)``, reusing the result of an earlier run on the very same
    bytes with the very same keyrings when the cache holds one less than
    ``VERIFIED_RELEASE_REUSE`` old (see :func:`verification_key`)."""
    key = verification_key(raw, keyrings)
    if cache is not None and key is not None:
        signed = _reusable_verification(cache.get_derived("verified_inrelease", key), now)
        if signed is not None:
            return signed
    signed = verify_clearsigned(raw, keyrings, what=what)
    if cache is not None and key is not None:
        stamp = int(now.timestamp())
        cache.put_derived("verified_inrelease", key, f"{_VERIFIED_MAGIC}\n{stamp}\n".encode() + signed)
    return signed


_VERIFIED_MAGIC = "reprobuild verified InRelease 1"


def verification_key(raw: bytes, keyrings: Sequence[Path]) -> str | None:
    """The cache key of gpgv's verdict on the clearsigned ``raw`` against ``keyrings``: a sha256
    over the exact bytes and every keyring file's bytes, in order (pure but for reading the
    keyrings; None when one cannot be read — then gpgv runs and reports it).

    Reusing a verdict keyed so is sound: gpgv is a function of the file and the keys — the same
    bytes against the same keys give the same signed text — except for time: a key that expires
    or a signature that expires after the verification. That is why a verdict is reused for at
    most ``VERIFIED_RELEASE_REUSE``; the Release's own ``Valid-Until`` is checked on every run.
    Like every entry of the index cache, the verdicts are as trustworthy as the cache directory.
    """
    h = hashlib.sha256(f"{_VERIFIED_MAGIC}\0{hashlib.sha256(raw).hexdigest()}\n".encode())
    for keyring in keyrings:
        try:
            h.update(hashlib.sha256(Path(keyring).read_bytes()).hexdigest().encode() + b"\n")
        except OSError:
            return None
    return h.hexdigest()


def _reusable_verification(data: bytes | None, now: datetime) -> bytes | None:
    """The signed text of a cached verdict made less than ``VERIFIED_RELEASE_REUSE`` before
    ``now`` (and not after it), or None."""
    if data is None:
        return None
    magic, _, rest = data.partition(b"\n")
    stamp, _, signed = rest.partition(b"\n")
    if magic != _VERIFIED_MAGIC.encode() or not stamp.isdigit():
        return None
    age = now - datetime.fromtimestamp(int(stamp), UTC)
    return signed if timedelta(0) <= age < VERIFIED_RELEASE_REUSE else None


def fetch_releases(
    session: Any,
    sources: Sequence[RepositorySource],
    cache: IndexCache | None = None,
    now: datetime | None = None,
    *,
    allow_expired: bool = False,
    progress: Progress | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> list[VerifiedRelease]:
    """:func:`fetch_release` for every source, concurrently; results in ``sources`` order.

    Each suite costs one network round trip and one gpgv run, and a warm lock does nothing else
    with the network, so running them side by side is what makes it fast (one thread per
    source: the work is I/O and a subprocess). When several fail, the error of the first failing
    source in ``sources`` order is raised, so the outcome does not depend on timing. ``session``
    is shared by the threads (requests' connection pool is thread-safe).
    """
    now = now or datetime.now(UTC)
    if len(sources) <= 1:
        return [
            fetch_release(
                session, s, cache, now, allow_expired=allow_expired, progress=progress, timeout=timeout
            )
            for s in sources
        ]
    from concurrent.futures import ThreadPoolExecutor  # deferred: only needed here

    def one(source: RepositorySource) -> VerifiedRelease:
        return fetch_release(
            session, source, cache, now, allow_expired=allow_expired, progress=progress, timeout=timeout
        )

    with ThreadPoolExecutor(max_workers=len(sources), thread_name_prefix="inrelease") as pool:
        futures = [pool.submit(one, source) for source in sources]
    # The pool has joined: every future is done. Raise in source order, never completion order.
    return [future.result() for future in futures]


def index_entries(
    source: RepositorySource, release: VerifiedRelease | ReleaseFile, component: str, arch: str
) -> tuple[ReleaseEntry, ReleaseEntry | None]:
    """The Release entries :func:`fetch_packages` reads for ``component``/``arch`` (pure): the
    ``binary-<arch>`` index, and ``binary-all``'s when arch:all packages are only listed there.

    Their SHA-256s identify the package data exactly, so they can key anything derived from it
    without loading it. Raises RepositoryError for an unknown component or a missing index.
    """
    rel = release.release if isinstance(release, VerifiedRelease) else release
    # debian-security's Release lists its components as "updates/main" etc., while the index
    # paths in it are plain "main/binary-amd64/…"; both spellings name the same component.
    if rel.components and component not in rel.components and f"updates/{component}" not in rel.components:
        raise RepositoryError(
            f"{source.suite} has no component {component!r} (it has: {', '.join(rel.components)})"
        )
    entry = _index_entry(source, rel, f"{component}/binary-{arch}/Packages")
    all_entry = None
    if arch != "all" and not rel.arch_all_in_arch_indices:
        all_entry = _index_entry(source, rel, f"{component}/binary-all/Packages")
    return entry, all_entry


def _index_entry(source: RepositorySource, rel: ReleaseFile, stem: str) -> ReleaseEntry:
    entry = rel.index_entry(stem)
    if entry is None:
        raise RepositoryError(
            f"the {source.suite} Release lists no {stem}{{.xz,.gz,}}",
            hint=f"does {source.suite} carry architecture {stem.split('binary-')[-1].split('/')[0]!r}?",
        )
    return entry


def fetch_packages(
    session: Any,
    source: RepositorySource,
    release: VerifiedRelease | ReleaseFile,
    component: str,
    arch: str,
    cache: IndexCache | None = None,
    *,
    progress: Progress | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> PackagesIndex:
    """Every package of ``component`` for ``arch`` (arch:all included), verified against
    ``release``, each stanza decoded (a lock decodes only the names it resolves instead:
    ``Universe.from_indices``). The texts come from the cache when it has them, else from
    :func:`fetch_index_text` (and are kept there). Every package's ``origin`` is
    ``"<suite>/<component>"``.
    """
    rel = release.release if isinstance(release, VerifiedRelease) else release
    entry, all_entry = index_entries(source, rel, component, arch)
    origin = source.origin(component)
    packages = _index_packages(session, source, rel, entry, cache, origin, progress, timeout)
    all_sha256 = None
    if all_entry is not None:
        all_packages = _index_packages(session, source, rel, all_entry, cache, origin, progress, timeout)
        all_sha256 = all_entry.sha256
        seen = {(p.name, p.version, p.architecture) for p in packages}
        packages += [p for p in all_packages if (p.name, p.version, p.architecture) not in seen]
    return PackagesIndex(packages, entry.sha256, entry.path, all_sha256)


def _index_packages(session: Any, source: RepositorySource, rel: ReleaseFile, entry: ReleaseEntry,
                    cache: IndexCache | None, origin: str, progress: Progress | None,
                    timeout: tuple[float, float]) -> list[BinaryPackage]:  # fmt: skip
    what = f"{source.suite} {entry.path}"
    text = cache.get_text(entry.sha256) if cache is not None else None
    if text is not None:
        heads = scan_stanzas(text, what)
    else:
        text, heads = fetch_index_text(session, source, rel, entry, progress=progress, timeout=timeout)
        if cache is not None:
            cache.put_text(entry.sha256, text)
    return [decode_stanza(text, head, origin, what) for head in heads]


def fetch_index_text(
    session: Any,
    source: RepositorySource,
    release: VerifiedRelease | ReleaseFile,
    entry: ReleaseEntry,
    *,
    progress: Progress | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> tuple[bytes, list[StanzaHead]]:
    """The text of the index ``entry`` of ``release`` (an entry of :func:`index_entries`) and its
    stanzas (``stanzaindex.scan_stanzas``): decompressed while it downloads, normalized
    (``stanzaindex.normalize_text``), and returned only once the downloaded file's size and
    SHA-256 match the signed Release (and the text's size the plain file's, when the Release
    lists it). Callers keep the text with :meth:`IndexCache.put_text` under ``entry.sha256``.

    When the Release lists the plain file's size (Debian's do), the text is scanned while it is
    still arriving: the download and decompression run in a thread (zlib and lzma release the
    GIL), the scan in the caller's, on the stanzas decompressed so far. A scan error on a file
    that then fails its hash check is reported as the hash mismatch.
    """
    rel = release.release if isinstance(release, VerifiedRelease) else release
    what = f"{source.suite} {entry.path}"
    plain = _plain_entry(rel, entry)
    if plain is None:
        sink: _Decompressing | _XzBlocks = _Decompressing(entry.path, MAX_INDEX_TEXT_BYTES)
        text = normalize_text(_download_index(session, source, rel, entry, progress, timeout, sink))
        return text, scan_stanzas(text, what)
    from concurrent.futures import ThreadPoolExecutor  # deferred: only needed here

    sizes: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    if entry.path.endswith(".xz"):
        sink = _XzBlocks(entry.path, entry.size, plain.size, sizes.put)
    else:
        sink = _Decompressing(entry.path, plain.size, fixed=True, written=sizes.put)
    scanner = StanzaScanner(what, trailing_space=None)  # found out as the text arrives
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="index") as pool:
        download = pool.submit(_download_then, sizes.put, _download_index, session, source, rel, entry,
                               progress, timeout, sink)  # fmt: skip
        try:
            scanned = 0
            while (size := sizes.get()) is not None:
                cut = sink.buf.rfind(b"\n\n", scanned, size)
                if cut >= 0:
                    scanner.scan(sink.buf, cut + 2)
                    scanned = cut + 1
        except RepositoryError:
            download.result()  # a file that does not match the Release is named as such
            raise
        text = download.result()
    normalized = normalize_text(text)
    if normalized is not text:  # rare: scan the whole text again
        return normalized, scan_stanzas(normalized, what)
    scanner.scan(text, len(text))
    if not scanner.complete(text):  # rarer: only the text's last byte is a blank
        return text, scan_stanzas(text, what)
    return text, scanner.finish(text)


def _download_then(done: Callable[[None], None], function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, then ``done(None)`` whatever happened."""
    try:
        return function(*args)
    finally:
        done(None)


def _download_index(
    session: Any,
    source: RepositorySource,
    rel: ReleaseFile,
    entry: ReleaseEntry,
    progress: Progress | None,
    timeout: tuple[float, float],
    sink: _Decompressing | _XzBlocks,
) -> bytearray:
    """What ``sink`` makes of the index file ``entry`` while it downloads (its decompressed
    content), once the file's size and SHA-256 match the signed Release. A file that does not
    match is refused as such, even when it did not decompress either. The sink is closed on
    return, whatever happened."""
    try:
        return _download_into(session, source, rel, entry, progress, timeout, sink)
    finally:
        sink.close()


def _download_into(session: Any, source: RepositorySource, rel: ReleaseFile, entry: ReleaseEntry,
                   progress: Progress | None, timeout: tuple[float, float],
                   sink: _Decompressing | _XzBlocks) -> bytearray:  # fmt: skip
    directory, _, _ = entry.path.rpartition("/")
    urls = []
    if rel.acquire_by_hash:
        # by-hash: the object name is its hash, so a mirror update between our InRelease and
        # Packages downloads cannot hand us a newer, non-matching file.
        urls.append(f"{source.dists_url}/{directory}/by-hash/SHA256/{entry.sha256}")
    urls.append(f"{source.dists_url}/{entry.path}")  # apt falls back to the name as well
    if progress:
        how = " (by-hash)" if rel.acquire_by_hash else ""
        progress(f"fetching {source.suite} {entry.path}{how}, {entry.size / (1 << 20):.1f} MiB…")
    for url in urls:  # data reaches the sink only from the one that answers
        digest = hashlib.sha256()
        size = 0
        with _opened(session, url, timeout) as chunks:
            if chunks is None:
                continue
            for chunk in chunks:
                size += len(chunk)
                if size > entry.size:  # stop at once: an over-long answer is never read to its end
                    raise CorruptIndex(f"{url}: the response is larger than the {entry.size} bytes the signed Release lists")
                digest.update(chunk)
                sink.feed(chunk)
        if size != entry.size:
            raise CorruptIndex(
                f"{url}: got {size} bytes, the signed Release lists {entry.size}",
                hint="the mirror is inconsistent or the download was cut; try again or another mirror",
            )
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise CorruptIndex(
                f"{url}: SHA-256 {actual} does not match the signed Release ({entry.sha256})",
                hint="the index was altered or the mirror is inconsistent",
            )
        data = sink.result()
        plain = _plain_entry(rel, entry)
        if plain is not None and len(data) != plain.size:
            raise CorruptIndex(f"{url}: decompresses to {len(data)} bytes, the signed Release lists {plain.size}")
        return data
    raise RepositoryError(f"{source.suite}: {entry.path} not found on the mirror ({' nor '.join(urls)})")


def _plain_entry(rel: ReleaseFile, entry: ReleaseEntry) -> ReleaseEntry | None:
    """The Release's entry of the uncompressed file ``entry`` is a compressed form of, if listed."""
    for ext in INDEX_VARIANTS:
        if ext and entry.path.endswith(ext):
            return rel.sha256.get(entry.path[: -len(ext)])
    return None


class _Decompressing:
    """Download sink: decompresses (xz, gzip or none, by the file name) as chunks arrive, at most
    ``limit`` bytes of output, into ``buf``: a bytearray of exactly ``limit`` bytes when
    ``fixed`` (the size the Release lists: it is never resized, so another thread may scan what
    is written while it grows), else one that grows. ``size`` bytes are written; ``written`` is
    called with it after each chunk. A decompression error is kept, not raised, until
    :meth:`result`: the caller checks the file's hash first, so a damaged download is named as such."""

    def __init__(self, path: str, limit: int, fixed: bool = False,
                 written: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.path = path
        self.limit = limit
        if path.endswith(".xz"):
            self.decompressor: Any = lzma.LZMADecompressor()
        elif path.endswith(".gz"):
            self.decompressor = zlib.decompressobj(wbits=47)  # gzip header, any window size
        else:
            self.decompressor = None
        self.fixed = fixed
        self.buf = bytearray(limit) if fixed else bytearray()
        self.size = 0
        self.written = written
        self.error: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        try:
            out = chunk if self.decompressor is None else self.decompressor.decompress(chunk, self.limit + 1 - self.size)
        except (lzma.LZMAError, zlib.error, EOFError) as e:
            self.error = str(e)
            return
        if self.size + len(out) > self.limit:
            self.error = f"it decompresses to more than {self.limit} bytes"
            return
        if self.fixed:
            self.buf[self.size : self.size + len(out)] = out  # same length: no resize
        else:
            self.buf += out
        self.size += len(out)
        if self.written is not None:
            self.written(self.size)

    def close(self) -> None:
        """Nothing to release (the decompressor runs in the feeding thread)."""

    def result(self) -> bytearray:
        if self.error is None and self.decompressor is not None:
            if not self.decompressor.eof:
                self.error = "the compressed stream is truncated"
            elif self.decompressor.unused_data:
                self.error = "data follows the compressed stream"
        if self.error is not None:
            raise RepositoryError(f"cannot decompress {self.path}: {self.error}")
        return self.buf if not self.fixed or self.size == self.limit else self.buf[: self.size]


class _XzBlocks:
    """Download sink for an .xz index whose decompressed size (``limit``) the Release lists: the
    file's Blocks (``xzblocks``) are decompressed side by side, each by its own liblzma decoder in
    one of ``XZ_DECODERS`` threads (liblzma releases the GIL), starting as soon as its Block
    Header has arrived; each writes its output at its place in ``buf`` (``limit`` bytes, never
    resized). ``written`` is called with the length of the prefix of ``buf`` that is complete
    whenever it grows, so a scan can follow it.

    The Blocks' output is used only when every Block decoded cleanly and the file's Index lists
    exactly those Blocks; in every other case (a file of one Block without stated sizes, as
    Python's lzma module writes; several streams; a damaged Block; a wrong Index) the whole file
    is decompressed by one ordinary decoder instead, streaming as it arrives when that is known
    before the first Block starts, else after the download — its result, or its error, is then
    the answer. Errors are kept until :meth:`result` (the caller checks the file's hash first).
    Memory: the compressed file (kept until :meth:`result`) and ~9 MiB per decoder on top of
    ``buf``.
    """

    def __init__(self, path: str, compressed_size: int, limit: int, written: Callable[[int], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor  # deferred: only needed here

        self.path = path
        self.limit = limit
        self.buf = bytearray(limit)
        self.size = 0  # the complete prefix of buf
        self.written = written
        self._data = bytearray(compressed_size)
        self._available = 0  # bytes of _data received
        self._closed = False
        self._arrived = threading.Condition()
        self._splitter: BlockSplitter | None = BlockSplitter()  # None: the Blocks cannot all be used
        self._whole = False  # whether the whole file is being decoded in one go
        self._spans: list[tuple[int, int]] = []  # (offset, size) in buf of each decoding job, in order
        self._produced: list[int] = []  # bytes each job has written so far
        self._complete = 0  # the jobs before this one are complete
        self._errors: list[str] = []
        self._progress = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=XZ_DECODERS, thread_name_prefix="xz-block")
        self._jobs: list[Any] = []

    def feed(self, chunk: bytes) -> None:
        start = self._available
        if start + len(chunk) > len(self._data):  # the caller stops an over-long download first
            raise CorruptIndex(f"{self.path}: more bytes than the signed Release lists")
        self._data[start : start + len(chunk)] = chunk  # same length: no resize
        with self._arrived:
            self._available = start + len(chunk)
            self._arrived.notify_all()
        if self._splitter is None:
            return
        try:
            blocks = self._splitter.advance(self._data, self._available)
        except NotSplittable:
            self._splitter = None
            if not self._jobs:  # nothing started yet: decode the whole file as it arrives
                self._whole = True
                self._start(0, len(self._data), b"", b"", 0, self.limit)
            return
        for block in blocks:
            if block.uncompressed_offset + block.uncompressed_size > self.limit:
                self._splitter = None  # the whole-file decoder names it (more than limit bytes)
                return
            flags = self._splitter.flags or b""
            self._start(block.offset, block.end, block_stream_head(flags), block_stream_tail(flags, block),
                        block.uncompressed_offset, block.uncompressed_size)  # fmt: skip

    def _start(self, start: int, end: int, head: bytes, tail: bytes, offset: int, size: int) -> None:
        with self._progress:
            self._spans.append((offset, size))
            self._produced.append(0)
        job = len(self._jobs)
        self._jobs.append(self._pool.submit(self._decode, job, start, end, head, tail, offset, size))

    def _decode(self, job: int, start: int, end: int, head: bytes, tail: bytes, offset: int, limit: int) -> None:
        """Decompress ``_data[start:end]`` (framed by ``head`` and ``tail``) into ``buf`` at
        ``offset``, at most ``limit`` bytes, as the data arrives."""
        decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        produced = 0
        try:
            decoder.decompress(head)
            pos = start
            while pos < end or tail:
                if pos < end:
                    with self._arrived:
                        while self._available <= pos and not self._closed:
                            self._arrived.wait()
                        available = self._available
                    if available <= pos:
                        raise EOFError("the compressed stream is truncated")
                    stop = min(available, end, pos + XZ_PIECE)
                    with memoryview(self._data) as view:
                        out = decoder.decompress(view[pos:stop], limit + 1 - produced)
                    pos = stop
                else:
                    out, tail = decoder.decompress(tail, limit + 1 - produced), b""
                if produced + len(out) > limit:
                    raise EOFError(f"it decompresses to more than {limit} bytes")
                self.buf[offset + produced : offset + produced + len(out)] = out  # same length: no resize
                produced += len(out)
                self._report(job, produced)
            if not decoder.eof:
                raise EOFError("the compressed stream is truncated")
            if decoder.unused_data:
                raise EOFError("data follows the compressed stream")
        except (lzma.LZMAError, EOFError) as e:
            with self._progress:
                self._errors.append(str(e))

    def _report(self, job: int, produced: int) -> None:
        with self._progress:
            self._produced[job] = produced
            while self._complete < len(self._spans) and self._produced[self._complete] == self._spans[self._complete][1]:
                self._complete += 1
            if self._complete < len(self._spans):
                offset, _ = self._spans[self._complete]
                size = offset + self._produced[self._complete]
            else:
                offset, span = self._spans[-1]
                size = offset + span
            if size > self.size:
                self.size = size
                self.written(size)

    def close(self) -> None:
        """Stop waiting for data and let every decoding thread finish (idempotent)."""
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()
        self._pool.shutdown(wait=True)

    def result(self) -> bytearray:
        self.close()
        for job in self._jobs:
            job.result()  # decoding errors are kept in _errors; anything else is a bug: raise it
        data = memoryview(self._data)[: self._available]
        split = self._splitter is not None and not self._errors
        if split:
            try:
                check_index(data, self._splitter)
            except NotSplittable:
                split = False
        if not split and not self._whole:
            # The Blocks could not all be used: the whole file, by one decoder, decides.
            with self._progress:
                self._spans, self._produced, self._complete, self._errors = [(0, self.limit)], [0], 0, []
            self._decode(0, 0, len(data), b"", b"", 0, self.limit)
        data.release()
        self._data = bytearray()
        if self._errors:
            raise RepositoryError(f"cannot decompress {self.path}: {self._errors[0]}")
        size = sum(self._produced)
        return self.buf if size == self.limit else self.buf[:size]


def _download(session: Any, url: str, max_bytes: int, timeout: tuple[float, float]) -> bytes | None:
    """The body of ``url``; None on 404/410. At most ``max_bytes`` are read (RepositoryError beyond)."""
    with _opened(session, url, timeout) as chunks:
        if chunks is None:
            return None
        buf = bytearray()
        for chunk in chunks:
            buf += chunk
            if len(buf) > max_bytes:
                raise RepositoryError(f"{url}: response is larger than the {max_bytes} bytes expected")
        return bytes(buf)


@contextlib.contextmanager
def _opened(session: Any, url: str, timeout: tuple[float, float]) -> Iterator[Iterator[bytes] | None]:
    """The body of ``url`` as an iterator of chunks, or None on 404/410 (a missing file).
    Network and read errors while the caller iterates become RepositoryError."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        try:
            f = path.open("rb")
        except FileNotFoundError:
            yield None
            return
        except OSError as e:
            raise RepositoryError(f"cannot read {url}: {e}") from e
        with f:
            try:
                yield iter(lambda: f.read(1 << 20), b"")
            except OSError as e:
                raise RepositoryError(f"cannot read {url}: {e}") from e
        return
    import requests  # deferred: importing requests costs ~0.1 s

    try:
        with session.get(url, stream=True, timeout=timeout) as response:
            if response.status_code in (404, 410):
                yield None
                return
            if response.status_code != 200:
                raise RepositoryError(f"{url}: HTTP {response.status_code} {response.reason}")
            yield response.iter_content(chunk_size=1 << 16)
    except requests.RequestException as e:
        raise RepositoryError(f"fetching {url} failed: {e}") from e
