"""The deterministic tar writer: same tree → same bytes; readable by GNU tar; metadata kept."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from reprobuild.errors import BuildError
from reprobuild.rootfs.archive import pax_record, read_tar, ustar_header, write_tar

EPOCH = 1700000000


def _make_tree(root: Path, order: list[str]) -> None:
    root.mkdir()
    for name in order:  # creation order differs between the two trees; output must not
        (root / "d").mkdir(exist_ok=True)
        (root / "d" / name).write_bytes(name.encode() * 10)
    (root / "d/link").symlink_to("/etc/" + "x" * 120)  # long absolute target: pax linkpath
    os.link(root / "d" / "b", root / "hard")
    long_dir = root / ("long-" * 30)
    long_dir.mkdir()
    (long_dir / "f").write_bytes(b"")
    (root / "capfile").write_bytes(b"\x7fELF")
    os.setxattr(root / "capfile", "user.reprobuild", b"\x01\x00\xff")
    os.chmod(root / "capfile", 0o4755)
    os.utime(root / "d", (0, 2 * EPOCH))  # in the future: clamped


def test_same_tree_same_bytes_and_tar_reads_it(tmp_path: Path) -> None:
    _make_tree(tmp_path / "a", ["b", "a", "c"])
    _make_tree(tmp_path / "b", ["c", "b", "a"])
    write_tar(tmp_path / "a", tmp_path / "a.tar", EPOCH)
    write_tar(tmp_path / "b", tmp_path / "b.tar", EPOCH)
    da, db = ((tmp_path / n).read_bytes() for n in ("a.tar", "b.tar"))
    assert hashlib.sha256(da).digest() == hashlib.sha256(db).digest()
    assert len(da) % 10240 == 0
    listing = subprocess.run(["tar", "-tvf", str(tmp_path / "a.tar")], capture_output=True, text=True, check=True)
    names = [line.split()[5] for line in listing.stdout.splitlines()]
    assert names[0] == "./" and names == sorted(names, key=lambda n: n.rstrip("/").split("/"))
    entries = {e.name.removeprefix("./"): e for e in read_tar(tmp_path / "a.tar")}
    assert entries["d/b"].type == "file" and entries["hard"].type == "hardlink"
    assert entries["d/link"].linkname == "/etc/" + "x" * 120
    assert entries["capfile"].xattrs == {"user.reprobuild": b"\x01\x00\xff"}
    assert entries["capfile"].mode == 0o4755
    assert entries["d"].mtime == EPOCH and all(e.mtime <= EPOCH for e in entries.values())
    assert all(e.uid == os.getuid() for e in entries.values())
    assert ("long-" * 30) + "/f" in entries
    # GNU tar restores the xattr and the hard link.
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", str(out), "-xf", str(tmp_path / "a.tar")], check=True)
    assert os.getxattr(out / "capfile", "user.reprobuild") == b"\x01\x00\xff"
    assert os.stat(out / "hard").st_ino == os.stat(out / "d/b").st_ino or os.stat(out / "hard").st_nlink == 2


def test_write_tar_is_atomic_and_refuses_existing(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t/sock").touch()
    (tmp_path / "out.tar").write_text("keep")
    with pytest.raises(BuildError, match="exists"):
        write_tar(tmp_path / "t", tmp_path / "out.tar", EPOCH)
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "t/s2"))
    try:
        with pytest.raises(BuildError, match="socket"):
            write_tar(tmp_path / "t", tmp_path / "new.tar", EPOCH)
    finally:
        s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar", "t"]


def test_header_vectors() -> None:
    # A pax record's length counts its own digits: "11 a=bcde\n" style boundaries.
    assert pax_record("path", b"x") == b"9 path=x\n"
    assert pax_record("k", b"v" * 4) == b"9 k=vvvv\n"  # 1 digit fits
    assert pax_record("k", b"v" * 5) == b"11 k=vvvvv\n"  # 10 would need 2 digits: 11
    assert len(pax_record("k", b"v" * 95)) == int(pax_record("k", b"v" * 95).split(b" ")[0])
    h = ustar_header(b"./a", 0o644, 0, 0, 0, EPOCH, b"0")
    assert len(h) == 512 and h[257:263] == b"ustar\0"
    # Checksum as GNU tar computes it: sum of header bytes with the chksum field as spaces.
    assert int(h[148:154], 8) == sum(h[:148]) + 8 * 32 + sum(h[156:])
