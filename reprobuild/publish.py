"""``reprobuild publish``: push a build output and its attestations to an OCI registry.

* an ``oci`` output (``image.oci.tar``): its blobs, image manifest and index exactly as in the
  archive (same digests), the index tagged with the reference's tag;
* a DDI (``image.raw``): an artifact of type :data:`~reprobuild.registry.layout.ARTIFACT_DDI`
  with two layers, the disk and its build manifest;
* attached to that subject as referrers: the signed lock (lock, signature, build manifest), the
  SBOM as SPDX and as CycloneDX, and the in-toto provenance when the output directory holds it.

A registry that answers the subject's ``PUT`` without ``OCI-Subject`` has no referrers API: the
referrers are then listed in the fallback index tagged ``sha256-<hex>``. Everything is pushed by
digest first; the reference's tag is set last, so it never names a subject without its
attachments. Layout: docs/registry.md.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.errors import FormatError, UsageError
from reprobuild.fileio import ReadRefused, read_bounded
from reprobuild.lockfile import SIGNATURE_SUFFIX, Lock, loads, lock_digest, read_lock_bytes
from reprobuild.manifest import manifest_file, output_file
from reprobuild.provenance import PROVENANCE_SUFFIX
from reprobuild.registry.client import RegistryClient, RegistryError
from reprobuild.registry.layout import (
    ARTIFACT_CYCLONEDX,
    ARTIFACT_DDI,
    ARTIFACT_LOCK,
    ARTIFACT_PROVENANCE,
    ARTIFACT_SPDX,
    MEDIA_BUILD_MANIFEST,
    MEDIA_DDI_DISK,
    MEDIA_DSSE,
    MEDIA_LOCK,
    MEDIA_LOCK_SIGNATURE,
    FileBlob,
    artifact_manifest,
    empty_config,
    fallback_tag,
    merge_referrers,
    referrer_descriptor,
)
from reprobuild.registry.reference import Reference
from reprobuild.rootfs.oci import MEDIA_INDEX, MEDIA_MANIFEST, Blob
from reprobuild.sbom import dumps_sbom, make_sbom

Say = Callable[[str], None]
MAX_JSON = 16 << 20
# The file names a lock referrer's layers carry (their titles).
LOCK_TITLE = "reprobuild.lock"


@dataclass(frozen=True)
class Pushed:
    artifact_type: str
    digest: str


@dataclass
class PublishResult:
    reference: str  # registry/repository:tag@digest
    digest: str
    media_type: str
    kind: str  # "oci" or "disk"
    referrers: list[Pushed] = field(default_factory=list)
    referrers_api: bool = False  # False: the fallback tag lists them
    uploaded: int = 0  # blobs uploaded (the others were there already)

    def as_json(self) -> dict[str, Any]:
        return {"schema": "reprobuild-publish/1", "reference": self.reference, "digest": self.digest,
                "mediaType": self.media_type, "kind": self.kind, "referrers_api": self.referrers_api,
                "fallback_tag": None if self.referrers_api else fallback_tag(self.digest),
                "uploaded_blobs": self.uploaded,
                "referrers": [{"artifactType": p.artifact_type, "digest": p.digest} for p in self.referrers]}


def detect_output(output_dir: Path) -> tuple[str, Path]:
    """The output kind (``oci`` or ``disk``) and file in ``output_dir``."""
    found = [(k, output_dir / output_file(k)) for k in ("oci", "disk") if (output_dir / output_file(k)).is_file()]
    if not found:
        raise UsageError(f"{output_dir}: holds no {output_file('oci')} or {output_file('disk')} to publish",
                         hint="build one with reprobuild build -f oci (or -f disk) -o DIR")
    if len(found) > 1:
        raise UsageError(f"{output_dir}: holds both {found[0][1].name} and {found[1][1].name}; "
                         "publish one output directory per image")
    return found[0]


def _sha256_file(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return "sha256:" + sha.hexdigest(), size


def _bytes_blob(media_type: str, data: bytes) -> Blob:
    return Blob(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)


class _Pusher:
    def __init__(self, client: RegistryClient, say: Say) -> None:
        self.client, self.say, self.uploaded = client, say, 0

    def blob(self, blob: Blob, archive: tarfile.TarFile | None = None, member: str | None = None) -> None:
        if archive is not None and member is not None:
            if self.client.blob_exists(blob.digest):
                return
            f = archive.extractfile(member)
            if f is None:
                raise FormatError(f"{member} is not a file in the archive")
            new = self.client.push_blob(blob.digest, blob.size, stream=f)
        else:
            new = self.client.push_blob(blob.digest, blob.size, data=blob.data, path=blob.path)
        if new:
            self.uploaded += 1
            self.say(f"uploaded {blob.digest[:19]}… ({blob.size} bytes)")


def _push_oci(pusher: _Pusher, archive_path: Path) -> Blob:
    """Push the archive's blobs, its manifest and its index (by digest); the index's Blob."""
    try:
        with tarfile.open(archive_path) as tf:
            index_data = tf.extractfile("index.json").read()  # type: ignore[union-attr]
            index = json.loads(index_data)
            [desc] = index["manifests"]
            manifest_name = "blobs/sha256/" + desc["digest"].removeprefix("sha256:")
            manifest_data = tf.extractfile(manifest_name).read()  # type: ignore[union-attr]
            manifest = json.loads(manifest_data)
            for d in [manifest["config"], *manifest["layers"]]:
                member = tf.getmember("blobs/sha256/" + d["digest"].removeprefix("sha256:"))
                if member.size != d["size"]:
                    raise FormatError(f"{member.name} is {member.size} bytes, its descriptor says {d['size']}")
                pusher.blob(Blob(d["mediaType"], d["digest"], d["size"]), tf, member.name)
    except (tarfile.TarError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"{archive_path}: not a readable OCI archive ({e})") from e
    manifest_blob = _bytes_blob(MEDIA_MANIFEST, manifest_data)
    if manifest_blob.digest != desc["digest"]:
        raise FormatError(f"{archive_path}: the manifest's sha256 is not the index's {desc['digest']}")
    pusher.client.put_manifest(manifest_blob.digest, manifest_data, MEDIA_MANIFEST)
    index_blob = _bytes_blob(MEDIA_INDEX, index_data)
    pusher.client.put_manifest(index_blob.digest, index_data, MEDIA_INDEX)
    return index_blob


def publish(output_dir: Path, ref: Reference, lock_path: Path, client: RegistryClient,
            say: Say = lambda _m: None) -> PublishResult:  # fmt: skip
    """Push the output in ``output_dir`` as ``ref`` with its lock, SBOMs and provenance attached."""
    kind, image = detect_output(output_dir)
    manifest_path = output_dir / manifest_file(kind)
    try:
        build_manifest = read_bounded(manifest_path, MAX_JSON)
        manifest = json.loads(build_manifest)
    except (OSError, ValueError, ReadRefused) as e:
        raise UsageError(f"{manifest_path}: unreadable build manifest ({e})") from e
    if not lock_path.is_file():
        raise UsageError(f"{lock_path}: no such lock", hint="name the image's lock with --lock")
    lock_bytes = read_lock_bytes(lock_path)
    lock: Lock = loads(lock_bytes, str(lock_path))
    if manifest.get("lock_digest") != lock_digest(lock):
        raise UsageError(f"{manifest_path.name} names lock {manifest.get('lock_digest')}, not {lock_path} "
                         f"({lock_digest(lock)})", hint="give the lock the output was built from: --lock")  # fmt: skip
    tag = ref.tag or "latest"
    if ref.digest:
        raise UsageError(f"{ref}: publish pushes to a tag; leave out the @digest")
    pusher = _Pusher(client, say)
    epoch = lock.source_date_epoch
    say(f"pushing {image.name} to {ref.registry}/{ref.repository}:{tag}")
    if kind == "oci":
        subject = _push_oci(pusher, image)
    else:
        digest, size = _sha256_file(image)
        disk = FileBlob(Blob(MEDIA_DDI_DISK, digest, size, path=image), image.name)
        man = FileBlob(_bytes_blob(MEDIA_BUILD_MANIFEST, build_manifest), manifest_path.name)
        for b in (empty_config(), disk.blob, man.blob):
            pusher.blob(b)
        subject = artifact_manifest(ARTIFACT_DDI, [disk, man], epoch)
        assert subject.data is not None
        client.put_manifest(subject.digest, subject.data, MEDIA_MANIFEST)
    result = PublishResult(f"{ref.registry}/{ref.repository}:{tag}@{subject.digest}", subject.digest,
                           subject.media_type, kind)  # fmt: skip
    subject_desc = subject.descriptor()

    attachments: list[tuple[str, list[FileBlob]]] = []
    lock_files = [FileBlob(_bytes_blob(MEDIA_LOCK, lock_bytes), LOCK_TITLE)]
    sig = lock_path.with_name(lock_path.name + SIGNATURE_SUFFIX)
    if sig.is_file():
        lock_files.append(FileBlob(_bytes_blob(MEDIA_LOCK_SIGNATURE, read_bounded(sig, MAX_JSON)),
                                   LOCK_TITLE + SIGNATURE_SUFFIX))  # fmt: skip
    else:
        say(f"note: {sig.name} not found: the lock is attached unsigned")
    lock_files.append(FileBlob(_bytes_blob(MEDIA_BUILD_MANIFEST, build_manifest), manifest_path.name))
    attachments.append((ARTIFACT_LOCK, lock_files))
    image_sha = manifest.get("sha256")
    for artifact_type, fmt, suffix in ((ARTIFACT_SPDX, "spdx", ".spdx.json"),
                                       (ARTIFACT_CYCLONEDX, "cyclonedx", ".cdx.json")):  # fmt: skip
        data = dumps_sbom(make_sbom(lock, fmt, None, image.name, image_sha))
        attachments.append((artifact_type, [FileBlob(_bytes_blob(artifact_type, data), image.name + suffix)]))
    provenance = image.with_name(image.name + PROVENANCE_SUFFIX)
    if provenance.is_file():
        data = read_bounded(provenance, MAX_JSON)
        attachments.append((ARTIFACT_PROVENANCE, [FileBlob(_bytes_blob(MEDIA_DSSE, data), provenance.name)]))
    else:
        say(f"note: {provenance.name} not found: no provenance attached")

    api = True
    descriptors = []
    for artifact_type, files in attachments:
        for f in files:
            pusher.blob(f.blob)
        pusher.blob(empty_config())
        referrer = artifact_manifest(artifact_type, files, epoch, subject_desc)
        assert referrer.data is not None
        r = client.put_manifest(referrer.digest, referrer.data, MEDIA_MANIFEST)
        api = api and r.headers.get("OCI-Subject") == subject.digest
        descriptors.append(referrer_descriptor(referrer))
        result.referrers.append(Pushed(artifact_type, referrer.digest))
    if not api:
        tag_name = fallback_tag(subject.digest)
        existing = client.get_manifest(tag_name, missing_ok=True)
        index = merge_referrers(existing.data if existing else None, descriptors)
        client.put_manifest(tag_name, index, MEDIA_INDEX)
        say(f"no referrers API: referrers listed under the tag {tag_name}")
    # The tag moves last: a tag never names a subject whose attachments are not in place.
    assert subject.data is not None
    client.put_manifest(tag, subject.data, subject.media_type)
    result.referrers_api = api
    result.uploaded = pusher.uploaded
    return result


__all__ = ["PublishResult", "RegistryError", "detect_output", "publish"]
