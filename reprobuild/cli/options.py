"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

directory_option = click.option(
    "-C",
    "--directory",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Image directory holding reprobuild.conf (and reprobuild.conf.d/).",
)

store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="REPROBUILD_STORE",
    default=None,
    help="Content-addressed store [default: $XDG_CACHE_HOME/reprobuild/store; env REPROBUILD_STORE].",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")

quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
