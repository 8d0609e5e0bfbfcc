"""The build stage: a lock (plus its image definition) and the store → the image outputs.

``build_locked`` checks that the lock is current, fetches whatever the store lacks, builds the
root tree from the locked packages, and writes the requested format into the output directory.
Every output is written under a temporary name and renamed into place, so an interrupted build
leaves the previous outputs (or nothing), never half a file.

Every stage goes through the content-keyed cache (:mod:`reprobuild.cache`): a rebuild whose
inputs did not change copies the cached output; an edited extra tree re-runs only what follows
the package installation. ``--no-cache`` builds everything with ``rootfs.tree.build_tree`` in
one piece, which is how the tests prove that a cached build is byte-identical to an uncached one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprobuild.config import ImageSpec
from reprobuild.errors import BuildError
from reprobuild.fileio import sha256_file, write_atomic, write_atomically
from reprobuild.lock import check_lock_current
from reprobuild.lockfile import Lock, PackageSet, dumps
from reprobuild.signer import check_token_keys, key_file_warnings
from reprobuild.store import Store

Say = Callable[[str], None]

OUTPUT_NAMES = {"directory": "image", "tar": "image.tar", "cpio": "image.cpio", "disk": "image.raw"}


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    format: str | None = None  # overrides [Build] Format=
    offline: bool = False
    jobs: int = 4
    substituters: tuple[str, ...] = ()
    cache: bool = True  # False: --no-cache (no lookups, no saves)
    argv: tuple[str, ...] = ()  # the command line, recorded in the provenance statement


@dataclass
class BuildResult:
    outputs: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: list[str] = field(default_factory=list)  # stages taken from the cache, in order


def lock_digest(lock: Lock) -> str:
    return "sha256:" + hashlib.sha256(dumps(lock)).hexdigest()


def planned_packages(package_set: PackageSet) -> list:
    """The lock's view of a package set in the form the root-tree builder takes."""
    from reprobuild.rootfs.plan import PlannedPackage

    return [
        PlannedPackage(name=p.name, version=p.version, architecture=p.architecture, sha256=p.sha256,
                       essential=p.essential, priority=p.priority, depends=p.depends, pre_depends=p.pre_depends,
                       auto_installed=p.reason.startswith("dependency"))
        for p in package_set.packages
    ]


def tree_settings(spec: ImageSpec):
    from reprobuild.rootfs.plan import TreeSettings

    c = spec.content
    return TreeSettings(
        hostname=c.hostname, root_password=c.root_password, autologin=c.autologin, locale=c.locale,
        timezone=c.timezone, machine_id=c.machine_id, skeleton_trees=c.skeleton_trees,
        extra_trees=c.extra_trees, postinst_scripts=c.postinst_scripts, remove_files=c.remove_files,
        clean_package_metadata=c.clean_package_metadata,
    )


@dataclass(frozen=True)
class TreeKeys:
    install: str
    tree: str


def tree_keys(spec: ImageSpec, lock: Lock, code: str) -> TreeKeys:
    """The cache keys of the two tree stages (see reprobuild.cache). Reads the user's trees and
    scripts to hash their content; cost proportional to their size."""
    from dataclasses import asdict

    from reprobuild.cache import content_digest, install_inputs, stage_key, tree_inputs

    settings = tree_settings(spec)
    epoch = lock.source_date_epoch
    install = stage_key("install", install_inputs(
        lock.package_set("image"), [content_digest(p) for p in settings.skeleton_trees], settings.hostname,
        epoch, code))
    plain = {k: v for k, v in asdict(settings).items()
             if k not in ("skeleton_trees", "extra_trees", "postinst_scripts")}
    plain["remove_files"] = list(plain["remove_files"])
    tree = stage_key("tree", tree_inputs(
        install, plain, [content_digest(p) for p in settings.extra_trees],
        [content_digest(p) for p in settings.postinst_scripts], epoch, code))
    return TreeKeys(install, tree)


