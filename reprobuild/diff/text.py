"""Text and JSON: unified diffs (bounded) and JSON documents compared by key path."""

from __future__ import annotations

import difflib
import json

from reprobuild.diff.base import Comparator, DiffContext, bytes_difference, json_fields
from reprobuild.diff.detect import Kind
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field
from reprobuild.diff.open import Node


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
