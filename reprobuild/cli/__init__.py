"""The ``reprobuild`` command line: argument parsing, rendering and exit codes only.

Each command group lives in its own module under ``reprobuild/cli/`` and registers itself on the
``cli`` group below. Library code raises :class:`reprobuild.errors.ReprobuildError` subclasses;
:func:`main` is the one place that turns them into a one-line message and an exit code.
Set ``REPROBUILD_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from reprobuild import __version__
from reprobuild.errors import ReprobuildError, describe_os_error, disk_full_note

# Command modules, imported for their side effect of registering commands on ``cli``.
COMMAND_MODULES = (
    "lock",
    "keygen",
    "store",
    "build",
    "image",
    "run",
    "diff",
    "verify",
    "registry",
    "unshare",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="reprobuild")
def cli() -> None:
    """Build bit-for-bit reproducible, verifiable Debian disk images.

    \b
    Typical use:
      reprobuild keygen --out keys/lock        # once: an ed25519 key for signing locks
      reprobuild lock -C myimage               # resolve and pin every package
      reprobuild fetch -C myimage              # fill the store from the lock
      reprobuild build -C myimage --locked     # build image.raw from the lock alone
      reprobuild diff a.raw b.raw              # explain how two images differ
    """


# The module that registers each command: main() imports only the one the command line names
# (all of them cost ~0.1 s of imports, a good part of a warm ``lock``); no command, --help or
# an unknown name imports them all. tests/test_cli_run.py checks this against the modules.
COMMANDS = {
    "lock": "lock", "keygen": "keygen", "store": "store", "fetch": "store", "build": "build",
    "release": "build", "vm": "run", "boot": "run", "shell": "run", "diff": "diff", "verify": "verify",
    "check": "verify", "sbom": "verify", "publish": "registry", "unshare": "unshare",
}  # fmt: skip


def _register_commands(modules: tuple[str, ...] = COMMAND_MODULES) -> None:
    for name in modules:
        try:
            importlib.import_module(f"reprobuild.cli.{name}")
        except ModuleNotFoundError as e:
            # A command module that does not exist yet is simply not offered.
            if e.name != f"reprobuild.cli.{name}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning library errors into one-line messages."""
    args = sys.argv[1:] if argv is None else argv
    named = next((a for a in args if not a.startswith("-")), None)  # the group takes no option values
    _register_commands((COMMANDS[named],) if named in COMMANDS else COMMAND_MODULES)
    debug = os.environ.get("REPROBUILD_DEBUG") == "1"
    try:
        exit_code = cli.main(args=argv, prog_name="reprobuild", standalone_mode=False)
    except ReprobuildError as e:
        if debug:
            raise
        note = disk_full_note(e)
        message = e.format_message()
        if note:  # on the first line, which names what failed
            first, newline, rest = message.partition("\n")
            message = f"{first} ({note}){newline}{rest}"
        click.secho(f"error: {message}", fg="red", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        if debug:
            raise
        click.secho(f"error: {describe_os_error(e)}", fg="red", err=True)
        sys.exit(1)
    # A command may return (or ctx.exit with) a status, such as diff's 1 for "different".
    if isinstance(exit_code, int) and exit_code != 0:
        sys.exit(exit_code)
