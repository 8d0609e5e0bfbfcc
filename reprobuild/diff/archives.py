"""Archives and compressed streams: .deb members by name, gzip/xz/zstd/bzip2 by their content."""

from __future__ import annotations

import bz2
import lzma
import zlib

from reprobuild.diff.base import Comparator, DiffContext, bytes_difference, compare_nodes
from reprobuild.diff.detect import COMPRESSED, Kind
from reprobuild.diff.difference import METADATA, Difference, Field
from reprobuild.diff.open import ListContainer, Node, ar_members
from reprobuild.diff.source import ByteSource, TooLarge


class DebComparator(Comparator, kinds={Kind.DEB}):
    """A .deb: its ar members (control.tar.*, data.tar.*) compared as nested archives."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return compare_containers(name, "deb", ar_members(a.source), ar_members(b.source), ctx, depth)


def compare_containers(name: str, kind: str, ca: ListContainer, cb: ListContainer, ctx: DiffContext,
                       depth: int) -> Difference | None:  # fmt: skip
    """Members paired by name; member order is metadata."""
    na, nb = ca.member_names(), cb.member_names()
    details: list[Difference | None] = []
    for m in na:
        if m not in nb:
            details.append(Difference.removed(m, "member"))
    for m in nb:
        if m not in na:
            details.append(Difference.added(m, "member"))
        elif not ctx.excluded(m):
            details.append(compare_nodes(m, ca.member(m), cb.member(m), ctx, depth + 1))
    common_a = [m for m in na if m in nb]
    common_b = [m for m in nb if m in na]
    order = Field("member order", ", ".join(common_a), ", ".join(common_b), METADATA) if common_a != common_b else None
    diff = Difference.of(name, kind, fields=[order], details=details)
    if diff is None and ca is not cb:
        # Same members, same order, different bytes: the container's own headers differ.
        return Difference.of(name, kind, comments=["members identical; archive headers differ (timestamps, padding)"],
                             own=METADATA)  # fmt: skip
    return diff


class CompressedComparator(Comparator, kinds=COMPRESSED):
    """gzip/xz/zstd/bzip2: decompress (bounded) and compare what is inside."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        kind = a.resolved_kind()
        try:
            da = decompress(kind, a.source, ctx.options.memory_limit)
            db = decompress(kind, b.source, ctx.options.memory_limit)
        except TooLarge as e:
            return bytes_difference(name, a.source, b.source, [f"not decompressed: {e.message}"])
        inner = _strip_suffix(name.rsplit("/", 1)[-1])
        if da == db:
            note = "compressed bytes differ, decompressed content is identical (compressor header or settings)"
            return Difference.of(name, kind.value, comments=[note], own=METADATA)
        d = compare_nodes(inner, Node(inner, None, ByteSource.of_bytes(da)), Node(inner, None, ByteSource.of_bytes(db)),
                          ctx, depth + 1)  # fmt: skip
        return Difference.of(name, kind.value, details=[d])


def _strip_suffix(name: str) -> str:
    for suffix in (".gz", ".xz", ".zst", ".bz2", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + (".tar" if suffix == ".tgz" else "")
    return name + " (decompressed)"


def decompress(kind: Kind, src: ByteSource, limit: int) -> bytes:
    """Decompress ``src`` (all concatenated frames/members), refusing to produce more than ``limit`` bytes."""
    out = bytearray()

    def add(chunk: bytes) -> None:
        out.extend(chunk)
        if len(out) > limit:
            raise TooLarge(f"decompressed size exceeds {limit >> 20} MiB")

    if kind is Kind.ZSTD:
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(src.open(), read_across_frames=True) as r:
            while chunk := r.read(1 << 20):
                add(chunk)
        return bytes(out)
    factory = {Kind.GZIP: lambda: zlib.decompressobj(wbits=31), Kind.XZ: lzma.LZMADecompressor,
               Kind.BZIP2: bz2.BZ2Decompressor}[kind]  # fmt: skip
    dec = factory()
    pending = b""
    for chunk in src.chunks():
        data = pending + chunk
        while data:
            if kind is Kind.GZIP:
                add(dec.decompress(data, limit + 1 - len(out)))
                data = dec.unconsumed_tail
                if dec.eof:
                    data, dec = dec.unused_data + data, factory()
                    if not data.strip(b"\0"):
                        data = b""
            else:
                add(dec.decompress(data, limit + 1 - len(out)))
                data = b""
                while not dec.needs_input and not dec.eof:
                    add(dec.decompress(b"", limit + 1 - len(out)))
                if dec.eof:
                    data, dec = dec.unused_data, factory()
                    if not data.strip(b"\0"):
                        data = b""
        pending = b""
    return bytes(out)
