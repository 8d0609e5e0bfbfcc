"""The programs that shape the output bytes, taken from the lock instead of the host.

``[Tools] ToolsTree=lock`` (the default): the lock carries a ``tools`` package set — erofs-utils,
squashfs-tools, e2fsprogs, dosfstools, mtools and the Essential set, from ``[Tools] Release=``
or the image's release (``reprobuild.lock``). The build installs that set into a *tools tree*
(``rootfs.tree.build_tree``, cached like any stage) and runs every mkfs/mtools call chrooted
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
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.errors import BuildError, LockError, ToolMissing
from reprobuild.image.fs import _PACKAGES as _FS_PACKAGES
from reprobuild.image.fs import HOST, ToolRunner

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


class Tools:
    """The tools of one build: their identity (for cache keys), the manifest entry, and a runner,
    materialising the tools tree on first use (from the cache, else built: ≈10–20 s)."""

    def __init__(self, spec, lock, store, cache, work: Path, say: Say = lambda _m: None) -> None:
        self.mode = spec.tools.tools_tree
        self.lock, self.store, self.cache, self.work, self.say = lock, store, cache, work, say
        self._runner: ToolRunner | None = None
        self._host: dict[str, str] | None = None
        if self.mode == "lock" and not lock.has_set("tools"):
            raise LockError("[Tools] ToolsTree=lock but the lock has no tools package set",
                            hint="run reprobuild lock")

    def _host_versions(self) -> dict[str, str]:
        if self._host is None:
            self._host = host_versions()
        return self._host

    def identity(self) -> dict[str, Any]:
        """What the output bytes depend on: the locked set (name, version, sha256), or the host
        package versions."""
        if self.mode == "host":
            return {"tree": "host", "versions": self._host_versions()}
        tools = self.lock.package_set("tools")
        return {"tree": "lock", "packages": [[p.name, p.version, p.architecture, p.sha256] for p in tools.packages]}

    def manifest(self) -> dict[str, Any]:
        """The manifest's ``tools``: every tool with the version of the package that ran it."""
        if self.mode == "host":
            versions = self._host_versions()
            return {"tree": "host",
                    "tools": {t: {"package": TOOL_PACKAGES[t], "version": versions[t]} for t in sorted(TOOL_PACKAGES)}}
        tools = self.lock.package_set("tools")
        by_name = tools.by_name()
        return {
            "tree": "lock", "release": tools.release,
            "tools": {t: {"package": pkg, "version": by_name[pkg].version if pkg in by_name else "missing"}
                      for t, pkg in sorted(TOOL_PACKAGES.items())},
            "packages": [f"{p.name}={p.version}:{p.architecture}" for p in tools.packages],
        }  # fmt: skip

    def runner(self) -> ToolRunner:
        if self._runner is None:
            self._runner = HOST if self.mode == "host" else self._tree_runner()
        return self._runner

    def _tree_runner(self) -> TreeRunner:
        from reprobuild.build import planned_packages
        from reprobuild.cache import code_digest, stage_key, tools_inputs
        from reprobuild.rootfs.plan import TreeSettings
        from reprobuild.rootfs.tree import build_tree

        tools = self.lock.package_set("tools")
        epoch = self.lock.source_date_epoch
        key = stage_key("tools", tools_inputs(tools, epoch, code_digest()))
        versions = {p.name: p.version for p in tools.packages}
        cache = self.cache if self.cache is not None and self.cache.enabled else None
        entry = cache.get("tools", key) if cache is not None else None
        if entry is not None:
            # Used in place: the sandbox mounts everything it needs on tmpfs and binds, so
            # running a tool never writes to the tools tree.
            self.say("tools tree: cached")
            return TreeRunner(cache.tree_dir(entry), versions)
        self.say(f"building the tools tree ({len(tools.packages)} packages from {tools.release})")
        if cache is None:
            tree = self.work / "tools-tree"
            build_tree(planned_packages(tools), self.store.path, tree, TreeSettings(), epoch, progress=self.say)
            return TreeRunner(tree, versions)
        scratch = cache.scratch("tools")
        try:
            build_tree(planned_packages(tools), cache.deb_path, scratch / "tree", TreeSettings(), epoch,
                       progress=self.say)
            entry = cache.put_tree("tools", key, scratch / "tree", epoch, keep=True)
            if entry is None:
                raise BuildError("the tools tree could not be cached", hint="build with --no-cache")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return TreeRunner(cache.tree_dir(entry), versions)
