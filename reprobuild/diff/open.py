"""Open diff inputs as nodes, and containers as named members, through one `Container` interface.

A :class:`Node` is one thing to compare: bytes (a `ByteSource`) of a detected `Kind`, or a real
directory, with file metadata when it is a member of a file tree. A :class:`Container` lists
``member_names()`` and opens ``member(name)``; file trees (directories, extracted file systems,
tar and cpio archives) are `TreeContainer`s whose member names are relative paths.

File systems are read without mounting and without root. erofs, squashfs, ext4 and vfat are
read in place by Python readers (`diff/erofstree.py`, `diff/squashfstree.py`, `diff/ext4tree.py`,
`diff/vfattree.py`); an image one of those readers refuses (a compressed erofs, an lz4 squashfs,
a block-mapped ext2) is extracted by the standard tool into a temporary directory (``fsck.erofs
--extract``, ``unsquashfs``, ``debugfs rdump``), bounded in time and in file size; a missing
tool raises `ToolMissing` naming its package (`diff/fstree.py` chooses between the two).
"""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Self

from reprobuild.debian.deb import parse_ar_index
from reprobuild.diff.detect import Kind, detect
from reprobuild.diff.source import ByteSource, rmtree_quiet
from reprobuild.errors import FormatError, ToolMissing
from reprobuild.fileio import ReadRefused, check_input
from reprobuild.image.cpio import read_cpio

# Hostile-input bounds. No real image needs more; each turns a runaway into a clear error.
MAX_MEMBERS = 2_000_000  # entries in one tree or archive
MAX_XATTR_BYTES = 64 * 1024  # per file, as on Linux


class DiffInputError(FormatError):
    """An input could not be read or is malformed; ``reprobuild diff`` exits 2 for these."""

    exit_code = 2


# -- nodes ---------------------------------------------------------------------------------------


FILE_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char-device",
    stat.S_IFBLK: "block-device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}  # fmt: skip


@dataclass(frozen=True)
class FileMeta:
    """Metadata of one file-tree member. None means the reader cannot know the value."""

    type: str  # one of FILE_TYPES' values, or "hardlink" (tar)
    mode: int | None  # permission bits 0o7777
    uid: int | None
    gid: int | None
    size: int
    mtime: int | None
    target: str | None = None  # symlink or hard-link target
    xattrs: tuple[tuple[str, bytes], ...] | None = None
    rdev: tuple[int, int] | None = None


@dataclass(frozen=True)
class ChangedBlocks:
    """Which ``unit``-byte blocks of a partition differ from the other side's (from the dm-verity
    hash trees), so a comparator can skip everything else without reading it."""

    blocks: frozenset[int]
    unit: int
    total: int  # blocks covered by the trees


@dataclass(frozen=True)
class Node:
    """Something to compare. ``kind`` None means "detect from the bytes when needed"."""

    name: str
    kind: Kind | None
    source: ByteSource | None = None
    directory: Path | None = None
    meta: FileMeta | None = None
    changed: ChangedBlocks | None = None  # set by the disk comparator for verity-protected pairs

    def resolved_kind(self) -> Kind:
        if self.kind is not None:
            return self.kind
        if self.directory is not None:
            return Kind.DIRECTORY
        assert self.source is not None
        return detect(self.source)

    def detected(self) -> Node:
        return self if self.kind is not None else replace(self, kind=self.resolved_kind())


def open_input(path: Path) -> Node:
    """The top-level node for a command-line argument. Raises DiffInputError if unreadable."""
    try:
        if path.is_dir():
            return Node(str(path), Kind.DIRECTORY, directory=path)
        check_input(path, block_devices=True)
    except ReadRefused as e:
        raise DiffInputError(f"{path}: {e.reason} or directory") from e
    except OSError as e:
        raise DiffInputError(f"{path}: {e.strerror}") from e
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DiffInputError(f"{path}: {e.strerror}") from e
    src = ByteSource(path, 0, _size_of(path))
    return Node(str(path), detect(src), src)


