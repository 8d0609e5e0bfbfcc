"""What every comparator shares: options, per-run context, the `Comparator` base, the dispatch.

The format comparators (`disk`, `uki`, `lockdiff`, `archives`, `trees`, `text`) import this
module and nothing imports them back except `compare`, which lists them in order
(`compare.COMPARATORS`) and hands that table to the run through `DiffContext.comparators`. A
comparator recursing into nested content calls `compare_nodes`, which always checks bytes first
— equal sizes, then a chunked compare that stops at the first difference — so identical
partitions, files and members are skipped without being unpacked. Nested formats are recursed
up to ``max_depth`` (and never beyond `HARD_DEPTH`).

Errors: a malformed input or partition (depth ≤ 1) raises `DiffInputError`; a malformed member
deeper down (a corrupt .gz inside a file system) falls back to a byte comparison and says why in
a comment, as does a missing extraction tool.
"""

from __future__ import annotations

import fnmatch
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from reprobuild.diff.detect import Kind
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field
from reprobuild.diff.open import DiffInputError, Node, TempDirs
from reprobuild.diff.source import ByteSource, first_difference, same_bytes
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


DEFAULT_OPTIONS = DiffOptions()


@dataclass
class DiffContext:
    """Per-run state: options, the comparator table and temporary directories (removed by `close`)."""

    options: DiffOptions
    comparators: tuple[type[Comparator], ...]  # tried in order; the last one recognizes every pair
    temp: TempDirs = field(default_factory=TempDirs)

    def excluded(self, path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(base, p) for p in self.options.exclude)

    def may_descend(self, depth: int) -> bool:
        limit = self.options.max_depth
        return depth < HARD_DEPTH and (limit is None or depth < limit)


# -- the comparator base -------------------------------------------------------------------------


class Comparator(ABC):
    """Compares two nodes of the kinds it `recognizes` (declared as ``class X(Comparator, kinds=…)``)."""

    kinds: ClassVar[frozenset[Kind]] = frozenset()

    def __init_subclass__(cls, kinds: frozenset[Kind] | set[Kind] = frozenset(), **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.kinds = frozenset(kinds)

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
    # With ``changed`` (known from the verity hash trees) the pair is known to differ: no byte pass.
    # Two disks are compared partition by partition (verity-protected ones through their hash
    # trees), never read whole here.
    disks = a.kind is Kind.DISK and b.kind is Kind.DISK
    if a.changed is None and not disks and a.source is not None and b.source is not None \
            and same_bytes(a.source, b.source):
        return None
    try:
        a, b = a.detected(), b.detected()
    except (FormatError, OSError) as e:
        raise DiffInputError(f"{name}: {e}") from e
    ka, kb = a.resolved_kind(), b.resolved_kind()
    if not ctx.may_descend(depth) and a.source is not None and b.source is not None:
        return bytes_difference(name, a.source, b.source, ["not unpacked: --max-depth reached"])
    for cls in ctx.comparators:
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
    raise AssertionError("the last comparator of the table recognizes everything")

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
