"""``reprobuild verify --audit``: what in an image did not come from its packages.

The reference is the lock's ``image`` package set: every ``.deb`` (from the store, where it was
verified by sha256 on the way in) is read member by member with :mod:`reprobuild.debian.deb`,
giving each path its package, its type, and the sha256 of a file's bytes or a symlink's target.
Package paths are resolved through the image's own directory symlinks (merged /usr: a package's
``/bin/sh`` is the tree's ``/usr/bin/sh``).

The image is read as a tree without running anything from it: a directory as it is, a tar through
the safe extractor, a DDI's root file system with its own tool (``fsck.erofs --extract``,
``unsquashfs``, ``debugfs``; :func:`reprobuild.diff.open.extract_fs`), into a temporary directory.

The report has three lists (directories are not audited: dpkg creates parents freely):

* ``not_from_packages``: files and symlinks no package ships; each with its cause when the
  manifest's ``added_files`` names it (``Hostname=``, ``Autologin=yes``, …), else marked as made by
  a maintainer or post-installation script (``/etc/passwd``, ``/etc/alternatives/*``, ``ld.so.cache``);
* ``changed``: package files whose content (or type, or symlink target) differs from the ``.deb``;
* ``missing``: package files that are not in the image, with the cause when the manifest records
  the removal (``RemoveFiles=``, normalisation).

Cost: one read of every package's data and of every file of the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.debian.deb import DebFile
from reprobuild.diff.detect import Kind
from reprobuild.diff.open import extract_fs
from reprobuild.diff.source import ByteSource
from reprobuild.errors import FormatError, ReprobuildError, StoreError
from reprobuild.lockfile import Lock, load_lock
from reprobuild.nspawn import TAR_MAGIC, inspect_ddi
from reprobuild.rootfs.unpack import TreeWriter, UnsafePath, extract_tar, split_member_name
from reprobuild.store import Store

FS_KINDS = {"erofs": Kind.EROFS, "squashfs": Kind.SQUASHFS, "ext4": Kind.EXT4}
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
    packages: int = 0
    package_files: int = 0
    image_files: int = 0
    not_from_packages: list[Finding] = field(default_factory=list)
    changed: list[Finding] = field(default_factory=list)
    missing: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"image": self.image, "packages": self.packages, "package_files": self.package_files,
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


def _canonical(tree: Path, rel: str) -> str:
    """``rel`` with its parent directories resolved through the tree's symlinks (never outside)."""
    parts = rel.split("/")
    try:
        parent = TreeWriter(tree).resolve(parts[:-1], follow_last=True)
    except (FileNotFoundError, UnsafePath):
        return rel
    base = os.path.relpath(parent, os.path.realpath(tree))
    return parts[-1] if base == "." else f"{base}/{parts[-1]}"


# ---- the image as a tree ----------------------------------------------------------------------


@contextmanager
def image_tree(image: Path) -> Iterator[Path]:
    """The root tree of ``image`` (a directory, a tar or a DDI) as a directory, removed after."""
    if image.is_dir():
        yield image
        return
    with open(image, "rb") as f:
        head = f.read(512)
    with tempfile.TemporaryDirectory(prefix="reprobuild-audit-") as tmp:
        work = Path(tmp)
        offset, magic = TAR_MAGIC
        if head[offset : offset + len(magic)] == magic:
            tree = work / "tree"
            tree.mkdir()
            writer = TreeWriter(tree)
            try:
                with tarfile.open(image, mode="r|") as tf:
                    extract_tar(tf, writer, image.name)
            except tarfile.TarError as e:
                raise AuditError(f"{image}: not a readable tar: {e}") from e
            writer.finish()
            yield tree
            return
        ddi = inspect_ddi(image)
        if ddi.root_fs not in FS_KINDS or ddi.data_extent is None:
            raise AuditError(f"{image}: the {ddi.layout} partition holds no file system reprobuild can read")
        if ddi.layout != "root":
            raise AuditError(f"{image}: only images with a root partition can be audited (this one has /usr only)")
        source = ByteSource(image, *ddi.data_extent)
        yield extract_fs(FS_KINDS[ddi.root_fs], source, work, str(image)).root


def _tree_entries(tree: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every non-directory entry, sorted."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        # Symlinks to directories are listed by os.walk among dirnames: they are entries too.
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, tree), os.lstat(full)


# ---- the audit --------------------------------------------------------------------------------


def _manifest_causes(manifest: dict[str, Any]) -> dict[str, dict[str, str]]:
    causes: dict[str, dict[str, str]] = {}
    for entry in manifest.get("added_files") or []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            causes[entry["path"]] = entry
    return causes


def audit_tree(tree: Path, shipped: dict[str, Shipped], manifest: dict[str, Any], report: AuditReport) -> None:
    """Fill ``report`` by comparing ``tree`` with ``shipped`` (paths already canonical)."""
    causes = _manifest_causes(manifest)
    seen = set()
    for rel, st in _tree_entries(tree):
        report.image_files += 1
        path = "/" + rel
        item = shipped.get(rel)
        if item is None:
            report.not_from_packages.append(Finding(path, unowned_cause(path, causes)))
            continue
        seen.add(rel)
        full = tree / rel
        if stat.S_ISLNK(st.st_mode):
            kind, digest = "symlink", os.readlink(full)
        elif stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                kind, digest = "file", _sha256(f.read)
        else:
            kind, digest = "special", ""
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
    with image_tree(image) as tree:
        say(f"reading {len(packages)} packages")
        shipped: dict[str, Shipped] = {}
        for p in packages:
            try:
                contents = package_contents(store.path(p.sha256), p.name)
            except FormatError as e:
                raise AuditError(f"package {p.name}: {e.message}") from e
            for rel, item in contents.items():
                shipped[_canonical(tree, rel)] = item  # a later package replaces (dpkg's Replaces)
        report.package_files = len(shipped)
        say("comparing the image with its packages")
        audit_tree(tree, shipped, manifest, report)
    return report
