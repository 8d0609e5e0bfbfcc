"""The build cache's storage: stage artifacts kept in the store under their stage keys.

The keys themselves are derived by the runner (:mod:`reprobuild.pipeline.runner`) from what each
stage declares; this module stores and serves what they point at, and knows nothing of stages
beyond their names. One further per-package cache lives here:

    unpacked  one .deb's sha256 + the code digest of :mod:`reprobuild.debian.deb`
              → the .deb with its data.tar decompressed

``unpacked`` is shared by every image, initrd and tools tree that installs the package: dpkg is
handed the package with its payload already decompressed (xz is ≈30 % of dpkg's time). The
objects are written durably, as they are used by path without being rehashed.

Where results live — choice and why: a cached **tree is a deterministic tar object** (the
project's own ``rootfs.archive.write_tar``), so that ``store verify`` rehashes it, ``store gc``
frees it and ``store export`` ships it like any object. Trees that later stages *read* are also
kept **extracted** next to their object (``<store>/trees/<object>``, see ``Store.tree_path``):

* the tools tree is used in place (tools run chrooted into it and write only to binds/tmpfs);
* the installed tree is the lower layer of an overlay (:mod:`reprobuild.rootfs.overlay`) that the
  configuration stage writes into, so an ``ExtraTrees=`` edit copies up a few files instead of
  rewriting ≈130–450 MB (file creation dominates on the reference VM: ≈2.5 s per 128 MB);
* an extracted tree equals what extracting its object gives: a freshly built tree is kept only
  after :func:`reprobuild.rootfs.archive.tar_mtimes` set its mtimes to what the tar records;
* it is derived data: ``store gc`` removes it with its object, ``store verify`` removes it when
  its object is corrupt or when it no longer matches the object (:meth:`Cache.verify_trees`);
* where overlays are unavailable (no root, no overlayfs) the tree is extracted into the build's
  work directory as before: same bytes, slower.

Objects are verified *on use* at no extra I/O: restoring or copying out hashes the bytes while
reading them, and a mismatch is a miss (the object is then left for ``store verify``). Output
and tree objects are not fsynced (a crash costs a rebuild, never a wrong image: they are
rehashed on use); ``unpacked`` packages, used by path, are.

An output file already in place is not copied again when its stat (inode, size, mtime, ctime)
is the one recorded right after this cache wrote it (``cache/outputs/``): a no-change rebuild
then costs the key computation only. Of an output whose stage says ``keep_output = False`` (the
disk image: it is made of the file system and ESP the store holds already) the index keeps a
**receipt** — digest, size, metadata, ``"stored": false`` — and no object: it serves only while
that output is in place; otherwise the stage runs again over its cached upstream files.

The index — ``<store>/cache/<stage>/<key>.json`` → object + metadata — is deliberately *not* the
store's keyed area: store keys are gc roots, and the cache must be collectable. Instead each
build registers one gc root per image directory (``cache-<id>``) naming the objects its latest
build used, so ``store gc`` keeps the newest build of every definition and frees the rest; an
index entry whose object is gone is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.codedigest import CodeDigests
from reprobuild.digest import json_digest
from reprobuild.errors import BuildError, ReprobuildError
from reprobuild.fileio import sha256_for, sha256_stream, write_atomic
from reprobuild.store import Store, check_sha256

# Bump when the meaning of a key or the layout of a cached artefact changes.
CACHE_FORMAT = 2
INDEX_DIR = "cache"
# Stage names are file names in the index: lowercase words.
_STAGE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# The code that writes a decompressed package (its digest enters the ``unpacked`` keys).
UNPACKED_CODE = "reprobuild.debian.deb"

Say = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Content digests (pure over the files they read)


def content_digest(path: Path) -> str:
    """Digest of what copying ``path`` into an image can depend on: for a directory, every entry's
    relative name, type, permission bits, symlink target and file bytes (not owners or times:
    ``copy_tree_into`` replaces those); for a file, its bytes and permission bits. Byte-wise
    sorted walk, symlinks not followed. Raises BuildError if ``path`` does not exist."""
    path = Path(path)
    h = hashlib.sha256(b"reprobuild content v1\0")

    def add(rel: bytes, p: str, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            h.update(b"d\0%s\0%o\n" % (rel, mode))
        elif stat.S_ISLNK(st.st_mode):
            h.update(b"l\0%s\0%s\n" % (rel, os.fsencode(os.readlink(p))))
        elif stat.S_ISREG(st.st_mode):
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    fh.update(chunk)
            h.update(b"f\0%s\0%o\0%s\n" % (rel, mode, fh.hexdigest().encode()))
        else:
            h.update(b"o\0%s\0%o\n" % (rel, st.st_mode))  # copying it fails; the key only must differ

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BuildError(f"{path}: no such file or directory") from None
    if not stat.S_ISDIR(st.st_mode):
        add(b".", os.fspath(path), st)
        return h.hexdigest()

    def visit(directory: str, prefix: bytes) -> None:
        for name in sorted(os.listdir(os.fsencode(directory))):
            p = os.path.join(directory, os.fsdecode(name))
            st = os.lstat(p)
            add(prefix + name, p, st)
            if stat.S_ISDIR(st.st_mode):
                visit(p, prefix + name + b"/")

    add(b".", os.fspath(path), st)
    visit(os.fspath(path), b"")
    return h.hexdigest()


def file_digest(path: Path | None) -> str | None:
    """sha256 of a file's bytes (signing keys and certificates), None for no file."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise BuildError(f"{path}: {e.strerror}") from e


