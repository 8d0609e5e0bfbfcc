"""Where a build makes its trees: in memory (a tmpfs such as ``/dev/shm``) when they fit, else
beside the outputs.

A tree is thousands of small files that dpkg writes, renames and rewrites and that the build
then reads once more to pack. A private tree (every tree of a ``--no-cache`` build; the
installed, configured and initrd trees of every build — the cache keeps the installed tree as its
tar, stages/install.py says why) does not survive the build; a tree the cache keeps extracted
(the tools tree, the build scripts' environment) is built in the store, where it stays. On a
tmpfs each of those file-system operations is a memory operation:
measured on the machine of docs/benchmarks.md, a trixie minbase ``--no-cache`` tar build took
7.7 s with its trees on ``/dev/shm`` and 17.9 s on the ext4 disk of its output directory, with
the same bytes (the tree's content never depends on the file system it was built on: owners,
modes and mtimes are set explicitly and everything is sorted before packing).

The choice (:func:`choose`, pure) follows, in order:

1. ``--workspace DIR`` / ``REPROBUILD_WORKSPACE=DIR``: trees go to ``DIR`` (any file system);
   the value ``output`` keeps them beside the outputs, as before this module existed.
2. ``auto`` (the default): ``/dev/shm`` when it is a tmpfs, writable, not mounted ``noexec``
   (Docker mounts its ``/dev/shm`` so: the packages' scripts run from the tree), and the estimate of the
   trees' size (the packages' ``Installed-Size`` sum of every set the build installs, two and a
   quarter times: the trees, and the payloads decompressed for dpkg beside them,
   :mod:`reprobuild.rootfs.payloads`) fits both in its free space and in half of the memory available (``MemAvailable``
   of ``/proc/meminfo``) — a large image on a small runner still builds on disk, never into
   swap or out of memory.
3. Otherwise the output directory.

``-f directory`` always builds beside the outputs: the final tree is renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import ConfigError

RAM_DIRECTORY = Path("/dev/shm")
ENV = "REPROBUILD_WORKSPACE"
TMPFS_MAGIC = 0x01021994  # statfs(2)
# The estimate covers the trees (1), the payloads staged for dpkg, decompressed (at most about
# their installed size: 1), and dpkg's temporaries and database (a quarter).
MARGIN = 2.25
FIXED_MARGIN = 64 << 20


@dataclass(frozen=True)
class FsFacts:
    """What :func:`choose` needs to know about a candidate directory (probed by :func:`probe`)."""

    is_tmpfs: bool
    writable: bool
    free_bytes: int
    noexec: bool = False  # mounted noexec (as Docker mounts its /dev/shm): the tree's programs could not run


@dataclass(frozen=True)
class Workspace:
    """``parent``: the directory the build's tree directory is made in (None: the output
    directory). ``reason``: one line for progress and ``--json``."""

    parent: Path | None
    reason: str


def estimate_bytes(installed_kib: int) -> int:
    """Room the trees of packages with this ``Installed-Size`` sum (KiB) need while building."""
    return int(installed_kib * 1024 * MARGIN) + FIXED_MARGIN


def choose(requested: str | None, need_bytes: int, ram: FsFacts | None, mem_available: int | None,
           fmt: str) -> Workspace:
    """The workspace for a build (pure; see the module docstring). ``requested``: the option's
    or the environment's value (None or ``auto``: decide). ``ram``: the facts of
    :data:`RAM_DIRECTORY` (None: it does not exist)."""
    if fmt == "directory":
        return Workspace(None, "beside the output (-f directory renames the tree into place)")
    if requested not in (None, "", "auto"):
        if requested == "output":
            return Workspace(None, "beside the output (--workspace output)")
        return Workspace(Path(requested), f"in {requested} (--workspace)")
    mib = need_bytes >> 20
    if ram is None or not ram.is_tmpfs:
        return Workspace(None, f"beside the output ({RAM_DIRECTORY} is not a tmpfs here)")
    if not ram.writable:
        return Workspace(None, f"beside the output ({RAM_DIRECTORY} is not writable)")
    if ram.noexec:
        return Workspace(None, f"beside the output ({RAM_DIRECTORY} is mounted noexec)")
    if need_bytes > ram.free_bytes:
        return Workspace(None, f"beside the output (the trees need ≈{mib} MiB, {RAM_DIRECTORY} has "
                               f"{ram.free_bytes >> 20} MiB free)")
    if mem_available is not None and need_bytes > mem_available // 2:
        return Workspace(None, f"beside the output (the trees need ≈{mib} MiB, more than half of the "
                               f"{mem_available >> 20} MiB of memory available)")
    return Workspace(RAM_DIRECTORY, f"in memory ({RAM_DIRECTORY}, ≈{mib} MiB)")


def mem_available(meminfo: str) -> int | None:
    """``MemAvailable`` of a /proc/meminfo text, in bytes (pure)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def probe(path: Path, statfs: Callable[[str], tuple[int, int, int]] | None = None) -> FsFacts | None:
    """The facts of ``path``: None if it is not a directory."""
    if not path.is_dir() or path.is_symlink():
        return None
    magic, bavail, bsize = (statfs or _statfs)(str(path))
    return FsFacts(is_tmpfs=magic == TMPFS_MAGIC, writable=os.access(path, os.W_OK | os.X_OK),
                   free_bytes=bavail * bsize, noexec=bool(os.statvfs(path).f_flag & os.ST_NOEXEC))


def _statfs(path: str) -> tuple[int, int, int]:
    """(f_type, f_bavail, f_bsize) of statfs(2); os.statvfs lacks the file system type."""
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long), ("f_blocks", ctypes.c_ulong),
                    ("f_bfree", ctypes.c_ulong), ("f_bavail", ctypes.c_ulong), ("f_files", ctypes.c_ulong),
                    ("f_ffree", ctypes.c_ulong), ("f_fsid", ctypes.c_int * 2), ("f_namelen", ctypes.c_long),
                    ("f_frsize", ctypes.c_long), ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = StatFs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return buf.f_type, buf.f_bavail, buf.f_bsize


def decide(requested: str | None, installed_kib: int, fmt: str, env: Mapping[str, str]) -> Workspace:
    """:func:`choose` with this machine's facts; ``requested`` falls back to ``$REPROBUILD_WORKSPACE``.
    A named directory must exist (one line otherwise)."""
    requested = requested or env.get(ENV) or None
    if requested not in (None, "", "auto", "output") and fmt != "directory":
        p = Path(requested)
        if not p.is_dir():
            raise ConfigError(f"workspace directory {requested} does not exist or is not a directory",
                              hint=f"create it, or pass --workspace auto (unset {ENV})")
        if os.statvfs(p).f_flag & os.ST_NOEXEC:
            raise ConfigError(f"workspace directory {requested} is on a file system mounted noexec: the "
                              "packages' scripts could not run in trees made there",
                              hint=f"pick a directory on another file system, or pass --workspace auto (unset {ENV})")
    try:
        ram = probe(RAM_DIRECTORY)
    except OSError:
        ram = None
    try:
        available = mem_available(Path("/proc/meminfo").read_text())
    except OSError:
        available = None
    return choose(requested, estimate_bytes(installed_kib), ram, available, fmt)
