"""xz Blocks decompressed side by side: the block structure (``debian/xzblocks``, checked against
``xz --list --robot``), and index texts of multi-block Packages.xz files fetched from the signed
fixture repository (re-signed with the multi-block file listed), intact and damaged.

The multi-block files are made by ``xz --block-size`` in threaded mode (``-T2``), which writes each
Block's sizes into its header, as Debian's Packages.xz have them; ``-T1`` writes the same Blocks
without sizes (decoded in one go).
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fixtures.make_repo import sign_clear, stop_agent
from reprobuild.debian import repository, xzblocks
from reprobuild.debian.repository import RepositorySource, fetch_index_text, fetch_release
from reprobuild.debian.stanzaindex import scan_stanzas
from reprobuild.errors import RepositoryError

NOW = datetime(2025, 6, 1, tzinfo=UTC)  # inside the fixture's validity window
PACKAGES = "main/binary-amd64/Packages"


def xz_blocks(data: bytes, block_size: int, threads: int = 2) -> bytes:
    if shutil.which("xz") is None:
        pytest.fail("xz (xz-utils) is needed: it is in the Makefile's APT_PACKAGES")
    return subprocess.run(["xz", f"-T{threads}", f"--block-size={block_size}", "--check=crc64", "-c"],
                          input=data, capture_output=True, check=True).stdout  # fmt: skip


def xz_list_blocks(data: bytes, tmp_path: Path) -> list[tuple[int, int, int, int, int]]:
    """(offset, uncompressed offset, header size, compressed size, uncompressed size) of each
    Block, as ``xz --list --robot -vv`` reports them."""
    path = tmp_path / "listed.xz"
    path.write_bytes(data)
    out = subprocess.run(["xz", "--robot", "--list", "-vv", str(path)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    blocks = []
    for line in out.splitlines():
        f = line.split("\t")
        if f[0] == "block":
            blocks.append((int(f[4]), int(f[5]), int(f[11]), int(f[13]), int(f[7])))
    return blocks


@pytest.fixture(scope="module")
def plain(fixture_repo) -> bytes:
    return (fixture_repo.root / "dists/stable" / PACKAGES).read_bytes()


# --------------------------------------------------------------------------------------- the format


def test_splitter_finds_the_blocks_xz_lists(plain, tmp_path):
    data = xz_blocks(plain, 2048)
    expected = xz_list_blocks(data, tmp_path)
    assert len(expected) >= 3
    splitter = xzblocks.BlockSplitter()
    found = []
    for available in range(len(data) + 1):  # one byte at a time: headers are only read whole
        found += splitter.advance(data, available)
    assert [(b.offset, b.uncompressed_offset, b.header_size, b.compressed_size, b.uncompressed_size)
            for b in found] == expected  # fmt: skip
    assert found[-1].end == splitter.index_offset
    xzblocks.check_index(data, splitter)
    flags = splitter.flags
    assert flags is not None
    out = b""
    for block in found:  # each Block alone, as a one-Block stream, is exactly its part of the text
        stream = xzblocks.block_stream_head(flags) + data[block.offset : block.end] + xzblocks.block_stream_tail(flags, block)
        part = lzma.decompress(stream)
        assert part == plain[block.uncompressed_offset : block.uncompressed_offset + block.uncompressed_size]
        out += part
    assert out == plain


def test_blocks_without_sizes_are_not_splittable(plain):
    splitter = xzblocks.BlockSplitter()
    with pytest.raises(xzblocks.NotSplittable, match="does not state the Block's sizes"):
        splitter.advance(xz_blocks(plain, 2048, threads=1), 64)
    with pytest.raises(xzblocks.NotSplittable, match="does not state the Block's sizes"):
        xzblocks.BlockSplitter().advance(lzma.compress(plain), 64)  # Python's lzma: one Block, no sizes
    with pytest.raises(xzblocks.NotSplittable, match="no xz Stream Header"):
        xzblocks.BlockSplitter().advance(b"not xz at all", 13)


def _with_index_record(data: bytes, fix_crc: bool) -> bytes:
    """``data`` with the first Index record's Uncompressed Size one larger (Index CRC32 fixed or not)."""
    splitter = xzblocks.BlockSplitter()
    splitter.advance(data, len(data))
    start = splitter.index_offset
    assert start is not None
    index = bytearray(data[start : len(data) - xzblocks.STREAM_FOOTER_SIZE])
    _, pos = xzblocks.read_varint(index, 1, len(index))  # number of records
    _, pos = xzblocks.read_varint(index, pos, len(index))  # unpadded size
    assert index[pos] & 0x80  # a multi-byte Uncompressed Size: bump its lowest byte
    index[pos] = (index[pos] & 0x80) | ((index[pos] + 1) & 0x7F)
    if fix_crc:
        index[-4:] = struct.pack("<I", zlib.crc32(index[:-4]))
    return data[:start] + bytes(index) + data[len(data) - xzblocks.STREAM_FOOTER_SIZE :]


