"""``reprobuild store …`` (path, stats, verify, gc, export, import) and ``reprobuild fetch``.

Parsing and rendering only: each command calls one function of reprobuild.store/fetch.

What these commands need from the lock side (imported lazily):
  * ``reprobuild.lockfile.load_lock(path) -> Lock``
  * ``Lock.all_packages()`` -> every distinct package with ``.sha256`` (gc roots, export)
  * ``reprobuild.mirrors.fetch_items(lock, mirrors) -> list[FetchItem]`` (fetch: URLs per object)
  * ``reprobuild.config.load_spec(directory) -> ImageSpec`` with ``.lock_path`` and
    ``.build.substituters``
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from reprobuild.cli import cli
from reprobuild.cli.options import (
    directory_option,
    json_option,
    quiet_option,
    registry_client,
    registry_options,
    rootless,
    store_option,
)


def open_store(store_path: Path | None):  # -> reprobuild.store.Store
    """The store named by --store / $REPROBUILD_STORE, else the XDG default."""
    from reprobuild.store import Store

    return Store(store_path or Store.default_root())


def _lock_shas(lock_paths: tuple[Path, ...]) -> set[str]:
    from reprobuild.lockfile import load_lock

    shas: set[str] = set()
    for p in lock_paths:
        shas |= {o.sha256 for o in load_lock(p).all_packages()}
    return shas


def _echo_json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


@cli.group("store")
def store_group() -> None:
    """Inspect and maintain the content-addressed store of verified objects."""


@store_group.command("path")
@store_option
def store_path_command(store_path: Path | None) -> None:
    """Print the store location."""
    click.echo(str(open_store(store_path).root))


@store_group.command("stats")
@store_option
@json_option
def store_stats_command(store_path: Path | None, as_json: bool) -> None:
    """Print the number of objects and their total size."""
    from reprobuild.progress import format_bytes

    st = open_store(store_path).stats()
    if as_json:
        _echo_json(st.as_json())
    else:
        click.echo(f"{st.root}: {st.objects} object(s) {format_bytes(st.bytes)}, {st.trees} extracted tree(s) "
                   f"of the build cache {format_bytes(st.trees_bytes)}, repository indices "
                   f"{format_bytes(st.indices_bytes)}, {st.roots} gc root(s), "
                   f"{st.scratch} scratch dir(s) ({st.scratch_dead} left by dead processes, removed by the "
                   f"next fetch, build or gc) {format_bytes(st.scratch_bytes)}; "
                   f"{format_bytes(st.disk_bytes)} on disk in all")


@store_group.command("verify")
@store_option
@json_option
@quiet_option
@rootless()
def store_verify_command(store_path: Path | None, as_json: bool, quiet: bool) -> None:
    """Rehash every object; move corrupt ones to quarantine/. Compare every extracted tree of the
    build cache with its object and remove any that differs. Exit status 1 if anything was wrong."""
    from reprobuild.cache import Cache
    from reprobuild.errors import StoreError
    from reprobuild.progress import make_reporter

    store = open_store(store_path)
    say = make_reporter(quiet or as_json)
    try:
        report = store.verify(say)
        say.stage_started("comparing extracted trees")
        trees = Cache(store).verify_trees()
        say.stage_finished(f"{len(trees)} removed")
    finally:
        say.close()
    if as_json:
        _echo_json({**report.as_json(), "ok": report.ok and not trees,
                    "trees_removed": [{"object": sha, "reason": why} for sha, why in trees]})
    else:
        for c in report.corrupt:
            click.echo(f"corrupt: {c.name}: {c.reason} (moved to {c.quarantined_as})")
        for sha, why in trees:
            click.echo(f"extracted tree trees/{sha[:16]}…: {why} (removed; the next build extracts it again)")
        click.echo(f"{report.checked} object(s) checked, {len(report.corrupt)} corrupt; "
                   f"{len(trees)} extracted tree(s) removed")
    if not report.ok:
        raise StoreError(f"{len(report.corrupt)} corrupt object(s) found and moved to {report.quarantine}",
                         hint="run `reprobuild fetch` to download good copies again")
    if trees:
        raise StoreError(f"{len(trees)} extracted tree(s) of the build cache differed from their object and were "
                         "removed", hint="something wrote into the store; the next build extracts them again")


@store_group.command("gc")
@store_option
@click.option("--keep", "keep", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              metavar="LOCK", help="Keep every object this lock needs (repeatable).")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@json_option
@rootless()
def store_gc_command(store_path: Path | None, keep: tuple[Path, ...], dry_run: bool, as_json: bool) -> None:
    """Remove objects that no kept lock references.

    Roots are the locks named with --keep, the locks registered by earlier builds (see
    roots/ in the store) and keyed entries such as repository indices."""
    from reprobuild.progress import format_bytes
    from reprobuild.storeinfo import describe_objects

    store = open_store(store_path)
    report = store.gc(_lock_shas(keep), dry_run=dry_run)
    described = describe_objects(store, report.removed) if dry_run else {}  # a dry run keeps them to look at
    if as_json:
        _echo_json({**report.as_json(), "objects": {sha: described.get(sha) for sha in report.removed}}
                   if dry_run else report.as_json())
        return
    verb = "would remove" if dry_run else "removed"
    for sha in report.removed:
        click.echo(f"{verb} sha256:{sha[:16]}…  {described[sha]}" if sha in described else f"{verb} sha256:{sha}")
    click.echo(f"{verb} {len(report.removed)} object(s), {format_bytes(report.freed_bytes)}; "
               f"kept {report.kept}")


@store_group.command("export")
@store_option
@click.argument("lock_path", metavar="LOCK", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="BUNDLE", help="Bundle to write (a zstd-compressed tar).")
@quiet_option
def store_export_command(store_path: Path | None, lock_path: Path, output: Path, quiet: bool) -> None:
    """Write every object LOCK needs into one bundle, for a machine with no network."""
    from reprobuild.progress import format_bytes

    report = open_store(store_path).export_bundle(_lock_shas((lock_path,)), output)
    if not quiet:
        click.echo(f"{report.path}: {report.objects} object(s), {format_bytes(report.bytes)}", err=True)


@store_group.command("push")
@store_option
@click.argument("reference")
@click.option("--lock", "lock_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The lock whose package objects to push.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=4, show_default=True, help="Parallel uploads.")
@registry_options
@json_option
@quiet_option
def store_push_command(store_path: Path | None, reference: str, lock_path: Path, jobs: int, as_json: bool,
                       quiet: bool, **registry: object) -> None:  # fmt: skip
    """Push the package objects LOCK needs to the OCI repository REFERENCE (registry/repository[:tag]),
    for builders with Substituters=oci://registry/repository. The tag defaults to lock-<lock digest>."""
    from reprobuild.lockfile import load_lock
    from reprobuild.progress import format_bytes, make_reporter
    from reprobuild.storepush import push_store

    ref, client = registry_client(reference, registry, push=True)
    lock = load_lock(lock_path)
    say = make_reporter(quiet or as_json)
    try:
        result = push_store(open_store(store_path), lock, ref, client, say, jobs)
    finally:
        say.close()
    if as_json:
        _echo_json(result.as_json())
        return
    click.echo(f"pushed {result.reference}: {result.objects} objects, {result.uploaded} uploaded "
               f"({format_bytes(result.bytes_uploaded)})")


