"""A file-system image as a file tree: read in place by its Python reader, or — for a valid image
that reader refuses (a compressed erofs, an lzo/lz4 squashfs, a block-mapped ext2) — extracted by
the file system's own tool, with the tree's ``note`` saying so. `diff` and ``verify --audit``
open root file systems through `open_file_system`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from reprobuild.diff.detect import Kind
from reprobuild.diff.erofstree import ErofsTree
from reprobuild.diff.ext4tree import Ext4Tree
from reprobuild.diff.open import TreeContainer, extract_fs
from reprobuild.diff.source import ByteSource
from reprobuild.diff.squashfstree import SquashfsTree
from reprobuild.diff.vfattree import VfatTree
from reprobuild.errors import FormatError
from reprobuild.image.erofs import ErofsUnsupported
from reprobuild.image.ext4 import Ext4Unsupported
from reprobuild.image.squashfs import SquashfsUnsupported

# Each file system read in place: its tree, the errors that send a valid image the reader does not
# support to the extraction tool instead, and that tool.
IN_PLACE: dict[Kind, tuple[Callable[..., TreeContainer], tuple[type[FormatError], ...], str]] = {
    Kind.EROFS: (ErofsTree, (ErofsUnsupported,), "fsck.erofs"),
    Kind.SQUASHFS: (SquashfsTree, (SquashfsUnsupported,), "unsquashfs"),
    Kind.EXT4: (Ext4Tree, (Ext4Unsupported,), "debugfs"),
    Kind.VFAT: (VfatTree, (), ""),  # every FAT is read: no fallback
}


def open_file_system(kind: Kind, source: ByteSource, memory_limit: int, new_temp: Callable[[], Path], what: str,
                     **options: Any) -> TreeContainer:  # fmt: skip
    """The file system of ``kind`` in ``source`` as a tree. Files up to ``memory_limit`` bytes that
    are not a byte range of the image are read into memory, larger ones into a directory from
    ``new_temp()``, where an extraction goes too. ``options`` go to the reader's tree (ErofsTree's
    ``changed`` and ``base``). Raises FormatError for a corrupt image, ToolMissing when an
    extraction's tool is absent."""
    reader, unsupported, tool = IN_PLACE[kind]
    try:
        return reader(source, memory_limit, new_temp, **options)
    except unsupported as e:  # read by the external tool instead, and said so
        tree = extract_fs(kind, source, new_temp(), what)
        tree.note = f"{e.message}: extracted with {tool} instead"
        return tree
