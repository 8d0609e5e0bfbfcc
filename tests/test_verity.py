"""dm-verity: docs/formats.md §5 vectors, veritysetup cross-checks, tamper detection, throughput."""

import hashlib
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from reprobuild.image import ids, verity

SEED = bytes.fromhex("0123456789abcdef0123456789abcdef")
PARAMS = verity.VerityParams(ids.verity_salt(SEED), ids.verity_superblock_uuid(SEED))


def zeros(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_golden_8mib_zero_vector(tmp_path):
    data = zeros(tmp_path / "data", 8 << 20)
    tree = verity.write_hash_device(data, tmp_path / "hash", PARAMS)
    assert tree.hash_blocks == 17 and tree.data_blocks == 2048
    assert tree.root_hash.hex() == "9aaa750b24ed1124a8ab9fdf60df67422c9617a9fbbedf05ae83abc758faffd1"
    os.truncate(tmp_path / "hash", 1 << 20)  # veritysetup's file was 1 MiB with a zero tail
    assert hashlib.sha256((tmp_path / "hash").read_bytes()).hexdigest() == (
        "dec14832dd173aa0352ee4aa50586e0928eb33141be2d0dbe05e9c0775408031")


def test_superblock_layout_and_round_trip():
    sb = verity.pack_superblock(PARAMS, 2048)
    assert len(sb) == 4096 and sb[:8] == b"verity\0\0" and sb[512:] == bytes(3584)
    assert sb[16:32] == PARAMS.uuid.bytes  # RFC order, not GPT mixed-endian
    assert sb[32:38] == b"sha256" and sb[88:120] == PARAMS.salt
    parsed = verity.parse_superblock(sb)
    assert parsed == verity.VeritySuperblock(PARAMS, 2048)


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b"x" * 8 + b[8:], "magic"),
    (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "version"),
    (lambda b: b[:80] + (300).to_bytes(2, "little") + b[82:], "salt size"),
    (lambda b: b[:64] + (1000).to_bytes(4, "little") + b[68:], "block size"),
    (lambda b: b[:100], "truncated"),
], ids=["no-magic", "bad-version", "huge-salt", "odd-block-size", "truncated"])
def test_hostile_superblocks(mutate, message):
    with pytest.raises(verity.VerityInvalid, match=message):
        verity.parse_superblock(mutate(verity.pack_superblock(PARAMS, 1)))


def test_level_sizes():
    assert verity.level_sizes(1, PARAMS) == []
    assert verity.level_sizes(128, PARAMS) == [1]
    assert verity.level_sizes(129, PARAMS) == [2, 1]
    assert verity.level_sizes(20000, PARAMS) == [157, 2, 1]  # 160 hash blocks (docs/formats.md §5)


needs_veritysetup = pytest.mark.skipif(shutil.which("veritysetup") is None,
                                       reason="veritysetup (cryptsetup-bin) missing")


def veritysetup_format(data: Path, hash_dev: Path, params: verity.VerityParams) -> str:
    out = subprocess.run(["veritysetup", "format", str(data), str(hash_dev), f"--salt={params.salt.hex()}",
                          f"--uuid={params.uuid}", "--hash=sha256", "--data-block-size=4096",
                          "--hash-block-size=4096", "--format=1"],
                         check=True, capture_output=True, text=True).stdout
    return re.search(r"Root hash:\s+([0-9a-f]+)", out).group(1)


@needs_veritysetup
@pytest.mark.parametrize("blocks", [1, 128, 129, 20000])
def test_matches_veritysetup(tmp_path, blocks):
    data = tmp_path / "data"
    data.write_bytes(hashlib.shake_256(str(blocks).encode()).digest(blocks * 4096))
    ours = verity.write_hash_device(data, tmp_path / "ours", PARAMS)
    theirs = tmp_path / "theirs"
    root = veritysetup_format(data, theirs, PARAMS)
    assert ours.root_hash.hex() == root
    their_bytes = theirs.read_bytes()
    assert their_bytes[:ours.hash_device_size] == (tmp_path / "ours").read_bytes()
    assert their_bytes[ours.hash_device_size:].count(0) == len(their_bytes) - ours.hash_device_size
    # and veritysetup accepts our hash device, our verifier accepts theirs
    subprocess.run(["veritysetup", "verify", str(data), str(tmp_path / "ours"), ours.root_hash.hex()],
                   check=True, capture_output=True)
    assert verity.verify_verity(data, theirs, root).data_blocks == blocks


