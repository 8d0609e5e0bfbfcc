"""Compare two nodes into a `Difference` tree: one comparator per format, in an ordered table.

Comparators register themselves by subclassing (``class TarComparator(Comparator, kinds=…)``);
the table keeps definition order, specific formats before generic ones, and `BinaryComparator`
last. `compare_nodes` always checks bytes first — equal sizes, then a chunked compare that stops
at the first difference — so identical partitions, files and members are skipped without being
unpacked. Nested formats are recursed up to ``max_depth`` (and never beyond `HARD_DEPTH`).

Errors: a malformed input or partition (depth ≤ 1) raises `DiffInputError`; a malformed member
deeper down (a corrupt .gz inside a file system) falls back to a byte comparison and says why in
a comment, as does a missing extraction tool.
"""

from __future__ import annotations

import bz2
import difflib
import fnmatch
import json
import lzma
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from reprobuild.diff import disk as disk_mod
from reprobuild.diff.detect import COMPRESSED, FILE_SYSTEMS, TREES, Kind
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field, without_metadata
from reprobuild.diff.open import (
    CpioTree,
    DiffInputError,
    DirectoryTree,
    ListContainer,
    Node,
    TarTree,
    TempDirs,
    TreeContainer,
    ar_members,
    extract_fs,
    open_input,
)
from reprobuild.diff.source import ByteSource, TooLarge, first_difference, same_bytes
from reprobuild.errors import FormatError, ReprobuildError, ToolMissing

HARD_DEPTH = 24  # nesting limit whatever --max-depth says: a zip bomb of tarballs stops here


@dataclass(frozen=True)
class DiffOptions:
    """How to compare. ``exclude``: fnmatch patterns on member paths and base names."""

    exclude: tuple[str, ...] = ()
    max_depth: int | None = None  # container levels to descend; None = unlimited (HARD_DEPTH)
    metadata: bool = True  # False: drop metadata-only differences from the result
    text_limit: int = 8 << 20  # bytes per side beyond which text is summarised, not diffed
    memory_limit: int = 512 << 20  # decompression and in-memory archives (cpio, PE)
    diff_lines: int = 4000  # unified diff lines kept per file


@dataclass
class DiffContext:
    """Per-run state: options and temporary directories (removed by `close`)."""

    options: DiffOptions
    temp: TempDirs = field(default_factory=TempDirs)

    def excluded(self, path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(base, p) for p in self.options.exclude)

    def may_descend(self, depth: int) -> bool:
        limit = self.options.max_depth
        return depth < HARD_DEPTH and (limit is None or depth < limit)


@dataclass(frozen=True)
class DiffResult:
    source1: str
    source2: str
    difference: Difference | None

    @property
    def identical(self) -> bool:
        return self.difference is None


# -- the comparator table ------------------------------------------------------------------------


