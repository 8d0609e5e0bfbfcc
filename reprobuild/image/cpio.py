"""cpio "newc" archives (the Linux initramfs format), written deterministically.

Format: kernel ``Documentation/driver-api/early-userspace/buffer-format.rst`` and cpio(5).
Each member is a 110-byte ASCII header (magic ``070701`` + 13 fields of 8 hex digits), the
NUL-terminated path, NUL padding to a multiple of 4, the data, NUL padding to 4. The archive ends
with a member named ``TRAILER!!!``. Hard links share an inode number and link count; following
GNU cpio, only the *last* link carries the data, the earlier ones have size 0.

Reproducibility decisions made here (docs/formats.md §9, §11): members in a sorted walk (bytes order of
names, parents before children), owners 0:0 unless asked to keep numeric owners, every mtime fixed
to the caller's epoch, inode numbers renumbered 1, 2, 3… in walk order, the archive's own device
numbers (``devmajor/devminor``) always 0, directory link counts computed from the tree (2 + number
of subdirectories) instead of copied from the host file system (btrfs reports 1).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reprobuild.errors import FormatError

MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"  # same layout plus a checksum field; read, never written
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
# Largest name we accept when reading (PATH_MAX); the kernel's own limit is the same.
MAX_NAME = 4096
# Fields after the magic, in order, each 8 hex digits (cpio(5), "New ASCII Format").
_FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)  # fmt: skip


class CpioInvalid(FormatError):
    """A cpio archive is malformed, truncated or hostile."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``data`` is a regular file's contents or a symlink's target.

    ``mode`` is the full ``st_mode`` (file type bits included). For hard links every link is one
    entry with the same ``ino`` and ``nlink``; the writer stores the data with the last one.
    """

    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    nlink: int = 1
    rdev_major: int = 0
    rdev_minor: int = 0
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def symlink_target(self) -> str:
        if not self.is_symlink:
            raise ValueError(f"{self.path} is not a symlink")
        return self.data.decode("utf-8", "surrogateescape")


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(entry: CpioEntry, filesize: int, name: bytes) -> bytes:
    values = {
        "ino": entry.ino, "mode": entry.mode, "uid": entry.uid, "gid": entry.gid,
        "nlink": entry.nlink, "mtime": entry.mtime, "filesize": filesize,
        # The archive's own device: always 0 so the host's st_dev never leaks into the bytes.
        "devmajor": 0, "devminor": 0,
        "rdevmajor": entry.rdev_major, "rdevminor": entry.rdev_minor,
        "namesize": len(name) + 1, "check": 0,
    }  # fmt: skip
    for field in _FIELDS:
        if not 0 <= values[field] <= 0xFFFFFFFF:
            raise ValueError(f"cpio: {field}={values[field]} of {entry.path!r} does not fit 32 bits")
    return MAGIC_NEWC + b"".join(b"%08X" % values[f] for f in _FIELDS)


def _write_member(out: BinaryIO, entry: CpioEntry, data: bytes) -> int:
    name = entry.path.encode("utf-8", "surrogateescape")
    if not name or b"\0" in name:
        raise ValueError(f"cpio: invalid member name {entry.path!r}")
    head = _header(entry, len(data), name) + name + b"\0"
    out.write(head + b"\0" * _pad4(len(head)))
    out.write(data)
    out.write(b"\0" * _pad4(len(data)))
    return len(head) + _pad4(len(head)) + len(data) + _pad4(len(data))


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO) -> int:
    """Write ``entries`` in the given order, then the trailer; return the number of bytes written.

    Streams: each entry's data is written as it comes. For a regular file with ``nlink > 1`` the
    data goes with the ``nlink``-th occurrence of its ``ino`` (GNU cpio's newc convention, which
    the kernel's unpacker expects); raises ValueError if a hard-link group is left incomplete.
    """
    seen: dict[int, int] = {}
    wanted: dict[int, int] = {}
    written = 0
    for entry in entries:
        data = entry.data
        if entry.is_file and entry.nlink > 1:
            count = seen.get(entry.ino, 0) + 1
            seen[entry.ino] = count
            wanted[entry.ino] = entry.nlink
            if count < entry.nlink:
                data = b""
            elif count > entry.nlink:
                raise ValueError(f"cpio: more than nlink={entry.nlink} links to inode {entry.ino}")
        written += _write_member(out, entry, data)
    incomplete = sorted(ino for ino, n in seen.items() if n != wanted[ino])
    if incomplete:
        # The data would be lost: it is only ever written with the last link.
        raise ValueError(f"cpio: hard-link groups with fewer links than nlink: inodes {incomplete}")
    written += _write_member(out, CpioEntry(path=TRAILER, mode=0, nlink=1), b"")
    return written


@dataclass(frozen=True)
class _Node:
    rel: str
    path: Path
    st: os.stat_result


def _walk(tree: Path) -> Iterator[_Node]:
    """Pre-order walk, children sorted by the bytes of their names (not locale, not readdir order)."""
    yield _Node(".", tree, tree.lstat())

    def children(dir_path: Path, prefix: str) -> list[_Node]:
        names = sorted(os.listdir(os.fsencode(dir_path)))
        nodes = []
        for raw in names:
            name = os.fsdecode(raw)
            path = dir_path / name
            nodes.append(_Node(prefix + name, path, path.lstat()))
        return nodes

    # Recursive generator expressed with an explicit stack of iterators to avoid recursion limits.
    iters: list[Iterator[_Node]] = [iter(children(tree, ""))]
    while iters:
        node = next(iters[-1], None)
        if node is None:
            iters.pop()
            continue
        yield node
        if stat.S_ISDIR(node.st.st_mode):
            iters.append(iter(children(node.path, node.rel + "/")))


def tree_entries(tree: Path, mtime: int, keep_owners: bool = False) -> Iterator[CpioEntry]:
    """The entries ``cpio_from_tree`` writes, in order; file data is read lazily, one file at a time.

    Walks the tree twice (a stat pass for link counts, then the data pass). Sockets are skipped
    (they cannot be meaningfully archived); fifos and device nodes are kept.
    """
    nodes = [n for n in _walk(tree) if not stat.S_ISSOCK(n.st.st_mode)]
    # Link counts from inside the tree only: links from outside must not change the archive.
    links: dict[tuple[int, int], int] = {}
    subdirs: dict[str, int] = {}
    for n in nodes:
        if stat.S_ISREG(n.st.st_mode) and n.st.st_nlink > 1:
            key = (n.st.st_dev, n.st.st_ino)
            links[key] = links.get(key, 0) + 1
        if stat.S_ISDIR(n.st.st_mode) and n.rel != ".":
            parent = n.rel.rsplit("/", 1)[0] if "/" in n.rel else "."
            subdirs[parent] = subdirs.get(parent, 0) + 1
    inode_numbers: dict[tuple[int, int], int] = {}
    next_ino = 1
    for n in nodes:
        st = n.st
        key = (st.st_dev, st.st_ino)
        if key in inode_numbers and stat.S_ISREG(st.st_mode) and links.get(key, 1) > 1:
            ino = inode_numbers[key]
        else:
            ino = next_ino
            next_ino += 1
            inode_numbers[key] = ino
        if stat.S_ISREG(st.st_mode):
            data, nlink = n.path.read_bytes(), links.get(key, 1)
        elif stat.S_ISLNK(st.st_mode):
            data, nlink = os.fsencode(os.readlink(n.path)), 1
        elif stat.S_ISDIR(st.st_mode):
            data, nlink = b"", 2 + subdirs.get(n.rel, 0)
        else:
            data, nlink = b"", 1
        is_dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        yield CpioEntry(
            path=n.rel,
            mode=st.st_mode,
            uid=st.st_uid if keep_owners else 0,
            gid=st.st_gid if keep_owners else 0,
            mtime=mtime,
            data=data,
            nlink=nlink,
            rdev_major=os.major(st.st_rdev) if is_dev else 0,
            rdev_minor=os.minor(st.st_rdev) if is_dev else 0,
            ino=ino,
        )


def cpio_from_tree(tree: Path, out: BinaryIO, mtime: int, keep_owners: bool = False) -> int:
    """Archive the directory ``tree`` (as ``.`` and relative paths) to ``out``; return bytes written.

    Output depends only on names, types, permission bits, contents, symlink targets, device
    numbers, hard-link structure (and numeric owners if ``keep_owners``), never on the host's
    inode numbers, directory order, times or user database.
    """
    return write_cpio(tree_entries(tree, mtime, keep_owners), out)


def _hex_field(raw: bytes, field: str, offset: int) -> int:
    try:
        if len(raw) != 8 or not all(c in b"0123456789abcdefABCDEF" for c in raw):
            raise ValueError(raw)
        return int(raw, 16)
    except ValueError as e:
        raise CpioInvalid(f"cpio: bad {field} field {raw!r} in header at offset {offset}") from e


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc/crc archive up to its trailer. Earlier hard links come back with empty data.

    Raises CpioInvalid on bad magic, non-hex fields, names that are empty, too long or not
    NUL-terminated, sizes that run past the end of ``data``, or a missing trailer. O(len(data)).
    """
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(data):
            raise CpioInvalid(f"cpio: truncated header at offset {pos} (no {TRAILER})")
        magic = data[pos : pos + 6]
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            raise CpioInvalid(f"cpio: bad magic {magic!r} at offset {pos}")
        fields = {
            name: _hex_field(data[pos + 6 + 8 * i : pos + 14 + 8 * i], name, pos)
            for i, name in enumerate(_FIELDS)
        }
        namesize, filesize = fields["namesize"], fields["filesize"]
        if not 1 < namesize <= MAX_NAME + 1:
            raise CpioInvalid(f"cpio: absurd name size {namesize} at offset {pos}")
        name_start = pos + HEADER_SIZE
        name_end = name_start + namesize
        if name_end > len(data):
            raise CpioInvalid(f"cpio: truncated name at offset {pos}")
        raw_name = data[name_start:name_end]
        if raw_name[-1:] != b"\0" or b"\0" in raw_name[:-1]:
            raise CpioInvalid(f"cpio: name at offset {pos} is not a single NUL-terminated string")
        data_start = name_end + _pad4(name_end)  # header+name padded to 4 from archive start
        data_end = data_start + filesize
        if data_end > len(data):
            raise CpioInvalid(f"cpio: member at offset {pos} claims {filesize} bytes past the end")
        name = raw_name[:-1].decode("utf-8", "surrogateescape")
        if name == TRAILER:
            return entries
        entries.append(
            CpioEntry(
                path=name,
                mode=fields["mode"],
                uid=fields["uid"],
                gid=fields["gid"],
                mtime=fields["mtime"],
                data=data[data_start:data_end],
                nlink=fields["nlink"],
                rdev_major=fields["rdevmajor"],
                rdev_minor=fields["rdevminor"],
                ino=fields["ino"],
            )
        )
        pos = data_end + _pad4(data_end)
