"""The state one build hands to every stage (mkosi's Context): definition, lock, store, cache,
work directory, mount namespace stack, progress. Intent (the definition and the lock) is frozen;
this object only adds where the build happens."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reprobuild.cache import Cache
from reprobuild.config import ImageSpec
from reprobuild.lockfile import Lock
from reprobuild.store import Store

Say = Callable[[str], None]


@dataclass
class BuildContext:
    spec: ImageSpec
    lock: Lock
    store: Store
    cache: Cache
    work: Path
    format: str
    say: Say = lambda _m: None
    # Overlays over cached trees are possible (this thread is in a private mount namespace).
    overlays: bool = False
    # Closed by the build before the work directory is removed (overlay mounts).
    mounts: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    # build --shell-on-failure: a failing build script opens a shell in its build environment.
    shell_on_failure: bool = False
    # Where private trees are made (:mod:`reprobuild.workspace`: in memory when they fit);
    # None: the work directory.
    trees: Path | None = None

    def tree_path(self, name: str) -> Path:
        """Where a private tree called ``name`` is made (it must not exist yet)."""
        return (self.trees or self.work) / name

    @property
    def epoch(self) -> int:
        return self.lock.source_date_epoch
