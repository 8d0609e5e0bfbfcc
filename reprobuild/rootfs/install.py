"""Install the planned packages into a tree the way mmdebstrap does, without apt and without network.

1. Extract the data.tar of every Essential package (in install order) in pure Python
   (:mod:`reprobuild.rootfs.unpack`), so the tree has a shell, libc and dpkg to run. Unlike
   mmdebstrap, documentation, manual pages and translations are left out (only their directories
   are made): no script needs them before step 3 unpacks every file again, and they are half of
   the files, each costing an inode.
2. Create dpkg's database skeleton (mmdebstrap's ``run_setup``): empty ``status``,
   ``arch``, the info/triggers/updates/alternatives directories, apt's directories.
3. Run the tree's own dpkg in the sandbox: ``dpkg --install --force-depends`` on all Essential
   packages in one call (mmdebstrap: "dpkg does not take Pre-Depends into account", the files are
   already there, maintainer scripts now run and the status database becomes right); then the other
   packages in layers: a package is unpacked only after its Pre-Depends are configured and only in a
   layer where all its Depends can be configured too; each layer is ``dpkg --unpack`` then
   ``dpkg --configure --pending``.

dpkg is handed each package with its payload already decompressed, made by worker threads in
install order ahead of it (:mod:`reprobuild.rootfs.payloads`); a layer is unpacked in chunks of
the packages made so far (:func:`unpack_chunk`), so dpkg starts on a layer before its last
payload is ready. Unpacking in several calls of the same order gives the same tree: ``--unpack``
runs no configuration, and triggers wait for the ``--configure --pending`` that ends the layer.

Every order is a pure function of the plan (:func:`install_order`, :func:`layers`), never of the
file system or of hash-set iteration. Services never start: ``/usr/sbin/policy-rc.d`` exits 101
during the install, and any daemon a script starts anyway dies with the sandbox's PID namespace
at the end of each dpkg call (so, unlike mmdebstrap, no fake start-stop-daemon is needed).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from reprobuild.debian.deb import DebFile, open_tar_bytes
from reprobuild.errors import BuildError
from reprobuild.progress import Update
from reprobuild.rootfs.payloads import Payloads
from reprobuild.rootfs.plan import PlannedPackage
from reprobuild.rootfs.sandbox import Bind, Result, run_in_tree
from reprobuild.rootfs.unpack import TreeWriter, extract_tar

DEBS_IN_TREE = "/run/reprobuild/debs"  # on the sandbox's /run tmpfs: leaves no trace in the tree
POLICY_RC_D = "usr/sbin/policy-rc.d"
# dpkg options for every call: no fsync per file (mmdebstrap passes the same; output bytes are
# unaffected), and a fixed log location that normalisation removes.
DPKG = ("dpkg", "--force-unsafe-io")

# mmdebstrap run_setup(): directories that exist before the first dpkg run.
SETUP_DIRS = (
    "etc/apt/apt.conf.d", "etc/apt/sources.list.d", "etc/apt/preferences.d", "var/cache/apt/archives/partial",
    "var/lib/apt/lists/partial", "var/lib/dpkg/triggers", "var/lib/dpkg/info", "var/lib/dpkg/alternatives",
    "var/lib/dpkg/updates", "etc/dpkg/dpkg.cfg.d", "var/log/apt",
)  # fmt: skip

_SCRIPT_NAMES = {
    "pre-installation": "preinst",
    "post-installation": "postinst",
    "pre-removal": "prerm",
    "post-removal": "postrm",
}
# dpkg's message when a maintainer script fails, e.g.
#   "installed foo package post-installation script subprocess returned error exit status 1"
#   "new foo package pre-installation script subprocess returned error exit status 3"
_SCRIPT_FAILED = re.compile(
    r"(?:installed|new|old) (\S+) package (pre-installation|post-installation|pre-removal|post-removal) "
    r"script subprocess (?:returned error exit status (\d+)|was killed by signal \((.*?)\))"
)
_PROCESSING = re.compile(r"dpkg: error processing (?:package|archive) (\S+) \((--\w+)\)")


class MaintainerScriptFailed(BuildError):
    """A package's maintainer script exited non-zero."""

    def __init__(self, package: str, script: str, status: str, phase: str, log: str) -> None:
        super().__init__(
            f"maintainer script '{script}' of package '{package}' failed ({status}) during dpkg {phase}",
            hint="last lines of dpkg's output:\n" + "\n".join(log.rstrip().splitlines()[-15:]),
        )
        self.package, self.script = package, script


