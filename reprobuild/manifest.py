"""The build manifest (``OUTPUT.manifest.json``): what was built, from which lock, with what.

One typed record, assembled once by the build from the stages' artifacts; its JSON form is
described by ``manifest.schema.json`` beside this module (validated in the tests). Output
formats and their file names are defined here and nowhere else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Output format → the file (or directory) the build writes in the output directory.
OUTPUT_FILES: dict[str, str] = {"directory": "image", "tar": "image.tar", "cpio": "image.cpio", "disk": "image.raw",
                               "oci": "image.oci.tar"}
# Formats older manifests recorded under another name.
FORMAT_ALIASES: dict[str, str] = {"ddi": "disk"}


def output_file(fmt: str) -> str:
    return OUTPUT_FILES[FORMAT_ALIASES.get(fmt, fmt)]


def manifest_file(fmt: str) -> str:
    return output_file(fmt) + ".manifest.json"


@dataclass(frozen=True)
class DiskFields:
    """What the ``ddi`` stage records about the disk (GPT, verity, partitions, file system, boot)."""

    file: str
    architecture: str
    sector_size: int
    disk_guid: str
    verity: str
    root_hash: str | None
    certificate_fingerprint: str | None
    partitions: list[dict[str, Any]]
    filesystem: dict[str, Any]
    boot: dict[str, Any] | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> DiskFields:
        return cls(file=meta["file"], architecture=meta["architecture"], sector_size=meta["sector_size"],
                   disk_guid=meta["disk_guid"], verity=meta["verity"], root_hash=meta.get("root_hash"),
                   certificate_fingerprint=meta.get("certificate_fingerprint"), partitions=list(meta["partitions"]),
                   filesystem=dict(meta["filesystem"]), boot=dict(meta["boot"]) if meta.get("boot") else None)


@dataclass(frozen=True)
class Manifest:
    format: str
    lock_digest: str
    config_digest: str
    source_date_epoch: int
    release: str
    architecture: str
    packages: list[str]
    sha256: str | None = None  # file outputs
    size: int | None = None
    tools: dict[str, Any] | None = None  # disk outputs: the tools that wrote the file systems
    disk: DiskFields | None = None
    # BuildScripts=: the scripts and sources (content digests) and the build-only packages.
    build: dict[str, Any] | None = None
    # Every path reprobuild itself wrote, changed or removed in the tree (not a package's doing),
    # each {"path", "action", "cause"}: the setting or rule that caused it. None: not recorded.
    added_files: list[dict[str, str]] | None = None
    # oci outputs: the image's tag (ref.name) and the digests of its manifest, config and layer.
    oci: dict[str, Any] | None = None
    # ImageId= / ImageVersion= (os-release's IMAGE_ID=, IMAGE_VERSION=); None: not set.
    image_id: str | None = None
    image_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: flat, as earlier releases wrote it (disk fields at the top level)."""
        doc: dict[str, Any] = {
            "format": self.format, "lock_digest": self.lock_digest, "config_digest": self.config_digest,
            "source_date_epoch": self.source_date_epoch, "release": self.release,
            "architecture": self.architecture, "packages": list(self.packages),
        }
        for name in ("sha256", "size", "tools", "build", "added_files", "oci", "image_id", "image_version"):
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        if self.disk is not None:
            d = self.disk
            doc.update({"file": d.file, "sector_size": d.sector_size, "disk_guid": d.disk_guid, "verity": d.verity,
                        "root_hash": d.root_hash, "certificate_fingerprint": d.certificate_fingerprint,
                        "partitions": d.partitions, "filesystem": d.filesystem})
            if d.boot is not None:
                doc["boot"] = d.boot
        return doc

    def dumps(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()
