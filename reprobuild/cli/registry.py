"""``reprobuild publish``: push an output with its lock, SBOMs and provenance to an OCI registry."""

from __future__ import annotations

import json
from pathlib import Path

import click

from reprobuild.cli import cli
from reprobuild.cli.options import json_option, quiet_option, registry_client, registry_options


@cli.command("publish")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("reference")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The lock the output was built from (its .sig beside it) [default: OUTPUT_DIR/../reprobuild.lock].")
@registry_options
@json_option
@quiet_option
def publish_command(output_dir: Path, reference: str, lock_path: Path | None, as_json: bool, quiet: bool,
                    **registry: object) -> None:  # fmt: skip
    """Push the image in OUTPUT_DIR to REFERENCE (registry[:port]/repository[:tag]).

    \b
    An oci output (image.oci.tar) is pushed as an OCI image (its index tagged),
    a DDI (image.raw) as an artifact of type application/vnd.reprobuild.ddi.v1
    with its build manifest. Attached to it as referrers (OCI 1.1 subject): the
    signed lock with the build manifest, the SBOM (SPDX and CycloneDX) and the
    in-toto provenance. A registry without the referrers API gets the OCI 1.1
    fallback tag sha256-<hex>. Prints the pushed reference with its digest.
    """
    from reprobuild.progress import make_reporter
    from reprobuild.publish import publish

    ref, client = registry_client(reference, registry, push=True)
    say = make_reporter(quiet or as_json)
    try:
        result = publish(output_dir, ref, lock_path or output_dir.absolute().parent / "reprobuild.lock", client, say)
    finally:
        say.close()
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    click.echo(f"pushed {result.reference}")
    where = "referrers API" if result.referrers_api else "fallback tag sha256-…"
    for p in result.referrers:
        if not quiet:
            click.echo(f"  attached {p.artifact_type} {p.digest} ({where})")
