"""Deterministic file system images from a directory tree (erofs, squashfs, ext4, vfat).

Each builder calls the Debian tool with every option that could otherwise leak the build host
or the clock pinned down, in a scrubbed environment (``LC_ALL=C.UTF-8``, ``TZ=UTC``, umask 022,
``SOURCE_DATE_EPOCH``, a private cwd). Owners, modes, hard links and xattrs (security.capability)
are kept as in the tree; **every timestamp becomes ``epoch``** (docs/formats.md §11). The tree is
expected to be normalised already (rootfs/); this module only guarantees that the same tree gives
the same bytes. Output sizes are multiples of 4096.

Cost: one run of the mkfs tool (plus, for ext4, one debugfs pass over the used inodes; for
vfat one mtools call per directory). A tree walk sizes ext4/vfat images.

Where the tools come from is a :class:`ToolRunner`: :data:`HOST` runs the host's programs (the
default), ``reprobuild.tools.TreeRunner`` runs the locked tools tree's in the sandbox. The
argv and environment are the same either way; a runner only finds, versions and runs programs.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from reprobuild.errors import BuildError, ToolMissing

BLOCK = 4096


class FsKind(enum.Enum):
    EROFS = "erofs"
    SQUASHFS = "squashfs"
    EXT4 = "ext4"
    VFAT = "vfat"


class FilesystemError(BuildError):
    """A mkfs tool failed; the message carries its command line and last output lines."""


@dataclass(frozen=True)
class FsResult:
    """What made the image: for the manifest and for ``reprobuild verify`` to explain differences."""

    kind: FsKind
    tool: str
    version: str
    argv: tuple[str, ...]
    size: int


# Debian packages providing each tool, for ToolMissing hints.
_PACKAGES = {"mkfs.erofs": "erofs-utils", "mksquashfs": "squashfs-tools", "mke2fs": "e2fsprogs",
             "debugfs": "e2fsprogs", "dumpe2fs": "e2fsprogs", "mkfs.fat": "dosfstools",
             "mcopy": "mtools", "mmd": "mtools"}  # fmt: skip

# Reproducibility: mke2fs reads /etc/mke2fs.conf, which differs between hosts and releases. We
# hand it this fixed profile instead (Debian 12's ext4 defaults), via MKE2FS_CONFIG.
_MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""


class ToolRunner(Protocol):
    """Finds, versions and runs the file system tools (see the module docstring)."""

    def which(self, tool: str, package: str | None = None, purpose: str = "") -> str:
        """The program to put in argv[0]; raises ToolMissing."""
        ...

    def version(self, tool: str) -> str:
        """The version of the Debian package shipping ``tool`` (for the manifest)."""
        ...

    def run(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: Path,
            paths: Sequence[tuple[Path, bool]] = (), input: str | None = None) -> tuple[int, str, str]:
        """Run ``argv`` with exactly ``env``; ``paths`` are the (host directory, writable) pairs the
        argv and env name. Returns (exit status, stdout, stderr)."""
        ...


@dataclass(frozen=True)
class HostRunner:
    """The host's tools, run as plain subprocesses (umask 022, a private cwd)."""

    def which(self, tool: str, package: str | None = None, purpose: str = "to build file system images") -> str:
        exe = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if exe is None:
            raise ToolMissing(tool, package or _PACKAGES.get(tool), purpose)
        return exe

    def version(self, tool: str) -> str:
        return tool_version(tool)

    def run(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: Path,
            paths: Sequence[tuple[Path, bool]] = (), input: str | None = None) -> tuple[int, str, str]:
        r = subprocess.run(list(argv), check=False, env=dict(env), cwd=cwd, umask=0o022, input=input,
                           capture_output=True, text=True, errors="replace")  # fmt: skip
        return r.returncode, r.stdout, r.stderr


HOST = HostRunner()


def _which(tool: str) -> str:
    return HOST.which(tool)


def _env(epoch: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A scrubbed environment: nothing from the caller's locale, time zone or config leaks in."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TZ": "UTC",
           "SOURCE_DATE_EPOCH": str(epoch)}  # fmt: skip
    env.update(extra or {})
    return env