@store_group.command("import")
@store_option
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@json_option
@quiet_option
def store_import_command(store_path: Path | None, bundle: Path, as_json: bool, quiet: bool) -> None:
    """Verify every object of BUNDLE and add it to the store."""
    report = open_store(store_path).import_bundle(bundle)
    if as_json:
        _echo_json(report.as_json())
    elif not quiet:
        click.echo(f"added {len(report.added)} object(s), {len(report.already_present)} already present",
                   err=True)


@cli.command("fetch")
@directory_option
@store_option
@click.option("--offline", is_flag=True, help="Use only the store; fail listing what is missing.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Parallel downloads.")
@click.option("--substituter", "substituters", multiple=True, metavar="URL",
              help="Extra binary cache (base URL of another store), tried after Substituters=.")
@json_option
@quiet_option
def fetch_command(directory: Path, store_path: Path | None, offline: bool, jobs: int,
                  substituters: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Download and verify every object the lock of DIRECTORY needs that the store lacks."""
    from reprobuild.config import load_spec
    from reprobuild.fetch import fetch_all
    from reprobuild.lockfile import load_lock
    from reprobuild.mirrors import fetch_items, mirrors_for_spec
    from reprobuild.progress import format_bytes, make_progress

    spec = load_spec(directory)
    lock = load_lock(spec.lock_path)
    items = fetch_items(lock, mirrors_for_spec(spec))
    subs = tuple(dict.fromkeys(tuple(spec.build.substituters) + substituters))
    report = fetch_all(open_store(store_path), items, subs, jobs=jobs, offline=offline,
                       progress=make_progress(quiet or as_json), env=os.environ)
    if as_json:
        _echo_json(report.as_json())
    elif not quiet:
        click.echo(f"{len(report.fetched)} fetched ({format_bytes(report.bytes_downloaded)}, "
                   f"{format_bytes(report.rate)}/s), {len(report.present)} already in the store", err=True)
