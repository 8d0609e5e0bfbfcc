"""The pure-Python FAT reader against images made by the real mkfs.fat and mtools, and hostile images.

One tree (an ESP's shape: EFI/BOOT, EFI/Linux, a 300 KB file, long and short names, names that
differ only in case from their 8.3 form, an empty file, a directory of 200 entries spanning
several clusters) is written as FAT12, FAT16 and FAT32 — with `image/fs.py`'s mkfs.fat + mcopy
calls, and by hand with a fragmented file — read back, and checked against the source tree and
against ``mcopy``'s extraction of the same image.
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from reprobuild.image import vfat
from tests.test_erofs import EPOCH, check_corruption, check_walk_limits

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null", "TZ": "UTC"}


def make_esp_tree(root: Path) -> Path:
    (root / "EFI/BOOT").mkdir(parents=True)
    (root / "EFI/Linux").mkdir()
    (root / "EFI/BOOT/BOOTX64.EFI").write_bytes(os.urandom(300_000))
    (root / "EFI/Linux/loader.conf").write_text("timeout 0\n")
    (root / "README.TXT").write_text("upper case 8.3\n")
    (root / "notes.txt").write_text("lower case 8.3 (NT case flags or a long name)\n")
    (root / "A long name, with spaces and ümlauts.conf").write_text("long\n")
    (root / "empty").write_bytes(b"")
    many = root / "many"
    many.mkdir()
    for i in range(200):
        (many / f"entry-with-a-long-name-{i:03d}.conf").write_text(str(i))
    return root


def open_bytes(data: bytes) -> vfat.Vfat:
    return vfat.Vfat(lambda off, n: data[off:off + n], len(data))


def read_all(fs: vfat.Vfat) -> dict[str, tuple]:
    out = {}
    for prefix, name, e in fs.walk():
        out[os.fsdecode(prefix + name)] = (e.type, fs.read_data(e, 1 << 30) if e.type == "file" else None)
    return out


def describe(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = ("directory", None) if p.is_dir() else ("file", p.read_bytes())
    return out


def mkfs(out: Path, fat: int, size_kib: int, *options: str) -> Path:
    out.unlink(missing_ok=True)
    subprocess.run(["mkfs.fat", "--invariant", "-i", "12345678", "-F", str(fat), *options, "-C", str(out),
                    str(size_kib)], check=True, capture_output=True)  # fmt: skip
    return out


def mcopy_tree(img: Path, tree: Path) -> None:
    subprocess.run(["mcopy", "-s", "-m", "-i", str(img), *[str(p) for p in sorted(tree.iterdir())], "::/"],
                   check=True, capture_output=True, env=MTOOLS_ENV)  # fmt: skip


@pytest.mark.parametrize("fat,size_kib", [(12, 2048), (16, 20480), (32, 66000)])
def test_reader_matches_the_source_tree_and_mcopy(tmp_path: Path, fat: int, size_kib: int) -> None:
    tree = make_esp_tree(tmp_path / "tree")
    img = mkfs(tmp_path / "esp.img", fat, size_kib)
    mcopy_tree(img, tree)
    fs = open_bytes(img.read_bytes())
    assert fs.boot.bits == fat
    assert read_all(fs) == describe(tree)
    # mtools' own extraction of the same image gives the same tree.
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["mcopy", "-s", "-n", "-i", str(img), "::/*", str(out)], check=True, capture_output=True,
                   env=MTOOLS_ENV)  # fmt: skip
    assert read_all(fs) == describe(out)


def test_the_build_s_esp_is_read_with_its_times(tmp_path: Path) -> None:
    from reprobuild.image.fs import make_filesystem

    tree = make_esp_tree(tmp_path / "tree")
    make_filesystem("vfat", tree, tmp_path / "esp.img", uuid.UUID(int=1), EPOCH, "ESP")
    fs = open_bytes((tmp_path / "esp.img").read_bytes())
    assert read_all(fs) == describe(tree)
    assert {e.mtime for _, _, e in fs.walk()} == {EPOCH}  # SOURCE_DATE_EPOCH, read back as UTC


def test_a_fragmented_file_is_read_in_order(tmp_path: Path) -> None:
    """Three files, the middle one deleted, a larger one written after: its clusters fill the
    hole first, then continue past the third file — two runs."""
    img = mkfs(tmp_path / "f.img", 16, 20480)
    src = tmp_path / "src"
    src.mkdir()
    for name, n in (("one", 40_000), ("two", 40_000), ("three", 40_000), ("big", 200_000)):
        (src / name).write_bytes(os.urandom(n))
    for name in ("one", "two", "three"):
        subprocess.run(["mcopy", "-i", str(img), str(src / name), "::/"], check=True, env=MTOOLS_ENV)
    subprocess.run(["mdel", "-i", str(img), "::/two"], check=True, env=MTOOLS_ENV)
    subprocess.run(["mcopy", "-i", str(img), str(src / "big"), "::/"], check=True, env=MTOOLS_ENV)
    fs = open_bytes(img.read_bytes())
    big = next(e for _, n, e in fs.walk() if n == b"big")
    assert len(big.extents) >= 2
    assert fs.read_data(big, 1 << 30) == (src / "big").read_bytes()


# -- hostile images ------------------------------------------------------------------------------


def small_image(tmp_path: Path) -> bytes:
    t = tmp_path / "small"
    if not t.exists():
        (t / "a/b").mkdir(parents=True)
        (t / "a/b/file.txt").write_text("x" * 5000)
        (t / "a/other.txt").write_text("y")
    img = mkfs(tmp_path / "small.img", 16, 4096, "-s", "1")  # FAT16 with 512-byte clusters: 4 MiB
    mcopy_tree(img, t)
    return img.read_bytes()


def _entry_offset(data: bytes, fs: vfat.Vfat, parent: vfat.Entry, short: bytes) -> int:
    """Byte offset of the 8.3 entry ``short`` (11 bytes, space padded) in directory ``parent``."""
    for off, n in parent.extents:
        for pos in range(off, off + n, 32):
            if data[pos:pos + 11] == short:
                return pos
    raise AssertionError(short)


def test_a_directory_loop_and_a_looping_chain_are_errors(tmp_path: Path) -> None:
    data = bytearray(small_image(tmp_path))
    fs = open_bytes(bytes(data))
    entries = {os.fsdecode(p + n): e for p, n, e in fs.walk()}
    at = _entry_offset(bytes(data), fs, entries["a"], b"B          ")
    struct.pack_into("<H", data, at + 26, entries["a"].key)  # a/b -> a's first cluster
    with pytest.raises(vfat.VfatInvalid, match="reached twice"):
        list(open_bytes(bytes(data)).walk())
    data = bytearray(small_image(tmp_path))
    first = entries["a/b/file.txt"].key
    struct.pack_into("<H", data, fs.boot.fat_offset + first * 2, first)  # the chain points at itself
    with pytest.raises(vfat.VfatInvalid, match="loops"):
        list(open_bytes(bytes(data)).walk())


def test_truncated_and_foreign_images_are_errors(tmp_path: Path) -> None:
    data = small_image(tmp_path)
    with pytest.raises(vfat.VfatInvalid, match="signature"):
        open_bytes(bytes(4096))
    with pytest.raises(vfat.VfatInvalid, match="truncated"):
        open_bytes(data[:len(data) // 2])
    bad = bytearray(data)
    struct.pack_into("<H", bad, 11, 1000)  # 1000 bytes per sector
    with pytest.raises(vfat.VfatInvalid, match="geometry"):
        open_bytes(bytes(bad))


def test_random_corruption_gives_format_errors_only(tmp_path: Path) -> None:
    data = small_image(tmp_path)
    fs = open_bytes(data)
    dirs = [e for _, _, e in fs.walk() if e.type == "directory"] + [fs.root()]
    targets = [(0, 512), (fs.boot.fat_offset, fs.boot.fat_offset + 64)] + [(off, off + n) for d in dirs
                                                                          for off, n in d.extents]  # fmt: skip
    check_corruption(data, targets, lambda b: read_all(open_bytes(b)), 600)


def test_walk_limits_are_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = small_image(tmp_path)
    check_walk_limits(vfat, lambda: open_bytes(data), vfat.VfatInvalid, monkeypatch)
