"""File system builders: same tree → same bytes under a different TZ/umask/cwd; links and xattrs kept."""

import hashlib
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from reprobuild.image import fs

UUID = uuid.UUID("0c3a4f1e-58a2-4b7d-9e61-2f0a7b3c4d5e")
EPOCH = 1700000000
CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, VFS_CAP_REVISION_2


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree") / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "var/lib/x").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\n")
    os.link(root / "etc/os-release", root / "etc/hardlink")
    (root / "usr/bin/ping").write_bytes(b"\x7fELF" + bytes(5000))
    os.chmod(root / "usr/bin/ping", 0o755)
    os.setxattr(root / "usr/bin/ping", "security.capability", CAP)
    os.symlink("../etc/os-release", root / "usr/link")
    (root / "usr/big").write_bytes(hashlib.shake_256(b"big").digest(300000))
    for i in range(50):
        (root / "var/lib/x" / f"f{i:03}").write_text(str(i))
    os.chown(root / "var/lib/x", 1000, 1000)
    return root


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def build_twice(kind, tree, tmp_path, monkeypatch, label="root"):
    a = fs.make_filesystem(kind, tree, tmp_path / "a.img", UUID, EPOCH, label)
    # Second build: other time zone, locale, umask, cwd, later wall clock, and touched source
    # times (atime/ctime change; mtimes are restored so the *input* is the same tree).
    time.sleep(1.1)
    for p in sorted(tree.rglob("*")):
        st = p.lstat()
        os.utime(p, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns), follow_symlinks=False)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    old = os.umask(0o077)
    try:
        b = fs.make_filesystem(kind, tree, Path("b.img"), UUID, EPOCH, label)
    finally:
        os.umask(old)
    assert a.argv == b.argv and a.size == b.size and a.size % 4096 == 0
    assert sha(tmp_path / "a.img") == sha(other / "b.img"), f"{kind} is not reproducible"
    return a, tmp_path / "a.img"


def run(*argv) -> str:
    env = {**os.environ, "TZ": "UTC", "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout


def test_erofs(tree, tmp_path, monkeypatch):
    res, img = build_twice("erofs", tree, tmp_path, monkeypatch)
    assert res.tool == "mkfs.erofs" and f"-U{UUID}" in res.argv and f"-T{EPOCH}" in res.argv
    assert str(UUID) in run("dump.erofs", "-s", str(img))
    a = run("dump.erofs", "--path=/etc/os-release", str(img))
    b = run("dump.erofs", "--path=/etc/hardlink", str(img))
    nid = lambda s: s.split("NID:")[1].split()[0]
    assert nid(a) == nid(b) and "Links: 2" in a
    ping = run("dump.erofs", "--path=/usr/bin/ping", str(img))
    assert "Xattr size: 0" not in ping
    assert CAP in img.read_bytes()  # the capability value is stored inline
    x = run("dump.erofs", "--path=/var/lib/x", str(img))
    assert "Uid: 1000" in x and "2023-11-14 22:13:20" in x


def test_squashfs(tree, tmp_path, monkeypatch):
    _res, img = build_twice("squashfs", tree, tmp_path, monkeypatch)
    out = tmp_path / "x"
    run("unsquashfs", "-d", str(out), str(img))
    assert os.stat(out / "etc/os-release").st_ino == os.stat(out / "etc/hardlink").st_ino
    assert os.getxattr(out / "usr/bin/ping", "security.capability") == CAP
    assert os.stat(out / "var/lib/x").st_uid == 1000
    assert os.lstat(out / "usr/link").st_mtime == EPOCH
    assert (out / "usr/big").read_bytes() == (tree / "usr/big").read_bytes()


def test_ext4(tree, tmp_path, monkeypatch):
    _res, img = build_twice("ext4", tree, tmp_path, monkeypatch)
    info = run("debugfs", "-R", "stat /etc/hardlink", str(img))
    assert "Links: 2" in info and "ctime: 0x6553f100" in info and "atime: 0x6553f100" in info
    assert CAP.hex() in run("debugfs", "-R", "ea_get -x /usr/bin/ping security.capability", str(img)).replace(
        " ", "").replace("\n", "")
    assert re.search(rf"Filesystem UUID:\s+{UUID}", run("dumpe2fs", "-h", str(img)))
    subprocess.run(["e2fsck", "-fn", str(img)], check=True, capture_output=True)
    assert "User:  1000" in run("debugfs", "-R", "stat /var/lib/x", str(img))


def test_vfat(tmp_path, monkeypatch):
    esp = tmp_path / "esp"
    (esp / "EFI/BOOT").mkdir(parents=True)
    (esp / "loader/entries").mkdir(parents=True)
    (esp / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ" + bytes(1000))
    for name in ["b.conf", "a.conf", "C.conf"]:
        (esp / "loader/entries" / name).write_text(name)
    _res, img = build_twice("vfat", esp, tmp_path, monkeypatch, label="esp")
    listing = run("mdir", "-i", str(img), "-/", "::")
    assert "Serial Number is 0C3A-4F1E" in listing and "2023-11-14" in listing
    assert run("mtype", "-i", str(img), "::/loader/entries/a.conf") == "a.conf"


def test_vfat_refuses_symlinks(tmp_path):
    (tmp_path / "t").mkdir()
    os.symlink("x", tmp_path / "t/l")
    with pytest.raises(fs.FilesystemError, match="only files and directories"):
        fs.make_filesystem("vfat", tmp_path / "t", tmp_path / "o.img", UUID, EPOCH, "esp")


def test_errors(tmp_path):
    with pytest.raises(fs.FilesystemError, match="not a directory"):
        fs.make_filesystem("erofs", tmp_path / "missing", tmp_path / "o.img", UUID, EPOCH, "x")
    with pytest.raises(ValueError):
        fs.make_filesystem("btrfs", tmp_path, tmp_path / "o.img", UUID, EPOCH, "x")
    assert not list(tmp_path.glob(".mkfs-*"))  # no temporary leftovers


def test_tool_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(fs.ToolMissing, match="mkfs.erofs"):
        fs.make_filesystem("erofs", tmp_path, tmp_path / "o.img", UUID, EPOCH, "x")
