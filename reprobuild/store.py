"""The content-addressed store: every byte a build uses, addressed by its sha256.

Layout under the store root (all on one file system, so every publish is an atomic rename)::

    objects/sha256/ab/abcdef…   immutable objects (mode 0444), named by the sha256 of their bytes
    tmp/                        objects being written; each is flock()ed by its writer
    locks/store.lock            shared by writers/readers, exclusive for gc
    locks/objects/<hex>.lock    one writer per object at a time (avoids duplicate downloads)
    roots/<name>.json           gc roots registered by builds: the objects a lock needs
    keys/<namespace>/<h>.json   a small keyed area (e.g. repository indices): key -> object
    quarantine/<hex>            corrupt objects moved aside by verify()
    trees/<hex>/                a tar object extracted (build cache, :mod:`reprobuild.cache`): derived
                                data, removed with its object by gc() and when verify() finds the
                                object corrupt; the directory is 0700 (trees hold setuid programs)

Invariants:

* An object is visible under its address only after its bytes were hashed while streaming,
  size-checked, fsynced and renamed into place. A partial or wrong object is never visible.
* A process killed at any moment (kill -9) leaves at most a temporary in ``tmp/`` whose flock
  died with it; :meth:`Store.clean_tmp` removes such leftovers and never touches a live writer's.
* Several processes may share a store: a racer that finds the object already there has
  succeeded (the bytes under an address can only be the bytes of that hash).

This module imports nothing else from reprobuild except errors; it never prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from reprobuild.errors import FormatError, ReprobuildError, StoreError, describe_os_error
from reprobuild.fileio import disk_usage, sha256_for, sha256_stream
from reprobuild.progress import Update

HASH_ALGO = "sha256"
CHUNK_SIZE = 1 << 20
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_ROOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A temporary whose flock is free is only removed once it is this old: it closes the
# microseconds-wide window between a writer creating its temporary and locking it.
TMP_GRACE_SECONDS = 60.0
WORK_PREFIX = ".reprobuild-work-"  # a build's work directory beside its outputs (Store.work_dir)
WORK_POINTER = "work-dir"  # in a tmp/work.* directory: the absolute path of that work directory
BUNDLE_FORMAT = 1
BUNDLE_MANIFEST = "reprobuild-bundle.json"
# zstd level for bundles: the payload is mostly already-compressed .debs, so a high level
# buys almost nothing. Single-threaded compression keeps the output a pure function of input.
BUNDLE_ZSTD_LEVEL = 3


class ObjectMismatch(StoreError):
    """Bytes offered for an address are not the bytes of that address (hash or size differ)."""

    def __init__(self, message: str, *, sha256: str, reason: str) -> None:
        super().__init__(message)
        self.sha256 = sha256
        self.reason = reason  # "sha256" | "short" | "long"


class StoreWriteError(StoreError):
    """Writing into the store failed on the local disk (full, read-only, no permission): not a
    problem of the bytes or of where they came from, so nobody should retry elsewhere."""

    def __init__(self, error: OSError) -> None:
        super().__init__(f"cannot write to the store: {describe_os_error(error)}")
        self.errno = error.errno


@contextlib.contextmanager
def _local_write(path: Path, second: Path | None = None) -> Iterator[None]:
    """Turn an OSError of a local write into StoreWriteError naming ``path`` (and ``second``,
    the target of a rename) when the error itself names no file (as os.write's do not)."""
    try:
        yield
    except FileExistsError:
        raise
    except OSError as e:
        if e.filename is None:
            e = OSError(e.errno, e.strerror, str(path), None, None if second is None else str(second))
        raise StoreWriteError(e) from e


class ObjectMissing(StoreError):
    """The store does not hold the object asked for."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"object sha256:{sha256} is not in the store")
        self.sha256 = sha256


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lower-case hex digits, else raise StoreError."""
    if not isinstance(sha256, str) or not _HEX_RE.match(sha256):
        raise StoreError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def object_relpath(sha256: str) -> str:
    """The address of an object relative to a store root (also the URL path on a substituter)."""
    check_sha256(sha256)
    return f"objects/{HASH_ALGO}/{sha256[:2]}/{sha256}"


@dataclass(frozen=True)
class StoreStats:
    root: Path
    objects: int
    bytes: int
    roots: int
    temporaries: int
    trees: int = 0  # extracted trees of the build cache (trees/<object>)
    scratch: int = 0  # scratch directories under tmp/ (live or left by killed processes)
    scratch_dead: int = 0  # ... of them left by processes that are gone (the next command removes them)
    scratch_bytes: int = 0  # bytes in tmp/ and in the work directories it points to
    trees_bytes: int = 0  # on disk (blocks; hard links once)
    indices_bytes: int = 0  # the lock stage's repository index cache (indices/)
    disk_bytes: int = 0  # everything under the root, on disk: what du reports

    def as_json(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "objects": self.objects,
            "bytes": self.bytes,
            "roots": self.roots,
            "temporaries": self.temporaries,
            "trees": self.trees,
            "scratch": self.scratch,
            "scratch_dead": self.scratch_dead,
            "scratch_bytes": self.scratch_bytes,
            "trees_bytes": self.trees_bytes,
            "indices_bytes": self.indices_bytes,
            "disk_bytes": self.disk_bytes,
        }


@dataclass(frozen=True)
class CorruptObject:
    """An entry under objects/ whose bytes do not match its name (or that is not an object)."""

    name: str  # path relative to the store root
    reason: str
    quarantined_as: Path | None


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    bytes: int
    corrupt: tuple[CorruptObject, ...]
    quarantine: Path

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def as_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "bytes": self.bytes,
            "quarantine": str(self.quarantine),
            "corrupt": [
                {"name": c.name, "reason": c.reason, "quarantined_as": str(c.quarantined_as or "")}
                for c in self.corrupt
            ],
        }


