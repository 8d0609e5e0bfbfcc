"""cpio newc writer/reader: golden bytes, round trips, hostile input, GNU cpio and bsdtar cross-checks."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from reprobuild.errors import FormatError
from reprobuild.image.cpio import CpioEntry, CpioInvalid, cpio_from_tree, read_cpio, write_cpio

EPOCH = 1700000000


def _archive(entries: list[CpioEntry]) -> bytes:
    buf = io.BytesIO()
    n = write_cpio(entries, buf)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def test_golden_single_file() -> None:
    data = _archive([CpioEntry(path="a", mode=0o100644, mtime=0x65, data=b"hi\n", ino=1)])
    head = (
        b"070701" + b"00000001" + b"000081A4" + b"00000000" * 2 + b"00000001" + b"00000065"
        + b"00000003" + b"00000000" * 4 + b"00000002" + b"00000000"
    )  # fmt: skip
    # 110-byte header + "a\0" = 112 (aligned), data 3 + 1 pad.
    member = head + b"a\0" + b"hi\n\0"
    trailer = b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000"
    trailer += b"TRAILER!!!\0" + b"\0" * 3  # 110 + 11 = 121 -> pad to 124
    assert data == member + trailer
    assert len(data) % 4 == 0


def _make_tree(root: Path) -> None:
    (root / "bin").mkdir()
    (root / "bin" / "busybox").write_bytes(b"\x7fELF" + bytes(range(256)) * 3)
    (root / "bin" / "busybox").chmod(0o755)
    os.link(root / "bin" / "busybox", root / "bin" / "sh")
    (root / "bin" / "ls").symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "a-b").write_bytes(b"x")
    (root / "dev").mkdir()
    (root / "init").write_text("#!/bin/sh\necho hi\n")
    (root / "init").chmod(0o700)


def test_tree_round_trip(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    _make_tree(tree)
    buf = io.BytesIO()
    cpio_from_tree(tree, buf, mtime=EPOCH)
    entries = read_cpio(buf.getvalue())
    paths = [e.path for e in entries]
    # Pre-order, children sorted by bytes: "a-b" < "bin" < "dev" < "empty" < "etc" < "init".
    assert paths == [".", "a-b", "bin", "bin/busybox", "bin/ls", "bin/sh", "dev", "empty", "etc",
                     "etc/motd", "init"]  # fmt: skip
    assert [e.ino for e in entries] == [1, 2, 3, 4, 5, 4, 6, 7, 8, 9, 10]
    by = {e.path: e for e in entries}
    assert all(e.mtime == EPOCH and e.uid == 0 and e.gid == 0 for e in entries)
    # Hard links: data only on the last link.
    assert by["bin/busybox"].nlink == 2 and by["bin/busybox"].data == b""
    assert by["bin/sh"].data == (tree / "bin" / "busybox").read_bytes()
    assert by["bin/ls"].is_symlink and by["bin/ls"].symlink_target == "busybox"
    assert by["."].nlink == 2 + 3 and by["bin"].nlink == 2
    assert stat.S_IMODE(by["init"].mode) == 0o700


def test_tree_independent_of_host_metadata(tmp_path: Path) -> None:
    outs = []
    for i, name in enumerate(("one", "two")):
        tree = tmp_path / name
        tree.mkdir()
        if i:
            (tmp_path / "pad").write_text("shift inode numbers")
        _make_tree(tree)
        os.utime(tree / "etc" / "motd", (12345 + i, 12345 + i))
        buf = io.BytesIO()
        cpio_from_tree(tree, buf, mtime=EPOCH)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_device_nodes_and_owners(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    os.mknod(tree / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    (tree / "f").write_text("x")
    os.chown(tree / "f", 1234, 5678)
    buf = io.BytesIO()
    cpio_from_tree(tree, buf, mtime=EPOCH, keep_owners=True)
    by = {e.path: e for e in read_cpio(buf.getvalue())}
    assert stat.S_ISCHR(by["console"].mode) and (by["console"].rdev_major, by["console"].rdev_minor) == (5, 1)
    assert (by["f"].uid, by["f"].gid) == (1234, 5678)
    buf = io.BytesIO()
    cpio_from_tree(tree, buf, mtime=EPOCH)
    assert {(e.uid, e.gid) for e in read_cpio(buf.getvalue())} == {(0, 0)}


def test_incomplete_hard_link_group_rejected() -> None:
    with pytest.raises(ValueError, match="hard-link"):
        _archive([CpioEntry(path="a", mode=0o100644, nlink=2, ino=7, data=b"x")])


GOOD = _archive([CpioEntry(path="file", mode=0o100644, data=b"abcdef", ino=1)])


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"070707" + GOOD[6:],
        GOOD[:50],
        GOOD[:115],
        GOOD[:-124],  # no trailer
        GOOD[:54] + b"7FFFFFFF" + GOOD[62:],  # filesize far past the end
        GOOD[:94] + b"00100000" + GOOD[102:],  # name size absurd
        GOOD[:94] + b"00000000" + GOOD[102:],  # name size zero
        GOOD[:6] + b"zzzzzzzz" + GOOD[14:],  # non-hex field
        GOOD[:94] + b"00000003" + GOOD[102:],  # name not NUL-terminated where namesize says
    ],
    ids=["empty", "bad-magic", "truncated-header", "truncated-name", "no-trailer", "huge-file",
         "huge-name", "zero-name", "non-hex", "unterminated-name"],
)
def test_hostile_input(blob: bytes) -> None:
    with pytest.raises(CpioInvalid):
        read_cpio(blob)
    assert issubclass(CpioInvalid, FormatError)


def test_gnu_cpio_and_bsdtar_read_it(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    _make_tree(tree)
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as f:
        cpio_from_tree(tree, f, mtime=EPOCH)
    listing = subprocess.run(["cpio", "-t", "--quiet"], stdin=archive.open("rb"), capture_output=True,
                             check=True).stdout.decode().split()  # fmt: skip
    assert listing == [e.path for e in read_cpio(archive.read_bytes())]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=archive.open("rb"), cwd=out, check=True)
    assert (out / "bin" / "sh").read_bytes() == (tree / "bin" / "busybox").read_bytes()
    assert os.stat(out / "bin" / "sh").st_ino == os.stat(out / "bin" / "busybox").st_ino
    assert os.readlink(out / "bin" / "ls") == "busybox"
    assert int(os.stat(out / "etc" / "motd").st_mtime) == EPOCH
    tv = subprocess.run(["bsdtar", "-tvf", str(archive)], capture_output=True, check=True, text=True).stdout
    assert "etc/motd" in tv and "bin/ls -> busybox" in tv


# ---- initrd: zstd-compressed cpio and kernel module selection (reprobuild.image.initrd) ----------

import zstandard

from reprobuild.image.initrd import (
    DEFAULT_ROOT_MODULES,
    ModuleMissing,
    make_initrd_cpio,
    module_name,
    select_kernel_modules,
)


def test_initrd_is_deterministic_zstd_cpio(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    _make_tree(tree)
    make_initrd_cpio(tree, tmp_path / "a.zst", EPOCH)
    (tmp_path / "b").mkdir()
    _make_tree(tmp_path / "b")
    make_initrd_cpio(tmp_path / "b", tmp_path / "b.zst", EPOCH)
    a = (tmp_path / "a.zst").read_bytes()
    assert a == (tmp_path / "b.zst").read_bytes()
    assert a[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic, which the kernel recognises
    raw = zstandard.ZstdDecompressor().decompress(a)
    assert [e.path for e in read_cpio(raw)][:3] == [".", "a-b", "bin"]
    # the zstd CLI agrees (and checks the frame checksum)
    out = subprocess.run(["zstd", "-d", "-c", str(tmp_path / "a.zst")], capture_output=True, check=True).stdout
    assert out == raw


MODULES_DEP = """\
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko kernel/lib/reed_solomon/reed_solomon.ko
kernel/drivers/md/dm-bufio.ko: kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-mod.ko:
kernel/lib/reed_solomon/reed_solomon.ko:
kernel/fs/erofs/erofs.ko.xz: kernel/lib/lz4/lz4_decompress.ko.zst
kernel/lib/lz4/lz4_decompress.ko.zst:
kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/common/usb-common.ko:
"""


def test_module_names() -> None:
    assert module_name("kernel/drivers/usb/storage/usb-storage.ko.zst") == "usb_storage"
    assert module_name("nls_iso8859-1") == "nls_iso8859_1"
    assert len(DEFAULT_ROOT_MODULES) == 17


def test_select_kernel_modules_closure(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    (tmp_path / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\nkernel/fs/ext4/ext4.ko\n")
    got = select_kernel_modules(tmp_path, ["dm_verity", "usb_storage", "erofs", "virtio-blk", "dm-mod"])
    rel = [str(p.relative_to(tmp_path)) for p in got]
    assert rel == [
        "kernel/drivers/md/dm-mod.ko",
        "kernel/drivers/md/dm-bufio.ko",
        "kernel/lib/reed_solomon/reed_solomon.ko",
        "kernel/drivers/md/dm-verity.ko",
        "kernel/drivers/usb/common/usb-common.ko",
        "kernel/drivers/usb/storage/usb-storage.ko",
        "kernel/lib/lz4/lz4_decompress.ko.zst",
        "kernel/fs/erofs/erofs.ko.xz",
    ]
    with pytest.raises(ModuleMissing):
        select_kernel_modules(tmp_path, ["no_such_module"])


def test_modules_dep_hostile(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(FormatError, match="cycle"):
        select_kernel_modules(tmp_path, ["a"])
    (tmp_path / "modules.dep").write_text("a.ko: missing.ko\n")
    with pytest.raises(FormatError, match="no entry"):
        select_kernel_modules(tmp_path, ["a"])
    (tmp_path / "modules.dep").write_text("garbage line\n")
    with pytest.raises(FormatError):
        select_kernel_modules(tmp_path, ["a"])
