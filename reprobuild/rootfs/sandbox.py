"""Run a program inside a root tree: chroot in fresh mount/PID/UTS/IPC/network namespaces.

What the program sees (mmdebstrap's chroot setup, tightened for reproducibility, docs/formats.md §11):
* ``/proc`` of a new PID namespace (the program is PID 1's child; nothing of the host is visible);
* a minimal ``/dev`` on a tmpfs: null zero full random urandom tty bind-mounted from the host,
  ``/dev/pts`` (new devpts instance), ``/dev/shm``, and the usual fd/stdin/stdout/stderr/ptmx links;
* ``/sys`` read-only; ``/tmp`` and ``/run`` fresh tmpfs (so nothing a script leaves there survives);
* no network (a new network namespace has only a downed ``lo``);
* a fixed hostname (new UTS namespace), umask 022, and an environment built from scratch.

All mounts live in the new mount namespace: they vanish when the last process in it exits, so an
interrupted build can never leave mounts behind on the host. ``unshare --kill-child`` makes the
namespace's init die with ``unshare``; we kill the whole process group on KeyboardInterrupt.

Needs root: real root, or root of the user namespace an ordinary user's reprobuild command enters
(:mod:`reprobuild.userns`; the namespaces above are then owned by it, so the kernel allows these
mounts). Without it, :func:`check_can_sandbox` explains what is missing. This module imports
nothing from reprobuild except errors, userns and nosync.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import BuildError, ToolMissing
from reprobuild.rootfs import nosync
from reprobuild.userns import RootlessUnavailable, plan

# The environment every program in the tree gets (docs/formats.md §11 "Environment"). Callers add
# SOURCE_DATE_EPOCH and anything specific.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}

DEFAULT_HOSTNAME = "localhost"

# Runs on the host inside the new namespaces (host /bin/sh), sets up the mounts, then chroots.
# Arguments: $1 tree, $2 hostname, $3 number of bind specs, then (src dst ro) triples, then
# "--", then env assignments, then "--", then the argv.
_SETUP = r"""
set -eu
root=$1; host=$2; nbinds=$3; shift 3
mount --make-rprivate /
for d in proc sys dev tmp run; do [ -d "$root/$d" ] || mkdir -p "$root/$d"; done
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -o remount,bind,ro "$root/sys"
mount -t tmpfs -o mode=0755,nosuid,size=4m tmpfs "$root/dev"
for n in null zero full random urandom tty; do
  : > "$root/dev/$n"; mount --bind "/dev/$n" "$root/dev/$n"
done
mkdir -m 0755 "$root/dev/pts"; mkdir -m 1777 "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s pts/ptmx "$root/dev/ptmx"; ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"; ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mkdir -m 1777 "$root/run/lock"
while [ "$nbinds" -gt 0 ]; do
  src=$1; dst=$root$2; ro=$3; shift 3; nbinds=$((nbinds - 1))
  if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; : > "$dst"; fi
  mount --bind "$src" "$dst"
  if [ "$ro" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
hostname "$host"
umask 022
[ "$1" = -- ] && shift
exec chroot "$root" /usr/bin/env -i "$@"
"""


@dataclass(frozen=True)
class Bind:
    """Bind-mount host path ``source`` at ``target`` (absolute, inside the tree; under /run or /tmp
    so that the mount point itself lives on a tmpfs and leaves no trace in the tree)."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str  # stdout and stderr interleaved, decoded as UTF-8 (errors replaced)


def check_can_sandbox() -> None:
    """Raise a clear error if this process cannot create the sandbox."""
    for tool, pkg in (("unshare", "util-linux"), ("setpriv", "util-linux"), ("chroot", "coreutils"),
                      ("mount", "mount")):
        if shutil.which(tool) is None:
            raise ToolMissing(tool, pkg, "to run maintainer scripts in a sandbox")
    if os.geteuid() != 0:
        # The reprobuild command enters a user namespace first (reprobuild.userns); a library
        # caller that did not gets the fix for what rootless mode lacks, if anything.
        try:
            plan()
        except RootlessUnavailable as e:
            raise BuildError(e.message) from e
        raise BuildError(
            "building a root tree needs root: dpkg must chown files to many ids and create mounts",
            hint="run it through the reprobuild command, which enters a user namespace as root "
                 "(rootless mode), or as root",
        )


def run_in_tree(
    tree: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    hostname: str = DEFAULT_HOSTNAME,
    binds: Sequence[Bind] = (),
    stdin: bytes | None = None,
    timeout: float | None = None,
    interactive: bool = False,
    suppress_sync: bool = False,
) -> Result:
    """Run ``argv`` chrooted into ``tree`` in the sandbox; return its exit status and output.

    ``env`` is added to :data:`BASE_ENV` (nothing is inherited from the caller's environment).
    Never raises for a non-zero exit status; raises BuildError if the sandbox cannot be set up
    and ToolMissing/BuildError from :func:`check_can_sandbox`. Blocks until the program exits.
    ``interactive``: the program uses the caller's terminal (stdin, stdout, stderr; the output
    is not captured) and stays in its process group, so Ctrl-C reaches it, not only us.
    ``suppress_sync``: fsync and the other sync calls return 0 without running in every process of
    the sandbox (:mod:`reprobuild.rootfs.nosync`); for dpkg runs, whose bytes they never change.
    """
    check_can_sandbox()
    full_env = dict(BASE_ENV)
    full_env.update(env or {})
    bind_args: list[str] = []
    for b in binds:
        if not b.target.startswith("/") or ".." in b.target.split("/"):
            raise BuildError(f"bad bind target {b.target!r}")
        bind_args += [str(Path(b.source).resolve()), b.target, "ro" if b.read_only else "rw"]
    cmd = [
        # The sandbox runs in its own session (so that an interrupt can kill all of it), hence
        # outside the caller's process group: without a parent-death signal a build killed with
        # SIGKILL would leave dpkg running and writing into a tree that the next command removes.
        "setpriv", "--pdeathsig", "KILL",
        "unshare", "--mount", "--pid", "--fork", "--kill-child", "--uts", "--ipc", "--net",
        "--propagation", "private",
        "/bin/sh", "-c", _SETUP, "reprobuild-sandbox",
        str(Path(tree).resolve()), hostname, str(len(binds)), *bind_args,
        "--", *(f"{k}={v}" for k, v in sorted(full_env.items())), *argv,
    ]  # fmt: skip
    if interactive:
        return _run_interactive(cmd)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
        start_new_session=True,  # its own process group, so we can kill everything on interrupt
        umask=0o022,
        # The child only calls prctl (everything is allocated before the fork): safe with threads.
        preexec_fn=nosync.installer() if suppress_sync else None,  # noqa: PLW1509
    )
    try:
        out, _ = proc.communicate(stdin, timeout=timeout)
    except BaseException:
        # KeyboardInterrupt, timeout…: kill the group; the namespaces and their mounts die with it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return Result(proc.returncode, out.decode("utf-8", "replace"))


def _run_interactive(cmd: list[str]) -> Result:
    proc = subprocess.Popen(cmd, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}, umask=0o022)
    while True:
        try:
            return Result(proc.wait(), "")
        except KeyboardInterrupt:
            continue  # the terminal sent SIGINT to the shell as well; it decides
