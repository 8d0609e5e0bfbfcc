"""Stage ``install``: skeleton trees, then every package of the image set installed by dpkg in
the sandbox — the root tree before ``ExtraTrees=`` and the settings.

Made in the build's workspace (in memory when it fits) and cached as its tar, not kept extracted
in the store: dpkg creating a tree on the store's disk file system cost 2–4× what it costs in
memory (measured on the 2-core reference VM: the first cached build of ``lock/minimal`` as a tar
took 9.7–11.5 s on the store's ext4, 4.7–4.8 s in memory; issue 20's server set 20–30 s against
18.5 s; extracting the cached server tree: 9.3 s on ext4, 2.4 s in memory). A later build that
reuses it (an ``ExtraTrees=`` edit) extracts the tar into its workspace (≈0.6 s for
``lock/minimal``), and the ``tree`` stage takes that private copy over."""

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
