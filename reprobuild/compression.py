"""Deterministic compressed streams: the same bytes in give the same bytes out with the same
compression library, whoever writes them and whenever.

* gzip (RFC 1952): one member with fixed header fields — no file name, MTIME 0, XFL 0, OS 255
  ("unknown") — and raw deflate at zlib level 6, the CRC-32 and length trailer after it;
* xz (the .xz file format of XZ Utils): one stream of 24 MiB Blocks, LZMA2 at preset 6 with a
  CRC64 check, as ``xz -6 -T0`` lays it out: the Blocks are compressed side by side, each on its
  own, so the bytes are the same for any number of threads (not the bytes of one-threaded
  ``xz -6``, which writes one Block);
* zstd (RFC 8878): one frame at a fixed level with its checksum and without the content size,
  one thread.

Each writer takes ``write(data)`` calls and ``close()``, which writes the trailer but does not
close the file below.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Protocol

import zstandard

from reprobuild.debian.xzblocks import (
    STREAM_FOOTER_SIZE,
    STREAM_HEADER_SIZE,
    block_stream_head,
    read_varint,
    stream_tail,
)

GZIP_LEVEL = 6
XZ_PRESET = 6
XZ_BLOCK = 24 << 20  # 3 × preset 6's dictionary: what xz -T uses
ZSTD_LEVEL = 9

# Suffixes as the compressors' own tools write them (gzip(1), xz(1), zstd(1)).
SUFFIXES = {"none": "", "gzip": ".gz", "xz": ".xz", "zstd": ".zst"}
COMPRESSIONS = tuple(SUFFIXES)


class Writer(Protocol):
    def write(self, data: bytes) -> int: ...

    def close(self) -> None: ...


class GzipWriter:
    """One gzip member with fixed header fields (see the module docstring)."""

    HEADER = b"\x1f\x8b\x08\x00" + b"\0\0\0\0" + b"\x00\xff"  # magic, deflate, no flags, MTIME 0, XFL 0, OS 255

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.crc, self.isize = 0, 0
        self.comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        out.write(self.HEADER)

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.isize += len(data)
        if chunk := self.comp.compress(data):
            self.out.write(chunk)
        return len(data)

    def close(self) -> None:
        self.out.write(self.comp.flush())
        self.out.write(struct.pack("<II", self.crc & 0xFFFFFFFF, self.isize & 0xFFFFFFFF))


def _xz_block(chunk: bytes) -> tuple[bytes, tuple[int, int]]:
    """``chunk`` as one .xz Block (header, LZMA2 data, padding, CRC64 check) and its Index record
    (Unpadded Size, Uncompressed Size), cut out of the one-block stream liblzma makes of it."""
    stream = lzma.compress(chunk, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    backward = struct.unpack_from("<I", stream, len(stream) - 8)[0]
    index = stream[len(stream) - STREAM_FOOTER_SIZE - (backward + 1) * 4:len(stream) - STREAM_FOOTER_SIZE]
    count, pos = read_varint(index, 1, len(index))
    unpadded, pos = read_varint(index, pos, len(index))
    size, _ = read_varint(index, pos, len(index))
    if index[0] != 0 or count != 1 or size != len(chunk):
        raise AssertionError("liblzma made more than one block of one chunk")
    return stream[STREAM_HEADER_SIZE:len(stream) - STREAM_FOOTER_SIZE - len(index)], (unpadded, size)


class XzWriter:
    """One .xz stream of Blocks of :data:`XZ_BLOCK` bytes each (see the module docstring),
    compressed side by side by ``workers`` threads (liblzma releases the GIL). The bytes do not
    depend on the number of threads: each Block is compressed on its own, and the Blocks are
    written in order, with the Index of their sizes and the Stream Footer after them (the .xz
    file format, sections 2 to 4)."""

    FLAGS = b"\x00" + bytes([lzma.CHECK_CRC64])

    def __init__(self, out: BinaryIO, workers: int = 0, block: int = XZ_BLOCK) -> None:
        self.out, self.block, self.workers = out, block, workers or xz_workers()
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="xz")
        self.pending: deque[Future[tuple[bytes, tuple[int, int]]]] = deque()
        self.buffer = bytearray()
        self.records: list[tuple[int, int]] = []
        out.write(block_stream_head(self.FLAGS))

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) >= self.block:
            self._submit(bytes(self.buffer[:self.block]))
            del self.buffer[:self.block]
        return len(data)

    def _submit(self, chunk: bytes) -> None:
        self.pending.append(self.pool.submit(_xz_block, chunk))
        while len(self.pending) > self.workers:  # at most one block waiting per thread
            self._write_next()

    def _write_next(self) -> None:
        block, record = self.pending.popleft().result()
        self.out.write(block)
        self.records.append(record)

    def close(self) -> None:
        try:
            if self.buffer:  # no data at all: no Block (what xz writes for an empty file)
                self._submit(bytes(self.buffer))
                self.buffer.clear()
            while self.pending:
                self._write_next()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.out.write(stream_tail(self.FLAGS, self.records))


def xz_workers() -> int:
    """Threads for :class:`XzWriter`: the cores, at most 4 (each holds ≈ 130 MiB at preset 6)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


class ZstdWriter:
    """One zstd frame (see the module docstring)."""

    def __init__(self, out: BinaryIO) -> None:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=False, threads=0)
        self.stream = cctx.stream_writer(out, closefd=False)

    def write(self, data: bytes) -> int:
        self.stream.write(data)
        return len(data)

    def close(self) -> None:
        self.stream.close()


class _Plain:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def write(self, data: bytes) -> int:
        self.out.write(data)
        return len(data)

    def close(self) -> None:
        pass


_WRITERS: dict[str, type[GzipWriter | XzWriter | ZstdWriter | _Plain]] = {
    "none": _Plain, "gzip": GzipWriter, "xz": XzWriter, "zstd": ZstdWriter,
}


def compressing_writer(out: BinaryIO, compression: str) -> Writer:
    """A writer that compresses into ``out`` with ``compression`` (one of :data:`COMPRESSIONS`);
    ValueError for any other name."""
    try:
        return _WRITERS[compression](out)
    except KeyError:
        raise ValueError(f"unknown compression {compression!r}; expected one of: {', '.join(COMPRESSIONS)}") from None
