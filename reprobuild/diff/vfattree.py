"""A FAT image (an ESP) as a file tree, read in place with `reprobuild.image.vfat` (no mtools).

FAT keeps a type, a size and a write time (2-second resolution) per entry; owners, modes,
links and xattrs do not exist there, so only those three fields are compared. A file in one run
of clusters is a byte range of the image, compared in place and never copied.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from reprobuild.diff.inplace import InPlaceTree
from reprobuild.diff.open import FileMeta, Node
from reprobuild.diff.source import ByteSource
from reprobuild.image import vfat


class VfatTree(InPlaceTree[vfat.Entry]):
    """The FAT file system in ``src``; raises VfatInvalid (a FormatError)."""

    label = "vfat"
    reliable = frozenset({"type", "size", "mtime"})
    fs: vfat.Vfat  # type: ignore[assignment]  # no readlink or xattrs: FAT has neither

    def __init__(self, src: ByteSource, memory_limit: int, new_temp: Callable[[], Path]) -> None:
        super().__init__(src, memory_limit, new_temp)
        self.fs = vfat.Vfat(self.read_at, src.length)
        for prefix, name, entry in self.fs.walk():
            self._entries[os.fsdecode(prefix + name)] = entry

    def meta(self, name: str) -> FileMeta:
        e = self._entries[name]
        return FileMeta(e.type, None, None, None, e.size, e.mtime)

    def member(self, name: str) -> Node:
        e = self._entries[name]
        return Node(name, None, self._content(name, e) if e.type == "file" else None, meta=self.meta(name))

    def _content(self, name: str, ino: vfat.Entry) -> ByteSource:
        return self.extents_content(name, ino, lambda: self.fs.read_data(ino, self._memory_limit),
                                    lambda: self.fs.iter_data(ino), vfat.VfatInvalid)  # fmt: skip
