"""The pure-Python erofs reader against images made by the real mkfs.erofs, and hostile images.

Every layout mkfs.erofs writes without compression is built from one tree (regular files of
several sizes, symlinks, a hard link, devices, a fifo, xattrs, a deep directory, owners) and read
back; the result is checked against ``fsck.erofs --extract`` of the same image and, for xattrs
(which fsck.erofs 1.5 does not extract), against the source tree.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reprobuild.errors import FormatError
from reprobuild.image import erofs

EPOCH = 1_700_000_000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="devices and owners need root")


def make_tree(root: Path) -> Path:
    root.mkdir()
    files = {"empty": b"", "tiny": b"hi\n", "block": os.urandom(4096), "tail": os.urandom(4096 * 3 + 123),
             "big": hashlib.shake_256(b"x").digest(300_000), "sparse-ish": bytes(20_000) + b"end"}  # fmt: skip
    (root / "d").mkdir()
    for name, data in files.items():
        (root / "d" / name).write_bytes(data)
    deep = root / "/".join(f"level{i}" for i in range(40))
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("deep\n")
    os.symlink("../d/tiny", root / "short-link")
    os.symlink("x" * 300, root / "long-link")
    os.link(root / "d/tiny", root / "hard")
    os.mkfifo(root / "fifo")
    many = root / "many"
    many.mkdir()
    for i in range(400):  # a directory spanning several blocks
        (many / f"entry-with-a-long-name-{i:04d}").write_text(str(i))
    os.setxattr(root / "d/tiny", "user.note", b"shared value")
    os.setxattr(root / "d/block", "user.note", b"shared value")  # used twice: a shared xattr
    os.setxattr(root / "d/tail", "user.big", b"v" * 600)
    os.setxattr(root / "d/big", "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    os.setxattr(root / "many", "trusted.dir", b"on a directory")
    if os.geteuid() == 0:
        os.mknod(root / "chr", 0o620 | stat.S_IFCHR, os.makedev(4, 64))
        os.mknod(root / "blk", 0o660 | stat.S_IFBLK, os.makedev(259, 300))  # a minor above 255
        os.chown(root / "d/big", 70000, 1234)  # needs an extended inode
        os.chown(root / "fifo", 12, 34)
    os.chmod(root / "d/tail", 0o4750)
    return root


def mkfs(tree: Path, out: Path, *options: str) -> Path:
    subprocess.run(["mkfs.erofs", "--quiet", *options, str(out), str(tree)], check=True)
    return out


def open_image(path: Path) -> erofs.Erofs:
    data = path.read_bytes()
    return erofs.Erofs(lambda off, n: data[off:off + n], len(data))


def read_all(fs: Any) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, content or link target or device, xattrs) for every entry,
    through any of the readers (erofs, squashfs, ext4: they share this interface)."""
    out = {}
    for prefix, name, ino in fs.walk():
        if ino.type == "file":
            what: object = fs.read_data(ino, 1 << 30)
        elif ino.type == "symlink":
            what = fs.readlink(ino)
        elif ino.type.endswith("device"):
            what = ino.device
        else:
            what = None
        out[os.fsdecode(prefix + name)] = (ino.type, ino.mode & 0o7777, ino.uid, ino.gid, what, fs.xattrs(ino))
        if isinstance(fs, erofs.Erofs):
            list(fs.blocks_of(ino))  # every block an inode depends on lies in the image
    return out


def describe_dir(root: Path, xattrs: bool) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            kind = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
                    stat.S_IFCHR: "char-device", stat.S_IFBLK: "block-device"}[stat.S_IFMT(st.st_mode)]  # fmt: skip
            if kind == "file":
                what: object = p.read_bytes()
            elif kind == "symlink":
                what = os.fsencode(os.readlink(p))
            elif kind.endswith("device"):
                what = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                what = None
            xa = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                              for n in os.listxattr(p, follow_symlinks=False))) if xattrs else None  # fmt: skip
            out[p.relative_to(root).as_posix()] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what, xa)
    return out