# -- ordering (pure) ---------------------------------------------------------------------------------
def install_order(packages: Sequence[PlannedPackage]) -> list[PlannedPackage]:
    """Topological order over Pre-Depends and Depends, ties and cycles broken by plan order.

    Deterministic: depends only on the sequence given. O(n²) worst case, n ≈ hundreds.
    """
    index = {p.name: i for i, p in enumerate(packages)}
    deps = {p.name: {d for d in (*p.pre_depends, *p.depends) if d in index and d != p.name} for p in packages}
    placed: set[str] = set()
    order: list[PlannedPackage] = []
    remaining = list(packages)
    while remaining:
        ready = next((p for p in remaining if deps[p.name] <= placed), None)
        if ready is None:
            # A dependency cycle (common: libc6 <-> libgcc-s1): prefer a package whose Pre-Depends are
            # satisfied, else the first in plan order. dpkg handles Depends cycles itself.
            ready = next(
                (p for p in remaining if {d for d in p.pre_depends if d in index} <= placed), remaining[0]
            )
        order.append(ready)
        placed.add(ready.name)
        remaining.remove(ready)
    return order


def essential_closure(packages: Sequence[PlannedPackage]) -> set[str]:
    """Names of the Essential packages plus everything they (transitively) depend on.

    This is mmdebstrap's "essential" set: it downloads ``?essential`` with its dependencies and
    extracts all of them, because an Essential package only works with its libraries present.
    """
    by_name = {p.name: p for p in packages}
    todo = sorted(p.name for p in packages if p.essential)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        todo.extend(sorted((*by_name[name].pre_depends, *by_name[name].depends), reverse=True))
    return seen


def layers(packages: Sequence[PlannedPackage], configured: set[str]) -> list[list[PlannedPackage]]:
    """Split non-Essential packages into install layers (see module docstring). Pure.

    A package joins a layer when all its Pre-Depends are configured in earlier layers and every
    Depends is configured earlier or in the same layer (dpkg orders configuration within a call).
    Raises BuildError if some packages can never be placed (a Pre-Depends cycle).
    """
    in_plan = {p.name for p in packages} | configured
    done = set(configured)
    remaining = install_order(packages)
    result: list[list[PlannedPackage]] = []
    while remaining:
        layer = [p for p in remaining if {d for d in p.pre_depends if d in in_plan} <= done]
        while True:
            names = done | {p.name for p in layer}
            kept = [p for p in layer if {d for d in p.depends if d in in_plan} <= names]
            if len(kept) == len(layer):
                break
            layer = kept
        if not layer:
            stuck = ", ".join(p.name for p in remaining)
            raise BuildError(f"cannot order the installation: Pre-Depends cycle among {stuck}")
        result.append(layer)
        done |= {p.name for p in layer}
        remaining = [p for p in remaining if p.name not in done]
    return result


# -- tree preparation --------------------------------------------------------------------------------
def native_architecture(packages: Sequence[PlannedPackage]) -> str:
    """The architecture dpkg is built for (the dpkg package's), else the first non-``all`` one."""
    for p in packages:
        if p.name == "dpkg":
            return p.architecture
    return next((p.architecture for p in packages if p.architecture != "all"), "all")