class Comparator(ABC):
    """Compares two nodes of the kinds it `recognizes`. Subclasses register in definition order."""

    table: ClassVar[list[type[Comparator]]] = []
    kinds: ClassVar[frozenset[Kind]] = frozenset()

    def __init_subclass__(cls, kinds: frozenset[Kind] | set[Kind] = frozenset(), **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.kinds = frozenset(kinds)
        Comparator.table.append(cls)

    @classmethod
    def recognizes(cls, a: Kind, b: Kind) -> bool:
        return a is b and a in cls.kinds

    @abstractmethod
    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        """The difference between ``a`` and ``b`` (already known to differ in bytes), or None."""


def compare_nodes(name: str, a: Node, b: Node, ctx: DiffContext, depth: int, strict: bool = False) -> Difference | None:
    """Dispatch to the first comparator that recognizes the pair; bytes are checked first.

    ``strict``: a parse failure is an error (inputs, partitions) rather than a byte comparison.
    """
    if a.source is not None and b.source is not None and same_bytes(a.source, b.source):
        return None
    try:
        a, b = a.detected(), b.detected()
    except (FormatError, OSError) as e:
        raise DiffInputError(f"{name}: {e}") from e
    ka, kb = a.resolved_kind(), b.resolved_kind()
    if not ctx.may_descend(depth) and a.source is not None and b.source is not None:
        return bytes_difference(name, a.source, b.source, ["not unpacked: --max-depth reached"])
    for cls in Comparator.table:
        if not cls.recognizes(ka, kb):
            continue
        try:
            return cls().compare(name, a, b, ctx, depth)
        except ToolMissing as e:
            if a.source is None or b.source is None:
                raise
            # Without the tool the trees cannot be read: compare bytes and say what to install.
            return bytes_difference(name, a.source, b.source, [f"{e.message}; compared as bytes" +
                                                               (f" ({e.hint})" if e.hint else "")])  # fmt: skip
        except DiffInputError:
            raise
        except Exception as e:
            if strict or a.source is None or b.source is None:
                if isinstance(e, ReprobuildError):
                    raise DiffInputError(f"{name}: {e.message}") from e
                raise DiffInputError(f"{name}: cannot be read as {ka.value}: {type(e).__name__}: {e}") from e
            why = e.message if isinstance(e, ReprobuildError) else f"{type(e).__name__}: {e}"
            note = f"could not be read as {ka.value} ({why}); compared as bytes"
            return bytes_difference(name, a.source, b.source, [note])
    raise AssertionError("BinaryComparator recognizes everything")


def compare_paths(path1: Path, path2: Path, options: DiffOptions = DiffOptions()) -> DiffResult:
    """Compare two inputs given on the command line. Raises DiffInputError on unreadable input.

    Cost: one streaming compare of the inputs when identical; otherwise, for disks, one compare
    per partition, verity checks over differing data partitions, and extraction of the file
    systems whose bytes differ.
    """
    a, b = open_input(path1), open_input(path2)
    ctx = DiffContext(options)
    try:
        root = compare_nodes("", a, b, ctx, 0, strict=True)
        extra = _sibling_manifests(path1, path2, a, b, ctx)
        if extra is not None:
            if root is None:
                root = Difference.of("", "inputs", details=[extra])
            else:
                root = replace(root, details=root.details + (extra,))
    finally:
        ctx.temp.close()
    if not options.metadata:
        root = without_metadata(root)
    return DiffResult(str(path1), str(path2), root)


def _sibling_manifests(p1: Path, p2: Path, a: Node, b: Node, ctx: DiffContext) -> Difference | None:
    """``image.manifest.json`` beside ``image.raw``: compared too when both inputs have one."""
    if a.kind is not Kind.DISK or b.kind is not Kind.DISK:
        return None
    m1, m2 = p1.with_name(p1.name.split(".")[0] + ".manifest.json"), p2.with_name(p2.name.split(".")[0] + ".manifest.json")
    if not (m1.is_file() and m2.is_file()):
        return None
    return compare_nodes(m1.name if m1.name == m2.name else f"{m1.name} ↔ {m2.name}",
                         open_input(m1), open_input(m2), ctx, 1)  # fmt: skip


# -- helpers shared by comparators ---------------------------------------------------------------


def bytes_difference(name: str, a: ByteSource, b: ByteSource, comments: list[str] | None = None) -> Difference | None:
    """Size, sha256 and first differing offset of two byte sources; None if equal."""
    off = first_difference(a, b)
    if off is None and a.length == b.length:
        return None
    notes = list(comments or [])
    if off is not None:
        notes.insert(0, f"first difference at offset {off} (0x{off:x})")
    return Difference.of(
        name, "bytes",
        fields=[Field.of("size", a.length, b.length), Field("sha256", a.sha256(), b.sha256())],
        comments=notes, own=CONTENT,
    )  # fmt: skip


def absorb(name: str, kind: str, fields: list[Field | None], content: Difference | None,
           comments: tuple[str, ...] = ()) -> Difference | None:  # fmt: skip
    """One node for a thing and its content: the content's fields, diff, comments and details are
    merged into it (no extra level named like its parent)."""
    if content is None:
        return Difference.of(name, kind, fields=fields, comments=comments)
    return Difference.of(name, kind, fields=[*fields, *content.fields], diff=content.diff,
                         comments=(*comments, *content.comments), details=content.details, own=content.own)  # fmt: skip


def _fmt_time(t: int | None) -> str | None:
    if t is None:
        return None
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(t)


def _mode(m: int | None) -> str | None:
    return None if m is None else f"{m:04o}"


# -- comparators, most specific first ------------------------------------------------------------


class DiskComparator(Comparator, kinds={Kind.DISK}):
    """GPT disks: header fields, partitions matched by type and label, verity, then contents."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return disk_mod.compare_disks(name, a.source, b.source, ctx, depth, compare_nodes)


class VerityHashComparator(Comparator, kinds={Kind.VERITY_HASH}):
    """Two verity hash devices on their own (without their data): superblock and root hash."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return disk_mod.compare_verity(name, a.source, b.source, None, None)


class VeritySigComparator(Comparator, kinds={Kind.VERITY_SIG}):
    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return disk_mod.compare_verity_sig(name, a.source, b.source, None, None)


class LockfileComparator(Comparator, kinds={Kind.LOCKFILE}):
    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        from reprobuild.diff.lockdiff import compare_locks

        assert a.source is not None and b.source is not None
        return compare_locks(name, a.source.read(ctx.options.memory_limit), b.source.read(ctx.options.memory_limit))


class JsonComparator(Comparator, kinds={Kind.JSON, Kind.VERITY_SIG, Kind.LOCKFILE}):
    """JSON documents (manifests), by key path; also mixed pairs of JSON-ish kinds."""

    @classmethod
    def recognizes(cls, a: Kind, b: Kind) -> bool:
        return a in cls.kinds and b in cls.kinds

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        da = json.loads(a.source.read(ctx.options.memory_limit).rstrip(b"\0"))
        db = json.loads(b.source.read(ctx.options.memory_limit).rstrip(b"\0"))
        fields = list(json_fields(da, db))
        if not fields:
            return Difference.of(name, "json", comments=["same JSON value, different formatting or key order"],
                                 own=METADATA)  # fmt: skip
        return Difference.of(name, "json", fields=fields)


_METADATA_KEY_WORDS = ("uuid", "guid", "time", "date", "epoch", "generated", "build_id")


def json_fields(a: Any, b: Any, path: str = "", limit: int = 10000) -> Iterator[Field]:
    """Leaf-level changes between two JSON values, named by key path (``a.b[2].c``).

    Keys whose last component names an identifier or a time (uuid, time, date …) are classified
    as metadata. At most ``limit`` fields.
    """
    count = 0
    stack: list[tuple[str, Any, Any]] = [(path, a, b)]
    while stack and count < limit:
        p, x, y = stack.pop()
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), reverse=True):
                q = f"{p}.{k}" if p else str(k)
                stack.append((q, x.get(k, _MISSING), y.get(k, _MISSING)))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i in reversed(range(len(x))):
                stack.append((f"{p}[{i}]", x[i], y[i]))
        elif x != y or type(x) is not type(y):
            last = p.rsplit(".", 1)[-1].lower()
            cls = METADATA if any(w in last for w in _METADATA_KEY_WORDS) else CONTENT
            yield Field(p or "(document)", None if x is _MISSING else json.dumps(x, sort_keys=True),
                        None if y is _MISSING else json.dumps(y, sort_keys=True), cls)  # fmt: skip
            count += 1


