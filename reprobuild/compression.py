"""Deterministic compressed streams: the same bytes in give the same bytes out with the same
compression library, whoever writes them and whenever.

* gzip (RFC 1952): one member with fixed header fields — no file name, MTIME 0, XFL 0, OS 255
  ("unknown") — and raw deflate at zlib level 6, the CRC-32 and length trailer after it;
* xz (the .xz file format of XZ Utils): one stream, one block, LZMA2 at a fixed preset with a
  CRC64 check, as ``xz -6`` writes it but without threads (a threaded encoder splits the input
  into blocks, which changes the bytes);
* zstd (RFC 8878): one frame at a fixed level with its checksum and without the content size,
  one thread.

Each writer takes ``write(data)`` calls and ``close()``, which writes the trailer but does not
close the file below.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from typing import BinaryIO, Protocol

import zstandard

GZIP_LEVEL = 6
XZ_PRESET = 6
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


class XzWriter:
    """One .xz stream (see the module docstring)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)

    def write(self, data: bytes) -> int:
        if chunk := self.comp.compress(data):
            self.out.write(chunk)
        return len(data)

    def close(self) -> None:
        self.out.write(self.comp.flush())


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
