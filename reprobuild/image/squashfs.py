"""A read-only squashfs 4.0 reader in pure Python: superblock, inodes, directories, data, xattrs.

docs/formats.md §14 describes the on-disk format this follows (from the Linux kernel's
Documentation/filesystems/squashfs.rst and fs/squashfs/squashfs_fs.h). Supported: every inode
type, basic and extended; data and metadata compressed with gzip (zlib), lzma, xz or zstd, or
stored; fragments; sparse blocks; the id, fragment and xattr tables (out-of-line values too).
``mksquashfs`` writes this with any option; `reprobuild.image.fs` uses ``-comp zstd -xattrs``.
lzo and lz4 (no decoder in the standard library or our dependencies) raise `SquashfsUnsupported`
(a clear message; callers fall back to ``unsquashfs``).

Hostile input: every read is checked against the image (and ``bytes_used``) before it is made,
every decompression is bounded by the size the format allows (8 KiB of metadata, one block of
data), names and targets are bounded, a directory's entries must agree with their inodes and be
unique, directories must form a tree (a directory reached twice is an error), the walk stops at
`MAX_ENTRIES` entries and `MAX_DEPTH` levels, and the caches are bounded. A malformed image
raises `SquashfsInvalid` (a `FormatError`) naming what is wrong.

I/O: the caller passes ``read_at(offset, n)``; `bytes_read` counts what was asked for.
"""

from __future__ import annotations

import lzma
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import zstandard

from reprobuild.errors import FormatError
from reprobuild.image.fsread import read_exactly, walk_tree

MAGIC = 0x73717368  # "hsqs"
# squashfs_super_block (96 bytes at 0): s_magic, inodes, mkfs_time, block_size, fragments,
# compression, block_log, flags, no_ids, s_major, s_minor, root_inode, bytes_used, id_table_start,
# xattr_id_table_start, inode_table_start, directory_table_start, fragment_table_start,
# lookup_table_start.
SUPERBLOCK = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")
assert SUPERBLOCK.size == 96
BASE_INODE = struct.Struct("<HHHHII")  # inode_type, mode, uid index, gid index, mtime, inode_number
DIR = struct.Struct("<IIHHI")  # start_block, nlink, file_size, offset, parent_inode
LDIR = struct.Struct("<IIIIHHI")  # nlink, file_size, start_block, parent_inode, i_count, offset, xattr
REG = struct.Struct("<IIII")  # start_block, fragment, offset, file_size
LREG = struct.Struct("<QQQIIII")  # start_block, file_size, sparse, nlink, fragment, offset, xattr
DIR_HEADER = struct.Struct("<III")  # count - 1, start_block, inode_number
DIR_ENTRY = struct.Struct("<HhHH")  # offset, inode_number delta, type, size - 1
FRAGMENT_ENTRY = struct.Struct("<QII")  # start_block, size, unused
XATTR_ID = struct.Struct("<QII")  # xattr (ref), count, size
XATTR_ID_TABLE = struct.Struct("<QII")  # xattr_table_start, xattr_ids, unused

META_SIZE = 8192  # uncompressed bytes of one metadata block
META_UNCOMPRESSED = 0x8000  # bit 15 of a metadata block's 2-byte header
DATA_UNCOMPRESSED = 1 << 24  # bit 24 of a data block's size word
NO_FRAGMENT = 0xFFFFFFFF
NO_XATTR = 0xFFFFFFFF
NO_TABLE = 0xFFFFFFFFFFFFFFFF

COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
SUPPORTED = {"gzip", "lzma", "xz", "zstd"}
XATTR_PREFIXES = {0: "user.", 1: "trusted.", 2: "security."}
XATTR_VALUE_OOL = 0x100

# inode_type -> (file type, extended?). Directory entries carry the basic type (1..7).
_TYPES = {1: "directory", 2: "file", 3: "symlink", 4: "block-device", 5: "char-device", 6: "fifo", 7: "socket"}
_IFMT = {"directory": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "block-device": stat.S_IFBLK,
         "char-device": stat.S_IFCHR, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}  # fmt: skip

