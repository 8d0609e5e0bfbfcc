"""Stage ``buildenv``: the lock's ``build`` set (the image's packages at their image versions plus
``BuildPackages=``) installed into a tree by dpkg in the sandbox, normalised like every tree.
Kept extracted in the store: the ``build`` stage runs its scripts in a writable view of it, so
the tree itself never changes and a source edit reuses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.plan import TreeSettings, package_set_inputs, planned_packages
from reprobuild.rootfs.tree import build_tree


class BuildEnvStage(Stage):
    name = "buildenv"
    produces = "tree"
    keep_extracted = True

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        return {"packages": package_set_inputs(ctx.lock.package_set("build")), "epoch": ctx.epoch}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        build = ctx.lock.package_set("build")
        ctx.say(f"installing the build environment (build {len(build.packages)} packages)")
        build_tree(planned_packages(build), ctx.cache.deb_path, out, TreeSettings(), ctx.epoch, progress=ctx.say)
        return {}
