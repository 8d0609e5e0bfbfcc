"""Checks a build makes before it has any side effect (no download, no gc root, no directory).

Each returns None or raises a one-line :class:`reprobuild.errors.BuildError` with a hint:

* the output path: a dangling symlink or a non-directory is named as such (``mkdir`` would say
  only "File exists");
* the lock's architecture: packages' maintainer scripts and the tools run in the sandbox, so a
  lock for another architecture builds only where the kernel can run its binaries — natively,
  or through a binfmt_misc handler (Debian's qemu-user-static registers ``qemu-<cpu>``).
"""

from __future__ import annotations

import os
from pathlib import Path

from reprobuild.errors import BuildError
from reprobuild.lockfile import Lock

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Debian architecture → the CPU name of uname(2) and of qemu-user's binfmt entries.
CPU_OF_ARCHITECTURE = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i386", "armhf": "arm", "armel": "arm",
                       "ppc64el": "ppc64le", "riscv64": "riscv64", "s390x": "s390x"}


def check_output_dir(path: Path) -> None:
    """The output directory can be created or used: not a dangling symlink, not a file."""
    if os.path.islink(path) and not path.exists():
        raise BuildError(f"output directory {path} is a symbolic link to {os.readlink(path)}, which does not exist",
                         hint="create the link's target, or pass another -o")
    if path.exists() and not path.is_dir():
        raise BuildError(f"output directory {path} exists and is not a directory", hint="pass another -o")


def binfmt_handlers(directory: Path = BINFMT_DIR) -> set[str]:
    """Names of the enabled binfmt_misc handlers (e.g. ``qemu-aarch64``)."""
    names = set()
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return names
    for name in entries:
        if name in ("register", "status"):
            continue
        try:
            with open(directory / name, encoding="ascii", errors="replace") as f:
                if f.readline().strip() == "enabled":
                    names.add(name)
        except OSError:
            continue
    return names


def check_architecture(architecture: str, machine: str | None = None, handlers: set[str] | None = None) -> None:
    """Refuse, before any work, a lock whose binaries this machine cannot run."""
    machine = machine or os.uname().machine
    cpu = CPU_OF_ARCHITECTURE.get(architecture)
    if cpu == machine or (architecture == "i386" and machine == "x86_64"):
        return
    handlers = binfmt_handlers() if handlers is None else handlers
    if cpu is not None and any(h == f"qemu-{cpu}" or h.endswith(f"-{cpu}") for h in handlers):
        return
    raise BuildError(f"the lock is for {architecture}, this machine is {machine} and has no binfmt_misc "
                     f"handler for {cpu or architecture} binaries: the package scripts could not run",
                     hint="build on a native machine, or install qemu-user-static and binfmt-support "
                          "(which register qemu-" + (cpu or "<cpu>") + " in /proc/sys/fs/binfmt_misc)")


def preflight(lock: Lock, output_dir: Path) -> None:
    """Every check above, for ``build_locked``."""
    check_output_dir(output_dir)
    check_architecture(lock.architecture)