@pytest.mark.parametrize("fix_crc, message", [(True, "does not match its Block"), (False, "Index's CRC32")])
def test_a_wrong_index_is_not_accepted(plain, fix_crc, message):
    data = xz_blocks(plain, 2048)
    bad = _with_index_record(data, fix_crc)
    splitter = xzblocks.BlockSplitter()
    splitter.advance(bad, len(bad))
    with pytest.raises(xzblocks.NotSplittable, match=message):
        xzblocks.check_index(bad, splitter)
    with pytest.raises(lzma.LZMAError):  # and the whole-file decoder refuses it too
        lzma.decompress(bad)


def test_varints_round_trip_and_reject_padding():
    for value in (0, 1, 127, 128, 300, 1 << 40):
        encoded = xzblocks.encode_varint(value)
        assert xzblocks.read_varint(encoded, 0, len(encoded)) == (value, len(encoded))
    with pytest.raises(xzblocks.NotSplittable, match="minimally"):
        xzblocks.read_varint(b"\x81\x00", 0, 2)
    with pytest.raises(xzblocks.NotSplittable, match="past its header"):
        xzblocks.read_varint(b"\x81", 0, 1)


# --------------------------------------------------------------------------------------- fetched


def _serve_index(fixture_repo, root: Path, xz: bytes) -> RepositorySource:
    """A file:// copy of the fixture whose stable Release lists ``xz`` as Packages.xz (by name and
    by hash), re-signed with the fixture key."""
    shutil.copytree(fixture_repo.root / "dists", root / "dists")
    dist = root / "dists/stable"
    old = (dist / f"{PACKAGES}.xz").read_bytes()
    digest = hashlib.sha256(xz).hexdigest()
    (dist / f"{PACKAGES}.xz").write_bytes(xz)
    (dist / "main/binary-amd64/by-hash/SHA256" / digest).write_bytes(xz)
    release = (dist / "Release").read_bytes()
    old_line = f" {hashlib.sha256(old).hexdigest()} {len(old):>8} {PACKAGES}.xz\n".encode()
    assert old_line in release
    release = release.replace(old_line, f" {digest} {len(xz):>8} {PACKAGES}.xz\n".encode())
    try:
        (dist / "InRelease").write_bytes(sign_clear(fixture_repo.gnupg_home, fixture_repo.key_fingerprint, release))
    finally:
        stop_agent(fixture_repo.gnupg_home)
    return RepositorySource("debian", root.as_uri(), "stable", keyrings=(fixture_repo.keyring_path,))


def _fetch(source: RepositorySource):
    verified = fetch_release(None, source, now=NOW)
    return fetch_index_text(None, source, verified, verified.release.sha256[f"{PACKAGES}.xz"])


def _counting_decoders(monkeypatch) -> list[int]:
    """Counts the xz decoders the repository code makes."""
    made: list[int] = []
    real = lzma.LZMADecompressor

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(repository.lzma, "LZMADecompressor", counted)
    return made


@pytest.mark.parametrize("threads", [2, 1])
def test_multi_block_index_text_is_the_verified_text(fixture_repo, plain, tmp_path, monkeypatch, threads):
    """With sizes in the Block Headers (-T2) each Block gets its own decoder; without (-T1) one
    decoder reads the file. Either way the text (and its stanzas) is the plain index."""
    xz = xz_blocks(plain, 2048, threads)
    blocks = len(xz_list_blocks(xz, tmp_path))
    assert blocks >= 3
    source = _serve_index(fixture_repo, tmp_path / "copy", xz)
    made = _counting_decoders(monkeypatch)
    text, heads = _fetch(source)
    assert text == plain
    assert heads == scan_stanzas(plain)
    assert len(made) == (blocks if threads == 2 else 1)


