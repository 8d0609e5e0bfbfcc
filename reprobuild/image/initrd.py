"""Initrd images: a deterministic newc cpio of a tree, zstd-compressed; kernel module selection.

The kernel unpacks zstd-compressed cpio (CONFIG_RD_ZSTD, enabled in Debian's kernels).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import zstandard

from reprobuild.errors import BuildError, FormatError
from reprobuild.image.cpio import cpio_from_tree

# Reproducibility: zstd output is a pure function of (input, parameters, library version). We
# fix the level, use single-threaded mode (threads=0: multi-threaded zstd splits the input into
# jobs and its frames differ from single-threaded output), always write the content size and a
# checksum, and never use a dictionary. zstandard bundles its own libzstd, so the version is the
# Python package's (pinned by the lock of the build environment).
ZSTD_LEVEL = 9
# Levels up to 19 use at most an 8 MiB window (window_log 23); the kernel's initramfs decompressor
# allocates the window the frame header asks for, and Debian's mkinitramfs uses zstd as well.

# Enough to find and verify a DPS root in common VMs and PCs: device-mapper verity, the root
# file systems we build, virtio/NVMe/AHCI/USB disks, the ESP (vfat + code pages), loop, overlay.
DEFAULT_ROOT_MODULES = (
    "dm-verity", "dm-mod", "erofs", "squashfs", "ext4", "virtio_blk", "virtio_scsi", "virtio_pci",
    "nvme", "ahci", "sd_mod", "usb-storage", "vfat", "nls_cp437", "nls_iso8859-1", "loop", "overlay",
)  # fmt: skip
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class ModuleMissing(BuildError):
    """A wanted kernel module is neither a module nor built into the kernel."""


def compress_zstd(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    """Deterministic single-frame zstd compression (see ZSTD_LEVEL above); cost O(len(data))."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), threads=0, write_checksum=True, write_content_size=True
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def make_initrd_cpio(tree: Path, out: Path, epoch: int, compress: bool = True) -> None:
    """Write ``tree`` as a newc cpio (owners 0:0, mtimes = ``epoch``, sorted), zstd-compressed.

    Holds the uncompressed archive in memory (initrds are tens of MiB at most). Writes to a
    temporary name, then renames, so a half-written initrd never appears under ``out``.
    """
    buf = io.BytesIO()
    cpio_from_tree(tree, buf, mtime=epoch)
    data = compress_zstd(buf.getvalue()) if compress else buf.getvalue()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)


def module_name(path: str) -> str:
    """Canonical module name: basename without suffix, ``-`` and ``_`` equivalent (as modprobe)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep → {name: (relative path, [relative paths of direct dependencies])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, deps = line.partition(":")
        if not sep or not path.strip():
            raise FormatError(f"modules.dep:{lineno}: expected 'module: dependencies', got {line!r}")
        table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def select_kernel_modules(modules_dir: Path, wanted: Iterable[str] = DEFAULT_ROOT_MODULES) -> list[Path]:
    """Files of ``wanted`` modules and everything they depend on (modules.dep closure).

    Order: dependencies before dependents (the order ``insmod`` needs), ties broken by the order of
    ``wanted``; each file once. Modules listed in ``modules.builtin`` are skipped silently (they
    need no file). Raises ModuleMissing for a name found in neither; FormatError for a bad
    modules.dep. Cost O(size of modules.dep).
    """
    deps = parse_modules_dep((modules_dir / "modules.dep").read_text())
    builtin_file = modules_dir / "modules.builtin"
    builtin = {module_name(line.strip()) for line in builtin_file.read_text().splitlines()} if builtin_file.exists() else set()
    by_path = {path: name for name, (path, _) in deps.items()}
    result: list[str] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise FormatError(f"modules.dep: dependency cycle {' -> '.join((*chain, name))}")
        path, dependencies = deps[name]
        for dep_path in dependencies:
            dep = by_path.get(dep_path, module_name(dep_path))
            if dep not in deps:
                raise FormatError(f"modules.dep: {path} depends on {dep_path}, which has no entry")
            visit(dep, (*chain, name))
        done.add(name)
        result.append(path)

    # Soft dependencies (modules.softdep, "softdep libcrc32c pre: crc32c") name modules a module
    # needs at run time without linking against them: libcrc32c, and so erofs and ext4, fail to
    # load without a crc32c implementation. They may be aliases; every module an alias names is
    # taken, as modprobe would try them all.
    softdeps = parse_modules_softdep((modules_dir / "modules.softdep").read_text()) \
        if (modules_dir / "modules.softdep").exists() else {}
    aliases = parse_modules_alias((modules_dir / "modules.alias").read_text()) \
        if (modules_dir / "modules.alias").exists() else {}
    queue = [module_name(raw) for raw in wanted]
    seen: set[str] = set()
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name in deps:
            visit(name, ())
            closure = [by_path.get(p, module_name(p)) for p in result]
            for dep in closure:
                for soft in softdeps.get(dep, ()):
                    targets = [soft] if soft in deps else aliases.get(soft, [])
                    queue.extend(t for t in targets if t in deps and t not in seen)
        elif name in aliases:
            queue.extend(t for t in aliases[name] if t in deps and t not in seen)
        elif name not in builtin:
            raise ModuleMissing(f"kernel module {name!r} is neither in {modules_dir}/modules.dep nor built in",
                                hint="check the module name (modinfo) or the kernel package")  # fmt: skip
    return [modules_dir / p for p in result]


_VERSION_RE = re.compile(r"^\d+\.\d+")


def find_kernel_version(modules_root: Path) -> str:
    """The single kernel version directory under ``lib/modules`` (error if none or several)."""
    versions = sorted(p.name for p in modules_root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))
    if len(versions) != 1:
        raise BuildError(f"expected exactly one kernel under {modules_root}, found {versions or 'none'}")
    return versions[0]


def parse_modules_softdep(text: str) -> dict[str, tuple[str, ...]]:
    """``softdep NAME pre: A B post: C`` lines → {name: (A, B, C)} (names normalised)."""
    result: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        result[module_name(words[1])] = tuple(module_name(w) for w in words[2:] if not w.endswith(":"))
    return result


def parse_modules_alias(text: str) -> dict[str, list[str]]:
    """Exact (wildcard-free) ``alias NAME MODULE`` lines → {name: [modules…]} in file order."""
    result: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) != 3 or words[0] != "alias" or any(c in words[1] for c in "*?["):
            continue
        result.setdefault(module_name(words[1]), []).append(module_name(words[2]))
    return result
