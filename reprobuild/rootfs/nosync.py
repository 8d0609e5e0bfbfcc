"""A seccomp filter that turns the sync system calls into no-ops for a child process and its descendants.

dpkg makes every database update durable: each status change writes ``/var/lib/dpkg/updates/NNNN``
and ``fsync``s it and its directory. For a trixie minbase ``strace -f -c`` counts about 1 800
``fsync`` and 4 000 ``sync_file_range`` calls even with ``--force-unsafe-io``. A tree under
construction does not need any of it: an interrupted build is thrown away, the files dpkg unpacks
were never synced anyway (``--force-unsafe-io``, and the Essential extractor does not sync), and
the store never relies on a tree being synced (a crash costs a rebuild, :mod:`reprobuild.cache`).
``eatmydata``'s ``LD_PRELOAD`` library would have to be inside the tree. A seccomp filter (seccomp(2),
``SECCOMP_RET_ERRNO`` with errno 0: the call returns 0 without running) works for every program in
the tree without adding a file to it — ``systemd-nspawn --suppress-sync=yes`` does the same.
The bytes written are unchanged: sync calls only decide *when* data reaches the disk.

:func:`filter_program` is pure (the classic-BPF program for one architecture); :func:`installer`
returns a ``preexec_fn`` for :class:`subprocess.Popen` that loads it in the child, or ``None`` on an
architecture without a table here (the build is then only slower). Loading needs
``CAP_SYS_ADMIN`` in the process's user namespace (root, or root of rootless mode's namespace);
if the kernel refuses, the child runs without the filter.
"""

from __future__ import annotations

import ctypes
import platform
import struct
from collections.abc import Callable

# <linux/audit.h> AUDIT_ARCH_* and the sync calls' numbers (asm/unistd.h of each architecture).
_SYNC_CALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {"fsync": 74, "fdatasync": 75, "sync": 162, "sync_file_range": 277, "syncfs": 306}),
    "aarch64": (0xC00000B7, {"sync": 81, "fsync": 82, "fdatasync": 83, "sync_file_range": 84, "syncfs": 267}),
}

# <linux/filter.h>, <linux/seccomp.h>, <linux/prctl.h>
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000  # | errno 0: the call "succeeds" without running
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_NR_OFFSET, _ARCH_OFFSET = 0, 4  # struct seccomp_data { int nr; __u32 arch; ... }


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter


def filter_program(machine: str) -> bytes | None:
    """The BPF program (``struct sock_filter`` array) for ``machine`` (``platform.machine()``), or None.

    Another architecture's calls (e.g. a 32-bit program on a 64-bit kernel) are allowed unchanged.
    """
    if machine not in _SYNC_CALLS:
        return None
    arch, calls = _SYNC_CALLS[machine]
    numbers = sorted(calls.values())
    n = len(numbers)
    # 0: load arch; 1: arch? else jump to ALLOW; 2: load nr; 3..3+n-1: nr == x → NOOP; then ALLOW, NOOP.
    prog = [_insn(_BPF_LD_W_ABS, 0, 0, _ARCH_OFFSET), _insn(_BPF_JEQ_K, 0, n + 1, arch),
            _insn(_BPF_LD_W_ABS, 0, 0, _NR_OFFSET)]
    for i, nr in enumerate(numbers):
        prog.append(_insn(_BPF_JEQ_K, n - i, 0, nr))  # to NOOP, past the remaining tests and ALLOW
    prog += [_insn(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW), _insn(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO)]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def installer() -> Callable[[], None] | None:
    """A ``preexec_fn`` that loads the filter in the forked child, or None if there is no table for
    this machine. Everything is allocated here, in the parent: the child only calls ``prctl``."""
    program = filter_program(platform.machine())
    if program is None:
        return None
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    keep = (buf, fprog)

    def load() -> None:
        # A refusal (no CAP_SYS_ADMIN, seccomp disabled) leaves the child as it is: only slower.
        prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(keep[1]), 0, 0)

    return load
