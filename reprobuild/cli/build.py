"""``reprobuild build``: lock (unless --locked), fetch, and build the image outputs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from reprobuild.cli import cli
from reprobuild.cli.options import directory_option, json_option, quiet_option, rootless, store_option


@cli.command("build")
@directory_option
@store_option
@click.option("--locked", is_flag=True,
              help="Build from the existing lock only; fail if it is missing or out of date.")
@click.option("-f", "--format", "fmt", type=click.Choice(["disk", "directory", "tar", "cpio"]),
              help="Output format [default: [Build] Format=, disk].")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Output directory [default: DIRECTORY/out].")
@click.option("--offline", is_flag=True, help="Use only the store; fail listing what is missing.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Parallel downloads.")
@click.option("--substituter", "substituters", multiple=True, metavar="URL",
              help="Extra binary cache (another store served over HTTP); may repeat.")
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Build every stage from scratch: no cache lookups and no cache saves.")
@json_option
@quiet_option
@rootless()
def build_command(directory: Path, store_path: Path | None, locked: bool, fmt: str | None,
                  output_dir: Path | None, offline: bool, jobs: int, substituters: tuple[str, ...],
                  no_cache: bool, as_json: bool, quiet: bool) -> None:
    """Build the image of DIRECTORY from its lock.

    \b
    Outputs (in the output directory, each written atomically):
      disk       image.raw — a Discoverable Disk Image (GPT, root file system,
                 dm-verity hash and signature partitions, ESP with a signed UKI
                 when the image has a kernel), plus image.roothash
      directory  image/    — the root tree
      tar        image.tar — pax, sorted, numeric owners, clamped mtimes
      cpio       image.cpio — newc, sorted, renumbered inodes
    and OUTPUT.manifest.json describing what was built from which lock.

    Each stage (package payloads, installed packages, configured tree, tools tree, file system,
    initrd, UKI + ESP, output) is cached in the store under a key of its inputs; a rebuild
    re-runs only the stages whose inputs changed (--no-cache: none is read or written).

    Without --locked a missing or out-of-date lock is (re)created first, keeping pinned versions.
    """
    from reprobuild.build import BuildOptions, build_locked
    from reprobuild.config import load_spec
    from reprobuild.lock import LockOptions, lock_spec
    from reprobuild.lockfile import load_lock, save_lock
    from reprobuild.progress import make_progress
    from reprobuild.store import Store

    spec = load_spec(directory)
    store = Store(store_path or Store.default_root())
    say = (lambda _m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    lock_path = spec.lock_path
    if locked:
        lock = load_lock(lock_path)
    else:
        previous = load_lock(lock_path) if lock_path.exists() else None
        if previous is None or previous.config_digest != spec.digest():
            say("locking: the lock is missing or out of date")
            lock = lock_spec(spec, previous, LockOptions(progress=say, index_cache=store.root / "indices")).lock
            save_lock(lock, lock_path)
        else:
            lock = previous
    started = time.monotonic()
    options = BuildOptions(output_dir=output_dir or (spec.directory / "out"), format=fmt, offline=offline,
                           jobs=jobs, substituters=substituters, argv=tuple(sys.argv), cache=not no_cache)
    result = build_locked(spec, lock, store, options, say=say,
                          fetch_progress=make_progress(quiet or as_json))
    elapsed = time.monotonic() - started
    if as_json:
        click.echo(json.dumps({"outputs": {k: str(v) for k, v in result.outputs.items()},
                               "manifest": result.manifest, "timings": result.timings,
                               "cache_hits": result.cache_hits,
                               "seconds": round(elapsed, 3)}, indent=2, sort_keys=True))
        return
    if not quiet:
        main = result.outputs.get(options.format or spec.build.format)
        digest = result.manifest.get("sha256")
        click.echo(f"built {main}{f' sha256 {digest}' if digest else ''} in {elapsed:.1f}s")
