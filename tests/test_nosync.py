"""The seccomp filter that makes sync calls no-ops (rootfs/nosync.py)."""

from __future__ import annotations

import os
import platform
import struct
import subprocess
import sys

import pytest

from reprobuild.rootfs import nosync

# fsync on a pipe fails with EINVAL when it runs; under the filter it returns 0 without running.
_CHILD = "import os\nr, w = os.pipe()\nos.fsync(w)\nprint('fsync returned')\n"


def test_program_shape_for_x86_64() -> None:
    prog = nosync.filter_program("x86_64")
    assert prog is not None and len(prog) % 8 == 0
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    assert insns[0] == (0x20, 0, 0, 4)  # load arch
    assert insns[1][3] == 0xC000003E
    assert sorted(k for code, _, _, k in insns[3:-2]) == [74, 75, 162, 277, 306]
    # every "equal" jump lands on the no-op return, a mismatch of arch on ALLOW
    for i, (_code, jt, _jf, _k) in enumerate(insns[3:-2], 3):
        assert i + 1 + jt == len(insns) - 1
    assert 2 + insns[1][2] == len(insns) - 2
    assert insns[-2] == (0x06, 0, 0, 0x7FFF0000) and insns[-1] == (0x06, 0, 0, 0x00050000)


def test_unknown_machine_has_no_program() -> None:
    assert nosync.filter_program("mips") is None


def test_without_filter_fsync_on_a_pipe_fails() -> None:
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "Invalid argument" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="loading a seccomp filter without no_new_privs needs CAP_SYS_ADMIN")
@pytest.mark.skipif(nosync.filter_program(platform.machine()) is None, reason="no table for this architecture")
def test_filter_makes_fsync_a_no_op_in_the_child_and_its_children() -> None:
    grandchild = f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {_CHILD!r}]).returncode)"
    r = subprocess.run([sys.executable, "-c", grandchild], capture_output=True, text=True, check=False,
                       preexec_fn=nosync.installer())
    assert r.returncode == 0, r.stderr
    assert r.stdout == "fsync returned\n"
