"""File trees of any pair of kinds (directories, file systems, tar, cpio, a disk's root), file by file."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from reprobuild.diff import disk as disk_mod
from reprobuild.diff.base import Comparator, DiffContext, absorb, bytes_difference, compare_nodes
from reprobuild.diff.detect import TREES, Kind
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field
from reprobuild.diff.erofstree import ErofsTree
from reprobuild.diff.ext4tree import Ext4Tree
from reprobuild.diff.fstree import IN_PLACE, open_file_system
from reprobuild.diff.oci import oci_layer
from reprobuild.diff.open import (
    CpioTree,
    DiffInputError,
    DirectoryTree,
    FileMeta,
    Node,
    TarTree,
    TreeContainer,
)
from reprobuild.diff.squashfstree import SquashfsTree
from reprobuild.errors import FormatError


class TreeComparator(Comparator, kinds=TREES):
    """File trees of any pair of kinds: directories, file systems, tar, cpio — and a disk's root."""

    @classmethod
    def recognizes(cls, a: Kind, b: Kind) -> bool:
        tree_like = TREES | {Kind.DISK}
        return a in tree_like and b in tree_like and (a in TREES or b in TREES)

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        if a.changed is not None and a.resolved_kind() is b.resolved_kind() is Kind.EROFS:
            # Through the verity trees: the second side reuses what the first read where both agree.
            assert a.source is not None and b.source is not None
            ta = _erofs_tree(a, ctx, name)
            tb = _erofs_tree(b, ctx, name, ta if isinstance(ta, ErofsTree) else None)
        else:
            ta, tb = open_tree(a, ctx, name), open_tree(b, ctx, name)
        notes = [n for n in dict.fromkeys((ta.note, tb.note)) if n]
        same: Callable[[str], bool] | None = None
        if a.changed is not None and isinstance(ta, ErofsTree) and isinstance(tb, ErofsTree):
            ch = a.changed

            def same(rel: str) -> bool:
                return ta.unchanged(rel, tb, ch.blocks, ch.unit)

        elif a.changed is not None and isinstance(ta, Ext4Tree) and isinstance(tb, Ext4Tree):
            ea, eb, ech = ta, tb, a.changed

            def same(rel: str) -> bool:
                return ea.unchanged(rel, eb, ech.blocks, ech.unit)

        elif isinstance(ta, SquashfsTree) and isinstance(tb, SquashfsTree):
            sa, sb = ta, tb

            def same(rel: str) -> bool:
                return sa.unchanged(rel, sb)

        details = compare_trees(ta, tb, ctx, depth, same)
        for kind_tree in (ErofsTree, Ext4Tree):
            if isinstance(ta, kind_tree) and isinstance(tb, kind_tree):
                notes.append(f"{ta.label} read in place: {_kib(ta.bytes_read + tb.bytes_read)} of metadata read "
                             f"({len(ta.member_names())} + {len(tb.member_names())} entries)")  # fmt: skip
        if isinstance(ta, SquashfsTree) and isinstance(tb, SquashfsTree):
            notes.append(f"squashfs read in place: {_kib(ta.bytes_read + tb.bytes_read)} read "
                         f"({len(ta.member_names())} + {len(tb.member_names())} entries); "
                         f"{ta.decompressed + tb.decompressed} file(s) decompressed, the others compared "
                         "as stored")  # fmt: skip
        if not details and a.changed is not None:
            # The trees say blocks differ, yet no file, directory or inode owning one of them does:
            # the blocks are unused space or the superblock.
            assert a.source is not None and b.source is not None
            kind = a.resolved_kind()
            fields = [f for f in disk_mod.superblock_fields(kind, a.source, b.source) if f is not None]
            blocks = sorted(a.changed.blocks)
            shown = ", ".join(map(str, blocks[:8])) + (" …" if len(blocks) > 8 else "")
            comment = f"no file differs; {len(blocks)} changed block(s) ({shown}) belong to no file or inode"
            if fields and blocks == [0]:
                return Difference.of(name, kind.value, fields=fields, comments=[*notes, "only the superblock differs"])
            return Difference.of(name, kind.value, fields=fields, comments=[*notes, comment], own=CONTENT)
        if not details and a.source is not None and b.source is not None and a.resolved_kind() is not b.resolved_kind():
            ka, kb = a.resolved_kind().value, b.resolved_kind().value
            return Difference.of(name, "tree", fields=[Field("format", ka, kb, METADATA)],
                                 comments=[f"the same files in both ({ka}, {kb})"])  # fmt: skip
        if not details and a.source is not None and b.source is not None:
            kind = a.resolved_kind()
            fields = [f for f in disk_mod.superblock_fields(kind, a.source, b.source) if f is not None]
            if fields:
                comment = f"{kind.value} images differ in bytes but hold the same files"
                return Difference.of(name, kind.value, fields=fields, comments=[comment])
            # Unexplained: the bytes may differ in what extraction cannot show (erofs/ext4 xattrs,
            # hard-link structure) — so this is not called cosmetic.
            comment = (f"{kind.value} images differ in bytes, but no compared file attribute or superblock field "
                       "differs (xattrs, hard links or layout?)")
            return bytes_difference(name, a.source, b.source, [comment])
        kind = a.resolved_kind().value if a.resolved_kind() is b.resolved_kind() else "tree"
        return Difference.of(name, kind, details=details, comments=notes if details else ())


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 10 << 20 else f"{n / (1 << 20):.1f} MiB"


