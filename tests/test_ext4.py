"""The pure-Python ext4 reader against images made by the real mke2fs, and hostile images.

The tree of test_erofs (files of several sizes, symlinks short and long, a hard link, devices, a
fifo, xattrs, a deep directory, a directory of 400 entries, owners) plus ext4's own cases (a
file of hundreds of extents, an uninitialised extent, a hole at the end, a POSIX ACL) is written
by ``mke2fs -d`` in several layouts — the build's, 1 KiB blocks, 32-bit group descriptors, a
journal, 128-byte inodes (every xattr in a block), htree directories (``e2fsck -D``) — read
back, and checked against the source tree and against ``debugfs``'s view of the same image.
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from reprobuild.image import ext4
from tests.test_erofs import (
    EPOCH,
    check_corruption,
    check_walk_limits,
    describe_dir,
    make_tree,
    needs_root,
    read_all,
)

ACL = (b"\x02\x00\x00\x00" + struct.pack("<HHI", 0x01, 6, 0xFFFFFFFF) + struct.pack("<HHI", 0x02, 4, 1000)
       + struct.pack("<HHI", 0x04, 4, 0xFFFFFFFF) + struct.pack("<HHI", 0x10, 4, 0xFFFFFFFF)
       + struct.pack("<HHI", 0x20, 0, 0xFFFFFFFF))  # fmt: skip  # user::rw-, user:1000:r--, group, mask, other


def add_ext4_cases(root: Path) -> None:
    (root / "x").mkdir()
    with open(root / "x/many-extents", "wb") as f:  # one byte every 8 KiB: hundreds of extents, holes between
        for i in range(300):
            f.seek(i * 8192)
            f.write(b"%d" % (i % 10))
    with open(root / "x/hole-at-end", "wb") as f:
        f.write(b"start")
        f.truncate(1 << 20)
    os.setxattr(root / "x/hole-at-end", "system.posix_acl_access", ACL)


def mke2fs(tree: Path, out: Path, *options: str, size: str = "16M") -> Path:
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), *options, str(out), size], check=True,
                   capture_output=True, env={**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)})  # fmt: skip
    return out


def open_bytes(data: bytes) -> ext4.Ext4:
    return ext4.Ext4(lambda off, n: data[off:off + n], len(data))




LAYOUTS = {
    "build": [],  # image/fs.py's features (mke2fs.conf's ext4: extents, 64bit, flex_bg, metadata_csum)
    "1k-blocks": ["-b", "1024"],  # first data block 1, several groups
    "32bit-no-csum": ["-O", "^64bit,^metadata_csum"],
    "128-byte-inodes": ["-I", "128"],  # no room in the inode: every xattr in an xattr block
    "htree": [],  # then e2fsck -fyD indexes every directory
}


@needs_root
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reader_matches_the_source_tree_and_debugfs(tmp_path: Path, layout: str) -> None:
    tree = make_tree(tmp_path / "tree")
    add_ext4_cases(tree)
    img = mke2fs(tree, tmp_path / "fs.img", *LAYOUTS[layout], size="32M" if layout == "1k-blocks" else "16M")
    if layout == "htree":
        subprocess.run(["e2fsck", "-fyD", str(img)], capture_output=True, check=False)  # exit 1: "fixed"
    fs = open_bytes(img.read_bytes())
    got = read_all(fs)
    assert got.pop("lost+found")[0] == "directory"
    assert got == describe_dir(tree, xattrs=True)
    if layout == "1k-blocks":
        assert fs.sb.first_data_block == 1 and fs.sb.groups > 1
    if layout == "htree":
        many = next(i for p, n, i in fs.walk() if n == b"many")
        assert many.flags & 0x1000  # EXT4_INDEX_FL: the directory really is hashed
    # debugfs's own view of a few inodes agrees: link count, size, and the extent count.
    files = {os.fsdecode(p + n): i for p, n, i in fs.walk()}
    for path in ("d/big", "x/many-extents", "hard", "x/hole-at-end"):
        st = subprocess.run(["debugfs", "-R", f"stat /{path}", str(img)], capture_output=True, text=True,
                            check=True).stdout
        ino = files[path]
        assert f"Links: {ino.nlink}" in st and f"Size: {ino.size}" in st, st


def test_many_extents_use_an_extent_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    add_ext4_cases(tree)
    fs = open_bytes(mke2fs(tree, tmp_path / "fs.img").read_bytes())
    ino = next(i for p, n, i in fs.walk() if n == b"many-extents")
    root_depth = struct.unpack_from("<H", fs.read_at(ino.offset + 0x28, 12), 6)[0]
    assert root_depth >= 1 and sum(1 for e in ino.extents if e.offset is not None) == 300
    assert fs.read_data(ino, 1 << 30) == (tree / "x/many-extents").read_bytes()


def test_an_extent_tree_that_revisits_a_leaf_is_an_error(tmp_path: Path) -> None:
    """The root's second index entry pointed at the first one's leaf: refused at the first
    repeated extent, not after walking every copy."""
    tree = make_tree(tmp_path / "tree")
    add_ext4_cases(tree)
    data = bytearray(mke2fs(tree, tmp_path / "fs.img").read_bytes())
    fs = open_bytes(bytes(data))
    ino = next(i for p, n, i in fs.walk() if n == b"many-extents")
    root = ino.offset + 0x28
    _magic, entries, _max, depth = struct.unpack_from("<HHHH", data, root)
    assert depth >= 1 and entries >= 2
    first_leaf = struct.unpack_from("<IH", data, root + 12 + 4)
    struct.pack_into("<IH", data, root + 24 + 4, *first_leaf)
    with pytest.raises(ext4.Ext4Invalid, match="overlap or are out of order"):
        open_bytes(bytes(data)).inode(ino.number)


def test_uninitialised_extents_read_as_zeros(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    (t / "prealloc").write_bytes(b"")
    img = mke2fs(t, tmp_path / "fs.img", size="8M")
    for cmd in ("fallocate /prealloc 0 7", "sif /prealloc size 20000"):
        subprocess.run(["debugfs", "-w", "-R", cmd, str(img)], check=True, capture_output=True)
    fs = open_bytes(img.read_bytes())
    ino = next(i for p, n, i in fs.walk() if n == b"prealloc")
    # 8 uninitialised blocks of 1 KiB (an 8 MiB file system), then a hole to the size.
    assert ino.extents == (ext4.Extent(None, 8192), ext4.Extent(None, 20000 - 8192))
    theirs = subprocess.run(["debugfs", "-R", "cat /prealloc", str(img)], capture_output=True, check=True).stdout
    assert fs.read_data(ino, 1 << 20) == theirs == bytes(20000)


def test_the_build_s_ext4_images_are_read(tmp_path: Path) -> None:
    from reprobuild.image.fs import make_filesystem

    tree = make_tree(tmp_path / "tree")
    make_filesystem("ext4", tree, tmp_path / "fs.img", uuid.UUID(int=5), EPOCH, "root")
    fs = open_bytes((tmp_path / "fs.img").read_bytes())
    got = read_all(fs)
    got.pop("lost+found")
    want = describe_dir(tree, xattrs=True)
    assert {k: (v[0], v[4], v[5]) for k, v in got.items()} == {k: (v[0], v[4], v[5]) for k, v in want.items()}
    assert {ino.mtime for _, _, ino in fs.walk()} == {EPOCH}


def test_ext2_and_inline_data_are_unsupported_not_misread(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    (t / "f").write_bytes(b"data " * 3000)
    (t / "tiny").write_bytes(b"x")
    ext2 = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-d", str(t), str(tmp_path / "ext2.img"), "8M"],
                          check=True, capture_output=True)  # fmt: skip
    assert ext2.returncode == 0
    with pytest.raises(ext4.Ext4Unsupported, match="block-mapped"):
        list(open_bytes((tmp_path / "ext2.img").read_bytes()).walk())
    img = mke2fs(t, tmp_path / "inline.img", "-O", "inline_data", size="8M")
    with pytest.raises(ext4.Ext4Unsupported, match="inline data"):
        open_bytes(img.read_bytes())


# -- hostile images ------------------------------------------------------------------------------


def small_image(tmp_path: Path) -> bytes:
    t = tmp_path / "small"
    if not t.exists():
        (t / "a/b").mkdir(parents=True)
        (t / "a/b/file").write_text("x" * 5000)
        (t / "a/other").write_text("y")
        os.setxattr(t / "a/other", "user.k", b"v")
    return mke2fs(t, tmp_path / "small.img", "-O", "^metadata_csum", size="1M").read_bytes()


def dirent_at(data: bytes, fs: ext4.Ext4, dir_ino: ext4.Inode, name: bytes) -> int:
    (ext,) = [e for e in dir_ino.extents if e.offset is not None]
    pos = ext.offset
    assert pos is not None
    while True:
        _n, rec_len, name_len, _t = struct.unpack_from("<IHBB", data, pos)
        if data[pos + 8:pos + 8 + name_len] == name:
            return pos
        pos += rec_len


def test_a_directory_loop_is_an_error(tmp_path: Path) -> None:
    data = bytearray(small_image(tmp_path))
    fs = open_bytes(bytes(data))
    inodes = {os.fsdecode(p + n): i for p, n, i in fs.walk()}
    at = dirent_at(bytes(data), fs, inodes["a"], b"b")
    struct.pack_into("<I", data, at, inodes["a"].number)  # a/b -> a
    with pytest.raises(ext4.Ext4Invalid, match="reached twice"):
        list(open_bytes(bytes(data)).walk())


def test_truncated_and_foreign_images_are_errors(tmp_path: Path) -> None:
    data = small_image(tmp_path)
    with pytest.raises(ext4.Ext4Invalid, match="magic"):
        open_bytes(bytes(4096))
    with pytest.raises(ext4.Ext4Invalid, match="shorter than its superblock"):
        open_bytes(data[:1500])
    with pytest.raises(ext4.Ext4Invalid, match="truncated"):
        open_bytes(data[:len(data) // 2])
    bad = bytearray(data)
    struct.pack_into("<I", bad, 1024 + 0x18, 20)  # block size 2^30
    with pytest.raises(ext4.Ext4Invalid, match="block size"):
        open_bytes(bytes(bad))
    bad = bytearray(data)
    fs = open_bytes(data)
    other = next(i for p, n, i in fs.walk() if n == b"other")
    struct.pack_into("<I", bad, dirent_at(data, fs, next(i for p, n, i in fs.walk() if n == b"a"), b"other"), 1 << 30)
    with pytest.raises(ext4.Ext4Invalid, match="outside the inode table"):
        list(open_bytes(bytes(bad)).walk())
    assert other.number < fs.sb.inodes


def test_random_corruption_gives_format_errors_only(tmp_path: Path) -> None:
    """Flipped bytes in the metadata (superblock, descriptors, inode table, directory and xattr
    blocks): the reader returns something or raises a FormatError — never another exception."""
    data = small_image(tmp_path)
    fs = open_bytes(data)
    used = sorted({e.offset // fs.block_size for _, _, i in fs.walk() for e in i.extents if e.offset is not None})
    inode_table = fs.inode(ext4.ROOT_INO).offset // fs.block_size
    targets = [(1024, 2048), (fs.block_size, 2 * fs.block_size), (inode_table * fs.block_size,
               inode_table * fs.block_size + 16 * fs.sb.inode_size)] + [(b * fs.block_size, (b + 1) * fs.block_size)
                                                                       for b in used]  # fmt: skip
    check_corruption(data, targets, lambda b: read_all(open_bytes(b)), 600)


def test_walk_limits_are_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = small_image(tmp_path)
    check_walk_limits(ext4, lambda: open_bytes(data), ext4.Ext4Invalid, monkeypatch)
