"""Run a built Discoverable Disk Image as a container with ``systemd-nspawn --image=``.

Three pieces, the first two pure:

* ``inspect_ddi`` reads what nspawn will need from the image itself (GPT partition roles, the
  root file system's magic, verity partitions, the ESP) and the root hash from the files beside it;
* ``missing_requirements`` compares that with ``HostFacts`` (what the running kernel and system
  offer, gathered by ``probe_host``) and names everything that is missing, so that a host without
  device-mapper, vfat or udev gets one clear sentence instead of nspawn's "Failed to dissect image";
* ``build_nspawn_argv`` writes the command line; ``run_nspawn`` checks and runs it.

The image is never written: nspawn opens it read-only (``--read-only``) and ``/var`` is a
fresh tmpfs (``--volatile=state``), as the kernel command line ``systemd.volatile=state`` does
for the same image booted in a VM.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reprobuild.errors import FormatError, ReprobuildError, ToolMissing
from reprobuild.image import gpt, ids

NSPAWN = "systemd-nspawn"
ROOT_HASH_RE = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")  # sha256 or sha512 verity root hash, hex

# File system magics at the start of a partition (the same offsets blkid uses):
EROFS_MAGIC = (1024, (0xE0F5E1E2).to_bytes(4, "little"))  # erofs_fs.h: EROFS_SUPER_OFFSET, EROFS_SUPER_MAGIC_V1
SQUASHFS_MAGIC = (0, b"hsqs")  # squashfs_fs.h: SQUASHFS_MAGIC, little-endian
EXT4_MAGIC = (1024 + 0x38, (0xEF53).to_bytes(2, "little"))  # ext4 superblock s_magic
FS_MAGICS = {"erofs": EROFS_MAGIC, "squashfs": SQUASHFS_MAGIC, "ext4": EXT4_MAGIC}

DATA_ROLES = (ids.Role.ROOT, ids.Role.USR)
VERITY_ROLES = (ids.Role.ROOT_VERITY, ids.Role.USR_VERITY)
SIGNATURE_ROLES = (ids.Role.ROOT_VERITY_SIG, ids.Role.USR_VERITY_SIG)


class NotADdi(FormatError):
    """The file is not a Discoverable Disk Image systemd-nspawn could dissect."""


class HostCannotRun(ReprobuildError):
    """This host lacks something systemd-nspawn needs to run the image."""


# ---- the image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DdiFacts:
    """What running ``path`` with nspawn depends on. ``root_fs`` is None when the data partition
    holds no file system we recognise; ``root_hash`` comes from the files beside the image."""

    path: Path
    layout: str  # "root" or "usr": which DPS data partition the image has
    architecture: ids.Architecture
    root_fs: str | None
    verity: bool
    verity_signature: bool
    esp: bool
    root_hash: str | None


def fs_kind(head: bytes) -> str | None:
    """The file system whose magic starts ``head`` (≥ 1090 bytes of a partition), or None."""
    for name, (offset, magic) in FS_MAGICS.items():
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def sidecar_root_hash(image: Path) -> str | None:
    """The verity root hash recorded beside ``image``: ``NAME.roothash`` (what ``build`` writes
    and what systemd itself looks for), else the ``root_hash`` of ``IMAGE.manifest.json``.
    A present but malformed file is an error, never silently ignored."""
    roothash = image.with_name(image.stem + ".roothash")
    if roothash.is_file():
        value = roothash.read_text().strip().lower()
        if not ROOT_HASH_RE.fullmatch(value):
            raise NotADdi(f"{roothash}: not a verity root hash (expected 64 or 128 hex digits)")
        return value
    manifest = image.with_name(image.name + ".manifest.json")
    if manifest.is_file():
        try:
            value = json.loads(manifest.read_text()).get("root_hash")
        except (ValueError, AttributeError) as e:
            raise NotADdi(f"{manifest}: not a reprobuild manifest ({e})") from e
        if value is not None:
            if not isinstance(value, str) or not ROOT_HASH_RE.fullmatch(value):
                raise NotADdi(f"{manifest}: root_hash is not a verity root hash")
            return value
    return None


def inspect_ddi(image: Path) -> DdiFacts:
    """Read the GPT of ``image`` and classify its partitions by DPS type. Raises ``NotADdi`` for
    anything that is not a valid GPT disk with a root or /usr partition. Reads the partition
    table and 4 KiB of the data partition."""
    try:
        disk = gpt.read_gpt_path(image)
    except gpt.GptInvalid as e:
        raise NotADdi(f"{image} is not a Discoverable Disk Image: {e.message}",
                      hint="build one with Format=disk (reprobuild build -f disk)") from e  # fmt: skip
    roles: dict[ids.Role, tuple[gpt.GptPartition, ids.PartitionType]] = {}
    for part in disk.partitions:
        ptype = ids.type_by_guid(part.type_guid)
        if ptype is not None and ptype.role not in roles:
            roles[ptype.role] = (part, ptype)
    data = next((roles[r] for r in DATA_ROLES if r in roles), None)
    if data is None:
        raise NotADdi(f"{image} has no root or /usr partition of a Discoverable Partitions type",
                      hint="systemd-nspawn --image= finds the root by its GPT type GUID")  # fmt: skip
    part, ptype = data
    assert ptype.architecture is not None  # root/usr types are always per architecture
    with open(image, "rb") as f:
        f.seek(part.offset(disk.sector_size))
        head = f.read(4096)
    return DdiFacts(
        path=image,
        layout=ptype.role.value,
        architecture=ptype.architecture,
        root_fs=fs_kind(head),
        verity=any(r in roles for r in VERITY_ROLES),
        verity_signature=any(r in roles for r in SIGNATURE_ROLES),
        esp=ids.Role.ESP in roles,
        root_hash=sidecar_root_hash(image),
    )


# ---- the host -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostFacts:
    """What this host offers nspawn. ``modules`` holds kernel module names (``-`` written ``_``)
    that are loaded, built in, or installed for the running kernel; ``modules_known`` says whether
    the installed-module index was readable at all (without it, "not listed" proves nothing)."""

    euid: int
    architecture: ids.Architecture | None
    udev: bool
    loop: bool
    device_mapper: bool
    filesystems: frozenset[str]
    modules: frozenset[str]
    modules_known: bool

    def has_filesystem(self, name: str) -> bool:
        return name in self.filesystems or name in self.modules


def _module_names(lines: Iterable[str]) -> set[str]:
    """Module names from modules.builtin / modules.dep lines (``kernel/fs/fat/vfat.ko.xz: …``)."""
    names = set()
    for line in lines:
        path = line.split(":", 1)[0].strip()
        if not path:
            continue
        name = path.rsplit("/", 1)[-1].split(".ko", 1)[0]
        names.add(name.replace("-", "_"))
    return names


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def probe_host(root: Path = Path("/"), release: str | None = None, machine: str | None = None,
               euid: int | None = None) -> HostFacts:  # fmt: skip
    """Gather ``HostFacts`` from ``root``'s /proc, /sys, /run, /dev and /lib/modules (``root``
    and the other arguments exist for tests). Reads a few small files; starts no process."""
    release = release or os.uname().release
    modules = {p.name for p in (root / "sys/module").iterdir()} if (root / "sys/module").is_dir() else set()
    module_dir = root / "lib/modules" / release
    modules_known = (module_dir / "modules.dep").is_file()
    for index in ("modules.builtin", "modules.dep"):
        modules |= _module_names(_read_lines(module_dir / index))
    filesystems = {line.split()[-1] for line in _read_lines(root / "proc/filesystems") if line.split()}
    misc = {line.split()[-1] for line in _read_lines(root / "proc/misc") if line.split()}
    try:
        arch: ids.Architecture | None = ids.Architecture.parse(machine or platform.machine())
    except ValueError:
        arch = None
    return HostFacts(
        euid=os.geteuid() if euid is None else euid,
        architecture=arch,
        # systemd-nspawn --image= connects to udev's control socket and refuses to go on without it.
        udev=(root / "run/udev/control").exists(),
        loop=(root / "dev/loop-control").exists() or "loop" in modules,
        # Built in or loaded, device-mapper registers the misc device "device-mapper".
        device_mapper="device-mapper" in misc or "dm_mod" in modules,
        filesystems=frozenset(filesystems),
        modules=frozenset(modules),
        modules_known=modules_known,
    )


def missing_requirements(ddi: DdiFacts, host: HostFacts) -> list[str]:
    """Everything ``host`` lacks to run ``ddi`` under nspawn, one phrase each (empty: all there).
    Only what is known to be missing is listed; a module that cannot be checked counts as present."""
    missing = []
    if host.euid != 0:
        missing.append("root privileges (systemd-nspawn --image= attaches loop devices)")
    if host.architecture is not None and host.architecture != ddi.architecture:
        missing.append(f"an {ddi.architecture.dps} host (the image's {ddi.layout} partition is for "
                       f"{ddi.architecture.dps}, this machine is {host.architecture.dps})")  # fmt: skip
    if not host.udev:
        missing.append("a running udev (systemd-nspawn --image= needs /run/udev/control; "
                       "containers usually have none)")  # fmt: skip
    if not host.loop:
        missing.append("loop devices (/dev/loop-control, kernel module loop)")
    if ddi.verity:
        if not host.device_mapper:
            missing.append("device-mapper in the kernel (module dm_mod, /dev/mapper/control) "
                           "to open the dm-verity protected root")  # fmt: skip
        elif host.modules_known and "dm_verity" not in host.modules:
            missing.append("the dm-verity target in the kernel (module dm_verity)")
        if ddi.root_hash is None and not ddi.verity_signature:
            missing.append(f"the root hash: no {ddi.path.stem}.roothash or manifest beside the image "
                           "and no verity signature partition in it")  # fmt: skip
    if ddi.root_fs is not None and not host.has_filesystem(ddi.root_fs):
        missing.append(f"{ddi.root_fs} support in the kernel (the {ddi.layout} file system is {ddi.root_fs})")
    if ddi.esp and not host.has_filesystem("vfat"):
        missing.append("vfat support in the kernel (systemd-nspawn mounts the image's EFI System "
                       "Partition at /efi)")  # fmt: skip
    return missing


def check_host(ddi: DdiFacts, host: HostFacts) -> None:
    """Raise ``HostCannotRun`` naming every missing requirement, if any."""
    missing = missing_requirements(ddi, host)
    if missing:
        raise HostCannotRun(
            f"cannot run {ddi.path} with systemd-nspawn here; this host lacks:\n  - " + "\n  - ".join(missing),
            # Only an image with an ESP can boot in a VM (vm refuses one without and points here).
            hint=(f"boot it in a virtual machine instead: reprobuild vm {ddi.path}" if ddi.esp else
                  "this image has no kernel (no ESP), so it cannot boot in a VM either; run it on a host "
                  "with what is listed, or add a kernel (Packages=linux-image-amd64 systemd-boot-efi)"),
        )


# ---- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NspawnConfig:
    """How to run ``image``: ``boot`` starts its init (``--boot``), otherwise ``command`` runs (an
    empty command gives nspawn's default: a login shell, /bin/bash or else /bin/sh). ``options``
    are passed to nspawn verbatim after ours (with ``boot`` they may end in arguments for init)."""

    image: Path
    boot: bool = False
    command: tuple[str, ...] = ()
    root_hash: str | None = None
    options: tuple[str, ...] = ()
    volatile: str = "state"
    nspawn: str = NSPAWN


def build_nspawn_argv(cfg: NspawnConfig) -> list[str]:
    """The systemd-nspawn command line (pure)."""
    argv = [cfg.nspawn, f"--image={cfg.image}",
            "--read-only",  # the loop device is read-only: the image file is never written
            f"--volatile={cfg.volatile}"]  # fmt: skip
    if cfg.root_hash:
        argv.append(f"--root-hash={cfg.root_hash}")
    if cfg.boot:
        argv.append("--boot")
    argv += cfg.options
    if cfg.command:
        argv += ["--", *cfg.command]
    return argv


def prepare(image: Path, boot: bool, command: Iterable[str] = (), options: Iterable[str] = (),
            host: HostFacts | None = None, nspawn: str = NSPAWN) -> NspawnConfig:  # fmt: skip
    """Inspect ``image``, check this host can run it (``host`` defaults to ``probe_host()``) and
    return the config, the root hash filled in from beside the image. Raises ``NotADdi``,
    ``HostCannotRun`` or ``ToolMissing``."""
    ddi = inspect_ddi(image)
    if not shutil.which(nspawn):
        raise ToolMissing(nspawn, "systemd-container", "to run images as containers")
    check_host(ddi, host or probe_host())
    return NspawnConfig(image=image, boot=boot, command=tuple(command), root_hash=ddi.root_hash,
                        options=tuple(options), nspawn=nspawn)  # fmt: skip


def run_nspawn(cfg: NspawnConfig) -> int:
    """Run nspawn in the foreground on this terminal; its exit status."""
    return subprocess.run(build_nspawn_argv(cfg), check=False).returncode
