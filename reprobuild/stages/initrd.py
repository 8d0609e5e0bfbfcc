"""Stage ``initrd``: the initrd of a bootable image — the lock's ``initrd`` package set plus the
kernel modules that find and verify the root, copied from the root tree — as a zstd-compressed
newc cpio.

Its content key is made from what it reads of the tree (the kernel version and the bytes of the
modules it copies), not from the tree's identity: an edit elsewhere in the root tree reuses it."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobuild.errors import BuildError
from reprobuild.image.initrd import (
    DEFAULT_ROOT_MODULES,
    find_kernel_version,
    make_initrd_cpio,
    select_kernel_modules,
)
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.plan import TreeSettings, package_set_inputs, planned_packages
from reprobuild.rootfs.sandbox import run_in_tree
from reprobuild.rootfs.tree import build_tree

# Documentation, manuals and translations are never read while looking for the root file
# system, and they make up a large share of the Essential set.
INITRD_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                "usr/share/lintian", "var/cache/debconf", "var/lib/apt", "var/cache/apt")
# Module index files copied beside the modules (depmod reads them).
MODULE_INDEXES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")


@dataclass(frozen=True)
class _Modules:
    kernel_version: str
    source: Path  # usr/lib/modules/<version> in the root tree
    files: list[Path]  # the modules to copy (closure of what finding the root needs)
    indexes: list[Path]

    def digest(self) -> str:
        h = hashlib.sha256()
        for f in self.files + self.indexes:
            h.update(f.relative_to(self.source).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()


class InitrdStage(Stage):
    name = "initrd"
    file_name = "initrd.cpio.zst"
    reads = ("tree",)

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {"modules": list(DEFAULT_ROOT_MODULES) + list(ctx.spec.initrd.kernel_modules), "epoch": ctx.epoch}

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        return {"packages": package_set_inputs(ctx.lock.package_set("initrd"))}

    def _modules(self, ctx: BuildContext, up: Upstream) -> _Modules:
        tree = up.artifact("tree").path
        assert tree is not None
        version = find_kernel_version(tree / "usr/lib/modules")
        source = tree / "usr/lib/modules" / version
        files = select_kernel_modules(source, tuple(self.options(ctx)["modules"]))
        return _Modules(version, source, files, [source / n for n in MODULE_INDEXES if (source / n).exists()])

    def content(self, ctx: BuildContext, up: Upstream) -> dict[str, Any]:
        modules = self._modules(ctx, up)
        return {"kernel_version": modules.kernel_version, "modules": modules.digest()}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        package_set = ctx.lock.package_set("initrd")
        initrd_tree = ctx.tree_path("initrd-tree")
        ctx.say(f"building the initrd tree (initrd {len(package_set.packages)})")
        # The package tree first, the image's tree only then: made in a thread of its own (see the
        # runner), the initrd's dpkg run overlaps the image's.
        build_tree(planned_packages(package_set), ctx.cache.deb_path, initrd_tree, TreeSettings(machine_id=""),
                   ctx.epoch, progress=ctx.say)
        try:
            modules = self._modules(ctx, up)
            _add_modules(initrd_tree, modules)
            _make_bootable(initrd_tree, ctx.epoch)
            ctx.say("writing the initrd")
            make_initrd_cpio(initrd_tree, out, ctx.epoch)
        finally:
            shutil.rmtree(initrd_tree, ignore_errors=True)
        return {"kernel_version": modules.kernel_version}


def _add_modules(initrd_tree: Path, modules: _Modules) -> None:
    """Copy the modules and their indexes in (modes explicit: the umask must not reach the image),
    then run the initrd's own (locked) depmod, whose output is sorted and carries no timestamps."""
    dst = initrd_tree / "usr/lib/modules" / modules.kernel_version
    for module in modules.files + modules.indexes:
        dest = dst / module.relative_to(modules.source)
        _mkdirs(dest.parent, initrd_tree)
        shutil.copy2(module, dest)
        dest.chmod(0o644)
    result = run_in_tree(initrd_tree, ["depmod", "-a", modules.kernel_version])
    if result.returncode != 0:
        raise BuildError(f"depmod failed in the initrd tree: {result.output[-500:]}")


def _make_bootable(initrd_tree: Path, epoch: int) -> None:
    """systemd recognises an initrd by /etc/initrd-release; the kernel runs /init."""
    os_release = (initrd_tree / "usr/lib/os-release").read_text()
    release = initrd_tree / "etc/initrd-release"
    release.unlink(missing_ok=True)
    release.write_text(os_release)
    release.chmod(0o644)
    init = initrd_tree / "init"
    init.unlink(missing_ok=True)
    init.symlink_to("usr/lib/systemd/systemd")
    for rel in INITRD_PRUNE:
        shutil.rmtree(initrd_tree / rel, ignore_errors=True)
    for path in (release, init):
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def _mkdirs(path: Path, top: Path) -> None:
    """``mkdir -p`` with mode 0755 for every directory it creates below ``top``, whatever the umask."""
    missing = []
    while not path.exists() and path != top:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(0o755)
