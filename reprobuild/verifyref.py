"""``reprobuild verify REFERENCE``: pull a published image by digest and verify it as a local one.

The tag is resolved to a digest once; everything after is fetched by digest and every manifest
and blob is checked against its sha256 (:mod:`reprobuild.registry.client`) before it is written.
The subject's referrers (the referrers API, else the fallback tag) give the lock, its signature,
the build manifest and the provenance. Files are written under fixed names chosen here, never the
names the registry sends. An ``oci`` image is written back as the ``oci-archive`` it was pushed
from (:func:`reprobuild.rootfs.oci.write_oci_archive` is deterministic, so the archive's sha256 is
the build manifest's when every blob is the original); a DDI as ``image.raw``. Then
:func:`reprobuild.verify.verify_image` runs the same checks as for a local image, with a first
``registry`` check saying what was pulled.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobuild.checkresult import passed
from reprobuild.errors import FormatError
from reprobuild.lockfile import SIGNATURE_SUFFIX, loads
from reprobuild.manifest import manifest_file, output_file
from reprobuild.provenance import PROVENANCE_SUFFIX
from reprobuild.registry.client import RegistryClient, RegistryError
from reprobuild.registry.layout import (
    ARTIFACT_DDI,
    ARTIFACT_LOCK,
    ARTIFACT_PROVENANCE,
    MEDIA_BUILD_MANIFEST,
    MEDIA_DDI_DISK,
    MEDIA_DSSE,
    MEDIA_LOCK,
    MEDIA_LOCK_SIGNATURE,
    fallback_tag,
    parse_index,
    parse_manifest,
)
from reprobuild.registry.reference import Reference
from reprobuild.rootfs.oci import MEDIA_INDEX, MEDIA_MANIFEST, Blob, write_oci_archive
from reprobuild.verify import VerifyOptions, VerifyReport, verify_image

Say = Callable[[str], None]
MAX_SMALL = 16 << 20  # lock, signature, build manifest, provenance


@dataclass(frozen=True)
class Pulled:
    digest: str  # the subject's
    kind: str  # "oci" or "disk"
    image: Path
    manifest: Path
    lock: Path
    provenance: Path | None
    blobs: int  # blobs and manifests fetched, each checked against its sha256
    referrers: tuple[str, ...]  # artifactTypes found


def resolve(client: RegistryClient, ref: Reference) -> str:
    """The digest ``ref`` names: its own ``@digest``, or its tag's current manifest's sha256."""
    if ref.digest:
        return ref.digest
    m = client.get_manifest(ref.tag or "latest")
    assert m is not None
    return m.digest


def list_referrers(client: RegistryClient, digest: str) -> list[dict[str, Any]]:
    """The referrers of ``digest``: the API's index, else the fallback tag's, else none."""
    data = client.referrers_api(digest)
    if data is None:
        m = client.get_manifest(fallback_tag(digest), missing_ok=True)
        if m is None:
            return []
        data = m.data
    return [d for d in parse_index(data) if isinstance(d.get("artifactType"), str)]


def _layers_by_type(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for layer in doc.get("layers", []):
        if isinstance(layer, dict) and isinstance(layer.get("mediaType"), str):
            found.setdefault(layer["mediaType"], layer)
    return found


def _fetch_to(client: RegistryClient, desc: dict[str, Any], path: Path, max_size: int | None = None) -> None:
    digest = desc.get("digest")
    if not isinstance(digest, str):
        raise FormatError(f"descriptor without a digest: {desc}")
    with open(path, "wb") as f:
        size = client.fetch_blob(digest, f, max_size)
    if size != desc.get("size"):
        raise RegistryError(f"blob {digest}: {size} bytes, its descriptor says {desc.get('size')}")


def pull(client: RegistryClient, ref: Reference, work: Path, say: Say = lambda _m: None) -> Pulled:
    """Pull ``ref`` (by digest) and its lock and provenance referrers into ``work``. What the
    registry sends is hostile input: a manifest without the fields it needs is a FormatError."""
    try:
        return _pull(client, ref, work, say)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"{ref}: not an image reprobuild published (malformed manifest: {e!r})") from e


def _pull(client: RegistryClient, ref: Reference, work: Path, say: Say) -> Pulled:
    digest = resolve(client, ref)
    say(f"{ref} is {digest}; pulling by digest")
    top = client.get_manifest(digest)
    assert top is not None
    count = 1
    doc = parse_manifest(top.data)
    media_type = doc.get("mediaType") or top.media_type
    if media_type == MEDIA_INDEX:
        kind = "oci"
        entries = parse_index(top.data)
        if len(entries) != 1 or entries[0].get("mediaType") != MEDIA_MANIFEST:
            raise FormatError(f"{ref}: the index does not name exactly one image manifest, as reprobuild's do")
        desc = entries[0]
        manifest = client.get_manifest(desc["digest"])
        assert manifest is not None
        count += 1
        mdoc = parse_manifest(manifest.data)
        blobs = [Blob(MEDIA_MANIFEST, manifest.digest, len(manifest.data), data=manifest.data)]
        for i, d in enumerate([mdoc["config"], *mdoc["layers"]]):
            path = work / f"blob-{i}"
            _fetch_to(client, d, path)
            count += 1
            blobs.append(Blob(d["mediaType"], d["digest"], d["size"], path=path))
    elif doc.get("artifactType") == ARTIFACT_DDI:
        kind = "disk"
        layers = _layers_by_type(parse_manifest(top.data))
        if MEDIA_DDI_DISK not in layers:
            raise FormatError(f"{ref}: the DDI artifact has no {MEDIA_DDI_DISK} layer")
        _fetch_to(client, layers[MEDIA_DDI_DISK], work / output_file("disk"))
        count += 1
    else:
        raise FormatError(f"{ref}: {media_type} {doc.get('artifactType') or ''} is neither a reprobuild OCI "
                          "image nor a DDI artifact")  # fmt: skip

    referrers = list_referrers(client, digest)
    types = tuple(sorted({d["artifactType"] for d in referrers}))
    say(f"referrers: {', '.join(types) or 'none'}")
    locks = [d for d in referrers if d["artifactType"] == ARTIFACT_LOCK]
    if not locks:
        raise RegistryError(f"{ref}: no lock is attached ({ARTIFACT_LOCK} referrer)",
                            hint="publish attaches it; verify a local image with --lock otherwise")
    lock_path = work / "reprobuild.lock"
    manifest_path = work / manifest_file(kind)
    lock_manifest = client.get_manifest(min(d["digest"] for d in locks))
    assert lock_manifest is not None
    count += 1
    lock_layers = _layers_by_type(parse_manifest(lock_manifest.data))
    for media, path in ((MEDIA_LOCK, lock_path), (MEDIA_LOCK_SIGNATURE, lock_path.with_name(lock_path.name + SIGNATURE_SUFFIX)),
                        (MEDIA_BUILD_MANIFEST, manifest_path)):  # fmt: skip
        if media in lock_layers:
            _fetch_to(client, lock_layers[media], path, MAX_SMALL)
            count += 1
    if not lock_path.exists() or not manifest_path.exists():
        raise FormatError(f"{ref}: the lock referrer lacks the lock or the build manifest")
    image = work / output_file(kind)
    if kind == "oci":
        lock = loads(lock_path.read_bytes(), str(lock_path))
        index = Blob(MEDIA_INDEX, top.digest, len(top.data), data=top.data)
        with open(image, "wb") as f:
            write_oci_archive(f, index, blobs, lock.source_date_epoch)
        for b in blobs:
            if b.path is not None:
                b.path.unlink()
    provenance = None
    for d in referrers:
        if d["artifactType"] == ARTIFACT_PROVENANCE:
            pm = client.get_manifest(d["digest"])
            assert pm is not None
            count += 1
            layers = _layers_by_type(parse_manifest(pm.data))
            if MEDIA_DSSE in layers:
                provenance = work / (image.name + PROVENANCE_SUFFIX)
                _fetch_to(client, layers[MEDIA_DSSE], provenance, MAX_SMALL)
                count += 1
            break
    return Pulled(digest, kind, image, manifest_path, lock_path, provenance, count, types)


def verify_reference(client: RegistryClient, ref: Reference, trusted_key: Path | None, certificates: list[Path],
                     options: VerifyOptions, work_parent: Path | None = None, say: Say = lambda _m: None,
                     fetch_progress: Any = None) -> VerifyReport:  # fmt: skip
    """Pull ``ref`` into a temporary directory (removed afterwards) and verify it."""
    with tempfile.TemporaryDirectory(prefix="reprobuild-pull-", dir=work_parent) as tmp:
        pulled = pull(client, ref, Path(tmp), say)
        if options.provenance is None and pulled.provenance is not None:
            options = dataclasses.replace(options, provenance=pulled.provenance)
        options = dataclasses.replace(options, manifest=pulled.manifest)
        report = verify_image(pulled.image, pulled.lock, trusted_key, certificates, options, say=say,
                              fetch_progress=fetch_progress)  # fmt: skip
    pinned = ref.with_digest(pulled.digest)
    first = passed("registry", f"pulled {pinned} by digest: {pulled.blobs} manifests and blobs, each sha256 "
                               f"checked; attached: {', '.join(pulled.referrers)}")  # fmt: skip
    return dataclasses.replace(report, image=str(pinned), lock=f"{pinned} (attached lock)",
                               checks=(first, *report.checks))  # fmt: skip


__all__ = ["Pulled", "list_referrers", "pull", "resolve", "verify_reference"]
