"""Lockfile differences: packages added, removed and changed (old → new version), sources, config.

Classification: a package's version, hash, source package, dependencies and set membership are
content; a Release date or snapshot id, the order of packages, download URLs and the
human-readable ``reason`` are metadata (they do not change the bytes that get installed).
"""

from __future__ import annotations

from reprobuild.diff.base import Comparator, DiffContext, json_fields
from reprobuild.diff.detect import Kind
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field
from reprobuild.diff.open import Node
from reprobuild.lockfile import Lock, LockedPackage, LockSource, loads

_PACKAGE_FIELDS: tuple[tuple[str, str, object], ...] = (
    ("version", "version", CONTENT),
    ("sha256", "sha256", CONTENT),
    ("size", "size", CONTENT),
    ("source", "source", CONTENT),  # which suite/component it came from
    ("source package", "source_package", CONTENT),
    ("source version", "source_version", CONTENT),
    ("installed size", "installed_size", CONTENT),
    ("essential", "essential", CONTENT),
    ("priority", "priority", CONTENT),
    ("multi-arch", "multi_arch", CONTENT),
    ("depends", "depends", CONTENT),
    ("pre-depends", "pre_depends", CONTENT),
    ("pool path", "path", METADATA),  # follows from name and version
    ("reason", "reason", METADATA),
    ("urls", "urls", METADATA),
)
_SOURCE_FIELDS: tuple[tuple[str, str, object], ...] = (
    ("archive", "archive", CONTENT),
    ("suite", "suite", CONTENT),
    ("codename", "codename", CONTENT),
    ("component", "component", CONTENT),
    ("Release date", "date", METADATA),
    ("snapshot", "snapshot", METADATA),
    ("InRelease sha256", "inrelease_sha256", METADATA),  # package changes are reported per package
    ("Packages sha256", "packages_sha256", METADATA),
    ("mirror", "mirror", METADATA),
)


def _show(v: object) -> object:
    return ", ".join(v) if isinstance(v, tuple) else v


class LockfileComparator(Comparator, kinds={Kind.LOCKFILE}):
    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return compare_locks(name, a.source.read(ctx.options.memory_limit), b.source.read(ctx.options.memory_limit))


def compare_locks(name: str, a: bytes, b: bytes) -> Difference | None:
    """Parse both locks (LockError on malformed input) and describe their differences."""
    la, lb = loads(a, "first lockfile"), loads(b, "second lockfile")
    return diff_locks(name, la, lb)


def diff_locks(name: str, la: Lock, lb: Lock) -> Difference | None:
    fields = [
        Field.of("config digest", la.config_digest, lb.config_digest),
        Field.of("distribution", la.distribution, lb.distribution),
        Field.of("release", la.release, lb.release),
        Field.of("architecture", la.architecture, lb.architecture),
        Field.of("SOURCE_DATE_EPOCH", la.source_date_epoch, lb.source_date_epoch),
        Field.of("seed", la.seed, lb.seed, METADATA),  # only identifiers (UUIDs, salt) derive from it
        Field.of("generator", la.generator, lb.generator, METADATA),
    ]
    config = Difference.of("config", "json", fields=json_fields(la.config, lb.config))
    sources = _diff_sources(la.sources, lb.sources)
    sets = []
    names_a = [s.name for s in la.sets]
    names_b = [s.name for s in lb.sets]
    for s in la.sets:
        if s.name not in names_b:
            sets.append(Difference.removed(f"set {s.name}", "package-set", [f"{len(s.packages)} packages"]))
    for s in lb.sets:
        if s.name not in names_a:
            sets.append(Difference.added(f"set {s.name}", "package-set", [f"{len(s.packages)} packages"]))
        else:
            sa = la.package_set(s.name)
            sets.append(_diff_set(sa, s))
    return Difference.of(name, "lockfile", fields=fields, details=[config, sources, *sets])


def _diff_sources(a: tuple[LockSource, ...], b: tuple[LockSource, ...]) -> Difference | None:
    ba, bb = {s.id: s for s in a}, {s.id: s for s in b}
    details: list[Difference | None] = []
    for sid in ba:
        if sid not in bb:
            details.append(Difference.removed(sid, "source"))
    for sid, s in bb.items():
        if sid not in ba:
            details.append(Difference.added(sid, "source"))
            continue
        o = ba[sid]
        details.append(Difference.of(sid, "source", fields=[Field.of(label, getattr(o, attr), getattr(s, attr), cls)  # type: ignore[arg-type]
                                                            for label, attr, cls in _SOURCE_FIELDS]))  # fmt: skip
    return Difference.of("sources", "sources", details=details)


def _key(p: LockedPackage) -> str:
    return f"{p.name}:{p.architecture}"


def diff_pins(name: str, a: list[str], b: list[str]) -> Difference | None:
    """Two manifests' package lists (``name=version:architecture``), package by package: what
    was added, removed or moved to another version. Pure."""

    def split(pins: list[str]) -> dict[str, str]:
        out = {}
        for pin in pins:
            pkg, _, rest = str(pin).partition("=")
            version, _, arch = rest.rpartition(":")
            out[f"{pkg}:{arch}"] = version
        return out

    pa, pb = split(a), split(b)
    details: list[Difference | None] = []
    for k in sorted(set(pa) | set(pb)):
        if k not in pb:
            details.append(Difference.removed(k, "package", [f"was {pa[k]}"]))
        elif k not in pa:
            details.append(Difference.added(k, "package", [f"now {pb[k]}"]))
        else:
            details.append(Difference.of(k, "package", fields=[Field.of("version", pa[k], pb[k])]))
    return Difference.of(name, "package-set", details=details)


def _diff_set(sa, sb) -> Difference | None:  # type: ignore[no-untyped-def]
    pa = {_key(p): p for p in sa.packages}
    pb = {_key(p): p for p in sb.packages}
    fields = [
        Field.of("requested", ", ".join(sa.requested), ", ".join(sb.requested)),
        Field.of("recommends", sa.recommends, sb.recommends),
        Field.of("base set", sa.base_set, sb.base_set),
        Field.of("release", sa.release, sb.release),
    ]
    common_a = [k for k in pa if k in pb]
    common_b = [k for k in pb if k in pa]
    if common_a != common_b:
        fields.append(Field("package order", None, "changed", METADATA))
    details: list[Difference | None] = []
    for k in sorted(set(pa) | set(pb)):
        if k not in pb:
            details.append(Difference.removed(k, "package", [f"was {pa[k].version}"]))
        elif k not in pa:
            details.append(Difference.added(k, "package", [f"now {pb[k].version}"]))
        else:
            x, y = pa[k], pb[k]
            details.append(Difference.of(k, "package", fields=[Field.of(label, _show(getattr(x, attr)),
                                                                        _show(getattr(y, attr)), cls)  # type: ignore[arg-type]
                                                               for label, attr, cls in _PACKAGE_FIELDS]))  # fmt: skip
    return Difference.of(f"set {sa.name}", "package-set", fields=fields, details=details)