LAYOUTS = {
    "default": [f"-T{EPOCH}"],  # compact inodes, FLAT_INLINE tails, shared + inline xattrs
    "extended-inodes": [f"-T{EPOCH}", "-Eforce-inode-extended"],
    "no-inline": [f"-T{EPOCH}", "-Enoinline_data"],  # FLAT_PLAIN only
    "chunk-blockmap": [f"-T{EPOCH}", "--chunksize=4096"],
    "chunk-indexes": [f"-T{EPOCH}", "--chunksize=8192", "-Eforce-chunk-indexes"],
    "per-file-mtimes": [],  # no fixed time: mtimes kept, extended inodes where they differ
}


@needs_root
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reader_matches_fsck_extract_and_the_source_tree(tmp_path: Path, layout: str) -> None:
    tree = make_tree(tmp_path / "tree")
    img = mkfs(tree, tmp_path / "fs.img", *LAYOUTS[layout])
    got = read_all(open_image(img))
    out = tmp_path / "extracted"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(img)], check=True, capture_output=True)
    extracted = describe_dir(out, xattrs=False)
    # fsck.erofs 1.5 drops setuid bits (it sets the mode before the owner): permissions only.
    def common(v: tuple) -> tuple:
        return (v[0], v[1] & 0o777, *v[2:5])

    assert {k: common(v) for k, v in got.items()} == {k: common(v) for k, v in extracted.items()}
    assert got == describe_dir(tree, xattrs=True)  # xattrs too, which fsck.erofs 1.5 drops
    if layout == "per-file-mtimes":
        fs = open_image(img)
        mtimes = {os.fsdecode(p + n): ino.mtime for p, n, ino in fs.walk()}
        assert mtimes["d/tiny"] == int((tree / "d/tiny").stat().st_mtime)


def test_layouts_are_the_ones_named(tmp_path: Path) -> None:
    """The parametrised layouts really exercise plain, inline and chunk-based data."""
    tree = make_tree(tmp_path / "tree")
    seen = {}
    for name in ("default", "no-inline", "chunk-blockmap"):
        fs = open_image(mkfs(tree, tmp_path / f"{name}.img", *LAYOUTS[name]))
        seen[name] = {ino.layout for _, _, ino in fs.walk() if ino.type == "file" and ino.size}
    assert erofs.LAYOUT_FLAT_INLINE in seen["default"]
    assert seen["no-inline"] == {erofs.LAYOUT_FLAT_PLAIN}
    assert erofs.LAYOUT_CHUNK_BASED in seen["chunk-blockmap"]


def test_the_build_s_erofs_images_are_read(tmp_path: Path) -> None:
    """make_filesystem (the build's mkfs.erofs call) gives what the reader reads."""
    import uuid

    from reprobuild.image.fs import make_filesystem

    tree = make_tree(tmp_path / "tree")
    make_filesystem("erofs", tree, tmp_path / "fs.img", uuid.UUID(int=5), EPOCH, "root")
    fs = open_image(tmp_path / "fs.img")
    assert fs.sb.uuid == uuid.UUID(int=5).bytes and fs.sb.build_time == EPOCH
    got = read_all(fs)
    want = describe_dir(tree, xattrs=True)
    assert {k: (v[0], v[4], v[5]) for k, v in got.items()} == {k: (v[0], v[4], v[5]) for k, v in want.items()}


# -- hostile images ------------------------------------------------------------------------------


def small_image(tmp_path: Path) -> bytes:
    t = tmp_path / "small"
    (t / "a/b").mkdir(parents=True)
    (t / "a/b/file").write_text("x" * 5000)
    (t / "a/other").write_text("y")
    return mkfs(t, tmp_path / "small.img", f"-T{EPOCH}").read_bytes()


def dirent_offset(data: bytes, dir_path: bytes, name: bytes) -> int:
    """Byte offset in the image of the directory entry ``name`` in directory ``dir_path``."""
    fs = erofs.Erofs(lambda off, n: data[off:off + n], len(data))
    ino = fs.root() if not dir_path else next(i for p, n, i in fs.walk() if p + n == dir_path)
    for ext in ino.extents:
        assert ext.offset is not None
        count = struct.unpack_from("<H", data, ext.offset + 8)[0] // 12
        for i in range(count):
            _nid, nameoff = struct.unpack_from("<QH", data, ext.offset + i * 12)
            end = struct.unpack_from("<H", data, ext.offset + (i + 1) * 12 + 8)[0] if i + 1 < count else None
            entry = data[ext.offset + nameoff: ext.offset + end if end else ext.offset + ext.length].split(b"\0")[0]
            if entry == name:
                return ext.offset + i * 12
    raise AssertionError(f"{name!r} not found")