# Files no maintainer script of the Essential set reads before dpkg has unpacked them itself:
# documentation, manual pages, translations (every script runs with LC_ALL=C.UTF-8), info
# pages, lintian overrides. About half of a minbase's Essential members; dpkg --install writes
# them all anyway. Directories are still created, so every directory's metadata is as before.
_DOCS = frozenset({"doc", "man", "locale", "info", "lintian"})


def _not_needed_before_dpkg(parts: list[str]) -> bool:
    return len(parts) > 3 and parts[0] == "usr" and parts[1] == "share" and parts[2] in _DOCS


def _data_tar(path: Path) -> bytes:
    with DebFile(path) as deb:
        return deb.read_tar("data")


def extract_essential(tree: Path, essential: Sequence[PlannedPackage], payload: Callable[[str], Path],
                      progress: Callable[[str], None]) -> None:
    """Step 1: unpack the data.tar of each package of the Essential closure, in the given order (pure Python),
    except the files :func:`_not_needed_before_dpkg` names: step 3 unpacks every file again.
    ``payload(sha256)``: the package, waiting for the worker that decompresses it
    (:meth:`reprobuild.rootfs.payloads.Payloads.path`)."""
    writer = TreeWriter(tree)
    for i, p in enumerate(essential):
        progress(Update("extracting", i, len(essential), "packages", p.name))
        data = _data_tar(payload(p.sha256))
        with open_tar_bytes(data, p.name) as tf:
            extract_tar(tf, writer, p.name, skip=_not_needed_before_dpkg)
        del data
    writer.finish()
    progress(Update("extracting", len(essential), len(essential), "packages"))


def prepare_dpkg(tree: Path, arch: str) -> list[str]:
    """Step 2: dpkg's and apt's directories and empty database files (mmdebstrap run_setup).
    Returns the files written (relative paths)."""
    # Explicit modes everywhere: the caller's umask must not leak into the tree.
    written: list[str] = []
    for d in SETUP_DIRS:
        _mkdirs(tree, d)
    _mkdirs(tree, "tmp", 0o1777)
    # No "available" file: dpkg ≥ 1.17 does not need it and mmdebstrap 1.x no longer creates it.
    # /etc/fstab: mmdebstrap (like debootstrap) writes this placeholder; a DDI mounts by GPT type.
    for name, content in (("var/lib/dpkg/status", ""), ("var/lib/dpkg/arch", f"{arch}\n"),
                          ("etc/fstab", "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n")):
        f = tree / name
        if not os.path.lexists(f):
            f.write_text(content)
            f.chmod(0o644)
            written.append(name)
    return written


SETUP_REASONS = {"etc/fstab": "a placeholder, as mmdebstrap and debootstrap write it (a DDI mounts by GPT type)"}


def _mkdirs(tree: Path, rel: str, mode: int = 0o755) -> None:
    """mkdir -p with an explicit mode for every directory created (never through a symlink out)."""
    path = tree
    for comp in rel.split("/"):
        path = path / comp
        if not os.path.lexists(path):
            os.mkdir(path)
            os.chmod(path, mode if path == tree / rel else 0o755)
        elif not path.is_dir() or path.is_symlink() and not os.path.realpath(path).startswith(
                os.path.realpath(tree) + os.sep):
            raise BuildError(f"/{path.relative_to(tree)} exists and is not a directory in the tree")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _deb_name(p: PlannedPackage) -> str:
    """The staged file's name: from the sha256 only, never from a name or version (a lock's
    strings must not reach a file name, see docs/lockfile.md)."""
    if not _SHA256.fullmatch(p.sha256):
        raise BuildError(f"package {p.name!r} has a malformed sha256 {p.sha256!r}")
    return f"{p.sha256}.deb"


