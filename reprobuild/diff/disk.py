"""Disk-level comparison: GPT fields, partitions matched by type and label, dm-verity and its signature.

Partitions are compared by bytes first (a chunked compare that stops at the first difference);
only differing ones are looked into. A verity pair (data + hash partition) is checked whenever
either side of it differs: the root hash is read from the hash partition (``H(salt || top
block)``) and the whole tree is recomputed from the data to say whether each hash partition
still matches its data. When both do, a changed root hash only *follows* from the data
partition's change (reported on its own) and is classified metadata.

Verity-protected erofs and ext4 pairs take the hash-tree path instead (`verity_trees`): the two
stored trees are compared top down to find the data blocks that differ, without reading the data
or recomputing the trees (each tree is trusted to describe its data), and the file systems are
compared only where those blocks lie (`diff/erofstree.py`, `diff/ext4tree.py`). The bytes between partitions are
compared on their own, since two disks are never read whole.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from reprobuild.diff.base import Comparator, DiffContext, absorb, compare_nodes
from reprobuild.diff.detect import Kind
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field
from reprobuild.diff.open import ChangedBlocks, DiffInputError, Node
from reprobuild.diff.source import ByteSource, same_bytes
from reprobuild.errors import FormatError
from reprobuild.image import erofs, ext4, gpt, ids, verity

# veritysig (and with it cryptography) is imported only when a signature partition differs:
# it costs 0.3 s, more than comparing two identical 1 GiB images takes.

_DATA_OF_HASH = {ids.Role.ROOT_VERITY: ids.Role.ROOT, ids.Role.USR_VERITY: ids.Role.USR}
_HASH_OF_SIG = {ids.Role.ROOT_VERITY_SIG: ids.Role.ROOT_VERITY, ids.Role.USR_VERITY_SIG: ids.Role.USR_VERITY}


@dataclass(frozen=True)
class Part:
    """A partition of one disk with its bytes and DPS role (None outside the DPS table)."""

    key: tuple[uuid.UUID, str]  # (type GUID, label): how partitions are matched across disks
    entry: gpt.GptPartition
    role: ids.Role | None
    source: ByteSource
    index: int

    @property
    def label(self) -> str:
        return self.entry.name or f"partition {self.index + 1}"


def read_disk(src: ByteSource, what: str) -> tuple[gpt.GptDisk, list[Part]]:
    """Parse and validate the GPT; raises DiffInputError (bad CRC, truncated image …)."""
    try:
        with src.open() as f:
            disk = gpt.read_gpt(f)
    except FormatError as e:
        raise DiffInputError(f"{what}: {e.message}") from e
    parts = []
    for i, p in enumerate(disk.partitions):
        t = ids.type_by_guid(p.type_guid)
        parts.append(Part((p.type_guid, p.name), p, t.role if t else None,
                          src.slice(p.offset(disk.sector_size), p.size(disk.sector_size)), i))  # fmt: skip
    return disk, parts


def type_name(guid: uuid.UUID) -> str:
    t = ids.type_by_guid(guid)
    return t.default_label if t else str(guid)


def _attrs(a: int) -> str:
    names = [n for bit, n in ((ids.FLAG_GROWFS, "growfs"), (ids.FLAG_READ_ONLY, "read-only"),
                              (ids.FLAG_NO_AUTO, "no-auto")) if a & bit]  # fmt: skip
    rest = a & ~(ids.FLAG_GROWFS | ids.FLAG_READ_ONLY | ids.FLAG_NO_AUTO)
    if rest:
        names.append(f"{rest:#x}")
    return f"{a:#018x}" + (f" ({', '.join(names)})" if names else "")


def data_partition(src: ByteSource) -> ByteSource | None:
    """The root (else usr) partition's bytes, for comparing a disk with a plain file tree."""
    _, parts = read_disk(src, "disk")
    for role in (ids.Role.ROOT, ids.Role.USR):
        for p in parts:
            if p.role is role:
                return p.source
    return None