def _damaged(plain: bytes, how: str, tmp_path: Path) -> bytes:
    data = bytearray(xz_blocks(plain, 2048))
    offset, _, header, compressed, _ = xz_list_blocks(bytes(data), tmp_path)[1]
    if how == "corrupt block":  # a byte in the middle of the second Block's compressed data
        data[offset + header + compressed // 2] ^= 0x55
    elif how == "truncated":  # the file ends inside the second Block
        del data[offset + header + compressed // 2 :]
    elif how == "wrong index":
        return _with_index_record(bytes(data), fix_crc=True)
    elif how == "bad block header":  # the second Block Header's CRC32 no longer matches
        data[offset + 2] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize("how, message", [
    ("corrupt block", "Corrupt input data"), ("truncated", "truncated"),
    ("wrong index", "Corrupt input data"), ("bad block header", "Corrupt input data"),
])  # fmt: skip
def test_damaged_multi_block_index_with_the_signed_hash(fixture_repo, plain, tmp_path, how, message):
    """A multi-block file that matches its signed hash but does not decompress: the one ordinary
    decoder that then reads the whole file names the damage, in one line."""
    source = _serve_index(fixture_repo, tmp_path / "copy", _damaged(plain, how, tmp_path))
    with pytest.raises(RepositoryError, match=f"cannot decompress {PACKAGES}.xz: .*{message}") as e:
        _fetch(source)
    assert "\n" not in str(e.value)


def test_multi_block_index_beyond_the_plain_size(fixture_repo, plain, tmp_path):
    """Blocks whose stated sizes add up to more than the plain size the Release lists: refused."""
    source = _serve_index(fixture_repo, tmp_path / "copy", xz_blocks(plain + b"\n" * 5000, 2048))
    with pytest.raises(RepositoryError, match=f"more than {len(plain)} bytes"):
        _fetch(source)


def test_damaged_download_of_a_multi_block_index_is_named_by_its_hash(fixture_repo, plain, tmp_path):
    """The Release lists the intact file; a damaged copy is refused for its hash, not its decoding."""
    source = _serve_index(fixture_repo, tmp_path / "copy", xz_blocks(plain, 2048))
    verified = fetch_release(None, source, now=NOW)
    entry = verified.release.sha256[f"{PACKAGES}.xz"]
    damaged = _damaged(plain, "corrupt block", tmp_path)
    for path in (tmp_path / "copy/dists/stable" / f"{PACKAGES}.xz",
                 tmp_path / "copy/dists/stable/main/binary-amd64/by-hash/SHA256" / entry.sha256):  # fmt: skip
        path.write_bytes(damaged)
    with pytest.raises(repository.CorruptIndex, match="does not match the signed Release"):
        fetch_index_text(None, source, verified, entry)


@pytest.mark.live
def test_live_debian_index_is_decoded_block_by_block(tmp_path, monkeypatch):
    """trixie main's Packages.xz from the host's mirror states its Blocks' sizes (the premise of
    the side-by-side decoding): one decoder per Block, and the text is the whole file's."""
    import requests

    from reprobuild.debian.sources import host_mirror_for

    source = RepositorySource("debian", host_mirror_for("debian"), "trixie")
    with requests.Session() as session:
        verified = fetch_release(session, source)
        entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
        raw = session.get(f"{source.dists_url}/main/binary-amd64/by-hash/SHA256/{entry.sha256}", timeout=60).content
        assert hashlib.sha256(raw).hexdigest() == entry.sha256
        blocks = xz_list_blocks(raw, tmp_path)
        assert len(blocks) >= 2
        made = _counting_decoders(monkeypatch)
        text, heads = fetch_index_text(session, source, verified, entry)
    assert len(made) == len(blocks)
    assert text == lzma.decompress(raw)
    assert len(heads) > 50000


def test_cut_download_of_a_multi_block_index_stops_its_decoders(fixture_repo, plain, tmp_path):
    """A download that ends early is refused for its size, and the Block decoders waiting for
    the rest are stopped (no thread is left behind)."""
    import threading

    source = _serve_index(fixture_repo, tmp_path / "copy", xz_blocks(plain, 2048))
    verified = fetch_release(None, source, now=NOW)
    entry = verified.release.sha256[f"{PACKAGES}.xz"]
    full = (tmp_path / "copy/dists/stable" / f"{PACKAGES}.xz").read_bytes()
    for path in (tmp_path / "copy/dists/stable" / f"{PACKAGES}.xz",
                 tmp_path / "copy/dists/stable/main/binary-amd64/by-hash/SHA256" / entry.sha256):  # fmt: skip
        path.write_bytes(full[: len(full) * 2 // 3])
    with pytest.raises(repository.CorruptIndex, match=f"got {len(full) * 2 // 3} bytes, the signed Release lists"):
        fetch_index_text(None, source, verified, entry)
    assert not [t for t in threading.enumerate() if t.name.startswith(("xz-block", "index"))]
