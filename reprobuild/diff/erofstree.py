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
from collections.abc import Callable
from pathlib import Path

from reprobuild.diff.inplace import InPlaceTree
from reprobuild.diff.open import ChangedBlocks
from reprobuild.diff.source import ByteSource
from reprobuild.image import erofs


class ErofsTree(InPlaceTree[erofs.Inode]):
    """The erofs file system in ``src``; raises ErofsInvalid / ErofsUnsupported (FormatErrors)."""

    label = "erofs"
    fs: erofs.Erofs

    def __init__(self, src: ByteSource, memory_limit: int, new_temp: Callable[[], Path],
                 changed: ChangedBlocks | None = None, base: ErofsTree | None = None) -> None:  # fmt: skip
        """``changed`` with ``base`` (the other side's tree, read first): directories that are the
        same inode on both sides and untouched by a changed block are not read again — their
        entries, and the inodes of entries untouched too, are taken from ``base``."""
        super().__init__(src, memory_limit, new_temp)
        self.fs = erofs.Erofs(self.read_at, src.length)
        self._dirs: dict[bytes, erofs.Inode] = {b"": self.fs.root()}  # "a/b/" -> its inode
        self._children: dict[bytes, list[tuple[bytes, erofs.Inode]]] = {}
        self._same: set[str] = set()  # paths known equal to ``base``'s without reading them
        known = None
        if changed is not None and base is not None and base.fs.block_size == self.fs.block_size:
            known = self._known_from(base, changed)
        for prefix, name, ino in self.fs.walk(known):
            self._children.setdefault(prefix, []).append((name, ino))
            path = prefix + name
            if ino.type == "directory":
                self._dirs[path + b"/"] = ino
            self._entries[os.fsdecode(path)] = ino

    def _known_from(self, base: ErofsTree, changed: ChangedBlocks) -> Callable[[bytes, erofs.Inode],
                                                                              list[tuple[bytes, erofs.Inode]] | None]:  # fmt: skip
        def known(prefix: bytes, d: erofs.Inode) -> list[tuple[bytes, erofs.Inode]] | None:
            other = base._dirs.get(prefix)
            if other is None or other.nid != d.nid or d.meta_offset != other.meta_offset:
                return None
            if any(self._touched(b, changed.blocks, changed.unit) for b in base.fs.blocks_of(other)):
                return None  # the directory itself changed: read it
            hit = self._hit(changed.blocks, changed.unit)
            out = []
            for name, ino in base._children.get(prefix, []):
                if not any(hit(r) for r in base._ranges(ino)):
                    self._same.add(os.fsdecode(prefix + name))  # nothing it depends on changed
                elif hit(base.fs.meta_blocks(ino)):
                    ino = self.fs.inode(ino.nid)  # same slot, other bytes: read this side's inode
                out.append((name, ino))
            return out

        return known

    def _content(self, name: str, ino: erofs.Inode) -> ByteSource:
        return self.extents_content(name, ino, lambda: self.fs.read_data(ino, self._memory_limit),
                                    lambda: self.fs.iter_data(ino), erofs.ErofsInvalid)  # fmt: skip

    def unchanged(self, name: str, other: ErofsTree, changed: frozenset[int], unit: int) -> bool:
        """True when ``name`` is known to be the same on both sides without reading its data.

        The same inode (nid) untouched by any changed ``unit``-byte block; or, when inodes moved
        (a file added earlier in the tree shifts every later inode), the same attributes and
        xattrs and the same data blocks, none of them changed (an inline tail is compared)."""
        if name in other._same:
            return True
        a, b = self._entries.get(name), other._entries.get(name)
        if a is None or b is None:
            return False
        hit = self._hit(changed, unit)
        if a.nid == b.nid and not any(hit(r) for r in self._ranges(a)):
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
            if x.offset == y.offset and x.offset % bs == 0 and not hit(range(x.offset // bs,
                                                                              (x.offset + x.length - 1) // bs + 1)):
                continue
            if x.length > bs or self.fs.read_meta(x.offset, x.length) != other.fs.read_meta(y.offset, y.length):
                return False  # moved or changed data: compared by the caller
        return not (a.xattr_size or b.xattr_size) or self.fs.xattrs(a) == other.fs.xattrs(b)

    def _ranges(self, ino: erofs.Inode) -> list[range]:
        """The inode's blocks as ranges: its metadata, shared xattrs, then each data extent."""
        bs = self.fs.block_size
        if ino.shared_xattrs:  # rare: every block, one by one
            return [range(b, b + 1) for b in self.fs.blocks_of(ino)]
        out = [self.fs.meta_blocks(ino)]
        out.extend(range(e.offset // bs, (e.offset + e.length - 1) // bs + 1) for e in ino.extents
                   if e.offset is not None and e.length)  # fmt: skip
        return out

    def _hit(self, changed: frozenset[int], unit: int) -> Callable[[range], bool]:
        return self.changed_hit(changed, unit, self.fs.block_size)

    def _touched(self, blk: int, changed: frozenset[int], unit: int) -> bool:
        return self._hit(changed, unit)(range(blk, blk + 1))
