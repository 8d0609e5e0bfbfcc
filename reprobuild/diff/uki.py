"""PE images (UKIs): header fields and sections by name, each section's bytes compared as a node.

Uses `reprobuild.image.pe.parse_pe` for the headers. A section's content is its raw data cut to
``VirtualSize`` (ukify's sections are exactly their data; the rest is FileAlignment padding), so
``.cmdline``/``.osrel``/``.uname`` come out as text diffs and ``.initrd`` recurses as cpio or a
compressed stream. The Authenticode signature and the PE checksum follow from the rest of the
file (sbsign's signingTime makes a signature differ on every run): their changes are metadata;
whether the signature is present at all is content.
"""

from __future__ import annotations

import hashlib

from reprobuild.diff.base import Comparator, DiffContext, absorb, compare_nodes
from reprobuild.diff.detect import Kind
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field
from reprobuild.diff.open import Node
from reprobuild.diff.source import ByteSource
from reprobuild.image.pe import PeImage, parse_pe


class PeComparator(Comparator, kinds={Kind.PE}):
    """PE images (UKIs): header fields, then sections by name (.cmdline, .osrel, .initrd …)."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return compare_pe(name, a.source, b.source, ctx, depth)


def _sections(pe: PeImage, src: ByteSource) -> dict[str, tuple[int, ByteSource]]:
    out: dict[str, tuple[int, ByteSource]] = {}
    for s in pe.sections:
        name = s.name
        n = 2
        while name in out:  # repeatable sections (.dtbauto, .efifw): name#2, name#3 …
            name = f"{s.name}#{n}"
            n += 1
        size = min(s.virtual_size or s.size_of_raw_data, s.size_of_raw_data)
        out[name] = (s.characteristics, src.slice(s.pointer_to_raw_data, size))
    return out


def compare_pe(name: str, a: ByteSource, b: ByteSource, ctx: DiffContext, depth: int) -> Difference | None:
    limit = ctx.options.memory_limit
    # Section data is read in place; only the headers (SizeOfHeaders) need to be parsed.
    pa, pb = parse_pe(a.read(limit)), parse_pe(b.read(limit))
    sa, sb = _sections(pa, a), _sections(pb, b)
    details: list[Difference | None] = []
    for s in sa:
        if s not in sb:
            details.append(Difference.removed(s, "section", [f"{sa[s][1].length} bytes"]))
    for s in sb:
        if s not in sa:
            details.append(Difference.added(s, "section", [f"{sb[s][1].length} bytes"]))
            continue
        (ca, xa), (cb, xb) = sa[s], sb[s]
        inner = None if not ctx.may_descend(depth) else compare_nodes(s, Node(s, None, xa), Node(s, None, xb), ctx, depth + 1)
        fields = [Field.of("characteristics", f"{ca:#x}", f"{cb:#x}")]
        details.append(absorb(s, "section", fields, inner))
    order_a = [s for s in sa if s in sb]
    order_b = [s for s in sb if s in sa]
    ta, tb = pa.cert_table, pb.cert_table
    sig_a = hashlib.sha256(a.slice(ta.virtual_address, ta.size).read(limit)).hexdigest()[:16] if ta.size else None
    sig_b = hashlib.sha256(b.slice(tb.virtual_address, tb.size).read(limit)).hexdigest()[:16] if tb.size else None
    fields = [
        Field.of("machine", f"{pa.machine:#x}", f"{pb.machine:#x}"),
        Field.of("section order", ", ".join(order_a), ", ".join(order_b), METADATA) if order_a != order_b else None,
        Field.of("TimeDateStamp", pa.coff["TimeDateStamp"], pb.coff["TimeDateStamp"], METADATA),
        Field.of("SizeOfImage", pa.size_of_image, pb.size_of_image),
        Field.of("CheckSum", f"{pa.optional['CheckSum']:#x}", f"{pb.optional['CheckSum']:#x}", METADATA),
        Field.of("Authenticode signature", "none" if sig_a is None else f"sha256 {sig_a}…",
                 "none" if sig_b is None else f"sha256 {sig_b}…", METADATA),
    ]
    if (sig_a is None) != (sig_b is None):
        fields.append(Field("signed", "no" if sig_a is None else "yes", "no" if sig_b is None else "yes", CONTENT))
    d = Difference.of(name, "pe", fields=fields, details=details)
    if d is None:
        return Difference.of(name, "pe", comments=["sections and headers equal; bytes differ elsewhere (padding?)"],
                             own=CONTENT)  # fmt: skip
    return d