# Bounds for hostile images. No real root file system comes near them.
MAX_ENTRIES = 2_000_000
MAX_DEPTH = 1024
MAX_NAME = 256  # squashfs allows 256 (SQUASHFS_NAME_LEN)
MAX_SYMLINK = 4096
MAX_DIR_BYTES = 64 << 20
MAX_BLOCK_LIST = 64 << 20  # bytes of one file's block list (16 M blocks)
MAX_XATTR_BYTES = 64 * 1024
MAX_XATTRS = 4096  # entries on one inode
CACHE_META = 4096  # decompressed metadata blocks kept (32 MiB)
CACHE_FRAGMENT_BYTES = 32 << 20  # decompressed fragment blocks kept (counted at the block size)


class SquashfsInvalid(FormatError):
    """The squashfs image is malformed (or truncated)."""


class SquashfsUnsupported(FormatError):
    """A valid squashfs this reader does not read (lzo or lz4 compression, another version)."""


@dataclass(frozen=True)
class Superblock:
    inodes: int
    mkfs_time: int
    block_size: int
    fragments: int
    compression: str
    flags: int
    ids: int
    root_inode: int
    bytes_used: int
    id_table: int
    xattr_id_table: int
    inode_table: int
    directory_table: int
    fragment_table: int


class Block(NamedTuple):
    """One data block: ``stored`` bytes at byte ``offset`` of the image (0: a sparse block of
    zeros), holding ``length`` bytes of the file; ``compressed`` as stored."""

    offset: int
    stored: int
    compressed: bool
    length: int


class Inode(NamedTuple):
    ref: int  # (metadata block << 16) | offset in the inode table: the inode's identity
    number: int
    type: str  # "file", "directory", "symlink", "char-device", "block-device", "fifo", "socket"
    mode: int  # type and permission bits
    uid: int
    gid: int
    mtime: int
    nlink: int
    size: int  # file bytes; 0 for other types
    rdev: int  # encoded (new_encode_dev) for devices, else 0
    xattr: int  # index in the xattr id table, or NO_XATTR
    blocks: tuple[Block, ...]  # a file's full blocks (and a short last one when it has no fragment)
    fragment: tuple[int, int, int] | None  # (fragment index, offset in it, tail length)
    target: bytes  # a symlink's target
    listing: tuple[int, int, int]  # a directory's (start block, offset, bytes) in the directory table

    @property
    def device(self) -> tuple[int, int]:
        """(major, minor) of a device inode (Linux new_decode_dev)."""
        return (self.rdev & 0xFFF00) >> 8, (self.rdev & 0xFF) | ((self.rdev >> 12) & 0xFFF00)


def parse_superblock(buf: bytes, length: int) -> Superblock:
    """The superblock from the first 96 bytes of an image of ``length`` bytes."""
    if len(buf) < SUPERBLOCK.size:
        raise SquashfsInvalid("squashfs: the image is shorter than its superblock")
    (magic, inodes, mkfs_time, block_size, fragments, compression, block_log, flags, ids, major, minor, root,
     used, id_table, xattr_table, inode_table, dir_table, frag_table, _lookup) = SUPERBLOCK.unpack_from(buf)  # fmt: skip
    if magic != MAGIC:
        raise SquashfsInvalid("squashfs: bad superblock magic")
    if (major, minor) != (4, 0):
        raise SquashfsUnsupported(f"squashfs: version {major}.{minor} is not supported (only 4.0)")
    if not 12 <= block_log <= 20 or block_size != 1 << block_log:
        raise SquashfsInvalid(f"squashfs: block size {block_size} (log {block_log}) is invalid")
    name = COMPRESSORS.get(compression)
    if name is None:
        raise SquashfsInvalid(f"squashfs: unknown compression {compression}")
    if name not in SUPPORTED:
        raise SquashfsUnsupported(f"squashfs: {name} compression is not supported")
    if used > length:
        raise SquashfsInvalid(f"squashfs: the superblock says {used} bytes, the image has {length} (truncated?)")
    for what, start in (("inode", inode_table), ("directory", dir_table), ("id", id_table)):
        if start >= used:
            raise SquashfsInvalid(f"squashfs: the {what} table starts beyond the end of the file system")
    if ids == 0:
        raise SquashfsInvalid("squashfs: the id table is empty")
    return Superblock(inodes, mkfs_time, block_size, fragments, name, flags, ids, root, used, id_table, xattr_table,
                      inode_table, dir_table, frag_table)  # fmt: skip


