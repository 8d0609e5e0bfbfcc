"""reprobuild.compression: each writer's output is read back by the format's own tool (gzip(1),
xz(1), zstd(1)) to the bytes written, is the same for the same input, and gzip's header carries
no name and no time."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reprobuild.compression import COMPRESSIONS, SUFFIXES, GzipWriter, XzWriter, compressing_writer

TOOLS = {"gzip": ["gzip", "-dc"], "xz": ["xz", "-dc"], "zstd": ["zstd", "-dcq"]}


def _data() -> bytes:
    # Compressible text and incompressible bytes, written below in uneven pieces.
    return b"".join([b"reprobuild " * 50_000, os.urandom(300_000), bytes(range(256)) * 2_000])


def _pack(compression: str, data: bytes, piece: int = 65_521) -> bytes:
    out = io.BytesIO()
    w = compressing_writer(out, compression)
    for i in range(0, len(data), piece):
        assert w.write(data[i:i + piece]) == len(data[i:i + piece])
    w.close()
    return out.getvalue()


@pytest.mark.parametrize("compression", sorted(TOOLS))
def test_the_formats_own_tool_reads_it_back(compression: str) -> None:
    if shutil.which(TOOLS[compression][0]) is None:
        pytest.skip(f"{TOOLS[compression][0]} is not installed")
    data = _data()
    packed = _pack(compression, data)
    assert len(packed) < len(data)
    r = subprocess.run(TOOLS[compression], input=packed, capture_output=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
    assert packed == _pack(compression, data)  # the same input: the same bytes


def test_gzip_header_has_no_name_and_no_time() -> None:
    packed = _pack("gzip", b"x" * 1000)
    assert packed[:10] == GzipWriter.HEADER
    assert packed[3] == 0 and packed[4:8] == b"\0\0\0\0"  # FLG: no FNAME/FCOMMENT; MTIME 0
    assert packed[-4:] == (1000).to_bytes(4, "little")  # ISIZE


def test_none_passes_bytes_through_and_names_are_checked() -> None:
    assert _pack("none", b"abc" * 10, piece=7) == b"abc" * 10
    assert set(SUFFIXES) == set(COMPRESSIONS) and SUFFIXES["none"] == ""
    with pytest.raises(ValueError, match="unknown compression 'lz4'"):
        compressing_writer(io.BytesIO(), "lz4")


@pytest.mark.parametrize("size", [0, 1, 65_536, 65_536 * 3, 200_000])
def test_xz_blocks_are_one_stream_whatever_the_threads(size: int, tmp_path: Path) -> None:
    """Blocks of a fixed size compressed side by side: xz(1) checks and lists one stream with
    ceil(size / block) Blocks, and one thread or three give the same bytes."""
    if shutil.which("xz") is None:
        pytest.skip("xz is not installed")
    data = (_data() * 2)[:size]

    def pack(workers: int) -> bytes:
        out = io.BytesIO()
        w = XzWriter(out, workers=workers, block=65_536)
        for i in range(0, len(data), 10_000):
            w.write(data[i:i + 10_000])
        w.close()
        return out.getvalue()

    packed = pack(3)
    assert packed == pack(1)
    r = subprocess.run(["xz", "-dc"], input=packed, capture_output=True, check=False)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    (tmp_path / "x.xz").write_bytes(packed)  # xz --list reads files only
    listing = subprocess.run(["xz", "--robot", "--list", str(tmp_path / "x.xz")], capture_output=True, text=True,
                             check=True)
    totals = next(line.split("\t") for line in listing.stdout.splitlines() if line.startswith("totals"))
    assert (int(totals[1]), int(totals[2])) == (1, -(-size // 65_536))  # streams, blocks
