"""Deterministic FAT ESP: identical bytes across TZ/umask/time, files readable with mtools."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from reprobuild.image.esp import FAT32_MIN_SIZE, EspError, auto_size, make_esp

EPOCH = 1700000000
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null", "TZ": "UTC"}


def _files(tmp_path: Path) -> dict[str, Path | bytes]:
    src = tmp_path / "BOOTX64.EFI"
    src.write_bytes(b"MZ" + bytes(range(256)) * 400)
    return {
        "EFI/BOOT/BOOTX64.EFI": src,
        "EFI/Linux/debian-12.efi": b"uki" * 1000,
        "loader/loader.conf": b"timeout 0\n",
        "loader/entries/a long name.conf": b"title x\n",
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_across_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path)
    make_esp(files, tmp_path / "a.img", volume_id=0x12345678, label="ESP", epoch=EPOCH)
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    old_umask = os.umask(0o077)
    try:
        time.sleep(1.1)  # a different wall-clock second
        # the same files given in a different order
        make_esp(dict(reversed(list(files.items()))), tmp_path / "b.img", volume_id=0x12345678, label="ESP", epoch=EPOCH)
    finally:
        os.umask(old_umask)
    assert _sha(tmp_path / "a.img") == _sha(tmp_path / "b.img")
    make_esp(files, tmp_path / "c.img", volume_id=0x12345678, label="ESP", epoch=EPOCH + 2)
    assert _sha(tmp_path / "a.img") != _sha(tmp_path / "c.img")  # the epoch really reaches the bytes


def test_files_read_back(tmp_path: Path) -> None:
    files = _files(tmp_path)
    size = make_esp(files, tmp_path / "esp.img", volume_id=0xDEADBEEF, label="esp", epoch=EPOCH)
    assert size == (tmp_path / "esp.img").stat().st_size == auto_size([102402, 3000, 10, 8], 5)
    for path, content in files.items():
        out = subprocess.run(["mtype", "-i", str(tmp_path / "esp.img"), f"::/{path}"], env=MTOOLS_ENV,
                             capture_output=True, check=True).stdout  # fmt: skip
        assert out == (content if isinstance(content, bytes) else content.read_bytes())
    listing = subprocess.run(["mdir", "-i", str(tmp_path / "esp.img"), "::/EFI/BOOT"], env=MTOOLS_ENV,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "DEAD-BEEF" in listing and "ESP" in listing
    assert "2023-11-14  22:13" in listing  # EPOCH in UTC, for files and directories
    info = subprocess.run(["minfo", "-i", str(tmp_path / "esp.img"), "::"], env=MTOOLS_ENV, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert "FAT16" in info or "fat_bits=16" in info or "FAT type: FAT16" in info


def test_fat32_for_larger_sizes(tmp_path: Path) -> None:
    make_esp({"a.txt": b"x"}, tmp_path / "big.img", size=FAT32_MIN_SIZE, volume_id=1, epoch=EPOCH)
    boot = (tmp_path / "big.img").read_bytes()[:512]
    assert boot[0x52:0x5A] == b"FAT32   "
    assert boot[0x43:0x47] == (1).to_bytes(4, "little")  # volume id in the FAT32 boot sector


@pytest.mark.parametrize("bad", [{"../x": b""}, {"a//b": b""}, {"/": b""}])
def test_bad_paths(tmp_path: Path, bad: dict[str, bytes]) -> None:
    with pytest.raises(EspError):
        make_esp(bad, tmp_path / "x.img", epoch=EPOCH)


def test_file_too_big(tmp_path: Path) -> None:
    with pytest.raises(EspError):
        make_esp({"big": bytes(17 * 1024 * 1024)}, tmp_path / "x.img", size=16 * 1024 * 1024, epoch=EPOCH)
    assert not list(tmp_path.glob("x.img*"))
