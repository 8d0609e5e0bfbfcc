"""A read-only ext2/3/4 reader in pure Python: superblock, group descriptors, inodes, extents,
directories, xattrs.

docs/formats.md §15 describes the on-disk format this follows (the Linux kernel's
Documentation/filesystems/ext4/ and fs/ext4/ext4.h, ext4_extents.h, xattr.h, acl.h). Supported:
extent-mapped files and directories (what ``mke2fs -t ext4 -d`` writes, and how
`reprobuild.image.fs` builds its ext4 images), uninitialised extents and holes, linear and
hashed (htree) directories read block by block, fast and extent-mapped symlinks, devices, 32-
and 64-bit group descriptors, flex_bg, metadata_csum (checksums are not verified), xattrs in the
inode and in an xattr block, POSIX ACLs converted to the xattr form the kernel shows. Block-
mapped (ext2/ext3) files, inline data, xattr values in inodes, encryption, meta_bg and
compression raise `Ext4Unsupported` (a clear message; callers fall back to ``debugfs``).

Hostile input: every read is checked against the image and the block count, inode numbers
against the inode count, extent trees are bounded in depth and must stay inside the file system,
directory entries must fit their block, names and targets are bounded, directories must form a
tree (a directory reached twice is an error), the walk stops at `MAX_ENTRIES` entries and
`MAX_DEPTH` levels, and the block cache is bounded. A malformed image raises `Ext4Invalid` (a
`FormatError`) naming what is wrong.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from reprobuild.errors import FormatError
from reprobuild.image.fsread import read_exactly, walk_tree

SUPER_OFFSET = 1024
MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
XATTR_MAGIC = 0xEA020000
ROOT_INO = 2

# feature_incompat bits
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_CASEFOLD = 0x20000
INCOMPAT_READABLE = (INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_MMP
                     | INCOMPAT_FLEX_BG | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR | INCOMPAT_CASEFOLD)  # fmt: skip
INCOMPAT_NAMES = {0x1: "compression", 0x8: "journal device", 0x10: "meta_bg", 0x400: "xattr values in inodes",
                  0x1000: "dirdata", 0x8000: "inline data", 0x10000: "encryption"}  # fmt: skip

# i_flags
FL_ENCRYPT = 0x800
FL_EXTENTS = 0x80000
FL_EA_INODE = 0x200000
FL_INLINE_DATA = 0x10000000

XATTR_PREFIXES = {1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.",
                  6: "security.", 7: "system.", 8: "system.richacl"}  # fmt: skip
FT_NAMES = {1: "file", 2: "directory", 3: "char-device", 4: "block-device", 5: "fifo", 6: "socket", 7: "symlink"}
_TYPE_OF_MODE = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
                 stat.S_IFCHR: "char-device", stat.S_IFBLK: "block-device", stat.S_IFIFO: "fifo",
                 stat.S_IFSOCK: "socket"}  # fmt: skip

# Bounds for hostile images. No real root file system comes near them.
MAX_ENTRIES = 2_000_000
MAX_DEPTH = 1024
MAX_NAME = 255
MAX_SYMLINK = 4096
MAX_DIR_BYTES = 64 << 20
MAX_EXTENT_DEPTH = 5
MAX_EXTENTS = 1 << 20  # per file
MAX_XATTR_BYTES = 64 * 1024
CACHE_BLOCKS = 4096


class Ext4Invalid(FormatError):
    """The ext2/3/4 image is malformed (or truncated)."""


class Ext4Unsupported(FormatError):
    """A valid ext2/3/4 feature this reader does not read (block maps, inline data, encryption …)."""


@dataclass(frozen=True)
class Superblock:
    block_size: int
    blocks: int
    inodes: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    feature_incompat: int
    groups: int


class Extent(NamedTuple):
    """``length`` bytes of file data at byte ``offset`` of the image; offset None is zeros (a hole
    or an uninitialised extent)."""

    offset: int | None
    length: int


class Inode(NamedTuple):
    number: int
    type: str  # "file", "directory", "symlink", "char-device", "block-device", "fifo", "socket"
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    nlink: int
    device: tuple[int, int] | None
    flags: int
    xattr_block: int
    offset: int  # byte offset of the inode in the image
    extents: tuple[Extent, ...]  # a file's, directory's or long symlink's bytes in order
    tree_blocks: tuple[int, ...]  # the extent tree's blocks below the inode (index and leaf nodes)
    ibody_xattrs: bytes  # the xattr entries and values inside the inode, after its magic (b"": none)
    target: bytes  # a fast symlink's target (in the inode)


def parse_superblock(buf: bytes, length: int) -> Superblock:
    """The superblock from the first 2048 bytes of an image of ``length`` bytes."""
    if len(buf) < SUPER_OFFSET + 1024:
        raise Ext4Invalid("ext4: the image is shorter than its superblock")
    sb = buf[SUPER_OFFSET:SUPER_OFFSET + 1024]
    if struct.unpack_from("<H", sb, 0x38)[0] != MAGIC:
        raise Ext4Invalid("ext4: bad superblock magic")
    inodes, blocks_lo = struct.unpack_from("<II", sb, 0)
    first_data, log_bs = struct.unpack_from("<II", sb, 0x14)
    bpg, _cpg, ipg = struct.unpack_from("<III", sb, 0x20)
    (rev,) = struct.unpack_from("<I", sb, 0x4C)
    (inode_size,) = struct.unpack_from("<H", sb, 0x58) if rev else (128,)
    _compat, incompat, _ro = struct.unpack_from("<III", sb, 0x5C)
    (desc_size,) = struct.unpack_from("<H", sb, 0xFE)
    (blocks_hi,) = struct.unpack_from("<I", sb, 0x150)
    if log_bs > 6:
        raise Ext4Invalid(f"ext4: block size 2^{10 + log_bs} is out of range")
    bs = 1024 << log_bs
    bad = incompat & ~INCOMPAT_READABLE
    if bad:
        names = ", ".join(n for bit, n in INCOMPAT_NAMES.items() if bad & bit) or f"{bad:#x}"
        raise Ext4Unsupported(f"ext4: unsupported features: {names}")
    blocks = blocks_lo | (blocks_hi << 32 if incompat & INCOMPAT_64BIT else 0)
    desc = desc_size if incompat & INCOMPAT_64BIT else 32
    if not 32 <= desc <= 1024 or desc & (desc - 1):
        raise Ext4Invalid(f"ext4: group descriptor size {desc} is invalid")
    if rev and (inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1)):
        raise Ext4Invalid(f"ext4: inode size {inode_size} is invalid")
    if bpg == 0 or ipg == 0 or blocks <= first_data or first_data > 1:
        raise Ext4Invalid("ext4: the block or inode counts per group are invalid")
    if blocks * bs > length:
        raise Ext4Invalid(f"ext4: the superblock says {blocks * bs} bytes, the image has {length} (truncated?)")
    groups = -(-(blocks - first_data) // bpg)
    if inodes > groups * ipg or inodes < ROOT_INO:
        raise Ext4Invalid(f"ext4: {inodes} inodes do not fit {groups} groups of {ipg}")
    return Superblock(bs, blocks, inodes, first_data, bpg, ipg, inode_size, desc, incompat, groups)


class Ext4:
    """An ext2/3/4 image read through ``read_at(offset, n)``; ``length`` is the image size."""

    def __init__(self, read_at: Callable[[int, int], bytes], length: int) -> None:
        self._read_at = read_at
        self.length = length
        self.bytes_read = 0
        self._cache: dict[int, bytes] = {}
        self._end = length  # until the superblock says how large the file system is
        self.sb = parse_superblock(self._read(0, min(2048, length)), length)
        self.block_size = self.sb.block_size
        self._end = self.sb.blocks * self.block_size
        gdt_block = self.sb.first_data_block + 1
        self._gdt = self._read(gdt_block * self.block_size, self.sb.groups * self.sb.desc_size)

    # -- bounded reads ---------------------------------------------------------------------------

    def _read(self, offset: int, n: int) -> bytes:
        buf = read_exactly(self._read_at, offset, n, self._end, Ext4Invalid, "ext4: the file system")
        self.bytes_read += n
        return buf

    def _block(self, index: int) -> bytes:
        b = self._cache.get(index)
        if b is None:
            if index >= self.sb.blocks:
                raise Ext4Invalid(f"ext4: block {index} lies outside the file system")
            if len(self._cache) >= CACHE_BLOCKS:
                self._cache.clear()
            b = self._cache[index] = self._read(index * self.block_size, self.block_size)
        return b

    def read_at(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the file system at byte ``offset`` (data of an extent)."""
        return self._read(offset, n)

    # -- inodes ----------------------------------------------------------------------------------

    def _inode_offset(self, number: int) -> int:
        if not 1 <= number <= self.sb.inodes:
            raise Ext4Invalid(f"ext4: inode {number} lies outside the inode table (1–{self.sb.inodes})")
        group, index = divmod(number - 1, self.sb.inodes_per_group)
        d = group * self.sb.desc_size
        lo = struct.unpack_from("<I", self._gdt, d + 0x8)[0]
        hi = struct.unpack_from("<I", self._gdt, d + 0x28)[0] if self.sb.desc_size >= 64 else 0
        return (lo | hi << 32) * self.block_size + index * self.sb.inode_size

    def inode(self, number: int) -> Inode:
        off = self._inode_offset(number)
        raw = self._read(off, self.sb.inode_size)
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", raw, 0)
        (mtime,) = struct.unpack_from("<i", raw, 0x10)
        gid_lo, nlink = struct.unpack_from("<HH", raw, 0x18)
        (flags,) = struct.unpack_from("<I", raw, 0x20)
        i_block = raw[0x28:0x28 + 60]
        acl_lo, size_hi = struct.unpack_from("<II", raw, 0x68)
        acl_hi, uid_hi, gid_hi = struct.unpack_from("<HHH", raw, 0x76)
        ibody_xattrs = b""
        if len(raw) > 128:
            (extra,) = struct.unpack_from("<H", raw, 0x80)
            if 0x88 + 4 <= 128 + extra <= len(raw):
                (mtime_extra,) = struct.unpack_from("<I", raw, 0x88)
                mtime += (mtime_extra & 3) << 32
            start = 128 + extra
            if start + 4 <= len(raw) and struct.unpack_from("<I", raw, start)[0] == XATTR_MAGIC:
                ibody_xattrs = raw[start + 4:]
        ftype = _TYPE_OF_MODE.get(mode & 0o170000)
        if ftype is None:
            raise Ext4Invalid(f"ext4: inode {number} has an unknown file type (mode {mode:#o})")
        if flags & (FL_ENCRYPT | FL_EA_INODE):
            raise Ext4Unsupported(f"ext4: inode {number} is encrypted or an xattr value inode")
        if flags & FL_INLINE_DATA:
            raise Ext4Unsupported(f"ext4: inode {number} keeps its data inline (inline_data is not supported)")
        size = size_lo | size_hi << 32
        device = None
        extents: tuple[Extent, ...] = ()
        tree_blocks: tuple[int, ...] = ()
        target = b""
        if ftype in ("char-device", "block-device"):
            old, new = struct.unpack_from("<II", i_block, 0)
            device = ((old >> 8) & 0xFF, old & 0xFF) if old else \
                ((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))
            size = 0
        elif ftype in ("fifo", "socket"):
            size = 0
        elif ftype == "symlink" and not flags & FL_EXTENTS:
            if size > 60 - 1:
                raise Ext4Unsupported(f"ext4: symlink inode {number} is block-mapped (ext2/ext3 layout)")
            target = i_block[:size]
        elif flags & FL_EXTENTS:
            if ftype == "symlink" and size > MAX_SYMLINK:
                raise Ext4Invalid(f"ext4: symlink inode {number} has a {size}-byte target")
            extents, tree_blocks = self._extents(number, i_block, size)
        elif size:
            raise Ext4Unsupported(f"ext4: inode {number} is block-mapped (ext2/ext3 layout is not supported)")
        return Inode(number, ftype, mode, uid_lo | uid_hi << 16, gid_lo | gid_hi << 16, size, mtime, nlink, device,
                     flags, acl_lo | acl_hi << 32, off, extents, tree_blocks, ibody_xattrs, target)  # fmt: skip

    def _extents(self, number: int, root: bytes, size: int) -> tuple[tuple[Extent, ...], tuple[int, ...]]:
        """The file's bytes as extents in order, holes and uninitialised extents as zeros; and the
        extent tree's blocks."""
        bs = self.block_size
        leaves: list[tuple[int, int, int, bool]] = []  # (logical block, physical block, count, initialised)
        tree: list[int] = []

        def node(buf: bytes, depth_left: int, expect_depth: int | None) -> None:
            magic, entries, maximum, depth = struct.unpack_from("<HHHH", buf, 0)
            if magic != EXTENT_MAGIC or entries > maximum or 12 + 12 * maximum > len(buf):
                raise Ext4Invalid(f"ext4: inode {number}: a bad extent tree node")
            if depth > MAX_EXTENT_DEPTH or (expect_depth is not None and depth != expect_depth) or depth_left < 0:
                raise Ext4Invalid(f"ext4: inode {number}: extent tree depth {depth} is invalid")
            for i in range(entries):
                at = 12 + 12 * i
                if depth == 0:
                    lblk, length, hi, lo = struct.unpack_from("<IHHI", buf, at)
                    init = length <= 32768
                    count = length if init else length - 32768
                    if leaves and lblk < leaves[-1][0] + leaves[-1][2]:  # fail fast: a tree that revisits a leaf
                        raise Ext4Invalid(f"ext4: inode {number}: extents overlap or are out of order")
                    leaves.append((lblk, lo | hi << 32, count, init))
                    if len(leaves) > MAX_EXTENTS:
                        raise Ext4Invalid(f"ext4: inode {number} has more than {MAX_EXTENTS} extents")
                else:
                    _lblk, lo, hi = struct.unpack_from("<IIH", buf, at)
                    tree.append(lo | hi << 32)
                    node(self._block(lo | hi << 32), depth_left - 1, depth - 1)

        node(root, MAX_EXTENT_DEPTH, None)
        out: list[Extent] = []
        pos = 0  # bytes of the file produced so far
        for lblk, pblk, count, init in leaves:
            start = lblk * bs
            if start < pos or count == 0:
                raise Ext4Invalid(f"ext4: inode {number}: extents overlap or are out of order")
            if start >= size:
                break  # preallocated past the end of the file
            if pblk + count > self.sb.blocks:
                raise Ext4Invalid(f"ext4: inode {number}: an extent at block {pblk} runs past the file system")
            if start > pos:
                out.append(Extent(None, start - pos))
            n = min(count * bs, size - start)
            out.append(Extent(pblk * bs if init else None, n))
            pos = start + n
        if pos < size:
            out.append(Extent(None, size - pos))  # a hole at the end
        return tuple(out), tuple(tree)

    # -- data ------------------------------------------------------------------------------------

    def iter_data(self, ino: Inode, chunk: int = 1 << 20) -> Iterator[bytes]:
        for e in ino.extents:
            done = 0
            while done < e.length:
                n = min(chunk, e.length - done)
                yield bytes(n) if e.offset is None else self._read(e.offset + done, n)
                done += n

    def read_data(self, ino: Inode, limit: int) -> bytes:
        """The file's bytes (at most ``limit``; Ext4Invalid beyond)."""
        if ino.size > limit:
            raise Ext4Invalid(f"ext4: inode {ino.number} has {ino.size} bytes, more than the limit of {limit}")
        return b"".join(self.iter_data(ino))

    def readlink(self, ino: Inode) -> bytes:
        return ino.target if not ino.extents else self.read_data(ino, MAX_SYMLINK)

    def xattrs(self, ino: Inode) -> tuple[tuple[str, bytes], ...]:
        """Name/value pairs, sorted by name: those in the inode, then those in its xattr block."""
        out: dict[str, bytes] = {}
        if ino.ibody_xattrs:
            self._entries(ino.number, ino.ibody_xattrs, 0, ino.ibody_xattrs, out)
        if ino.xattr_block:
            block = self._block(ino.xattr_block)
            magic, _refcount, nblocks = struct.unpack_from("<III", block, 0)
            if magic != XATTR_MAGIC or nblocks != 1:
                raise Ext4Invalid(f"ext4: inode {ino.number}: its xattr block {ino.xattr_block} is invalid")
            self._entries(ino.number, block, 32, block, out)
        return tuple(sorted(out.items()))

    def _entries(self, number: int, buf: bytes, pos: int, values: bytes, out: dict[str, bytes]) -> None:
        """Xattr entries from ``pos`` of ``buf`` to the 4 zero bytes that end them; value offsets
        are relative to the start of ``values``."""
        total = 0
        while pos + 4 <= len(buf) and buf[pos:pos + 4] != b"\0\0\0\0":
            if pos + 16 > len(buf):
                raise Ext4Invalid(f"ext4: inode {number}: a truncated xattr entry")
            name_len, index, voff, vinum, vsize = struct.unpack_from("<BBHII", buf, pos)
            name = buf[pos + 16:pos + 16 + name_len]
            if len(name) != name_len:
                raise Ext4Invalid(f"ext4: inode {number}: a truncated xattr name")
            if vinum:
                raise Ext4Unsupported(f"ext4: inode {number} keeps an xattr value in an inode")
            prefix = XATTR_PREFIXES.get(index)
            if prefix is None:
                raise Ext4Invalid(f"ext4: inode {number}: unknown xattr name index {index}")
            total += name_len + vsize
            if total > MAX_XATTR_BYTES or voff + vsize > len(values):
                raise Ext4Invalid(f"ext4: inode {number}: an xattr value lies outside its area")
            value = values[voff:voff + vsize]
            if index in (2, 3):
                value = _acl_as_xattr(number, value)
            out[prefix + name.decode("utf-8", "surrogateescape")] = value
            pos += (16 + name_len + 3) // 4 * 4

    # -- directories -----------------------------------------------------------------------------

    def dirents(self, ino: Inode) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode number, file type) of each entry, "." and ".." left out, in on-disk order
        (linear and htree directories alike: the index lives in entries of inode 0)."""
        if ino.size > MAX_DIR_BYTES:
            raise Ext4Invalid(f"ext4: directory inode {ino.number} has {ino.size} bytes")
        data = self.read_data(ino, MAX_DIR_BYTES)
        bs = self.block_size
        seen: set[bytes] = set()
        for start in range(0, len(data), bs):
            block = data[start:start + bs]
            pos = 0
            while pos + 8 <= len(block):
                number, rec_len, name_len, ftype = struct.unpack_from("<IHBB", block, pos)
                if rec_len in (0, 65535) and bs == 65536:
                    rec_len = 65536
                if rec_len < 8 or rec_len % 4 or pos + rec_len > len(block) or 8 + name_len > rec_len:
                    raise Ext4Invalid(f"ext4: directory inode {ino.number}: a bad entry at byte {start + pos}")
                if number:
                    name = block[pos + 8:pos + 8 + name_len]
                    if not name or b"/" in name or b"\0" in name:
                        raise Ext4Invalid(f"ext4: directory inode {ino.number}: invalid entry name {name[:64]!r}")
                    if name not in (b".", b".."):
                        if name in seen:
                            raise Ext4Invalid(f"ext4: directory inode {ino.number}: {name[:64]!r} appears twice")
                        seen.add(name)
                        yield name, number, ftype
                pos += rec_len

    def root(self) -> Inode:
        root = self.inode(ROOT_INO)
        if root.type != "directory":
            raise Ext4Invalid("ext4: the root inode is not a directory")
        return root

    def children(self, d: Inode, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
        """(name, inode) of each entry of directory ``d`` (whose path is ``prefix``), checking
        that the entry's file type agrees with its inode."""
        typed = bool(self.sb.feature_incompat & INCOMPAT_FILETYPE)
        for name, number, ftype in self.dirents(d):
            ino = self.inode(number)
            if typed and ftype in FT_NAMES and FT_NAMES[ftype] != ino.type:
                raise Ext4Invalid(f"ext4: {(prefix + name)[:200]!r}: the directory says {FT_NAMES[ftype]}, "
                                  f"the inode is a {ino.type}")  # fmt: skip
            yield name, ino

    def walk(self) -> Iterator[tuple[bytes, bytes, Inode]]:
        """Every entry below the root as (parent path with a trailing "/" or b"", name, inode),
        directory by directory. Raises Ext4Invalid on a directory reached twice, more than
        MAX_ENTRIES entries or a tree deeper than MAX_DEPTH."""
        return walk_tree(self.root(), lambda prefix, d: self.children(d, prefix), lambda ino: ino.number,
                         Ext4Invalid, "ext4", MAX_ENTRIES, MAX_DEPTH)  # fmt: skip