@dataclass(frozen=True)
class GcReport:
    removed: tuple[str, ...]  # sha256 of removed (or, on dry run, removable) objects
    freed_bytes: int
    kept: int
    dry_run: bool
    temporaries_removed: int
    trees_removed: int = 0  # extracted trees (trees/<hex>) whose object went

    def as_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "removed": list(self.removed),
            "freed_bytes": self.freed_bytes,
            "kept": self.kept,
            "temporaries_removed": self.temporaries_removed,
            "trees_removed": self.trees_removed,
        }


@dataclass(frozen=True)
class ImportReport:
    added: tuple[str, ...]
    already_present: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {"added": list(self.added), "already_present": list(self.already_present)}


@dataclass(frozen=True)
class ExportReport:
    path: Path
    objects: int
    bytes: int  # payload bytes before compression


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iter_chunks(stream: BinaryIO | IO[bytes] | Iterable[bytes], limit: int) -> Iterator[bytes]:
    """Chunks from a file-like (``read``) or an iterable of bytes; never asks a file for more
    than ``limit`` bytes in total (an iterable may overshoot by part of one chunk)."""
    read = getattr(stream, "read", None)
    if read is None:
        yield from stream  # type: ignore[misc]
        return
    remaining = limit
    while remaining > 0:
        chunk = read(min(CHUNK_SIZE, remaining))
        if not chunk:
            return
        remaining -= len(chunk)
        yield chunk


class _Flock:
    """An flock on a file that may be removed by its holder when done.

    The classic unlink race (we open the file, the holder unlinks it, we lock a dead inode) is
    closed by checking after locking that the path still names the inode we locked."""

    def __init__(self, path: Path, *, shared: bool = False, blocking: bool = True) -> None:
        self.path = path
        self.shared = shared
        self.blocking = blocking
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if self.blocking else fcntl.LOCK_NB)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)  # the holder removed it under us: lock the new file instead

    def release(self, *, unlink: bool = False) -> None:
        if self.fd is None:
            return
        if unlink:
            # Unlink while still holding the lock, so a waiter re-checks and relocks a new inode.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


