"""``reprobuild diff A B``: explain how two images, trees, archives or lockfiles differ.

Exit codes follow diffoscope: 0 identical, 1 different, 2 error (bad or unreadable input).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from reprobuild.cli import cli
from reprobuild.cli.options import rootless
from reprobuild.errors import ReprobuildError


class DiffError(ReprobuildError):
    """Any failure of ``reprobuild diff``: exit status 2, so that 1 always means "different"."""

    exit_code = 2


@cli.command("diff")
@click.argument("first", type=click.Path(path_type=Path))
@click.argument("second", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema reprobuild-diff/1, see docs/diff.md).")
@click.option("--html", "html_file", type=click.Path(path_type=Path), default=None,
              help="Also write one self-contained HTML page to FILE.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Skip members whose path or base name matches this shell pattern (repeatable).")
@click.option("--max-depth", type=click.IntRange(min=0), default=None,
              help="Container levels to unpack (disk=1, file system=2, nested archive=3 …); default: all.")
@click.option("--metadata/--no-metadata", default=True,
              help="Report metadata-only differences (timestamps, UUIDs, order). --no-metadata hides them, "
                   "and exits 0 if nothing else differs.")
@click.option("--color/--no-color", default=None, help="Colour the text output (default: when a terminal).")
@click.pass_context
@rootless(required=False, default_store=False)
def diff_command(ctx: click.Context, first: Path, second: Path, as_json: bool, html_file: Path | None,
                 exclude: tuple[str, ...], max_depth: int | None, metadata: bool, color: bool | None) -> None:
    """Compare FIRST and SECOND and explain every difference.

    \b
    Inputs are recognised by content: GPT disk images (DDIs), erofs/squashfs/ext4/vfat images,
    directories, tar and cpio archives, UKIs, .debs, compressed files, lockfiles, JSON manifests.
    Identical partitions and files are skipped by comparing bytes, never unpacked.
    Each difference is "content" or "metadata" (cosmetic: timestamps, UUIDs, ordering).
    Exit status: 0 identical, 1 different, 2 error.
    """
    from reprobuild.diff.compare import DiffOptions, compare_paths
    from reprobuild.diff.render import render_html, render_json, render_text

    options = DiffOptions(exclude=exclude, max_depth=max_depth, metadata=metadata)
    try:
        result = compare_paths(first, second, options)
    except ReprobuildError as e:
        raise DiffError(e.message, e.hint) from e
    except OSError as e:
        raise DiffError(f"{e.filename or ''}: {e.strerror or e}") from e
    except RecursionError as e:
        raise DiffError("input nested too deeply") from e
    except (MemoryError, Exception) as e:
        import os

        if os.environ.get("REPROBUILD_DEBUG") == "1":
            raise
        raise DiffError(f"internal error while comparing: {type(e).__name__}: {e}",
                        "set REPROBUILD_DEBUG=1 for a traceback and report it") from e
    if html_file is not None:
        html_file.write_text(render_html(result), encoding="utf-8")
    if as_json:
        click.echo(render_json(result), nl=False)
    else:
        use_colour = sys.stdout.isatty() if color is None else color
        click.echo(render_text(result, click.style if use_colour else _plain), nl=False, color=use_colour)
    ctx.exit(0 if result.identical else 1)


def _plain(text: str, **_: object) -> str:
    return text
