"""Byte sources for the diff: a whole file, a byte range of a file (a partition), or bytes in memory.

Everything the diff reads goes through :class:`ByteSource`, so reads are bounded and streamed:
`same_bytes` compares two sources in 1 MiB chunks and stops at the first difference, `sha256`
streams, `read` refuses to load more than a caller-given limit. A partition is never copied
unless an external tool needs it as a file (`as_file`).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from reprobuild.errors import FormatError

CHUNK = 1 << 20


class TooLarge(FormatError):
    """A member is larger than the limit for loading it into memory."""


@dataclass(frozen=True)
class ByteSource:
    """``length`` bytes at ``offset`` of the file ``path``, or ``data`` in memory (then path is None)."""

    path: Path | None
    offset: int
    length: int
    data: bytes | None = field(default=None, repr=False)

    @classmethod
    def of_file(cls, path: Path) -> ByteSource:
        return cls(path, 0, os.path.getsize(path))

    @classmethod
    def of_bytes(cls, data: bytes) -> ByteSource:
        return cls(None, 0, len(data), data)

    def slice(self, offset: int, length: int) -> ByteSource:
        """A sub-range; raises FormatError if it runs past this source (hostile sizes)."""
        if offset < 0 or length < 0 or offset + length > self.length:
            raise FormatError(f"range {offset}+{length} lies outside a {self.length}-byte object (truncated?)")
        if self.data is not None:
            return ByteSource.of_bytes(self.data[offset:offset + length])
        return ByteSource(self.path, self.offset + offset, length)

    @property
    def is_whole_file(self) -> bool:
        return self.path is not None and self.offset == 0 and self.length == os.path.getsize(self.path)

    def open(self) -> BinaryIO:
        """A seekable, buffered reader over exactly this range."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return io.BufferedReader(_Window(self.path, self.offset, self.length), CHUNK)  # type: ignore[arg-type]

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        if self.data is not None:
            for i in range(0, len(self.data), size):
                yield self.data[i:i + size]
            return
        assert self.path is not None
        with open(self.path, "rb", buffering=0) as f:
            pos, end = self.offset, self.offset + self.length
            while pos < end:
                buf = os.pread(f.fileno(), min(size, end - pos), pos)
                if not buf:
                    raise FormatError(f"{self.path}: file ended {end - pos} bytes early (truncated?)")
                yield buf
                pos += len(buf)

    def head(self, n: int) -> bytes:
        """The first ``min(n, length)`` bytes."""
        n = min(n, self.length)
        if self.data is not None:
            return self.data[:n]
        assert self.path is not None
        with open(self.path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), n, self.offset)

    def read(self, limit: int) -> bytes:
        """All bytes, if there are at most ``limit``; TooLarge otherwise (checked before allocating)."""
        if self.length > limit:
            raise TooLarge(f"{self.length} bytes exceed the in-memory limit of {limit}")
        if self.data is not None:
            return self.data
        return b"".join(self.chunks())

    def sha256(self) -> str:
        """Streaming sha256 hex digest. Cost: one read of the range."""
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return h.hexdigest()

    def as_file(self, tmp: Path, name: str) -> Path:
        """A path holding exactly these bytes: the file itself when whole, else a copy under ``tmp``."""
        if self.data is None and self.is_whole_file:
            assert self.path is not None
            return self.path
        out = tmp / name
        with open(out, "wb") as f:
            if self.data is not None:
                f.write(self.data)
            else:
                assert self.path is not None
                with open(self.path, "rb") as src:
                    src.seek(self.offset)
                    _copy_n(src, f, self.length)
        return out


def _copy_n(src: BinaryIO, dst: BinaryIO, n: int) -> None:
    left = n
    while left:
        buf = src.read(min(CHUNK, left))
        if not buf:
            raise FormatError("source ended early while copying (truncated?)")
        dst.write(buf)
        left -= len(buf)


def first_difference(a: ByteSource, b: ByteSource) -> int | None:
    """Offset of the first differing byte (or of the shorter end), None if equal.

    Streams both in 1 MiB chunks and stops at the first differing chunk; equal sources cost one
    read of each, no hashing.
    """
    if a.path is not None and a.path == b.path and a.offset == b.offset and a.length == b.length:
        return None
    pos = 0
    ia, ib = a.chunks(), b.chunks()
    pa, pb = b"", b""
    while True:
        if not pa:
            pa = next(ia, b"")
        if not pb:
            pb = next(ib, b"")
        if not pa or not pb:
            return None if not pa and not pb else pos
        n = min(len(pa), len(pb))
        if pa[:n] != pb[:n]:
            for i in range(n):  # only runs once, on the differing chunk
                if pa[i] != pb[i]:
                    return pos + i
        pos += n
        pa, pb = pa[n:], pb[n:]


def same_bytes(a: ByteSource, b: ByteSource) -> bool:
    """Sizes first, then a chunked compare that stops at the first difference."""
    return a.length == b.length and first_difference(a, b) is None


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``offset`` of a file (pread, no shared position)."""

    def __init__(self, path: Path | None, offset: int, length: int) -> None:
        assert path is not None
        self._fd = os.open(path, os.O_RDONLY)
        self._offset, self._length, self._pos = offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._offset + self._pos)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def rmtree_quiet(path: Path) -> None:
    """Remove a temporary tree, also when extraction left read-only directories behind."""

    def onerror(func, p, _exc):  # type: ignore[no-untyped-def]
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