# --------------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    object: str | None  # sha256 of the cached artefact, None for metadata-only entries
    size: int
    meta: dict[str, Any] = field(default_factory=dict)
    # False: a receipt — ``object`` names the output the stage wrote, which the store does not
    # keep (:meth:`Cache.put_receipt`); it serves only while that output is in place.
    stored: bool = True


class CacheMiss(ReprobuildError):
    """A cached object did not hash to its address while being read (treated as a miss)."""


def _corrupt(entry: Entry) -> CacheMiss:
    return CacheMiss(f"cached {entry.stage} object {(entry.object or '')[:16]} is corrupt",
                     hint="run reprobuild store verify")


class Cache:
    """The build cache of one store. ``enabled=False`` (``--no-cache``) makes every lookup a miss
    and every save a no-op. Records the objects a build used, for :meth:`register_root`."""

    def __init__(self, store: Store, *, enabled: bool = True, say: Say = lambda _m: None) -> None:
        self.store = store
        self.enabled = enabled
        self.say = say
        self.index = store.root / INDEX_DIR
        # What each module of the code imports, by source digest (reprobuild.codedigest): facts
        # about the installed code, not build results, so read and written with the cache off too.
        self.code_memo = self.index / "code-imports.json"
        self.used: set[str] = set()
        self._unpacked: str | None = None

    def _unpacked_code(self) -> str:
        if self._unpacked is None:
            code = CodeDigests(memo=self.code_memo)
            self._unpacked = code.digest(UNPACKED_CODE)
            code.save_memo()
        return self._unpacked

    # -- index ---------------------------------------------------------------------------------
    def _index_file(self, stage: str, key: str) -> Path:
        if not _STAGE_NAME.fullmatch(stage):
            raise ValueError(f"unknown cache stage {stage!r}")
        check_sha256(key)
        return self.index / stage / f"{key}.json"

    def get(self, stage: str, key: str, *, record: bool = True) -> Entry | None:
        """The entry for ``key`` if its object (if any) is present with the recorded size.
        ``record=False``: a peek — the object is not counted as used by this build."""
        if not self.enabled:
            return None
        try:
            doc = json.loads(self._index_file(stage, key).read_text())
            entry = Entry(stage, key, doc["object"], int(doc["size"]), dict(doc.get("meta", {})),
                          stored=doc.get("stored", True) is not False)
            if doc.get("format") != CACHE_FORMAT or doc.get("key") != key:
                raise ValueError("stale entry")
            if entry.object is not None:
                check_sha256(entry.object)
                if entry.stored and self.store.path(entry.object).stat().st_size != entry.size:
                    raise ValueError("size differs")
        except (OSError, ValueError, KeyError, TypeError, ReprobuildError):
            return None
        if entry.object and entry.stored and record:
            self.used.add(entry.object)
        return entry

    def _record(self, entry: Entry) -> Entry:
        doc = {"format": CACHE_FORMAT, **asdict(entry)}
        write_atomic(self._index_file(entry.stage, entry.key), (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode())
        if entry.object and entry.stored:
            self.used.add(entry.object)
        return entry

    def put_meta(self, stage: str, key: str, meta: Mapping[str, Any]) -> Entry | None:
        if not self.enabled:
            return None
        return self._record(Entry(stage, key, None, 0, dict(meta)))

    def alias(self, entry: Entry, key: str) -> Entry | None:
        """Record ``entry``'s object and metadata under a second key of the same stage."""
        if not self.enabled or key == entry.key:
            return None
        return self._record(Entry(entry.stage, key, entry.object, entry.size, dict(entry.meta), entry.stored))

    def put_receipt(self, stage: str, key: str, sha256: str, size: int, meta: Mapping[str, Any] | None = None) -> Entry | None:
        """Point ``key`` at an output the store does not keep: its digest, size and metadata only.
        Such an entry serves a build only while that output is in place, unchanged
        (:meth:`output_current`); otherwise the stage runs again."""
        if not self.enabled:
            return None
        return self._record(Entry(stage, key, check_sha256(sha256), size, dict(meta or {}), stored=False))

    def put_file(self, stage: str, key: str, path: Path, meta: Mapping[str, Any] | None = None, *,
                 durable: bool = False, link: bool = False) -> Entry | None:
        """Copy ``path`` into the store and point ``key`` at it. Cost: one pass (hash and copy).
        Not fsynced unless ``durable``: these objects are rehashed on every use, so a crash costs
        a rebuild, not a wrong image. ``link``: the store may take ``path`` itself, read-only,
        instead of a copy (:meth:`Store.put_file`): for a file nobody writes to again."""
        if not self.enabled:
            return None
        sha = self.store.put_file(path, durable=durable, link=link)
        return self._record(Entry(stage, key, sha, Path(path).stat().st_size, dict(meta or {})))

    def put_tree(self, stage: str, key: str, tree: Path, epoch: int, meta: Mapping[str, Any] | None = None,
                 *, keep: bool = False) -> Entry | None:
        """Keep ``tree`` as its deterministic tar (mtimes clamped to ``epoch``). A tree the tar
        cannot hold (e.g. a socket) is simply not cached. Cost: ≈0.4 s per 128 MB.

        ``keep=True``: ``tree`` itself (a directory on the store's file system, see
        :meth:`scratch`) becomes the entry's extracted tree (:meth:`tree_dir`) instead of being
        extracted again later; its mtimes are first set to exactly what the tar records
        (:func:`reprobuild.rootfs.archive.tar_mtimes`), so it equals what extracting gives. The
        caller must not use ``tree`` afterwards (it is moved), whatever the outcome."""
        if not self.enabled:
            return None
        from reprobuild.rootfs.archive import tar_mtimes, write_tar

        tmp = self.store.new_tmp_dir("cache")
        try:
            if keep:
                tar_mtimes(tree, epoch)
            write_tar(tree, tmp / "tree.tar", epoch)
            entry = self.put_file(stage, key, tmp / "tree.tar", meta)
            if keep and entry is not None and entry.object is not None:
                self.store.publish_tree(tree, entry.object)
            return entry
        except BuildError as e:
            self.say(f"not caching the {stage} tree: {e.message}")
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if keep and os.path.lexists(tree):
                shutil.rmtree(tree, ignore_errors=True)

    def scratch(self, tag: str) -> Path:
        """A new private directory on the store's file system (removed by the caller; gc removes
        it if its process died)."""
        return self.store.new_tmp_dir(tag)

    # -- using entries -------------------------------------------------------------------------
    def restore_tree(self, entry: Entry, dest: Path) -> None:
        """Extract a cached tree to ``dest`` (must not exist) through the safe extractor, verifying
        the object's hash meanwhile (a second reader in a thread: hashing releases the GIL, so it
        costs no wall time on a second core). Raises CacheMiss (and removes ``dest``) on a
        mismatch: the extractor keeps every entry inside ``dest`` whatever the bytes are."""
        from concurrent.futures import ThreadPoolExecutor

        from reprobuild.rootfs.unpack import TreeWriter, extract_tar

        assert entry.object is not None
        os.mkdir(dest, 0o755)
        try:
            with self.store.open(entry.object) as raw, self.store.open(entry.object) as second, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-verify") as pool:  # fmt: skip
                digest = pool.submit(sha256_stream, second)
                writer = TreeWriter(dest, root_metadata=True)  # the root as the cached tree had it
                with tarfile.open(fileobj=raw, mode="r:") as tf:
                    extract_tar(tf, writer, f"cached {entry.stage} tree")
                writer.finish()
            if digest.result() != entry.object:
                raise _corrupt(entry)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    def deb_path(self, sha256: str) -> Path:
        """The package ``sha256`` with its payload decompressed (stage ``unpacked``), made on first
        use; the store's own .deb when the cache is off. Feeds dpkg and the Essential extractor."""
        if not self.enabled:
            return self.store.path(sha256)
        key = json_digest({"deb": check_sha256(sha256), "code": self._unpacked_code()}, b"reprobuild unpacked\0")
        entry = self.get("unpacked", key, record=False)
        if entry is None:
            from reprobuild.debian.deb import write_decompressed

            source = self.store.path(sha256)
            tmp = self.scratch("unpacked")
            try:
                with open(tmp / "deb", "wb") as f:
                    write_decompressed(source, f)
                entry = self.put_file("unpacked", key, tmp / "deb", {"deb": sha256}, durable=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            assert entry is not None
        return self.store.path(entry.object)  # type: ignore[arg-type]

    def tree_dir(self, entry: Entry) -> Path:
        """The cached tree of ``entry`` as a read-only directory in the store (``trees/<object>``),
        extracting the object once (verifying its hash) if that was not done yet. Never write to
        it: use :func:`reprobuild.rootfs.overlay.writable_view` for a mutable copy."""
        assert entry.object is not None
        final = self.store.tree_path(entry.object)
        if final.is_dir():
            return final
        tmp = self.scratch("tree")
        try:
            self.restore_tree(entry, tmp / "tree")
            return self.store.publish_tree(tmp / "tree", entry.object)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def verified_path(self, entry: Entry) -> Path:
        """The cached file of ``entry`` where the store keeps it, once its bytes hash to its
        address (a read, no copy). Read-only: never write to it. Raises CacheMiss on a mismatch."""
        assert entry.object is not None and entry.stored
        path = self.store.path(entry.object)
        with open(path, "rb") as f:
            if sha256_stream(f) != entry.object:
                raise _corrupt(entry)
        return path

    def copy_out(self, entry: Entry, dest: Path) -> None:
        """Copy a cached file to ``dest`` atomically (mode 0644), verifying its hash while copying.
        Raises CacheMiss on a mismatch (nothing is left at ``dest``'s temporary)."""
        assert entry.object is not None
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            # A large object is hashed on a second core while it is copied.
            with sha256_for(entry.size) as h, self.store.open(entry.object) as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(4 << 20):
                    h.update(chunk)
                    out.write(chunk)
                digest = h.hexdigest()
            if digest != entry.object:
                raise _corrupt(entry)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename is None:
                e.filename = tmp  # a write names no file: name the one being written (a full disk)
            raise

    # -- outputs already in place -------------------------------------------------------------
    def _stamp_file(self, target: Path) -> Path:
        name = hashlib.sha256(os.fsencode(Path(target).absolute())).hexdigest()
        return self.index / "outputs" / f"{name}.json"

    @staticmethod
    def _stat_stamp(st: os.stat_result) -> list[int]:
        # ctime cannot be set by a user: any write, chmod or replacement of the file changes it.
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def note_output(self, sha256: str, target: Path) -> None:
        """Remember that ``target`` now holds object ``sha256`` (see :meth:`output_current`)."""
        if not self.enabled:
            return
        st = os.stat(target)
        doc = {"object": sha256, "stat": self._stat_stamp(st)}
        write_atomic(self._stamp_file(target), (json.dumps(doc, sort_keys=True) + "\n").encode())

    def output_current(self, entry: Entry, target: Path) -> bool:
        """Whether ``target`` still holds ``entry``'s object exactly as this cache wrote it: same
        inode, size, mtime and ctime as recorded right after writing. Then the copy is skipped
        (make's rule, made strict by ctime). Anything else — a missing stamp, an edited, touched,
        replaced or chmod-ed file — means copy again."""
        if not self.enabled or entry.object is None:
            return False
        try:
            doc = json.loads(self._stamp_file(target).read_text())
            return doc.get("object") == entry.object and doc.get("stat") == self._stat_stamp(os.stat(target))
        except (OSError, ValueError):
            return False

    def register_root(self, name: str, extra: Iterable[str] = (), *, keep_previous: bool = False) -> None:
        """Keep this build's cache objects (and ``extra``) alive across ``store gc``: replaces the
        previous root of the same name, so superseded entries become collectable.

        ``keep_previous``: add to the previous root instead — for a build served whole from the
        output cache, which never looked at the earlier stages: they are still the current ones,
        and the next edit needs them."""
        if self.enabled:
            previous = self.store.roots().get(name, frozenset()) if keep_previous else frozenset()
            self.store.register_root(name, sorted(self.used | set(extra) | previous))

    # -- extracted trees -----------------------------------------------------------------------
    def verify_trees(self) -> list[tuple[str, str]]:
        """Compare every extracted tree (``trees/<object>``) with its tar object — names, types,
        modes, owners, mtimes, link targets, xattrs, hard links and file bytes — and remove any
        that differs (it is derived data: the next build extracts it again). Returns (object,
        reason) for each tree removed. Cost: reads every byte of the trees and their objects."""
        removed = []
        for sha in list(self.store.iter_trees()):
            reason = _tree_differs(self.store, sha)
            if reason is not None:
                self.store.remove_tree(sha)
                removed.append((sha, reason))
        return removed


def _tree_differs(store: Store, sha: str) -> str | None:
    """Why ``trees/<sha>`` is not what extracting object ``sha`` gives, or None if it is."""
    tree = store.tree_path(sha)
    seen: set[str] = set()
    try:
        with store.open(sha) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
            for ti in tf:
                name = os.path.normpath(ti.name).lstrip("/")
                rel = "" if name == "." else name
                path = os.path.join(tree, rel)
                seen.add(rel)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    return f"/{rel} is missing"
                if ti.islnk():
                    target = os.lstat(os.path.join(tree, os.path.normpath(ti.linkname).lstrip("/")))
                    if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino):
                        return f"/{rel} is no longer a hard link"
                    continue
                kind = {tarfile.DIRTYPE: stat.S_ISDIR, tarfile.SYMTYPE: stat.S_ISLNK}.get(ti.type, stat.S_ISREG)
                if not kind(st.st_mode):
                    return f"/{rel} changed type"
                if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)) != (ti.mode, ti.uid, ti.gid,
                                                                                         int(ti.mtime)):
                    return f"/{rel} changed mode, owner or mtime"
                if ti.issym() and os.readlink(path) != ti.linkname:
                    return f"/{rel} points elsewhere"
                xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                          for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
                names = sorted(os.listxattr(path, follow_symlinks=False))
                if names != sorted(xattrs) or any(os.getxattr(path, n, follow_symlinks=False) != xattrs[n]
                                                  for n in names):
                    return f"/{rel} changed extended attributes"
                if ti.isreg():
                    member = tf.extractfile(ti)
                    assert member is not None
                    with open(path, "rb") as f:
                        while chunk := member.read(1 << 20):
                            if f.read(len(chunk)) != chunk:
                                return f"/{rel} changed content"
                        if f.read(1):
                            return f"/{rel} changed content"
    except (OSError, tarfile.TarError, ReprobuildError) as e:
        return f"unreadable: {e}"
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, n), tree)
            if rel not in seen:
                return f"/{rel} was added"
    return None


def root_name(directory: Path) -> str:
    """The gc root name for the cache of an image directory."""
    return "cache-" + hashlib.sha256(os.fsencode(Path(directory).resolve())).hexdigest()[:16]
