"""A squashfs image as a file tree, read in place with `reprobuild.image.squashfs` (no extraction).

Every field of `FileMeta` is known (modes, owners, times, xattrs, devices), whoever runs the
diff; no external tool parses the image. File contents are decompressed on demand — into memory
up to the diff's memory limit, else into a temporary file — and a file stored without
compression is a byte range of the image. `unchanged` tells, without decompressing anything,
that a path is the same on both sides: the same attributes and xattrs, the same stored blocks
(same sizes, byte for byte) and the same fragment tail. So a diff decompresses only the files
whose stored bytes differ.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from reprobuild.diff.inplace import InPlaceTree
from reprobuild.diff.source import ByteSource, same_bytes
from reprobuild.image import squashfs


class SquashfsTree(InPlaceTree[squashfs.Inode]):
    """The squashfs file system in ``src``; raises SquashfsInvalid / SquashfsUnsupported (FormatErrors)."""

    label = "squashfs"
    fs: squashfs.Squashfs

    def __init__(self, src: ByteSource, memory_limit: int, new_temp: Callable[[], Path]) -> None:
        super().__init__(src, memory_limit, new_temp)
        self.fs = squashfs.Squashfs(self.read_at, src.length)
        for prefix, name, ino in self.fs.walk():
            self._entries[os.fsdecode(prefix + name)] = ino
        self.decompressed = 0  # files whose contents were decompressed (for the diff's note)
        # (other tree's id, this side's fragment, the other's) -> stored alike, byte for byte
        self._same_fragments: dict[tuple[int, int, int], bool] = {}

    def _content(self, name: str, ino: squashfs.Inode) -> ByteSource:
        if ino.size == 0:
            return ByteSource.of_bytes(b"")
        if ino.fragment is None and all(not b.compressed and b.stored == b.length for b in ino.blocks):
            return self._src.slice(ino.blocks[0].offset, ino.size)  # stored as it is: in place, never copied
        self.decompressed += 1
        return self.content(name, ino.size, lambda: self.fs.read_data(ino, self._memory_limit),
                            lambda: self.fs.iter_data(ino), squashfs.SquashfsInvalid)  # fmt: skip

    def unchanged(self, name: str, other: SquashfsTree) -> bool:
        """True when ``name`` is known to be the same on both sides without decompressing it."""
        a, b = self._entries.get(name), other._entries.get(name)
        if a is None or b is None:
            return False
        if (a.type, a.mode, a.uid, a.gid, a.size, a.mtime, a.rdev, a.target) != \
                (b.type, b.mode, b.uid, b.gid, b.size, b.mtime, b.rdev, b.target):
            return False
        if self.fs.xattrs(a) != other.fs.xattrs(b):
            return False
        if a.type != "file" or a.size == 0:
            return True
        if self.fs.sb.compression != other.fs.sb.compression or self.fs.block_size != other.fs.block_size:
            return False  # the same bytes may be stored differently: compare the contents
        layout = [(x.stored, x.compressed, x.length) for x in a.blocks]
        if layout != [(y.stored, y.compressed, y.length) for y in b.blocks]:
            return False
        if (a.fragment is None) != (b.fragment is None):
            return False
        stored = sum(x.stored for x in a.blocks)  # a file's stored blocks are contiguous; sparse ones store nothing
        if stored and not same_bytes(self._src.slice(a.blocks[0].offset, stored),
                                     other._src.slice(b.blocks[0].offset, stored)):  # fmt: skip
            return False
        return a.fragment is None or self._same_tail(a, other, b)

    def _same_tail(self, a: squashfs.Inode, other: SquashfsTree, b: squashfs.Inode) -> bool:
        """The same fragment tail: at the same offset of fragment blocks stored byte for byte alike
        (decided once per pair of blocks), else compared decompressed."""
        assert a.fragment is not None and b.fragment is not None
        fa, fb = a.fragment[0], b.fragment[0]
        if a.fragment[1:] == b.fragment[1:]:
            key = (id(other), fa, fb)
            same = self._same_fragments.get(key)
            if same is None:
                x, y = self.fs.fragment_block(fa), other.fs.fragment_block(fb)
                same = (x.stored, x.compressed) == (y.stored, y.compressed) and \
                    same_bytes(self._src.slice(x.offset, x.stored), other._src.slice(y.offset, y.stored))
                self._same_fragments[key] = same
            if same:
                return True
        return self.fs.fragment_tail(a) == other.fs.fragment_tail(b)