def _run(argv: Sequence[str], env: dict[str, str], cwd: Path, input: str | None = None, *,
         runner: ToolRunner = HOST, paths: Sequence[tuple[Path, bool]] = ()) -> str:
    try:
        code, stdout, stderr = runner.run(argv, env, cwd=cwd, paths=paths, input=input)
    except OSError as e:
        raise FilesystemError(f"cannot run {argv[0]}: {e}") from e
    if code != 0:
        tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])
        raise FilesystemError(f"{Path(argv[0]).name} failed (exit {code}): {tail}")
    return stdout + stderr


def tool_version(tool: str) -> str:
    """Version of the Debian package that ships ``tool`` (e.g. ``1.5-1``), else what the tool says.

    The package version is the precise one (it includes Debian patches); mkfs.erofs 1.5 has no
    version option at all.
    """
    exe = _which(tool)
    pkg = _PACKAGES.get(tool)
    dpkg = shutil.which("dpkg-query")
    if pkg and dpkg:
        r = subprocess.run([dpkg, "-W", "-f", "${Version}", pkg], check=False, capture_output=True, text=True, env=_env(0))
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    probes = {"mksquashfs": ["-version"], "mke2fs": ["-V"], "mkfs.fat": ["--help"]}
    r = subprocess.run([exe, *probes.get(tool, ["--version"])], check=False, capture_output=True, text=True,
                       env=_env(0), errors="replace")  # fmt: skip
    m = re.search(r"(?:mksquashfs version|mke2fs|mkfs\.fat)\s+([0-9][^\s(]*)", r.stdout + r.stderr)
    return m.group(1) if m else "unknown"


# -- tree statistics (for sizing ext4 and vfat) ---------------------------------------------------


@dataclass(frozen=True)
class TreeStats:
    inodes: int
    data_bytes: int  # file contents rounded up to 4 KiB, directories and long symlinks included
    dirs: int


