"""Stages ``tar`` and ``cpio``: the root tree as one archive file (pax tar: sorted, numeric
owners, clamped mtimes; newc cpio: sorted, renumbered inodes, owners kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprobuild.fileio import write_atomically
from reprobuild.image.cpio import cpio_from_tree
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.archive import write_tar_stream


class TarStage(Stage):
    name = "tar"
    file_name = "image.tar"
    upstream = ("tree",)

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {"epoch": ctx.epoch}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        tree = up.artifact("tree").path
        assert tree is not None
        write_atomically(out, lambda f: write_tar_stream(tree, f, ctx.epoch))
        return {"added_files": list(up.meta("tree").get("added_files", []))}


class CpioStage(Stage):
    name = "cpio"
    file_name = "image.cpio"
    upstream = ("tree",)

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {"epoch": ctx.epoch}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        tree = up.artifact("tree").path
        assert tree is not None
        # keep_owners: a root file system needs its numeric owners (an initrd writer may drop them).
        write_atomically(out, lambda f: cpio_from_tree(tree, f, ctx.epoch, keep_owners=True))
        return {"added_files": list(up.meta("tree").get("added_files", []))}