class Store:
    """A content-addressed store rooted at ``root`` (created on first use).

    Thread-safe and multi-process safe; holds no state but its root path."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.objects_dir = self.root / "objects" / HASH_ALGO
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.roots_dir = self.root / "roots"
        self.keys_dir = self.root / "keys"
        self.quarantine_dir = self.root / "quarantine"
        self.trees_dir = self.root / "trees"
        for d in (self.objects_dir, self.tmp_dir, self.locks_dir / "objects", self.roots_dir, self.keys_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store directory {d}: {e.strerror}") from e

    @staticmethod
    def default_root(environ: dict[str, str] | os._Environ[str] | None = None) -> Path:
        """``$REPROBUILD_STORE``, else ``$XDG_CACHE_HOME/reprobuild/store`` (XDG default ~/.cache)."""
        env = os.environ if environ is None else environ
        if env.get("REPROBUILD_STORE"):
            return Path(env["REPROBUILD_STORE"])
        cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
        return Path(cache) / "reprobuild" / "store"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---------------------------------------------------------------- reading

    def _object_file(self, sha256: str) -> Path:
        return self.root / object_relpath(sha256)

    def has(self, sha256: str) -> bool:
        """Whether the object is present (one stat; does not rehash)."""
        return self._object_file(sha256).is_file()

    def path(self, sha256: str) -> Path:
        """The file holding a present object; raises ObjectMissing if absent. Never write to it."""
        p = self._object_file(sha256)
        if not p.is_file():
            raise ObjectMissing(sha256)
        return p

    def open(self, sha256: str) -> BinaryIO:
        """Open a present object for reading."""
        try:
            return open(self._object_file(sha256), "rb")
        except FileNotFoundError as e:
            raise ObjectMissing(sha256) from e

    def read_bytes(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def iter_objects(self) -> Iterator[str]:
        """sha256 of every object, in sorted order (cost: one directory walk)."""
        if not self.objects_dir.is_dir():
            return
        for sub in sorted(os.listdir(self.objects_dir)):
            d = self.objects_dir / sub
            if not d.is_dir():
                continue
            for name in sorted(os.listdir(d)):
                if _HEX_RE.match(name) and name[:2] == sub:
                    yield name

    # ---------------------------------------------------------------- locking

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the store-wide lock shared: gc waits until every holder is done.

        Fetch and build hold it for their whole run so that gc cannot remove an object between
        its download and the registration of the root that keeps it."""
        lock = _Flock(self.locks_dir / "store.lock", shared=True)
        lock.acquire()
        try:
            self.clean_scratch()  # what killed processes left; never a live one's
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def exclusive(self, *, blocking: bool = True) -> Iterator[None]:
        """Hold the store-wide lock exclusively (gc). Raises StoreError if busy and not blocking."""
        lock = _Flock(self.locks_dir / "store.lock", shared=False, blocking=blocking)
        if not lock.acquire():
            raise StoreError(f"store {self.root} is in use by another reprobuild process",
                             hint="wait for running fetch/build commands to finish")
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def object_lock(self, sha256: str) -> Iterator[None]:
        """One writer per object: a second process waits, then usually finds it present."""
        check_sha256(sha256)
        lock = _Flock(self.locks_dir / "objects" / f"{sha256}.lock")
        lock.acquire()
        try:
            yield
        finally:
            lock.release(unlink=True)

    # ---------------------------------------------------------------- writing

    def _new_tmp(self, tag: str) -> tuple[int, Path]:
        """Create and flock a fresh temporary; the flock marks it as owned by a live writer."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        while True:
            p = self.tmp_dir / f"{tag}.{os.getpid()}.{secrets.token_hex(8)}.part"
            try:
                with _local_write(p):
                    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd, p

    def put_stream(
        self,
        stream: BinaryIO | IO[bytes] | Iterable[bytes],
        expected_sha256: str,
        expected_size: int,
        *,
        durable: bool = True,
    ) -> Path:
        """Store the bytes of ``stream`` as object ``expected_sha256`` and return its path.

        Hashes while streaming into a temporary in the store, stops reading as soon as more than
        ``expected_size`` bytes arrived, checks size and hash, fsyncs, then renames into place.
        Raises ObjectMismatch (nothing is kept) if the bytes are wrong. If the object is already
        present the stream is not read at all. Cost: one pass over the data, O(CHUNK_SIZE) memory.
        """
        check_sha256(expected_sha256)
        if expected_size < 0:
            raise StoreError(f"negative size {expected_size} for sha256:{expected_sha256}")
        final = self._object_file(expected_sha256)
        if final.is_file():
            return final
        self._write_object(stream, expected_sha256, expected_size, durable=durable, origin=f"sha256:{expected_sha256}")
        return final

    def _write_object(self, stream: BinaryIO | IO[bytes] | Iterable[bytes], expected_sha256: str | None,
                      expected_size: int, *, durable: bool, origin: str) -> str:
        """Stream into a temporary, hashing; check the size (and the hash, if expected); publish
        under the hash by rename. Returns the sha256. Nothing is kept on any error."""
        fd, tmp = self._new_tmp((expected_sha256 or "put")[:16])
        published = False

        def wrong_size(reason: str, what: str) -> ReprobuildError:
            if expected_sha256 is None:  # a local file: it changed while being copied
                return StoreError(f"{origin} changed size while it was copied into the store")
            return ObjectMismatch(f"{origin}: {what}", sha256=expected_sha256, reason=reason)

        try:
            with sha256_for(expected_size, "store-hash") as h:  # a large object: hashed on a second core
                n = 0
                for chunk in _iter_chunks(stream, expected_size + 1):
                    n += len(chunk)
                    if n > expected_size:
                        raise wrong_size("long", f"more than the expected {expected_size} bytes")
                    h.update(bytes(chunk))  # handed over as it is: bytes(bytes) is no copy
                    with _local_write(tmp):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                if n < expected_size:
                    raise wrong_size("short", f"only {n} of the expected {expected_size} bytes")
                got = h.hexdigest()
            if expected_sha256 is not None and got != expected_sha256:
                raise ObjectMismatch(f"sha256 mismatch: expected {expected_sha256}, got {got}",
                                     sha256=expected_sha256, reason="sha256")
            final = self._object_file(got)
            with _local_write(tmp, final):
                os.fchmod(fd, 0o444)  # objects are immutable
                if durable:
                    os.fsync(fd)
                final.parent.mkdir(parents=True, exist_ok=True)
                # Atomic publish. If a racer published first, its bytes are the same bytes (same
                # hash); replacing them is harmless, and repairs an object that rotted meanwhile.
                os.replace(tmp, final)
                published = True
                if durable:
                    _fsync_dir(final.parent)
            return got
        finally:
            if not published:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            os.close(fd)

    def put_bytes(self, data: bytes, expected_sha256: str | None = None) -> str:
        """Store ``data``; returns its sha256. If ``expected_sha256`` is given it must match."""
        sha = expected_sha256 or hashlib.sha256(data).hexdigest()
        self.put_stream(io.BytesIO(data), sha, len(data))
        return sha

    def put_file(self, path: Path | str, expected_sha256: str | None = None, *, durable: bool = True,
                 link: bool = False) -> str:
        """Copy a file into the store (verified against ``expected_sha256`` if given); returns its
        sha256. Without ``expected_sha256`` the file is hashed while it is copied (one pass).

        ``durable=False`` skips the fsync: for derived data that is rehashed on every use (the
        build cache), where losing it in a crash only costs a rebuild.

        ``link=True``: ``path`` is a private file its caller only reads from now on (a build's
        intermediate output): the store takes the file itself, as a hard link made read-only, and
        copies nothing (a copy is made when the link cannot be: another file system)."""
        path = Path(path)
        if link:
            sha = self._link_object(path, expected_sha256, durable=durable)
            if sha is not None:
                return sha
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if expected_sha256 is not None:
                self.put_stream(f, expected_sha256, size, durable=durable)
                return expected_sha256
            return self._write_object(f, None, size, durable=durable, origin=str(path))

    def _link_object(self, path: Path, expected_sha256: str | None, *, durable: bool) -> str | None:
        """``path`` as an object by a hard link (then hashed where it lies), or None when it
        cannot be linked into the store (the caller copies it). Nothing is kept on any error."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"link.{os.getpid()}.{secrets.token_hex(8)}.part"
        try:
            os.link(path, tmp)
        except OSError:
            return None  # EXDEV (another file system), EPERM (a file system without hard links)
        published = False
        try:
            with open(tmp, "rb") as f:
                # Locked as a live writer's temporary, so that clean_tmp leaves it alone; if a
                # clean_tmp took it meanwhile (its mtime is the build's), the rename below fails
                # with FileNotFoundError and the file is copied instead.
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                os.fchmod(f.fileno(), 0o444)  # objects are immutable (the caller's name too, now)
                got = sha256_stream(f)
                if expected_sha256 is not None and got != expected_sha256:
                    raise ObjectMismatch(f"{path}: sha256 mismatch: expected {expected_sha256}, got {got}",
                                         sha256=expected_sha256, reason="sha256")
                if durable:
                    os.fsync(f.fileno())
                final = self._object_file(got)
                with _local_write(final.parent):
                    final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(tmp, final)  # a racer's object has the same bytes
                except FileNotFoundError:
                    return None
                except OSError as e:
                    raise StoreWriteError(e) from e
                published = True
            if durable:
                _fsync_dir(final.parent)
            return got
        except FileNotFoundError:  # open: a clean_tmp took the temporary before it was locked
            return None
        finally:
            if not published:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    # ---------------------------------------------------------------- extracted trees

    def tree_path(self, sha256: str) -> Path:
        """Where the extracted content of tar object ``sha256`` lives (it may not exist)."""
        return self.trees_dir / check_sha256(sha256)

    def new_tmp_dir(self, tag: str) -> Path:
        """A fresh directory under tmp/ (mode 0700), named after this process so that gc can tell
        a dead writer's leftover from a live one's."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        while True:
            p = self.tmp_dir / f"{tag}.{os.getpid()}.{secrets.token_hex(8)}.d"
            try:
                os.mkdir(p, 0o700)
                return p
            except FileExistsError:
                continue

    def publish_tree(self, tmp: Path, sha256: str) -> Path:
        """Rename the directory ``tmp`` (on the store's file system) to ``trees/<sha256>``. If a
        racer published first, ``tmp`` is removed and the racer's tree is used."""
        final = self.tree_path(sha256)
        self.trees_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.trees_dir, 0o700)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if not final.is_dir():
                raise StoreError(f"cannot publish the tree {final}: {e.strerror}") from e
            _rmtree(tmp)
        return final

    def iter_trees(self) -> Iterator[str]:
        try:
            names = sorted(os.listdir(self.trees_dir))
        except FileNotFoundError:
            return
        yield from (n for n in names if _HEX_RE.match(n))

    def remove_tree(self, sha256: str) -> bool:
        p = self.tree_path(sha256)
        if not p.is_dir():
            return False
        # Rename first: a half-removed tree must never be found under its name.
        doomed = self.new_tmp_dir("doomed")
        os.rename(p, doomed / "tree")
        _rmtree(doomed)
        return True

    def _tmp_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.tmp_dir))
        except FileNotFoundError:
            return []

    def clean_tmp_dirs(self) -> int:
        """Remove directories under tmp/ (``new_tmp_dir``) whose process is gone (its pid is dead,
        or now belongs to a process started after the directory was made), and the work
        directories of dead builds they point to (:meth:`work_dir`)."""
        removed = 0
        for name in self._tmp_names():
            p = self.tmp_dir / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not name.endswith(".d") or not stat.S_ISDIR(st.st_mode) or _owner_alive(_tmp_owner(name), st.st_ctime):
                continue
            pointer = p / WORK_POINTER
            with contextlib.suppress(OSError, ValueError):
                work = Path(os.fsdecode(pointer.read_bytes()))
                if work.is_absolute() and work.name.startswith(WORK_PREFIX):
                    removed += _remove_if_dead(work)
            _rmtree(p)
            removed += 1
        return removed

    def clean_scratch(self) -> int:
        """Remove what dead processes left in tmp/: temporaries, scratch directories and the
        work directories they registered. Called by every command that holds the store."""
        return self.clean_tmp() + self.clean_tmp_dirs()

    @contextlib.contextmanager
    def work_dir(self, parent: Path) -> Iterator[Path]:
        """A private scratch directory ``parent/.reprobuild-work-<pid>-<random>`` for one build.

        It lives in ``parent`` (the output directory) so that outputs can be renamed out of it
        on one file system. While in use the directory is flock()ed; a pointer in tmp/ lets any
        later command that holds the store (:meth:`clean_scratch`) find it after a kill -9, and
        the next work directory in the same ``parent`` removes dead siblings first."""
        clean_dead_work_dirs(parent)
        # The pointer first: a kill at any later moment leaves nothing that is not registered.
        pointer = self.new_tmp_dir("work")
        path: Path | None = None
        fd: int | None = None
        try:
            while path is None:
                candidate = parent.absolute() / f"{WORK_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
                (pointer / WORK_POINTER).write_bytes(os.fsencode(candidate))
                try:
                    os.mkdir(candidate, 0o700)
                    path = candidate
                except FileExistsError:
                    continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # flock on a directory: not on every network file system
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield path
        finally:
            if path is not None:
                _rmtree(path)
            _rmtree(pointer)
            if fd is not None:
                os.close(fd)

    def clean_tmp(self, *, grace: float = TMP_GRACE_SECONDS, now: float | None = None) -> int:
        """Remove temporaries left by dead writers; returns how many were removed.

        A temporary is removed only if nobody holds its flock (the kernel drops the lock of a
        killed process) and either the pid in its name is dead or it is older than ``grace``
        seconds (which covers a writer between creating and locking its file, even if its pid
        is from another pid namespace). Live writers are never touched."""
        removed = 0
        now = time.time() if now is None else now
        for name in self._tmp_names():
            p = self.tmp_dir / name
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if now - st.st_mtime < grace and _pid_alive(_tmp_owner(name)):
                    continue  # maybe a writer between creating and locking it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer owns it
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(p).st_ino == st.st_ino:
                        os.unlink(p)
                        removed += 1
            finally:
                os.close(fd)
        return removed

    # ---------------------------------------------------------------- verify

    def verify(self, say: Callable[[str], None] | None = None) -> VerifyReport:
        """Rehash every object; move corrupt ones (and stray files) to ``quarantine/``. ``say``
        gets a progress :class:`~reprobuild.progress.Update` per object.

        Cost: reads every byte of the store once."""
        checked = total = 0
        corrupt: list[CorruptObject] = []
        with self.in_use():
            subs = sorted(os.listdir(self.objects_dir))
            count = sum(len(os.listdir(self.objects_dir / s)) for s in subs if (self.objects_dir / s).is_dir())
            for sub in subs:
                d = self.objects_dir / sub
                entries = sorted(os.listdir(d)) if d.is_dir() and not d.is_symlink() else [None]
                for name in entries:
                    p = d if name is None else d / name
                    rel = str(p.relative_to(self.root))
                    reason = None
                    if name is None:
                        reason = "not a fan-out directory"
                    elif not _HEX_RE.match(name) or name[:2] != sub:
                        reason = "not an object name"
                    elif p.is_symlink() or not p.is_file():
                        reason = "not a regular file"
                    else:
                        h = hashlib.sha256()
                        try:
                            with open(p, "rb") as f:
                                for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
                                    h.update(chunk)
                                    total += len(chunk)
                        except OSError as e:
                            reason = f"unreadable: {e.strerror}"
                        else:
                            checked += 1
                            if h.hexdigest() != name:
                                reason = f"content hashes to {h.hexdigest()}"
                    if reason is not None:
                        corrupt.append(CorruptObject(rel, reason, self._quarantine(p)))
                        if name is not None and _HEX_RE.match(name):
                            self.remove_tree(name)  # derived from the bad bytes
                    if say is not None:
                        say(Update("hashing objects", checked + len(corrupt), count, "objects", name or sub))
        if say is not None:
            say(Update("hashing objects", count, count, "objects"))
        return VerifyReport(checked, total, tuple(corrupt), self.quarantine_dir)

    def _quarantine(self, p: Path) -> Path:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        base = self.quarantine_dir / p.name
        dest, i = base, 0
        while dest.exists() or dest.is_symlink():
            i += 1
            dest = base.with_name(f"{p.name}.{i}")
        os.rename(p, dest)
        return dest

    # ---------------------------------------------------------------- gc roots & keys

    def _root_file(self, name: str) -> Path:
        if not _ROOT_NAME_RE.match(name):
            raise StoreError(f"invalid gc root name {name!r} (letters, digits, '.', '_', '-')")
        return self.roots_dir / f"{name}.json"

    def _write_json_atomic(self, path: Path, doc: object) -> None:
        fd, tmp = self._new_tmp("meta")
        try:
            data = (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()
            os.write(fd, data)
            os.fsync(fd)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.close(fd)

    def register_root(self, name: str, sha256s: Iterable[str]) -> Path:
        """Record that the objects ``sha256s`` are needed (e.g. by a build of a lock).

        gc keeps every object named by a registered root. Registering a name again replaces it."""
        shas = sorted({check_sha256(s) for s in sha256s})
        path = self._root_file(name)
        self._write_json_atomic(path, {"name": name, "objects": shas})
        return path

    def unregister_root(self, name: str) -> bool:
        try:
            self._root_file(name).unlink()
            return True
        except FileNotFoundError:
            return False

    def roots(self) -> dict[str, frozenset[str]]:
        """Every registered root: name -> the objects it keeps."""
        out: dict[str, frozenset[str]] = {}
        for p in sorted(self.roots_dir.glob("*.json")):
            try:
                doc = json.loads(p.read_text())
                out[p.stem] = frozenset(check_sha256(s) for s in doc["objects"])
            except (OSError, ValueError, KeyError, TypeError, StoreError) as e:
                raise StoreError(f"gc root {p} is unreadable: {e}",
                                 hint="remove or fix it; gc refuses to guess what it kept") from e
        return out

    def _key_file(self, namespace: str, key: str) -> Path:
        if not _ROOT_NAME_RE.match(namespace):
            raise StoreError(f"invalid key namespace {namespace!r}")
        return self.keys_dir / namespace / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def set_key(self, namespace: str, key: str, sha256: str) -> None:
        """Point ``key`` (any string, e.g. an index URL) at a present object. Keys are gc roots."""
        if not self.has(sha256):
            raise ObjectMissing(sha256)
        self._write_json_atomic(self._key_file(namespace, key), {"key": key, "object": sha256})

    def get_key(self, namespace: str, key: str) -> str | None:
        """The object ``key`` points at, or None if unset or the object is gone."""
        try:
            doc = json.loads(self._key_file(namespace, key).read_text())
            sha = check_sha256(doc["object"])
        except (OSError, ValueError, KeyError, TypeError, StoreError):
            return None
        return sha if doc.get("key") == key and self.has(sha) else None

    def delete_key(self, namespace: str, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._key_file(namespace, key).unlink()

    def _key_objects(self) -> set[str]:
        out: set[str] = set()
        for p in self.keys_dir.glob("*/*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, StoreError):
                out.add(check_sha256(json.loads(p.read_text())["object"]))
        return out

    # TODO(build cache): put_tree/get_tree for whole build outputs keyed by an input hash can
    # be layered on set_key/get_key (a tree = a tar object); not needed by fetch.

    # ---------------------------------------------------------------- gc

    def gc(self, roots: Iterable[str] = (), *, dry_run: bool = False) -> GcReport:
        """Remove every object not in ``roots``, not in a registered root and not keyed.

        Holds the store lock exclusively (waits for running fetches and builds). Also removes
        temporaries left by dead writers. Cost: one directory walk plus one unlink per object."""
        keep = {check_sha256(s) for s in roots}
        with self.exclusive():
            for shas in self.roots().values():
                keep |= shas
            keep |= self._key_objects()
            removed: list[str] = []
            freed = kept = 0
            for sha in list(self.iter_objects()):
                if sha in keep:
                    kept += 1
                    continue
                p = self._object_file(sha)
                with contextlib.suppress(FileNotFoundError):
                    freed += p.stat().st_size
                    if not dry_run:
                        p.unlink()
                removed.append(sha)
            gone = set(removed)
            trees_removed = 0
            for sha in list(self.iter_trees()):
                if sha in gone or not self.has(sha):
                    trees_removed += 1
                    if not dry_run:
                        self.remove_tree(sha)
            tmp_removed = 0 if dry_run else self.clean_scratch()
        return GcReport(tuple(removed), freed, kept, dry_run, tmp_removed, trees_removed)

    # ---------------------------------------------------------------- stats

    def stats(self) -> StoreStats:
        n = size = 0
        for sha in self.iter_objects():
            with contextlib.suppress(FileNotFoundError):
                size += self._object_file(sha).stat().st_size
                n += 1
        names = self._tmp_names()
        scratch = dead = scratch_bytes = 0
        for name in names:
            p = self.tmp_dir / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            scratch_bytes += disk_usage(p)
            if name.endswith(".d") and stat.S_ISDIR(st.st_mode):
                scratch += 1
                dead += not _owner_alive(_tmp_owner(name), st.st_ctime)
                with contextlib.suppress(OSError):
                    work = Path(os.fsdecode((p / WORK_POINTER).read_bytes()))
                    if work.is_absolute() and work.name.startswith(WORK_PREFIX):
                        scratch_bytes += disk_usage(work)
        return StoreStats(self.root, n, size, len(list(self.roots_dir.glob("*.json"))), len(names),
                          len(list(self.iter_trees())), scratch, dead, scratch_bytes,
                          trees_bytes=disk_usage(self.trees_dir), indices_bytes=disk_usage(self.root / "indices"),
                          disk_bytes=disk_usage(self.root))

    # ---------------------------------------------------------------- bundles

    def export_bundle(self, sha256s: Iterable[str], out: Path | str) -> ExportReport:
        """Write the objects ``sha256s`` into one zstd-compressed tar at ``out``.

        Deterministic: the bytes depend only on the set of objects (sorted by hash, fixed
        owner/mode/mtime, no PAX timestamps, single-threaded zstd at a fixed level). Every
        object must be present (ObjectMissing otherwise). Written to a temporary, then renamed.
        """
        shas = sorted({check_sha256(s) for s in sha256s})
        missing = [s for s in shas if not self.has(s)]
        if missing:
            raise StoreError(f"cannot export: {len(missing)} object(s) not in the store, "
                             f"first sha256:{missing[0]}", hint="run `reprobuild fetch` first")
        out = Path(out)
        entries = [(s, self._object_file(s).stat().st_size) for s in shas]
        manifest = json.dumps(
            {"format": BUNDLE_FORMAT, "objects": [{"sha256": s, "size": n} for s, n in entries]},
            sort_keys=True, separators=(",", ":")).encode() + b"\n"
        tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
        try:
            cctx = zstandard.ZstdCompressor(level=BUNDLE_ZSTD_LEVEL, threads=0, write_checksum=True)
            with open(tmp, "wb") as raw:
                # USTAR: no PAX headers, so no atime/ctime or other host data can leak in.
                with cctx.stream_writer(raw, closefd=False) as zw, \
                        tarfile.open(fileobj=zw, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                    tar.addfile(_tarinfo(BUNDLE_MANIFEST, len(manifest)), io.BytesIO(manifest))
                    for sha, size in entries:
                        with self.open(sha) as f:
                            tar.addfile(_tarinfo(object_relpath(sha), size), f)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return ExportReport(out, len(entries), sum(n for _, n in entries))

    def import_bundle(self, path: Path | str) -> ImportReport:
        """Verify and add every object of a bundle written by :meth:`export_bundle`.

        Each member is hashed while streaming and kept only if it matches its name; hostile
        members (links, odd names, traversal) are refused. Objects verified before a bad
        member are kept (each is independently verified). Raises FormatError on any bad member
        or if the manifest lists objects the bundle lacks. Cost: one pass, O(CHUNK_SIZE) memory.
        """
        added: list[str] = []
        present: list[str] = []
        manifest: dict[str, int] | None = None
        seen: set[str] = set()
        try:
            with open(path, "rb") as raw, self.in_use(), \
                    zstandard.ZstdDecompressor().stream_reader(raw) as zr, \
                    tarfile.open(fileobj=zr, mode="r|") as tar:
                for m in tar:
                    if m.name == BUNDLE_MANIFEST and m.isfile() and manifest is None and m.size < 64 << 20:
                        manifest = _parse_manifest(tar.extractfile(m).read())  # type: ignore[union-attr]
                        continue
                    sha = _member_sha(m)
                    if sha in seen:
                        raise FormatError(f"bundle {path}: object {sha} appears twice")
                    seen.add(sha)
                    if manifest is not None and manifest.get(sha) != m.size:
                        raise FormatError(f"bundle {path}: {m.name} is not in the manifest with size {m.size}")
                    if self.has(sha):
                        present.append(sha)
                        continue
                    f = tar.extractfile(m)
                    assert f is not None  # _member_sha accepted only regular files
                    try:
                        self.put_stream(f, sha, m.size)
                    except ObjectMismatch as e:
                        raise FormatError(f"bundle {path}: {m.name} is corrupt: {e.message}") from e
                    added.append(sha)
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
            raise FormatError(f"bundle {path} is not a valid reprobuild bundle: {e}") from e
        if manifest is None:
            raise FormatError(f"bundle {path} has no {BUNDLE_MANIFEST}")
        lacking = sorted(set(manifest) - seen)
        if lacking:
            raise FormatError(f"bundle {path} is truncated: {len(lacking)} listed object(s) missing, "
                              f"first sha256:{lacking[0]}")
        return ImportReport(tuple(added), tuple(present))



def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _tmp_owner(name: str) -> int | None:
    """The writer pid in a temporary's name ``<tag>.<pid>.<random>.part``."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


def _proc_stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first); [] if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None if unknown."""
    try:
        fields = _proc_stat_fields(pid)
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int | None, made: float) -> bool:
    """Whether the process that made something at time ``made`` (a ctime) still runs: its pid
    lives and was not reused by a process started after ``made``."""
    if not _pid_alive(pid):
        return False
    started = _process_start(pid) if pid else None
    return started is None or started <= made + 2  # 2 s: clock tick and btime rounding


def clean_dead_work_dirs(parent: Path) -> int:
    """Remove ``parent``'s work directories (:meth:`Store.work_dir`) whose build is gone, and
    when none is alive, the temporaries dead builds left beside their outputs (``.ddi-*``
    directories, ``.<output>.*.tmp`` files). Returns how many entries were removed."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return 0
    removed = 0
    alive = False
    for name in names:
        if name.startswith(WORK_PREFIX):
            gone = _remove_if_dead(parent / name)
            removed += gone
            alive = alive or not gone
    if not alive:
        for name in names:
            p = parent / name
            if name.startswith(".ddi-") and p.is_dir() and not p.is_symlink():
                _rmtree(p)
                removed += 1
            elif name.startswith(".image") and name.endswith(".tmp") and p.is_file() and not p.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed += 1
    return removed


def _remove_if_dead(path: Path) -> int:
    """Remove the work directory ``path`` if nobody holds its flock and its owner is gone (or it
    is older than the grace period). 1 if removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        st = os.fstat(fd)
        pid_text = path.name[len(WORK_PREFIX):].split("-")[0]
        pid = int(pid_text) if pid_text.isdigit() else None
        if _owner_alive(pid, st.st_ctime) and time.time() - st.st_mtime < TMP_GRACE_SECONDS:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live build holds it
        except OSError:
            if _owner_alive(pid, st.st_ctime):
                return 0
        if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
            return 0
        _rmtree(path)
        return 1
    except OSError:
        return 0
    finally:
        os.close(fd)


def _pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists and can still run. A zombie (killed, not yet reaped: a
    container's PID 1 may take seconds or never reap orphans) holds no files and no locks and
    never runs again, so it counts as dead."""
    if pid is None or pid <= 0:
        return True  # unknown owner: rely on the age grace
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    state = _proc_stat_fields(pid)[:1]
    return state not in (["Z"], ["X"])


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the bundle's bytes must not depend on who exported it, when, or umask.
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o444
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _member_sha(m: tarfile.TarInfo) -> str:
    parts = m.name.split("/")
    if (not m.isreg() or len(parts) != 4 or parts[0] != "objects" or parts[1] != HASH_ALGO
            or not _HEX_RE.match(parts[3]) or parts[2] != parts[3][:2]):
        raise FormatError(f"unexpected bundle member {m.name!r} (type {m.type!r})")
    return parts[3]


def _parse_manifest(data: bytes) -> dict[str, int]:
    try:
        doc = json.loads(data)
        if doc["format"] != BUNDLE_FORMAT:
            raise FormatError(f"unsupported bundle format {doc['format']!r}")
        out = {check_sha256(o["sha256"]): int(o["size"]) for o in doc["objects"]}
    except (ValueError, KeyError, TypeError, StoreError) as e:
        raise FormatError(f"bad bundle manifest: {e}") from e
    return out