def _size_of(path: Path) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


# -- the container interface ---------------------------------------------------------------------


class Container(ABC):
    """Named members, compared pairwise by name."""

    @abstractmethod
    def member_names(self) -> list[str]:
        """Names in a stable order (the container's own order where it has one)."""

    @abstractmethod
    def member(self, name: str) -> Node:
        """The member called ``name`` (one of `member_names`)."""


class ListContainer(Container):
    """Members given up front (ar members, PE sections, a decompressed stream)."""

    def __init__(self, members: list[Node]) -> None:
        self._members = {m.name: m for m in members}

    def member_names(self) -> list[str]:
        return list(self._members)

    def member(self, name: str) -> Node:
        return self._members[name]


class TreeContainer(Container):
    """A file tree; member names are relative POSIX paths without a leading ``./``.

    ``reliable`` names the `FileMeta` fields this reader can know (vfat has no modes or owners,
    extraction as a non-root user loses owners, fsck.erofs 1.5 does not extract xattrs…): only
    fields both sides know are compared.
    """

    reliable: frozenset[str] = frozenset({"type", "mode", "uid", "gid", "size", "mtime", "target", "xattrs", "rdev"})
    label: str = "tree"
    note: str | None = None  # how the tree was read, when the diff should say so

    def meta(self, name: str) -> FileMeta:
        """The metadata of member ``name`` without its content (a reader that reads or copies a
        file's bytes to make its member overrides this to leave them unread)."""
        meta = self.member(name).meta
        assert meta is not None
        return meta


ALL_FIELDS = TreeContainer.reliable


class DirectoryTree(TreeContainer):
    """A real directory, walked with lstat (symlinks are never followed), sorted by name bytes."""

    label = "directory"

    def __init__(self, root: Path, reliable: frozenset[str] | None = None, label: str | None = None) -> None:
        self.root = root
        if reliable is not None:
            self.reliable = reliable
        if label:
            self.label = label
        self._entries: dict[str, os.stat_result] = {}
        self._walk()

    def _walk(self) -> None:
        stack = [("", self.root)]
        while stack:
            prefix, d = stack.pop()
            try:
                names = sorted(os.listdir(os.fsencode(d)))
            except OSError as e:
                raise DiffInputError(f"cannot list {d}: {e.strerror}") from e
            for raw in names:
                name = os.fsdecode(raw)
                rel = prefix + name
                st = os.lstat(os.path.join(d, name))
                self._entries[rel] = st
                if len(self._entries) > MAX_MEMBERS:
                    raise DiffInputError(f"{self.root}: more than {MAX_MEMBERS} entries")
                if stat.S_ISDIR(st.st_mode):
                    stack.append((rel + "/", Path(d, name)))

    def member_names(self) -> list[str]:
        return sorted(self._entries, key=lambda n: n.encode("utf-8", "surrogateescape"))

    def member(self, name: str) -> Node:
        st = self._entries[name]
        path = self.root / name
        ftype = FILE_TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
        target = os.readlink(path) if ftype == "symlink" else None
        src = ByteSource(path, 0, st.st_size) if ftype == "file" else None
        is_dev = ftype in ("char-device", "block-device")
        meta = FileMeta(ftype, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size if ftype == "file" else 0,
                        int(st.st_mtime), target, _xattrs(path) if "xattrs" in self.reliable else None,
                        (os.major(st.st_rdev), os.minor(st.st_rdev)) if is_dev else None)  # fmt: skip
        return Node(name, None, src, meta=meta)


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...] | None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        out = []
        for n in sorted(names):
            value = os.getxattr(path, n, follow_symlinks=False)
            out.append((n, value[:MAX_XATTR_BYTES]))
        return tuple(out)
    except OSError:
        return None  # file system without xattr support: unknown, not "none"