_MISSING = object()


class PeComparator(Comparator, kinds={Kind.PE}):
    """PE images (UKIs): header fields, then sections by name (.cmdline, .osrel, .initrd …)."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        from reprobuild.diff.uki import compare_pe

        assert a.source is not None and b.source is not None
        return compare_pe(name, a.source, b.source, ctx, depth, compare_nodes)


class DebComparator(Comparator, kinds={Kind.DEB}):
    """A .deb: its ar members (control.tar.*, data.tar.*) compared as nested archives."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return compare_containers(name, "deb", ar_members(a.source), ar_members(b.source), ctx, depth)


def compare_containers(name: str, kind: str, ca: ListContainer, cb: ListContainer, ctx: DiffContext,
                       depth: int) -> Difference | None:  # fmt: skip
    """Members paired by name; member order is metadata."""
    na, nb = ca.member_names(), cb.member_names()
    details: list[Difference | None] = []
    for m in na:
        if m not in nb:
            details.append(Difference.removed(m, "member"))
    for m in nb:
        if m not in na:
            details.append(Difference.added(m, "member"))
        elif not ctx.excluded(m):
            details.append(compare_nodes(m, ca.member(m), cb.member(m), ctx, depth + 1))
    common_a = [m for m in na if m in nb]
    common_b = [m for m in nb if m in na]
    order = Field("member order", ", ".join(common_a), ", ".join(common_b), METADATA) if common_a != common_b else None
    diff = Difference.of(name, kind, fields=[order], details=details)
    if diff is None and ca is not cb:
        # Same members, same order, different bytes: the container's own headers differ.
        return Difference.of(name, kind, comments=["members identical; archive headers differ (timestamps, padding)"],
                             own=METADATA)  # fmt: skip
    return diff


