"""The pure-Python squashfs reader against images made by the real mksquashfs, and hostile images.

One tree (files of several sizes, sparse and fragment-sized ones, symlinks, a hard link, devices,
a fifo, xattrs, a deep directory, a directory of 400 entries, owners) is packed with every
compressor the reader decodes and with the layout options mksquashfs has (no fragments, always
fragments, stored data, metadata and fragments, block sizes, no xattrs), read back, and checked
against the source tree and against ``unsquashfs -lln`` of the same image.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from reprobuild.image import squashfs
from tests.test_erofs import (
    EPOCH,
    check_corruption,
    check_walk_limits,
    describe_dir,
    make_tree,
    needs_root,
    read_all,
)


def mksquashfs(tree: Path, out: Path, *options: str) -> Path:
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress",
                    "-all-time", str(EPOCH), "-mkfs-time", str(EPOCH), *options], check=True, capture_output=True)  # fmt: skip
    return out


def open_bytes(data: bytes) -> squashfs.Squashfs:
    return squashfs.Squashfs(lambda off, n: data[off:off + n], len(data))




def add_squashfs_cases(root: Path) -> None:
    """What squashfs stores its own way: sparse blocks, exact-block files, one larger than a
    block with a tail, a value big enough to be stored out of line when shared."""
    (root / "sq").mkdir()
    with open(root / "sq/sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"middle")
    (root / "sq/exact").write_bytes(os.urandom(128 << 10))
    (root / "sq/tailed").write_bytes(os.urandom((128 << 10) + 777))
    (root / "sq/zeros").write_bytes(bytes(200_000))
    (root / "sq/text").write_bytes(b"compressible " * 20_000)
    for n in ("one", "two", "three"):
        (root / "sq" / n).write_text(n)
        os.setxattr(root / "sq" / n, "user.shared", b"s" * 2000)  # a repeated value: out of line
    os.setxattr(root / "sq", "security.selinux", b"system_u:object_r:etc_t:s0\0")


LAYOUTS = {
    "zstd": ["-comp", "zstd", "-xattrs"],  # what image/fs.py writes
    "gzip": ["-comp", "gzip"],
    "xz": ["-comp", "xz"],
    "xz-bcj": ["-comp", "xz", "-Xbcj", "x86"],
    "lzma": ["-comp", "lzma"],
    "stored": ["-noI", "-noD", "-noF", "-noX"],
    "no-fragments": ["-no-fragments"],
    "always-fragments": ["-always-use-fragments", "-b", "4096"],
    "1m-blocks": ["-b", "1M"],
    "exportable": ["-exports", "-no-sparse"],
}


@needs_root
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reader_matches_the_source_tree_and_unsquashfs(tmp_path: Path, layout: str) -> None:
    tree = make_tree(tmp_path / "tree")
    add_squashfs_cases(tree)
    img = mksquashfs(tree, tmp_path / "fs.img", *LAYOUTS[layout])
    fs = open_bytes(img.read_bytes())
    got = read_all(fs)
    assert got == describe_dir(tree, xattrs=True)
    assert fs.sb.compression == (layout if layout in ("gzip", "xz", "lzma") else "xz" if layout == "xz-bcj"
                                 else "gzip" if layout != "zstd" else "zstd")  # fmt: skip
    # unsquashfs's own listing: types, permissions, owners and sizes agree entry by entry.
    listing = subprocess.run(["unsquashfs", "-lln", "-d", "", str(img)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    theirs = {}
    for line in listing.splitlines():
        # "-rw-r--r-- 0/0  3 2023-11-14 22:13 /d/tiny"; a device's size column is "4,  64".
        m = re.match(r"^(\S)\S* (\d+)/(\d+)\s+(.*?) \d{4}-\d\d-\d\d \d\d:\d\d /(.+?)(?: -> .*)?$", line)
        if m:
            kind, uid, gid, size, path = m.groups()
            theirs[path] = (kind, f"{uid}:{gid}", size.strip() if kind == "-" else None)
    mine = {}
    for prefix, name, ino in fs.walk():
        letter = {"file": "-", "directory": "d", "symlink": "l", "char-device": "c", "block-device": "b",
                  "fifo": "p", "socket": "s"}[ino.type]  # fmt: skip
        mine[os.fsdecode(prefix + name)] = (letter, f"{ino.uid}:{ino.gid}", str(ino.size) if letter == "-" else None)
    assert mine == theirs


def test_layouts_are_the_ones_named(tmp_path: Path) -> None:
    """The parametrised layouts really exercise fragments, sparse blocks, stored blocks and the
    out-of-line xattr values."""
    tree = make_tree(tmp_path / "tree")
    add_squashfs_cases(tree)
    seen = {}
    for name in ("zstd", "stored", "no-fragments", "always-fragments"):
        fs = open_bytes(mksquashfs(tree, tmp_path / f"{name}.img", *LAYOUTS[name]).read_bytes())
        files = {os.fsdecode(p + n): i for p, n, i in fs.walk() if i.type == "file"}
        seen[name] = files
    z = seen["zstd"]
    assert z["d/tiny"].fragment is not None and not z["d/tiny"].blocks
    assert any(b.stored == 0 for b in z["sq/sparse"].blocks)  # sparse blocks
    assert z["sq/exact"].fragment is None and len(z["sq/exact"].blocks) == 1
    # mksquashfs 4.5 packs no tail end into a fragment by default: a short last block.
    assert z["sq/tailed"].fragment is None and [b.length for b in z["sq/tailed"].blocks] == [128 << 10, 777]
    assert all(b.compressed and b.stored < b.length for b in z["sq/text"].blocks)
    assert not any(b.compressed for b in seen["stored"]["sq/text"].blocks)
    assert all(i.fragment is None for i in seen["no-fragments"].values())
    assert seen["always-fragments"]["sq/tailed"].fragment is not None
    img = (tmp_path / "zstd.img").read_bytes()
    assert open_bytes(img).xattrs(z["sq/two"]) == (("user.shared", b"s" * 2000),)
    # The repeated value is stored once, out of line (its type word has bit 8 set).
    assert img.count(b"s" * 100) <= 1 or open_bytes(img).sb.compression != "stored"


def test_the_build_s_squashfs_images_are_read(tmp_path: Path) -> None:
    """make_filesystem (the build's mksquashfs call) gives what the reader reads."""
    import uuid

    from reprobuild.image.fs import make_filesystem

    tree = make_tree(tmp_path / "tree")
    make_filesystem("squashfs", tree, tmp_path / "fs.img", uuid.UUID(int=5), EPOCH, "root")
    fs = open_bytes((tmp_path / "fs.img").read_bytes())
    assert fs.sb.mkfs_time == EPOCH and fs.sb.compression == "zstd"
    got = read_all(fs)
    want = describe_dir(tree, xattrs=True)
    assert {k: (v[0], v[4], v[5]) for k, v in got.items()} == {k: (v[0], v[4], v[5]) for k, v in want.items()}
    assert {ino.mtime for _, _, ino in fs.walk()} == {EPOCH}


def test_lz4_and_lzo_are_unsupported_not_misread(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    (t / "f").write_bytes(b"compress me " * 4000)
    for comp in ("lz4", "lzo"):
        img = mksquashfs(t, tmp_path / f"{comp}.img", "-comp", comp)
        with pytest.raises(squashfs.SquashfsUnsupported, match=f"{comp} compression"):
            open_bytes(img.read_bytes())


# -- hostile images ------------------------------------------------------------------------------


def small_image(tmp_path: Path, *options: str) -> bytes:
    t = tmp_path / "small"
    if not t.exists():
        (t / "a/b").mkdir(parents=True)
        (t / "a/b/file").write_text("x" * 5000)
        (t / "a/other").write_text("y")
        (t / "a/big").write_bytes(bytes(range(256)) * 1000)
        os.setxattr(t / "a/other", "user.k", b"v")
    return mksquashfs(t, tmp_path / "small.img", *options).read_bytes()


def test_a_directory_loop_is_an_error(tmp_path: Path) -> None:
    """With stored (uncompressed) metadata, a/b's directory entry is pointed at a's inode."""
    data = bytearray(small_image(tmp_path, "-noI", "-noD", "-noF", "-noX"))
    fs = open_bytes(bytes(data))
    inodes = {os.fsdecode(p + n): i for p, n, i in fs.walk()}
    a_ref, b_ref = inodes["a"].ref, inodes["a/b"].ref
    # Find b's entry in a's listing: the header's start block and the entry's offset are b's ref.
    start, offset, size = inodes["a"].listing
    listing_at = fs.sb.directory_table + start + 2 + offset  # one stored metadata block: header 2 bytes
    listing = bytes(data[listing_at:listing_at + size])
    at = listing.index(b"\x01\x00\x00\x00b") - 4  # entry: offset, delta, type 1 (directory), size 0, "b"
    assert struct.unpack_from("<H", listing, at)[0] == b_ref & 0xFFFF
    assert a_ref >> 16 == b_ref >> 16  # same inode block: only the offset changes
    struct.pack_into("<H", data, listing_at + at, a_ref & 0xFFFF)
    with pytest.raises(squashfs.SquashfsInvalid, match="reached twice"):
        list(open_bytes(bytes(data)).walk())


def test_truncated_and_foreign_images_are_errors(tmp_path: Path) -> None:
    data = small_image(tmp_path)
    with pytest.raises(squashfs.SquashfsInvalid, match="magic"):
        open_bytes(bytes(4096))
    with pytest.raises(squashfs.SquashfsInvalid, match="shorter than its superblock"):
        open_bytes(data[:50])
    with pytest.raises(squashfs.SquashfsInvalid, match="truncated"):
        open_bytes(data[:len(data) // 2])
    bad = bytearray(data)
    struct.pack_into("<HH", bad, 20, 6, 30)  # block_log 30
    with pytest.raises(squashfs.SquashfsInvalid, match="block size"):
        open_bytes(bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<H", bad, 28, 3)  # version 3.x
    with pytest.raises(squashfs.SquashfsUnsupported, match="version 3"):
        open_bytes(bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<Q", bad, 32, (1 << 32) | 0x10)  # the root inode in a block far outside
    with pytest.raises(squashfs.SquashfsInvalid):
        open_bytes(bytes(bad)).root()


def test_a_decompression_bomb_is_bounded(tmp_path: Path) -> None:
    """A data block whose compressed bytes claim more than one block is refused, not inflated."""
    import zstandard

    data = bytearray(small_image(tmp_path, "-noI", "-noD", "-noF", "-noX"))
    fs = open_bytes(bytes(data))
    big = next(i for p, n, i in fs.walk() if n == b"big")
    block = big.blocks[0]
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 22))  # 4 MiB of zeros in a few bytes
    assert len(bomb) <= block.stored
    data[block.offset:block.offset + len(bomb)] = bomb
    # Re-point the block's size word: compressed, len(bomb) bytes (the word follows the inode's
    # fixed part; find it by its old value, stored: bit 24 set).
    old = struct.pack("<I", block.stored | squashfs.DATA_UNCOMPRESSED)
    at = bytes(data).index(old, fs.sb.inode_table)
    struct.pack_into("<I", data, at, len(bomb))
    fs2 = open_bytes(bytes(data))
    big2 = next(i for p, n, i in fs2.walk() if n == b"big")
    assert big2.blocks[0].compressed
    with pytest.raises(squashfs.SquashfsInvalid, match="decompresses to more than|does not decompress"):
        fs2.read_data(big2, 1 << 30)


def test_random_corruption_gives_format_errors_only(tmp_path: Path) -> None:
    """Flipped bytes anywhere in the tables: the reader returns something or raises a
    FormatError — never another exception, never an endless walk."""
    for options in ((), ("-noI", "-noD", "-noF", "-noX")):
        data = small_image(tmp_path, *options)
        tables = open_bytes(data).sb.inode_table
        # Each change lands in the tables, or anywhere after the superblock (data too).
        ranges = [(tables, len(data)), (squashfs.SUPERBLOCK.size, len(data))]
        check_corruption(data, ranges, lambda b: read_all(open_bytes(b)), 400)


def test_walk_limits_are_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = small_image(tmp_path)
    check_walk_limits(squashfs, lambda: open_bytes(data), squashfs.SquashfsInvalid, monkeypatch)