def compare_disks(name: str, a: ByteSource, b: ByteSource, ctx: DiffContext, depth: int) -> Difference | None:
    """The disk-level difference: header fields, then one node per differing partition."""
    da, pa = read_disk(a, "first image")
    db, pb = read_disk(b, "second image")
    fields = [
        Field.of("size", da.size_bytes, db.size_bytes),
        Field.of("sector size", da.sector_size, db.sector_size),
        Field.of("disk GUID", da.disk_guid, db.disk_guid, METADATA),
        Field.of("first usable LBA", da.first_usable, db.first_usable, METADATA),
        Field.of("last usable LBA", da.last_usable, db.last_usable, METADATA),
    ]
    by_a = {p.key: p for p in pa}
    by_b = {p.key: p for p in pb}
    common_a = [p.key for p in pa if p.key in by_b]
    common_b = [p.key for p in pb if p.key in by_a]
    if common_a != common_b:
        fields.append(Field("partition order", ", ".join(k[1] for k in common_a), ", ".join(k[1] for k in common_b),
                            METADATA))  # fmt: skip
    trees = verity_trees(pa, pb)
    same = _SameBytes()  # a data partition is compared once, also when its verity pair asks again
    details: list[Difference | None] = []
    for p in pa:
        if p.key not in by_b:
            details.append(Difference.removed(p.label, "partition", [_describe(p, da.sector_size)]))
    for p in pb:
        if p.key not in by_a:
            details.append(Difference.added(p.label, "partition", [_describe(p, db.sector_size)]))
    for key in common_a:
        x, y = by_a[key], by_b[key]
        if ctx.excluded(x.label):
            continue
        pf = [
            Field.of("type", type_name(x.entry.type_guid), type_name(y.entry.type_guid)),
            Field.of("UUID", x.entry.unique_guid, y.entry.unique_guid, METADATA),
            Field.of("offset", x.entry.offset(da.sector_size), y.entry.offset(db.sector_size), METADATA),
            Field.of("size", x.source.length, y.source.length),
            Field.of("attributes", _attrs(x.entry.attributes), _attrs(y.entry.attributes)),
        ]
        content: list[Difference | None] = []
        tree = trees.get(x.role) if x.role is not None else None
        if isinstance(tree, VerityTrees):
            content.append(_tree_pair(x, y, tree, ctx, depth))
        elif x.role in _DATA_OF_HASH and isinstance(trees.get(_DATA_OF_HASH[x.role]), VerityTrees):
            content.append(None if same(x.source, y.source) else
                           compare_verity("verity", x.source, y.source, None, None, trusted=True))  # fmt: skip
        elif x.role in _DATA_OF_HASH:
            content.append(_verity_pair(x, y, pa, pb, same))
        elif x.role in _HASH_OF_SIG:
            content.append(_sig_pair(x, y, pa, pb, same))
        elif not same(x.source, y.source):
            d = compare_nodes(x.label, Node(x.label, None, x.source), Node(y.label, None, y.source), ctx, depth + 1,
                              strict=True)  # fmt: skip
            content.append(replace(d, comments=(tree, *d.comments)) if d is not None and tree is not None else d)
        details.append(absorb(x.label, "partition", pf, content[0] if content else None))
    details.extend(_gaps(a, b, da, db, pa, pb))
    return Difference.of(name, "disk", fields=fields, details=details)


class _SameBytes:
    """`same_bytes` remembered per pair of byte ranges, for one disk comparison."""

    def __init__(self) -> None:
        self._known: dict[tuple[ByteSource, ByteSource], bool] = {}

    def __call__(self, a: ByteSource, b: ByteSource) -> bool:
        key = (a, b)
        if key not in self._known:
            self._known[key] = same_bytes(a, b)
        return self._known[key]


