"""The build stage: a lock (plus its image definition) and the store → the image outputs.

``build_locked`` checks that the lock is current, fetches whatever the store lacks, builds the
root tree from the locked packages, and writes the requested format into the output directory.
Every output is written under a temporary name and renamed into place, so an interrupted build
leaves the previous outputs (or nothing), never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reprobuild.config import ImageSpec
from reprobuild.errors import BuildError
from reprobuild.lock import check_lock_current
from reprobuild.lockfile import Lock, PackageSet, dumps, write_atomic
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


@dataclass
class BuildResult:
    outputs: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


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
    fmt = options.format or spec.build.format
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
    from reprobuild.rootfs.tree import build_tree, write_tar

    with tempfile.TemporaryDirectory(prefix=".reprobuild-work-", dir=out_dir) as work_str:
        work = Path(work_str)
        tree = work / "tree"
        say(f"building the root tree ({len(lock.package_set('image').packages)} packages)")
        with _timed(result, "tree"):
            build_tree(planned_packages(lock.package_set("image")), store.path, tree, tree_settings(spec),
                       lock.source_date_epoch, progress=say)
        target = out_dir / OUTPUT_NAMES[fmt]
        manifest: dict[str, Any] = {
            "format": fmt,
            "lock_digest": lock_digest(lock),
            "config_digest": lock.config_digest,
            "source_date_epoch": lock.source_date_epoch,
            "release": lock.release,
            "architecture": lock.architecture,
            "packages": [f"{p.name}={p.version}:{p.architecture}" for p in lock.package_set("image").packages],
        }
        if fmt == "directory":
            if target.exists():
                old = work / "previous"
                os.rename(target, old)
            os.rename(tree, target)
        elif fmt == "tar":
            with _timed(result, "tar"):
                write_tar(tree, target, lock.source_date_epoch)
        elif fmt == "cpio":
            from reprobuild.image.cpio import cpio_from_tree

            with _timed(result, "cpio"):
                _write_output(target, lambda f: cpio_from_tree(tree, f, lock.source_date_epoch, keep_owners=True))
        elif fmt == "disk":
            from reprobuild.assemble import build_disk

            manifest.update(build_disk(spec, lock, store, tree, work, target, say, result.timings))
        else:
            raise BuildError(f"unknown output format {fmt!r}")
        if fmt != "directory":
            manifest["sha256"] = _sha256_file(target)
            manifest["size"] = target.stat().st_size
        result.outputs[fmt] = target
        manifest_path = out_dir / (OUTPUT_NAMES[fmt] + ".manifest.json")
        write_atomic(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        result.outputs["manifest"] = manifest_path
        result.manifest = manifest
    return result


def _write_output(target: Path, writer: Callable) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