class CompressedComparator(Comparator, kinds=COMPRESSED):
    """gzip/xz/zstd/bzip2: decompress (bounded) and compare what is inside."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        kind = a.resolved_kind()
        try:
            da = decompress(kind, a.source, ctx.options.memory_limit)
            db = decompress(kind, b.source, ctx.options.memory_limit)
        except TooLarge as e:
            return bytes_difference(name, a.source, b.source, [f"not decompressed: {e.message}"])
        inner = _strip_suffix(name.rsplit("/", 1)[-1])
        if da == db:
            note = "compressed bytes differ, decompressed content is identical (compressor header or settings)"
            return Difference.of(name, kind.value, comments=[note], own=METADATA)
        d = compare_nodes(inner, Node(inner, None, ByteSource.of_bytes(da)), Node(inner, None, ByteSource.of_bytes(db)),
                          ctx, depth + 1)  # fmt: skip
        return Difference.of(name, kind.value, details=[d])


def _strip_suffix(name: str) -> str:
    for suffix in (".gz", ".xz", ".zst", ".bz2", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + (".tar" if suffix == ".tgz" else "")
    return name + " (decompressed)"


def decompress(kind: Kind, src: ByteSource, limit: int) -> bytes:
    """Decompress ``src`` (all concatenated frames/members), refusing to produce more than ``limit`` bytes."""
    out = bytearray()

    def add(chunk: bytes) -> None:
        out.extend(chunk)
        if len(out) > limit:
            raise TooLarge(f"decompressed size exceeds {limit >> 20} MiB")

    if kind is Kind.ZSTD:
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(src.open(), read_across_frames=True) as r:
            while chunk := r.read(1 << 20):
                add(chunk)
        return bytes(out)
    factory = {Kind.GZIP: lambda: zlib.decompressobj(wbits=31), Kind.XZ: lzma.LZMADecompressor,
               Kind.BZIP2: bz2.BZ2Decompressor}[kind]  # fmt: skip
    dec = factory()
    pending = b""
    for chunk in src.chunks():
        data = pending + chunk
        while data:
            if kind is Kind.GZIP:
                add(dec.decompress(data, limit + 1 - len(out)))
                data = dec.unconsumed_tail
                if dec.eof:
                    data, dec = dec.unused_data + data, factory()
                    if not data.strip(b"\0"):
                        data = b""
            else:
                add(dec.decompress(data, limit + 1 - len(out)))
                data = b""
                while not dec.needs_input and not dec.eof:
                    add(dec.decompress(b"", limit + 1 - len(out)))
                if dec.eof:
                    data, dec = dec.unused_data, factory()
                    if not data.strip(b"\0"):
                        data = b""
        pending = b""
    return bytes(out)


class TreeComparator(Comparator, kinds=TREES):
    """File trees of any pair of kinds: directories, file systems, tar, cpio — and a disk's root."""

    @classmethod
    def recognizes(cls, a: Kind, b: Kind) -> bool:
        tree_like = TREES | {Kind.DISK}
        return a in tree_like and b in tree_like and (a in TREES or b in TREES)

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        ta, tb = open_tree(a, ctx, name), open_tree(b, ctx, name)
        details = compare_trees(ta, tb, ctx, depth)
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
        return Difference.of(name, kind, details=details)


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
    if kind is Kind.CPIO:
        return CpioTree(node.source, ctx.options.memory_limit)
    if kind in FILE_SYSTEMS:
        return extract_fs(kind, node.source, ctx.temp.new(), what or node.name)
    raise DiffInputError(f"{node.name}: a {kind.value} is not a file tree")