def _gaps(whole_a: ByteSource, whole_b: ByteSource, da: gpt.GptDisk, db: gpt.GptDisk, pa: list[Part],
          pb: list[Part]) -> list[Difference | None]:  # fmt: skip
    """Bytes of the usable area outside every partition, when both disks share one layout
    (the whole disks are not compared byte by byte: see `compare_nodes`)."""
    layout = [(p.entry.first_lba, p.entry.last_lba) for p in pa]
    if (da.sector_size, da.first_usable, da.last_usable, layout) != \
            (db.sector_size, db.first_usable, db.last_usable, [(p.entry.first_lba, p.entry.last_lba) for p in pb]):
        return []  # a different layout is reported by the header and partition fields
    out: list[Difference | None] = []
    lba = da.first_usable
    for first, last in sorted(layout) + [(da.last_usable + 1, da.last_usable + 1)]:
        if first > lba:
            off, n = lba * da.sector_size, (first - lba) * da.sector_size
            if off + n <= min(whole_a.length, whole_b.length) and not same_bytes(whole_a.slice(off, n),
                                                                                  whole_b.slice(off, n)):
                out.append(Difference.of(f"unpartitioned bytes at offset {off}", "bytes",
                                         comments=[f"{n} bytes outside every partition differ"], own=CONTENT))
        lba = max(lba, last + 1)
    return out


