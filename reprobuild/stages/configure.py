"""Stage ``tree``: the installed tree configured — extra trees, post-installation scripts,
settings, ``RemoveFiles=``, normalisation. Its artifact is the final root tree.

The installed tree is taken over when it is a private copy (``--no-cache``), seen through an
overlay when it is the shared extracted tree in the store (only the changed files are written),
or extracted afresh where overlays are unavailable (same bytes, slower)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reprobuild.cache import content_digest
from reprobuild.errors import BuildError
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.overlay import writable_view
from reprobuild.rootfs.plan import tree_settings
from reprobuild.rootfs.tree import configure_tree

_CONTENT_FIELDS = ("skeleton_trees", "extra_trees", "postinst_scripts")


class ConfigureStage(Stage):
    name = "tree"
    produces = "tree"
    upstream = ("install",)

    def __init__(self, *, cacheable: bool) -> None:
        # Worth storing only when the tree itself is the output (-f directory).
        self._cacheable = cacheable

    def cacheable(self, ctx: BuildContext) -> bool:
        return self._cacheable

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        plain = {k: v for k, v in asdict(tree_settings(ctx.spec)).items() if k not in _CONTENT_FIELDS}
        plain["remove_files"] = list(plain["remove_files"])
        return plain

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        # Content digests, not paths: moving a checkout must not invalidate the cache.
        settings = tree_settings(ctx.spec)
        return {"extra_trees": [content_digest(p) for p in settings.extra_trees],
                "postinst_scripts": [content_digest(p) for p in settings.postinst_scripts], "epoch": ctx.epoch}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        installed = up.artifact("install")
        assert installed.path is not None
        added = list(installed.meta.get("added_files", []))
        if installed.owned:
            os.rename(installed.path, out)
            installed.path, installed.owned = None, False
        elif ctx.overlays:
            scratch = ctx.cache.scratch("overlay")
            ctx.mounts.callback(shutil.rmtree, scratch, True)
            try:
                ctx.mounts.enter_context(writable_view(installed.path, scratch, out))
            except BuildError as e:
                # E.g. a store on a file system overlayfs refuses as upper layer (itself an
                # overlay, NFS): the copy gives the same bytes.
                ctx.say(f"note: {e.message}; copying the cached tree instead")
                shutil.rmtree(out, ignore_errors=True)
                self._copy(ctx, installed, out)
        else:
            self._copy(ctx, installed, out)
        old_umask = os.umask(0o022)
        try:
            added += [a.as_dict() for a in configure_tree(out, tree_settings(ctx.spec), ctx.epoch, ctx.say,
                                                            base=ctx.spec.directory)]
        finally:
            os.umask(old_umask)
        # Every file written, changed or removed by reprobuild rather than a package, and why
        # (the manifest's added_files; later stages pass it on).
        return {"added_files": added}

    @staticmethod
    def _copy(ctx: BuildContext, installed, out: Path) -> None:
        if installed.entry is None:
            raise BuildError("internal error: the installed tree is neither private nor cached")
        ctx.cache.restore_tree(installed.entry, out)
