"""Deterministic POSIX pax tar of a tree (written by hand, not by ``tarfile``) and a small reader.

Why our own writer: every byte must be a function of the tree and the epoch, also across Python
versions (``tarfile``'s header choices have changed between releases). Format: POSIX.1-2001 pax
(IEEE 1003.1 "pax Interchange Format") over ustar headers:

* entries in sorted order (byte-wise by name, depth first, a directory before its contents),
  names ``./…`` like mmdebstrap's tarballs, directories with a trailing ``/``;
* numeric owners only (uname/gname empty), so the build host's passwd never matters;
* mtime = min(mtime, epoch) in whole seconds; no atime/ctime records (GNU tar's
  ``--pax-option=delete=atime,delete=ctime`` done by construction);
* hard links within the tree kept (first name in sort order is the file, later ones link to it);
* extended attributes kept as ``SCHILY.xattr.<name>`` records (what GNU tar and dpkg-deb use), e.g.
  ``security.capability``;
* a pax ``x`` header precedes an entry only when needed (long names, big ids/sizes, xattrs);
  its own header has a fixed name, mode 0644, owner 0, the entry's mtime;
* the archive ends with two zero blocks and is padded to GNU tar's 10240-byte record.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reprobuild.errors import BuildError, FormatError

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar's default blocking factor
# ustar header (POSIX.1-1988 §10.1.1): field widths in bytes, in order.
_USTAR_FIELDS = (("name", 100), ("mode", 8), ("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12),
                 ("chksum", 8), ("typeflag", 1), ("linkname", 100), ("magic", 6), ("version", 2),
                 ("uname", 32), ("gname", 32), ("devmajor", 8), ("devminor", 8), ("prefix", 155),
                 ("pad", 12))  # fmt: skip

REGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, PAXTYPE = b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"x"


def _octal(value: int, width: int) -> bytes:
    """``width-1`` zero-padded octal digits and a NUL (ustar numeric field)."""
    return b"%0*o\0" % (width - 1, value)


def _fits(value: int, width: int) -> bool:
    return 0 <= value < 8 ** (width - 1)


def pax_record(key: str, value: bytes) -> bytes:
    """One ``"%d %s=%s\\n"`` record; the length counts itself."""
    body = b" " + key.encode("utf-8") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def ustar_header(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typeflag: bytes,
                 linkname: bytes = b"", devmajor: int = 0, devminor: int = 0) -> bytes:
    """A 512-byte ustar header. Values that do not fit must have been moved to a pax header
    (callers pass 0 / a truncated name then)."""
    fields = {
        "name": name[:100], "mode": _octal(mode, 8), "uid": _octal(uid, 8), "gid": _octal(gid, 8),
        "size": _octal(size, 12), "mtime": _octal(mtime, 12), "chksum": b" " * 8, "typeflag": typeflag,
        "linkname": linkname[:100], "magic": b"ustar\0", "version": b"00", "uname": b"", "gname": b"",
        "devmajor": _octal(devmajor, 8), "devminor": _octal(devminor, 8), "prefix": b"", "pad": b"",
    }  # fmt: skip
    raw = b"".join(fields[k].ljust(w, b"\0") for k, w in _USTAR_FIELDS)
    assert len(raw) == BLOCK
    chksum = b"%06o\0 " % sum(raw)  # checksum: header bytes summed with the field as 8 spaces
    return raw[:148] + chksum + raw[156:]


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


@dataclass(frozen=True)
class _Entry:
    name: bytes  # "./etc/passwd", "./etc/" for directories
    path: str  # host path
    st: os.stat_result


def walk_sorted(tree: Path) -> Iterator[_Entry]:
    """Every entry of ``tree`` (root first), depth first, children in byte order. Never follows symlinks."""
    root = os.fspath(tree)
    yield _Entry(b"./", root, os.lstat(root))

    def visit(dirpath: str, prefix: bytes) -> Iterator[_Entry]:
        for name in sorted(os.listdir(os.fsencode(dirpath))):
            path = os.path.join(dirpath, os.fsdecode(name))
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                yield _Entry(prefix + name + b"/", path, st)
                yield from visit(path, prefix + name + b"/")
            else:
                yield _Entry(prefix + name, path, st)

    yield from visit(root, b"./")


def _xattrs(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    return [(n, os.getxattr(path, n, follow_symlinks=False)) for n in sorted(names)]


def tar_mtime(st: os.stat_result, epoch: int) -> int:
    """The mtime the tar records for an entry: whole seconds, clamped to [0, epoch]."""
    return max(0, min(int(st.st_mtime), epoch))


def tar_mtimes(tree: Path, epoch: int) -> int:
    """Set every mtime in ``tree`` to what :func:`write_tar_stream` records for it, so that the
    directory equals what extracting its tar gives (the cache keeps such trees). Symlinks are
    changed themselves, never followed. Returns the number of entries changed."""
    changed = 0
    for e in list(walk_sorted(tree)):
        ns = tar_mtime(e.st, epoch) * 10**9
        if e.st.st_mtime_ns != ns:
            os.utime(e.path, ns=(ns, ns), follow_symlinks=False)
            changed += 1
    return changed


def write_tar_stream(tree: Path, out: BinaryIO, epoch: int) -> None:
    """Write the deterministic tar of ``tree`` to ``out``. Cost: one walk, one read of every file."""
    first_name: dict[tuple[int, int], bytes] = {}
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        out.write(data)
        written += len(data)

    for e in walk_sorted(tree):
        st = e.st
        mode = stat.S_IMODE(st.st_mode)
        mtime = tar_mtime(st, epoch)
        size, link, devmajor, devminor = 0, b"", 0, 0
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            typeflag = DIRTYPE
        elif not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in first_name:
            typeflag, link = LNKTYPE, first_name[key]
        elif stat.S_ISREG(st.st_mode):
            typeflag, size = REGTYPE, st.st_size
        elif stat.S_ISLNK(st.st_mode):
            typeflag, link = SYMTYPE, os.fsencode(os.readlink(e.path))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            typeflag = CHRTYPE if stat.S_ISCHR(st.st_mode) else BLKTYPE
            devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            typeflag = FIFOTYPE
        else:
            raise BuildError(f"cannot archive {e.path}: sockets and other special files are not supported")
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and key not in first_name:
            first_name[key] = e.name

        pax: list[tuple[str, bytes]] = []
        if len(e.name) > 100 or not e.name.isascii():
            pax.append(("path", e.name))
        if len(link) > 100 or not link.isascii():
            pax.append(("linkpath", link))
        for field, value, width in (("uid", st.st_uid, 8), ("gid", st.st_gid, 8), ("size", size, 12)):
            if not _fits(value, width):
                pax.append((field, str(value).encode()))
        if typeflag != LNKTYPE:  # a hard link shares the inode's xattrs with its first name
            pax += [("SCHILY.xattr." + n, v) for n, v in _xattrs(e.path)]
        if pax:
            records = b"".join(pax_record(k, v) for k, v in sorted(pax))
            pax_name = b"./PaxHeaders/" + os.path.basename(e.name.rstrip(b"/"))[:80]
            emit(ustar_header(pax_name, 0o644, 0, 0, len(records), mtime, PAXTYPE))
            emit(records + _padding(len(records)))
        emit(ustar_header(e.name, mode, st.st_uid if _fits(st.st_uid, 8) else 0,
                          st.st_gid if _fits(st.st_gid, 8) else 0, size if _fits(size, 12) else 0,
                          mtime, typeflag, link, devmajor, devminor))
        if typeflag == REGTYPE:
            copied = 0
            with open(e.path, "rb") as f:
                while copied < size and (chunk := f.read(min(1 << 20, size - copied))):
                    emit(chunk)
                    copied += len(chunk)
            if copied != size:
                raise BuildError(f"{e.path} changed size while being archived")
            emit(_padding(size))
    emit(b"\0" * 2 * BLOCK)
    emit(b"\0" * (-written % RECORD))


def write_tar(tree: Path, out: Path, epoch: int) -> None:
    """Write the deterministic pax tar of ``tree`` to ``out`` atomically (temporary name, then rename).

    ``out`` must not exist. On any failure nothing is left under either name.
    """
    out = Path(out)
    if out.exists():
        raise BuildError(f"{out} already exists")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_tar_stream(Path(tree), f, epoch)
        os.chmod(tmp, 0o644)
        os.rename(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class TarEntry:
    name: str
    type: str  # "file", "dir", "symlink", "hardlink", "char", "block", "fifo"
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str
    xattrs: dict[str, bytes]


_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def read_tar(path: Path) -> list[TarEntry]:
    """List a tar's entries (metadata only) in archive order; for tests and diffs."""
    try:
        with tarfile.open(path, "r:*") as tf:
            return [
                TarEntry(ti.name, _TYPES.get(ti.type, "other"), ti.mode, ti.uid, ti.gid, ti.size, int(ti.mtime),
                         ti.linkname,
                         {k[13:]: v.encode("utf-8", "surrogateescape")
                          for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")})
                for ti in tf
            ]
    except tarfile.TarError as e:
        raise FormatError(f"{path}: not a readable tar: {e}") from e
