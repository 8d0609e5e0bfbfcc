"""What the read-only file-system readers share (`erofs`, `squashfs`, `ext4`): reads checked
against the image before they are made, and the directory walk — depth first, each directory in
its on-disk order, bounded for hostile images."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar


class _Typed(Protocol):
    @property
    def type(self) -> str: ...


InodeT = TypeVar("InodeT", bound=_Typed)


def read_exactly(read_at: Callable[[int, int], bytes], offset: int, n: int, end: int,
                 invalid: Callable[[str], Exception], where: str) -> bytes:  # fmt: skip
    """``n`` bytes at ``offset`` through ``read_at``, which must lie below ``end``; ``invalid``
    names what is wrong (``where`` starts the message: "ext4: the file system")."""
    fs, _, area = where.partition(" ")
    if offset < 0 or n < 0 or offset + n > end:
        raise invalid(f"{fs} a read of {n} bytes at offset {offset} runs past {area} ({end} bytes; truncated?)")
    buf = read_at(offset, n)
    if len(buf) != n:
        raise invalid(f"{fs} the image ended early at offset {offset + len(buf)}")
    return buf


def walk_tree(root: InodeT, children: Callable[[bytes, InodeT], Iterable[tuple[bytes, InodeT]]],
              identity: Callable[[InodeT], int], invalid: Callable[[str], Exception], fs: str,
              max_entries: int, max_depth: int) -> Iterator[tuple[bytes, bytes, InodeT]]:  # fmt: skip
    """Every entry below ``root`` as (parent path with a trailing "/" or b"", name, inode).

    ``children(prefix, directory)`` lists a directory's (name, inode) pairs; ``identity`` names
    an inode (its number or address). Raises ``invalid(message)`` on a directory reached twice (a
    loop or a hard-linked directory), more than ``max_entries`` entries, or directories nested
    ``max_depth`` deep; ``fs`` starts each message."""
    seen = {identity(root)}
    count = 0
    stack: list[tuple[bytes, InodeT, int]] = [(b"", root, 0)]
    while stack:
        prefix, d, depth = stack.pop()
        subdirs = []
        for name, ino in children(prefix, d):
            count += 1
            if count > max_entries:
                raise invalid(f"{fs}: more than {max_entries} entries")
            yield prefix, name, ino
            if ino.type == "directory":
                if identity(ino) in seen:
                    raise invalid(f"{fs}: directory {(prefix + name)[:200]!r} is reached twice (a loop)")
                if depth + 1 >= max_depth:
                    raise invalid(f"{fs}: directories nested deeper than {max_depth} levels")
                seen.add(identity(ino))
                subdirs.append((prefix + name + b"/", ino, depth + 1))
        stack.extend(reversed(subdirs))
