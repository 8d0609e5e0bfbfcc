"""An ext4 image as a file tree, read in place with `reprobuild.image.ext4` (no extraction).

Every field of `FileMeta` is known (modes, owners, times, xattrs, devices), whoever runs the
diff; no external tool parses the image. A file stored in one extent is a byte range of the
image (compared in place, never copied); a fragmented or sparse one is read into memory up to
the diff's memory limit, else into a temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from reprobuild.diff.inplace import InPlaceTree
from reprobuild.diff.source import ByteSource
from reprobuild.image import ext4


class Ext4Tree(InPlaceTree[ext4.Inode]):
    """The ext4 file system in ``src``; raises Ext4Invalid / Ext4Unsupported (FormatErrors)."""

    label = "ext4"
    fs: ext4.Ext4

    def __init__(self, src: ByteSource, memory_limit: int, new_temp: Callable[[], Path]) -> None:
        super().__init__(src, memory_limit, new_temp)
        self.fs = ext4.Ext4(self.read_at, src.length)
        for prefix, name, ino in self.fs.walk():
            self._entries[os.fsdecode(prefix + name)] = ino

    def _content(self, name: str, ino: ext4.Inode) -> ByteSource:
        return self.extents_content(name, ino, lambda: self.fs.read_data(ino, self._memory_limit),
                                    lambda: self.fs.iter_data(ino), ext4.Ext4Invalid)  # fmt: skip

    def unchanged(self, name: str, other: Ext4Tree, changed: frozenset[int], unit: int) -> bool:
        """True when ``name`` is known to be the same on both sides without reading its data.

        The same inode on both sides, none of whose blocks — the inode's, its xattr block, its
        extent tree's, its data's — is among the ``changed`` ``unit``-byte blocks: every byte that
        defines it is the same. Or, when inode numbers moved (a file added early in the tree
        renumbers every later one), the same attributes, xattrs and extents, and none of the data
        blocks changed."""
        a, b = self._entries.get(name), other._entries.get(name)
        if a is None or b is None:
            return False
        bs = self.fs.block_size
        hit = self.changed_hit(changed, unit, bs)
        data = [range(e.offset // bs, (e.offset + e.length - 1) // bs + 1) for e in a.extents
                if e.offset is not None and e.length]  # fmt: skip
        if a.number == b.number and a.offset == b.offset:
            meta = [range(a.offset // bs, (a.offset + self.fs.sb.inode_size - 1) // bs + 1)]
            meta.extend(range(n, n + 1) for n in (a.xattr_block, *a.tree_blocks) if n)
            if not any(hit(r) for r in meta + data):
                return True
        if (a.type, a.mode, a.uid, a.gid, a.size, a.mtime, a.device, a.target, a.extents) != \
                (b.type, b.mode, b.uid, b.gid, b.size, b.mtime, b.device, b.target, b.extents):
            return False
        return not any(hit(r) for r in data) and self.fs.xattrs(a) == other.fs.xattrs(b)