def open_tree(node: Node, ctx: DiffContext, what: str) -> TreeContainer:
    kind = node.resolved_kind()
    if kind is Kind.DIRECTORY:
        assert node.directory is not None
        return DirectoryTree(node.directory)
    assert node.source is not None
    if kind is Kind.DISK:
        data = disk_mod.data_partition(node.source)
        if data is None:
            raise DiffInputError(f"{node.name}: the disk has no root or usr partition to compare with a tree")
        return open_tree(Node(node.name, None, data), ctx, what)
    if kind is Kind.TAR:
        return TarTree(node.source)
    if kind is Kind.OCI:  # the image's one layer is its tree
        try:
            return TarTree(oci_layer(node.source, ctx.temp.new, what or node.name))
        except FormatError as e:  # a tar that only looked like an image layout
            tree = TarTree(node.source)
            tree.note = f"read as a plain tar: {e.message}"
            return tree
    if kind is Kind.CPIO:
        return CpioTree(node.source, ctx.options.memory_limit)
    if kind in IN_PLACE:
        return open_file_system(kind, node.source, ctx.options.memory_limit, ctx.temp.new, what or node.name)
    raise DiffInputError(f"{node.name}: a {kind.value} is not a file tree")


def _erofs_tree(node: Node, ctx: DiffContext, what: str, base: ErofsTree | None = None) -> TreeContainer:
    """erofs through the verity trees: ``node.changed`` with the other side's tree ``base``."""
    assert node.source is not None
    return open_file_system(Kind.EROFS, node.source, ctx.options.memory_limit, ctx.temp.new, what or node.name,
                            changed=node.changed, base=base)  # fmt: skip


def compare_trees(ta: TreeContainer, tb: TreeContainer, ctx: DiffContext, depth: int,
                  same: Callable[[str], bool] | None = None) -> list[Difference]:  # fmt: skip
    """Added, removed and changed files, in path order; each changed file is one node.

    ``same(path)`` True means the path is known to be equal on both sides (not compared)."""
    reliable = ta.reliable & tb.reliable
    names_a, names_b = ta.member_names(), tb.member_names()
    set_a, set_b = set(names_a), set(names_b)
    out: list[Difference] = []
    gone: str | None = None  # a removed/added directory: its contents are counted, not listed
    for rel in sorted(set_a | set_b, key=lambda n: n.encode("utf-8", "surrogateescape")):
        if ctx.excluded(rel):
            continue
        if gone is not None and rel.startswith(gone):
            continue
        if rel not in set_b or rel not in set_a:
            tree, make = (ta, Difference.removed) if rel not in set_b else (tb, Difference.added)
            meta = tree.meta(rel)  # its content is not read: only described
            note = _describe(meta)
            if meta.type == "directory":
                gone = rel + "/"
                inside = sum(1 for n in (names_a if tree is ta else names_b) if n.startswith(gone))
                note = f"directory with {inside} entries" if inside else "empty directory"
            out.append(make(rel, "file", [note]))
            continue
        if same is not None and same(rel):
            continue
        d = compare_files(rel, ta.member(rel), tb.member(rel), reliable, ctx, depth)
        if d is not None:
            out.append(d)
    return out


def _describe(m: FileMeta) -> str:
    if m.type == "file":
        return f"file, {m.size} bytes"
    if m.target is not None:
        return f"{m.type} → {m.target}"
    return m.type


def compare_files(rel: str, a: Node, b: Node, reliable: frozenset[str], ctx: DiffContext,
                  depth: int) -> Difference | None:  # fmt: skip
    ma, mb = a.meta, b.meta
    assert ma is not None and mb is not None
    fields: list[Field | None] = [Field.of("type", ma.type, mb.type)]
    if "mode" in reliable:
        fields.append(Field.of("mode", _mode(ma.mode), _mode(mb.mode)))
    if "uid" in reliable:
        fields.append(Field.of("owner", f"{ma.uid}:{ma.gid}", f"{mb.uid}:{mb.gid}"))
    if ma.type == mb.type:
        fields.append(Field.of("link target", ma.target, mb.target))
        if "rdev" in reliable:
            fields.append(Field.of("device", ma.rdev, mb.rdev))
    # Symlink times are not restored by the extraction tools, and FAT keeps no directory times:
    # comparing them would report noise, so they are left out.
    if "mtime" in reliable and ma.type != "symlink" and not (ma.type == "directory" and "mode" not in reliable):
        fields.append(Field.of("mtime", _fmt_time(ma.mtime), _fmt_time(mb.mtime), METADATA))
    if "xattrs" in reliable and ma.xattrs is not None and mb.xattrs is not None:
        xa, xb = dict(ma.xattrs), dict(mb.xattrs)
        for k in sorted(set(xa) | set(xb)):
            fields.append(Field.of(f"xattr {k}", _xattr_text(xa.get(k)), _xattr_text(xb.get(k))))
    content: Difference | None = None
    if ma.type == "file" and mb.type == "file" and a.source is not None and b.source is not None:
        content = compare_nodes(rel, a, b, ctx, depth + 1)
    return absorb(rel, "file", fields, content)


def _xattr_text(v: bytes | None) -> str | None:
    if v is None:
        return None
    try:
        text = v.decode("utf-8")
        if text.isprintable():
            return repr(text)
    except UnicodeDecodeError:
        pass
    return "0x" + v.hex()


def _fmt_time(t: int | None) -> str | None:
    if t is None:
        return None
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(t)


def _mode(m: int | None) -> str | None:
    return None if m is None else f"{m:04o}"
