"""Stage ``install``: skeleton trees, then every package of the image set installed by dpkg in
the sandbox — the root tree before ``ExtraTrees=`` and the settings. Kept extracted in the store:
the ``tree`` stage configures it through an overlay."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from reprobuild.cache import content_digest
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.plan import package_set_inputs, planned_packages, tree_settings
from reprobuild.rootfs.sandbox import check_can_sandbox
from reprobuild.rootfs.tree import install_packages


class InstallStage(Stage):
    name = "install"
    produces = "tree"
    keep_extracted = True

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        settings = tree_settings(ctx.spec)
        # The hostname is an input because maintainer scripts run with it as the sandbox's hostname.
        return {"packages": package_set_inputs(ctx.lock.package_set("image")),
                "skeleton_trees": [content_digest(p) for p in settings.skeleton_trees],
                "hostname": settings.hostname, "epoch": ctx.epoch}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        image = ctx.lock.package_set("image")
        check_can_sandbox()
        ctx.say(f"installing packages (image {len(image.packages)})")
        old_umask = os.umask(0o022)  # the caller's umask must not leak into the tree
        try:
            os.mkdir(out, 0o755)
            os.chmod(out, 0o755)
            added = install_packages(out, planned_packages(image), ctx.cache.deb_path, tree_settings(ctx.spec),
                                     ctx.epoch, ctx.say, base=ctx.spec.directory)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            os.umask(old_umask)
        return {"added_files": [a.as_dict() for a in added]}
