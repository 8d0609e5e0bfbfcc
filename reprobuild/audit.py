"""``reprobuild verify --audit``: what in an image did not come from its packages.

The reference is the lock's ``image`` package set: every ``.deb`` (from the store, where it was
verified by sha256 on the way in) is read member by member with :mod:`reprobuild.debian.deb`,
giving each path its package, its type, and the sha256 of a file's bytes or a symlink's target.
Package paths are resolved through the image's own directory symlinks (merged /usr: a package's
``/bin/sh`` is the tree's ``/usr/bin/sh``).

The image is read as a tree without running anything from it and without writing it out: a
directory as it is, a tar member by member (an OCI image's layer decompressed to a temporary
file first), a DDI's root file system (erofs, squashfs, ext4) in
place by the Python readers `diff` uses (:func:`reprobuild.diff.fstree.open_file_system`; only a
valid image a reader refuses is extracted, by the file system's own tool, and the report says so).
Paths are resolved through the image's symlinks in memory (:func:`reprobuild.rootfs.unpack.resolve_in_tree`).

The report has three lists (directories are not audited: dpkg creates parents freely):

* ``not_from_packages``: files and symlinks no package ships; each with its cause when the
  manifest's ``added_files`` names it (``Hostname=``, ``Autologin=yes``, …), else marked as made by
  a maintainer or post-installation script (``/etc/passwd``, ``/etc/alternatives/*``, ``ld.so.cache``);
* ``changed``: package files whose content (or type, or symlink target) differs from the ``.deb``;
* ``missing``: package files that are not in the image, with the cause when the manifest records
  the removal (``RemoveFiles=``, normalisation).

Cost: one read of every package's data and of every file of the image; memory: the image's
metadata, plus one file at a time up to 64 MiB (larger files that are not one byte range of the
image go through a temporary file).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.debian.deb import DebFile
from reprobuild.diff.detect import Kind
from reprobuild.diff.fstree import open_file_system
from reprobuild.diff.oci import oci_layer
from reprobuild.diff.open import ALL_FIELDS, DirectoryTree, FileMeta, TarTree, TempDirs, TreeContainer
from reprobuild.diff.source import ByteSource
from reprobuild.errors import FormatError, ReprobuildError, StoreError
from reprobuild.lockfile import Lock, LockedPackage, load_lock
from reprobuild.nspawn import TAR_MAGIC, inspect_ddi
from reprobuild.rootfs.unpack import TreeEntry, UnsafePath, resolve_in_tree, split_member_name
from reprobuild.store import Store

FS_KINDS = {"erofs": Kind.EROFS, "squashfs": Kind.SQUASHFS, "ext4": Kind.EXT4}
# A file's bytes held in memory to hash it when they are not one byte range of the image (a
# fragmented or compressed file); a larger one goes through a temporary file.
MEMORY_LIMIT = 64 << 20
UNEXPLAINED = "not named in the manifest: made by a maintainer or post-installation script"
DPKG_DATABASE = "dpkg's database (written by dpkg)"


def unowned_cause(path: str, causes: dict[str, dict[str, str]]) -> str:
    """Why ``path``, which no package ships, is in the image: the manifest's cause, else a guess."""
    cause = causes.get(path)
    if cause is not None:
        return f"{cause['cause']} ({cause['action']})"
    if path.startswith("/var/lib/dpkg/"):
        return DPKG_DATABASE
    return UNEXPLAINED


class AuditError(ReprobuildError):
    """The image or its packages cannot be read for the audit."""


@dataclass(frozen=True)
class Shipped:
    """One non-directory entry of a package: ``digest`` is the sha256 of a file's bytes, or the
    target of a symlink."""

    package: str
    kind: str  # "file" or "symlink"
    digest: str


@dataclass(frozen=True)
class Finding:
    path: str
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "detail": self.detail}


@dataclass
class AuditReport:
    image: str
    read: str = ""  # how the image was read ("erofs root file system, read in place", …)
    packages: int = 0
    package_files: int = 0
    image_files: int = 0
    not_from_packages: list[Finding] = field(default_factory=list)
    changed: list[Finding] = field(default_factory=list)
    missing: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"image": self.image, "read": self.read, "packages": self.packages, "package_files": self.package_files,
                "image_files": self.image_files,
                "not_from_packages": [f.as_json() for f in self.not_from_packages],
                "changed": [f.as_json() for f in self.changed], "missing": [f.as_json() for f in self.missing]}


# ---- what the packages ship -------------------------------------------------------------------


def _sha256(read: Callable[[int], bytes]) -> str:
    h = hashlib.sha256()
    while chunk := read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def package_contents(deb: Path, package: str) -> dict[str, Shipped]:
    """Path (``usr/bin/x``, as in the package) → what ``deb`` ships there (no directories)."""
    out: dict[str, Shipped] = {}
    with DebFile(deb) as d, d.open_tar("data") as tf:
        for ti in tf:
            try:
                parts = split_member_name(ti.name, f"{deb.name} member")
            except UnsafePath as e:
                raise AuditError(f"{deb.name}: {e.message}") from e
            name = "/".join(parts)
            if not parts or ti.isdir():
                continue
            if ti.issym():
                out[name] = Shipped(package, "symlink", ti.linkname)
            elif ti.islnk():  # a hard link: the same bytes as its (earlier) target
                target = "/".join(split_member_name(ti.linkname, f"{deb.name} link"))
                if target in out:
                    out[name] = out[target]
            elif ti.isfile():
                f = tf.extractfile(ti)
                assert f is not None
                out[name] = Shipped(package, "file", _sha256(f.read))
    return out


