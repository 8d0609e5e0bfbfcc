"""Safe extraction of package contents into a root tree.

Every path is resolved *inside* the tree the way the kernel would resolve it after ``chroot``
(``openat2(RESOLVE_IN_ROOT)`` semantics): absolute symlink targets restart at the tree root and
``..`` never climbs above it. So a symlink shipped as ``/bin -> usr/bin`` (trixie's base-files) is
followed, like ``tar --keep-directory-symlink`` does for mmdebstrap, while ``evil -> /etc`` or
``../../..`` can never make a write land outside the tree. The last component of a path is never
followed: a regular file replaces whatever non-directory is there (unlink, then ``O_EXCL|O_NOFOLLOW``).

Nothing else writes into the tree while we extract (maintainer scripts have not run yet, or have
finished), so resolving by path and then acting on the result is not racy.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reprobuild.errors import FormatError

_MAX_SYMLINKS = 40  # same limit as the kernel's path walk (MAXSYMLINKS)
_XATTR_PREFIX = "SCHILY.xattr."  # pax keyword GNU tar and dpkg-deb use for extended attributes


class UnsafePath(FormatError):
    """An archive member tried to leave the tree or is not allowed in a package."""


def split_member_name(name: str, what: str = "member") -> list[str]:
    """Turn an archive member name into path components relative to the root.

    ``./usr/bin/x`` → ``["usr", "bin", "x"]``; ``./`` → ``[]``. Absolute names, ``..`` components
    and NUL bytes are rejected (tar itself strips a leading ``/`` with a warning; a package has no
    reason to ship one, so we refuse).
    """
    if "\x00" in name:
        raise UnsafePath(f"{what} name contains a NUL byte: {name!r}")
    if name.startswith("/"):
        raise UnsafePath(f"{what} has an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{what} path contains '..': {name!r}")
    return parts


@dataclass(frozen=True)
class TreeEntry:
    """What `resolve_in_tree` needs to know of one path of a tree."""

    kind: str  # "directory", "symlink" or "other"
    target: str = ""  # a symlink's target


def resolve_in_tree(parts: Sequence[str], lookup: Callable[[list[str]], TreeEntry | None], *, follow_last: bool,
                    make_dir: Callable[[list[str]], None] | None = None) -> list[str]:  # fmt: skip
    """The components of ``parts`` resolved inside a tree the way the kernel resolves a path after
    ``chroot`` (pure: the tree is seen only through ``lookup(components)``, None when absent).

    Intermediate symlinks are followed; the last component only if ``follow_last``. Absolute
    targets restart at the root and ``..`` never climbs above it, so the result never leaves the
    tree. A missing component is made with ``make_dir`` when given (the last too); else a missing
    last component is kept as it is and a missing intermediate one raises FileNotFoundError. A
    non-directory in the middle, or more than 40 symlinks, raise UnsafePath.
    """
    todo = list(parts)
    done: list[str] = []
    links = 0
    while todo:
        comp = todo.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        is_last = not todo
        entry = lookup(done + [comp])
        if entry is None:
            if make_dir is not None:
                make_dir(done + [comp])
            elif not is_last:
                raise FileNotFoundError(errno.ENOENT, "no such file or directory", "/" + "/".join(done + [comp]))
            done.append(comp)
            continue
        if entry.kind == "symlink" and (not is_last or follow_last):
            links += 1
            if links > _MAX_SYMLINKS:
                raise UnsafePath(f"too many levels of symbolic links resolving /{'/'.join(parts)}")
            if entry.target.startswith("/"):
                done = []  # absolute targets restart at the tree root, as after chroot
            todo = [p for p in entry.target.split("/") if p] + todo
            continue
        if not is_last and entry.kind != "directory":
            raise UnsafePath(f"/{'/'.join(done + [comp])} is not a directory (resolving /{'/'.join(parts)})")
        done.append(comp)
    return done


@dataclass
class TreeWriter:
    """Writes entries into ``root`` with in-root path resolution. Not thread-safe.

    ``allow_devices``: create character/block devices and FIFOs (needs root). Debian Policy §10.6
    forbids device files in packages, so the installer leaves this off and rejects them.
    Directory mtimes are applied by :meth:`finish`, after all entries, because writing a child
    changes its parent's mtime.

    Resolved parent directories are remembered (a package or a cached tree writes thousands of
    entries into the same few directories): a resolution depends only on what exists along the
    path, which only a removal can change (a new entry is created only where nothing was, and a
    missing component is created as a directory), so every removal forgets them all.
    """

    root: Path
    allow_devices: bool = False
    # The archive's root entry ("./") sets the root's mode, owner and mtime too: for a tree
    # restored whole (a cached tree), which must equal the tree its tar was made of.
    root_metadata: bool = False
    owners: bool = field(default_factory=lambda: os.geteuid() == 0)  # chown only when we can
    _dir_times: dict[str, int] = field(default_factory=dict)
    _parents: dict[tuple[str, ...], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._root = os.path.realpath(self.root)

    # -- path resolution -------------------------------------------------------------------------
    def is_file(self, parts: list[str]) -> bool:
        """Whether ``parts``, its symlinks resolved inside the tree, is a regular file; False when
        it is missing or cannot be resolved there."""
        try:
            return os.path.isfile(self.resolve(parts, follow_last=True))
        except (FileNotFoundError, UnsafePath):
            return False

    def resolve(self, parts: list[str], *, follow_last: bool, create_dirs: bool = False) -> str:
        """Host path of ``parts`` resolved in the tree; never outside it (`resolve_in_tree`).

        Intermediate symlinks are followed in-root; the last component is followed only if
        ``follow_last``. With ``create_dirs`` every missing component (the last too) is created as a
        0755 directory: used to resolve the parent of an entry.
        """

        def lookup(done: list[str]) -> TreeEntry | None:
            here = os.path.join(self._root, *done)
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                return TreeEntry("symlink", os.readlink(here))
            return TreeEntry("directory" if stat.S_ISDIR(st.st_mode) else "other")

        def make_dir(done: list[str]) -> None:
            here = os.path.join(self._root, *done)
            os.mkdir(here)
            os.chmod(here, 0o755)  # explicit: the umask must not leak into the tree

        done = resolve_in_tree(parts, lookup, follow_last=follow_last, make_dir=make_dir if create_dirs else None)
        path = os.path.join(self._root, *done)
        # Belt and braces: the walk cannot leave the root, assert it anyway.
        if path != self._root and not path.startswith(self._root + os.sep):
            raise UnsafePath(f"path escapes the tree: /{'/'.join(parts)}")
        return path

    def _parent(self, parts: list[str]) -> str:
        """Host path of the directory an entry ``parts`` goes into (created if missing)."""
        key = tuple(parts[:-1])
        path = self._parents.get(key)
        if path is None:
            path = self._parents[key] = self.resolve(parts[:-1], follow_last=True, create_dirs=True)
        return path

    def _remove(self, path: str, *, directory: bool = False) -> None:
        """Remove ``path``; the resolutions remembered may have gone through it."""
        self._parents.clear()
        if directory:
            os.rmdir(path)
        else:
            os.unlink(path)

    def _clear(self, path: str) -> None:
        """Remove a non-directory at ``path`` so a new entry can take its place."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"cannot replace directory {self._rel(path)} with a non-directory")
        self._remove(path)

    def _rel(self, path: str) -> str:
        return "/" + os.path.relpath(path, self._root).removeprefix(".")

    def _meta(self, path: str, uid: int, gid: int, mode: int, mtime: int, xattrs: dict[str, bytes],
              fd: int | None = None) -> None:
        # Order matters: chown clears set-id bits and security.capability, so chmod and xattrs come after it.
        if self.owners:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(path, uid, gid, follow_symlinks=False)
        if fd is not None:
            os.fchmod(fd, mode)
        else:
            os.chmod(path, mode)
        for name, value in sorted(xattrs.items()):
            try:
                os.setxattr(fd if fd is not None else path, name, value)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                raise FormatError(f"cannot set xattr {name} on {self._rel(path)}: {e.strerror}") from e

    # -- entry writers -------------------------------------------------------------------------------
    def mkdir(self, parts: list[str], mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0,
              xattrs: dict[str, bytes] | None = None) -> None:
        if not parts:  # the root itself: keep its metadata (tar -C root would chmod it; we do not)
            if self.root_metadata:
                self._meta(self._root, uid, gid, mode, mtime, xattrs or {})
                self._dir_times[self._root] = mtime
            return
        path = os.path.join(self._parent(parts), parts[-1])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            # tar --keep-directory-symlink: an existing symlink to a directory stays (merged /usr).
            real = self.resolve(parts, follow_last=True)
            if os.path.isdir(real) and not os.path.islink(real):
                return
            self._remove(path)
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self._remove(path)
            st = None
        if st is None:
            os.mkdir(path, 0o700)
        self._meta(path, uid, gid, mode, mtime, xattrs or {})
        self._dir_times[path] = mtime

    def write_file(self, parts: list[str], data_source: Callable[[int], bytes] | bytes, mode: int = 0o644,
                   uid: int = 0, gid: int = 0, mtime: int = 0, xattrs: dict[str, bytes] | None = None) -> None:
        """Create a regular file; ``data_source`` is bytes or a ``read(n)`` callable (streamed)."""
        if not parts:
            raise UnsafePath("a regular file cannot be the root directory")
        path = os.path.join(self._parent(parts), parts[-1])
        self._clear(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if isinstance(data_source, bytes):
                os.write(fd, data_source) if data_source else None
            else:
                while chunk := data_source(1 << 20):
                    os.write(fd, chunk)
            self._meta(path, uid, gid, mode, mtime, xattrs or {}, fd=fd)
            os.utime(fd, ns=(mtime * 10**9, mtime * 10**9))
        finally:
            os.close(fd)

    def symlink(self, parts: list[str], target: str, uid: int = 0, gid: int = 0, mtime: int = 0) -> None:
        """Create a symlink. Its target is stored verbatim: it is only ever resolved in-root."""
        if not parts:
            raise UnsafePath("a symlink cannot be the root directory")
        if "\x00" in target or not target:
            raise UnsafePath(f"bad symlink target {target!r}")
        path = os.path.join(self._parent(parts), parts[-1])
        try:
            self._clear(path)
        except UnsafePath:
            # A directory where the symlink goes: allowed only if it is empty (nothing is lost).
            self._remove(path, directory=True)
        os.symlink(target, path)
        if self.owners:
            os.chown(path, uid, gid, follow_symlinks=False)
        os.utime(path, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)

    def hardlink(self, parts: list[str], source_parts: list[str]) -> None:
        """Hard-link ``parts`` to the existing in-tree ``source_parts`` (never followed if a symlink)."""
        src = self.resolve(source_parts, follow_last=False)
        if not os.path.lexists(src):
            raise UnsafePath(f"hard link target /{'/'.join(source_parts)} does not exist in the tree")
        if os.path.isdir(src) and not os.path.islink(src):
            raise UnsafePath(f"hard link to a directory: /{'/'.join(source_parts)}")
        path = os.path.join(self._parent(parts), parts[-1])
        self._clear(path)
        os.link(src, path, follow_symlinks=False)

    def special(self, parts: list[str], mode: int, devmajor: int, devminor: int, uid: int, gid: int,
                mtime: int) -> None:
        if not self.allow_devices:
            raise UnsafePath(f"device or FIFO /{'/'.join(parts)} not allowed (Debian Policy §10.6)")
        path = os.path.join(self._parent(parts), parts[-1])
        self._clear(path)
        os.mknod(path, mode, os.makedev(devmajor, devminor))
        self._meta(path, uid, gid, stat.S_IMODE(mode), mtime, {})
        os.utime(path, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)

    def finish(self) -> None:
        """Apply directory mtimes, deepest first."""
        for path in sorted(self._dir_times, reverse=True):
            t = self._dir_times[path]
            if os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, ns=(t * 10**9, t * 10**9), follow_symlinks=False)
        self._dir_times.clear()


