"""Small file helpers every stage needs: streaming sha256, bounded reads and all-or-nothing writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Self


class ReadRefused(Exception):
    """:func:`read_bounded` refused a file before reading it; ``reason`` fits after "PATH: "."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


FILE_TYPES = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link"}


def check_input(path: Path, *, size: int | None = None, limit: int | None = None,
                block_devices: bool = False) -> os.stat_result:
    """Refuse an input before reading it: it must be a regular file (or, with
    ``block_devices``, a block device), of exactly ``size`` bytes when given and of at most
    ``limit`` bytes when given. One stat, no read, no open: a FIFO, /dev/zero or a sparse
    1 TB file is refused at once. Raises FileNotFoundError/OSError or ReadRefused."""
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or block_devices and stat.S_ISBLK(st.st_mode)):
        kind = FILE_TYPES.get(stat.S_IFMT(st.st_mode), "an odd file")
        raise ReadRefused(path, f"{kind}, not a regular file{', block device' if block_devices else ''}")
    if stat.S_ISREG(st.st_mode):
        if size is not None and st.st_size != size:
            raise ReadRefused(path, f"{st.st_size} bytes, expected {size}")
        if limit is not None and st.st_size > limit:
            raise ReadRefused(path, f"larger than {limit} bytes ({st.st_size})")
    return st


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` (symlinks followed) if it is a regular file of at most ``limit``
    bytes. Type and size are checked on the open descriptor before any read, and the open never
    blocks, so a FIFO, a device (/dev/zero) or a huge sparse file is refused at once.
    Raises FileNotFoundError, ReadRefused, or OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadRefused(path, f"{FILE_TYPES.get(stat.S_IFMT(st.st_mode), 'an odd file')}, not a regular file")
        if st.st_size > limit:
            raise ReadRefused(path, f"larger than {limit} bytes ({st.st_size})")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise ReadRefused(path, f"grew beyond {limit} bytes while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


class HashThread:
    """sha256 digests fed from a bounded queue and computed by another thread: hashlib releases
    the GIL on large buffers, so a file is hashed on a second core while it is written. Only
    immutable data (bytes, views of bytes) is queued; :meth:`cut` ends one digest and starts the
    next; :meth:`close` must be called (it stops the thread)."""

    _CUT, _STOP = object(), object()

    def __init__(self, name: str = "hash") -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=4)  # at most 4 chunks in flight
        self._hashes: list[str] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        h = hashlib.sha256()
        while (item := self._queue.get()) is not self._STOP:  # always drained: a put never blocks for ever
            if item is self._CUT:
                self._hashes.append(h.hexdigest())
                h = hashlib.sha256()
            else:
                h.update(item)  # type: ignore[arg-type]

    def update(self, data: bytes | memoryview) -> None:
        self._queue.put(data)

    def cut(self) -> None:
        self._queue.put(self._CUT)

    def close(self) -> list[str]:
        """Wait for the thread; the digests cut so far."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        return self._hashes

    def hexdigest(self) -> str:
        """Cut, stop the thread and return the last digest: hashlib's ``hexdigest`` for a
        HashThread used for one digest (nothing may be fed after it)."""
        if self._thread.is_alive():
            self.cut()
        return self.close()[-1]


# Below this size a hash is computed inline: a thread's start and hand-offs cost more than
# hashing a few MiB (≈ 0.7 ms per MiB here).
THREADED_HASH_MIN = 8 << 20


@contextlib.contextmanager
def sha256_for(size: int, name: str = "copy-hash") -> Iterator[Any]:
    """A sha256 (``update``, ``hexdigest``) for about ``size`` bytes that are being copied: on a
    second thread (:class:`HashThread` named ``name``, fed immutable bytes only) from
    ``THREADED_HASH_MIN`` on, else hashlib's, inline. The thread is stopped when the block is left."""
    if size < THREADED_HASH_MIN:
        yield hashlib.sha256()
        return
    threaded = HashThread(name)
    try:
        yield threaded
    finally:
        threaded.close()


class HashingWriter:
    """A write-only file over ``out`` that hashes (sha256) and counts what passes through it, so
    that a file written once needs no second read to be named by its digest.

    ``background=True``: the hashing runs in a :class:`HashThread`, on a second core, fed in
    batches of at least 1 MiB (a tar's many small headers cost one append each). Use it as a
    context manager then: leaving the block stops the thread."""

    _BATCH = 1 << 20

    def __init__(self, out: Any, *, background: bool = False) -> None:  # anything with write(bytes)
        self.out, self.size = out, 0
        self._thread = HashThread("write-hash") if background else None
        self._hash = None if background else hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._digest: str | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._thread is not None:
            self._thread.close()

    def write(self, data: bytes) -> int:
        if self._digest is not None:
            raise ValueError("write after hexdigest()")
        self.out.write(data)
        n = len(data)
        self.size += n
        if self._hash is not None:
            self._hash.update(data)
        else:
            assert self._thread is not None
            piece = bytes(data)  # a copy only of a mutable buffer: bytes(bytes) is itself
            if n >= self._BATCH:  # a large piece goes as it is, after the small ones before it
                self._flush()
                self._thread.update(piece)
            else:
                self._pending.append(piece)
                self._pending_size += n
                if self._pending_size >= self._BATCH:
                    self._flush()
        return n

    def _flush(self) -> None:
        assert self._thread is not None
        if self._pending:
            self._thread.update(self._pending[0] if len(self._pending) == 1 else b"".join(self._pending))
            self._pending, self._pending_size = [], 0

    def hexdigest(self) -> str:
        """The sha256 of everything written (with ``background``: waits for the thread; no write
        may follow)."""
        if self._hash is not None:
            return self._hash.hexdigest()
        if self._digest is None:
            self._flush()
            assert self._thread is not None
            self._digest = self._thread.hexdigest()
        return self._digest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    """Hex sha256 of what is left to read in ``f``, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def write_atomically(target: Path, writer: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Let ``writer`` fill a temporary file beside ``target``, fsync it, then rename it into place.

    Readers see the old file or the complete new one, never half; on any error (or interrupt)
    the temporary file is removed and ``target`` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a write or fsync names no file: name the one being written
            e.filename = tmp
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically_hashed(target: Path, writer: Callable[[BinaryIO], object], mode: int = 0o644) -> str:
    """:func:`write_atomically`, returning the sha256 of the file written: made on a second
    thread while ``writer`` writes (:class:`HashingWriter`), so the file needs no second read.
    ``writer`` gets a write-only file: only its ``write`` may be used."""
    digest = ""

    def hashed(f: BinaryIO) -> None:
        nonlocal digest
        with HashingWriter(f, background=True) as hashing:
            writer(hashing)  # type: ignore[arg-type]
            digest = hashing.hexdigest()

    write_atomically(target, hashed, mode)
    return digest


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    write_atomically(path, lambda f: f.write(data), mode)


def disk_usage(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes allocated on disk under ``path`` (like ``du``: blocks, hard links and the inodes in
    ``seen`` counted once; ``seen`` is updated). 0 when ``path`` does not exist. Never follows
    symbolic links."""
    seen = set() if seen is None else seen
    total = 0
    stack = [str(path)]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
        if os.path.isdir(p) and not os.path.islink(p):
            try:
                stack.extend(os.path.join(p, n) for n in os.listdir(p))
            except OSError:
                continue
    return total
