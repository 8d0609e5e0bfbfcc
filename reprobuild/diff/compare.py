"""Compare two inputs into a `Difference` tree: the comparator table and the entry point.

`COMPARATORS` is the one place that says which formats are understood and in which order:
specific formats before generic ones, `BinaryComparator` last (it recognizes every pair). The
comparators live with their formats (`disk`, `uki`, `lockdiff`, `text`, `archives`, `trees`)
and share `base`; this module only puts them in order and dispatches (`base.compare_nodes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from reprobuild.diff.archives import CompressedComparator, DebComparator
from reprobuild.diff.base import (
    DEFAULT_OPTIONS,
    BinaryComparator,
    Comparator,
    DiffContext,
    DiffOptions,
    compare_nodes,
)
from reprobuild.diff.detect import Kind
from reprobuild.diff.difference import Difference, without_metadata
from reprobuild.diff.disk import DiskComparator, VerityHashComparator, VeritySigComparator
from reprobuild.diff.lockdiff import LockfileComparator, diff_pins
from reprobuild.diff.oci import OciComparator
from reprobuild.diff.open import Node, open_input
from reprobuild.diff.text import JsonComparator, TextComparator
from reprobuild.diff.trees import TreeComparator
from reprobuild.diff.uki import PeComparator
from reprobuild.fileio import ReadRefused, read_bounded

# Most specific first: a lockfile or a verity signature is also JSON, a disk's root is also a tree.
COMPARATORS: tuple[type[Comparator], ...] = (
    DiskComparator,
    VerityHashComparator,
    VeritySigComparator,
    LockfileComparator,
    JsonComparator,
    PeComparator,
    DebComparator,
    CompressedComparator,
    OciComparator,
    TreeComparator,
    TextComparator,
    BinaryComparator,
)


@dataclass(frozen=True)
class DiffResult:
    source1: str
    source2: str
    difference: Difference | None

    @property
    def identical(self) -> bool:
        return self.difference is None

# A build manifest lists packages: a few hundred KiB at most.
MAX_MANIFEST_BYTES = 16 << 20


def compare_paths(path1: Path, path2: Path, options: DiffOptions = DEFAULT_OPTIONS) -> DiffResult:
    """Compare two inputs given on the command line. Raises DiffInputError on unreadable input.

    Cost: for two disks, one compare per partition, except verity-protected erofs partitions:
    their hash trees are compared top down (two blocks when identical) and only the file-system
    metadata and the files owning changed blocks are read; other verity pairs are checked over
    their data, and other differing file systems are extracted. Other inputs: one streaming
    compare when identical.
    """
    a, b = open_input(path1), open_input(path2)
    ctx = DiffContext(options, COMPARATORS)
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
    """``image.raw.manifest.json`` beside ``image.raw`` (the build's manifest): when both disks
    have one, the packages they were built from are compared package by package first (which
    packages were added, removed or changed version), then the manifests themselves."""
    if a.kind is not Kind.DISK or b.kind is not Kind.DISK:
        return None
    m1, m2 = p1.with_name(p1.name + ".manifest.json"), p2.with_name(p2.name + ".manifest.json")
    if not (m1.is_file() and m2.is_file()):
        return None
    name = m1.name if m1.name == m2.name else f"{m1.name} ↔ {m2.name}"
    packages = None
    try:
        doc1, doc2 = (json.loads(read_bounded(m, MAX_MANIFEST_BYTES)) for m in (m1, m2))
        if isinstance(doc1.get("packages"), list) and isinstance(doc2.get("packages"), list):
            packages = diff_pins("packages", doc1["packages"], doc2["packages"])
    except (OSError, ValueError, AttributeError, ReadRefused):
        pass  # an unreadable manifest is still compared as a file below
    manifests = compare_nodes(name, open_input(m1), open_input(m2), ctx, 1)
    details = [d for d in (packages, manifests) if d is not None]
    return Difference.of("build manifests", "manifests", details=details) if details else None
