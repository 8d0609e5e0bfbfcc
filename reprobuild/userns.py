"""Rootless mode: an ordinary user runs reprobuild as root of a user namespace of its own.

What the namespace looks like (the approach of mmdebstrap's ``--mode=unshare`` and of podman):

* user id 0 inside is the invoking user outside, and ids 1…65535 inside are the user's
  subordinate ids (its first range of at least 65535 ids in ``/etc/subuid``); the same for groups
  with ``/etc/subgid``. ``newuidmap``/``newgidmap`` (Debian package ``uidmap``, setuid root) write
  the maps after checking that the ranges really belong to the user (user_namespaces(7),
  subuid(5));
* a new mount namespace, so that nothing mounted inside is ever seen on the host.

Inside, reprobuild runs unchanged: ``geteuid() == 0``, dpkg can chown to every id a Debian
package uses (0…65535), the sandbox makes its own mount/PID/IPC/UTS/network namespaces (owned by
this user namespace, so the kernel lets it mount proc, tmpfs, devpts and bind mounts), and the
tar/erofs/cpio writers read the namespace's ids: a file dpkg gave to root reads as 0, the shadow
group as 42 — exactly what a build as real root reads, hence the same bytes.

What the host sees: files the build creates as "root" belong to the invoking user; files of any
other id N belong to subordinate id ``start + N - 1`` of that user. Those ids are reserved for
this user by the administrator (subuid(5)): no other account owns them, so the files grant nothing
to anybody else, and a setuid "root" program in a tree is setuid *to the invoking user*.

:func:`enter` forks: the child enters the namespace and returns to carry on with the command; the
parent waits and returns the child's exit status. The parent forwards SIGTERM and SIGHUP and
ignores SIGINT (a terminal's Ctrl-C reaches the child directly); the child gets SIGKILL if the
parent dies (``PR_SET_PDEATHSIG``), so killing the command kills the build.

This module imports nothing from reprobuild except errors.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import ReprobuildError

# Ids 1…SUBIDS inside come from the subordinate range: every id a Debian package uses (nobody is
# 65534) is mapped.
SUBIDS = 65535
SUGGESTED_START = 100000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
PR_SET_PDEATHSIG = 1
# The host's id map when no user namespace is involved (user_namespaces(7)).
_INITIAL_MAP = ("0", "0", "4294967295")

Read = Callable[[str], str | None]


class RootlessUnavailable(ReprobuildError):
    """This user cannot get a user namespace with subordinate ids; the message names the fix."""


@dataclass(frozen=True)
class IdRange:
    start: int
    count: int


# -- pure parts ----------------------------------------------------------------------------------
def parse_subids(text: str, name: str, uid: int) -> list[IdRange]:
    """The ranges ``/etc/subuid``-style ``text`` gives to the user ``name`` (or its numeric id), in
    file order. Malformed lines are skipped, as newuidmap skips them."""
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (name, str(uid)):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            ranges.append(IdRange(start, count))
    return ranges


def usable_range(ranges: list[IdRange]) -> IdRange | None:
    """The first range large enough for ids 1…SUBIDS."""
    return next((r for r in ranges if r.count >= SUBIDS), None)


def suggest_start(*texts: str) -> int:
    """A start for a new 65536-id range that overlaps none in ``texts`` (subuid, subgid)."""
    end = SUGGESTED_START
    for text in texts:
        for line in text.splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


def usermod_command(user: str, start: int) -> str:
    last = start + SUBIDS
    return f"usermod --add-subuids {start}-{last} --add-subgids {start}-{last} {user}"


def map_arguments(outer: int, subids: IdRange) -> list[str]:
    """newuidmap/newgidmap's triples: 0 → the user's own id, 1…SUBIDS → its subordinate range."""
    return ["0", str(outer), "1", "1", str(subids.start), str(SUBIDS)]


def is_initial_map(uid_map: str) -> bool:
    """Whether ``/proc/self/uid_map`` text is the host's identity map (no user namespace)."""
    return tuple(uid_map.split()) == _INITIAL_MAP


