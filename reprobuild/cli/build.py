"""``reprobuild build``: lock (unless --locked), fetch, and build the image outputs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from reprobuild.cli import cli
from reprobuild.cli.options import (
    build_source_options,
    directory_option,
    json_option,
    quiet_option,
    rootless,
    store_option,
)
from reprobuild.compression import COMPRESSIONS
from reprobuild.manifest import OUTPUT_FILES

if TYPE_CHECKING:
    from reprobuild.config import ImageSpec
    from reprobuild.progress import Reporter
    from reprobuild.store import Store


@cli.command("build")
@directory_option
@store_option
@click.option("--locked", is_flag=True,
              help="Build from the existing lock only; fail if it is missing or out of date.")
@click.option("-f", "--format", "fmt", type=click.Choice(list(OUTPUT_FILES)),
              help="Output format [default: [Build] Format=, disk].")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Output directory [default: DIRECTORY/out].")
@build_source_options
@click.option("--build-directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="$BUILDDIR for BuildScripts= (overrides BuildDirectory=; created if missing).")
@click.option("--shell-on-failure", is_flag=True,
              help="When a BuildScripts= script fails, open a shell in its build environment "
                   "(sources at /work/src) before reporting the failure.")
@click.option("--workspace", metavar="DIR|auto|output", default=None,
              help="Where the trees are made: auto = in memory (/dev/shm) when they fit, else beside "
                   "the output; output = beside the output; DIR = in DIR [default: $REPROBUILD_WORKSPACE, auto].")
@json_option
@quiet_option
@rootless()
def build_command(directory: Path, store_path: Path | None, locked: bool, fmt: str | None,
                  output_dir: Path | None, offline: bool, jobs: int, substituters: tuple[str, ...],
                  no_cache: bool, build_directory: Path | None, shell_on_failure: bool, workspace: str | None,
                  as_json: bool, quiet: bool) -> None:
    """Build the image of DIRECTORY from its lock.

    \b
    Outputs (in the output directory, each written atomically):
      disk       image.raw — a Discoverable Disk Image (GPT, root file system,
                 dm-verity hash and signature partitions, ESP with a signed UKI
                 when the image has a kernel), plus image.roothash
      directory  image/    — the root tree
      tar        image.tar — pax, sorted, numeric owners, clamped mtimes
      cpio       image.cpio — newc, sorted, renumbered inodes
      oci        image.oci.tar — an OCI image (oci-archive), its one layer the tar
    and OUTPUT.manifest.json describing what was built from which lock.

    Each stage (package payloads, build environment and BuildScripts= output, installed packages,
    configured tree, tools tree, file system, initrd, UKI + ESP, output) is cached in the store under a key of its inputs; a rebuild
    re-runs only the stages whose inputs changed (--no-cache: none is read or written). --json
    lists every stage with its outcome and, on a miss, what changed since the last build here.

    Without --locked a missing or out-of-date lock is (re)created first, keeping pinned versions.
    """
    from reprobuild.config import load_spec
    from reprobuild.progress import make_reporter
    from reprobuild.store import Store

    # BuildDirectory= is outside the config digest: overriding it keeps the lock current.
    spec = load_spec(directory, [f"Build.BuildDirectory={build_directory.resolve()}"] if build_directory else None)
    store = Store(store_path or Store.default_root())
    # One reporter for messages, stage progress and downloads: live status lines on a terminal,
    # a few lines per stage in a log.
    say = make_reporter(quiet or as_json)
    try:
        _build(spec, store, say, locked, fmt, output_dir, offline, jobs, substituters, no_cache, shell_on_failure,
               workspace, as_json, quiet)
    finally:
        say.close()


def _build(spec: ImageSpec, store: Store, say: Reporter, locked: bool, fmt: str | None, output_dir: Path | None,
           offline: bool, jobs: int, substituters: tuple[str, ...], no_cache: bool, shell_on_failure: bool,
           workspace: str | None, as_json: bool, quiet: bool) -> None:  # fmt: skip
    from reprobuild.build import BuildOptions, build_locked
    from reprobuild.keys import provenance_signer
    from reprobuild.lock import LockOptions, lock_spec, save_signed_lock, unsigned_note
    from reprobuild.lockfile import SIGNATURE_SUFFIX, load_lock

    lock_path = spec.lock_path
    if locked:
        lock = load_lock(lock_path)
    else:
        previous = load_lock(lock_path) if lock_path.exists() else None
        if previous is None or previous.config_digest != spec.digest():
            say("locking: the lock is missing or out of date")
            lock = lock_spec(spec, previous, LockOptions(progress=say, index_cache=store.root / "indices")).lock
            # As for the provenance: a configured key that is not at hand signs nothing (noted).
            signer, note = provenance_signer(spec.signing.lock_key, os.environ, "the new lock")
            if note:
                say(note)
            saved = save_signed_lock(lock, lock_path, signer)
            if saved.removed_signature and not as_json:
                click.echo(unsigned_note(lock_path.with_name(lock_path.name + SIGNATURE_SUFFIX)), err=True)
        else:
            lock = previous
    started = time.monotonic()
    options = BuildOptions(output_dir=output_dir or (spec.directory / "out"), format=fmt, offline=offline,
                           jobs=jobs, substituters=substituters, argv=tuple(sys.argv), cache=not no_cache,
                           shell_on_failure=shell_on_failure, workspace=workspace)
    result = build_locked(spec, lock, store, options, say=say, fetch_progress=say)
    elapsed = time.monotonic() - started
    if as_json:
        click.echo(json.dumps({"outputs": {k: str(v) for k, v in result.outputs.items()},
                               "manifest": result.manifest, "timings": result.timings,
                               "cache_hits": result.cache_hits, "workspace": result.workspace,
                               "stages": [r.as_dict() for r in result.stages],
                               "seconds": round(elapsed, 3)}, indent=2, sort_keys=True))
        return
    if not quiet:
        main = result.outputs.get(options.format or spec.build.format)
        digest = result.manifest.get("sha256")
        click.echo(f"built {main}{f' sha256 {digest}' if digest else ''} in {elapsed:.1f}s")


@cli.command("release")
@directory_option
@store_option
@click.option("-o", "--output", "release_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Release directory: the split artifacts, SHA256SUMS and SHA256SUMS.gpg.")
@click.option("--build-output", "build_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the disk image itself is built [default: DIRECTORY/out, as for build].")
@click.option("--sign-key", metavar="KEY",
              help="OpenPGP key id, fingerprint or user id (in $GNUPGHOME) signing SHA256SUMS "
                   "[default: [Signing] ReleaseKey=; neither: no SHA256SUMS.gpg].")
@click.option("--compress", type=click.Choice(list(COMPRESSIONS)), default="none", show_default=True,
              help="Compress each artifact with fixed parameters: xz (NAME.xz) or gzip (NAME.gz), which an "
                   "image's systemd-sysupdate decompresses as it downloads, or zstd (NAME.zst, not for "
                   "[Updates] images: trixie's systemd-pull cannot read it).")
@build_source_options
@json_option
@quiet_option
@rootless()
def release_command(directory: Path, store_path: Path | None, release_dir: Path, build_dir: Path | None,
                    sign_key: str | None, compress: str, offline: bool, jobs: int, substituters: tuple[str, ...],
                    no_cache: bool, as_json: bool, quiet: bool) -> None:
    """Build the disk image from the lock alone and write a versioned release of it.

    \b
    In the release directory (names from [Build] ImageId= and ImageVersion=):
      ID_VERSION.root.raw            the root (or usr) partition
      ID_VERSION.root-verity.raw     its dm-verity hash partition
      ID_VERSION.root-verity-sig.raw its verity signature partition (Verity=signed)
      ID_VERSION.efi                 the UKI (bootable images)
      SHA256SUMS                     sha256sum(1) lines over them, sorted
      SHA256SUMS.gpg                 detached OpenPGP signature (with a release key)
    Every file is reproducible: the same lock gives the same bytes.
    """
    from reprobuild.build import BuildOptions
    from reprobuild.config import load_spec
    from reprobuild.lockfile import load_lock
    from reprobuild.progress import make_reporter
    from reprobuild.release import ReleaseOptions, release
    from reprobuild.store import Store

    spec = load_spec(directory)
    store = Store(store_path or Store.default_root())
    say = make_reporter(quiet or as_json)
    try:
        started = time.monotonic()
        build = BuildOptions(output_dir=build_dir or (spec.directory / "out"), format="disk", offline=offline,
                             jobs=jobs, substituters=substituters, argv=tuple(sys.argv), cache=not no_cache)
        result = release(spec, load_lock(spec.lock_path), store,
                         ReleaseOptions(release_dir=release_dir, build=build, sign_key=sign_key, compress=compress),
                         say=say, fetch_progress=say)
        elapsed = time.monotonic() - started
    finally:
        say.close()
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "seconds": round(elapsed, 3)}, indent=2, sort_keys=True))
    elif not quiet:
        signed = " and SHA256SUMS.gpg" if result.signature else ""
        click.echo(f"released {result.name}: {len(result.artifacts)} artifacts, SHA256SUMS{signed} in "
                   f"{release_dir} ({elapsed:.1f}s)")