class TarTree(TreeContainer):
    """An uncompressed tar archive (ustar/pax/gnu). Member data is read in place, never copied."""

    label = "tar"

    def __init__(self, src: ByteSource) -> None:
        self._src = src
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(fileobj=src.open(), mode="r:") as tf:
                for i, ti in enumerate(tf):
                    if i >= MAX_MEMBERS:
                        raise FormatError(f"tar: more than {MAX_MEMBERS} members")
                    name = _normalise(ti.name)
                    if name:
                        self._members[name] = ti  # a later member of the same name wins, as on extraction
        except (tarfile.TarError, EOFError, ValueError, OSError) as e:
            raise FormatError(f"tar archive is corrupt: {e}") from e

    def member_names(self) -> list[str]:
        return sorted(self._members, key=lambda n: n.encode("utf-8", "surrogateescape"))

    def member(self, name: str) -> Node:
        ti = self._members[name]
        if ti.isreg():
            ftype = "file"
        elif ti.isdir():
            ftype = "directory"
        elif ti.issym():
            ftype = "symlink"
        elif ti.islnk():
            ftype = "hardlink"
        elif ti.ischr():
            ftype = "char-device"
        elif ti.isblk():
            ftype = "block-device"
        elif ti.isfifo():
            ftype = "fifo"
        else:
            ftype = "unknown"
        xattrs = tuple(sorted((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
                              for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")))  # fmt: skip
        src = self._src.slice(ti.offset_data, ti.size) if ftype == "file" else None
        meta = FileMeta(ftype, ti.mode & 0o7777, ti.uid, ti.gid, ti.size if ftype == "file" else 0, int(ti.mtime),
                        ti.linkname or None, xattrs,
                        (ti.devmajor, ti.devminor) if ftype.endswith("device") else None)  # fmt: skip
        return Node(name, None, src, meta=meta)


class CpioTree(TreeContainer):
    """A newc cpio archive (an initrd), parsed in memory (bounded by the caller's limit)."""

    label = "cpio"

    def __init__(self, src: ByteSource, limit: int) -> None:
        entries = read_cpio(src.read(limit))
        if len(entries) > MAX_MEMBERS:
            raise FormatError(f"cpio: more than {MAX_MEMBERS} members")
        self._entries = {}
        for e in entries:
            name = _normalise(e.path)
            if name:
                self._entries[name] = e

    def member_names(self) -> list[str]:
        return sorted(self._entries, key=lambda n: n.encode("utf-8", "surrogateescape"))

    def member(self, name: str) -> Node:
        e = self._entries[name]
        ftype = FILE_TYPES.get(stat.S_IFMT(e.mode), "unknown")
        is_dev = ftype in ("char-device", "block-device")
        meta = FileMeta(ftype, stat.S_IMODE(e.mode), e.uid, e.gid, len(e.data) if ftype == "file" else 0, e.mtime,
                        e.symlink_target if ftype == "symlink" else None, None,
                        (e.rdev_major, e.rdev_minor) if is_dev else None)  # fmt: skip
        src = ByteSource.of_bytes(e.data) if ftype == "file" else None
        return Node(name, None, src, meta=meta)


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/") if name not in (".", "/") else ""


# -- file systems: extraction with the standard tools --------------------------------------------


@dataclass(frozen=True)
class Extractor:
    tool: str
    package: str
    argv: Callable[[str, Path, Path], list[str]]  # (tool path, image, output dir) -> argv
    creates_dir: bool  # the tool creates the output directory itself
    # FileMeta fields the extracted tree reproduces faithfully (as root; see `extract_fs`).
    reliable: frozenset[str]


_EXTRACTORS: dict[Kind, Extractor] = {
    # fsck.erofs 1.5 restores modes, owners (as root) and mtimes, but not xattrs.
    Kind.EROFS: Extractor("fsck.erofs", "erofs-utils", lambda t, img, out: [t, f"--extract={out}", str(img)],
                          True, ALL_FIELDS - {"xattrs"}),
    Kind.SQUASHFS: Extractor("unsquashfs", "squashfs-tools",
                             lambda t, img, out: [t, "-no-progress", "-quiet", "-d", str(out), str(img)],
                             True, ALL_FIELDS),
    # debugfs rdump restores mode, owner and times of files and directories, not of symlinks.
    Kind.EXT4: Extractor("debugfs", "e2fsprogs", lambda t, img, out: [t, "-R", f"rdump / {out}", str(img)],
                         False, ALL_FIELDS - {"xattrs"}),
}


def unpacked_limit(packed: int) -> int:
    """The most bytes one file unpacked from ``packed`` bytes of image may take on disk: 64× the
    image, at least 1 GiB. No real image comes near it; a sparse file or a compression bomb stops
    there (extraction tools, in-place readers and OCI layers alike)."""
    return max(1 << 30, 64 * packed)


def _limits(max_file: int) -> Callable[[], None]:
    def apply() -> None:
        # Bound what a hostile image can make the tool write: no single file beyond max_file.
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))

    return apply


def extract_fs(kind: Kind, image: ByteSource, workdir: Path, what: str) -> DirectoryTree:
    """Extract the file system ``image`` under ``workdir`` and return its tree.

    Raises ToolMissing when the tool is absent and DiffInputError when it fails (corrupt image).
    Bounds: a timeout of 2 min + 1 s per 5 MiB, and RLIMIT_FSIZE of 64× the image (≥ 1 GiB) per
    extracted file. As a non-root user owners cannot be restored, so they are not compared.
    """
    ex = _EXTRACTORS[kind]
    exe = _which(ex.tool)
    if exe is None:
        raise ToolMissing(ex.tool, ex.package, f"to read the {kind.value} file system in {what}")
    # Absolute: the tool runs in workdir, and a whole-file input keeps the path it was given.
    img = image.as_file(workdir, f"{kind.value}.img").absolute()
    out = workdir / "tree"
    if not ex.creates_dir:
        out.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C", "HOME": str(workdir)}
    timeout = 120 + image.length // (5 << 20)
    try:
        r = subprocess.run(ex.argv(exe, img, out), capture_output=True, env=env, timeout=timeout, cwd=workdir, check=False,
                           preexec_fn=_limits(unpacked_limit(image.length)), stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise DiffInputError(f"{what}: {ex.tool} did not finish within {timeout} s (corrupt {kind.value}?)") from e
    err = r.stderr.decode("utf-8", "replace").strip()
    failed = r.returncode != 0 or (kind is Kind.EXT4 and ("while " in err or "not open" in err))
    if failed or (ex.creates_dir and not out.is_dir()):
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
        detail = lines[-1] if lines else f"exit status {r.returncode}"
        raise DiffInputError(f"{what}: the {kind.value} file system is corrupt or unreadable ({ex.tool}: {detail})")
    reliable = ex.reliable if os.geteuid() == 0 else ex.reliable - {"uid", "gid"}
    if kind is Kind.EROFS and os.geteuid() != 0:
        reliable = reliable - {"mode"}  # fsck.erofs applies the umask for ordinary users
    return DirectoryTree(out, reliable, kind.value)


def _which(tool: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        p = os.path.join(d, tool)
        if os.access(p, os.X_OK):
            return p
    return None


class TempDirs:
    """Temporary directories that are always removed (`close`), also after errors."""

    def __init__(self) -> None:
        self._dirs: list[Path] = []

    def new(self, prefix: str = "reprobuild-diff-") -> Path:
        d = Path(tempfile.mkdtemp(prefix=prefix))
        self._dirs.append(d)
        return d

    def close(self) -> None:
        while self._dirs:
            rmtree_quiet(self._dirs.pop())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- other containers ----------------------------------------------------------------------------


def ar_members(src: ByteSource) -> ListContainer:
    """The members of an ar archive (a .deb), in archive order, as in-place byte ranges."""
    with src.open() as f:

        def read_at(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        index = parse_ar_index(read_at, src.length)
    if len(index) > 1024:
        raise FormatError("ar archive with more than 1024 members")
    return ListContainer([Node(m.name, None, src.slice(m.offset, m.size)) for m in index])
