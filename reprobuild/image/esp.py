"""A deterministic FAT EFI System Partition image, built without mounting (dosfstools + mtools).

Reproducibility decisions (docs/formats.md §11): ``mkfs.vfat --invariant`` (no clock or random
values) with an explicit volume id and label; explicit FAT type and cluster size instead of the
tool's guess; the image file is created at its final size before formatting; files and
directories are inserted one at a time in sorted order (mtools writes directory entries in
insertion order, and ``mcopy -s`` would follow readdir order); every timestamp is the epoch:
files are staged with mtime = epoch and copied with ``mcopy -m``, directories get their time from
``SOURCE_DATE_EPOCH`` (which ``mmd`` honours), and ``TZ=UTC`` because FAT stores local time.
mtools gets a private empty configuration (``MTOOLSRC=/dev/null``) and ``MTOOLS_SKIP_CHECK=1``.
The programs are found and run by a ``runner`` (``image.fs.ToolRunner``): the host's by default,
or the locked tools tree's (``reprobuild.tools``); the argv is the same either way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from reprobuild.errors import BuildError
from reprobuild.image.fs import HOST, ToolRunner

MiB = 1024 * 1024
MIN_SIZE = 16 * MiB
# mkfs.vfat refuses FAT32 below 65525 clusters; with 512-byte clusters that is ~32 MiB of data.
FAT32_MIN_SIZE = 40 * MiB
CLUSTER_SLACK = 4096  # per file/directory: worst-case cluster rounding plus directory entries


class EspError(BuildError):
    """The ESP could not be built (a file does not fit, a name is invalid, a tool failed)."""


def _tool(runner: ToolRunner, name: str, package: str) -> str:
    return runner.which(name, package, "to build the ESP")


def _env(epoch: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "TZ": "UTC",  # FAT timestamps are local time: pin the zone
        "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": str(epoch),  # mmd stamps new directories with it
        "MTOOLS_SKIP_CHECK": "1",
        "MTOOLSRC": "/dev/null",  # no host or user mtools configuration
    }


def _run(runner: ToolRunner, argv: list[str], env: dict[str, str], paths: Sequence[tuple[Path, bool]]) -> None:
    # Neither the cwd nor the umask reaches the image: the file exists before mkfs.vfat runs.
    code, stdout, stderr = runner.run(argv, env, cwd=paths[-1][0], paths=paths)
    if code:
        raise EspError(f"{Path(argv[0]).name} failed: {stderr.strip() or stdout.strip()}")


def auto_size(sizes: list[int], n_dirs: int) -> int:
    """A comfortable image size for files of ``sizes`` bytes: content + 5% + 2 MiB, whole MiB,
    at least 16 MiB."""
    content = sum(s + CLUSTER_SLACK for s in sizes) + n_dirs * CLUSTER_SLACK
    return max(MIN_SIZE, -(-(content + content // 20 + 2 * MiB) // MiB) * MiB)


def _normalize(path: str) -> PurePosixPath:
    parts = path.lstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise EspError(f"invalid ESP path {path!r}")
    return PurePosixPath(*parts)


def make_esp(
    files: Mapping[str, Path | bytes],
    out: Path,
    size: int | None = None,
    volume_id: int = 0,
    label: str = "ESP",
    epoch: int = 0,
    runner: ToolRunner | None = None,
) -> int:
    """Build a FAT image at ``out`` holding ``files`` ({path in the ESP: source file or bytes}).

    FAT32 from 40 MiB up, FAT16 below. ``size`` None picks ``auto_size``. Returns the image size.
    The result is a pure function of the arguments and the dosfstools/mtools versions. ``runner``
    runs them (default: the host's). Cost: one mtools process per file and directory.
    """
    runner = runner or HOST
    out = Path(out).absolute()
    mkfs, mmd, mcopy = (_tool(runner, "mkfs.vfat", "dosfstools"), _tool(runner, "mmd", "mtools"),
                        _tool(runner, "mcopy", "mtools"))
    if not 0 <= volume_id <= 0xFFFFFFFF:
        raise EspError(f"volume id {volume_id:#x} does not fit 32 bits")
    if not label or len(label) > 11 or not label.isascii():
        raise EspError(f"FAT label {label!r} must be 1-11 ASCII characters")
    entries = {_normalize(k): v for k, v in files.items()}
    dirs = sorted({parent for p in entries for parent in p.parents if parent != PurePosixPath(".")}, key=lambda p: p.as_posix().encode())
    env = _env(epoch)
    with tempfile.TemporaryDirectory(prefix="reprobuild-esp-") as tmp:
        staged: dict[PurePosixPath, Path] = {}
        for i, (dest, source) in enumerate(sorted(entries.items(), key=lambda kv: kv[0].as_posix().encode())):
            stage = Path(tmp) / f"f{i}"
            if isinstance(source, bytes):
                stage.write_bytes(source)
            else:
                stage.write_bytes(Path(source).read_bytes())
            os.utime(stage, (epoch, epoch))  # mcopy -m copies this mtime
            staged[dest] = stage
        total = size if size is not None else auto_size([s.stat().st_size for s in staged.values()], len(dirs))
        fat = ["-F", "32", "-s", "1"] if total >= FAT32_MIN_SIZE else ["-F", "16"]
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.unlink(missing_ok=True)
        paths = ((Path(tmp), False), (out.parent.absolute(), True))
        with tmp_out.open("wb") as f:
            f.truncate(total)
        try:
            _run(runner, [mkfs, "--invariant", "-i", f"{volume_id:08X}", "-n", label.upper(), *fat, str(tmp_out)],
                 env, paths)
            for d in dirs:
                _run(runner, [mmd, "-i", str(tmp_out), f"::/{d.as_posix()}"], env, paths)
            for dest, stage in staged.items():
                _run(runner, [mcopy, "-m", "-i", str(tmp_out), str(stage), f"::/{dest.as_posix()}"], env, paths)
        except BaseException:
            tmp_out.unlink(missing_ok=True)
            raise
        tmp_out.replace(out)
    return total