def test_a_directory_loop_is_an_error(tmp_path: Path) -> None:
    data = bytearray(small_image(tmp_path))
    a_nid = struct.unpack_from("<Q", data, dirent_offset(bytes(data), b"", b"a"))[0]
    struct.pack_into("<Q", data, dirent_offset(bytes(data), b"a", b"b"), a_nid)  # a/b -> a
    with pytest.raises(erofs.ErofsInvalid, match="reached twice"):
        list(open_image_bytes(bytes(data)).walk())


def open_image_bytes(data: bytes) -> erofs.Erofs:
    return erofs.Erofs(lambda off, n: data[off:off + n], len(data))


def test_truncated_and_foreign_images_are_errors(tmp_path: Path) -> None:
    data = small_image(tmp_path)
    with pytest.raises(erofs.ErofsInvalid, match="magic"):
        open_image_bytes(bytes(4096))
    with pytest.raises(erofs.ErofsInvalid, match="truncated"):
        open_image_bytes(data[:1100])
    with pytest.raises(erofs.ErofsInvalid):
        fs = open_image_bytes(data[:4096])  # the superblock survives, the rest does not
        list(fs.walk())
    bad = bytearray(data)
    bad[1024 + 12] = 30  # block size 2^30
    with pytest.raises(erofs.ErofsInvalid, match="block size"):
        open_image_bytes(bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<Q", bad, dirent_offset(data, b"a", b"other"), 1 << 40)  # an inode far outside
    with pytest.raises(erofs.ErofsInvalid, match="outside the image"):
        list(open_image_bytes(bytes(bad)).walk())


def test_compressed_images_are_unsupported_not_misread(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    (t / "f").write_bytes(b"compress me " * 4000)
    img = mkfs(t, tmp_path / "z.img", "-zlz4", f"-T{EPOCH}")
    fs = open_image(img)
    with pytest.raises(erofs.ErofsUnsupported, match="compressed"):
        list(fs.walk())


def test_random_corruption_gives_format_errors_only(tmp_path: Path) -> None:
    """Flipped bytes anywhere in the metadata: the reader returns something or raises a
    FormatError — never another exception, never an endless walk."""
    data = small_image(tmp_path)
    check_corruption(data, [(1024, min(len(data), 3 * 4096))], lambda b: read_all(open_image_bytes(b)), 400)


def check_corruption(data: bytes, ranges: list[tuple[int, int]], read: Any, rounds: int, seed: int = 20) -> None:
    """``rounds`` copies of ``data`` with 1–6 bytes changed at random inside ``ranges`` (byte
    ranges, one picked per change): ``read(copy)`` returns or raises a FormatError — never another
    exception, never an endless walk — and both outcomes occur. Shared by the readers' tests."""
    rng = random.Random(seed)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(rounds):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            lo, hi = rng.choice(ranges)
            bad[rng.randrange(lo, hi)] = rng.randrange(256)
        try:
            read(bytes(bad))
            outcomes["ok"] += 1
        except FormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0, outcomes


def check_walk_limits(module: Any, open_fs: Any, invalid: type[Exception], monkeypatch: pytest.MonkeyPatch) -> None:
    """``module``'s MAX_ENTRIES and MAX_DEPTH stop a walk of ``open_fs()`` (a small image of a
    few entries two levels deep) with ``invalid``; shared by the erofs, squashfs and ext4 tests."""
    monkeypatch.setattr(module, "MAX_ENTRIES", 2)
    with pytest.raises(invalid, match="more than 2 entries"):
        list(open_fs().walk())
    monkeypatch.setattr(module, "MAX_ENTRIES", 100)
    monkeypatch.setattr(module, "MAX_DEPTH", 1)
    with pytest.raises(invalid, match="deeper"):
        list(open_fs().walk())


def test_walk_limits_are_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = small_image(tmp_path)
    check_walk_limits(erofs, lambda: open_image_bytes(data), erofs.ErofsInvalid, monkeypatch)


def test_fsck_erofs_is_available_for_the_comparison() -> None:
    assert shutil.which("fsck.erofs") and shutil.which("mkfs.erofs")
