"""``reprobuild verify``, ``reprobuild check`` and ``reprobuild sbom``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from reprobuild.checkresult import UNSIGNED_KINDS
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

_MARKS = {"passed": ("PASS", "green"), "failed": ("FAIL", "red"), "skipped": ("SKIP", "yellow")}


def _say(quiet: bool):
    return (lambda _m: None) if quiet else (lambda m: click.echo(m, err=True))


@cli.command("verify")
@click.argument("image")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The lockfile the image claims to be built from (its .sig beside it); required for a "
                   "local image, a REFERENCE brings its attached lock.")
@click.option("--trusted-key", type=click.Path(dir_okay=False, path_type=Path),
              help="allowed_signers file or OpenSSH/PEM ed25519 public key the lock (and provenance) "
                   "signature must verify against.")
@click.option("--certificate", "certificates", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Trusted X.509 certificate for the verity signature and the UKI's Authenticode "
                   "signature; may repeat (e.g. the verity and the Secure Boot certificate).")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="Image manifest [default: IMAGE.manifest.json].")
@click.option("--provenance", type=click.Path(dir_okay=False, path_type=Path),
              help="Also check this in-toto provenance (DSSE envelope) against the lock and image.")
@click.option("--no-rebuild", is_flag=True, help="Skip the independent rebuild.")
@click.option("--allow-unsigned", "allow_unsigned", multiple=True,
              type=click.Choice(UNSIGNED_KINDS),
              help="Do not fail when this signature is present but no trusted key/certificate was given to "
                   "check it (repeatable); the summary names it as not checked.")
@click.option("--audit", is_flag=True,
              help="Instead of the checks: list the image's files that no package of the lock ships (with "
                   "the setting that wrote them, from the manifest) and package files that differ from "
                   "their .deb or are missing. The packages must be in the store.")
@click.option("-C", "--directory", "definition", type=click.Path(file_okay=False, path_type=Path),
              help="Image definition for the rebuild [default: the lock's directory].")
@store_option
@click.option("--bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="Store bundle to rebuild from (offline) instead of downloading.")
@registry_options
@json_option
@quiet_option
@click.pass_context
@rootless(required=lambda kwargs: not kwargs["no_rebuild"] and not kwargs["audit"], default_store=False)
def verify_command(ctx: click.Context, image: str, lock_path: Path | None, trusted_key: Path | None,
                   certificates: tuple[Path, ...], manifest: Path | None, provenance: Path | None,
                   no_rebuild: bool, allow_unsigned: tuple[str, ...], audit: bool, definition: Path | None,
                   store_path: Path | None, bundle: Path | None, as_json: bool, quiet: bool,
                   **registry: object) -> None:  # fmt: skip
    """Check IMAGE against the lock it claims to come from, and report each check.

    \b
    Checks: the lock's signature; the manifest against the lock; the image digest;
    the GPT and every partition hash; the verity root hash recomputed from the data,
    the hash tree, the signature partition; the UKI's Authenticode signature and
    its roothash=; then (unless --no-rebuild) an independent rebuild from the lock
    in a fresh directory with a fresh store (or --store/--bundle), compared byte for
    byte, with the diff's summary when it differs.
    IMAGE may also be a tar, cpio, directory or oci output, or a REFERENCE
    (registry[:port]/repository:tag or @sha256:…) that reprobuild publish pushed:
    it is pulled by digest, every blob's sha256 checked, and its attached lock
    (and provenance) used; the rebuild then needs the definition (-C DIR).
    A signature that is present but cannot be checked (no --trusted-key or
    --certificate for it) fails unless --allow-unsigned names it. The last line
    says what was checked and what was not (with -q: only on failure).
    Exit status: 0 only if every check that applies passed.
    """
    from reprobuild.errors import UsageError
    from reprobuild.progress import make_reporter
    from reprobuild.registry.reference import looks_like_reference
    from reprobuild.verify import VerifyOptions, verify_image
    from reprobuild.verifyref import verify_reference

    remote = image.startswith("oci://") or (not os.path.lexists(image) and looks_like_reference(image))
    if not remote and not os.path.lexists(image):
        raise UsageError(f"{image}: no such file, and not a registry reference (registry[:port]/repository:tag)")
    if not remote and lock_path is None:
        raise UsageError("verify of a local image needs --lock LOCKFILE")
    if remote and (audit or manifest is not None or lock_path is not None):
        raise UsageError("verify REFERENCE uses the attached lock and manifest: drop --lock, --manifest, --audit")
    if remote and not no_rebuild and definition is None:
        raise UsageError("verify REFERENCE rebuilds from the image definition: give -C DIR (or --no-rebuild)")
    if audit:
        assert lock_path is not None
        ctx.exit(_audit(Path(image), lock_path, manifest, store_path, as_json, quiet))
    options = VerifyOptions(manifest=manifest, rebuild=not no_rebuild, definition=definition, store=store_path,
                            bundle=bundle, provenance=provenance, allow_unsigned=frozenset(allow_unsigned))  # fmt: skip
    ref_and_client = registry_client(image, registry) if remote else None
    say = make_reporter(quiet or as_json)
    try:
        if ref_and_client is not None:
            ref, client = ref_and_client
            report = verify_reference(client, ref, trusted_key, list(certificates), options, say=say,
                                      fetch_progress=say)  # fmt: skip
        else:
            assert lock_path is not None
            report = verify_image(Path(image), lock_path, trusted_key, certificates, options, say=say,
                                  fetch_progress=say)  # fmt: skip
    finally:
        say.close()
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    elif not (quiet and report.ok):
        colour = sys.stdout.isatty()
        for c in report.checks:
            if quiet and c.passed is not False:
                continue
            mark, fg = _MARKS[c.status]
            click.echo(f"{click.style(mark, fg=fg, bold=True) if colour else mark}  {c.name:<20} {c.detail}")
        if report.diff_summary:
            click.echo("\nThe rebuild differs:\n" + report.diff_summary)
        click.echo(f"{image}: {report.summary}")
    ctx.exit(0 if report.ok else 1)


def _audit(image: Path, lock_path: Path, manifest: Path | None, store_path: Path | None, as_json: bool,
           quiet: bool) -> int:  # fmt: skip
    from reprobuild.audit import DPKG_DATABASE, audit_image
    from reprobuild.store import Store

    store = Store(store_path or Store.default_root())
    report = audit_image(image, lock_path, store, manifest, say=_say(quiet or as_json))
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return 0
    click.echo(f"{image} ({report.read}): {report.image_files} files and symlinks; {report.package_files} shipped "
               f"by the {report.packages} packages of the lock")
    for title, findings in (("not from any package", report.not_from_packages),
                            ("different from the package", report.changed),
                            ("shipped by a package, not in the image", report.missing)):  # fmt: skip
        click.echo(f"\n{title} ({len(findings)}):")
        dpkg = [f for f in findings if f.detail == DPKG_DATABASE]
        for f in findings:
            if f.detail != DPKG_DATABASE:
                click.echo(f"  {f.path}  {f.detail}")
        if dpkg:
            click.echo(f"  … and {len(dpkg)} files of {DPKG_DATABASE} under /var/lib/dpkg (--json lists them)")
    return 0


@cli.command("check")
@directory_option
@store_option
@click.option("-f", "--format", "fmt", type=click.Choice(["disk", "directory", "tar", "cpio", "oci"]),
              help="Output format to build [default: [Build] Format=].")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Empty directory for the builds (kept) [default: a temporary one, removed].")
@click.option("--variation", "variations", multiple=True,
              help="Only these variations (repeatable): build-path time timezone locale umask hostname "
                   "cpus store environment [default: all].")
@click.option("--no-bisect", is_flag=True, help="Do not look for the variation that makes the builds differ.")
@json_option
@quiet_option
@click.pass_context
@rootless()
def check_command(ctx: click.Context, directory: Path, store_path: Path | None, fmt: str | None, work: Path | None,
                  variations: tuple[str, ...], no_bisect: bool, as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Build the locked image twice under varied environments and compare.

    The second build changes the build directory, the clock, TZ, the locale, the umask, the
    hostname, the CPU count, the store (cold instead of warm), environment variables such
    as SOURCE_DATE_EPOCH and a kept BuildDirectory= (for an empty one). When the outputs
    differ, builds with subsets of the variations find which one causes it, and the diff is
    shown. Exit status: 0 reproducible, 1 not.
    """
    import tempfile

    from reprobuild.check import VARIATIONS, check_reproducible

    chosen = variations or VARIATIONS
    say = _say(quiet or as_json)
    if work is None:
        with tempfile.TemporaryDirectory(prefix="reprobuild-check-") as tmp:
            report = check_reproducible(directory, Path(tmp), fmt, store_path, chosen, not no_bisect, say)
    else:
        report = check_reproducible(directory, work, fmt, store_path, chosen, not no_bisect, say)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        for v in report.variations:
            click.echo(f"{'applied ' if v.applied else 'skipped '} {v.name:<12} {v.detail}")
        for b in report.builds:
            click.echo(f"build {b.label:<8} {b.sha256[:16]}…  {b.seconds:6.1f}s  {', '.join(b.variations) or '-'}")
        if report.reproducible:
            click.echo("reproducible: both builds are bit-for-bit identical")
        else:
            causes = "; ".join(" + ".join(c) for c in report.culprits) or "not bisected"
            click.echo(f"NOT reproducible: caused by {causes}")
            if report.diff_summary:
                click.echo(report.diff_summary)
    ctx.exit(0 if report.reproducible else 1)


