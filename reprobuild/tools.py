"""The programs that shape the output bytes, taken from the lock instead of the host.

``[Tools] ToolsTree=lock`` (the default): the lock carries a ``tools`` package set — erofs-utils,
squashfs-tools, e2fsprogs, dosfstools, mtools and the Essential set, from ``[Tools] Release=``
or the image's release (``reprobuild.lock``). The ``tools`` stage (:mod:`reprobuild.stages.tools`)
installs that set into a *tools tree*; this module runs every mkfs/mtools call chrooted
into it through the sandbox (``rootfs.sandbox.run_in_tree``), with the input directories bound
read-only and the output directory read-write. The image bytes then depend only on the lock:
the host's own erofs-utils, squashfs-tools or dosfstools are never run (tested by shadowing them).

``ToolsTree=host`` opts out: the host's programs run as before (``image.fs.HOST``), and the
manifest names their host package versions instead of locked ones.

Reproducibility: the sandbox adds nothing the tools can see in their output — argv and the
environment are the same as on the host (paths rewritten to the bind mounts; none of these
formats records a source path), umask 022, a fixed hostname, no network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.errors import ToolMissing
from reprobuild.image.fs import _PACKAGES as _FS_PACKAGES
from reprobuild.image.fs import HOST, ToolRunner
from reprobuild.lockfile import Lock

Say = Callable[[str], None]

# Every program image.fs and image.esp may run → the Debian package shipping it.
TOOL_PACKAGES: Mapping[str, str] = {**_FS_PACKAGES, "mkfs.vfat": "dosfstools"}
# Where bind-mounted inputs and outputs appear inside the tools tree: on the sandbox's /run
# tmpfs, so the mount points leave no trace in the (cached, shared) tools tree.
IO_ROOT = "/run/reprobuild/io"
_BIN_DIRS = ("usr/sbin", "usr/bin", "sbin", "bin")


@dataclass(frozen=True)
class TreeRunner:
    """Runs tools chrooted into a tools tree (an ``image.fs.ToolRunner``).

    ``versions``: Debian package → locked version, for the manifest. Each call costs one sandbox
    setup (≈20–40 ms: unshare, mounts, chroot)."""

    tree: Path
    versions: Mapping[str, str] = field(default_factory=dict)

    def which(self, tool: str, package: str | None = None, purpose: str = "") -> str:
        for d in _BIN_DIRS:
            if os.path.lexists(self.tree / d / tool):
                return f"/{d}/{tool}"
        missing = ToolMissing(tool, None, purpose)
        missing.hint = f"add {package or TOOL_PACKAGES.get(tool, 'its package')} to [Tools] Packages= and re-lock"
        raise missing

    def version(self, tool: str) -> str:
        return self.versions.get(TOOL_PACKAGES.get(tool, ""), "unknown")

    def run(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: Path,
            paths: Sequence[tuple[Path, bool]] = (), input: str | None = None) -> tuple[int, str, str]:
        from reprobuild.rootfs.sandbox import Bind, run_in_tree

        binds = [Bind(Path(host).absolute(), f"{IO_ROOT}{i}", read_only=not writable)
                 for i, (host, writable) in enumerate(paths)]
        mapping = sorted(((str(b.source), b.target) for b in binds), key=lambda m: -len(m[0]))

        def inside(value: str) -> str:
            for host, target in mapping:
                if value == host or value.startswith(host + "/"):
                    return target + value[len(host):]
            return value

        # cwd is not carried over: every path the tools get is absolute.
        result = run_in_tree(self.tree, [inside(a) for a in argv], {k: inside(v) for k, v in env.items()},
                             binds=binds, stdin=input.encode() if input is not None else None)
        return result.returncode, result.output, ""


def host_versions() -> dict[str, str]:
    """The host's version of each tool's package (dpkg-query), for keys and the manifest."""
    out: dict[str, str] = {}
    for tool in sorted(TOOL_PACKAGES):
        try:
            out[tool] = HOST.version(tool)
        except ToolMissing:
            out[tool] = "missing"
    return out


def tool_runner(tree: Path | None, versions: Mapping[str, str]) -> ToolRunner:
    """The runner for a ``tools`` stage artifact: the host's programs when it has no tree
    (``ToolsTree=host``), else the locked tools tree's."""
    return HOST if tree is None else TreeRunner(tree, dict(versions))


def tools_manifest(mode: str, lock: Lock, host: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest's ``tools``: every tool with the version of the package that ran it
    (``host``: the host's versions, see :func:`host_versions`)."""
    if mode == "host":
        versions = dict(host) if host is not None else host_versions()
        return {"tree": "host",
                "tools": {t: {"package": TOOL_PACKAGES[t], "version": versions[t]} for t in sorted(TOOL_PACKAGES)}}
    tools = lock.package_set("tools")
    by_name = tools.by_name()
    return {
        "tree": "lock", "release": tools.release,
        "tools": {t: {"package": pkg, "version": by_name[pkg].version if pkg in by_name else "missing"}
                  for t, pkg in sorted(TOOL_PACKAGES.items())},
        "packages": [p.pin for p in tools.packages],
    }  # fmt: skip