def _install_stage(spec: ImageSpec, lock: Lock, deb_path: Callable[[str], Path], out: Path, say: Say) -> None:
    """First half of ``rootfs.tree.build_tree`` (skeleton trees, packages) into a new ``out``."""
    from reprobuild.rootfs.sandbox import check_can_sandbox
    from reprobuild.rootfs.tree import install_packages

    check_can_sandbox()
    os.mkdir(out, 0o755)
    old_umask = os.umask(0o022)  # as build_tree: the caller's umask must not leak into the tree
    try:
        os.chmod(out, 0o755)
        install_packages(out, planned_packages(lock.package_set("image")), deb_path, tree_settings(spec),
                         lock.source_date_epoch, say)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        os.umask(old_umask)


def _configure_stage(spec: ImageSpec, lock: Lock, tree: Path, say: Say) -> None:
    """Second half of ``rootfs.tree.build_tree``, in place on an installed tree."""
    from reprobuild.rootfs.tree import configure_tree

    old_umask = os.umask(0o022)
    try:
        configure_tree(tree, tree_settings(spec), lock.source_date_epoch, say)
    finally:
        os.umask(old_umask)


def materialize_tree(spec: ImageSpec, lock: Lock, store: Store, cache, keys: TreeKeys, out: Path, say: Say,
                     *, mounts: contextlib.ExitStack | None = None, keep_tree: bool = True) -> None:
    """The root tree at ``out``: from the cached ``tree`` stage, else from the cached ``install``
    stage plus configuration, else built. Without a cache: ``build_tree`` in one piece.

    ``mounts`` (an ExitStack the caller closes before removing ``out``'s parent): allows ``out``
    to be an overlay over the cached installed tree (:mod:`reprobuild.rootfs.overlay`) instead of
    a copy of it; the calling thread must then be in a private mount namespace. ``keep_tree``:
    cache the configured tree too (only worth it when the tree itself is the output)."""
    from reprobuild.rootfs.tree import build_tree

    epoch = lock.source_date_epoch
    count = len(lock.package_set("image").packages)
    if not cache.enabled:
        say(f"building the root tree ({count} packages)")
        build_tree(planned_packages(lock.package_set("image")), store.path, out, tree_settings(spec), epoch,
                   progress=say)
        return
    entry = cache.get("tree", keys.tree) if keep_tree else None
    if entry is not None:
        say("root tree: cached")
        cache.restore_tree(entry, out)
        return
    installed = cache.get("install", keys.install)
    if mounts is None:
        _configure_copy(spec, lock, store, cache, keys, installed, out, say, keep_tree)
        return
    if installed is None:
        say(f"building the root tree ({count} packages)")
        scratch = cache.scratch("install")
        try:
            _install_stage(spec, lock, cache.deb_path, scratch / "tree", say)
            installed = cache.put_tree("install", keys.install, scratch / "tree", epoch, keep=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if installed is None:
            raise BuildError("the installed tree could not be cached", hint="build with --no-cache")
    else:
        say("installed packages: cached")
    from reprobuild.rootfs.overlay import writable_view

    lower = cache.tree_dir(installed)
    scratch = cache.scratch("overlay")
    mounts.callback(shutil.rmtree, scratch, True)
    try:
        mounts.enter_context(writable_view(lower, scratch, out))
    except BuildError as e:
        # E.g. a store on a file system overlayfs refuses as upper layer (itself an overlay,
        # NFS): the copy gives the same bytes.
        say(f"note: {e.message}; copying the cached tree instead")
        shutil.rmtree(out, ignore_errors=True)
        _configure_copy(spec, lock, store, cache, keys, installed, out, say, keep_tree)
        return
    _configure_stage(spec, lock, out, say)
    if keep_tree:
        cache.put_tree("tree", keys.tree, out, epoch)


def _configure_copy(spec: ImageSpec, lock: Lock, store: Store, cache, keys: TreeKeys, installed, out: Path,
                    say: Say, keep_tree: bool) -> None:
    """``materialize_tree`` without overlays: restore (or build) the installed tree as a copy."""
    epoch = lock.source_date_epoch
    staging = out.with_name(out.name + ".staging")
    if installed is not None:
        say("installed packages: cached")
        cache.restore_tree(installed, staging)
    else:
        say(f"building the root tree ({len(lock.package_set('image').packages)} packages)")
        _install_stage(spec, lock, cache.deb_path, staging, say)
        cache.put_tree("install", keys.install, staging, epoch)
    try:
        _configure_stage(spec, lock, staging, say)
        if keep_tree:
            cache.put_tree("tree", keys.tree, staging, epoch)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure_fetched(lock: Lock, spec: ImageSpec | None, store: Store, options: BuildOptions, progress=None) -> None:
    """Fetch every package of the lock that the store lacks (or, offline, list what is missing)."""
    from reprobuild.fetch import fetch_all, make_session
    from reprobuild.mirrors import fetch_items, mirrors_for_spec

    items = fetch_items(lock, mirrors_for_spec(spec))
    substituters = tuple(options.substituters) + (tuple(spec.build.substituters) if spec else ())
    missing = [i for i in items if not store.has(i.sha256)]
    if not missing:
        return
    fetch_all(store, missing, substituters=substituters, session=None if options.offline else make_session(options.jobs),
              jobs=options.jobs, offline=options.offline, progress=progress)


def _timed(result: BuildResult, name: str):
    import time

    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):
            result.timings[name] = round(time.monotonic() - self.start, 3)

    return _Timer()


