"""What the file systems `diff` reads in place (erofs, squashfs, ext4) share: reads from the
image, path order, members with every attribute, the verity-changed-block test, and where a
file's bytes go when they cannot be a slice of the image."""

from __future__ import annotations

import bisect
import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from reprobuild.diff.open import FileMeta, Node, TreeContainer, unpacked_limit
from reprobuild.diff.source import ByteSource
from reprobuild.errors import FormatError

InodeT = TypeVar("InodeT")


class Reader(Protocol):
    """What a reader in reprobuild.image offers (`erofs.Erofs`, `squashfs.Squashfs`, `ext4.Ext4`)."""

    bytes_read: int

    def readlink(self, ino: Any) -> bytes: ...

    def xattrs(self, ino: Any) -> tuple[tuple[str, bytes], ...]: ...


class InPlaceTree(TreeContainer, Generic[InodeT]):
    """A file system image in ``src``, read through `read_at` without extracting it. A subclass
    sets ``fs`` (its reader), fills ``_entries`` and says where a file's bytes are (`_content`)."""

    fs: Reader

    def __init__(self, src: ByteSource, memory_limit: int, new_temp: Callable[[], Path]) -> None:
        self._src = src
        self._memory_limit = memory_limit
        self._new_temp = new_temp
        self._fd = -1
        if src.data is None:
            assert src.path is not None
            self._fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
            weakref.finalize(self, os.close, self._fd)  # closed when the tree is dropped
        self._entries: dict[str, InodeT] = {}  # path -> the reader's inode
        self._hit_cache: tuple[tuple[int, int, int], Callable[[range], bool]] | None = None

    def read_at(self, offset: int, n: int) -> bytes:
        if self._src.data is not None:
            return self._src.data[offset:offset + n]
        return os.pread(self._fd, n, self._src.offset + offset)

    def member_names(self) -> list[str]:
        return sorted(self._entries, key=lambda n: n.encode("utf-8", "surrogateescape"))

    @property
    def bytes_read(self) -> int:
        """Bytes of the image read so far (metadata, and data compared in place)."""
        return self.fs.bytes_read

    def meta(self, name: str) -> FileMeta:
        ino: Any = self._entries[name]
        ftype = ino.type
        target = os.fsdecode(self.fs.readlink(ino)) if ftype == "symlink" else None
        return FileMeta(ftype, ino.mode & 0o7777, ino.uid, ino.gid, ino.size if ftype == "file" else 0, ino.mtime,
                        target, self.fs.xattrs(ino), ino.device if ftype.endswith("device") else None)  # fmt: skip

    def member(self, name: str) -> Node:
        meta = self.meta(name)
        content = self._content(name, self._entries[name]) if meta.type == "file" else None
        return Node(name, None, content, meta=meta)

    def _content(self, name: str, ino: InodeT) -> ByteSource:
        raise NotImplementedError

    def changed_hit(self, changed: frozenset[int], unit: int, block_size: int) -> Callable[[range], bool]:
        """``hit(blocks)``: does a range of this image's ``block_size``-byte blocks overlap one of
        the ``changed`` ``unit``-byte blocks (the verity data blocks that differ)?"""
        key = (id(changed), unit, block_size)
        if self._hit_cache is None or self._hit_cache[0] != key:
            mine = sorted({b for c in changed for b in range(c * unit // block_size,
                                                                ((c + 1) * unit - 1) // block_size + 1)})  # fmt: skip

            def hit(r: range) -> bool:
                i = bisect.bisect_left(mine, r.start)
                return i < len(mine) and mine[i] < r.stop

            self._hit_cache = (key, hit)
        return self._hit_cache[1]

    def extents_content(self, name: str, ino: Any, read: Callable[[], bytes], chunks: Callable[[], Iterable[bytes]],
                        invalid: Callable[[str], FormatError]) -> ByteSource:  # fmt: skip
        """A file whose ``ino.extents`` are (offset, length) pairs (offset None: zeros): one
        stored extent is a byte range of the image, compared in place and never copied; else
        `content`."""
        ext = ino.extents
        if not ext:
            return ByteSource.of_bytes(b"")
        if len(ext) == 1 and ext[0].offset is not None:
            return self._src.slice(ext[0].offset, ext[0].length)
        return self.content(name, ino.size, read, chunks, invalid)

    def content(self, name: str, size: int, read: Callable[[], bytes], chunks: Callable[[], Iterable[bytes]],
                invalid: Callable[[str], FormatError]) -> ByteSource:  # fmt: skip
        """A file's bytes: in memory up to the diff's memory limit (``read()``), else written to a
        temporary file from ``chunks()`` — never more than 64× the image (≥ 1 GiB), as for the
        extraction tools (diff/open.py); ``invalid(message)`` is raised beyond."""
        if size <= self._memory_limit:
            return ByteSource.of_bytes(read())
        limit = unpacked_limit(self._src.length)
        if size > limit:  # sparse: never write more than this to disk
            raise invalid(f"{self.label}: {name} claims {size} bytes, more than {limit} for this image")
        out = self._new_temp() / "file"
        with open(out, "wb") as f:
            f.writelines(chunks())
        return ByteSource.of_file(out)
