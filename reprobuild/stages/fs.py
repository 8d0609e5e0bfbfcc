"""Stage ``fs``: the root (or ``/usr``) file system image of the tree, made by the ``tools``
stage's mkfs, its UUID derived from the seed. For bootable images the dm-verity root hash is
computed here too (the UKI's command line needs it) and kept in the metadata."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from reprobuild.image import ids, verity
from reprobuild.image.fs import make_filesystem
from reprobuild.image.ids import data_fs_uuid
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.stages.disksettings import choose_verity, is_bootable
from reprobuild.tools import tool_runner


class FsStage(Stage):
    name = "fs"
    file_name = "root.img"
    upstream = ("tree", "tools")

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        b = ctx.spec.build
        bootable = is_bootable(ctx.spec, ctx.lock)
        seed = bytes.fromhex(ctx.lock.seed)
        return {"kind": b.root_filesystem, "layout": b.root_layout,
                "uuid": str(data_fs_uuid(seed, ctx.spec.distribution.architecture, b.root_layout)),
                "read_only": choose_verity(ctx.spec).mode != "no",
                # The ESP's mount point: systemd-gpt-auto-generator mounts it at /efi, and on a
                # read-only root the directory must already exist.
                "efi_dir": bootable and b.root_layout == "root",
                "verity": ({"salt": ids.verity_salt(seed).hex(), "uuid": str(ids.verity_superblock_uuid(seed))}
                           if bootable else None),
                "epoch": ctx.epoch}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        o = self.options(ctx)
        tree = up.artifact("tree").path
        assert tree is not None
        added = list(up.meta("tree").get("added_files", []))
        if o["efi_dir"]:
            efi = tree / "efi"
            if not os.path.lexists(efi):
                added.append({"path": "/efi", "action": "written",
                              "cause": "bootable image: the directory the ESP is mounted on (systemd's /efi)"})
            efi.mkdir(exist_ok=True)
            efi.chmod(0o755)  # explicit: mkdir's mode is filtered by the caller's umask
            os.utime(efi, (ctx.epoch, ctx.epoch))
        tools = up.artifact("tools")
        ctx.say(f"making the {o['kind']} file system")
        fs = make_filesystem(o["kind"], tree / "usr" if o["layout"] == "usr" else tree, out, uuid.UUID(o["uuid"]), ctx.epoch,
                             label=o["layout"], read_only=o["read_only"],
                             runner=tool_runner(tools.path, tools.meta.get("versions", {})))
        meta: dict[str, Any] = {"fs": {"type": fs.kind.value, "tool": fs.tool, "version": fs.version,
                                       "argv": list(fs.argv), "size": fs.size},
                                "added_files": added}
        if o["verity"] is not None:
            params = verity.VerityParams(bytes.fromhex(o["verity"]["salt"]), uuid.UUID(o["verity"]["uuid"]))
            meta["root_hash"] = verity.hash_file(out, params).root_hash.hex()
        return meta
