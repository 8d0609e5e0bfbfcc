"""dm-verity (format version 1) hash trees, root hashes and superblocks, byte-compatible with veritysetup.

docs/formats.md §5: level 0 hashes every data block as ``H(salt || block)``, each higher level hashes
the blocks of the level below, the root hash is ``H(salt || top block)``; on disk the hash device
holds a 512-byte superblock (padded to one hash block) and then the levels, top level first.

Cost: one sequential read of the data (4 MiB chunks) plus one sha256 per 4 KiB block; memory is
the tree itself, about 1/128 of the data size.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reprobuild.errors import FormatError, VerificationFailed


class VerityInvalid(FormatError):
    """A verity superblock or hash device is malformed."""


class VerityMismatch(VerificationFailed):
    """Data and hash tree (or the expected root hash) do not agree."""


SB_MAGIC = b"verity\0\0"
SB_VERSION = 1
SB_SIZE = 512
MAX_SALT = 256
# struct verity_sb (cryptsetup lib/verity/verity.c; docs/formats.md §5 table): signature, version,
# hash_type, uuid (RFC byte order), algorithm (NUL padded), data_block_size, hash_block_size,
# data_blocks, salt_size, pad, salt, pad.
SUPERBLOCK = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert SUPERBLOCK.size == SB_SIZE

_READ_CHUNK = 4 << 20  # large reads; hashing works on memoryview slices, no copies


@dataclass(frozen=True)
class VerityParams:
    """Everything that fixes the tree besides the data. repart: sha256, 4096/4096, v1, seed salt/UUID."""

    salt: bytes
    uuid: uuid.UUID
    hash_name: str = "sha256"
    data_block_size: int = 4096
    hash_block_size: int = 4096
    hash_type: int = 1

    def __post_init__(self) -> None:
        if self.hash_type != 1:
            raise ValueError("only dm-verity hash type 1 (salt prepended) is supported")
        for bs in (self.data_block_size, self.hash_block_size):
            if bs < 512 or bs > (1 << 20) or bs & (bs - 1):
                raise ValueError(f"verity block size {bs} must be a power of two in 512..1 MiB")
        if len(self.salt) > MAX_SALT:
            raise ValueError("verity salt longer than 256 bytes")
        if self.hash_name not in hashlib.algorithms_guaranteed:
            raise ValueError(f"unknown hash algorithm {self.hash_name!r}")

    @property
    def digest_size(self) -> int:
        return hashlib.new(self.hash_name).digest_size

    @property
    def per_block(self) -> int:
        """Digests per hash block: each digest slot is padded to a power of two."""
        slot = 1 << (self.digest_size - 1).bit_length()
        return self.hash_block_size // slot


@dataclass(frozen=True)
class VeritySuperblock:
    params: VerityParams
    data_blocks: int


@dataclass(frozen=True)
class VerityTree:
    """A computed tree: ``levels[0]`` is level 0 (leaves), the last entry the single top block."""

    params: VerityParams
    data_blocks: int
    root_hash: bytes
    levels: tuple[bytes, ...]

    @property
    def hash_blocks(self) -> int:
        return sum(len(lv) for lv in self.levels) // self.params.hash_block_size

    @property
    def hash_device_size(self) -> int:
        """Superblock block plus the tree, in bytes."""
        return (1 + self.hash_blocks) * self.params.hash_block_size

    def tree_bytes(self) -> Iterator[bytes]:
        """On-disk order: top level first, level 0 last."""
        yield from reversed(self.levels)


def level_sizes(data_blocks: int, params: VerityParams) -> list[int]:
    """Hash blocks per level, level 0 first. One data block gives no levels (root = H(salt||block))."""
    sizes = []
    n = data_blocks
    while n > 1:
        n = -(-n // params.per_block)
        sizes.append(n)
    return sizes


# -- pure core ------------------------------------------------------------------------------------


def _hash_blocks(base: hashlib._Hash, buf: memoryview, bs: int, slot: int, out: bytearray) -> None:
    """Append H(salt || block) for each block in buf, each digest padded to ``slot`` bytes."""
    pad = bytes(slot - base.digest_size)
    for off in range(0, len(buf), bs):
        h = base.copy()
        h.update(buf[off:off + bs])
        out += h.digest()
        if pad:
            out += pad


def _pack_level(digests: bytearray, bs: int) -> bytes:
    """Zero-fill the tail of the last hash block."""
    rem = len(digests) % bs
    if rem:
        digests += bytes(bs - rem)
    return bytes(digests)


def build_tree(data: BinaryIO, data_blocks: int, params: VerityParams) -> VerityTree:
    """Stream ``data_blocks`` blocks from ``data`` (current position) and build the tree.

    Raises VerityInvalid if the stream ends early.
    """
    if data_blocks < 1:
        raise ValueError("dm-verity needs at least one data block")
    bs, hbs = params.data_block_size, params.hash_block_size
    slot = hbs // params.per_block
    base = hashlib.new(params.hash_name)
    base.update(params.salt)
    leaves = bytearray()
    buf = bytearray(max(bs, _READ_CHUNK - _READ_CHUNK % bs))
    left = data_blocks * bs
    while left:
        n = data.readinto(memoryview(buf)[:min(len(buf), left)])
        if not n:
            raise VerityInvalid(f"data ended {left} bytes early")
        if n % bs:  # short read inside a block: top it up so blocks never straddle reads
            while n % bs:
                m = data.readinto(memoryview(buf)[n:n + bs - n % bs])
                if not m:
                    raise VerityInvalid("data ended inside a block")
                n += m
        _hash_blocks(base, memoryview(buf)[:n], bs, slot, leaves)
        left -= n
    if data_blocks == 1:
        return VerityTree(params, 1, bytes(leaves[: base.digest_size]), ())
    levels = [_pack_level(leaves, hbs)]
    while len(levels[-1]) > hbs:
        nxt = bytearray()
        _hash_blocks(base, memoryview(levels[-1]), hbs, slot, nxt)
        levels.append(_pack_level(nxt, hbs))
    h = base.copy()
    h.update(levels[-1])
    return VerityTree(params, data_blocks, h.digest(), tuple(levels))


def pack_superblock(params: VerityParams, data_blocks: int) -> bytes:
    """The superblock padded with zeros to one hash block. The UUID is stored in RFC byte order."""
    sb = SUPERBLOCK.pack(SB_MAGIC, SB_VERSION, params.hash_type, params.uuid.bytes,
                         params.hash_name.encode("ascii"), params.data_block_size,
                         params.hash_block_size, data_blocks, len(params.salt), b"",
                         params.salt, b"")  # fmt: skip
    return sb.ljust(params.hash_block_size, b"\0")


def parse_superblock(buf: bytes) -> VeritySuperblock:
    """Decode and sanity-check a superblock (pure); raises VerityInvalid."""
    if len(buf) < SB_SIZE:
        raise VerityInvalid("verity superblock truncated")
    magic, version, htype, uid, alg, dbs, hbs, nblocks, salt_size, _p, salt, _p2 = SUPERBLOCK.unpack_from(buf)
    if magic != SB_MAGIC:
        raise VerityInvalid("no verity superblock (magic 'verity' missing)")
    if version != SB_VERSION:
        raise VerityInvalid(f"unsupported verity superblock version {version}")
    if salt_size > MAX_SALT:
        raise VerityInvalid(f"verity salt size {salt_size} exceeds 256")
    name = alg.split(b"\0", 1)[0].decode("ascii", "replace").lower()
    try:
        params = VerityParams(salt[:salt_size], uuid.UUID(bytes=uid), name, dbs, hbs, htype)
    except ValueError as e:
        raise VerityInvalid(f"bad verity superblock: {e}") from e
    if nblocks < 1:
        raise VerityInvalid("verity superblock has zero data blocks")
    return VeritySuperblock(params, nblocks)


# -- I/O shells ----------------------------------------------------------------------------------


def _blocks_of(path: Path, bs: int) -> int:
    size = os.path.getsize(path)
    if size == 0 or size % bs:
        raise VerityInvalid(f"{path}: size {size} is not a positive multiple of the {bs}-byte data block")
    return size // bs


def hash_file(data_path: Path, params: VerityParams) -> VerityTree:
    """Build the tree over a whole data file (its size must be a multiple of the data block size)."""
    n = _blocks_of(data_path, params.data_block_size)
    with open(data_path, "rb", buffering=0) as f:
        return build_tree(f, n, params)


def write_hash_device(data_path: Path, hash_path: Path, params: VerityParams) -> VerityTree:
    """Hash ``data_path`` and write superblock + tree (top level first) to ``hash_path``.

    The file is exactly ``tree.hash_device_size`` bytes; callers pad it (the partition does).
    """
    tree = hash_file(data_path, params)
    with open(hash_path, "wb") as out:
        out.write(pack_superblock(params, tree.data_blocks))
        out.writelines(tree.tree_bytes())
    return tree


def read_superblock(hash_dev: Path | BinaryIO) -> VeritySuperblock:
    """Read the superblock at offset 0 of a hash device (file name or open binary file)."""
    if isinstance(hash_dev, (str, os.PathLike)):
        with open(hash_dev, "rb") as f:
            return parse_superblock(f.read(SB_SIZE))
    hash_dev.seek(0)
    return parse_superblock(hash_dev.read(SB_SIZE))


def verify_verity(data: Path, hash_dev: Path, root_hash: bytes | str) -> VeritySuperblock:
    """Recompute the tree from ``data`` with the superblock's parameters and check everything.

    Checks the root hash (constant-time compare) and every stored hash block byte for byte, so a
    tampered tree is found even if the root hash was recomputed. Raises VerityMismatch or
    VerityInvalid. Cost: one pass over the data plus reading the tree.
    """
    expected = bytes.fromhex(root_hash) if isinstance(root_hash, str) else bytes(root_hash)
    sb = read_superblock(hash_dev)
    p = sb.params
    size = os.path.getsize(data)
    if size < sb.data_blocks * p.data_block_size:
        raise VerityMismatch(f"{data} holds {size} bytes, the superblock covers "
                             f"{sb.data_blocks * p.data_block_size}")  # fmt: skip
    with open(data, "rb", buffering=0) as f:
        tree = build_tree(f, sb.data_blocks, p)
    if not hmac.compare_digest(tree.root_hash, expected):
        raise VerityMismatch(f"root hash mismatch: data gives {tree.root_hash.hex()}, expected {expected.hex()}")
    with open(hash_dev, "rb") as f:
        f.seek(p.hash_block_size)
        for depth, lv in enumerate(tree.tree_bytes()):
            stored = f.read(len(lv))
            if stored != lv:
                level = len(tree.levels) - 1 - depth
                raise VerityMismatch(f"hash device: level {level} of the hash tree differs from the data")
    return sb


def check_blocks(image: BinaryIO, data_offset: int, hash_offset: int, root_hash: bytes | str,
                 copy_to: BinaryIO | None = None) -> VeritySuperblock:
    """Check a data area against its stored hash tree the way dm-verity does, in user space.

    ``image`` holds the data at ``data_offset`` and the hash device (superblock, then the tree)
    at ``hash_offset`` — one DDI with both partitions, or any file. The stored tree is checked
    from the trusted ``root_hash`` down (top block → root hash, each block → its entry in the
    level above), then every data block against its level-0 entry. The first block that differs
    is named: ``data block N`` or ``hash tree level L block M``. With ``copy_to``, the data bytes
    that were checked are also written there in the same pass (so a caller can use a copy that
    cannot change after the check). Raises VerityMismatch or VerityInvalid. Cost: one pass over
    the data, one sha256 per block.
    """
    expected = bytes.fromhex(root_hash) if isinstance(root_hash, str) else bytes(root_hash)
    image.seek(hash_offset)
    sb = parse_superblock(image.read(SB_SIZE))
    p = sb.params
    bs, hbs = p.data_block_size, p.hash_block_size
    slot = hbs // p.per_block
    base = hashlib.new(p.hash_name)
    base.update(p.salt)
    if len(expected) != base.digest_size:
        raise VerityMismatch(f"the root hash has {len(expected)} bytes, {p.hash_name} gives {base.digest_size}")
    sizes = level_sizes(sb.data_blocks, p)
    image.seek(hash_offset + hbs)
    stored = [b""] * len(sizes)
    for level in reversed(range(len(sizes))):  # on disk: top level first
        stored[level] = image.read(sizes[level] * hbs)
        if len(stored[level]) != sizes[level] * hbs:
            raise VerityInvalid(f"hash device ends inside level {level} of the tree")

    def digest(block: bytes | memoryview) -> bytes:
        h = base.copy()
        h.update(block)
        return h.digest()

    def entry(level_bytes: bytes, index: int) -> bytes:
        return level_bytes[index * slot : index * slot + base.digest_size]

    if sizes and not hmac.compare_digest(digest(stored[-1]), expected):
        raise VerityMismatch(f"hash tree level {len(sizes) - 1} block 0 (the top) does not match the root hash")
    for level in range(len(sizes) - 1):
        for index in range(sizes[level]):
            block = memoryview(stored[level])[index * hbs : (index + 1) * hbs]
            if digest(block) != entry(stored[level + 1], index):
                raise VerityMismatch(f"hash tree level {level} block {index} does not match level {level + 1}")
    leaves = stored[0] if sizes else b""
    image.seek(data_offset)
    buf = bytearray(max(bs, _READ_CHUNK - _READ_CHUNK % bs))
    first, left = 0, sb.data_blocks * bs
    while left:
        n = image.readinto(memoryview(buf)[: min(len(buf), left)])
        while n % bs:
            m = image.readinto(memoryview(buf)[n : n + bs - n % bs])
            if not m:
                break
            n += m
        if not n or n % bs:
            raise VerityInvalid(f"data ended {left} bytes early")
        view = memoryview(buf)[:n]
        got = bytearray()
        _hash_blocks(base, view, bs, slot, got)
        count = n // bs
        if not sizes:  # one data block: its hash is the root hash
            if not hmac.compare_digest(bytes(got[: base.digest_size]), expected):
                raise VerityMismatch("data block 0 does not match the root hash")
        elif got != leaves[first * slot : (first + count) * slot]:
            mine = leaves[first * slot : (first + count) * slot]
            bad = next(i for i in range(count) if got[i * slot : (i + 1) * slot] != mine[i * slot : (i + 1) * slot])
            block = first + bad
            raise VerityMismatch(f"data block {block} (bytes {block * bs}..{(block + 1) * bs - 1} of the data) "
                                 "does not match the hash tree")
        if copy_to is not None:
            copy_to.write(view)
        first += count
        left -= n
    return sb


def changed_data_blocks(read_a: Callable[[int, int], bytes], read_b: Callable[[int, int], bytes],
                        sb: VeritySuperblock) -> list[int] | None:  # fmt: skip
    """The data blocks whose level-0 digests differ between two hash devices of the same shape.

    ``read_x(offset, n)`` reads hash device x; both devices must have superblock ``sb`` (same
    parameters and data block count — the caller checks). The stored trees are compared top
    down: a hash block that is equal on both sides is not descended into, so two trees that
    differ in k data blocks cost about k × (tree height) block reads instead of a pass over the
    data. Returns None when there is no tree on disk (a single data block). Nothing is recomputed: each tree is trusted to describe its data
    (`check_blocks` / `verify_verity` check that).
    """
    p = sb.params
    hbs, per = p.hash_block_size, p.per_block
    slot = hbs // per
    sizes = level_sizes(sb.data_blocks, p)
    if not sizes:
        return None
    starts = [0] * len(sizes)  # byte offset of each level on the hash device: top level first
    off = hbs
    for level in reversed(range(len(sizes))):
        starts[level] = off
        off += sizes[level] * hbs
    todo = [0]  # differing block indices of the current level, starting with the single top block
    for level in reversed(range(len(sizes))):
        below = sizes[level - 1] if level else sb.data_blocks
        nxt: list[int] = []
        for index in todo:
            x = read_a(starts[level] + index * hbs, hbs)
            y = read_b(starts[level] + index * hbs, hbs)
            if len(x) != hbs or len(y) != hbs:
                raise VerityInvalid(f"hash device ends inside level {level} of the tree")
            if x == y:
                continue
            for j in range(per):
                child = index * per + j
                if child >= below:
                    break
                if x[j * slot:(j + 1) * slot] != y[j * slot:(j + 1) * slot]:
                    nxt.append(child)
        todo = nxt
    return todo
