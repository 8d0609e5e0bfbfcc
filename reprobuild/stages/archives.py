"""Stages ``tar`` and ``cpio``: the root tree as one archive file (pax tar: sorted, numeric
owners, clamped mtimes; newc cpio: sorted, renumbered inodes, owners kept)."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, BinaryIO

from reprobuild.fileio import write_atomically_hashed
from reprobuild.image.cpio import cpio_from_tree
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.archive import write_tar_stream


class _ArchiveStage(Stage):
    upstream = ("tree",)

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {"epoch": ctx.epoch}

    @staticmethod
    @abstractmethod
    def write(tree: Path, f: BinaryIO, epoch: int) -> None: ...

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        tree = up.artifact("tree").path
        assert tree is not None
        # Hashed on a second core while it is written: the output needs no second read.
        digest = write_atomically_hashed(out, lambda f: self.write(tree, f, ctx.epoch))
        # "definition": only for people reading the store (store gc --dry-run), never in a key.
        return {"added_files": list(up.meta("tree").get("added_files", [])), "definition": ctx.spec.directory.name,
                "sha256": digest}


class TarStage(_ArchiveStage):
    name = "tar"
    file_name = "image.tar"

    @staticmethod
    def write(tree: Path, f: BinaryIO, epoch: int) -> None:
        write_tar_stream(tree, f, epoch)


class CpioStage(_ArchiveStage):
    name = "cpio"
    file_name = "image.cpio"

    @staticmethod
    def write(tree: Path, f: BinaryIO, epoch: int) -> None:
        # keep_owners: a root file system needs its numeric owners (an initrd writer may drop them).
        cpio_from_tree(tree, f, epoch, keep_owners=True)
