"""Stage ``oci``: the root tree as an OCI image in its ``oci-archive`` form (a tar of the image
layout: one gzip layer, config, manifest, index; formats in :mod:`reprobuild.rootfs.oci`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from reprobuild.fileio import write_atomically
from reprobuild.lockfile import lock_digest
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.rootfs.oci import ImageFacts, image_blobs, write_layer, write_oci_archive


class OciStage(Stage):
    name = "oci"
    file_name = "image.oci.tar"
    upstream = ("tree",)

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        # The annotations name the lock: a new lock with the same tree is a new image config.
        return {"epoch": ctx.epoch, "image": dataclasses.asdict(_facts(ctx))}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        tree = up.artifact("tree").path
        assert tree is not None
        facts = _facts(ctx)
        layer_path = out.with_name(out.name + ".layer")
        try:
            with open(layer_path, "wb") as f:
                layer = write_layer(tree, f, ctx.epoch)
            index, blobs = image_blobs(facts, layer, layer_path)
            write_atomically(out, lambda f: write_oci_archive(f, index, blobs, ctx.epoch))
        finally:
            layer_path.unlink(missing_ok=True)
        return {"added_files": list(up.meta("tree").get("added_files", [])),
                "oci": {"tag": facts.tag, "manifest_digest": blobs[0].digest, "config_digest": blobs[1].digest,
                        "layer_digest": layer.digest, "layer_size": layer.size, "diff_id": layer.diff_id,
                        "index_digest": index.digest}}


def _facts(ctx: BuildContext) -> ImageFacts:
    lock = ctx.lock
    return ImageFacts(architecture=lock.architecture, epoch=ctx.epoch, release=lock.release,
                      lock_digest=lock_digest(lock), config_digest=lock.config_digest,
                      packages=len(lock.package_set("image").packages))