class Squashfs:
    """A squashfs image read through ``read_at(offset, n)``; ``length`` is the image size in bytes."""

    def __init__(self, read_at: Callable[[int, int], bytes], length: int) -> None:
        self._read_at = read_at
        self.length = length
        self.bytes_read = 0
        self._meta: dict[int, tuple[bytes, int]] = {}  # block position -> (bytes, next block's position)
        self._fragments: dict[int, bytes] = {}
        self._end = length  # until the superblock says how much of the image is the file system
        self.sb = parse_superblock(self._read(0, min(SUPERBLOCK.size, length)), length)
        self.block_size = self.sb.block_size
        self._end = self.sb.bytes_used
        self._decompress = _decompressor(self.sb.compression)
        self._ids = self._table(self.sb.id_table, self.sb.ids, 4, "id")

    # -- bounded reads ---------------------------------------------------------------------------

    def _read(self, offset: int, n: int) -> bytes:
        buf = read_exactly(self._read_at, offset, n, self._end, SquashfsInvalid, "squashfs: the file system")
        self.bytes_read += n
        return buf

    def _inflate(self, raw: bytes, limit: int, what: str) -> bytes:
        try:
            out = self._decompress(raw, limit)
        except (zlib.error, lzma.LZMAError, zstandard.ZstdError, EOFError) as e:
            raise SquashfsInvalid(f"squashfs: {what} does not decompress ({self.sb.compression}: {e})") from e
        if out is None:
            raise SquashfsInvalid(f"squashfs: {what} decompresses to more than {limit} bytes")
        return out

    def _meta_block(self, pos: int) -> tuple[bytes, int]:
        """The metadata block at byte ``pos``: its bytes and where the next one starts."""
        hit = self._meta.get(pos)
        if hit is not None:
            return hit
        (header,) = struct.unpack("<H", self._read(pos, 2))
        size = header & ~META_UNCOMPRESSED
        if size == 0 or size > META_SIZE:
            raise SquashfsInvalid(f"squashfs: the metadata block at offset {pos} has a bad length {size}")
        raw = self._read(pos + 2, size)
        data = raw if header & META_UNCOMPRESSED else self._inflate(raw, META_SIZE, f"the metadata block at {pos}")
        if len(self._meta) >= CACHE_META:
            self._meta.clear()
        self._meta[pos] = hit = (data, pos + 2 + size)
        return hit

    def _meta_read(self, table: int, block: int, offset: int, n: int) -> tuple[bytes, int, int]:
        """``n`` bytes of the metadata stream from (``block``, ``offset``) relative to ``table``,
        and the (block, offset) right after them."""
        pos = table + block
        parts = []
        need = n
        while True:
            data, nxt = self._meta_block(pos)
            if offset > len(data):
                raise SquashfsInvalid(f"squashfs: offset {offset} lies beyond the metadata block at {pos}")
            piece = data[offset:offset + need]
            parts.append(piece)
            need -= len(piece)
            offset += len(piece)
            if need == 0:
                return b"".join(parts), pos - table, offset
            pos, offset = nxt, 0

    def _table(self, start: int, count: int, width: int, what: str) -> bytes:
        """A lookup table of ``count`` entries: an array of metadata block positions at ``start``,
        each block holding 8 KiB of entries."""
        if count == 0:
            return b""
        total = count * width
        blocks = -(-total // META_SIZE)
        pointers = struct.unpack(f"<{blocks}Q", self._read(start, blocks * 8))
        out = []
        for i, p in enumerate(pointers):
            data, _ = self._meta_block(p)
            want = min(META_SIZE, total - i * META_SIZE)
            if len(data) < want:
                raise SquashfsInvalid(f"squashfs: the {what} table's block {i} is short")
            out.append(data[:want])
        return b"".join(out)

    # -- inodes ----------------------------------------------------------------------------------

    def inode(self, ref: int) -> Inode:
        block, offset = ref >> 16, ref & 0xFFFF
        if offset >= META_SIZE or block > self._end:
            raise SquashfsInvalid(f"squashfs: inode reference {ref:#x} lies outside the inode table")
        table = self.sb.inode_table

        def read(n: int) -> bytes:
            nonlocal block, offset
            buf, block, offset = self._meta_read(table, block, offset, n)
            return buf

        itype, mode, uid_i, gid_i, mtime, number = BASE_INODE.unpack(read(BASE_INODE.size))
        ftype = _TYPES.get(itype if itype <= 7 else itype - 7)
        if ftype is None or itype == 0:
            raise SquashfsInvalid(f"squashfs: inode {ref:#x} has an unknown type {itype}")
        extended = itype > 7
        uid, gid = self._id(uid_i, ref), self._id(gid_i, ref)
        nlink, size, rdev, xattr = 1, 0, 0, NO_XATTR
        blocks: tuple[Block, ...] = ()
        fragment = None
        target = b""
        listing = (0, 0, 0)
        if ftype == "directory":
            if extended:
                nlink, fsize, start, _parent, _icount, doff, xattr = LDIR.unpack(read(LDIR.size))
            else:
                start, nlink, fsize, doff, _parent = DIR.unpack(read(DIR.size))
            if fsize < 3 or fsize - 3 > MAX_DIR_BYTES or doff >= META_SIZE:
                raise SquashfsInvalid(f"squashfs: directory inode {ref:#x} has a bad listing ({fsize} bytes)")
            listing = (start, doff, fsize - 3)
        elif ftype == "file":
            if extended:
                start, size, _sparse, nlink, frag, foff, xattr = LREG.unpack(read(LREG.size))
            else:
                start, frag, foff, size = REG.unpack(read(REG.size))
            blocks, fragment = self._file_layout(ref, start, size, frag, foff, read)
        elif ftype == "symlink":
            nlink, tsize = struct.unpack("<II", read(8))
            if tsize > MAX_SYMLINK:
                raise SquashfsInvalid(f"squashfs: symlink inode {ref:#x} has a {tsize}-byte target")
            target = read(tsize)
            if extended:
                (xattr,) = struct.unpack("<I", read(4))
        elif ftype.endswith("device"):
            nlink, rdev = struct.unpack("<II", read(8))
            if extended:
                (xattr,) = struct.unpack("<I", read(4))
        else:
            (nlink,) = struct.unpack("<I", read(4))
            if extended:
                (xattr,) = struct.unpack("<I", read(4))
        return Inode(ref, number, ftype, _IFMT[ftype] | (mode & 0o7777), uid, gid, mtime, nlink, size, rdev, xattr,
                     blocks, fragment, target, listing)  # fmt: skip

    def _id(self, index: int, ref: int) -> int:
        if index >= self.sb.ids:
            raise SquashfsInvalid(f"squashfs: inode {ref:#x} names owner id {index} of {self.sb.ids}")
        return struct.unpack_from("<I", self._ids, index * 4)[0]

    def _file_layout(self, ref: int, start: int, size: int, frag: int, foff: int, read: Callable[[int], bytes],
                     ) -> tuple[tuple[Block, ...], tuple[int, int, int] | None]:  # fmt: skip
        bs = self.block_size
        count = size // bs if frag != NO_FRAGMENT else -(-size // bs)
        if count * 4 > MAX_BLOCK_LIST:
            raise SquashfsInvalid(f"squashfs: file inode {ref:#x} claims {size} bytes")
        words = struct.unpack(f"<{count}I", read(count * 4)) if count else ()
        out = []
        pos = start
        for i, w in enumerate(words):
            if w >> 25:
                raise SquashfsInvalid(f"squashfs: file inode {ref:#x}: block {i} has a bad size word {w:#x}")
            stored = w & ~DATA_UNCOMPRESSED
            length = min(bs, size - i * bs)
            if stored > bs or pos + stored > self._end:
                raise SquashfsInvalid(f"squashfs: file inode {ref:#x}: block {i} ({stored} bytes at {pos}) "
                                      "runs past the file system")  # fmt: skip
            out.append(Block(pos, stored, not w & DATA_UNCOMPRESSED, length))
            pos += stored
        fragment = None
        if frag != NO_FRAGMENT:
            tail = size % bs
            if frag >= self.sb.fragments or tail == 0 or foff >= bs:
                raise SquashfsInvalid(f"squashfs: file inode {ref:#x} has a bad fragment ({frag}, offset {foff})")
            fragment = (frag, foff, tail)
        return tuple(out), fragment

    # -- data ------------------------------------------------------------------------------------

    def iter_data(self, ino: Inode) -> Iterator[bytes]:
        """The file's bytes, block by block."""
        for b in ino.blocks:
            yield self._data_block(ino, b)
        if ino.fragment is not None:
            yield self.fragment_tail(ino)

    def read_data(self, ino: Inode, limit: int) -> bytes:
        """The file's bytes (at most ``limit``; SquashfsInvalid beyond)."""
        if ino.size > limit:
            raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x} has {ino.size} bytes, more than the limit of {limit}")
        return b"".join(self.iter_data(ino))

    def _data_block(self, ino: Inode, b: Block) -> bytes:
        if b.stored == 0:
            return bytes(b.length)  # sparse
        raw = self._read(b.offset, b.stored)
        data = self._inflate(raw, self.block_size, f"the data block at {b.offset}") if b.compressed else raw
        if len(data) != b.length:
            raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x}: the block at {b.offset} holds {len(data)} bytes, "
                                  f"not {b.length}")  # fmt: skip
        return data

    def fragment_tail(self, ino: Inode) -> bytes:
        assert ino.fragment is not None
        index, offset, tail = ino.fragment
        data = self._fragment(index)
        if offset + tail > len(data):
            raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x}: its tail runs past fragment {index}")
        return data[offset:offset + tail]

    def fragment_block(self, index: int) -> Block:
        """Where fragment block ``index`` is stored (``length`` is 0: known once decompressed)."""
        entry_at = index * FRAGMENT_ENTRY.size
        (pointer,) = struct.unpack("<Q", self._read(self.sb.fragment_table + entry_at // META_SIZE * 8, 8))
        data, _ = self._meta_block(pointer)
        if entry_at % META_SIZE + FRAGMENT_ENTRY.size > len(data):
            raise SquashfsInvalid(f"squashfs: fragment {index} lies outside the fragment table")
        start, word, _ = FRAGMENT_ENTRY.unpack_from(data, entry_at % META_SIZE)
        stored = word & ~DATA_UNCOMPRESSED
        if word >> 25 or stored == 0 or stored > self.block_size or start + stored > self._end:
            raise SquashfsInvalid(f"squashfs: fragment {index} has a bad size word {word:#x} or lies outside")
        return Block(start, stored, not word & DATA_UNCOMPRESSED, 0)

    def _fragment(self, index: int) -> bytes:
        hit = self._fragments.pop(index, None)
        if hit is None:
            b = self.fragment_block(index)
            raw = self._read(b.offset, b.stored)
            hit = self._inflate(raw, self.block_size, f"fragment {index}") if b.compressed else raw
            while self._fragments and len(self._fragments) * self.block_size >= CACHE_FRAGMENT_BYTES:
                del self._fragments[next(iter(self._fragments))]  # the least recently used
        self._fragments[index] = hit  # (re)inserted last: most recently used
        return hit

    def readlink(self, ino: Inode) -> bytes:
        return ino.target

    def xattrs(self, ino: Inode) -> tuple[tuple[str, bytes], ...]:
        """Name/value pairs, sorted by name."""
        if ino.xattr == NO_XATTR:
            return ()
        if self.sb.xattr_id_table == NO_TABLE:
            raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x} names xattrs, the image has no xattr table")
        table_start, ids, _ = XATTR_ID_TABLE.unpack(self._read(self.sb.xattr_id_table, XATTR_ID_TABLE.size))
        if ino.xattr >= ids:
            raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x} names xattr set {ino.xattr} of {ids}")
        at = ino.xattr * XATTR_ID.size
        (pointer,) = struct.unpack("<Q", self._read(self.sb.xattr_id_table + XATTR_ID_TABLE.size
                                                    + at // META_SIZE * 8, 8))  # fmt: skip
        data, _ = self._meta_block(pointer)
        if at % META_SIZE + XATTR_ID.size > len(data):
            raise SquashfsInvalid(f"squashfs: xattr set {ino.xattr} lies outside its table")
        ref, count, total = XATTR_ID.unpack_from(data, at % META_SIZE)
        if count > MAX_XATTRS or total > MAX_XATTR_BYTES:
            raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x} has {count} xattrs of {total} bytes")
        block, offset = ref >> 16, ref & 0xFFFF
        out: dict[str, bytes] = {}
        used = 0
        for _ in range(count):
            head, block, offset = self._meta_read(table_start, block, offset, 4)
            kind, name_len = struct.unpack("<HH", head)
            prefix = XATTR_PREFIXES.get(kind & 0xFF)
            if prefix is None or kind & ~(0xFF | XATTR_VALUE_OOL):
                raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x}: unknown xattr type {kind:#x}")
            name, block, offset = self._meta_read(table_start, block, offset, name_len)
            vhead, block, offset = self._meta_read(table_start, block, offset, 4)
            (vsize,) = struct.unpack("<I", vhead)
            if kind & XATTR_VALUE_OOL:
                if vsize != 8:
                    raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x}: a bad out-of-line xattr reference")
                vref, block, offset = self._meta_read(table_start, block, offset, 8)
                (where,) = struct.unpack("<Q", vref)
                vhead, vb, vo = self._meta_read(table_start, where >> 16, where & 0xFFFF, 4)
                (vsize,) = struct.unpack("<I", vhead)
                used += name_len + vsize
                if used > MAX_XATTR_BYTES:
                    raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x} has more than {MAX_XATTR_BYTES} bytes of xattrs")
                value, _, _ = self._meta_read(table_start, vb, vo, vsize)
            else:
                used += name_len + vsize
                if used > MAX_XATTR_BYTES:
                    raise SquashfsInvalid(f"squashfs: inode {ino.ref:#x} has more than {MAX_XATTR_BYTES} bytes of xattrs")
                value, block, offset = self._meta_read(table_start, block, offset, vsize)
            out[prefix + name.decode("utf-8", "surrogateescape")] = value
        return tuple(sorted(out.items()))

    # -- directories -----------------------------------------------------------------------------

    def dirents(self, ino: Inode) -> Iterator[tuple[bytes, int, str]]:
        """(name, inode reference, file type) of each entry, in on-disk (sorted) order."""
        start, offset, size = ino.listing
        if size == 0:
            return
        data, _, _ = self._meta_read(self.sb.directory_table, start, offset, size)
        pos = 0
        seen: set[bytes] = set()
        while pos < size:
            if pos + DIR_HEADER.size > size:
                raise SquashfsInvalid(f"squashfs: directory inode {ino.ref:#x}: a truncated header")
            count, iblock, _base = DIR_HEADER.unpack_from(data, pos)
            pos += DIR_HEADER.size
            if count >= 256:
                raise SquashfsInvalid(f"squashfs: directory inode {ino.ref:#x}: a header of {count + 1} entries")
            for _ in range(count + 1):
                if pos + DIR_ENTRY.size > size:
                    raise SquashfsInvalid(f"squashfs: directory inode {ino.ref:#x}: a truncated entry")
                ioff, _delta, etype, nsize = DIR_ENTRY.unpack_from(data, pos)
                pos += DIR_ENTRY.size
                name = data[pos:pos + nsize + 1]
                pos += nsize + 1
                if len(name) != nsize + 1 or nsize + 1 > MAX_NAME or b"/" in name or b"\0" in name \
                        or name in (b".", b".."):
                    raise SquashfsInvalid(f"squashfs: directory inode {ino.ref:#x}: invalid entry name {name[:64]!r}")
                ftype = _TYPES.get(etype)
                if ftype is None:
                    raise SquashfsInvalid(f"squashfs: directory inode {ino.ref:#x}: {name[:64]!r} has type {etype}")
                if name in seen:
                    raise SquashfsInvalid(f"squashfs: directory inode {ino.ref:#x}: {name[:64]!r} appears twice")
                seen.add(name)
                yield name, iblock << 16 | ioff, ftype

    def root(self) -> Inode:
        root = self.inode(self.sb.root_inode)
        if root.type != "directory":
            raise SquashfsInvalid("squashfs: the root inode is not a directory")
        return root

    def children(self, d: Inode, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
        """(name, inode) of each entry of directory ``d`` (whose path is ``prefix``), checking
        that the entry's file type agrees with its inode."""
        for name, ref, ftype in self.dirents(d):
            ino = self.inode(ref)
            if ino.type != ftype:
                raise SquashfsInvalid(f"squashfs: {(prefix + name)[:200]!r}: the directory says {ftype}, "
                                      f"the inode is a {ino.type}")  # fmt: skip
            yield name, ino

    def walk(self) -> Iterator[tuple[bytes, bytes, Inode]]:
        """Every entry below the root as (parent path with a trailing "/" or b"", name, inode),
        directory by directory, each in on-disk (sorted) order. Raises SquashfsInvalid on a
        directory reached twice, more than MAX_ENTRIES entries or a tree deeper than MAX_DEPTH."""
        return walk_tree(self.root(), lambda prefix, d: self.children(d, prefix), lambda ino: ino.ref,
                         SquashfsInvalid, "squashfs", MAX_ENTRIES, MAX_DEPTH)  # fmt: skip


def _decompressor(name: str) -> Callable[[bytes, int], bytes | None]:
    """``f(raw, limit)``: the decompressed bytes, None when they would exceed ``limit``."""
    if name == "zstd":
        zd = zstandard.ZstdDecompressor()

        def zstd(raw: bytes, limit: int) -> bytes | None:
            with zd.stream_reader(raw, read_across_frames=False) as r:
                out = r.read(limit + 1)
            return None if len(out) > limit else out

        return zstd
    if name == "gzip":
        def gzip(raw: bytes, limit: int) -> bytes | None:
            d = zlib.decompressobj()
            out = d.decompress(raw, limit + 1)
            if not d.eof and len(out) <= limit:
                raise zlib.error("the stream is truncated")
            return None if len(out) > limit else out

        return gzip
    fmt = lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE

    def xz(raw: bytes, limit: int) -> bytes | None:
        d = lzma.LZMADecompressor(format=fmt)
        out = d.decompress(raw, max_length=limit + 1)
        if not d.eof and len(out) <= limit and fmt == lzma.FORMAT_XZ:
            raise lzma.LZMAError("the stream is truncated")
        return None if len(out) > limit else out

    return xz