def test_verify_detects_tampering(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(os.urandom(300 * 4096))
    tree = verity.write_hash_device(data, tmp_path / "hash", PARAMS)
    verity.verify_verity(data, tmp_path / "hash", tree.root_hash.hex())
    with pytest.raises(verity.VerityMismatch, match="root hash"):
        verity.verify_verity(data, tmp_path / "hash", bytes(32))
    raw = bytearray(data.read_bytes())
    raw[12345] ^= 1
    data.write_bytes(raw)
    with pytest.raises(verity.VerityMismatch, match="root hash"):
        verity.verify_verity(data, tmp_path / "hash", tree.root_hash)
    raw[12345] ^= 1
    data.write_bytes(raw)
    h = bytearray((tmp_path / "hash").read_bytes())
    h[-100] ^= 1  # level 0 lives at the end; the root still matches, the stored tree does not
    (tmp_path / "hash").write_bytes(h)
    with pytest.raises(verity.VerityMismatch, match="level 0"):
        verity.verify_verity(data, tmp_path / "hash", tree.root_hash)
    with pytest.raises(verity.VerityMismatch, match="holds"):
        verity.verify_verity(tmp_path / "hash", tmp_path / "hash", tree.root_hash)


def test_data_size_must_be_whole_blocks(tmp_path):
    (tmp_path / "d").write_bytes(b"x" * 5000)
    with pytest.raises(verity.VerityInvalid, match="multiple"):
        verity.hash_file(tmp_path / "d", PARAMS)


def test_params_validation():
    with pytest.raises(ValueError):
        verity.VerityParams(b"", uuid.UUID(int=0), hash_type=0)
    with pytest.raises(ValueError):
        verity.VerityParams(b"x" * 257, uuid.UUID(int=0))


def test_throughput_close_to_sha256(tmp_path):
    """Hashing must not be much slower than sha256 itself (measured numbers go to the report)."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(64 << 20))
    t0 = time.perf_counter()
    verity.hash_file(data, PARAMS)
    t_verity = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashlib.sha256(data.read_bytes()).digest()
    t_sha = time.perf_counter() - t0
    print(f"verity {64 / t_verity:.0f} MB/s, plain sha256 {64 / t_sha:.0f} MB/s")
    assert t_verity < 4 * t_sha + 0.2  # generous: the CI machine is shared


def _image_with_tree(tmp_path: Path, blocks: int, gap: int = 8192) -> tuple[Path, int, int, str]:
    """One file holding random data, a gap, then the hash device (as a DDI holds both partitions)."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(blocks * 4096))
    tree = verity.write_hash_device(data, tmp_path / "hash", PARAMS)
    image = tmp_path / "image"
    image.write_bytes(bytes(gap) + data.read_bytes() + bytes(4096) + (tmp_path / "hash").read_bytes())
    return image, gap, gap + blocks * 4096 + 4096, tree.root_hash.hex()


@pytest.mark.parametrize("blocks", [1, 7, 129, 3000])
def test_check_blocks_accepts_and_copies(tmp_path, blocks):
    image, data_off, hash_off, root = _image_with_tree(tmp_path, blocks)
    copy = tmp_path / "copy"
    with open(image, "rb") as f, open(copy, "wb") as out:
        sb = verity.check_blocks(f, data_off, hash_off, root, copy_to=out)
    assert sb.data_blocks == blocks
    assert copy.read_bytes() == (tmp_path / "data").read_bytes()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_check_blocks_names_the_tampered_block(tmp_path):
    image, data_off, hash_off, root = _image_with_tree(tmp_path, 3000)
    _flip(image, data_off + 2049 * 4096 + 17)
    with open(image, "rb") as f, pytest.raises(verity.VerityMismatch, match=r"data block 2049 \(bytes 8392704"):
        verity.check_blocks(f, data_off, hash_off, root)
    _flip(image, data_off + 2049 * 4096 + 17)  # restore; now break the tree's level 0
    _flip(image, hash_off + 4096 + 4096 * 1 + 5)  # top block is 1 block, then level 0 starts
    with open(image, "rb") as f, pytest.raises(verity.VerityMismatch, match="hash tree level 0 block 0 "):
        verity.check_blocks(f, data_off, hash_off, root)
    _flip(image, hash_off + 4096 + 4096 * 1 + 5)
    with open(image, "rb") as f, pytest.raises(verity.VerityMismatch, match="level 1 block 0 .*root hash"):
        verity.check_blocks(f, data_off, hash_off, "00" * 32)
    with open(image, "rb") as f:
        verity.check_blocks(f, data_off, hash_off, root)


def test_check_blocks_single_block_and_short_data(tmp_path):
    image, data_off, hash_off, root = _image_with_tree(tmp_path, 1)
    with open(image, "rb") as f, pytest.raises(verity.VerityMismatch, match="data block 0"):
        verity.check_blocks(f, data_off, hash_off, "11" * 32)
    image, data_off, hash_off, root = _image_with_tree(tmp_path, 50)
    truncated = tmp_path / "truncated"  # the hash device first, then only half the data
    hash_dev = (tmp_path / "hash").read_bytes()
    truncated.write_bytes(hash_dev + (tmp_path / "data").read_bytes()[: 25 * 4096])
    with open(truncated, "rb") as f, pytest.raises(verity.VerityInvalid, match="ended 102400 bytes early"):
        verity.check_blocks(f, len(hash_dev), 0, root)


@pytest.mark.parametrize("blocks", [2, 129, 20000])
def test_changed_data_blocks_walks_the_trees_top_down(tmp_path, blocks):
    """Two hash devices of the same shape: exactly the changed data blocks, reading few blocks."""
    params = verity.VerityParams(salt=bytes(range(32)), uuid=uuid.UUID(int=3))
    data = bytearray(hashlib.shake_256(b"d").digest(blocks * 4096))
    changed = sorted({0, blocks - 1, blocks // 2})
    other = bytearray(data)
    for b in changed:
        other[b * 4096 + 7] ^= 0xFF
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(other)
    verity.write_hash_device(tmp_path / "a", tmp_path / "a.hash", params)
    verity.write_hash_device(tmp_path / "b", tmp_path / "b.hash", params)
    ha, hb = (tmp_path / "a.hash").read_bytes(), (tmp_path / "b.hash").read_bytes()
    reads = []

    def reader(buf):
        def read_at(off, n):
            reads.append(n)
            return buf[off:off + n]

        return read_at

    sb = verity.parse_superblock(ha[:verity.SB_SIZE])
    assert verity.changed_data_blocks(reader(ha), reader(hb), sb) == changed
    levels = len(verity.level_sizes(blocks, params))
    assert sum(reads) <= 2 * 4096 * levels * len(changed)  # only the paths to the changed blocks
    reads.clear()
    assert verity.changed_data_blocks(reader(ha), reader(ha), sb) == []
    assert sum(reads) == 2 * 4096  # identical: the two top blocks
    with pytest.raises(verity.VerityInvalid):
        verity.changed_data_blocks(reader(ha[:4096 + 10]), reader(hb), sb)
