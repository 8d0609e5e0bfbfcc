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
from reprobuild.diff.open import FileMeta, Node
from reprobuild.diff.source import ByteSource
from reprobuild.image import ext4


class Ext4Tree(InPlaceTree[ext4.Inode]):
    """The ext4 file system in ``src``; raises Ext4Invalid / Ext4Unsupported (FormatErrors)."""

    label = "ext4"

    def __init__(self, src: ByteSource, memory_limit: int, new_temp: Callable[[], Path]) -> None:
        super().__init__(src, memory_limit, new_temp)
        self.fs = ext4.Ext4(self.read_at, src.length)
        for prefix, name, ino in self.fs.walk():
            self._entries[os.fsdecode(prefix + name)] = ino

    @property
    def bytes_read(self) -> int:
        """Bytes of the image read so far (metadata; file contents go through `member` sources)."""
        return self.fs.bytes_read

    def member(self, name: str) -> Node:
        ino = self._entries[name]
        ftype = ino.type
        target = os.fsdecode(self.fs.readlink(ino)) if ftype == "symlink" else None
        meta = FileMeta(ftype, ino.mode & 0o7777, ino.uid, ino.gid, ino.size if ftype == "file" else 0, ino.mtime,
                        target, self.fs.xattrs(ino), ino.device)  # fmt: skip
        return Node(name, None, self._content(name, ino) if ftype == "file" else None, meta=meta)

    def _content(self, name: str, ino: ext4.Inode) -> ByteSource:
        ext = ino.extents
        if not ext:
            return ByteSource.of_bytes(b"")
        if len(ext) == 1 and ext[0].offset is not None:
            return self._src.slice(ext[0].offset, ext[0].length)  # in place, never copied
        return self.content(name, ino.size, lambda: self.fs.read_data(ino, self._memory_limit),
                            lambda: self.fs.iter_data(ino), ext4.Ext4Invalid)  # fmt: skip
