"""The stage interface: what a stage of the build declares, and what it gets when it runs.

A stage (one module under ``reprobuild/stages/``) declares

* ``options(ctx)``: its settings (JSON data);
* ``inputs(ctx)``: content it reads from outside the pipeline — package sets, digests of the
  user's trees, scripts and key files — as JSON data (digests, never paths or times);
* ``upstream``: the stages whose *identity* enters its key (it consumes their artifacts);
* ``reads``: stages whose artifacts it reads *content* from, and ``content(ctx, up)``: that
  content as JSON data (for example the digest of the kernel modules the initrd copies from the
  tree). Such a stage has a second key made from that content instead of the readers' identities,
  so an edit upstream that leaves what it reads unchanged still reuses it;
* ``run(ctx, up, out)``: make the artifact at ``out`` (a file or a directory, per ``produces``)
  and return its metadata (JSON data).

The runner (:mod:`reprobuild.pipeline.runner`) alone computes keys from these declarations plus
the digest of the code the stage's module imports, serves artifacts from the cache or runs the
stage, stores results, times stages and explains misses. Stages never touch the cache index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    from reprobuild.cache import Entry
    from reprobuild.pipeline.context import BuildContext

Produces = Literal["file", "tree", "nothing"]


@dataclass
class Artifact:
    """What a stage produced or the cache served.

    ``path``: the file or directory (None for a cached file not copied out yet: use
    :meth:`Upstream.file`). ``owned``: ``path`` is a private scratch copy the consumer may change
    or move; otherwise it is shared (an extracted tree in the store) and read-only."""

    stage: str
    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    entry: Entry | None = None
    from_cache: bool = False
    owned: bool = False

    @property
    def object(self) -> str | None:
        return self.entry.object if self.entry is not None else None


class Upstream(Protocol):
    """The artifacts a running stage may use: only those of stages it declared."""

    def artifact(self, name: str) -> Artifact: ...

    def file(self, name: str) -> Path: ...

    def meta(self, name: str) -> Mapping[str, Any]: ...


class Stage(ABC):
    """One step of the build. Subclasses set the class variables and implement :meth:`run`."""

    name: ClassVar[str]
    # Bump when the stage's artifact layout or metadata changes in a way code digests cannot see.
    version: ClassVar[int] = 1
    produces: ClassVar[Produces] = "file"
    # For file stages: the artifact's name in the work directory.
    file_name: ClassVar[str] = ""
    # Tree stages: keep the cached tree extracted in the store (used in place by later stages).
    keep_extracted: ClassVar[bool] = False
    # The final file stage: whether the store keeps a copy of its output. False: only a receipt
    # (its digest and metadata) is kept; an output still in place is then up to date, and one that
    # is gone or changed is made again from the cached upstream artifacts.
    keep_output: ClassVar[bool] = True

    upstream: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def cacheable(self, ctx: BuildContext) -> bool:
        return True

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {}

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        return {}

    def content(self, ctx: BuildContext, up: Upstream) -> dict[str, Any] | None:
        """Content read from the ``reads`` stages' artifacts (JSON data), or None for a stage
        that reads none. Called only when the identity key misses."""
        return None

    @abstractmethod
    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        """Make the artifact at ``out`` (which does not exist); return its metadata."""

    @property
    def code_module(self) -> str:
        return type(self).__module__
