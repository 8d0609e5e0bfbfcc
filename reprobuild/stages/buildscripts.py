"""Stage ``build``: ``BuildScripts=`` run in order in the build environment; its artifact is
``$DESTDIR``, which the ``tree`` stage merges into the image after the packages and before
``ExtraTrees=``.

What a script sees (mkosi's build script interface, in reprobuild's sandbox,
:mod:`reprobuild.rootfs.sandbox`): it runs as root, chrooted into a writable view of the
``buildenv`` tree (whatever it changes there is thrown away), in fresh mount/PID/UTS/IPC/network
namespaces (no network: only a downed ``lo``), with a private ``/tmp``, umask 022, ``HOME=/root``,
``LC_ALL=C.UTF-8``, ``TZ=UTC``, the working directory ``$SRCDIR`` and

* ``SRCDIR=/work/src``: ``BuildSources=``, read-only (several: ``/work/src/<directory name>``);
* ``BUILDDIR=/work/build``: an empty scratch directory, or ``BuildDirectory=`` kept between builds;
* ``DESTDIR=/work/dest``: empty; what lands here goes into the image;
* ``SOURCE_DATE_EPOCH`` (the lock's), ``ARCHITECTURE`` (Debian's name), ``RELEASE``.

The paths are fixed so that compilers that record them (debug info, ``__FILE__``) write the same
bytes wherever the checkout is. The key covers the build set (through ``buildenv``), the bytes of
every script and the content of every source tree (:func:`reprobuild.cache.content_digest`:
names, modes, bytes; never mtimes), so an unchanged rebuild reuses ``$DESTDIR`` and one edited
source file re-runs this stage and those after it only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from reprobuild.cache import content_digest
from reprobuild.errors import BuildError, ConfigError
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.pipeline.trees import writable_tree
from reprobuild.rootfs.sandbox import DEFAULT_HOSTNAME, Bind, run_in_tree

SRCDIR = "/work/src"
BUILDDIR = "/work/build"
DESTDIR = "/work/dest"
SCRIPT = "/work/build-script"
OUTPUT_TAIL = 25  # lines of a failing script's output shown in the error


class BuildScriptFailed(BuildError):
    """A ``BuildScripts=`` entry exited non-zero: its name, exit status and the end of its output."""


def source_mounts(sources: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """(host directory, path in the build environment) for each ``BuildSources=`` entry: one
    source is ``$SRCDIR`` itself; several are ``$SRCDIR/<directory name>`` each."""
    for src in sources:
        if not src.is_dir():
            raise ConfigError(f"BuildSources={src}: not a directory")
    if len(sources) == 1:
        return [(sources[0], SRCDIR)]
    mounts = [(src, f"{SRCDIR}/{src.name}") for src in sources]
    targets = [t for _, t in mounts]
    dup = next((t for t in targets if targets.count(t) > 1), None)
    if dup is not None:
        raise ConfigError(f"BuildSources=: two source directories would both be mounted at {dup}",
                          hint="give them different directory names")
    return mounts


def script_env(ctx: BuildContext) -> dict[str, str]:
    """What a build script gets on top of the sandbox's fixed environment."""
    return {"SRCDIR": SRCDIR, "BUILDDIR": BUILDDIR, "DESTDIR": DESTDIR, "SOURCE_DATE_EPOCH": str(ctx.epoch),
            "ARCHITECTURE": ctx.lock.architecture, "RELEASE": ctx.lock.release}


class BuildScriptsStage(Stage):
    name = "build"
    produces = "tree"
    keep_extracted = True
    upstream = ("buildenv",)

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {"mounts": [t for _, t in source_mounts(ctx.spec.build.build_sources)], "env": script_env(ctx)}

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        # Content digests, not paths or times: moving or re-cloning a checkout keeps the key.
        return {"scripts": [content_digest(s) for s in ctx.spec.content.build_scripts],
                "sources": [content_digest(s) for s in ctx.spec.build.build_sources]}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        scripts = ctx.spec.content.build_scripts
        for script in scripts:
            if not os.access(script, os.X_OK):
                raise ConfigError(f"build script {script} is not executable")
        root = ctx.tree_path("buildroot")
        writable_tree(ctx, up.artifact("buildenv"), root)
        os.mkdir(out, 0o755)
        os.chmod(out, 0o755)
        builddir = ctx.spec.build.build_directory
        if builddir is None:
            builddir = ctx.work / "builddir"
            os.mkdir(builddir, 0o755)
        else:
            builddir.mkdir(mode=0o755, parents=True, exist_ok=True)
        binds = [*(Bind(src, target) for src, target in source_mounts(ctx.spec.build.build_sources)),
                 Bind(builddir, BUILDDIR, read_only=False), Bind(out, DESTDIR, read_only=False)]
        env = script_env(ctx)
        try:
            for script in scripts:
                ctx.say(f"running build script {script.name}")
                script_binds = (*binds, Bind(script, SCRIPT))
                r = run_in_tree(root, ["/bin/sh", "-c", f'cd "$SRCDIR" 2>/dev/null || cd /; exec {SCRIPT}'], env,
                                hostname=DEFAULT_HOSTNAME, binds=script_binds)
                if r.returncode != 0:
                    if ctx.shell_on_failure:
                        self._shell(ctx, root, script_binds, env, script.name)
                    tail = "\n".join(r.output.rstrip().splitlines()[-OUTPUT_TAIL:]) or "(no output)"
                    raise BuildScriptFailed(f"build script {script.name} failed with exit status {r.returncode}",
                                            hint=f"{script}; the last lines of its output:\n{tail}")
        finally:
            if not root.is_mount():  # an overlay is unmounted (and its upper removed) with ctx.mounts
                shutil.rmtree(root, ignore_errors=True)
        return {"scripts": [s.name for s in scripts]}

    @staticmethod
    def _shell(ctx: BuildContext, root: Path, binds: tuple[Bind, ...], env: dict[str, str], name: str) -> None:
        """--shell-on-failure: an interactive shell where the script failed, until it exits."""
        ctx.say(f"build script {name} failed: opening a shell in the build environment "
                f"(sources at {SRCDIR}, the script at {SCRIPT}); exit to continue")
        shell = "/bin/bash" if os.path.exists(root / "bin/bash") else "/bin/sh"
        term = os.environ.get("TERM", "dumb")
        run_in_tree(root, ["/bin/sh", "-c", f'cd "$SRCDIR" 2>/dev/null || cd /; exec {shell}'],
                    {**env, "TERM": term, "PS1": f"(reprobuild build {name}) \\w # "},
                    hostname=DEFAULT_HOSTNAME, binds=binds, interactive=True)
