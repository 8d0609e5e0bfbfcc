"""``reprobuild lock``: resolve the image definition into a signed lockfile."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from reprobuild.cli import cli
from reprobuild.cli.options import directory_option, json_option, quiet_option, store_option

set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a setting, e.g. --set Distribution.Release=bookworm.")


def _say(quiet: bool):
    def progress(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    return progress


@cli.command("lock")
@directory_option
@store_option
@set_option
@click.option("--update", "update", is_flag=True, help="Re-resolve every package (or only those named).")
@click.argument("packages", nargs=-1)
@click.option("--verify", "verify_only", is_flag=True,
              help="Do not resolve: check the lock's signature and that it matches the configuration.")
@click.option("--trusted-key", type=click.Path(dir_okay=False, path_type=Path),
              help="allowed_signers file or OpenSSH public key the lock signature must verify against "
                   "(with --verify).")
@click.option("--sign-key", metavar="KEY|agent:[NAME]",
              help="ed25519 key to sign the lock with: an OpenSSH private key file, or agent: / agent:COMMENT / "
                   "agent:SHA256:… for a key in the ssh-agent (overrides [Signing] LockKey=).")
@click.option("--resign", is_flag=True,
              help="Do not resolve: (re-)sign the existing lock as it is, e.g. to move an old JSON signature "
                   "to the SSH format.")
@click.option("--mirror", help="Debian archive base URL for this run (overrides Mirror=).")
@json_option
@quiet_option
def lock_command(directory: Path, store_path: Path | None, overrides: tuple[str, ...], update: bool,
                 packages: tuple[str, ...], verify_only: bool, trusted_key: Path | None, sign_key: str | None,
                 resign: bool, mirror: str | None, as_json: bool, quiet: bool) -> None:
    """Resolve DIRECTORY/reprobuild.conf into DIRECTORY/reprobuild.lock.

    Fetches each suite's InRelease, verifies it against the Debian archive keyring, fetches the
    Packages indices by hash, resolves the package sets with Debian's dependency rules and
    writes a canonical lockfile (and reprobuild.lock.sig, an SSH signature any `ssh-keygen -Y
    verify -n reprobuild-lock` checks, when a key is configured).

    An existing lock keeps its pinned versions where it can; `--update` re-resolves everything,
    `--update PKG…` frees only the named packages. Prints the package changes.
    """
    import os

    from reprobuild.config import load_spec
    from reprobuild.errors import UsageError
    from reprobuild.fileio import write_atomic
    from reprobuild.lock import LockOptions, check_lock_current, lock_spec, save_signed_lock, unsigned_note
    from reprobuild.lockfile import SIGNATURE_SUFFIX, load_lock, read_lock_bytes
    from reprobuild.memory import gc_paused, unmap_big_blocks
    from reprobuild.progress import set_counts
    from reprobuild.store import Store

    if packages and not update:
        raise UsageError("package names are only accepted with --update")
    if resign and (verify_only or update):
        raise UsageError("--resign cannot be combined with --verify or --update")
    all_overrides = list(overrides) + ([f"Distribution.Mirror={mirror}"] if mirror else [])
    spec = load_spec(directory, all_overrides)
    lock_path = spec.lock_path
    sig_path = lock_path.with_name(lock_path.name + SIGNATURE_SUFFIX)

    if verify_only:
        from reprobuild import keys  # only where a key is used: cryptography costs ~50 ms of imports

        lock = load_lock(lock_path)
        data = read_lock_bytes(lock_path)
        signer = None
        if trusted_key:
            if not sig_path.exists():
                raise keys.VerificationFailed(f"{sig_path}: the lock is not signed")
            signer = keys.verify_lock(data, keys.read_key_file(sig_path, "signature file"), str(sig_path), keys.load_trusted_keys(trusted_key))
        check_lock_current(spec, lock)
        result = {"lock": str(lock_path), "signature": f"verified ({signer})" if signer else "not checked",
                  "config": "current", "sets": {s.name: len(s.packages) for s in lock.sets}}
        click.echo(json.dumps(result, indent=2) if as_json else
                   f"{lock_path}: signature {result['signature']}, configuration current; "
                   f"packages: {set_counts(result['sets'].items())}")
        return

    key_source = sign_key or spec.signing.lock_key
    if key_source:  # keys and signer import cryptography (~50 ms): only when a key is used
        from reprobuild import keys
        from reprobuild.signer import key_file_warning

        permission_warning = key_file_warning(key_source)
        if permission_warning:
            click.echo(permission_warning, err=True)
    if resign:
        if not key_source:
            raise UsageError("--resign needs a key: --sign-key or [Signing] LockKey=")
        load_lock(lock_path)  # only a well-formed lock is signed
        lock_signer = keys.open_lock_signer(key_source, os.environ)
        write_atomic(sig_path, keys.sign_lock(lock_path.read_bytes(), lock_signer))
        click.echo(f"wrote {sig_path} (SSH signature by {lock_signer.description})")
        return

    # Opened before resolving, so that a missing key or agent fails before anything is written.
    lock_signer = keys.open_lock_signer(key_source, os.environ) if key_source else None
    previous = load_lock(lock_path) if lock_path.exists() else None
    store = Store(store_path or Store.default_root())
    unmap_big_blocks()  # a cold lock's peak memory: see reprobuild.memory
    started = time.monotonic()
    options = LockOptions(update=update and not packages, update_packages=packages,
                          progress=_say(quiet or as_json), index_cache=store.root / "indices")
    with gc_paused():  # its tables are ~70k acyclic objects: see reprobuild.memory
        result = lock_spec(spec, previous, options)
    saved = save_signed_lock(result.lock, lock_path, lock_signer)
    signed = saved.signed
    if saved.removed_signature and not as_json:
        click.echo(unsigned_note(sig_path), err=True)
    elapsed = time.monotonic() - started
    summary = {
        "lock": str(lock_path),
        "signed": signed,
        "changed": saved.changed,
        "removed_stale_signature": saved.removed_signature,
        "config_digest": result.lock.config_digest,
        "source_date_epoch": result.lock.source_date_epoch,
        "sets": {s.name: len(s.packages) for s in result.lock.sets},
        "changes": [{"name": c.name, "old": c.old, "new": c.new} for c in result.changes],
        "seconds": round(elapsed, 3),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if not quiet:
        for change in result.changes:
            if change.old is None:
                click.echo(f"  + {change.name} {change.new}")
            elif change.new is None:
                click.echo(f"  - {change.name} {change.old}")
            else:
                click.echo(f"  ~ {change.name} {change.old} -> {change.new}")
        click.echo(f"wrote {lock_path}{' (signed)' if signed else ''} in {elapsed:.1f}s; "
                   f"packages: {set_counts(summary['sets'].items())}", file=sys.stdout)
