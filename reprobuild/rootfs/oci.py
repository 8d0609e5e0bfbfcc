"""OCI images (OCI Image Format Specification v1.1): one gzip layer, its config, the image
manifest, the index, and the ``oci-archive`` form (a tar of the image layout), written
deterministically.

Specification: https://github.com/opencontainers/image-spec (``image-layout.md``,
``manifest.md``, ``config.md``, ``layer.md``, ``annotations.md``, ``descriptor.md``);
the byte layout is described in docs/formats.md §12.

* Layer: the deterministic pax tar of the root tree (:func:`reprobuild.rootfs.archive.write_tar_stream`)
  compressed as one gzip member (RFC 1952) written here: header with MTIME 0, no file name,
  XFL 0, OS 255 (unknown); raw deflate at zlib level 6; CRC32 and ISIZE trailer. The bytes are a
  function of the tree, the epoch and the deflate implementation behind Python's zlib module
  (Debian's zlib; zlib-ng, which some other distributions ship as libz, compresses differently, so
  the layer is reproduced where the same deflate runs; the uncompressed tar and so the diff_id
  never depend on it, and ``verify``'s rebuild names the difference if the host's zlib changes).
  gzip, not zstd: ``application/vnd.oci.image.layer.v1.tar+gzip`` is the layer type every
  runtime, registry and tool reads (umoci, skopeo, podman, Docker); zstd layers are optional.
* JSON blobs: keys sorted, no whitespace (``separators=(",", ":")``), UTF-8.
* The ``oci-archive`` (what containers-transports(5) calls ``oci-archive:``): a ustar archive of
  the image layout — ``blobs/``, ``blobs/sha256/<hex>`` (sorted), ``index.json``, ``oci-layout`` —
  owners 0:0, modes 0755/0644, every mtime the epoch, padded to the 10240-byte record.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from reprobuild.compression import GzipWriter
from reprobuild.errors import BuildError, FormatError
from reprobuild.fileio import HashingWriter
from reprobuild.rootfs.archive import BLOCK, DIRTYPE, RECORD, REGTYPE, ustar_header, write_tar_stream

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYOUT_VERSION = "1.0.0"
# Debian architecture → OCI platform (GOARCH names, and the variant where the spec names one).
PLATFORMS: dict[str, tuple[str, str | None]] = {
    "amd64": ("amd64", None), "arm64": ("arm64", "v8"), "armhf": ("arm", "v7"), "armel": ("arm", "v5"),
    "i386": ("386", None), "ppc64el": ("ppc64le", None), "s390x": ("s390x", None),
    "riscv64": ("riscv64", None), "mips64el": ("mips64le", None), "loong64": ("loong64", None),
}  # fmt: skip
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob of the layout: its descriptor fields and where its bytes are."""

    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    data: bytes | None = None  # small JSON blobs in memory
    path: Path | None = None  # the layer, on disk

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class LayerDigests:
    digest: str  # of the compressed blob
    size: int
    diff_id: str  # of the uncompressed tar


def json_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_blob(media_type: str, doc: dict[str, Any]) -> Blob:
    data = json_bytes(doc)
    return Blob(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def platform(architecture: str) -> dict[str, str]:
    """The OCI platform of a Debian architecture (``os`` is always linux)."""
    if architecture not in PLATFORMS:
        raise BuildError(f"no OCI platform is known for the Debian architecture {architecture!r}",
                         hint=f"known: {', '.join(sorted(PLATFORMS))}")
    arch, variant = PLATFORMS[architecture]
    return {"architecture": arch, "os": "linux", **({"variant": variant} if variant else {})}


class _DiffIdGzip(GzipWriter):
    """The layer's gzip member, hashing the uncompressed bytes too (the layer's diff_id)."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__(out)
        self.raw = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.raw.update(data)
        return super().write(data)


def write_layer(tree: Path, out: BinaryIO, epoch: int) -> LayerDigests:
    """Write the gzip-compressed deterministic tar of ``tree`` to ``out``; return its digests."""
    hashing = HashingWriter(out)
    gz = _DiffIdGzip(hashing)  # type: ignore[arg-type]  # only .write() is used
    write_tar_stream(tree, gz, epoch)  # type: ignore[arg-type]  # only .write() is used
    gz.close()
    return LayerDigests("sha256:" + hashing.hexdigest(), hashing.size, "sha256:" + gz.raw.hexdigest())


@dataclass(frozen=True)
class ImageFacts:
    """What the config and annotations say about the image (all from the lock)."""

    architecture: str  # Debian's
    epoch: int
    release: str
    lock_digest: str
    config_digest: str
    packages: int

    @property
    def tag(self) -> str:
        """The image's name in the layout (``org.opencontainers.image.ref.name``): a valid tag."""
        return f"{self.release}-{self.epoch}"

    def annotations(self) -> dict[str, str]:
        return {
            "org.opencontainers.image.created": rfc3339(self.epoch),
            "org.opencontainers.image.version": self.tag,
            "org.opencontainers.image.revision": self.lock_digest,
            "org.opencontainers.image.description":
                f"Debian {self.release} {self.architecture}, {self.packages} packages, built by reprobuild",
            "io.reprobuild.lock-digest": self.lock_digest,
            "io.reprobuild.config-digest": self.config_digest,
        }  # fmt: skip


def image_config(facts: ImageFacts, diff_id: str) -> dict[str, Any]:
    """The image configuration (config.md): platform, created, the layer's diff_id, no command."""
    created = rfc3339(facts.epoch)
    return {
        **platform(facts.architecture), "created": created,
        "config": {"Env": [f"PATH={DEFAULT_PATH}"], "Labels": facts.annotations()},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "reprobuild build -f oci"}],
    }  # fmt: skip


