"""rootfs.overlay: a writable view over a read-only tree behaves like a copy of it.

The operations the configuration stage and post-installation scripts perform — write in place
(through one name of a hard-linked pair), replace, chmod, chown, utime, rename a directory that
came from below, remove a file and a whole directory — are done once on a plain copy and once on
an overlay view; the two results must look the same to every reader the later stages use (names,
types, modes, owners, mtimes, xattrs, link targets, bytes, and which names share an inode). The
lower tree must stay untouched. Each view runs in a child process: entering a private mount
namespace is per thread, and the test process must not move.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild.rootfs.overlay import unavailable_reason

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

EDIT = r"""
import os, sys
t = sys.argv[1]
with open(os.path.join(t, "etc/hard-a"), "a") as f:        # in place, through one of two names
    f.write("appended\n")
with open(os.path.join(t, "etc/plain"), "w") as f:         # rewritten
    f.write("new content\n")
os.chmod(os.path.join(t, "usr/bin/tool"), 0o4755)          # metadata only
os.chown(os.path.join(t, "usr/bin/tool"), 0, 5)
os.utime(os.path.join(t, "usr/share/data"), ns=(0, 1_000_000_000))
os.rename(os.path.join(t, "usr/share/dir"), os.path.join(t, "usr/share/moved"))  # a lower directory
os.unlink(os.path.join(t, "etc/gone"))
import shutil; shutil.rmtree(os.path.join(t, "var/cache"))
os.makedirs(os.path.join(t, "srv/new"), exist_ok=True)
os.link(os.path.join(t, "srv/../etc/plain"), os.path.join(t, "srv/new/plain-link"))
os.setxattr(os.path.join(t, "usr/bin/tool"), "user.note", b"v2")
# normalisation's last step: what was written now is clamped to the epoch
epoch = 1_750_000_000 * 10**9  # after the lower tree's times, before now
for dirpath, dirnames, filenames in os.walk(t, topdown=False):
    for name in dirnames + filenames + ([""] if dirpath == t else []):
        p = os.path.join(dirpath, name) if name else dirpath
        if os.lstat(p).st_mtime_ns > epoch:
            os.utime(p, ns=(epoch, epoch), follow_symlinks=False)
"""

VIEW = r"""
import subprocess, sys
from pathlib import Path
from reprobuild.rootfs.overlay import enter_private_mount_namespace, writable_view
lower, scratch, merged, listing = map(Path, sys.argv[1:5])
enter_private_mount_namespace()
with writable_view(lower, scratch, merged):
    subprocess.run([sys.executable, "-c", sys.argv[5], str(merged)], check=True)
    Path(listing).write_text(sys.argv[6] and subprocess.run(
        [sys.executable, "-c", sys.argv[6], str(merged)], check=True, capture_output=True, text=True).stdout)
"""

LIST = r"""
import hashlib, os, sys
t = sys.argv[1]
inodes = {}
for dirpath, dirnames, filenames in os.walk(t):
    dirnames.sort()
    for name in sorted(dirnames + filenames):
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        body = ""
        if os.path.islink(p):
            body = os.readlink(p)
        elif os.path.isfile(p):
            body = hashlib.sha256(open(p, "rb").read()).hexdigest()
            body += " ino#%d" % inodes.setdefault(st.st_ino, len(inodes))  # hard links: same number
        xattrs = sorted((n, os.getxattr(p, n, follow_symlinks=False).hex())
                        for n in os.listxattr(p, follow_symlinks=False))
        print(os.path.relpath(p, t), oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, body, xattrs)
"""


def _make_lower(root: Path) -> Path:
    lower = root / "lower"
    for d in ("etc", "usr/bin", "usr/share/dir/sub", "var/cache/apt", "srv"):
        (lower / d).mkdir(parents=True)
    (lower / "etc/hard-a").write_text("shared\n")
    os.link(lower / "etc/hard-a", lower / "etc/hard-b")
    (lower / "etc/plain").write_text("old\n")
    (lower / "etc/gone").write_text("bye\n")
    (lower / "usr/bin/tool").write_bytes(b"\x7fELF" + bytes(100))
    os.setxattr(lower / "usr/bin/tool", "user.note", b"v1")
    (lower / "usr/share/data").write_text("data\n")
    (lower / "usr/share/dir/sub/f").write_text("f\n")
    (lower / "usr/share/link").symlink_to("dir/sub/f")
    (lower / "var/cache/apt/pkgcache.bin").write_bytes(b"x" * 5000)
    for p in sorted(lower.rglob("*"), reverse=True):
        os.utime(p, ns=(0, 1_700_000_000 * 10**9), follow_symlinks=False)
    return lower


def _listing(tree: Path) -> str:
    return subprocess.run([sys.executable, "-c", LIST, str(tree)], check=True, capture_output=True,
                          text=True).stdout


def _digest(tree: Path) -> str:
    return hashlib.sha256(_listing(tree).encode()).hexdigest()


def test_overlay_view_equals_an_edited_copy_and_leaves_the_lower_tree_alone(tmp_path: Path) -> None:
    lower = _make_lower(tmp_path)
    before = _listing(lower)
    copy = tmp_path / "copy"
    shutil.copytree(lower, copy, symlinks=True, copy_function=shutil.copy2)
    # copytree does not keep hard links: restore the pair as the lower tree has it.
    (copy / "etc/hard-b").unlink()
    os.link(copy / "etc/hard-a", copy / "etc/hard-b")
    os.utime(copy / "etc", ns=(0, 1_700_000_000 * 10**9))
    assert _listing(copy) == before
    subprocess.run([sys.executable, "-c", EDIT, str(copy)], check=True)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "view-listing"
    subprocess.run([sys.executable, "-c", VIEW, str(lower), str(scratch), str(tmp_path / "merged"), str(out), EDIT,
                    LIST], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.read_text() == _listing(copy)
    assert "hard-a" in out.read_text() and "appended" not in (lower / "etc/hard-a").read_text()
    assert _listing(lower) == before, "the overlay wrote into the lower tree"
    assert any(line.startswith("usr/share/moved/sub/f ") for line in out.read_text().splitlines())
    # Unmounted on exit: the merged directory is an empty mount point again.
    assert not any((tmp_path / "merged").iterdir())


MOUNT_OPTIONS = r"""
import sys
from pathlib import Path
from reprobuild.rootfs.overlay import enter_private_mount_namespace, writable_view
lower, scratch, merged = map(Path, sys.argv[1:4])
enter_private_mount_namespace()
with writable_view(lower, scratch, merged):
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == str(merged):
            print(fields[-1])  # the super block's options
"""


def test_the_view_is_volatile(tmp_path: Path) -> None:
    """The upper directory is scratch, thrown away with the build: the view is mounted
    ``volatile``, so unmounting it does not sync the whole upper file system (the store's; a
    server set's first cached build spent 0.9 s in umount writing back its installed tree)."""
    lower = _make_lower(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    options = subprocess.run([sys.executable, "-c", MOUNT_OPTIONS, str(lower), str(scratch), str(tmp_path / "merged")],
                             check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True).stdout.split(",")
    shown = {o.strip() for o in options}
    assert {"index=on", "redirect_dir=on"} <= shown
    assert shown & {"volatile", "fsync=volatile"}  # newer kernels show the option as fsync=volatile
