"""A read-only erofs reader in pure Python: superblock, inodes, directories, uncompressed data.

docs/formats.md §13 describes the on-disk format this follows (from the Linux kernel's
Documentation/filesystems/erofs.rst and fs/erofs/erofs_fs.h). Supported: compact and extended
inodes; the uncompressed data layouts FLAT_PLAIN, FLAT_INLINE (tail packed after the inode) and
CHUNK_BASED (block map or chunk indexes, holes); inline and shared xattrs with the standard name
prefixes. This is what ``mkfs.erofs`` (erofs-utils 1.5 – 1.8) writes without ``-z``, which is
how `reprobuild.image.fs` builds its erofs images. Compressed inodes, extra devices, long xattr
name prefixes and 48-bit layouts raise `ErofsUnsupported` (a clear message; callers fall back).

Hostile input: every offset is checked against the image size before it is read, names and
targets are bounded, directories must form a tree (a directory reached twice is an error), the
walk stops at `MAX_ENTRIES` entries and `MAX_DEPTH` levels, and reads go through a bounded block
cache. A malformed image raises `ErofsInvalid` (a `FormatError`) naming what is wrong.

I/O: the caller passes ``read_at(offset, n)``; `bytes_read` counts what was asked for, so a
caller can show how little of a large image it touched.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from reprobuild.errors import FormatError
from reprobuild.image.fsread import read_exactly, walk_tree

SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
# erofs_super_block, first 128 bytes: magic, checksum, feature_compat, blkszbits, sb_extslots,
# root_nid, inos, build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid,
# volume_name, feature_incompat, available_compr_algs, extra_devices, devt_slotoff, dirblkbits,
# xattr_prefix_count, xattr_prefix_start, packed_nid, reserved.
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQ24s")
assert SUPERBLOCK.size == 128
# erofs_inode_compact (32 bytes): format, xattr_icount, mode, nlink, size(32), reserved, i_u,
# ino, uid(16), gid(16), reserved2.
COMPACT = struct.Struct("<HHHHIIIIHHI")
# erofs_inode_extended (64 bytes): format, xattr_icount, mode, reserved, size(64), i_u, ino,
# uid(32), gid(32), mtime(64), mtime_nsec, nlink, reserved2[16].
EXTENDED = struct.Struct("<HHHHQIIIIQII16s")
assert COMPACT.size == 32 and EXTENDED.size == 64
DIRENT = struct.Struct("<QHBB")  # nid, nameoff, file_type, reserved
XATTR_ENTRY = struct.Struct("<BBH")  # name_len, name_index, value_size
XATTR_IBODY_HEADER = 12  # h_reserved(4), h_shared_count(1), h_reserved2(7)

SLOT = 32  # nid * 32 = inode offset within the metadata area
NULL_ADDR = 0xFFFFFFFF
# i_format: bit 0 = inode version (0 compact, 1 extended), bits 1-3 = data layout.
LAYOUT_FLAT_PLAIN, LAYOUT_COMPRESSED_FULL, LAYOUT_FLAT_INLINE, LAYOUT_COMPRESSED_COMPACT, LAYOUT_CHUNK_BASED = range(5)
CHUNK_BLKBITS_MASK = 0x1F
CHUNK_INDEXES = 0x20
# feature_incompat bits. ZERO_PADDING (0x1) only concerns compressed data; CHUNKED_FILE (0x4) is
# read here. 0x2/0x8/0x10/0x20 are compression (or device-table) features: harmless as long as no
# inode is compressed and no extra device is declared, which is checked per inode and below.
INCOMPAT_XATTR_PREFIXES = 0x40
INCOMPAT_48BIT = 0x80
INCOMPAT_KNOWN = 0x3F | INCOMPAT_XATTR_PREFIXES
XATTR_PREFIXES = {1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.",
                  5: "lustre.", 6: "security."}  # fmt: skip

# Bounds for hostile images. No real root file system comes near them.
MAX_ENTRIES = 2_000_000
MAX_DEPTH = 1024
MAX_NAME = 255
MAX_SYMLINK = 4096
MAX_DIR_BYTES = 64 << 20
MAX_XATTR_BYTES = 64 * 1024
CACHE_BLOCKS = 4096  # bounded read cache: at most 4096 blocks (16 MiB at 4 KiB) are kept

FT_NAMES = {1: "file", 2: "directory", 3: "char-device", 4: "block-device", 5: "fifo", 6: "socket", 7: "symlink"}


class ErofsInvalid(FormatError):
    """The erofs image is malformed (or truncated)."""


class ErofsUnsupported(FormatError):
    """A valid erofs feature this reader does not implement (compression, extra devices …)."""


@dataclass(frozen=True)
class Superblock:
    block_size: int
    root_nid: int
    inodes: int
    build_time: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: bytes
    feature_compat: int
    feature_incompat: int


# Extent and Inode are NamedTuples rather than frozen dataclasses: a root file system has tens
# of thousands of inodes, and a frozen dataclass's __init__ costs several times a tuple's.


class Extent(NamedTuple):
    """``length`` bytes of file data at byte ``offset`` of the image; offset None is a hole (zeros)."""

    offset: int | None
    length: int


class Inode(NamedTuple):
    nid: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    nlink: int
    rdev: int  # encoded (new_encode_dev) for devices, else 0
    layout: int
    meta_offset: int  # byte offset of the inode
    meta_length: int  # inode + xattrs + inline tail or chunk index array
    shared_xattrs: tuple[int, ...]  # shared xattr ids
    xattr_size: int  # bytes of the xattr area after the inode (0: no xattrs)
    extents: tuple[Extent, ...]  # the file's bytes in order; their lengths add up to `size`
    type: str  # "file", "directory", "symlink", "char-device", "block-device", "fifo", "socket"

    @property
    def device(self) -> tuple[int, int]:
        """(major, minor) of a device inode (Linux new_decode_dev)."""
        return (self.rdev & 0xFFF00) >> 8, (self.rdev & 0xFF) | ((self.rdev >> 12) & 0xFFF00)


_TYPE_OF_MODE = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
                 stat.S_IFCHR: "char-device", stat.S_IFBLK: "block-device", stat.S_IFIFO: "fifo",
                 stat.S_IFSOCK: "socket"}  # fmt: skip


def parse_superblock(buf: bytes) -> Superblock:
    """The superblock from the first 1024 + 128 bytes of an image."""
    if len(buf) < SUPER_OFFSET + SUPERBLOCK.size:
        raise ErofsInvalid("erofs: the image is shorter than its superblock")
    f = SUPERBLOCK.unpack_from(buf, SUPER_OFFSET)
    (magic, _csum, compat, blkszbits, _ext, root_nid, inos, build_time, _nsec, blocks, meta_blkaddr, xattr_blkaddr,
     uuid, name, incompat, _algs, extra_devices, _devt, dirblkbits, _pfx_count, _pfx_start, _packed, _r) = f
    if magic != MAGIC:
        raise ErofsInvalid("erofs: bad superblock magic")
    if not 9 <= blkszbits <= 16:
        raise ErofsInvalid(f"erofs: block size 2^{blkszbits} is out of range")
    if incompat & INCOMPAT_48BIT or incompat & ~(INCOMPAT_KNOWN | INCOMPAT_48BIT):
        raise ErofsUnsupported(f"erofs: unsupported incompatible features {incompat:#x}")
    if incompat & INCOMPAT_XATTR_PREFIXES:
        raise ErofsUnsupported("erofs: long xattr name prefixes are not supported")
    if extra_devices:
        raise ErofsUnsupported("erofs: images spanning extra devices are not supported")
    if dirblkbits:
        raise ErofsUnsupported("erofs: directory blocks larger than the block size are not supported")
    return Superblock(1 << blkszbits, root_nid, inos, build_time, blocks, meta_blkaddr, xattr_blkaddr, uuid, name,
                      compat, incompat)  # fmt: skip


class Erofs:
    """An erofs image read through ``read_at(offset, n)``; ``length`` is the image size in bytes."""

    def __init__(self, read_at: Callable[[int, int], bytes], length: int) -> None:
        self._read_at = read_at
        self.length = length
        self.bytes_read = 0
        self._cache: dict[int, bytes] = {}
        self.sb = parse_superblock(self._read(0, SUPER_OFFSET + SUPERBLOCK.size))
        self.block_size = self.sb.block_size
        if self.sb.meta_blkaddr * self.block_size >= length:
            raise ErofsInvalid("erofs: the metadata area starts beyond the end of the image")

    # -- bounded reads ---------------------------------------------------------------------------

    def _read(self, offset: int, n: int) -> bytes:
        buf = read_exactly(self._read_at, offset, n, self.length, ErofsInvalid, "erofs: the image")
        self.bytes_read += n
        return buf

    def _block(self, index: int) -> bytes:
        b = self._cache.get(index)
        if b is None:
            if len(self._cache) >= CACHE_BLOCKS:
                self._cache.clear()
            bs = self.block_size
            b = self._read(index * bs, min(bs, self.length - index * bs))
            self._cache[index] = b
        return b

    def read_meta(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` through the block cache (metadata: inodes, xattrs, tails)."""
        if offset < 0 or n < 0 or offset + n > self.length:
            raise ErofsInvalid(f"erofs: metadata at offset {offset} (+{n}) lies outside the image (truncated?)")
        bs = self.block_size
        first, last = offset // bs, (offset + n - 1) // bs if n else offset // bs
        if first == last:
            b = self._block(first)
            return b[offset - first * bs:offset - first * bs + n]
        return b"".join(self._block(i) for i in range(first, last + 1))[offset - first * bs:][:n]

    # -- inodes ----------------------------------------------------------------------------------

    def inode(self, nid: int) -> Inode:
        bs = self.block_size
        off = self.sb.meta_blkaddr * bs + nid * SLOT
        pos = off % bs
        if off + EXTENDED.size <= self.length and pos + EXTENDED.size <= bs:  # the usual case: one block
            head = self._block(off // bs)[pos:pos + EXTENDED.size]
        else:
            head = self.read_meta(off, COMPACT.size)
        fmt = head[0] | head[1] << 8
        extended = fmt & 1
        layout = (fmt >> 1) & 0x7
        if fmt >> 4:
            raise ErofsUnsupported(f"erofs: inode {nid} uses unknown format bits {fmt:#x}")
        if extended:
            if len(head) < EXTENDED.size:
                head = self.read_meta(off, EXTENDED.size)
            (_f, xcount, mode, _r, size, i_u, _ino, uid, gid, mtime, _ns, nlink, _r2) = EXTENDED.unpack_from(head)
            isize = EXTENDED.size
        else:
            (_f, xcount, mode, nlink, size, _r, i_u, _ino, uid, gid, _r2) = COMPACT.unpack_from(head)
            mtime, isize = self.sb.build_time, COMPACT.size
        xsize = 0 if xcount == 0 else XATTR_IBODY_HEADER + (xcount - 1) * 4
        if xsize > MAX_XATTR_BYTES:
            raise ErofsInvalid(f"erofs: inode {nid} declares {xsize} bytes of xattrs")
        shared: tuple[int, ...] = ()
        if xsize:
            xh = self.read_meta(off + isize, xsize)
            count = xh[4]
            if XATTR_IBODY_HEADER + 4 * count > xsize:
                raise ErofsInvalid(f"erofs: inode {nid}: {count} shared xattrs do not fit its xattr area")
            shared = struct.unpack_from(f"<{count}I", xh, XATTR_IBODY_HEADER)
        kind = mode & 0o170000  # S_IFMT
        ftype = _TYPE_OF_MODE.get(kind)
        if ftype is None:
            raise ErofsInvalid(f"erofs: inode {nid} has an unknown file type (mode {mode:#o})")
        body = off + isize + xsize  # inline tail or chunk indexes start here
        rdev = 0
        extents: tuple[Extent, ...] = ()
        meta_len = isize + xsize
        if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            rdev = i_u if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
            size = 0
        elif layout in (LAYOUT_COMPRESSED_FULL, LAYOUT_COMPRESSED_COMPACT):
            raise ErofsUnsupported(f"erofs: inode {nid} is compressed (compressed images are not supported)")
        elif layout == LAYOUT_FLAT_PLAIN:
            extents = self._plain(nid, i_u, size)
        elif layout == LAYOUT_FLAT_INLINE:
            full = size // bs * bs
            tail = size - full
            if tail and body // bs != (body + tail - 1) // bs:
                raise ErofsInvalid(f"erofs: inode {nid}: its inline data crosses a block boundary")
            extents = self._plain(nid, i_u, full) + ((Extent(body, tail),) if tail else ())
            meta_len += tail
            if body + tail > self.length:
                raise ErofsInvalid(f"erofs: inode {nid}: its inline data runs past the image")
        elif layout == LAYOUT_CHUNK_BASED:
            extents, idx_len = self._chunks(nid, i_u & 0xFFFF, size, body)
            meta_len = body + idx_len - off
        else:
            raise ErofsUnsupported(f"erofs: inode {nid} uses unknown data layout {layout}")
        return Inode(nid, mode, uid, gid, size, mtime, nlink, rdev, layout, off, meta_len, shared, xsize, extents,
                     ftype)  # fmt: skip

    def _plain(self, nid: int, blkaddr: int, size: int) -> tuple[Extent, ...]:
        if size == 0:
            return ()
        bs = self.block_size
        start = blkaddr * bs
        if start + size > self.length:
            raise ErofsInvalid(f"erofs: inode {nid}: {size} bytes at block {blkaddr} run past the image")
        return (Extent(start, size),)

    def _chunks(self, nid: int, fmt: int, size: int, body: int) -> tuple[tuple[Extent, ...], int]:
        bs = self.block_size
        bits = fmt & CHUNK_BLKBITS_MASK
        if fmt & ~(CHUNK_BLKBITS_MASK | CHUNK_INDEXES) or bits > 31:
            raise ErofsInvalid(f"erofs: inode {nid}: bad chunk format {fmt:#x}")
        chunk = bs << bits
        count = -(-size // chunk)
        if fmt & CHUNK_INDEXES:
            start, width = (body + 7) // 8 * 8, 8  # erofs_inode_chunk_index: advise, device_id, blkaddr
        else:
            start, width = body, 4  # a plain block map of le32 addresses
        if start + count * width > self.length:
            raise ErofsInvalid(f"erofs: inode {nid}: its chunk table of {count} entries runs past the image")
        table = self.read_meta(start, count * width) if count else b""
        out: list[Extent] = []
        for i in range(count):
            if width == 8:
                _advise, dev, addr = struct.unpack_from("<HHI", table, i * 8)
                if dev:
                    raise ErofsUnsupported(f"erofs: inode {nid} has data on an extra device")
            else:
                addr = struct.unpack_from("<I", table, i * 4)[0]
            n = min(chunk, size - i * chunk)
            if addr == NULL_ADDR:
                out.append(Extent(None, n))
                continue
            if addr * bs + n > self.length:
                raise ErofsInvalid(f"erofs: inode {nid}: chunk {i} at block {addr} runs past the image")
            if out and out[-1].offset is not None and out[-1].offset + out[-1].length == addr * bs:
                out[-1] = Extent(out[-1].offset, out[-1].length + n)  # contiguous: one extent
            else:
                out.append(Extent(addr * bs, n))
        return tuple(out), start + count * width - body

    # -- data ------------------------------------------------------------------------------------

    def read_data(self, ino: Inode, limit: int) -> bytes:
        """The file's bytes (at most ``limit``; ErofsInvalid beyond)."""
        if ino.size > limit:
            raise ErofsInvalid(f"erofs: inode {ino.nid} has {ino.size} bytes, more than the limit of {limit}")
        return b"".join(self.iter_data(ino))

    def iter_data(self, ino: Inode, chunk: int = 1 << 20) -> Iterator[bytes]:
        for e in ino.extents:
            done = 0
            while done < e.length:
                n = min(chunk, e.length - done)
                yield bytes(n) if e.offset is None else self._read(e.offset + done, n)
                done += n

    def readlink(self, ino: Inode) -> bytes:
        if ino.size > MAX_SYMLINK:
            raise ErofsInvalid(f"erofs: symlink inode {ino.nid} has a {ino.size}-byte target")
        return b"".join(self.read_meta(e.offset, e.length) if e.offset is not None else bytes(e.length)
                        for e in ino.extents)  # fmt: skip

    def xattrs(self, ino: Inode) -> tuple[tuple[str, bytes], ...]:
        """Name/value pairs, sorted by name: shared ones, then those in the inode."""
        out: dict[str, bytes] = {}
        for xid in ino.shared_xattrs:
            name, value, _ = self._xattr_entry(self.sb.xattr_blkaddr * self.block_size + xid * 4, ino.nid)
            out[name] = value
        xcount_off = ino.meta_offset + 2
        xcount = struct.unpack("<H", self.read_meta(xcount_off, 2))[0]
        if xcount:
            isize = EXTENDED.size if self.read_meta(ino.meta_offset, 1)[0] & 1 else COMPACT.size
            start = ino.meta_offset + isize + XATTR_IBODY_HEADER + 4 * len(ino.shared_xattrs)
            end = ino.meta_offset + isize + XATTR_IBODY_HEADER + (xcount - 1) * 4
            pos = start
            while pos + XATTR_ENTRY.size <= end:
                name, value, length = self._xattr_entry(pos, ino.nid, end)
                out[name] = value
                pos += length
        return tuple(sorted(out.items()))

    def _xattr_entry(self, off: int, nid: int, end: int | None = None) -> tuple[str, bytes, int]:
        name_len, index, value_size = XATTR_ENTRY.unpack(self.read_meta(off, XATTR_ENTRY.size))
        length = (XATTR_ENTRY.size + name_len + value_size + 3) // 4 * 4
        if end is not None and off + length > end:
            raise ErofsInvalid(f"erofs: inode {nid}: an xattr runs past its xattr area")
        if index & 0x80:
            raise ErofsUnsupported("erofs: long xattr name prefixes are not supported")
        prefix = XATTR_PREFIXES.get(index)
        if prefix is None:
            raise ErofsInvalid(f"erofs: inode {nid}: unknown xattr name index {index}")
        raw = self.read_meta(off + XATTR_ENTRY.size, name_len + value_size)
        name = prefix + raw[:name_len].decode("utf-8", "surrogateescape")
        return name, raw[name_len:], length

    # -- directories -----------------------------------------------------------------------------

    def dirents(self, ino: Inode) -> Iterator[tuple[bytes, int, int]]:
        """(name, nid, file type) of each entry, "." and ".." left out, in on-disk (sorted) order."""
        if ino.size > MAX_DIR_BYTES:
            raise ErofsInvalid(f"erofs: directory inode {ino.nid} has {ino.size} bytes")
        data = self.read_data(ino, MAX_DIR_BYTES)
        bs = self.block_size
        for start in range(0, len(data), bs):
            block = data[start:start + bs]
            if len(block) < DIRENT.size:
                raise ErofsInvalid(f"erofs: directory inode {ino.nid}: a directory block is too short")
            first_off = DIRENT.unpack_from(block, 0)[1]
            count = first_off // DIRENT.size
            if first_off % DIRENT.size or count == 0 or first_off > len(block):
                raise ErofsInvalid(f"erofs: directory inode {ino.nid}: bad entry table")
            ents = [DIRENT.unpack_from(block, i * DIRENT.size) for i in range(count)]
            for i, (nid, nameoff, ftype, _r) in enumerate(ents):
                end = ents[i + 1][1] if i + 1 < count else len(block)
                if not first_off <= nameoff < end <= len(block):
                    raise ErofsInvalid(f"erofs: directory inode {ino.nid}: entry {i} has a bad name offset")
                name = block[nameoff:end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]  # the last name runs to the block's end or a NUL
                if not name or len(name) > MAX_NAME or b"/" in name or b"\0" in name:
                    raise ErofsInvalid(f"erofs: directory inode {ino.nid}: invalid entry name {name[:64]!r}")
                if name in (b".", b".."):
                    continue
                yield name, nid, ftype

    def root(self) -> Inode:
        root = self.inode(self.sb.root_nid)
        if root.type != "directory":
            raise ErofsInvalid("erofs: the root inode is not a directory")
        return root

    def children(self, d: Inode, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
        """(name, inode) of each entry of directory ``d`` (whose path is ``prefix``), checking
        that the entry's file type agrees with its inode."""
        for name, nid, ftype in self.dirents(d):
            ino = self.inode(nid)
            if ftype in FT_NAMES and FT_NAMES[ftype] != ino.type:
                raise ErofsInvalid(f"erofs: {(prefix + name)[:200]!r}: the directory says {FT_NAMES[ftype]}, "
                                   f"the inode is a {ino.type}")  # fmt: skip
            yield name, ino

    def walk(self, known: Callable[[bytes, Inode], Iterable[tuple[bytes, Inode]] | None] | None = None,
             ) -> Iterator[tuple[bytes, bytes, Inode]]:  # fmt: skip
        """Every entry below the root as (parent path with a trailing "/" or b"", name, inode),
        directory by directory, each in on-disk (sorted) order.

        ``known(prefix, dir_inode)`` may return a directory's (name, inode) pairs when the caller
        already knows them (from an identical directory elsewhere); None reads them here.
        Raises ErofsInvalid on a directory reached twice (a loop or a hard-linked directory), more
        than MAX_ENTRIES entries or a tree deeper than MAX_DEPTH.
        """

        def children(prefix: bytes, d: Inode) -> Iterable[tuple[bytes, Inode]]:
            entries = known(prefix, d) if known is not None else None
            return self.children(d, prefix) if entries is None else entries

        return walk_tree(self.root(), children, lambda ino: ino.nid, ErofsInvalid, "erofs", MAX_ENTRIES, MAX_DEPTH)

    def meta_blocks(self, ino: Inode) -> range:
        """The blocks holding the inode itself, its inline xattrs and inline tail or chunk table."""
        bs = self.block_size
        return range(ino.meta_offset // bs, (ino.meta_offset + max(ino.meta_length, 1) - 1) // bs + 1)

    def blocks_of(self, ino: Inode) -> Iterator[int]:
        """Every image block whose bytes this inode's content or metadata depends on."""
        bs = self.block_size
        yield from self.meta_blocks(ino)
        base = self.sb.xattr_blkaddr * bs
        for xid in ino.shared_xattrs:
            off = base + xid * 4  # a shared xattr entry may span blocks: all of them count
            name_len, _index, value_size = XATTR_ENTRY.unpack(self.read_meta(off, XATTR_ENTRY.size))
            yield from range(off // bs, (off + XATTR_ENTRY.size + name_len + value_size - 1) // bs + 1)
        for e in ino.extents:
            if e.offset is not None and e.length:
                yield from range(e.offset // bs, (e.offset + e.length - 1) // bs + 1)
