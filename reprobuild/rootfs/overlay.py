"""A writable view of a cached, read-only tree: overlayfs in this thread's private mount namespace.

Why: an incremental build (an edited ``ExtraTrees=`` file) needs the installed tree as a mutable
working copy. Copying it writes every byte again (≈2–3 s for a 128 MB minbase on the reference
VM, where creating files dominates); an overlay mount costs ≈20 ms and copies only what the
configuration stage changes (copy-up). The cached tree below stays untouched, whatever a
post-installation script does.

Same bytes as a copy — the properties the later stages read are preserved:

* ``index=on``: a hard-linked file that is changed stays hard-linked to its other names (without
  it, copy-up would split the link and the image would differ from a build without the cache);
* ``redirect_dir=on``: renaming a directory that came from the lower tree works (no ``EXDEV``);
* ``volatile`` (Linux ≥ 5.10, kernel docs "overlayfs": "Volatile mount"): overlayfs skips every
  sync of the upper file system, unmounting included. The upper directory is scratch, removed
  with the build and never mounted again, so nothing is lost; without it the unmount synced the
  store's whole file system (0.9 s after a server set's first build, which had just written its
  installed tree there). Bytes are unaffected: only when data reaches the disk changes;
* the merged view hides overlay's own whiteouts and ``trusted.overlay.*`` attributes, and upper
  and lower live on one file system (the store's), so inode numbers are stable.

Where the mount lives: :func:`enter_private_mount_namespace` moves the calling thread into a new
mount namespace (``unshare(CLONE_NEWNS)``, propagation ``slave``), so the overlay is invisible to
the rest of the host and disappears with the process, even after ``kill -9``. Child processes
(the sandbox, mkfs) inherit it. Needs root; :func:`unavailable_reason` says why it cannot be used,
and callers then fall back to copying.

Not in a user namespace (rootless mode, :mod:`reprobuild.userns`): there overlayfs must keep its
attributes in ``user.overlay.*`` (``userxattr``), which the kernel refuses together with
``redirect_dir=on``, and it turns ``index=on`` off because decoding file handles needs
CAP_DAC_READ_SEARCH in the initial namespace (``ovl_can_decode_fh``; measured on Linux 6.18:
"upper fs does not support file handles, falling back to index=off"). Without them a changed
hard-linked file loses its links and a renamed lower directory fails with ``EXDEV``: the image
would differ from a copy's, so rootless builds take the copy path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

from reprobuild.errors import BuildError
from reprobuild.userns import in_user_namespace

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2
OPTIONS = "index=on,redirect_dir=on,volatile"
_UNSAFE_IN_OPTIONS = (",", ":", "\\", "\n")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unavailable_reason(*paths: Path) -> str | None:
    """Why an overlay cannot be used here (None if it can): not root, no overlay in the kernel,
    or a path overlayfs' option syntax cannot carry."""
    if os.geteuid() != 0:
        return "overlay mounts need root"
    if in_user_namespace():
        return "in a user namespace overlayfs cannot keep hard links (index=on) or rename directories"
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            if not any(line.split()[-1:] == ["overlay"] for line in f):
                return "the kernel has no overlay file system"
    except OSError:
        return "cannot read /proc/filesystems"
    for p in paths:
        if any(ch in os.fspath(p) for ch in _UNSAFE_IN_OPTIONS):
            return f"path {p} contains a character overlayfs options cannot hold"
    return None


def enter_private_mount_namespace() -> None:
    """Move the calling thread into a new mount namespace whose mounts never reach the host.

    Host mounts made later still show up (slave propagation). Cheap; calling it again nests."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")


@contextlib.contextmanager
def writable_view(lower: Path, scratch: Path, merged: Path) -> Iterator[Path]:
    """Mount an overlay of read-only ``lower`` at ``merged`` (created, must not exist), with its
    upper and work directories in ``scratch`` (created; same file system as ``lower`` is best).
    Unmounted on exit; the caller removes ``scratch`` afterwards. The calling thread must be in a
    private mount namespace. Raises BuildError if the mount fails."""
    upper, work = scratch / "upper", scratch / "work"
    for d in (upper, work, merged):
        os.mkdir(d, 0o755)
    # The root directory of the view gets the lower root's metadata only if upper's matches it.
    st = os.lstat(lower)
    os.chmod(upper, st.st_mode & 0o7777)
    os.chown(upper, st.st_uid, st.st_gid)
    os.utime(upper, ns=(st.st_atime_ns, st.st_mtime_ns))
    data = f"lowerdir={lower},upperdir={upper},workdir={work},{OPTIONS}".encode()
    libc = _libc()
    if libc.mount(b"overlay", os.fsencode(merged), b"overlay", 0, data) != 0:
        err = ctypes.get_errno()
        raise BuildError(f"cannot mount an overlay at {merged}: {os.strerror(err)}")
    try:
        yield merged
    finally:
        libc.umount2(os.fsencode(merged), MNT_DETACH)
