"""The block structure of an .xz file, so its blocks can be decompressed side by side (pure).

An .xz stream (The .xz File Format, tukaani.org/xz/xz-file-format.txt; summary in docs/formats.md
§10) is a 12-byte Stream Header, Blocks, an Index (one record per Block) and a
12-byte Stream Footer. Each Block is compressed independently; when its Block Header states its
Compressed and Uncompressed Size (xz writes both whenever it splits the input into blocks:
``--block-size``, ``-T``), where the next Block starts and where its output goes are known as
soon as the header has arrived. Debian's Packages.xz files are made that way.

A Block is decompressed on its own by handing liblzma a one-Block stream made of it:
:func:`block_stream_head` (a Stream Header with the file's Stream Flags), the Block's bytes as
they are in the file, then :func:`block_stream_tail` (an Index with that one Block's record and a
Stream Footer). liblzma then checks all it checks in the whole file: the Block Header's CRC32,
the filter chain, the stated sizes against the data, and the Block's integrity check.

:class:`BlockSplitter` finds the Blocks in the bytes of a file as they arrive; once all have
arrived, :func:`check_index` checks the file's Index and Stream Footer against them. Anything
this module does not handle (a Block Header without sizes, several streams, stream padding, an
unsupported check) is reported as :class:`NotSplittable`, and the caller decompresses the whole
file with one ordinary decoder instead, which also gives the error for a damaged file.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
STREAM_HEADER_SIZE = 12
STREAM_FOOTER_SIZE = 12
# Integrity check sizes by Check ID (spec §3.1.3 and §3.4: 0 = None, 1 = CRC32, 4 = CRC64,
# 10 = SHA-256); only those liblzma verifies are accepted.
CHECK_SIZES = {0x00: 0, 0x01: 4, 0x04: 8, 0x0A: 32}


class NotSplittable(ValueError):
    """The file is not (or not only) a stream of Blocks with stated sizes: decode it in one go."""


@dataclass(frozen=True, slots=True)
class Block:
    """One Block of an .xz stream: where it lies in the file, and where its output goes."""

    offset: int  # of its Block Header, in the file
    header_size: int
    compressed_size: int
    uncompressed_offset: int  # of its first output byte, in the decompressed file
    uncompressed_size: int
    check_size: int

    @property
    def unpadded_size(self) -> int:
        """Block Header + Compressed Data + Check: what the Index records (spec §4.3.1)."""
        return self.header_size + self.compressed_size + self.check_size

    @property
    def end(self) -> int:
        """The offset just past the Block (Block Padding aligns Compressed Data to 4 bytes)."""
        padded = self.header_size + self.compressed_size + (-self.compressed_size % 4)
        return self.offset + padded + self.check_size


def read_varint(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
    """A multibyte integer (spec §1.2: 7 bits a byte, least significant first, at most 9 bytes,
    no redundant zero byte) at ``pos``; returns (value, position after it)."""
    value = 0
    for i in range(9):
        if pos + i >= end:
            raise NotSplittable("a size field runs past its header")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise NotSplittable("a size field is not minimally encoded")
            return value, pos + i + 1
    raise NotSplittable("a size field is longer than 9 bytes")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def stream_flags(data: bytes | bytearray | memoryview) -> bytes:
    """The Stream Flags of the Stream Header at the start of ``data`` (spec §2.1.1)."""
    header = bytes(data[:STREAM_HEADER_SIZE])
    if len(header) < STREAM_HEADER_SIZE or header[:6] != HEADER_MAGIC:
        raise NotSplittable("no xz Stream Header")
    flags = header[6:8]
    if struct.unpack("<I", header[8:12])[0] != zlib.crc32(flags):
        raise NotSplittable("the Stream Header's CRC32 does not match")
    if flags[0] != 0 or flags[1] & 0xF0 or flags[1] & 0x0F not in CHECK_SIZES:
        raise NotSplittable("unsupported Stream Flags")
    return flags


def block_header_size(first_byte: int) -> int:
    """The size of a Block Header from its first byte (spec §3.1.1); 0 for the Index Indicator."""
    return 0 if first_byte == 0 else (first_byte + 1) * 4


def parse_block_header(header: bytes | bytearray | memoryview, offset: int, uncompressed_offset: int,
                       check_size: int) -> Block:  # fmt: skip
    """The :class:`Block` whose whole Block Header is ``header``, found at ``offset`` in the file.
    Raises NotSplittable when it does not state both sizes (or is malformed: the whole-file
    decoder then names the damage)."""
    size = len(header)
    if size < 8 or size != block_header_size(header[0]):
        raise NotSplittable("malformed Block Header")
    if struct.unpack("<I", bytes(header[size - 4 :]))[0] != zlib.crc32(header[: size - 4]):
        raise NotSplittable("a Block Header's CRC32 does not match")
    flags = header[1]
    if flags & 0x3C:
        raise NotSplittable("reserved Block Flags are set")
    if not (flags & 0x40 and flags & 0x80):
        raise NotSplittable("a Block Header does not state the Block's sizes")
    compressed, pos = read_varint(header, 2, size - 4)
    uncompressed, _ = read_varint(header, pos, size - 4)
    if compressed == 0:
        raise NotSplittable("a Block states a Compressed Size of 0")
    return Block(offset, size, compressed, uncompressed_offset, uncompressed, check_size)


class BlockSplitter:
    """Finds the Blocks of a single-stream .xz file in its bytes as they arrive.

    Call :meth:`advance` with the bytes received so far (the same growing buffer each time) and
    how many there are; it returns the Blocks whose headers became complete. Once it has seen
    the Index Indicator, ``index_offset`` is set. Raises NotSplittable (see the module doc)."""

    def __init__(self) -> None:
        self.flags: bytes | None = None
        self.check_size = 0
        self.blocks: list[Block] = []
        self.index_offset: int | None = None
        self._next = STREAM_HEADER_SIZE  # where the next Block Header (or the Index) starts
        self._uncompressed = 0

    def advance(self, data: bytes | bytearray | memoryview, available: int) -> list[Block]:
        found: list[Block] = []
        if self.flags is None:
            if available < STREAM_HEADER_SIZE:
                return found
            self.flags = stream_flags(data)
            self.check_size = CHECK_SIZES[self.flags[1] & 0x0F]
        while self.index_offset is None and self._next < available:
            size = block_header_size(data[self._next])
            if size == 0:
                self.index_offset = self._next
                break
            if self._next + size > available:
                break
            block = parse_block_header(data[self._next : self._next + size], self._next, self._uncompressed,
                                       self.check_size)  # fmt: skip
            self.blocks.append(block)
            found.append(block)
            self._next = block.end
            self._uncompressed += block.uncompressed_size
        return found


def check_index(data: bytes | bytearray | memoryview, splitter: BlockSplitter) -> None:
    """Check that ``data`` (the whole file) ends with an Index listing exactly ``splitter``'s
    Blocks and a Stream Footer matching the Stream Header (spec §4, §2.1.2), and nothing else:
    the Blocks decoded are then the whole content. Raises NotSplittable otherwise."""
    start = splitter.index_offset
    if start is None or splitter.flags is None or not splitter.blocks:
        raise NotSplittable("no Index after the Blocks")
    end = len(data)
    if end - start < 8 + STREAM_FOOTER_SIZE:
        raise NotSplittable("the file ends before its Index and Stream Footer")
    footer = bytes(data[end - STREAM_FOOTER_SIZE :])
    if footer[10:] != FOOTER_MAGIC or footer[8:10] != splitter.flags:
        raise NotSplittable("no Stream Footer matching the Stream Header at the end (padding, several streams?)")
    if struct.unpack("<I", footer[:4])[0] != zlib.crc32(footer[4:10]):
        raise NotSplittable("the Stream Footer's CRC32 does not match")
    index_size = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
    if start + index_size != end - STREAM_FOOTER_SIZE:
        raise NotSplittable("the Index is not where the Stream Footer says")
    index = bytes(data[start : start + index_size])
    if struct.unpack("<I", index[-4:])[0] != zlib.crc32(index[:-4]):
        raise NotSplittable("the Index's CRC32 does not match")
    count, pos = read_varint(index, 1, index_size - 4)
    if count != len(splitter.blocks):
        raise NotSplittable(f"the Index lists {count} Blocks, the file holds {len(splitter.blocks)}")
    for block in splitter.blocks:
        unpadded, pos = read_varint(index, pos, index_size - 4)
        uncompressed, pos = read_varint(index, pos, index_size - 4)
        if (unpadded, uncompressed) != (block.unpadded_size, block.uncompressed_size):
            raise NotSplittable("an Index record does not match its Block")
    if any(index[pos : index_size - 4]) or (index_size - 4 - pos) >= 4:
        raise NotSplittable("malformed Index Padding")


def block_stream_head(flags: bytes) -> bytes:
    """The Stream Header of a one-Block stream with the file's Stream ``flags``."""
    return HEADER_MAGIC + flags + struct.pack("<I", zlib.crc32(flags))


def block_stream_tail(flags: bytes, block: Block) -> bytes:
    """What follows ``block`` in a one-Block stream: its Index (one record) and Stream Footer."""
    return stream_tail(flags, [(block.unpadded_size, block.uncompressed_size)])


def stream_tail(flags: bytes, records: Sequence[tuple[int, int]]) -> bytes:
    """The Index of Blocks with these (Unpadded Size, Uncompressed Size) ``records`` and the
    Stream Footer after it (spec §4 and §2.1.2)."""
    index = bytearray(b"\x00" + encode_varint(len(records)))
    for unpadded, uncompressed in records:
        index += encode_varint(unpadded) + encode_varint(uncompressed)
    index += b"\x00" * (-len(index) % 4)
    index += struct.pack("<I", zlib.crc32(index))
    backward = struct.pack("<I", len(index) // 4 - 1)
    return bytes(index) + struct.pack("<I", zlib.crc32(backward + flags)) + backward + flags + FOOTER_MAGIC
