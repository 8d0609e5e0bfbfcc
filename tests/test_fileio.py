"""reprobuild.fileio's HashingWriter: the digest of what passed through it, hashed inline or on a
second thread (the tar and cpio stages name their output by it instead of reading it again)."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest

from reprobuild.fileio import HashingWriter, HashThread


def _writes() -> list[bytes]:
    """Small pieces (tar headers), a batch exactly 1 MiB long, pieces larger than a batch."""
    pieces = [bytes([i % 251]) * 512 for i in range(3000)]
    pieces += [b"\x01" * (1 << 20), b"", b"tail", bytes(range(256)) * 12289, b"x" * 7]
    return pieces


@pytest.mark.parametrize("background", [False, True])
def test_the_digest_and_size_are_those_of_the_bytes_written(background: bool) -> None:
    out = io.BytesIO()
    with HashingWriter(out, background=background) as writer:
        for piece in _writes():
            assert writer.write(piece) == len(piece)
        digest = writer.hexdigest()
        assert writer.hexdigest() == digest  # asking again waits for nothing new
    data = b"".join(_writes())
    assert out.getvalue() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert writer.size == len(data)


def test_a_reused_buffer_is_hashed_as_it_was_when_written() -> None:
    buffer = bytearray(b"a" * 4096)
    expected = hashlib.sha256()
    with HashingWriter(io.BytesIO(), background=True) as writer:
        for fill in b"abc":
            buffer[:] = bytes([fill]) * 4096
            writer.write(memoryview(buffer))  # type: ignore[arg-type]
            expected.update(buffer)
        buffer[:] = b"z" * 4096  # changed after the last write, before the digest is taken
        assert writer.hexdigest() == expected.hexdigest()


def test_no_write_after_the_digest() -> None:
    with HashingWriter(io.BytesIO(), background=True) as writer:
        writer.write(b"data")
        writer.hexdigest()
        with pytest.raises(ValueError, match="after hexdigest"):
            writer.write(b"more")


def _hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "write-hash"]


def test_leaving_the_block_stops_the_thread_even_on_an_error() -> None:
    before = len(_hash_threads())
    with pytest.raises(OSError, match="disk full"), HashingWriter(io.BytesIO(), background=True) as writer:
        writer.write(b"x" * (3 << 20))
        assert len(_hash_threads()) == before + 1
        raise OSError("disk full")
    assert len(_hash_threads()) == before


def test_hash_thread_cuts_digests_in_order() -> None:
    hasher = HashThread()
    for part in (b"one", b"two" * 100000, b""):
        hasher.update(part)
        hasher.cut()
    assert hasher.close() == [hashlib.sha256(p).hexdigest() for p in (b"one", b"two" * 100000, b"")]
    assert hasher.close() == [hashlib.sha256(p).hexdigest() for p in (b"one", b"two" * 100000, b"")]


def test_write_atomically_hashed_names_the_file_it_wrote_or_leaves_the_old_one(tmp_path) -> None:
    from reprobuild.fileio import write_atomically_hashed

    target = tmp_path / "out"
    data = b"".join(_writes())
    digest = write_atomically_hashed(target, lambda f: [f.write(p) for p in _writes()])
    assert target.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()

    def failing(f) -> None:
        f.write(b"x" * (2 << 20))
        raise ValueError("the writer failed")

    with pytest.raises(ValueError, match="the writer failed"):
        write_atomically_hashed(target, failing)
    assert target.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert _hash_threads() == []
