"""The packages of an install plan as dpkg is handed them: each ``.deb`` with its ``data.tar``
decompressed, made by worker threads in install order while dpkg works on the packages before.

Why: decompressing the payloads (xz, in ``dpkg-deb --fsys-tarfile``) was the largest single
part of a build's CPU time (a quarter of a server set's), and dpkg does it on its own critical
path. deb(5) allows an uncompressed ``data.tar`` and nothing dpkg records depends on the
member's compression (:func:`reprobuild.debian.deb.write_decompressed`), so the tree is the same
byte for byte; the workers (liblzma releases the GIL) use the cores dpkg leaves idle, and dpkg
unpacks a package's files without waiting for a decompressor.

Each package's file is ``<stage>/<sha256>.deb``:

* when ``deb_path`` already gives a decompressed package (the build cache's ``unpacked`` objects,
  :meth:`reprobuild.cache.Cache.deb_path`, which this runs in the workers too), it is hard-linked
  (copied across file systems), as before this module;
* otherwise (``--no-cache``: the store's own ``.deb``) it is decompressed into the stage
  directory — build-private, in the build's workspace (:mod:`reprobuild.workspace`), removed
  with the build.

:meth:`Payloads.release` removes the files dpkg has unpacked, so the stage directory holds at
most the packages made ahead of dpkg. Nothing here is a cache: every byte is made from the
verified ``.deb`` in the build that uses it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from reprobuild.debian.deb import DebFile, write_decompressed
from reprobuild.errors import FormatError


def default_workers() -> int:
    """Two decompressors: dpkg and the maintainer scripts take one core, and on the 2-core
    machines of docs/benchmarks.md a second worker still finished the payloads earlier."""
    return max(1, min(2, os.cpu_count() or 1))


def is_decompressed(deb: Path) -> bool:
    """Whether ``deb``'s data member is a plain ``data.tar``."""
    with DebFile(deb) as d:
        return any(m.name == "data.tar" for m in d.members)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (copy across file systems); never follows or replaces an
    existing ``dst`` (O_EXCL)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout)


def stage_payload(source: Path, dst: Path) -> None:
    """Make ``dst``: ``source`` itself when already decompressed, else ``source`` with its data
    member decompressed. Written under a temporary name and renamed, so ``dst`` is complete or
    absent."""
    if is_decompressed(source):
        _link_or_copy(source, dst)
        return
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        with open(tmp, "xb") as f:
            write_decompressed(source, f)
        os.rename(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Payloads:
    """Stage the packages ``order`` (sha256s, in the order dpkg needs them; repeats are made
    once) into ``stage`` with ``workers`` threads. Use as a context manager: leaving it cancels
    what has not started and waits for what has. ``names``: sha256 → package name, for errors."""

    def __init__(self, order: Sequence[str], deb_path: Callable[[str], Path], stage: Path,
                 workers: int | None = None, names: Mapping[str, str] | None = None) -> None:
        self.stage = stage
        self.names = dict(names or {})
        self._pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="payload")
        self._jobs: dict[str, Future[Path]] = {}
        for sha in order:
            if sha not in self._jobs:
                self._jobs[sha] = self._pool.submit(self._make, sha, deb_path)

    def _make(self, sha: str, deb_path: Callable[[str], Path]) -> Path:
        dst = self.stage / f"{sha}.deb"
        try:
            stage_payload(Path(deb_path(sha)), dst)
        except FormatError as e:  # the store's copy rotted or was altered after it was verified
            name = self.names.get(sha)
            raise FormatError(f"package {name} ({sha[:16]}…): {e.message}" if name else e.message,
                              hint=e.hint or "run reprobuild store verify: it removes damaged objects, "
                                             "and the next build fetches them again") from e
        return dst

    def path(self, sha: str) -> Path:
        """The staged package ``sha``, waiting for it; re-raises its worker's error
        (FormatError for a corrupt package)."""
        return self._jobs[sha].result()

    def ready_prefix(self, shas: Sequence[str], at_least: int) -> int:
        """How many of ``shas``, from the first, are staged: waits until the first ``at_least``
        are (or one of them failed), then counts on while the next ones are done too."""
        at_least = min(at_least, len(shas))
        wait([self._jobs[s] for s in shas[:at_least]])
        for s in shas[:at_least]:
            self._jobs[s].result()  # raise a worker's error here, in order
        n = at_least
        while n < len(shas) and self._jobs[shas[n]].done() and self._jobs[shas[n]].exception() is None:
            n += 1
        return n

    def release(self, shas: Sequence[str]) -> None:
        """Remove the staged files of ``shas`` (dpkg has unpacked them)."""
        for s in shas:
            (self.stage / f"{s}.deb").unlink(missing_ok=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Payloads:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
