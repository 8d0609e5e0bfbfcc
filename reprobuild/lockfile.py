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
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.errors import LockError
from reprobuild.fileio import ReadRefused, read_bounded, write_atomic

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
# The grammar of every field (docs/lockfile.md, "Validation", names the sources)

MAX_LOCK_BYTES = 64 << 20  # the largest lock read (a full desktop lock is well below 2 MiB)
# The newest timestamp every output can store: cpio newc and squashfs keep mtimes as 32-bit
# unsigned seconds (2106-02-07T06:28:15Z); ustar's 11 octal digits and ext4 reach further.
MAX_SOURCE_DATE_EPOCH = 2**32 - 1
MAX_DEB_SIZE = 1 << 36  # 64 GiB: far above any .deb in the archive, far below what breaks arithmetic
MAX_INSTALLED_SIZE = 1 << 40  # KiB
MAX_PACKAGES = 100_000  # per set
MAX_ITEMS = 10_000  # any other list (sources, sets, depends, requested, urls)
MAX_TEXT = 1024  # free text (reason, date)
# Debian architectures (the archive's release and ports architectures, dpkg's cputable names)
# plus "all" for architecture-independent packages.
ARCHITECTURES = frozenset({
    "amd64", "arm64", "armel", "armhf", "i386", "mips64el", "mipsel", "ppc64el", "riscv64", "s390x",
    "loong64", "alpha", "hppa", "hurd-amd64", "hurd-i386", "ia64", "m68k", "powerpc", "ppc64", "sh4",
    "sparc64", "x32",
})
SET_NAMES = ("image", "initrd", "tools", "build")
BASE_SETS = ("essential", "minbase", "none")
MULTI_ARCH = ("no", "same", "foreign", "allowed")