# ---- the image as a tree ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTree:
    """The image's root tree and how it was read (``read``, for the report)."""

    tree: TreeContainer
    read: str


@contextmanager
def image_tree(image: Path) -> Iterator[ImageTree]:
    """The root tree of ``image`` (a directory, a tar, an OCI image or a DDI); temporary files
    removed after."""
    if image.is_dir():
        try:
            directory = DirectoryTree(image, ALL_FIELDS - {"xattrs"})
        except FormatError as e:  # a directory that cannot be listed
            raise AuditError(e.message) from e
        yield ImageTree(directory, "a directory")
        return
    with open(image, "rb") as f:
        head = f.read(512)
    offset, magic = TAR_MAGIC
    if head[offset : offset + len(magic)] == magic:
        try:
            tar = TarTree(ByteSource.of_file(image))
        except FormatError as e:
            raise AuditError(f"{image}: not a readable tar: {e.message}") from e
        if not {"oci-layout", "index.json"} <= set(tar.member_names()):
            yield ImageTree(tar, "a tar, read member by member")
            return
        with TempDirs() as temp:  # an OCI image (-f oci): its one layer is the root tree
            try:
                tree = TarTree(oci_layer(ByteSource.of_file(image), lambda: temp.new("reprobuild-audit-"), str(image)))
            except FormatError as e:
                raise AuditError(e.message) from e
            yield ImageTree(tree, "an OCI image's layer, read member by member")
        return
    ddi = inspect_ddi(image)
    if ddi.root_fs not in FS_KINDS or ddi.data_extent is None:
        raise AuditError(f"{image}: the {ddi.layout} partition holds no file system reprobuild can read")
    if ddi.layout != "root":
        raise AuditError(f"{image}: only images with a root partition can be audited (this one has /usr only)")
    source = ByteSource(image, *ddi.data_extent)
    with TempDirs() as temp:
        try:
            tree = open_file_system(FS_KINDS[ddi.root_fs], source, MEMORY_LIMIT, lambda: temp.new("reprobuild-audit-"),
                                    str(image))  # fmt: skip
        except FormatError as e:
            raise AuditError(f"{image}: {e.message}") from e
        yield ImageTree(tree, f"{ddi.root_fs} root file system, " + (tree.note or "read in place"))


class PathResolver:
    """Paths resolved through a tree's own symlinks, in memory (merged /usr: a package's
    ``bin/sh`` is the tree's ``usr/bin/sh``), with each parent directory resolved once."""

    def __init__(self, metas: dict[str, FileMeta]) -> None:
        self._metas = metas
        self._parents: dict[tuple[str, ...], str] = {}
        # A tar need not list the directories its members are in: they are there all the same.
        self._implicit: set[str] = set()
        for name in metas:
            parent = name.rpartition("/")[0]
            while parent and parent not in self._implicit:
                self._implicit.add(parent)
                parent = parent.rpartition("/")[0]

    def _lookup(self, components: list[str]) -> TreeEntry | None:
        path = "/".join(components)
        meta = self._metas.get(path)
        if meta is None:
            return TreeEntry("directory") if path in self._implicit else None
        if meta.type == "symlink":
            return TreeEntry("symlink", meta.target or "")
        return TreeEntry("directory" if meta.type == "directory" else "other")

    def canonical(self, parts: list[str]) -> str:
        """``parts`` with its parent directories resolved (never outside the tree); as it is when
        a parent is missing or cannot be resolved."""
        parent = tuple(parts[:-1])
        base = self._parents.get(parent)
        if base is None:
            try:
                base = "/".join(resolve_in_tree(parent, self._lookup, follow_last=True))
            except (FileNotFoundError, UnsafePath):
                base = "/".join(parent)
            self._parents[parent] = base
        return f"{base}/{parts[-1]}" if base else parts[-1]


# ---- the audit --------------------------------------------------------------------------------


def _manifest_causes(manifest: dict[str, Any]) -> dict[str, dict[str, str]]:
    causes: dict[str, dict[str, str]] = {}
    for entry in manifest.get("added_files") or []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            causes[entry["path"]] = entry
    return causes


def _what_is(tree: TreeContainer, name: str, metas: dict[str, FileMeta]) -> tuple[str, str]:
    """(kind, digest) of an image entry, as `Shipped` has them: a file's sha256 (a tar's hard link
    has its target's), a symlink's target; ("special", "") for devices, FIFOs and sockets."""
    meta = metas[name]
    if meta.type == "symlink":
        return "symlink", meta.target or ""
    if meta.type == "hardlink":
        target = "/".join(split_member_name(meta.target or "", f"hard link {name}"))
        if target not in metas or metas[target].type != "file":
            raise AuditError(f"{name} is a hard link to {meta.target!r}, which is not a file of the image")
        name = target
    elif meta.type != "file":
        return "special", ""
    source = tree.member(name).source  # one file's bytes at a time
    assert source is not None
    return "file", source.sha256()