def _xattrs(ti: tarfile.TarInfo) -> dict[str, bytes]:
    # tarfile decodes pax values as UTF-8 with surrogateescape; encoding back restores the raw bytes
    # (security.capability values are binary).
    return {
        k[len(_XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
        for k, v in ti.pax_headers.items()
        if k.startswith(_XATTR_PREFIX)
    }


def extract_tar(tf: tarfile.TarFile, writer: TreeWriter, origin: str,
                skip: Callable[[list[str]], bool] | None = None) -> list[str]:
    """Extract a streaming tar into the tree through ``writer``; return the member paths written.

    ``origin`` (e.g. the package name) is named in every error. Owners are numeric (uid/gid fields;
    names are ignored, so the host's passwd never leaks in). Cost: one pass, O(total size).
    ``skip(parts)``: regular files, symlinks and hard links for which it is true are checked like
    every member but not written (directories always are); a hard link to a skipped file is skipped.
    """
    written: list[str] = []
    skipped: set[str] = set()
    for ti in tf:
        parts = split_member_name(ti.name, f"{origin}: member")
        rel = "/" + "/".join(parts)
        mtime = int(ti.mtime)
        mode = stat.S_IMODE(ti.mode)
        if skip is not None and (ti.isreg() or ti.issym() or ti.islnk()):
            if ti.issym() and ("\x00" in ti.linkname or not ti.linkname):
                raise UnsafePath(f"{origin}: {rel}: bad symlink target {ti.linkname!r}")
            if ti.islnk():
                target = "/" + "/".join(split_member_name(ti.linkname, f"{origin}: hard link target"))
                if target in skipped or skip(parts):
                    skipped.add(rel)
                    continue
            elif skip(parts):
                skipped.add(rel)
                continue
        try:
            if ti.isdir():
                writer.mkdir(parts, mode, ti.uid, ti.gid, mtime, _xattrs(ti))
            elif ti.isreg():
                f = tf.extractfile(ti)
                assert f is not None
                writer.write_file(parts, f.read, mode, ti.uid, ti.gid, mtime, _xattrs(ti))
            elif ti.issym():
                writer.symlink(parts, ti.linkname, ti.uid, ti.gid, mtime)
            elif ti.islnk():
                writer.hardlink(parts, split_member_name(ti.linkname, f"{origin}: hard link target"))
            elif ti.ischr() or ti.isblk() or ti.isfifo():
                kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK if ti.isblk() else stat.S_IFIFO
                writer.special(parts, kind | mode, ti.devmajor, ti.devminor, ti.uid, ti.gid, mtime)
            else:
                raise UnsafePath(f"unsupported member type {ti.type!r}")
        except UnsafePath as e:
            raise UnsafePath(f"{origin}: {rel}: {e.message}") from e
        except OSError as e:
            if e.filename is None:  # os.write names no file: name the one being written
                e.filename = os.path.join(writer.root, *parts)
            raise FormatError(f"{origin}: cannot extract {rel}: {e.strerror or e}") from e
        written.append(rel)
    return written