def image_blobs(facts: ImageFacts, layer: LayerDigests, layer_path: Path) -> tuple[Blob, list[Blob]]:
    """The index and every blob (manifest, config, layer) of the one-image layout."""
    config = json_blob(MEDIA_CONFIG, image_config(facts, layer.diff_id))
    layer_blob = Blob(MEDIA_LAYER_GZIP, layer.digest, layer.size, path=layer_path)
    manifest = json_blob(MEDIA_MANIFEST, {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config.descriptor(),
        "layers": [layer_blob.descriptor()], "annotations": facts.annotations()})  # fmt: skip
    ref = {**facts.annotations(), "org.opencontainers.image.ref.name": facts.tag}
    index = json_blob(MEDIA_INDEX, {
        "schemaVersion": 2, "mediaType": MEDIA_INDEX,
        "manifests": [manifest.descriptor(platform=platform(facts.architecture), annotations=ref)]})  # fmt: skip
    return index, [manifest, config, layer_blob]


def write_oci_archive(out: BinaryIO, index: Blob, blobs: Iterable[Blob], epoch: int) -> None:
    """The image layout as a deterministic ustar archive (the ``oci-archive`` form)."""
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        out.write(data)
        written += len(data)

    def file(name: str, size: int, chunks: Iterable[bytes]) -> None:
        emit(ustar_header(name.encode(), 0o644, 0, 0, size, epoch, REGTYPE))
        n = 0
        for chunk in chunks:
            emit(chunk)
            n += len(chunk)
        if n != size:
            raise BuildError(f"OCI blob {name} is {n} bytes, its descriptor says {size}")
        emit(b"\0" * (-size % BLOCK))

    def content(blob: Blob) -> Iterable[bytes]:
        if blob.data is not None:
            yield blob.data
            return
        assert blob.path is not None
        with open(blob.path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    for d in ("blobs/", "blobs/sha256/"):
        emit(ustar_header(d.encode(), 0o755, 0, 0, 0, epoch, DIRTYPE))
    unique = {b.digest: b for b in blobs}
    for digest in sorted(unique):
        b = unique[digest]
        file("blobs/sha256/" + digest.removeprefix("sha256:"), b.size, content(b))
    assert index.data is not None
    file("index.json", index.size, [index.data])
    layout = json_bytes({"imageLayoutVersion": LAYOUT_VERSION})
    file("oci-layout", len(layout), [layout])
    emit(b"\0" * 2 * BLOCK)
    emit(b"\0" * (-written % RECORD))


@dataclass(frozen=True)
class ArchiveDocuments:
    """The JSON documents of an oci-archive as stored (``index.json``, the manifest, the config)."""

    index: bytes
    manifest: bytes
    config: bytes


def _manifest(outer: tarfile.TarFile) -> tuple[bytes, bytes, dict[str, Any]]:
    """index.json, the manifest's bytes and the manifest, of the archive's one image. Raises the
    KeyError/ValueError/TypeError of a malformed index or manifest."""
    index = _member(outer, "index.json", 1 << 20)
    [desc] = json.loads(index)["manifests"]
    manifest = _member(outer, _blob_name(desc["digest"]), 1 << 20)
    doc = json.loads(manifest)
    if not isinstance(doc, dict):
        raise TypeError("the manifest is not a JSON object")
    return index, manifest, doc


def _layer(outer: tarfile.TarFile) -> BinaryIO:
    """The single gzip layer of an open oci-archive, as a file object of its compressed bytes.
    Raises FormatError, or the KeyError/ValueError/TypeError of a malformed index or manifest."""
    [layer] = _manifest(outer)[2]["layers"]
    if layer.get("mediaType") != MEDIA_LAYER_GZIP:
        raise FormatError(f"layer type {layer.get('mediaType')!r} is not {MEDIA_LAYER_GZIP}")
    f = outer.extractfile(outer.getmember(_blob_name(layer["digest"])))
    if f is None:
        raise FormatError("the layer is not a regular file")
    return f


# What reading a hostile oci-archive can raise besides FormatError: a malformed index or manifest,
# a damaged tar or gzip stream.
_ARCHIVE_ERRORS = (tarfile.TarError, KeyError, TypeError, ValueError, AttributeError, OSError, EOFError, zlib.error)


def _open(archive: Path | BinaryIO) -> tarfile.TarFile:
    return tarfile.open(archive) if isinstance(archive, Path) else tarfile.open(fileobj=archive)


def is_oci_archive(head: bytes) -> bool:
    """Whether a tar starting with the 512-byte header ``head`` looks like an image layout's
    archive: its first member is ``blobs/`` (as in this module's archives and in skopeo's and
    podman's, which list the layout in name order) or ``oci-layout``. A guess from one header: a
    reader falls back to the plain tar when the layout is not there."""
    if len(head) < 512 or head[257:262] != b"ustar":
        return False
    name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace").removeprefix("./").rstrip("/")
    return name in ("blobs", "blobs/sha256", "oci-layout") or name.startswith("blobs/sha256/")


def read_layer_file(archive: Path, name: str, limit: int = 64 << 20) -> bytes | None:
    """The bytes of ``name`` (``var/lib/dpkg/status``) in the single layer of the oci-archive at
    ``archive``, or None if the layer has no such regular file. Reads hostile input: a malformed
    archive, index or manifest is a :class:`FormatError`; the layer is streamed, never extracted."""
    try:
        with tarfile.open(archive) as outer, tarfile.open(fileobj=_layer(outer), mode="r|gz") as tf:
            for m in tf:
                if m.name.removeprefix("./") == name and m.isfile():
                    if m.size > limit:
                        raise FormatError(f"{name} in the layer is larger than {limit} bytes")
                    data = tf.extractfile(m)
                    return data.read() if data else None
        return None
    except _ARCHIVE_ERRORS as e:
        raise FormatError(f"{archive}: not a readable OCI image ({e})") from e


def read_documents(archive: Path | BinaryIO, what: str) -> ArchiveDocuments:
    """The index, manifest and config of the oci-archive ``archive`` (a path, or an open file
    named ``what`` in messages). Raises FormatError for a malformed archive."""
    try:
        with _open(archive) as outer:
            index, manifest, doc = _manifest(outer)
            config = _member(outer, _blob_name(doc["config"]["digest"]), 1 << 20)
    except _ARCHIVE_ERRORS as e:
        raise FormatError(f"{what}: not a readable OCI image ({e})") from e
    return ArchiveDocuments(index, manifest, config)


def decompress_layer(archive: Path | BinaryIO, out: Path, limit: int, what: str | None = None) -> None:
    """Write the single layer of the oci-archive ``archive`` (a path, or an open file named
    ``what`` in messages) to ``out`` as its uncompressed tar (the diff_id's bytes), at most
    ``limit`` bytes (a gzip bomb stops there). Raises FormatError for a malformed archive or layer."""
    what = what or str(archive)
    try:
        with _open(archive) as outer, open(out, "wb") as dst:
            layer = _layer(outer)
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member, as write_layer makes
            written = 0
            while chunk := layer.read(1 << 20):
                data = inflate.decompress(chunk, limit - written + 1)
                written += len(data)
                if written > limit:
                    raise FormatError(f"{what}: the layer decompresses to more than {limit} bytes")
                dst.write(data)
            if not inflate.eof:
                raise FormatError(f"{what}: the layer's gzip stream is truncated")
    except _ARCHIVE_ERRORS as e:
        raise FormatError(f"{what}: not a readable OCI image ({e})") from e


def _blob_name(digest: object) -> str:
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise ValueError(f"bad digest {digest!r}")
    return "blobs/sha256/" + digest[7:]


def _member(tf: tarfile.TarFile, name: str, limit: int) -> bytes:
    m = tf.getmember(name)
    f = tf.extractfile(m)
    if f is None or m.size > limit:
        raise ValueError(f"{name} is not a regular file of at most {limit} bytes")
    return f.read()