@cli.command("sbom")
@directory_option
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Lockfile [default: DIRECTORY/reprobuild.lock].")
@click.option("--format", "fmt", type=click.Choice(["spdx", "cyclonedx"]), default="spdx", show_default=True,
              help="SPDX 2.3 JSON or CycloneDX 1.5 JSON.")
@click.option("--tree", type=click.Path(exists=True, path_type=Path),
              help="A built directory or tar output to read suppliers and licences from.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The built image, whose sha256 the SBOM records.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to FILE [default: standard output].")
def sbom_command(directory: Path, lock_path: Path | None, fmt: str, tree: Path | None, image: Path | None,
                 output: Path | None) -> None:  # fmt: skip
    """Write a software bill of materials for the locked image.

    Every package: name, version, architecture, source package, purl, sha256, supplier and
    licence (with --tree: from dpkg's status and the DEP-5 copyright files), and the image's
    relationships to them. Reproducible: no timestamps but the lock's SOURCE_DATE_EPOCH.
    """
    from reprobuild.fileio import write_atomic
    from reprobuild.lockfile import load_lock
    from reprobuild.sbom import dumps_sbom, make_sbom
    from reprobuild.verify import hash_image

    lock = load_lock(lock_path or directory / "reprobuild.lock")
    sha = hash_image(image, [])[0] if image else None
    data = dumps_sbom(make_sbom(lock, fmt, tree, image.name if image else "image", sha))
    if output:
        write_atomic(output, data)
    else:
        click.echo(data.decode("utf-8"), nl=False)