_TREE_FIELDS = ("type", "mode", "uid", "gid", "target", "rdev")


def compare_trees(ta: TreeContainer, tb: TreeContainer, ctx: DiffContext, depth: int) -> list[Difference]:
    """Added, removed and changed files, in path order; each changed file is one node."""
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
            node = tree.member(rel)
            note = _describe(node)
            if node.meta is not None and node.meta.type == "directory":
                gone = rel + "/"
                inside = sum(1 for n in (names_a if tree is ta else names_b) if n.startswith(gone))
                note = f"directory with {inside} entries" if inside else "empty directory"
            out.append(make(rel, "file", [note]))
            continue
        d = compare_files(rel, ta.member(rel), tb.member(rel), reliable, ctx, depth)
        if d is not None:
            out.append(d)
    return out


def _describe(n: Node) -> str:
    m = n.meta
    if m is None:
        return ""
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


class TextComparator(Comparator, kinds={Kind.TEXT, Kind.EMPTY}):
    """UTF-8 text: a unified diff (bounded in size and lines)."""

    @classmethod
    def recognizes(cls, a: Kind, b: Kind) -> bool:
        return a in cls.kinds and b in cls.kinds

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        limit = ctx.options.text_limit
        if a.source.length > limit or b.source.length > limit:
            return bytes_difference(name, a.source, b.source, [f"text larger than {limit >> 20} MiB: not diffed"])
        ta = a.source.read(limit).decode("utf-8", "replace")
        tb = b.source.read(limit).decode("utf-8", "replace")
        lines = list(difflib.unified_diff(ta.splitlines(keepends=True), tb.splitlines(keepends=True),
                                          f"a/{name}", f"b/{name}", n=3))  # fmt: skip
        comments = []
        if len(lines) > ctx.options.diff_lines:
            comments.append(f"diff truncated to {ctx.options.diff_lines} of {len(lines)} lines")
            lines = lines[: ctx.options.diff_lines]
        text = "".join(ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n" for ln in lines)
        fields = [Field.of("size", a.source.length, b.source.length),
                  Field("sha256", a.source.sha256(), b.source.sha256())]  # fmt: skip
        return Difference.of(name, "text", fields=fields, diff=text or None, comments=comments, own=CONTENT)


class BinaryComparator(Comparator):
    """Anything else, and mixed pairs no other comparator understands: size, hash, first offset."""

    @classmethod
    def recognizes(cls, a: Kind, b: Kind) -> bool:
        return True

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        if a.source is None or b.source is None:
            ka, kb = a.resolved_kind(), b.resolved_kind()
            return Difference.of(name, "input", fields=[Field("kind", ka.value, kb.value)], own=CONTENT)
        comments = []
        ka, kb = a.resolved_kind(), b.resolved_kind()
        if ka is not kb:
            comments.append(f"{ka.value} compared with {kb.value}")
        return bytes_difference(name, a.source, b.source, comments)

