"""An erofs image as a file tree, read in place with `reprobuild.image.erofs` (no extraction).

Every field of `FileMeta` is known (modes, owners, times, xattrs, devices), whoever runs the
diff. File contents are byte ranges of the image where the file is contiguous, else read into
memory up to the diff's memory limit, else copied to a temporary file. With ``changed_blocks``
(the image blocks the dm-verity hash trees say differ from the other image), `unchanged` tells,
without reading any data, that a path holds the same inode on both sides untouched by any
changed block — so only the files that own a changed block are compared.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from pathlib import Path

from reprobuild.diff.open import FileMeta, Node, TreeContainer
from reprobuild.diff.source import ByteSource
from reprobuild.image import erofs


class ErofsTree(TreeContainer):
    """The erofs file system in ``src``; raises ErofsInvalid / ErofsUnsupported (FormatErrors)."""

    label = "erofs"

    def __init__(self, src: ByteSource, memory_limit: int, new_temp: Callable[[], Path]) -> None:
        self._src = src
        self._memory_limit = memory_limit
        self._new_temp = new_temp
        self._fd = -1
        if src.data is None:
            assert src.path is not None
            self._fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
            weakref.finalize(self, os.close, self._fd)  # closed when the tree is dropped
        self.fs = erofs.Erofs(self._read_at, src.length)
        self._entries = {os.fsdecode(e.path): e.inode for e, _parent in self.fs.walk()}

    def _read_at(self, offset: int, n: int) -> bytes:
        if self._src.data is not None:
            return self._src.data[offset:offset + n]
        return os.pread(self._fd, n, self._src.offset + offset)

    @property
    def bytes_read(self) -> int:
        """Bytes of the image read so far (metadata; file contents go through `member` sources)."""
        return self.fs.bytes_read

    def member_names(self) -> list[str]:
        return sorted(self._entries, key=lambda n: n.encode("utf-8", "surrogateescape"))

    def member(self, name: str) -> Node:
        ino = self._entries[name]
        ftype = ino.type
        target = os.fsdecode(self.fs.readlink(ino)) if ftype == "symlink" else None
        xattrs = self.fs.xattrs(ino)
        meta = FileMeta(ftype, ino.mode & 0o7777, ino.uid, ino.gid, ino.size if ftype == "file" else 0, ino.mtime,
                        target, xattrs, ino.device if ftype.endswith("device") else None)  # fmt: skip
        return Node(name, None, self._content(name, ino) if ftype == "file" else None, meta=meta)

    def _content(self, name: str, ino: erofs.Inode) -> ByteSource:
        ext = ino.extents
        if not ext:
            return ByteSource.of_bytes(b"")
        if len(ext) == 1 and ext[0].offset is not None:
            return self._src.slice(ext[0].offset, ext[0].length)  # in place, never copied
        if ino.size <= self._memory_limit:
            return ByteSource.of_bytes(self.fs.read_data(ino, self._memory_limit))
        out = self._new_temp() / "file"
        with open(out, "wb") as f:
            f.writelines(self.fs.iter_data(ino))
        return ByteSource.of_file(out)

    def unchanged(self, name: str, other: ErofsTree, changed: frozenset[int], unit: int) -> bool:
        """True when ``name`` is known to be the same on both sides without reading its data.

        The same inode (nid) untouched by any changed ``unit``-byte block; or, when inodes moved
        (a file added earlier in the tree shifts every later inode), the same attributes and
        xattrs and the same data blocks, none of them changed (an inline tail is compared)."""
        a, b = self._entries.get(name), other._entries.get(name)
        if a is None or b is None:
            return False
        if a.nid == b.nid and not any(self._touched(blk, changed, unit) for blk in self.fs.blocks_of(a)):
            return True
        if (a.mode, a.uid, a.gid, a.size, a.mtime, a.rdev) != (b.mode, b.uid, b.gid, b.size, b.mtime, b.rdev):
            return False
        if len(a.extents) != len(b.extents):
            return False
        bs = self.fs.block_size
        for x, y in zip(a.extents, b.extents, strict=True):
            if x.length != y.length or (x.offset is None) != (y.offset is None):
                return False
            if x.offset is None or y.offset is None:
                continue
            if x.offset == y.offset and x.offset % bs == 0:
                first, last = x.offset // bs, (x.offset + x.length - 1) // bs
                if not any(self._touched(blk, changed, unit) for blk in range(first, last + 1)):
                    continue
            if x.length > bs or self.fs.read_meta(x.offset, x.length) != other.fs.read_meta(y.offset, y.length):
                return False  # moved or changed data: compared by the caller
        return not (a.xattr_size or b.xattr_size) or self.fs.xattrs(a) == other.fs.xattrs(b)

    def _touched(self, blk: int, changed: frozenset[int], unit: int) -> bool:
        bs = self.fs.block_size
        if bs == unit:
            return blk in changed
        return any(u in changed for u in range(blk * bs // unit, ((blk + 1) * bs - 1) // unit + 1))