# Debian Policy §5.6.1: lower-case letters, digits, + - . ; at least two characters, starting
# with an alphanumeric.
PACKAGE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]{1,127}")
# deb-version(5) / Policy §5.6.12: [epoch:]upstream[-revision]; epoch digits; upstream
# alphanumerics and . + ~ (and - only when a revision follows), starting with an alphanumeric;
# revision alphanumerics and . + ~. No '/', ':' outside the epoch, no whitespace.
_EPOCH_RE = re.compile(r"[0-9]{1,9}")
_UPSTREAM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~-]*")
_REVISION_RE = re.compile(r"[A-Za-z0-9.+~]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
SEED_RE = re.compile(r"[0-9a-f]{32}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
SNAPSHOT_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
RELEASE_RE = re.compile(r"[a-z][a-z0-9-]{0,63}")
TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")  # archive, suite, codename, component
SOURCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}/[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")
# A pool path component: what the archive uses in pool file names (name_version_arch.deb, with
# an epoch's ':' written %3a).
_POOL_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~%-]{0,254}")
URL_RE = re.compile(r"(https?|file)://[!#-~]{1,2040}")  # printable ASCII, no space, no quote
# Config requests as [Content] Packages= accepts them: name, name:arch or name=version.
REQUEST_RE = re.compile(r"[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?")
PRIORITY_RE = re.compile(r"[a-z-]{1,32}")


def is_package_name(value: str) -> bool:
    return bool(PACKAGE_NAME_RE.fullmatch(value))


def is_debian_version(value: str) -> bool:
    """deb-version(5): ``[epoch:]upstream_version[-debian_revision]``, as Policy §5.6.12 allows."""
    if not value or len(value) > 256:
        return False
    epoch, colon, rest = value.partition(":")
    if colon and not _EPOCH_RE.fullmatch(epoch):
        return False
    if not colon:
        rest = value
    upstream, hyphen, revision = rest.rpartition("-")
    if not hyphen:
        return bool(_UPSTREAM_RE.fullmatch(rest)) and "-" not in rest
    return bool(_UPSTREAM_RE.fullmatch(upstream)) and bool(_REVISION_RE.fullmatch(revision))


def is_pool_path(value: str) -> bool:
    """Relative, normalised (no empty, ``.`` or ``..`` component), no absolute path, no odd bytes."""
    if not value or len(value) > 1024:
        return False
    return all(_POOL_COMPONENT_RE.fullmatch(c) and c not in (".", "..") for c in value.split("/"))


def config_digest_of(config: dict[str, Any]) -> str:
    """The digest of a configuration's digest input (as ``ImageSpec.digest`` computes it)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


class _Invalid(Exception):
    """A field failed its check: ``where`` (a JSON path such as sets[0].packages[3].name) and why."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


Check = Callable[[Any, str], Any]  # (raw JSON value, where) -> the typed value, or raise _Invalid


def _text(pattern: re.Pattern[str] | None, what: str, max_len: int = MAX_TEXT) -> Check:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise _Invalid(where, f"expected {what} (a string), got {_kind(value)} {_shown(value)}")
        if len(value) > max_len:
            raise _Invalid(where, f"longer than {max_len} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise _Invalid(where, f"expected {what}, got {_shown(value)}")
        if pattern is None and not value.isprintable():
            raise _Invalid(where, f"control characters in {_shown(value)}")
        return value

    return check


def _predicate(test: Callable[[str], bool], what: str) -> Check:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or not test(value):
            raise _Invalid(where, f"expected {what}, got {_kind(value)} {_shown(value)}")
        return value

    return check


def _choice(options: tuple[str, ...] | frozenset[str], what: str) -> Check:
    shown = ", ".join(sorted(options))

    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Invalid(where, f"expected {what} ({shown}), got {_kind(value)} {_shown(value)}")
        return value

    return check


def _integer(low: int, high: int) -> Check:
    def check(value: Any, where: str) -> int:
        # bool is an int in Python, not in JSON; 1e400 arrives as a float (inf).
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(where, f"expected an integer, got {_kind(value)} {_shown(value)}")
        if not low <= value <= high:
            raise _Invalid(where, f"{value} is out of range ({low}..{high})")
        return value

    return check


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(where, f"expected true or false, got {_kind(value)} {_shown(value)}")
    return value


def _optional(check: Check) -> Check:
    return lambda value, where: None if value is None else check(value, where)


def _array(check: Check, max_items: int = MAX_ITEMS) -> Check:
    def run(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _Invalid(where, f"expected an array, got {_kind(value)} {_shown(value)}")
        if len(value) > max_items:
            raise _Invalid(where, f"more than {max_items} items")
        return tuple(check(item, f"{where}[{i}]") for i, item in enumerate(value))

    return run


def _object(cls: type, checks: dict[str, Check], defaults: tuple[str, ...] = ()) -> Check:
    """A JSON object with exactly the keys of ``checks`` (those in ``defaults`` may be absent)."""

    def run(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise _Invalid(where or "top level", f"expected an object, got {_kind(value)} {_shown(value)}")
        unknown = sorted(set(value) - set(checks))
        if unknown:
            raise _Invalid(where or "top level", f"unknown field {_shown(unknown[0])}")
        values = {}
        for key, check in checks.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                if key in defaults:
                    continue
                raise _Invalid(path, "missing")
            values[key] = check(value[key], path)
        return cls(**values)

    return run


def _config_value(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return list(_array(_config_scalar)(value, where))
    return _config_scalar(value, where)


def _config_scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and len(value) > 4096:
            raise _Invalid(where, "longer than 4096 characters")
        return value
    return _integer(0, 2**63 - 1)(value, where)


def _config(value: Any, where: str) -> dict[str, Any]:
    """``config``: {Section: {Key: scalar or array of scalars}} — two levels, nothing deeper."""
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected an object, got {_kind(value)} {_shown(value)}")
    out: dict[str, Any] = {}
    for section, keys in value.items():
        _text(TOKEN_RE, "a section name")(section, f"{where} key")
        if not isinstance(keys, dict):
            raise _Invalid(f"{where}.{section}", f"expected an object, got {_kind(keys)} {_shown(keys)}")
        for key in keys:
            _text(TOKEN_RE, "a setting name")(key, f"{where}.{section} key")
        out[section] = {k: _config_value(v, f"{where}.{section}.{k}") for k, v in keys.items()}
    return out


_name = _text(PACKAGE_NAME_RE, "a Debian package name ([a-z0-9][a-z0-9+.-]+)", 128)
_version = _predicate(is_debian_version, "a Debian version ([epoch:]upstream[-revision], deb-version(5))")
_sha256 = _text(SHA256_RE, "64 lowercase hex digits (sha256)", 64)
_url = _text(URL_RE, "an http://, https:// or file:// URL", 2048)

_SOURCE = _object(LockSource, {
    "id": _text(SOURCE_ID_RE, "SUITE/COMPONENT", 257),
    "archive": _text(TOKEN_RE, "an archive name", 128),
    "suite": _text(TOKEN_RE, "a suite name", 128),
    "codename": _text(TOKEN_RE, "a code name", 128),
    "component": _text(TOKEN_RE, "a component name", 128),
    "date": _text(None, "a date", 64),
    "snapshot": _text(SNAPSHOT_RE, "a snapshot id (YYYYMMDDTHHMMSSZ)", 16),
    "inrelease_sha256": _sha256,
    "packages_sha256": _sha256,
    "mirror": _optional(_url),
}, defaults=("mirror",))

_PACKAGE = _object(LockedPackage, {
    "name": _name,
    "version": _version,
    "architecture": _choice(ARCHITECTURES | {"all"}, "a Debian architecture"),
    "source": _text(SOURCE_ID_RE, "a sources[].id", 257),
    "source_package": _name,
    "source_version": _version,
    "path": _predicate(is_pool_path, "a relative, normalised pool path (no '..', not absolute)"),
    "size": _integer(0, MAX_DEB_SIZE),
    "sha256": _sha256,
    "installed_size": _integer(0, MAX_INSTALLED_SIZE),
    "essential": _boolean,
    "priority": _text(PRIORITY_RE, "a priority", 32),
    "multi_arch": _choice(MULTI_ARCH, "a Multi-Arch value"),
    "depends": _array(_name),
    "pre_depends": _array(_name),
    "reason": _text(None, "a reason"),
    "urls": _array(_url, 64),
}, defaults=("reason", "urls"))

_SET = _object(PackageSet, {
    "name": _choice(SET_NAMES, "a package set name"),
    "release": _text(RELEASE_RE, "a release code name", 64),
    "base_set": _choice(BASE_SETS, "a base set"),
    "requested": _array(_text(REQUEST_RE, "a package request (name, name:arch, name=version)", 512)),
    "recommends": _boolean,
    "packages": _array(_PACKAGE, MAX_PACKAGES),
})

_LOCK = _object(Lock, {
    "config_digest": _text(DIGEST_RE, "sha256: and 64 lowercase hex digits", 71),
    "distribution": _choice(("debian",), "a distribution"),
    "release": _text(RELEASE_RE, "a release code name", 64),
    "architecture": _choice(ARCHITECTURES, "a Debian architecture"),
    "source_date_epoch": _integer(0, MAX_SOURCE_DATE_EPOCH),
    "seed": _text(SEED_RE, "32 lowercase hex digits", 32),
    "sources": _array(_SOURCE, 1000),
    "sets": _array(_SET, len(SET_NAMES)),
    "config": _config,
    "generator": _text(TOKEN_RE, "a generator name", 128),
    "version": _integer(LOCK_VERSION, LOCK_VERSION),
}, defaults=("config", "generator"))


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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid("JSON", f"the key {_shown(key)} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Invalid("JSON", f"{name} is not a JSON number")


def loads(data: bytes, origin: str = "lock") -> Lock:
    """Parse and validate a lock: every field's type and grammar, then the cross-references.

    The one way into a :class:`Lock` from bytes: every command reads locks through it, so later
    code may rely on the grammar (names and versions are safe in file names, sizes are bounded,
    paths are relative pool paths). Raises a one-line LockError naming the field."""
    if len(data) > MAX_LOCK_BYTES:
        raise LockError(f"{origin}: larger than {MAX_LOCK_BYTES >> 20} MiB: not a lockfile")
    try:
        raw = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LockError(f"{origin}: not a JSON lockfile ({e})") from None
    except RecursionError:
        raise LockError(f"{origin}: not a lockfile (JSON nested too deeply)") from None
    except _Invalid as e:
        raise LockError(f"{origin}: not a canonical JSON lockfile: {e.why}") from None
    if not isinstance(raw, dict):
        raise LockError(f"{origin}: not a lockfile (top level is not an object)")
    version = raw.get("version")
    if version != LOCK_VERSION or isinstance(version, bool):
        raise LockError(
            f"{origin}: lockfile version {_shown(version)} is not supported (this reprobuild reads version {LOCK_VERSION})",
            hint="upgrade reprobuild, or run reprobuild lock to write a new lock",
        )
    try:
        lock = _LOCK(raw, "")
        _check_consistency(lock)
    except _Invalid as e:
        raise LockError(f"{origin}: invalid lockfile: {e.where}: {e.why}",
                        hint="reprobuild lock never writes this (edited by hand?): restore the lock, "
                             "or remove it and run reprobuild lock") from None
    return lock


def _check_consistency(lock: Lock) -> None:
    """Cross-field rules: the digest covers ``config``, references resolve, names are unique,
    every package is of the lock's architecture (or ``all``)."""
    if lock.config and config_digest_of(lock.config) != lock.config_digest:
        raise _Invalid("config_digest", "is not the digest of config (edited by hand?)")
    source_ids = [s.id for s in lock.sources]
    if len(set(source_ids)) != len(source_ids):
        raise _Invalid("sources", "two sources have the same id")
    set_names = [s.name for s in lock.sets]
    if len(set(set_names)) != len(set_names):
        raise _Invalid("sets", "two package sets have the same name")
    if "image" not in set_names:
        raise _Invalid("sets", "no 'image' package set")
    for i, package_set in enumerate(lock.sets):
        names: set[str] = set()
        for j, p in enumerate(package_set.packages):
            where = f"sets[{i}].packages[{j}]"
            if p.source not in source_ids:
                raise _Invalid(f"{where}.source", f"package {p.name} names unknown source {_shown(p.source)}")
            if p.architecture not in (lock.architecture, "all"):
                raise _Invalid(f"{where}.architecture",
                               f"package {p.name} is {p.architecture}, the lock is {lock.architecture}")
            if p.name in names:
                raise _Invalid(f"{where}.name", f"package {p.name} is listed twice in set {package_set.name}")
            names.add(p.name)
        for j, p in enumerate(package_set.packages):
            missing = [d for d in p.depends + p.pre_depends if d not in names]
            if missing:
                raise _Invalid(f"sets[{i}].packages[{j}].depends",
                               f"package {p.name} depends on {', '.join(missing)}, not in set {package_set.name}")


def read_lock_bytes(path: Path) -> bytes:
    """The bytes of a lockfile: a regular file (through symlinks) of at most MAX_LOCK_BYTES,
    checked before reading, so a FIFO, a device or a huge file is refused at once."""
    try:
        return read_bounded(path, MAX_LOCK_BYTES)
    except FileNotFoundError:
        raise LockError(f"{path}: no lockfile", hint="run reprobuild lock first") from None
    except ReadRefused as e:
        raise LockError(f"{path}: {e.reason}: not a lockfile") from None
    except OSError as e:
        raise LockError(f"{path}: cannot read the lockfile: {e.strerror}") from None


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
    return loads(read_lock_bytes(path), str(path))


def save_lock(lock: Lock, path: Path) -> bytes:
    data = dumps(lock)
    write_atomic(path, data)
    return data


def lock_digest(lock: Lock) -> str:
    """``sha256:<hex>`` of the lock's canonical bytes: what manifests and provenance name it by."""
    return "sha256:" + hashlib.sha256(dumps(lock)).hexdigest()
