"""What reprobuild pushes to a registry, as bytes (pure): artifact and referrer manifests and
the referrers fallback index. docs/registry.md describes the layout for other tools.

Specifications: OCI Image Format v1.1 (``manifest.md``: ``artifactType``, ``subject``, the empty
descriptor ``application/vnd.oci.empty.v1+json`` ``{}`` as the config of an artifact;
``annotations.md``: ``org.opencontainers.image.title`` names a layer's file, as ORAS does) and
OCI Distribution v1.1 ("Listing Referrers", "Referrers Tag Schema": a registry without the
referrers API gets an image index tagged ``sha256-<hex of the subject's digest>`` listing the
referrers' descriptors with their ``artifactType`` and annotations). JSON as in
:mod:`reprobuild.rootfs.oci`: keys sorted, no whitespace, so every push of one output and lock
gives the same digests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reprobuild.errors import FormatError
from reprobuild.rootfs.oci import MEDIA_INDEX, MEDIA_MANIFEST, Blob, json_blob, json_bytes, rfc3339

MEDIA_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"

# artifactTypes (the subject's and the referrers') and the layers' media types.
ARTIFACT_DDI = "application/vnd.reprobuild.ddi.v1"
MEDIA_DDI_DISK = "application/vnd.reprobuild.ddi.disk.v1.raw"
MEDIA_BUILD_MANIFEST = "application/vnd.reprobuild.manifest.v1+json"
ARTIFACT_LOCK = "application/vnd.reprobuild.lock.v1"
MEDIA_LOCK = "application/vnd.reprobuild.lock.v1+json"
MEDIA_LOCK_SIGNATURE = "application/vnd.reprobuild.lock.signature.v1"
ARTIFACT_SPDX = "application/spdx+json"
ARTIFACT_CYCLONEDX = "application/vnd.cyclonedx+json"
ARTIFACT_PROVENANCE = "application/vnd.in-toto+json"
MEDIA_DSSE = "application/vnd.dsse.envelope.v1+json"

TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"


@dataclass(frozen=True)
class FileBlob:
    """A file to push as a layer: its descriptor's blob and the file name its title records."""

    blob: Blob
    title: str

    def descriptor(self) -> dict[str, Any]:
        return self.blob.descriptor(annotations={TITLE: self.title})


def empty_config() -> Blob:
    return Blob(MEDIA_EMPTY, "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", 2,
                data=EMPTY_JSON)  # fmt: skip


def artifact_manifest(artifact_type: str, files: Sequence[FileBlob], epoch: int,
                      subject: dict[str, Any] | None = None) -> Blob:  # fmt: skip
    """An image manifest for an artifact (image-spec "Guidelines for Artifact Usage"): the empty
    config, one layer per file, ``artifactType``, and ``subject`` for a referrer."""
    doc: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "artifactType": artifact_type,
        "config": empty_config().descriptor(), "layers": [f.descriptor() for f in files],
        "annotations": {CREATED: rfc3339(epoch)}}  # fmt: skip
    if subject is not None:
        doc["subject"] = {k: subject[k] for k in ("mediaType", "digest", "size")}
    return json_blob(MEDIA_MANIFEST, doc)


def referrer_descriptor(manifest: Blob) -> dict[str, Any]:
    """The descriptor of a referrer as the referrers index lists it."""
    assert manifest.data is not None
    doc = json.loads(manifest.data)
    desc = manifest.descriptor(artifactType=doc["artifactType"])
    if doc.get("annotations"):
        desc["annotations"] = doc["annotations"]
    return desc


def fallback_tag(digest: str) -> str:
    """The referrers tag of a subject (``sha256:<hex>`` → ``sha256-<hex>``)."""
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}-{hex_digest}"


def merge_referrers(existing: bytes | None, added: Sequence[dict[str, Any]]) -> bytes:
    """The fallback index with ``added`` descriptors merged into ``existing`` (by digest; a
    registry's other referrers, from other tools, are kept), sorted by digest."""
    entries = {d["digest"]: d for d in parse_index(existing)} if existing else {}
    for d in added:
        entries[d["digest"]] = d
    return json_bytes({"schemaVersion": 2, "mediaType": MEDIA_INDEX,
                       "manifests": [entries[k] for k in sorted(entries)]})  # fmt: skip


def parse_index(data: bytes) -> list[dict[str, Any]]:
    """The descriptors of an image index (a registry's bytes: malformed is a FormatError)."""
    try:
        doc = json.loads(data)
        manifests = doc["manifests"]
        if not isinstance(manifests, list) or not all(isinstance(m, dict) and isinstance(m.get("digest"), str)
                                                       for m in manifests):  # fmt: skip
            raise ValueError("manifests is not a list of descriptors")
        return manifests
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"malformed image index ({e})") from e


def parse_manifest(data: bytes) -> dict[str, Any]:
    """An image manifest's fields (malformed is a FormatError)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("layers", []), list):
            raise ValueError("not an image manifest")  # noqa: TRY004 - reported like a JSON syntax error
        return doc
    except ValueError as e:
        raise FormatError(f"malformed manifest ({e})") from e