class DiskComparator(Comparator, kinds={Kind.DISK}):
    """GPT disks: header fields, partitions matched by type and label, verity, then contents."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return compare_disks(name, a.source, b.source, ctx, depth)


def _describe(p: Part, ss: int) -> str:
    return f"{type_name(p.entry.type_guid)}, {p.source.length} bytes at offset {p.entry.offset(ss)}"


def _partner(parts: list[Part], role: ids.Role) -> Part | None:
    return next((p for p in parts if p.role is role), None)


# -- verity --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerityState:
    sb: verity.VeritySuperblock
    root_hash: str | None
    matches_data: bool | None  # None: no data partition to check against
    problem: str | None = None


def verity_state(hash_src: ByteSource, data_src: ByteSource | None, signed_root: str | None = None) -> VerityState:
    """Superblock, root hash (from the hash device's top block) and whether the tree fits the data.

    With a single data block there is no tree on disk and the root hash is H(salt || block): then
    only ``signed_root`` (from the signature partition) can show a mismatch.
    Cost: reading the superblock and top block; with ``data_src``, one pass over the data.
    """
    try:
        sb = verity.parse_superblock(hash_src.head(verity.SB_SIZE))
    except FormatError as e:
        raise DiffInputError(f"verity hash partition: {e.message}") from e
    p = sb.params
    root: str | None = None
    if sb.data_blocks > 1 and hash_src.length >= 2 * p.hash_block_size:
        top = hash_src.slice(p.hash_block_size, p.hash_block_size).head(p.hash_block_size)
        root = hashlib.new(p.hash_name, p.salt + top).hexdigest()
    if data_src is None:
        return VerityState(sb, root, None)
    if data_src.length < sb.data_blocks * p.data_block_size:
        return VerityState(sb, root, False, "the data partition is smaller than the superblock says")
    with data_src.open() as f:
        tree = verity.build_tree(f, sb.data_blocks, p)
    expected = b"".join(tree.tree_bytes())
    stored_len = min(len(expected), max(0, hash_src.length - p.hash_block_size))
    stored = hash_src.slice(p.hash_block_size, stored_len).read(len(expected)) if stored_len else b""
    root = root or tree.root_hash.hex()
    ok = stored == expected and tree.root_hash.hex() == root
    if ok and signed_root is not None and signed_root != root:
        return VerityState(sb, root, False, "the data partition does not give the signed root hash")
    return VerityState(sb, root, ok, None if ok else "the hash tree does not match the data partition")


def compare_verity(name: str, a: ByteSource, b: ByteSource, data_a: ByteSource | None, data_b: ByteSource | None,
                   signed_a: str | None = None, signed_b: str | None = None,
                   trusted: bool = False) -> Difference | None:  # fmt: skip
    """``trusted``: the data partitions were compared through these hash trees (`verity_trees`), so
    the trees are taken to describe their data and are not recomputed."""
    sa, sb_ = verity_state(a, data_a, signed_a), verity_state(b, data_b, signed_b)
    pa, pb = sa.sb.params, sb_.sb.params
    consistent = trusted or (sa.matches_data is True and sb_.matches_data is True)
    # With both trees matching their data, the root hash only follows from the data partition.
    root_class = METADATA if consistent else CONTENT
    fields = [
        Field.of("root hash", sa.root_hash, sb_.root_hash, root_class),
        Field.of("hash tree matches data", _yes(sa.matches_data), _yes(sb_.matches_data)),
        Field.of("salt", pa.salt.hex(), pb.salt.hex(), METADATA),
        Field.of("superblock UUID", pa.uuid, pb.uuid, METADATA),
        Field.of("hash algorithm", pa.hash_name, pb.hash_name),
        Field.of("data block size", pa.data_block_size, pb.data_block_size),
        Field.of("hash block size", pa.hash_block_size, pb.hash_block_size),
        Field.of("data blocks", sa.sb.data_blocks, sb_.sb.data_blocks),
    ]
    comments = [f"{side}: {s.problem}" for side, s in (("first", sa), ("second", sb_)) if s.problem]
    if trusted and sa.root_hash != sb_.root_hash:
        comments.append("the root hash change follows from the data partition (hash trees compared, not recomputed "
                        "from the data: `reprobuild verify` checks an image against its tree)")
    elif consistent and sa.root_hash != sb_.root_hash:
        comments.append("both hash trees match their data: the root hash change follows from the data partition")
    d = Difference.of(name, "verity", fields=fields, comments=comments)
    if d is None and not same_bytes(a, b):
        return Difference.of(name, "verity", comments=["hash partitions differ only outside the hash tree (padding)"],
                             own=METADATA)  # fmt: skip
    return d


class VerityHashComparator(Comparator, kinds={Kind.VERITY_HASH}):
    """Two verity hash devices on their own (without their data): superblock and root hash."""

    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return compare_verity(name, a.source, b.source, None, None)


def _yes(v: bool | None) -> str | None:
    return None if v is None else ("yes" if v else "no")


def _verity_pair(x: Part, y: Part, pa: list[Part], pb: list[Part],
                 same: Callable[[ByteSource, ByteSource], bool] = same_bytes) -> Difference | None:  # fmt: skip
    role = _DATA_OF_HASH[x.role]  # type: ignore[index]
    xa, ya = _partner(pa, role), _partner(pb, role)
    hash_same = same(x.source, y.source)
    data_same = xa is not None and ya is not None and same(xa.source, ya.source)
    if hash_same and data_same:
        return None
    sig_role = next(k for k, v in _HASH_OF_SIG.items() if v is x.role)
    return compare_verity("verity", x.source, y.source, xa.source if xa else None, ya.source if ya else None,
                          _signed_root(pa, sig_role), _signed_root(pb, sig_role))  # fmt: skip


def _signed_root(parts: list[Part], sig_role: ids.Role) -> str | None:
    from reprobuild.image import veritysig

    p = _partner(parts, sig_role)
    if p is None:
        return None
    try:
        return veritysig.parse_verity_sig(p.source.read(1 << 20)).root_hash
    except FormatError:
        return None  # reported when the signature partitions are compared


# -- verity hash trees as an index of changed blocks ---------------------------------------------


@dataclass(frozen=True)
class VerityTrees:
    """A data partition pair whose hash trees have the same shape: the blocks that differ."""

    changed: ChangedBlocks
    bytes_read: int  # of the two hash partitions
    kind: Kind  # the data partitions' file system (one of MAPPED_FILE_SYSTEMS)


# File systems whose files sit at fixed blocks and are read in place: changed data blocks can be
# mapped to the files that own them.
MAPPED_FILE_SYSTEMS = frozenset({Kind.EROFS, Kind.EXT4})


def verity_trees(pa: list[Part], pb: list[Part]) -> dict[ids.Role, VerityTrees | str]:
    """For each data role (root, usr) whose pair can be compared through its hash trees: which
    data blocks differ. That needs, on both disks, an erofs or ext4 data partition (a file system
    read in place whose files sit at fixed blocks: `erofstree`, `ext4tree`) and a verity partition with the same salt, hash, block sizes and
    data block count. For other pairs with verity on both sides: why not (they are compared by
    bytes and extraction instead, and the output says so).
    Cost: two superblocks, then two hash blocks per tree level per differing region.
    """
    out: dict[ids.Role, VerityTrees | str] = {}
    for hash_role, data_role in _DATA_OF_HASH.items():
        xa, ya, ha, hb = (_partner(pa, data_role), _partner(pb, data_role), _partner(pa, hash_role),
                          _partner(pb, hash_role))  # fmt: skip
        if xa is None or ya is None or ha is None or hb is None or xa.key != ya.key or ha.key != hb.key:
            continue
        kind = _fs_kind(xa.source)
        if kind not in MAPPED_FILE_SYSTEMS or _fs_kind(ya.source) is not kind:
            out[data_role] = ("not compared through the hash trees: they are mapped to files only for erofs and "
                              "ext4 (other file systems are compared file by file)")
            continue
        try:
            sa = verity.parse_superblock(ha.source.head(verity.SB_SIZE))
            sb = verity.parse_superblock(hb.source.head(verity.SB_SIZE))
        except FormatError:
            continue  # reported by the verity partition's own comparison
        out[data_role] = "not compared through the hash trees: their salt, block sizes or data sizes differ"
        if (sa.params.salt, sa.params.hash_name, sa.params.data_block_size, sa.params.hash_block_size,
                sa.data_blocks) != (sb.params.salt, sb.params.hash_name, sb.params.data_block_size,
                                    sb.params.hash_block_size, sb.data_blocks):  # fmt: skip
            continue
        bs = sa.params.data_block_size
        covered = sa.data_blocks * bs
        tree_end = (1 + sum(verity.level_sizes(sa.data_blocks, sa.params))) * sa.params.hash_block_size
        if min(xa.source.length, ya.source.length) < covered or min(ha.source.length, hb.source.length) < tree_end:
            continue
        counter = [0]
        try:
            blocks = verity.changed_data_blocks(_reader(ha.source, counter), _reader(hb.source, counter), sa)
        except FormatError:
            continue
        if blocks is None:
            continue
        changed = set(blocks)
        # Bytes after the protected area (padding): compared directly; a difference there is
        # reported as changed blocks that no file owns.
        tail_a = xa.source.slice(covered, xa.source.length - covered)
        tail_b = ya.source.slice(covered, ya.source.length - covered)
        if not same_bytes(tail_a, tail_b):
            changed.update(range(sa.data_blocks, -(-max(xa.source.length, ya.source.length) // bs)))
        out[data_role] = VerityTrees(ChangedBlocks(frozenset(changed), bs, sa.data_blocks), counter[0], kind)
    return out


def _reader(src: ByteSource, counter: list[int]) -> Callable[[int, int], bytes]:
    """``read_at(offset, n)`` over ``src`` that adds what it reads to ``counter[0]``."""

    def read_at(off: int, n: int) -> bytes:
        counter[0] += n
        return src.slice(off, n).head(n)

    return read_at


def _fs_kind(src: ByteSource) -> Kind | None:
    """erofs or ext4 by its superblock magic, else None."""
    head = src.head(ext4.SUPER_OFFSET + 0x3A)
    if len(head) < ext4.SUPER_OFFSET + 0x3A:
        return None
    if int.from_bytes(head[erofs.SUPER_OFFSET:erofs.SUPER_OFFSET + 4], "little") == erofs.MAGIC:
        return Kind.EROFS
    if int.from_bytes(head[ext4.SUPER_OFFSET + 0x38:ext4.SUPER_OFFSET + 0x3A], "little") == ext4.MAGIC:
        return Kind.EXT4
    return None


def _tree_pair(x: Part, y: Part, tree: VerityTrees, ctx: DiffContext, depth: int) -> Difference | None:
    ch = tree.changed
    if not ch.blocks and x.source.length == y.source.length:
        return None
    note = (f"compared through the dm-verity hash trees: {len(ch.blocks)} of {ch.total} data blocks differ "
            f"({tree.bytes_read // 1024} KiB of hash tree read)")  # fmt: skip
    d = compare_nodes(x.label, Node(x.label, tree.kind, x.source, changed=ch),
                      Node(y.label, tree.kind, y.source, changed=ch), ctx, depth + 1, strict=True)  # fmt: skip
    if d is None:
        return None
    return replace(d, comments=(note, *d.comments))


# -- verity signature ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SigState:
    sig: Any  # veritysig.VeritySignature
    valid: str  # "valid" or "invalid: why"
    matches_hash: bool | None


def sig_state(src: ByteSource, root_hash: str | None) -> SigState:
    from reprobuild.image import veritysig

    try:
        sig = veritysig.parse_verity_sig(src.read(1 << 20))
    except FormatError as e:
        raise DiffInputError(f"verity signature partition: {e.message}") from e
    valid = "valid"
    try:
        from cryptography.hazmat.primitives.serialization import pkcs7

        certs = pkcs7.load_der_pkcs7_certificates(sig.signature)
        if not certs:
            valid = "invalid: no certificate embedded"
        else:
            veritysig.check_verity_sig(sig, sig.root_hash, certs[0])
    except FormatError as e:
        valid = f"invalid: {e.message}"
    except Exception as e:  # noqa: BLE001 - any PKCS#7 decoding failure means "not valid"
        valid = f"invalid: {type(e).__name__}: {e}"
    return SigState(sig, valid, None if root_hash is None else sig.root_hash == root_hash)


def compare_verity_sig(name: str, a: ByteSource, b: ByteSource, root_a: str | None,
                       root_b: str | None) -> Difference | None:  # fmt: skip
    sa, sb = sig_state(a, root_a), sig_state(b, root_b)
    derived = sa.valid == sb.valid == "valid" and sa.matches_hash is not False and sb.matches_hash is not False
    cls = METADATA if derived else CONTENT
    fields = [
        Field.of("signed root hash", sa.sig.root_hash, sb.sig.root_hash, cls),
        Field.of("certificate fingerprint", sa.sig.certificate_fingerprint, sb.sig.certificate_fingerprint),
        Field.of("signature", hashlib.sha256(sa.sig.signature).hexdigest()[:16] + "…",
                 hashlib.sha256(sb.sig.signature).hexdigest()[:16] + "…", cls),
        Field.of("signature validity", sa.valid, sb.valid),
        Field.of("matches the verity root hash", _yes(sa.matches_hash), _yes(sb.matches_hash)),
    ]
    comments = ["both signatures are valid: the change follows from the root hash"] if derived else []
    d = Difference.of(name, "verity-sig", fields=fields, comments=comments if any(fields) else [])
    if d is None and not same_bytes(a, b):
        return Difference.of(name, "verity-sig", comments=["same signature, different JSON formatting or padding"],
                             own=METADATA)  # fmt: skip
    return d


class VeritySigComparator(Comparator, kinds={Kind.VERITY_SIG}):
    def compare(self, name: str, a: Node, b: Node, ctx: DiffContext, depth: int) -> Difference | None:
        assert a.source is not None and b.source is not None
        return compare_verity_sig(name, a.source, b.source, None, None)


def _sig_pair(x: Part, y: Part, pa: list[Part], pb: list[Part],
              same: Callable[[ByteSource, ByteSource], bool] = same_bytes) -> Difference | None:  # fmt: skip
    hash_role = _HASH_OF_SIG[x.role]  # type: ignore[index]
    ha, hb = _partner(pa, hash_role), _partner(pb, hash_role)
    if same(x.source, y.source) and (ha is None or hb is None or same(ha.source, hb.source)):
        return None
    ra = verity_state(ha.source, None).root_hash if ha else None
    rb = verity_state(hb.source, None).root_hash if hb else None
    return compare_verity_sig("verity signature", x.source, y.source, ra, rb)


# -- file-system superblocks (for images that differ but hold the same files) --------------------

# erofs_super_block (erofs_fs.h) at offset 1024: magic, checksum, feature_compat, blkszbits,
# sb_extslots, root_nid, inos, build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr,
# uuid[16], volume_name[16], feature_incompat.
EROFS_SB = struct.Struct("<IIIBBHQQIIII16s16sI")
# squashfs_super_block (squashfs_fs.h) at 0: s_magic, inodes, mkfs_time, block_size, fragments,
# compression, block_log, flags, no_ids, s_major, s_minor, root_inode, bytes_used.
SQUASHFS_SB = struct.Struct("<IIIIIHHHHHHQQ")
# ext4_super_block (ext4.h) at 1024: s_uuid at 0x68, s_volume_name at 0x78, s_mtime 0x2C, s_wtime 0x30,
# s_mkfs_time 0x108, s_hash_seed 0xEC.


def superblock_fields(kind: Kind, a: ByteSource, b: ByteSource) -> list[Field | None]:
    """Superblock fields that explain a byte difference between images holding the same files."""
    ha, hb = a.head(4096), b.head(4096)
    try:
        if kind is Kind.EROFS:
            x, y = EROFS_SB.unpack_from(ha, 1024), EROFS_SB.unpack_from(hb, 1024)
            return [Field.of("UUID", uuid.UUID(bytes=x[12]), uuid.UUID(bytes=y[12]), METADATA),
                    Field.of("build time", x[7], y[7], METADATA),
                    Field.of("volume name", x[13].rstrip(b"\0"), y[13].rstrip(b"\0"), METADATA),
                    Field.of("blocks", x[9], y[9]), Field.of("feature flags", (x[2], x[14]), (y[2], y[14]))]  # fmt: skip
        if kind is Kind.SQUASHFS:
            x, y = SQUASHFS_SB.unpack_from(ha, 0), SQUASHFS_SB.unpack_from(hb, 0)
            return [Field.of("mkfs time", x[2], y[2], METADATA), Field.of("compression", x[5], y[5]),
                    Field.of("block size", x[3], y[3]), Field.of("bytes used", x[12], y[12])]  # fmt: skip
        if kind is Kind.EXT4:
            sa, sb = ha[1024:2048], hb[1024:2048]
            u = lambda s: uuid.UUID(bytes=bytes(s[0x68:0x78]))
            t = lambda s, o: struct.unpack_from("<I", s, o)[0]
            return [Field.of("UUID", u(sa), u(sb), METADATA),
                    Field.of("volume name", sa[0x78:0x88].rstrip(b"\0"), sb[0x78:0x88].rstrip(b"\0"), METADATA),
                    Field.of("mkfs time", t(sa, 0x108), t(sb, 0x108), METADATA),
                    Field.of("write time", t(sa, 0x30), t(sb, 0x30), METADATA),
                    Field.of("hash seed", uuid.UUID(bytes=bytes(sa[0xEC:0xFC])), uuid.UUID(bytes=bytes(sb[0xEC:0xFC])),
                             METADATA)]  # fmt: skip
        if kind is Kind.VFAT:
            off = 67 if ha[82:87] == b"FAT32" else 39
            return [Field.of("volume id", ha[off:off + 4].hex(), hb[off:off + 4].hex(), METADATA),
                    Field.of("volume label", ha[off + 4:off + 15], hb[off + 4:off + 15], METADATA)]  # fmt: skip
    except (struct.error, ValueError):
        return []
    return []