def audit_tree(tree: TreeContainer, metas: dict[str, FileMeta], resolver: PathResolver, shipped: dict[str, Shipped],
               manifest: dict[str, Any], report: AuditReport) -> None:  # fmt: skip
    """Fill ``report`` by comparing the image's entries (``metas``: ``tree``'s, by name in path
    order; ``resolver`` made from them) with ``shipped`` (paths made canonical by ``resolver``)."""
    causes = _manifest_causes(manifest)
    seen = set()
    for name, meta in metas.items():
        if meta.type == "directory":
            continue
        parts = split_member_name(name, "image entry")
        rel = "/".join(parts)
        if resolver.canonical(parts) != rel:  # only a tar can hold a member under a symlink
            raise AuditError(f"{name} lies under a symbolic link of the image (it is "
                             f"{resolver.canonical(parts)}): such an image cannot be audited")  # fmt: skip
        report.image_files += 1
        path = "/" + rel
        item = shipped.get(rel)
        if item is None:
            report.not_from_packages.append(Finding(path, unowned_cause(path, causes)))
            continue
        seen.add(rel)
        kind, digest = _what_is(tree, name, metas)
        if (kind, digest) != (item.kind, item.digest):
            cause = causes.get(path)
            why = f"; {cause['cause']}" if cause else ""
            if kind != item.kind:
                what = f"a {kind} in the image, a {item.kind} in {item.package}"
            elif kind == "symlink":
                what = f"points to {digest}, {item.package} ships {item.digest}"
            else:
                what = f"content differs from {item.package} (sha256 {digest[:16]}…, the package's {item.digest[:16]}…)"
            report.changed.append(Finding(path, what + why))
    for rel in sorted(set(shipped) - seen):
        path = "/" + rel
        cause = causes.get(path)
        detail = f"{cause['cause']}" if cause else "not in the image, and the manifest records no removal"
        report.missing.append(Finding(path, f"from {shipped[rel].package}: {detail}"))


def _manifest_for(image: Path, manifest_path: Path | None) -> dict[str, Any]:
    path = manifest_path or image.with_name(image.name + ".manifest.json")
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AuditError(f"{path}: not a readable manifest: {e}") from e
    if not isinstance(doc, dict):
        raise AuditError(f"{path}: not a reprobuild manifest")
    return doc


def _read_packages(store: Store, packages: Sequence[LockedPackage]) -> Iterator[dict[str, Shipped]]:
    """`package_contents` of each package, in lock order (errors too), read side by side: the time
    is xz decompression, which runs outside the GIL (so one thread per core)."""
    def read(p: LockedPackage) -> dict[str, Shipped]:
        try:
            return package_contents(store.path(p.sha256), p.name)
        except FormatError as e:
            raise AuditError(f"package {p.name}: {e.message}") from e

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="audit") as pool:
        yield from pool.map(read, packages)


def audit_image(image: Path, lock_path: Path, store: Store, manifest_path: Path | None = None,
                say: Callable[[str], None] = lambda _m: None) -> AuditReport:  # fmt: skip
    """Audit ``image`` against the ``image`` package set of the lock at ``lock_path``, whose
    packages must be in ``store`` (``reprobuild fetch`` puts them there)."""
    lock: Lock = load_lock(lock_path)
    packages = lock.package_set("image").packages
    missing = [p.name for p in packages if not store.has(p.sha256)]
    if missing:
        raise StoreError(f"{len(missing)} package(s) of the lock are not in the store {store.root} "
                         f"({', '.join(missing[:5])}{'…' if len(missing) > 5 else ''})",
                         hint=f"reprobuild fetch -C {lock_path.parent} (or --store DIR)")  # fmt: skip
    manifest = _manifest_for(image, manifest_path)
    report = AuditReport(image=str(image), packages=len(packages))
    with image_tree(image) as opened:
        report.read = opened.read
        say(f"reading {image} ({opened.read}) and {len(packages)} packages")
        try:
            metas = {name: opened.tree.meta(name) for name in opened.tree.member_names()}
            resolver = PathResolver(metas)
            shipped: dict[str, Shipped] = {}
            for contents in _read_packages(store, packages):
                for rel, item in contents.items():
                    shipped[resolver.canonical(rel.split("/"))] = item  # a later package replaces (dpkg's Replaces)
            report.package_files = len(shipped)
            say("comparing the image with its packages")
            audit_tree(opened.tree, metas, resolver, shipped, manifest, report)
        except UnsafePath as e:
            raise AuditError(f"{image}: {e.message}") from e
        except (FormatError, OSError) as e:
            if isinstance(e, AuditError):
                raise
            message = e.message if isinstance(e, FormatError) else f"{e.strerror or e}"
            raise AuditError(f"{image}: cannot be read: {message}") from e
    return report