def build_locked(spec: ImageSpec, lock: Lock, store: Store, options: BuildOptions, say: Say = lambda _m: None,
                 fetch_progress=None) -> BuildResult:
    """Build the image ``spec`` describes from ``lock`` alone. Returns the outputs written."""
    check_lock_current(spec, lock)
    for warning in key_file_warnings(spec.signing):  # (#18) once per build and key file
        say(warning)
    check_token_keys(spec.signing, os.environ)  # (#18) a wrong token PIN fails now, not after the tree
    fmt = options.format or spec.build.format
    if fmt not in OUTPUT_NAMES:
        raise BuildError(f"unknown output format {fmt!r}")
    result = BuildResult()
    with _timed(result, "fetch"):
        ensure_fetched(lock, spec, store, options, fetch_progress)
    store.register_root(f"build-{lock_digest(lock)[7:23]}", [p.sha256 for p in lock.all_packages()])

    out_dir = options.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every file the build creates gets an explicit mode; umask 022 for the duration of the build
    # is the second line of defence, so a caller's umask 077 cannot reach the image (REFERENCE §7).
    old_umask = os.umask(0o022)
    try:
        return _build_in(spec, lock, store, options, fmt, result, out_dir, say)
    finally:
        os.umask(old_umask)


def _build_in(spec: ImageSpec, lock: Lock, store: Store, options: BuildOptions, fmt: str, result: BuildResult,
              out_dir: Path, say: Say) -> BuildResult:
    from reprobuild.cache import Cache, code_digest, output_inputs, root_name, stage_key
    from reprobuild.tools import Tools

    cache = Cache(store, enabled=options.cache, say=say)
    code = code_digest()
    keys = tree_keys(spec, lock, code)
    epoch = lock.source_date_epoch
    # store.in_use: gc waits for this build (it may remove cached trees the build reads).
    with store.in_use(), tempfile.TemporaryDirectory(prefix=".reprobuild-work-", dir=out_dir) as work_str, \
            contextlib.ExitStack() as mounts:
        work = Path(work_str)
        overlays = fmt in ("disk", "tar", "cpio") and _enter_overlay_namespace(cache, store, work, say)
        tree = work / "tree"
        tools = Tools(spec, lock, store, cache, work, say)
        target = out_dir / OUTPUT_NAMES[fmt]
        manifest: dict[str, Any] = {
            "format": fmt,
            "lock_digest": lock_digest(lock),
            "config_digest": lock.config_digest,
            "source_date_epoch": epoch,
            "release": lock.release,
            "architecture": lock.architecture,
            "packages": [f"{p.name}={p.version}:{p.architecture}" for p in lock.package_set("image").packages],
        }
        if fmt == "disk":
            from reprobuild.assemble import disk_key_inputs

            manifest["tools"] = tools.manifest()
            out_key = stage_key("output", output_inputs(keys.tree, fmt, disk_key_inputs(spec, lock), epoch,
                                                        tools.identity(), code))
        else:
            out_key = stage_key("output", output_inputs(keys.tree, fmt, None, epoch, {}, code))
        # tar: the cached tree *is* the output (both are write_tar of the final tree at the epoch).
        output_sha: str | None = None
        cached = (cache.get("tree", keys.tree) if fmt == "tar"
                  else cache.get("output", out_key) if fmt in ("disk", "cpio") else None)
        if cached is not None:
            with _timed(result, "cached-output"):
                if cache.output_current(cached, target):
                    say(f"{OUTPUT_NAMES[fmt]}: up to date")
                else:
                    say(f"{OUTPUT_NAMES[fmt]}: cached")
                    cache.copy_out(cached, target)
            output_sha = cached.object
            manifest.update(cached.meta.get("manifest", {}))
            if cached.meta.get("roothash"):
                write_atomic(target.with_name(target.stem + ".roothash"), (cached.meta["roothash"] + "\n").encode())
        else:
            with _timed(result, "tree"):
                materialize_tree(spec, lock, store, cache, keys, tree, say, mounts=mounts if overlays else None,
                                 keep_tree=fmt in ("tar", "directory"))
            fields = _write_format(spec, lock, store, fmt, tree, work, target, cache, keys, tools, say, result)
            manifest.update(fields)
            if fmt in ("disk", "cpio"):
                roothash = target.with_name(target.stem + ".roothash")
                meta = {"manifest": fields}
                if fmt == "disk" and roothash.exists():
                    meta["roothash"] = roothash.read_text().strip()
                stored = cache.put_file("output", out_key, target, meta)
                output_sha = stored.object if stored is not None else None
        if fmt != "directory":
            # Hashed once: the cache hashed the output while storing or copying it.
            manifest["sha256"] = output_sha or sha256_file(target)
            cache.note_output(manifest["sha256"], target)
            manifest["size"] = target.stat().st_size
        result.outputs[fmt] = target
        manifest_path = out_dir / (OUTPUT_NAMES[fmt] + ".manifest.json")
        write_atomic(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        result.outputs["manifest"] = manifest_path
        result.manifest = manifest
        # The in-toto/SLSA provenance statement, signed with the lock key when it is at hand
        # (a verifier without the private key still gets an unsigned, checkable statement).
        from reprobuild.keys import provenance_signer
        from reprobuild.provenance import write_provenance

        # (#18) the lock key from a file or an ssh-agent; a note and an unsigned statement without it.
        signer, note = provenance_signer(spec.signing.lock_key, os.environ)
        if note:
            say(note)
        result.outputs["provenance"] = write_provenance(lock, spec.lock_path, manifest, out_dir, signer,
                                                        list(options.argv))
    cache.register_root(root_name(spec.directory), keep_previous=cached is not None)
    result.cache_hits = list(cache.hits)
    return result


def _enter_overlay_namespace(cache, store: Store, work: Path, say: Say) -> bool:
    """Whether this build can use overlays over cached trees (then this thread is now in a private
    mount namespace). Without them the build copies cached trees: same bytes, slower."""
    from reprobuild.rootfs.overlay import enter_private_mount_namespace, unavailable_reason

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


def _write_format(spec: ImageSpec, lock: Lock, store: Store, fmt: str, tree: Path, work: Path, target: Path,
                  cache, keys: TreeKeys, tools, say: Say, result: BuildResult) -> dict[str, Any]:
    """Turn the tree into the requested format at ``target``; return the format's manifest fields."""
    epoch = lock.source_date_epoch
    if fmt == "directory":
        if target.exists():
            os.rename(target, work / "previous")
        os.rename(tree, target)
    elif fmt == "tar":
        from reprobuild.rootfs.archive import write_tar_stream

        with _timed(result, "tar"):
            write_atomically(target, lambda f: write_tar_stream(tree, f, epoch))
    elif fmt == "cpio":
        from reprobuild.image.cpio import cpio_from_tree

        with _timed(result, "cpio"):
            write_atomically(target, lambda f: cpio_from_tree(tree, f, epoch, keep_owners=True))
    else:
        from reprobuild.assemble import build_disk

        return build_disk(spec, lock, store, tree, work, target, say, result.timings, cache=cache,
                          tree_key=keys.tree, tools=tools)
    return {}


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