def unpack_chunk(remaining: int) -> int:
    """How many packages of a layer's ``remaining`` ones one ``dpkg --unpack`` call waits for at
    least: a quarter of them, at least 16 — few calls (each starts a sandbox and reads dpkg's
    database), yet dpkg starts on a layer long before its last payload is decompressed."""
    return min(remaining, max(16, remaining // 4))


def explain_failure(result: Result, phase: str, names: dict[str, str] | None = None) -> BuildError:
    """Turn dpkg's output into an error naming the package and the script that failed.
    ``names``: staged file name (``<sha256>.deb``) → package name, for dpkg's archive errors."""
    m = _SCRIPT_FAILED.search(result.output)
    if m:
        status = f"exit status {m.group(3)}" if m.group(3) else f"killed by signal {m.group(4)}"
        return MaintainerScriptFailed(m.group(1).split(":")[0], _SCRIPT_NAMES[m.group(2)], status, phase,
                                      result.output)
    m2 = _PROCESSING.search(result.output)
    staged = Path(m2.group(1)).name if m2 else ""
    what = f" while processing {(names or {}).get(staged, staged)}" if m2 else ""
    tail = "\n".join(result.output.rstrip().splitlines()[-15:])
    return BuildError(f"dpkg {phase} failed with exit status {result.returncode}{what}",
                      hint="last lines of dpkg's output:\n" + tail)


class Installer:
    """Runs the tree's dpkg in the sandbox with the staged .debs bind-mounted read-only."""

    def __init__(self, tree: Path, stage: Path, env: dict[str, str], hostname: str,
                 progress: Callable[[str], None]) -> None:
        self.tree, self.env, self.hostname, self.progress = tree, env, hostname, progress
        self.binds = (Bind(stage, DEBS_IN_TREE, read_only=True),)
        self.log: list[str] = []
        self.names: dict[str, str] = {}

    def dpkg(self, phase: str, args: Sequence[str]) -> None:
        result = run_in_tree(self.tree, [*DPKG, *args], self.env, hostname=self.hostname, binds=self.binds,
                             suppress_sync=True)
        self.log.append(result.output)
        if result.returncode != 0:
            raise explain_failure(result, phase, self.names)

    def debs(self, packages: Sequence[PlannedPackage]) -> list[str]:
        self.names.update((_deb_name(p), p.name) for p in packages)
        return [f"{DEBS_IN_TREE}/{_deb_name(p)}" for p in packages]


def _prepare(tree: Path, packages: Sequence[PlannedPackage]) -> tuple[list[tuple[str, str]], bool]:
    """Step 2 after step 1: check the tree has dpkg, make dpkg's database skeleton and, unless
    the packages brought one, a policy-rc.d forbidding every service action. Returns the files
    written (relative path, reason) and whether the policy-rc.d is ours (to remove at the end)."""
    if not TreeWriter(tree).is_file(["usr", "bin", "dpkg"]):
        raise BuildError("the Essential packages contain no /usr/bin/dpkg: nothing could install the packages",
                         hint="the Essential set (with dpkg) must be in the lock")
    written = [(name, SETUP_REASONS.get(name, "dpkg's database, started empty (as mmdebstrap does)"))
               for name in prepare_dpkg(tree, native_architecture(packages))]
    policy = tree / POLICY_RC_D
    own_policy = not policy.exists()
    if own_policy:  # invoke-rc.d and deb-systemd-invoke ask it; 101 = "action forbidden"
        _mkdirs(tree, "usr/sbin")
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    return written, own_policy


def install(tree: Path, packages: Sequence[PlannedPackage], deb_path: Callable[[str], Path], *,
            env: dict[str, str], hostname: str, progress: Callable[[str], None]) -> list[tuple[str, str]]:
    """Steps 1–3 for the whole plan. Raises BuildError/MaintainerScriptFailed/FormatError.
    Returns (relative path, reason) for each file written by this code rather than by dpkg."""
    names = [p.name for p in packages]
    if len(set(names)) != len(names):
        raise BuildError("the package plan lists a package twice")
    base = essential_closure(packages)
    essential = install_order([p for p in packages if p.name in base])
    others = [p for p in packages if p.name not in base]
    if not essential:
        raise BuildError("the package plan has no Essential packages", hint="the Essential set must be in the lock")
    plan_layers = layers(others, {p.name for p in essential})
    order = [p.sha256 for p in essential] + [p.sha256 for layer in plan_layers for p in layer]
    for p in packages:
        _deb_name(p)  # a malformed sha256 never reaches a file name
    with tempfile.TemporaryDirectory(prefix=".debs-", dir=tree.parent) as stage_dir, \
            Payloads(order, deb_path, Path(stage_dir), names={p.sha256: p.name for p in packages}) as payloads:
        extract_essential(tree, essential, payloads.path, progress)
        written, own_policy = _prepare(tree, packages)
        policy = tree / POLICY_RC_D
        inst = Installer(tree, Path(stage_dir), env, hostname, progress)
        total = len(packages)
        progress(Update("installing", 0, total, "packages", f"{len(essential)} Essential",
                        text=f"installing {len(essential)} Essential packages"))  # fmt: skip
        inst.dpkg("--install (Essential)", ["--install", "--force-depends", *inst.debs(essential)])
        payloads.release([p.sha256 for p in essential])
        done = len(essential)
        for i, layer in enumerate(plan_layers, 1):
            names = ", ".join(p.name for p in layer)
            progress(Update("installing", done, total, "packages", names, text=f"installing layer {i}: {names}"))
            pending = list(layer)
            while pending:
                n = payloads.ready_prefix([p.sha256 for p in pending], unpack_chunk(len(pending)))
                chunk, pending = pending[:n], pending[n:]
                inst.dpkg("--unpack", ["--unpack", *inst.debs(chunk)])
                payloads.release([p.sha256 for p in chunk])
                done += len(chunk)
                if pending:
                    progress(Update("installing", done, total, "packages", names))
            inst.dpkg("--configure", ["--configure", "--pending"])
        progress(Update("installing", total, total, "packages"))
        # Anything left half-installed or with pending triggers is a bug in the plan: say so.
        audit = run_in_tree(tree, ["dpkg", "--audit"], env, hostname=hostname)
        if audit.returncode != 0 or audit.output.strip():
            raise BuildError("dpkg --audit reports packages that are not fully installed",
                             hint=audit.output.strip()[-2000:])
    if own_policy and policy.exists():
        policy.unlink()
    written += [(name, "apt's Auto-Installed marks for the locked plan (as apt would write them)")
                for name in finish_apt_state(tree, packages)]
    return written


def _ids(tree: Path, name: str, file: str) -> int | None:
    try:
        for line in (tree / "etc" / file).read_text(encoding="utf-8").splitlines():
            fields = line.split(":")
            if fields[0] == name and len(fields) > 2:
                return int(fields[2])
    except (OSError, ValueError):
        pass
    return None


def finish_apt_state(tree: Path, packages: Sequence[PlannedPackage]) -> list[str]:
    """Leave apt's state as apt itself would after installing the plan (we never run apt).

    * ``partial`` directories: apt makes them ``_apt:root 0700`` on its first run (mmdebstrap's
      output has them so); do it now so the tree matches.
    * ``/var/lib/apt/extended_states``: the Auto-Installed marks, so that ``apt autoremove`` in the
      image knows dependencies from requested packages. Sorted by name: fixed content.
    """
    if not (tree / "var/lib/apt").is_dir() or os.path.islink(tree / "var/lib/apt"):
        return []
    uid = _ids(tree, "_apt", "passwd")
    if uid is not None:
        for d in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial"):
            p = tree / d
            if p.is_dir() and not p.is_symlink():
                os.chown(p, uid, 0)
                os.chmod(p, 0o700)
    auto = sorted((p.name, p.architecture) for p in packages if p.auto_installed)
    if auto:
        text = "".join(f"Package: {n}\nArchitecture: {a}\nAuto-Installed: 1\n\n" for n, a in auto)
        f = tree / "var/lib/apt/extended_states"
        if os.path.lexists(f):
            os.unlink(f)
        f.write_text(text)
        f.chmod(0o644)
        return ["var/lib/apt/extended_states"]
    return []
