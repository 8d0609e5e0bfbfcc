"""The Difference tree: what the comparators produce and the renderers print.

A :class:`Difference` says how one named thing (a disk, a partition, a file, a package, a JSON
key) differs. Its constructor :meth:`Difference.of` returns ``None`` when there is nothing to
report, so comparators build lists and let the ``None``s fall away.

Every difference is classified: ``content`` (what a running system sees changes) or
``metadata`` (cosmetic: timestamps, identifiers such as UUIDs, ordering, values derived from
content reported elsewhere). A node is ``content`` if anything in it is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace


class Classification(str, enum.Enum):
    CONTENT = "content"
    METADATA = "metadata"


class Status(str, enum.Enum):
    CHANGED = "changed"
    ADDED = "added"  # only in the second input
    REMOVED = "removed"  # only in the first input


CONTENT = Classification.CONTENT
METADATA = Classification.METADATA


@dataclass(frozen=True)
class Field:
    """One named value that differs, rendered ``name: old → new``."""

    name: str
    old: str | None
    new: str | None
    classification: Classification = CONTENT

    @classmethod
    def of(cls, name: str, old: object, new: object, classification: Classification = CONTENT) -> Field | None:
        """None when ``old == new``; values are shown with ``str`` (None stays None)."""
        if old == new:
            return None
        return cls(name, None if old is None else str(old), None if new is None else str(new), classification)


@dataclass(frozen=True)
class Difference:
    """How one named thing differs. ``kind`` says what it is (disk, partition, file, package …)."""

    name: str
    kind: str
    status: Status = Status.CHANGED
    fields: tuple[Field, ...] = ()
    diff: str | None = None  # unified diff of text content
    comments: tuple[str, ...] = ()
    details: tuple[Difference, ...] = ()
    own: Classification | None = None  # classification of the node itself (added/removed, raw bytes)

    @classmethod
    def of(
        cls,
        name: str,
        kind: str,
        *,
        fields: Iterable[Field | None] = (),
        details: Iterable[Difference | None] = (),
        diff: str | None = None,
        comments: Iterable[str] = (),
        own: Classification | None = None,
    ) -> Difference | None:
        """The difference, or None when no field, detail, diff or own classification remains."""
        f = tuple(x for x in fields if x is not None)
        d = tuple(x for x in details if x is not None)
        if not f and not d and diff is None and own is None:
            return None
        return cls(name, kind, Status.CHANGED, f, diff, tuple(comments), d, own)

    @classmethod
    def added(cls, name: str, kind: str, comments: Iterable[str] = (),
              classification: Classification = CONTENT) -> Difference:  # fmt: skip
        return cls(name, kind, Status.ADDED, comments=tuple(comments), own=classification)

    @classmethod
    def removed(cls, name: str, kind: str, comments: Iterable[str] = (),
                classification: Classification = CONTENT) -> Difference:  # fmt: skip
        return cls(name, kind, Status.REMOVED, comments=tuple(comments), own=classification)

    @property
    def classification(self) -> Classification:
        if self.own is CONTENT or self.diff is not None:
            return CONTENT
        if any(f.classification is CONTENT for f in self.fields):
            return CONTENT
        if any(d.classification is CONTENT for d in self.details):
            return CONTENT
        return METADATA

    @property
    def is_leaf(self) -> bool:
        """Carries information of its own (not only children): these are what the summary counts."""
        return bool(self.fields or self.diff is not None or self.own is not None or self.status is not Status.CHANGED)

    def walk(self, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Difference]]:
        """Pre-order (path, node); the path holds the names from the root down, root name included."""
        path = prefix + (self.name,)
        yield path, self
        for d in self.details:
            yield from d.walk(path)

    def with_details(self, details: Iterable[Difference]) -> Difference:
        return replace(self, details=tuple(details))


@dataclass(frozen=True)
class Summary:
    differences: int
    content: int
    metadata: int


def leaves(root: Difference) -> list[tuple[tuple[str, ...], Difference]]:
    """Every node that carries its own information, with its path (root name excluded)."""
    return [(path[1:], node) for path, node in root.walk() if node.is_leaf]


def summarize(root: Difference | None) -> Summary:
    if root is None:
        return Summary(0, 0, 0)
    items = leaves(root)
    content = sum(1 for _, n in items if _own_class(n) is CONTENT)
    return Summary(len(items), content, len(items) - content)


def _own_class(node: Difference) -> Classification:
    """Classification of a node's own information, ignoring its children."""
    if node.own is CONTENT or node.diff is not None or any(f.classification is CONTENT for f in node.fields):
        return CONTENT
    return METADATA


def prune(root: Difference | None, keep: Callable[[Difference], bool]) -> Difference | None:
    """Rebuild the tree without the nodes for which ``keep`` is false (bottom-up)."""
    if root is None:
        return None
    details = [p for p in (prune(d, keep) for d in root.details) if p is not None]
    node = replace(root, details=tuple(details))
    if not keep(node) and not details:
        return None
    return node


def without_metadata(root: Difference | None) -> Difference | None:
    """Drop metadata-only fields and nodes: what is left is what a running system would see."""
    if root is None:
        return None
    details = tuple(x for x in (without_metadata(d) for d in root.details) if x is not None)
    fields = tuple(f for f in root.fields if f.classification is CONTENT)
    own = root.own if root.own is CONTENT else None
    if root.status is not Status.CHANGED and root.own is METADATA:
        return None
    if not details and not fields and root.diff is None and own is None and root.status is Status.CHANGED:
        return None
    return replace(root, fields=fields, details=details, own=own if root.status is Status.CHANGED else root.own)
