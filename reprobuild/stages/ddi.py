"""Stage ``ddi``: the Discoverable Disk Image — GPT, the root file system, its dm-verity hash and
signature partitions and, for bootable images, the ESP — written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reprobuild.cache import file_digest
from reprobuild.errors import BuildError
from reprobuild.image.ddi import DdiSpec, build_ddi
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.signer import key_identity, open_signer
from reprobuild.stages.disksettings import choose_verity, update_plan


class DdiStage(Stage):
    name = "ddi"
    file_name = "image.raw"
    # The store keeps no second copy of the disk (as large as the file system and the ESP it is
    # made of, which the store does keep): remade from them when the output is gone or changed,
    # in about the time copying it would take (docs/benchmarks.md).
    keep_output = False

    def __init__(self, *, bootable: bool) -> None:
        self.bootable = bootable
        self.upstream = ("fs", "esp") if bootable else ("fs",)

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {"verity": choose_verity(ctx.spec).mode, "layout": ctx.spec.build.root_layout,
                "architecture": ctx.spec.distribution.architecture, "seed": ctx.lock.seed,
                "label": ctx.spec.build.versioned_name, **self._slots(ctx)}

    @staticmethod
    def _slots(ctx: BuildContext) -> dict[str, Any]:
        """[Updates]: the A/B slot size (only when set, so other definitions keep their keys)."""
        return {"slot_size": ctx.spec.updates.slot_size} if update_plan(ctx.spec, ctx.lock) else {}

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        choice = choose_verity(ctx.spec)
        return {"verity_key": key_identity(choice.key), "verity_cert": file_digest(choice.certificate)}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        choice = choose_verity(ctx.spec)
        esp = up.file("esp") if self.bootable else None
        ctx.say("writing the disk image")
        result = build_ddi(DdiSpec(architecture=ctx.spec.distribution.architecture, seed=bytes.fromhex(ctx.lock.seed),
                                   root_fs_image=up.file("fs"), output=out, verity=choice.mode, esp_image=esp,
                                   layout=ctx.spec.build.root_layout, label=ctx.spec.build.versioned_name,
                                   slot_size=self._slots(ctx).get("slot_size"),
                                   # a signer from the key source (file or PKCS#11 token)
                                   signer=(open_signer(choice.key, choice.certificate, os.environ)
                                           if choice.mode == "signed" else None)))
        meta = {**result.manifest(), "filesystem": dict(up.meta("fs")["fs"]),
                "added_files": list(up.meta("fs").get("added_files", [])),
                # Only for people reading the store (store gc --dry-run), never in a key.
                "definition": ctx.spec.directory.name}
        if self.bootable:
            boot = dict(up.meta("esp")["boot"])
            if result.root_hash != boot["cmdline"].split()[0].split("=", 1)[1]:
                raise BuildError("internal error: the UKI's root hash differs from the image's")
            meta["boot"] = boot
        return meta