# ext4_acl_entry tags with an id (ACL_USER, ACL_GROUP); the others are 4-byte short entries.
_ACL_WITH_ID = (0x02, 0x08)
_ACL_TAGS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20)


def _acl_as_xattr(number: int, value: bytes) -> bytes:
    """ext4's compact POSIX ACL (version 1) as the ``system.posix_acl_*`` xattr the kernel
    returns (version 2, 8 bytes per entry, id 0xFFFFFFFF where the tag has none)."""
    if len(value) < 4 or struct.unpack_from("<I", value, 0)[0] != 1:
        raise Ext4Invalid(f"ext4: inode {number}: a POSIX ACL of an unknown version")
    out = [struct.pack("<I", 2)]
    pos = 4
    while pos < len(value):
        if pos + 4 > len(value):
            raise Ext4Invalid(f"ext4: inode {number}: a truncated POSIX ACL")
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag not in _ACL_TAGS:
            raise Ext4Invalid(f"ext4: inode {number}: a POSIX ACL entry with tag {tag:#x}")
        if tag in _ACL_WITH_ID:
            if pos + 8 > len(value):
                raise Ext4Invalid(f"ext4: inode {number}: a truncated POSIX ACL")
            (ident,) = struct.unpack_from("<I", value, pos + 4)
            pos += 8
        else:
            ident = 0xFFFFFFFF
            pos += 4
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)
