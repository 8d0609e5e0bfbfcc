"""``reprobuild unshare``: a command as root of the user namespace rootless builds use."""

from __future__ import annotations

import os

import click

from reprobuild.cli import cli
from reprobuild.cli.options import rootless
from reprobuild.errors import UsageError


@cli.command("unshare", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@rootless(default_store=False)
def unshare_command(command: tuple[str, ...]) -> None:
    """Run COMMAND (default: $SHELL) as root of the user namespace rootless builds run in.

    \b
    There the files a rootless build made (the store's extracted trees, a directory
    output, what an interrupted build left) have the owners the image gives them, and
    you may read, change or remove them, e.g.:
      reprobuild unshare rm -rf ~/.cache/reprobuild
    As root, COMMAND simply runs. Exit status: COMMAND's.
    """
    argv = list(command) or [os.environ.get("SHELL") or "/bin/sh"]
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise UsageError(f"cannot run {argv[0]}: {e.strerror}") from e