def disabled_reason(read: Read) -> str | None:
    """Why the kernel refuses unprivileged user namespaces, naming the sysctl; ``read(path)`` gives
    a /proc file's text or None."""
    limit = read("/proc/sys/user/max_user_namespaces")
    if limit is not None and limit.strip() == "0":
        return ("user namespaces are disabled on this host (sysctl user.max_user_namespaces = 0): "
                "as root, sysctl -w user.max_user_namespaces=15000")
    clone = read("/proc/sys/kernel/unprivileged_userns_clone")  # Debian kernels before 6.1
    if clone is not None and clone.strip() == "0":
        return ("unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone = 0): "
                "as root, sysctl -w kernel.unprivileged_userns_clone=1")
    apparmor = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")  # Ubuntu 23.10+
    if apparmor is not None and apparmor.strip() == "1":
        return ("AppArmor restricts unprivileged user namespaces (sysctl "
                "kernel.apparmor_restrict_unprivileged_userns = 1): as root, "
                "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    return None


# -- the host ------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace (rootless mode, or a container)."""
    text = _read("/proc/self/uid_map")
    return text is not None and not is_initial_map(text)


@dataclass(frozen=True)
class Plan:
    """What :func:`enter` maps: the user, its ids and subordinate ranges, the helpers' paths."""

    user: str
    uid: int
    gid: int
    subuids: IdRange
    subgids: IdRange
    newuidmap: str
    newgidmap: str


def plan(read: Read = _read) -> Plan:
    """Check every prerequisite of rootless mode; raise RootlessUnavailable with the exact fix."""
    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    reason = disabled_reason(read)
    if reason:
        raise RootlessUnavailable(f"building as an ordinary user needs user namespaces, but {reason}")
    helpers = [shutil.which(t) for t in ("newuidmap", "newgidmap")]
    if None in helpers:
        raise RootlessUnavailable("building as an ordinary user needs newuidmap and newgidmap: "
                                  "as root, apt-get install uidmap")
    subuid_text, subgid_text = read("/etc/subuid") or "", read("/etc/subgid") or ""
    subuids = usable_range(parse_subids(subuid_text, user, uid))
    subgids = usable_range(parse_subids(subgid_text, user, uid))
    if subuids is None or subgids is None:
        raise RootlessUnavailable(
            f"building as an ordinary user needs {SUBIDS} subordinate ids for {user} in /etc/subuid and "
            f"/etc/subgid: as root, {usermod_command(user, suggest_start(subuid_text, subgid_text))}")
    return Plan(user, uid, gid, subuids, subgids, helpers[0], helpers[1])  # type: ignore[arg-type]


def check_private_store(root: Path, p: Plan) -> None:
    """Refuse a store another user owns or can write: rootless builds keep trees owned by the
    user's subordinate ids in it, and another writer could swap a cached tree under them."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return
    except OSError as e:
        raise RootlessUnavailable(f"cannot use the store {root}: {e.strerror}") from e
    if st.st_uid != p.uid:
        raise RootlessUnavailable(
            f"the store {root} belongs to uid {st.st_uid}; a rootless build needs a store of its own: "
            "pass --store DIR or set REPROBUILD_STORE to a directory you own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RootlessUnavailable(
            f"the store {root} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); a rootless "
            f"build needs a store only you can write: chmod go-w {root}, or pass --store DIR")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter(p: Plan) -> int | None:
    """Fork. In the child: enter a new user and mount namespace as root and return None. In the
    parent: wait for the child and return its exit status (128 + N if killed by signal N).
    Raises RootlessUnavailable if the namespace cannot be made."""
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; exercised by the rootless tests
        os.close(ready_r)
        os.close(go_w)
        _child(ready_w, go_r, parent)
        return None
    os.close(ready_w)
    os.close(go_r)
    try:
        answer = os.read(ready_r, 64)
        if answer != b"ok":
            _reap(pid)
            err = int(answer.decode() or "0")
            hint = disabled_reason(_read) or "the kernel refused (see user_namespaces(7))"
            raise RootlessUnavailable(f"cannot create a user namespace ({os.strerror(err)}): {hint}")
        for tool, outer, ids in ((p.newuidmap, p.uid, p.subuids), (p.newgidmap, p.gid, p.subgids)):
            done = subprocess.run([tool, str(pid), *map_arguments(outer, ids)], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                os.write(go_w, b"no")
                _reap(pid)
                msg = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
                raise RootlessUnavailable(f"{Path(tool).name} refused the id map of {p.user}: {msg}")
        os.write(go_w, b"go")
    finally:
        os.close(ready_r)
        os.close(go_w)
    return _wait(pid)


def _child(ready_w: int, go_r: int, parent: int) -> None:  # pragma: no cover - runs in the child
    libc = _libc()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        os.write(ready_w, str(ctypes.get_errno()).encode())
        os._exit(1)
    os.write(ready_w, b"ok")
    os.close(ready_w)
    if os.read(go_r, 2) != b"go":
        os._exit(1)
    os.close(go_r)
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    except OSError as e:
        sys.stderr.write(f"error: cannot become root in the user namespace: {e.strerror}\n")
        os._exit(1)
    # Die with the parent (set after the id change, which clears it).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _wait(pid: int) -> int:
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
