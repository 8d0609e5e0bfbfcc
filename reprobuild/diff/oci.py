"""OCI images (``build -f oci``: an image layout's archive) compared by what they hold rather than
by their blobs, whose names are their digests: ``index.json``, the manifest and the config field by
field (JSON), and the one layer as a file tree. Specification and layout: docs/formats.md §12."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from reprobuild.diff.archives import compare_containers
from reprobuild.diff.base import Comparator, DiffContext, compare_nodes
from reprobuild.diff.detect import Kind
from reprobuild.diff.difference import Difference
from reprobuild.diff.open import ListContainer, Node, unpacked_limit
from reprobuild.diff.source import ByteSource
from reprobuild.errors import FormatError
from reprobuild.rootfs.oci import decompress_layer, read_documents


class OciComparator(Comparator, kinds={Kind.OCI}):
    """Two OCI images: their documents and their layers' trees. A tar that only looked like an
    image layout (`is_oci_archive` reads one header) is compared as the tar it is."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        try:
            members = [oci_members(n.source, ctx, name or n.name) for n in (a, b)]  # type: ignore[arg-type]
        except FormatError as e:
            plain = [replace(n, kind=Kind.TAR) for n in (a, b)]
            d = compare_nodes(name, plain[0], plain[1], ctx, depth)
            return d and replace(d, comments=(*d.comments, f"compared as plain tar archives: {e.message}"))
        return compare_containers(name, "oci", members[0], members[1], ctx, depth)


def oci_members(src: ByteSource, ctx: DiffContext, what: str) -> ListContainer:
    """An OCI image's ``index.json``, ``manifest.json``, ``config.json`` and ``layer.tar`` (the
    layer decompressed into a temporary file)."""
    with src.open() as f:
        docs = read_documents(f, what)
    return ListContainer([
        Node("index.json", None, ByteSource.of_bytes(docs.index)),
        Node("manifest.json", None, ByteSource.of_bytes(docs.manifest)),
        Node("config.json", None, ByteSource.of_bytes(docs.config)),
        Node("layer.tar", Kind.TAR, oci_layer(src, ctx.temp.new, what)),
    ])  # fmt: skip


def oci_layer(src: ByteSource, new_temp: Callable[[], Path], what: str) -> ByteSource:
    """The image's one layer as an uncompressed tar in a file under ``new_temp()``, within
    `unpacked_limit` of the archive, as for the file systems' extraction. Raises FormatError."""
    out = new_temp() / "layer.tar"
    with src.open() as f:
        decompress_layer(f, out, unpacked_limit(src.length), what)
    return ByteSource.of_file(out)