def walk_sorted(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Depth-first walk in byte order of names (no symlink following); yields (path, lstat)."""
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for e in entries:
            st = e.stat(follow_symlinks=False)
            yield Path(e.path), st
        stack.extend(Path(e.path) for e in reversed(entries) if e.is_dir(follow_symlinks=False))


def tree_stats(root: Path) -> TreeStats:
    seen: set[tuple[int, int]] = set()
    inodes, data, dirs = 1, BLOCK, 1
    for _, st in walk_sorted(root):
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        inodes += 1
        if stat.S_ISDIR(st.st_mode):
            dirs += 1
            data += BLOCK
        elif stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size > 59):
            data += -(-st.st_size // BLOCK) * BLOCK
    return TreeStats(inodes, data, dirs)


# -- builders ------------------------------------------------------------------------------------


def _erofs(tree: Path, out: Path, fs_uuid: uuid.UUID, epoch: int, label: str, work: Path,
           runner: ToolRunner = HOST) -> list[str]:
    # -T fixes the build time and every inode time; -U the UUID. Directory entries are sorted by
    # the format itself. Owners and xattrs are kept (no --all-root, xattrs on by default).
    # erofs-utils 1.5 has no volume label option: the label lives in the GPT only.
    # No compression: the verity-protected image is read in place and compresses poorly anyway;
    # it also avoids depending on the compressor's version.
    argv = [runner.which("mkfs.erofs"), "--quiet", f"-U{fs_uuid}", f"-T{epoch}", str(out), str(tree)]
    _run(argv, _env(epoch), work, runner=runner, paths=((tree, False), (work, True)))
    return argv


def _squashfs(tree: Path, out: Path, fs_uuid: uuid.UUID, epoch: int, label: str, work: Path,
              runner: ToolRunner = HOST) -> list[str]:
    # -reproducible (the default in 4.5, but stated) orders fragments independently of thread
    # timing; -mkfs-time/-all-time replace every timestamp. squashfs has no UUID and no label.
    argv = [runner.which("mksquashfs"), str(tree), str(out), "-noappend", "-quiet", "-no-progress",
            "-reproducible", "-mkfs-time", str(epoch), "-all-time", str(epoch),
            "-comp", "zstd", "-xattrs"]  # fmt: skip
    # mksquashfs >= 4.5 refuses SOURCE_DATE_EPOCH together with the explicit time options, and the
    # explicit options also pin versions that ignore the variable: drop it from the environment.
    env = _env(epoch)
    del env["SOURCE_DATE_EPOCH"]
    _run(argv, env, work, runner=runner, paths=((tree, False), (work, True)))
    return argv


def _ext4_used_inodes(image: Path, env: dict[str, str], work: Path, runner: ToolRunner = HOST) -> list[int]:
    """Inode numbers marked in use, from dumpe2fs's per-group free-inode ranges."""
    text = _run([runner.which("dumpe2fs"), str(image)], env, work, runner=runner, paths=((work, True),))
    ipg = int(re.search(r"^Inodes per group:\s+(\d+)", text, re.MULTILINE).group(1))
    first = int(re.search(r"^First inode:\s+(\d+)", text, re.MULTILINE).group(1))
    used: list[int] = []
    for g, m in enumerate(re.finditer(r"^\s+Free inodes: ?(.*)$", text, re.MULTILINE)):
        free: set[int] = set()
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            a, _, b = part.partition("-")
            free.update(range(int(a), int(b or a) + 1))
        lo = g * ipg + 1
        used.extend(i for i in range(lo, lo + ipg) if i not in free and (i == 2 or i >= first))
    return used


def _ext4(tree: Path, out: Path, fs_uuid: uuid.UUID, epoch: int, label: str, work: Path,
          read_only: bool = True, runner: ToolRunner = HOST) -> list[str]:  # fmt: skip
    conf = work / "mke2fs.conf"
    conf.write_text(_MKE2FS_CONF)
    # E2FSPROGS_FAKE_TIME pins the superblock/inode creation times (non-zero: 0 means "unset").
    env = _env(epoch, {"MKE2FS_CONFIG": str(conf), "E2FSPROGS_FAKE_TIME": str(max(epoch, 1))})
    st = tree_stats(tree)
    inodes = st.inodes + st.inodes // 10 + 64
    size = st.data_bytes + st.data_bytes // 5 + inodes * 256 + (8 << 20)
    features = "^has_journal,^resize_inode" if read_only else "^resize_inode"
    for _attempt in range(4):
        size = -(-size // (1 << 20)) * (1 << 20)
        if out.exists():
            out.unlink()
        # hash_seed=UUID: htree hashes would otherwise use a random seed. root_owner=0:0: the
        # root directory would otherwise belong to the calling user. nodiscard: a regular file.
        argv = [runner.which("mke2fs"), "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", "256",
                "-N", str(inodes), "-O", features, "-U", str(fs_uuid), "-L", label[:16],
                "-E", f"hash_seed={fs_uuid},root_owner=0:0,nodiscard,lazy_itable_init=0",
                "-d", str(tree), str(out), f"{size // 1024}k"]  # fmt: skip
        try:
            _run(argv, env, work, runner=runner, paths=((tree, False), (work, True)))
            break
        except FilesystemError as e:
            if "space" not in str(e).lower() and "allocate" not in str(e).lower():
                raise
            size += size // 2  # deterministic growth: depends only on the tree
    else:
        raise FilesystemError(f"mke2fs could not fit {tree} even into {size} bytes")
    # mke2fs -d copies atime/ctime from the source inodes, and ctime cannot be set from user
    # space: rewrite all inode times to the epoch with debugfs (inode numbers, so no path quoting).
    script = "".join(f"sif <{n}> {field} @{epoch}\n" for n in _ext4_used_inodes(out, env, work, runner)
                     for field in ("atime", "ctime", "mtime", "crtime"))  # fmt: skip
    (work / "times.debugfs").write_text(script)
    _run([runner.which("debugfs"), "-w", "-f", str(work / "times.debugfs"), str(out)], env, work,
         runner=runner, paths=((work, True),))
    return argv


def _vfat(tree: Path, out: Path, fs_uuid: uuid.UUID, epoch: int, label: str, work: Path,
          runner: ToolRunner = HOST) -> list[str]:
    env = _env(epoch, {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"})
    st = tree_stats(tree)
    size = max(st.data_bytes + st.data_bytes // 10 + st.inodes * 4096 + (2 << 20), 34 << 20)
    size = -(-size // (1 << 20)) * (1 << 20)
    # The volume id is the first 32 bits of the (seed-derived) UUID; --invariant fixes the rest.
    volid = fs_uuid.hex[:8]
    argv = [runner.which("mkfs.fat"), "--invariant", "-i", volid, "-n", (label or "NO NAME")[:11].upper(),
            "-S", "512", "-C", str(out), str(size // 1024)]  # fmt: skip
    paths = ((tree, False), (work, True))
    _run(argv, env, work, runner=runner, paths=paths)
    # mtools stamps files with SOURCE_DATE_EPOCH (no -m, so not the source mtimes). Directory
    # entries are added in sorted order, one directory at a time, so FAT order is reproducible.
    mmd, mcopy = runner.which("mmd"), runner.which("mcopy")
    dirs: list[str] = []
    files: dict[str, list[str]] = {"": []}
    for path, s in walk_sorted(tree):
        rel = path.relative_to(tree).as_posix()
        parent = path.parent.relative_to(tree).as_posix()
        parent = "" if parent == "." else parent
        if stat.S_ISDIR(s.st_mode):
            dirs.append(rel)
            files[rel] = []
        elif stat.S_ISREG(s.st_mode):
            files[parent].append(str(path))
        else:
            raise FilesystemError(f"vfat cannot store {rel}: only files and directories are allowed")
    for d in sorted(dirs, key=lambda p: p.encode()):
        _run([mmd, "-i", str(out), f"::/{d}"], env, work, runner=runner, paths=paths)
    for d in sorted(files, key=lambda p: p.encode()):
        if files[d]:
            _run([mcopy, "-i", str(out), "-o", *files[d], f"::/{d}/" if d else "::/"], env, work, runner=runner,
                 paths=paths)
    return argv


_BUILDERS = {FsKind.EROFS: _erofs, FsKind.SQUASHFS: _squashfs, FsKind.VFAT: _vfat}
_TOOLS = {FsKind.EROFS: "mkfs.erofs", FsKind.SQUASHFS: "mksquashfs", FsKind.EXT4: "mke2fs",
          FsKind.VFAT: "mkfs.fat"}  # fmt: skip


def make_filesystem(kind: FsKind | str, tree: Path, out: Path, uuid: uuid.UUID, epoch: int,
                    label: str, *, read_only: bool = True, runner: ToolRunner | None = None) -> FsResult:  # fmt: skip
    """Build a ``kind`` image of ``tree`` at ``out`` (written under a temporary name, then renamed).

    ``uuid`` is the file system UUID (repart's ``fs_uuid``), ``epoch`` the SOURCE_DATE_EPOCH that
    every timestamp becomes, ``label`` the volume label where the format has one. ``read_only``
    drops the ext4 journal. ``runner`` runs the tools (default :data:`HOST`). The result is padded
    with zeros to a multiple of 4096 bytes. Raises ToolMissing, FilesystemError.
    """
    runner = runner or HOST
    kind = FsKind(kind)
    tree = Path(tree).resolve()
    out = Path(out).absolute()
    if not tree.is_dir():
        raise FilesystemError(f"{tree} is not a directory")
    if epoch < 0:
        raise ValueError("epoch must not be negative")
    tool = _TOOLS[kind]
    version = runner.version(tool)
    with tempfile.TemporaryDirectory(prefix=".mkfs-", dir=out.parent) as tmp:
        work = Path(tmp)
        tmp_out = work / "fs.img"
        if kind is FsKind.EXT4:
            argv = _ext4(tree, tmp_out, uuid, epoch, label, work, read_only, runner)
        else:
            argv = _BUILDERS[kind](tree, tmp_out, uuid, epoch, label, work, runner)
        size = -(-tmp_out.stat().st_size // BLOCK) * BLOCK
        os.truncate(tmp_out, size)
        os.replace(tmp_out, out)
    # The argv names temporary paths: record it with the placeholders a reader can understand.
    shown = (tool,) + tuple("OUTPUT" if a == str(tmp_out) else "TREE" if a == str(tree) else a for a in argv[1:])
    return FsResult(kind, tool, version, shown, size)
