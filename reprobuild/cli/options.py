"""Options shared by several commands."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
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


def build_source_options(command: Callable) -> Callable:
    """Where a build's packages come from and whether its cache is used (build, release)."""
    for option in reversed((
        click.option("--offline", is_flag=True, help="Use only the store; fail listing what is missing."),
        click.option("-j", "--jobs", type=click.IntRange(1, 64), default=4, show_default=True,
                     help="Parallel downloads."),
        click.option("--substituter", "substituters", multiple=True, metavar="URL",
                     help="Extra binary cache (another store served over HTTP); may repeat."),
        click.option("--no-cache", "no_cache", is_flag=True,
                     help="Build every stage from scratch: no cache lookups and no cache saves."),
    )):  # fmt: skip
        command = option(command)
    return command


def rootless(*, required: bool | Callable[[dict], bool] = True, default_store: bool = True):
    """Run the command as root of a user namespace when an ordinary user invokes it (see
    :mod:`reprobuild.userns`): the process forks, the child carries on with the command inside,
    the parent exits with the child's status. ``required=False`` (or a function of the command's
    arguments returning False): without the prerequisites the command runs as it is (e.g.
    ``diff``, which then does not compare owners; ``verify --no-rebuild``). The store the
    command will use must be the user's own (``default_store``: the command falls back to the
    default store when ``--store`` is absent). Place it below the click decorators."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            if os.geteuid() != 0:
                from reprobuild import userns
                from reprobuild.store import Store

                try:
                    plan = userns.plan()
                except userns.RootlessUnavailable:
                    if required(kwargs) if callable(required) else required:
                        raise
                    return command(*args, **kwargs)
                store = kwargs.get("store_path") or (Store.default_root() if default_store else None)
                if store is not None and "store_path" in kwargs:
                    userns.check_private_store(Path(store).absolute(), plan)
                status = userns.enter(plan)
                if status is not None:
                    raise click.exceptions.Exit(status)
            return command(*args, **kwargs)

        return wrapper

    return decorate


def registry_options(command: Callable) -> Callable:
    """How to reach an OCI registry (publish, verify REFERENCE): TLS, CA, credentials."""
    for option in reversed((
        click.option("--insecure", is_flag=True,
                     help="Allow plain HTTP and unverified TLS to a registry that is not on a loopback address."),
        click.option("--ca-cert", type=click.Path(dir_okay=False, path_type=Path),
                     help="CA certificate (PEM) the registry's TLS certificate must chain to "
                          "[default: the system's, or REQUESTS_CA_BUNDLE]."),
        click.option("--username", help="Registry user name (with --password-stdin) [default: from "
                                         "REGISTRY_AUTH_FILE or ~/.docker/config.json]."),
        click.option("--password-stdin", is_flag=True, help="Read the registry password from standard input."),
    )):  # fmt: skip
        command = option(command)
    return command


def registry_client(reference: str, kwargs: dict, push: bool = False):
    """The parsed reference and its client from the :func:`registry_options` (popped from ``kwargs``)."""
    import sys

    from reprobuild.registry.client import open_client

    password = sys.stdin.readline().rstrip("\r\n") if kwargs.pop("password_stdin") else None
    return open_client(reference, os.environ, insecure=kwargs.pop("insecure"), ca_cert=kwargs.pop("ca_cert"),
                       username=kwargs.pop("username"), password=password, push=push)  # fmt: skip
