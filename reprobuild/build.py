"""``build --locked``: a lock (plus its image definition) and the store → the image outputs.

The build reads top to bottom: check the lock, fetch what the store lacks, :func:`plan` the
stages for the output format, let the :class:`~reprobuild.pipeline.runner.Runner` make the final
stage's artifact (serving every stage it can from the cache), publish it into the output
directory, write the manifest and the provenance statement. Every output is written under a
temporary name and renamed into place, so an interrupted build leaves the previous outputs (or
nothing), never half a file.

``--no-cache`` is the same plan and runner with a cache that never hits and never stores, which
is how the tests prove a cached build byte-identical to an uncached one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.cache import Cache, content_digest, root_name
from reprobuild.config import ImageSpec
from reprobuild.errors import BuildError, ConfigError, LockError
from reprobuild.fileio import sha256_file, write_atomic
from reprobuild.keys import provenance_signer
from reprobuild.lock import check_lock_current
from reprobuild.lockfile import Lock, lock_digest
from reprobuild.manifest import OUTPUT_FILES, DiskFields, Manifest, manifest_file
from reprobuild.mirrors import fetch_items, mirrors_for_spec
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.runner import Runner, StageReport
from reprobuild.pipeline.stage import Stage
from reprobuild.preflight import preflight
from reprobuild.provenance import write_provenance
from reprobuild.rootfs.overlay import enter_private_mount_namespace, unavailable_reason
from reprobuild.signer import check_token_keys, key_file_warnings
from reprobuild.stages.archives import CpioStage, TarStage
from reprobuild.stages.buildenv import BuildEnvStage
from reprobuild.stages.buildscripts import BuildScriptsStage
from reprobuild.stages.configure import ConfigureStage
from reprobuild.stages.ddi import DdiStage
from reprobuild.stages.disksettings import choose_verity, is_bootable
from reprobuild.stages.esp import EspStage
from reprobuild.stages.fs import FsStage
from reprobuild.stages.initrd import InitrdStage
from reprobuild.stages.install import InstallStage
from reprobuild.stages.oci import OciStage
from reprobuild.stages.tools import HostToolsStage, LockedToolsStage
from reprobuild.store import Store
from reprobuild.tools import tools_manifest
from reprobuild.workspace import decide as decide_workspace

Say = Callable[[str], None]

@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    format: str | None = None  # overrides [Build] Format=
    offline: bool = False
    jobs: int = 4
    substituters: tuple[str, ...] = ()
    cache: bool = True  # False: --no-cache (no lookups, no saves)
    shell_on_failure: bool = False  # a failing build script opens a shell in its build environment
    workspace: str | None = None  # where trees are made: a directory, "output" or auto (reprobuild.workspace)
    argv: tuple[str, ...] = ()  # the command line, recorded in the provenance statement


@dataclass
class BuildResult:
    outputs: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: list[str] = field(default_factory=list)  # stages served from the cache, in plan order
    stages: list[StageReport] = field(default_factory=list)  # every planned stage: key, outcome, why
    workspace: str = ""  # where the trees were made, and why (reprobuild.workspace)


def plan(spec: ImageSpec, lock: Lock, fmt: str) -> list[Stage]:
    """The stages that make ``fmt`` from ``lock``, in order; the last one's artifact is the
    output. The only place that branches on the output format."""
    tree_cached = fmt == "directory"  # only then is the configured tree itself worth storing
    stages: list[Stage] = []
    builds = bool(spec.content.build_scripts)
    if builds:
        if not lock.has_set("build"):
            raise LockError("BuildScripts= is set but the lock has no build package set", hint="run reprobuild lock")
        stages += [BuildEnvStage(), BuildScriptsStage()]
    stages += [InstallStage(), ConfigureStage(cacheable=tree_cached, build=builds)]
    if fmt == "tar":
        return stages + [TarStage()]
    if fmt == "cpio":
        return stages + [CpioStage()]
    if fmt == "oci":
        return stages + [OciStage()]
    if fmt == "directory":
        return stages
    if fmt != "disk":
        raise BuildError(f"unknown output format {fmt!r}", hint=f"use one of {', '.join(OUTPUT_FILES)}")
    if spec.tools.tools_tree == "lock" and not lock.has_set("tools"):
        raise LockError("[Tools] ToolsTree=lock but the lock has no tools package set", hint="run reprobuild lock")
    tools: Stage = LockedToolsStage() if spec.tools.tools_tree == "lock" else HostToolsStage()
    bootable = is_bootable(spec, lock)
    if bootable and choose_verity(spec).mode == "no":
        raise BuildError("bootable images need dm-verity (Verity=hash or signed): the UKI pins the root hash")
    stages = [tools, *stages, FsStage()]
    if bootable:
        stages += [InitrdStage(), EspStage()]
    return stages + [DdiStage(bootable=bootable)]


def ensure_fetched(lock: Lock, spec: ImageSpec | None, store: Store, options: BuildOptions, progress=None) -> None:
    """Fetch every package of the lock that the store lacks (or, offline, list what is missing)."""
    # The common case first, without the fetch module and its HTTP stack: everything is there.
    if all(store.has(p.sha256) for p in lock.all_packages()):
        return
    items = fetch_items(lock, mirrors_for_spec(spec))
    substituters = tuple(options.substituters) + (tuple(spec.build.substituters) if spec else ())
    missing = [i for i in items if not store.has(i.sha256)]
    if not missing:
        return
    # Deferred: the HTTP stack (requests, ~70 ms to import) only when something is missing.
    from reprobuild.fetch import fetch_all

    # os.environ: the oci:// substituters' credentials (REGISTRY_AUTH_FILE, ~/.docker/config.json).
    fetch_all(store, missing, substituters=substituters, jobs=options.jobs, offline=options.offline,
              progress=progress, env=os.environ)


def build_locked(spec: ImageSpec, lock: Lock, store: Store, options: BuildOptions, say: Say = lambda _m: None,
                 fetch_progress=None) -> BuildResult:
    """Build the image ``spec`` describes from ``lock`` alone. Returns the outputs written."""
    check_lock_current(spec, lock)
    for warning in key_file_warnings(spec.signing):  # (#18) once per build and key file
        say(warning)
    check_token_keys(spec.signing, os.environ)  # (#18) a wrong token PIN fails now, not after the tree
    fmt = options.format or spec.build.format
    stages = plan(spec, lock, fmt)
    preflight(lock, options.output_dir)  # before any download, gc root or directory
    result = BuildResult()
    started = time.monotonic()
    ensure_fetched(lock, spec, store, options, fetch_progress)
    result.timings["fetch"] = round(time.monotonic() - started, 3)
    store.register_root(f"build-{lock_digest(lock)[7:23]}", [p.sha256 for p in lock.all_packages()])

    out_dir = options.output_dir
    _check_outside_sources(spec, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every file the build creates gets an explicit mode; umask 022 for the duration of the build
    # is the second line of defence, so a caller's umask 077 cannot reach the image.
    old_umask = os.umask(0o022)
    try:
        return _build_in(spec, lock, store, options, fmt, stages, result, out_dir, say)
    finally:
        os.umask(old_umask)


def _check_outside_sources(spec: ImageSpec, out_dir: Path) -> None:
    """Refuse an output directory inside a BuildSources= directory: every build would change the
    sources (and so the build stage's key), and the scripts would see earlier outputs."""
    out = out_dir.resolve()
    for src in spec.build.build_sources:
        if out.is_relative_to(src.resolve()):
            raise ConfigError(f"the output directory {out_dir} is inside BuildSources={src}",
                              hint="build into another directory (-o DIR), or name a narrower source directory")


def _build_in(spec: ImageSpec, lock: Lock, store: Store, options: BuildOptions, fmt: str, stages: list[Stage],
              result: BuildResult, out_dir: Path, say: Say) -> BuildResult:
    cache = Cache(store, enabled=options.cache, say=say)
    target = out_dir / OUTPUT_FILES[fmt]
    final = stages[-1].name
    # store.in_use: gc waits for this build (it may remove cached trees the build reads).
    installed_kib = sum(p.installed_size for s in lock.sets for p in s.packages)
    workspace = decide_workspace(options.workspace, installed_kib, fmt, os.environ)
    say(f"building trees {workspace.reason}")
    result.workspace = workspace.reason
    with store.in_use(), store.work_dir(out_dir) as work_str, \
            _trees_dir(store, workspace.parent) as trees, contextlib.ExitStack() as mounts:
        work = Path(work_str)
        ctx = BuildContext(spec=spec, lock=lock, store=store, cache=cache, work=work, format=fmt, say=say,
                           mounts=mounts, shell_on_failure=options.shell_on_failure, trees=trees)
        runner = Runner(ctx, stages, explain_name=root_name(spec.directory),
                        output_current=lambda entry: cache.output_current(entry, target))
        runner.keys()
        final_entry = cache.get(final, runner.key(final), record=False)
        final_key_hit = final_entry is not None and (final_entry.stored or cache.output_current(final_entry, target))
        # Overlays (a private mount namespace for this thread) only when a tree will be configured;
        # a directory output is renamed into place, which an overlay mount cannot be.
        ctx.overlays = fmt != "directory" and not final_key_hit and _enter_overlay_namespace(cache, store, work, say)
        art = runner.artifact(final)
        output_sha = _publish(ctx, runner, art, target, say)
        result.timings.update(runner.timings())
        manifest = _manifest(spec, lock, fmt, art.meta, output_sha, target)
        result.outputs[fmt] = target
        manifest_path = out_dir / manifest_file(fmt)
        write_atomic(manifest_path, manifest.dumps())
        result.outputs["manifest"] = manifest_path
        result.manifest = manifest.to_dict()
        # The in-toto/SLSA provenance statement, signed with the lock key when it is at hand
        # (a verifier without the private key still gets an unsigned, checkable statement).
        # (#18) the lock key from a file or an ssh-agent; a note and an unsigned statement without it.
        signer, note = provenance_signer(spec.signing.lock_key, os.environ)
        if note:
            say(note)
        result.outputs["provenance"] = write_provenance(lock, spec.lock_path, result.manifest, out_dir, signer,
                                                        list(options.argv))
        result.stages = runner.report_list()
        result.cache_hits = runner.hits()
        runner.save_explain()
    # A stage this build never looked at (an earlier stage of one served from the cache, such as
    # the installed tree under a cached file system) is still the current one: the next edit needs
    # it, so the gc root then adds to the previous one instead of replacing it.
    not_looked_at = any(r.outcome == "not needed" for r in result.stages)
    cache.register_root(root_name(spec.directory), keep_previous=not_looked_at)
    return result


@contextlib.contextmanager
def _trees_dir(store: Store, parent: Path | None):
    """The build's private directory for trees in ``parent`` (registered with the store like the
    work directory, so a killed build's trees are removed by the next command); None: none."""
    if parent is None:
        yield None
        return
    with store.work_dir(parent) as path:
        yield Path(path)


def _publish(ctx: BuildContext, runner: Runner, art, target: Path, say: Say) -> str | None:
    """Put the final artifact at ``target``; return its sha256 (None for a directory)."""
    cache = ctx.cache
    if ctx.format == "directory":
        assert art.path is not None
        if os.path.lexists(target):
            os.rename(target, ctx.work / "previous")
        os.rename(art.path, target)
        return None
    if art.path is None:  # served from the cache, not copied out
        assert art.entry is not None and art.entry.object is not None
        if cache.output_current(art.entry, target):
            say(f"{target.name}: up to date")
        elif not art.entry.stored:  # a receipt served only because the output was in place
            raise BuildError(f"{target} was changed or removed while the build ran", hint="build again")
        else:
            say(f"{target.name}: cached")
            cache.copy_out(art.entry, target)
        sha = art.entry.object
    else:
        os.chmod(art.path, 0o644)
        os.replace(art.path, target)
        # The digest the store computed, else the one the stage computed while writing the file
        # (tar, cpio, disk: "sha256" in its metadata), else a read of the file.
        sha = art.object or art.meta.get("sha256") or sha256_file(target)
    cache.note_output(sha, target)
    # The root hash beside a DDI, for update tooling and kernel command lines.
    if art.meta.get("root_hash"):
        write_atomic(target.with_name(target.stem + ".roothash"), (art.meta["root_hash"] + "\n").encode())
    return sha


def _manifest(spec: ImageSpec, lock: Lock, fmt: str, meta: dict[str, Any], sha: str | None, target: Path) -> Manifest:
    tools = None
    disk = None
    if fmt == "disk":
        tools = tools_manifest(spec.tools.tools_tree, lock)
        disk = DiskFields.from_meta(meta)
    return Manifest(
        format=fmt, lock_digest=lock_digest(lock), config_digest=lock.config_digest,
        source_date_epoch=lock.source_date_epoch, release=lock.release, architecture=lock.architecture,
        packages=[p.pin for p in lock.package_set("image").packages],
        sha256=sha, size=target.stat().st_size if sha is not None else None, tools=tools, disk=disk,
        build=_build_inputs(spec, lock), added_files=meta.get("added_files"),
        oci=meta.get("oci") if fmt == "oci" else None,
        image_id=spec.build.image_id, image_version=spec.build.image_version)


def _build_inputs(spec: ImageSpec, lock: Lock) -> dict[str, Any] | None:
    """What BuildScripts= built the image's software from: the content digests the build stage's
    key covers (scripts, sources relative to the definition) and the build-only packages."""
    if not spec.content.build_scripts:
        return None
    image = lock.package_set("image").by_name()
    return {"scripts": [{"name": s.name, "digest": content_digest(s)} for s in spec.content.build_scripts],
            "sources": [{"path": (s.relative_to(spec.directory) if s.is_relative_to(spec.directory) else s).as_posix(),
                         "digest": content_digest(s)} for s in spec.build.build_sources],
            "packages": [p.pin for p in lock.package_set("build").packages if p.name not in image]}


def _enter_overlay_namespace(cache: Cache, store: Store, work: Path, say: Say) -> bool:
    """Whether this build can use overlays over cached trees (then this thread is now in a private
    mount namespace). Without them the build copies cached trees: same bytes, slower."""
    if not cache.enabled:
        return False
    reason = unavailable_reason(store.root, work)
    if reason is None:
        try:
            enter_private_mount_namespace()
            return True
        except OSError as e:
            reason = str(e)
    say(f"note: cached trees are copied, not overlaid ({reason})")
    return False

