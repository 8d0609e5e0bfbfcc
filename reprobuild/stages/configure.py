"""Stage ``tree``: the installed tree configured — the build scripts' ``$DESTDIR`` (when
``BuildScripts=`` is set), extra trees, post-installation scripts, settings, ``RemoveFiles=``,
normalisation. Its artifact is the final root tree.

The installed tree is made writable by :func:`reprobuild.pipeline.trees.writable_tree` (taken
over, overlaid or copied)."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from reprobuild.cache import content_digest
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.pipeline.trees import writable_tree
from reprobuild.rootfs.plan import TreeSettings, tree_settings
from reprobuild.rootfs.settings import copy_tree_into
from reprobuild.rootfs.tree import configure_tree
from reprobuild.stages.disksettings import update_plan

_CONTENT_FIELDS = ("skeleton_trees", "extra_trees", "postinst_scripts", "update_public_key")


def _settings(ctx: BuildContext) -> TreeSettings:
    """The ``[Content]`` settings, ImageId=/ImageVersion= and ``[Updates]`` (its transfers and key)."""
    return replace(tree_settings(ctx.spec), updates=update_plan(ctx.spec, ctx.lock),
                   update_public_key=ctx.spec.updates.public_key)


class ConfigureStage(Stage):
    name = "tree"
    produces = "tree"
    upstream = ("install",)

    def __init__(self, *, cacheable: bool, build: bool = False) -> None:
        # Worth storing only when the tree itself is the output (-f directory).
        self._cacheable = cacheable
        # BuildScripts=: the build stage's $DESTDIR is merged in.
        if build:
            self.upstream = ("install", "build")

    def cacheable(self, ctx: BuildContext) -> bool:
        return self._cacheable

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        plain = {k: v for k, v in asdict(_settings(ctx)).items() if k not in _CONTENT_FIELDS}
        plain["remove_files"] = list(plain["remove_files"])
        return plain

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        # Content digests, not paths: moving a checkout must not invalidate the cache.
        settings = _settings(ctx)
        inputs = {"extra_trees": [content_digest(p) for p in settings.extra_trees],
                  "postinst_scripts": [content_digest(p) for p in settings.postinst_scripts], "epoch": ctx.epoch}
        if settings.update_public_key is not None:  # only when set: other definitions keep their keys
            inputs["update_public_key"] = content_digest(settings.update_public_key)
        return inputs

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        installed = up.artifact("install")
        added = list(installed.meta.get("added_files", []))
        writable_tree(ctx, installed, out)
        old_umask = os.umask(0o022)
        try:
            if "build" in self.upstream:
                # What BuildScripts= installed into $DESTDIR, after the packages and before
                # ExtraTrees= (owners and modes as the scripts left them).
                dest = up.artifact("build").path
                assert dest is not None
                ctx.say("merging the build scripts' output")
                added += [{"path": "/" + p, "action": "written", "cause": "BuildScripts="}
                          for p in copy_tree_into(out, dest, ctx.epoch, keep_owners=True)]
            added += [a.as_dict() for a in configure_tree(out, _settings(ctx), ctx.epoch, ctx.say,
                                                            base=ctx.spec.directory)]
        finally:
            os.umask(old_umask)
        # Every file written, changed or removed by reprobuild rather than a package, and why
        # (the manifest's added_files; later stages pass it on).
        return {"added_files": added}
