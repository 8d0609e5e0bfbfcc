"""What the ``tools`` and ``buildenv`` stages share: one package set of the lock installed into
a tree by dpkg in the sandbox, normalised like every tree, and kept extracted in the store (the
tree is used in place, or as the lower layer of a writable view, and never changes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.plan import TreeSettings, package_set_inputs, planned_packages
from reprobuild.rootfs.tree import build_tree


class PackageSetTreeStage(Stage):
    produces = "tree"
    keep_extracted = True
    # The lock's package set this stage installs, and what the progress line calls the tree.
    package_set: ClassVar[str]
    what: ClassVar[str]

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        return {"packages": package_set_inputs(ctx.lock.package_set(self.package_set)), "epoch": ctx.epoch}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        packages = ctx.lock.package_set(self.package_set)
        ctx.say(f"building {self.what} ({self.package_set} {len(packages.packages)}, from {packages.release})")
        build_tree(planned_packages(packages), ctx.cache.deb_path, out, TreeSettings(), ctx.epoch, progress=ctx.say)
        return {"versions": {p.name: p.version for p in packages.packages}}
