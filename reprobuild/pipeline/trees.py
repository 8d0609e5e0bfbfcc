"""A mutable working copy of an upstream stage's tree, for stages that change a tree they were
given (``tree`` configures the installed tree; ``build`` runs scripts in the build environment).

The tree is taken over when it is a private copy (``--no-cache``), seen through an overlay when
it is the shared extracted tree in the store (only the changed files are written; the cached tree
below never changes), or extracted afresh where overlays are unavailable (same bytes, slower)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reprobuild.errors import BuildError
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Artifact
from reprobuild.rootfs.overlay import writable_view


def writable_tree(ctx: BuildContext, art: Artifact, out: Path) -> None:
    """Make ``out`` (which must not exist) a writable tree with ``art``'s content. Overlay mounts
    are closed with ``ctx.mounts``; a taken-over private tree is no longer ``art``'s."""
    assert art.path is not None
    if art.owned:
        os.rename(art.path, out)
        art.path, art.owned = None, False
    elif ctx.overlays:
        scratch = ctx.cache.scratch("overlay")
        ctx.mounts.callback(shutil.rmtree, scratch, True)
        try:
            ctx.mounts.enter_context(writable_view(art.path, scratch, out))
        except BuildError as e:
            # E.g. a store on a file system overlayfs refuses as upper layer (itself an overlay,
            # NFS): the copy gives the same bytes.
            ctx.say(f"note: {e.message}; copying the cached tree instead")
            shutil.rmtree(out, ignore_errors=True)
            _copy(ctx, art, out)
    else:
        _copy(ctx, art, out)


def _copy(ctx: BuildContext, art: Artifact, out: Path) -> None:
    if art.entry is None:
        raise BuildError(f"internal error: the {art.stage} tree is neither private nor cached")
    ctx.cache.restore_tree(art.entry, out)
