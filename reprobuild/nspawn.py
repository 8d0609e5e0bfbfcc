"""Run a built image — a directory, a tar or a Discoverable Disk Image — as a container with
``systemd-nspawn``.

The pieces, the first ones pure:

* ``inspect_ddi`` reads what nspawn will need from the image itself (GPT partition roles, the
  root file system's magic, verity partitions, the ESP) and the root hash from the files beside it;
* ``missing_requirements`` compares that with ``HostFacts`` (what the running kernel and system
  offer, gathered by ``probe_host``) and names everything that is missing, so that a host without
  device-mapper, vfat or udev gets one clear sentence instead of nspawn's "Failed to dissect image";
* ``build_nspawn_argv`` writes the command line; ``prepare`` picks the way to run the image on
  this host and ``run_nspawn`` runs it.

The ways (``prepare``): a directory is run in place (``--directory=``); a tar is extracted once
into the store, keyed by its sha256, and run from there. A DDI goes to ``--image=`` (nspawn sets up
dm-verity) when the host has device-mapper, udev and the rest; otherwise its root partition is
checked against its hash tree in user space (:func:`reprobuild.image.verity.check_blocks`, from a
root hash that a trusted certificate signed) while being copied into the store, keyed by the root
hash, and that copy is loop-mounted read-only in a private mount namespace and run with
``--directory=``. A second run of the same image finds the checked copy and starts at once. An
image whose root hash cannot be trusted is never run. Without a system bus (no systemd as PID 1:
containers, CI runners) nspawn is told not to register with machined (``--register=no
--keep-unit``).

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
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from reprobuild.cache import Cache
from reprobuild.errors import FormatError, ReprobuildError, ToolMissing, VerificationFailed
from reprobuild.fileio import sha256_file
from reprobuild.image import gpt, ids, verity, veritysig
from reprobuild.store import Store
from reprobuild.x509 import certificate_fingerprint, load_certificate

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
# Where systemd looks for certificates it trusts for signed verity root hashes in user space
# (systemd-dissect(1), "/etc/verity.d/"); we trust the same ones.
VERITY_CERT_DIRS = ("etc/verity.d", "run/verity.d", "usr/local/lib/verity.d", "usr/lib/verity.d")
# Cache "stage" names for what running needs in the store (see ``prepare``).
VERIFIED_ROOT = "verified-root"  # root hash → the checked copy of the root partition
EXTRACTED_TAR = "run-tar"  # tar sha256 → the tar, kept extracted
UNSHARE = "unshare"
# Run by sh in a private mount namespace: mount the checked root read-only, then exec nspawn.
MOUNT_THEN_EXEC = 'mount -t "$1" -o "$2" -- "$3" "$4" || exit 125; shift 4; exec "$@"'
TAR_MAGIC = (257, b"ustar")

Extent = tuple[int, int]  # (offset, size) in bytes
ImageKind = Literal["directory", "tar", "ddi"]


class NotADdi(FormatError):
    """The file is not a Discoverable Disk Image systemd-nspawn could dissect."""


class HostCannotRun(ReprobuildError):
    """This host lacks something systemd-nspawn needs to run the image."""


class ImageUntrusted(VerificationFailed):
    """The image's root hash cannot be trusted, or its data does not match it: it is not run."""


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
    data_extent: Extent | None = None  # the root (or /usr) partition
    hash_extent: Extent | None = None  # its verity hash partition
    sig_extent: Extent | None = None  # its verity signature partition


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
    ss = disk.sector_size
    with open(image, "rb") as f:
        f.seek(part.offset(ss))
        head = f.read(4096)

    def extent(wanted: tuple[ids.Role, ...]) -> Extent | None:
        # The verity partitions that belong to the data partition found above.
        role = wanted[DATA_ROLES.index(ptype.role)]
        return (roles[role][0].offset(ss), roles[role][0].size(ss)) if role in roles else None

    return DdiFacts(
        path=image,
        layout=ptype.role.value,
        architecture=ptype.architecture,
        root_fs=fs_kind(head),
        verity=any(r in roles for r in VERITY_ROLES),
        verity_signature=any(r in roles for r in SIGNATURE_ROLES),
        esp=ids.Role.ESP in roles,
        root_hash=sidecar_root_hash(image),
        data_extent=(part.offset(ss), part.size(ss)),
        hash_extent=extent(VERITY_ROLES),
        sig_extent=extent(SIGNATURE_ROLES),
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
    systemd: bool = False  # systemd is PID 1 (/run/systemd/system exists, sd_booted(3))
    system_bus: bool = False  # the D-Bus system bus socket exists

    @property
    def can_register(self) -> bool:
        """nspawn registers a container with systemd-machined over the system bus and puts it in
        a scope unit; without systemd and a bus it must be told not to (``--register=no --keep-unit``)."""
        return self.systemd and self.system_bus

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
        systemd=(root / "run/systemd/system").is_dir(),
        system_bus=(root / "run/dbus/system_bus_socket").exists(),
    )


def _architecture_missing(ddi: DdiFacts, host: HostFacts) -> list[str]:
    """The host architecture an image for another one needs (empty when they match or unknown)."""
    if host.architecture is None or host.architecture == ddi.architecture:
        return []
    return [(f"an {ddi.architecture.dps} host (the image's {ddi.layout} partition is for "
             f"{ddi.architecture.dps}, this machine is {host.architecture.dps})")]


def missing_requirements(ddi: DdiFacts, host: HostFacts) -> list[str]:
    """Everything ``host`` lacks to run ``ddi`` under nspawn, one phrase each (empty: all there).
    Only what is known to be missing is listed; a module that cannot be checked counts as present."""
    missing = []
    if host.euid != 0:
        missing.append("root privileges (systemd-nspawn --image= attaches loop devices)")
    missing += _architecture_missing(ddi, host)
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


def userspace_missing(ddi: DdiFacts, host: HostFacts) -> list[str]:
    """What ``host`` lacks to run ``ddi`` without device-mapper: its root partition checked in
    user space, then loop-mounted read-only (empty: all there)."""
    missing = []
    if host.euid != 0:
        missing.append("root privileges (loop mounts and systemd-nspawn need them)")
    missing += _architecture_missing(ddi, host)
    if not host.loop:
        missing.append("loop devices (/dev/loop-control, kernel module loop)")
    if ddi.root_fs is None:
        missing.append(f"a file system reprobuild recognises on the {ddi.layout} partition "
                       f"(one of {', '.join(FS_MAGICS)})")  # fmt: skip
    elif not host.has_filesystem(ddi.root_fs):
        missing.append(f"{ddi.root_fs} support in the kernel (the {ddi.layout} file system is {ddi.root_fs})")
    return missing


# ---- trust: the root hash and the data ----------------------------------------------------------


def system_verity_certificates(root: Path = Path("/")) -> list[Path]:
    """The ``*.crt`` files in systemd's verity certificate directories, sorted, first name wins."""
    found: dict[str, Path] = {}
    for d in VERITY_CERT_DIRS:
        directory = root / d
        if directory.is_dir():
            for cert in sorted(directory.glob("*.crt")):
                found.setdefault(cert.name, cert)
    return [found[name] for name in sorted(found)]


def _read_extent(path: Path, extent: Extent, limit: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        f.seek(extent[0])
        return f.read(min(extent[1], limit))


def trusted_root_hash(ddi: DdiFacts, certificates: Sequence[Path]) -> tuple[str, str]:
    """The root hash to check ``ddi``'s data against, and why it is trusted.

    A signed image (a verity signature partition) needs its signature to verify with one of
    ``certificates``; a root hash beside the image must then agree with the signed one. An
    unsigned verity image takes the root hash beside it (``IMAGE.roothash`` or the manifest), as
    ``systemd-nspawn --root-hash=`` would. Raises ImageUntrusted otherwise."""
    if ddi.sig_extent is not None:
        try:
            sig = veritysig.parse_verity_sig(_read_extent(ddi.path, ddi.sig_extent))
        except ReprobuildError as e:
            raise ImageUntrusted(f"{ddi.path}: unreadable verity signature partition: {e.message}") from e
        if ddi.root_hash is not None and ddi.root_hash != sig.root_hash:
            raise ImageUntrusted(f"{ddi.path}: the root hash beside the image ({ddi.root_hash}) is not the "
                                 f"signed one ({sig.root_hash})")  # fmt: skip
        if not certificates:
            raise ImageUntrusted(
                f"{ddi.path} is signed (verity signature partition), but no certificate to check the "
                "signature was found, so it is not run",
                hint="pass --verity-certificate CERT, keep the image beside its definition "
                     "([Signing] VerityCertificate=), or install the certificate in /etc/verity.d/")  # fmt: skip
        errors = []
        for path in certificates:
            try:
                cert = load_certificate(Path(path).read_bytes())
                veritysig.check_verity_sig(sig, sig.root_hash, cert)
            except (OSError, ReprobuildError) as e:
                errors.append(f"{path}: {getattr(e, 'message', None) or e}")
                continue
            return sig.root_hash, f"signed by {path} (sha256 fingerprint {certificate_fingerprint(cert)[:16]}…)"
        raise ImageUntrusted(f"{ddi.path}: the verity signature does not verify with any trusted "
                             "certificate, so it is not run:\n  - " + "\n  - ".join(errors))  # fmt: skip
    if ddi.root_hash is not None:
        return ddi.root_hash, f"{ddi.path.stem}.roothash or the manifest beside the image (the image is not signed)"
    raise ImageUntrusted(f"{ddi.path} has a verity partition but no root hash: no {ddi.path.stem}.roothash or "
                         "manifest beside it and no signature partition in it, so it is not run")  # fmt: skip


def verified_root(ddi: DdiFacts, root_hash: str, store: Store, say: Callable[[str], None]) -> Path:
    """A read-only copy of ``ddi``'s root partition in ``store`` whose every block matched the hash
    tree under ``root_hash`` (the copy is written in the same pass as the check, so what runs is
    what was checked). Kept in the store under the root hash: the next call returns it at once
    (``store gc`` may free it; it is then checked again). Raises ImageUntrusted naming the first
    bad block."""
    if not re.fullmatch(r"[0-9a-f]{64}", root_hash):
        raise ImageUntrusted(f"{ddi.path}: only sha256 verity root hashes can be checked in user space")
    if ddi.data_extent is None or ddi.hash_extent is None:
        raise ImageUntrusted(f"{ddi.path}: no verity hash partition belongs to its {ddi.layout} partition")
    cache = Cache(store)
    entry = cache.get(VERIFIED_ROOT, root_hash, record=False)
    if entry is not None and entry.object is not None and entry.meta.get("fs") == ddi.root_fs:
        say(f"{ddi.layout} partition: checked before against root hash {root_hash[:16]}…, using that copy")
        return store.path(entry.object)
    say(f"{ddi.layout} partition: checking every block against root hash {root_hash[:16]}… (no device-mapper here)")
    tmp = store.new_tmp_dir("verified-root")
    try:
        copy = tmp / "root.img"
        with open(ddi.path, "rb") as f, open(copy, "wb") as out:
            try:
                verity.check_blocks(f, ddi.data_extent[0], ddi.hash_extent[0], root_hash, copy_to=out)
            except verity.VerityMismatch as e:
                raise ImageUntrusted(f"{ddi.path}: {ddi.layout} partition: {e.message}; the image is not run",
                                     hint="the image was changed after it was built; rebuild it") from e  # fmt: skip
            except verity.VerityInvalid as e:
                raise ImageUntrusted(f"{ddi.path}: verity hash partition: {e.message}; the image is not run") from e
        os.chmod(copy, 0o444)
        entry = cache.put_file(VERIFIED_ROOT, root_hash, copy, {"fs": ddi.root_fs})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert entry is not None and entry.object is not None
    return store.path(entry.object)


def extracted_tar(tar: Path, store: Store, say: Callable[[str], None]) -> Path:
    """``tar`` extracted (through the safe extractor) into ``store``, keyed by its sha256: a
    read-only tree that the next call returns after hashing the tar once."""
    sha = sha256_file(tar)
    cache = Cache(store)
    entry = cache.get(EXTRACTED_TAR, sha, record=False)
    if entry is None:
        say(f"extracting {tar} into the store (once)")
        entry = cache.put_file(EXTRACTED_TAR, sha, tar)
    assert entry is not None
    return cache.tree_dir(entry)


def image_kind(path: Path) -> ImageKind:
    """``directory`` for a directory, ``tar`` for a file with the ustar magic, else ``ddi``
    (which :func:`inspect_ddi` then checks)."""
    if path.is_dir():
        return "directory"
    with open(path, "rb") as f:
        head = f.read(512)
    offset, magic = TAR_MAGIC
    return "tar" if head[offset : offset + len(magic)] == magic else "ddi"


def check_os_tree(tree: Path, label: Path) -> None:
    """systemd-nspawn runs a directory only if it looks like an OS (os-release in it)."""
    if not any((tree / rel).exists() or (tree / rel).is_symlink() for rel in ("usr/lib/os-release", "etc/os-release")):
        raise FormatError(f"{label} is not an operating system tree (no /usr/lib/os-release or /etc/os-release)",
                          hint="boot and shell run what reprobuild build writes: image/, image.tar or image.raw")  # fmt: skip


# ---- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopMount:
    """A file system image to mount read-only (``-o ro,loop``) before nspawn starts, in a private
    mount namespace so that the mount never reaches the host and ends with the container."""

    file: Path
    fstype: str
    offset: int = 0
    size: int | None = None
    at: str = ""  # where below the mount point: "" (the root) or "usr" (a /usr-only image)

    def options(self) -> str:
        opts = "ro,loop"
        if self.offset:
            opts += f",offset={self.offset}"
        if self.size is not None:
            opts += f",sizelimit={self.size}"
        return opts


@dataclass(frozen=True)
class NspawnConfig:
    """How to run ``image``: ``boot`` starts its init (``--boot``), otherwise ``command`` runs (an
    empty command gives nspawn's default: a login shell, /bin/bash or else /bin/sh). ``options``
    are passed to nspawn verbatim after ours (with ``boot`` they may end in arguments for init).

    The root is ``image`` itself (``--image=``, nspawn dissects it), or ``directory`` when set
    (``--directory=``), which with ``loop`` is the mount point ``loop`` is mounted on first.
    ``register=False``: no machined registration and no scope unit (no system bus here)."""

    image: Path
    boot: bool = False
    command: tuple[str, ...] = ()
    root_hash: str | None = None
    options: tuple[str, ...] = ()
    volatile: str = "state"
    nspawn: str = NSPAWN
    directory: Path | None = None
    loop: LoopMount | None = None
    register: bool = True


def build_nspawn_argv(cfg: NspawnConfig) -> list[str]:
    """The command line (pure): systemd-nspawn, wrapped in ``unshare`` + ``mount`` for a loop root."""
    if cfg.directory is None:
        argv = [cfg.nspawn, f"--image={cfg.image}",
                "--read-only",  # the loop device is read-only: the image file is never written
                f"--volatile={cfg.volatile}"]  # fmt: skip
        if cfg.root_hash:
            argv.append(f"--root-hash={cfg.root_hash}")
    else:
        argv = [cfg.nspawn, f"--directory={cfg.directory}", "--read-only", f"--volatile={cfg.volatile}"]
    if not cfg.register:
        argv += ["--register=no", "--keep-unit"]
    if cfg.boot:
        argv.append("--boot")
    argv += cfg.options
    if cfg.command:
        argv += ["--", *cfg.command]
    if cfg.loop is not None:
        if cfg.directory is None:
            raise ValueError("a loop-mounted root needs a mount point (NspawnConfig.directory)")
        target = cfg.directory / cfg.loop.at if cfg.loop.at else cfg.directory
        argv = [UNSHARE, "--mount", "--propagation", "private", "--", "sh", "-c", MOUNT_THEN_EXEC, "sh",
                cfg.loop.fstype, cfg.loop.options(), str(cfg.loop.file), str(target), *argv]  # fmt: skip
    return argv


def prepare(image: Path, boot: bool, command: Iterable[str] = (), options: Iterable[str] = (),
            host: HostFacts | None = None, nspawn: str = NSPAWN, store: Store | None = None,
            certificates: Sequence[Path] = (), say: Callable[[str], None] = lambda _m: None) -> NspawnConfig:  # fmt: skip
    """Look at ``image`` and this host (``host`` defaults to ``probe_host()``) and return how to
    run it (see the module docstring for the ways). ``store`` (default: the user's) keeps checked
    root partitions and extracted tars; ``certificates`` are trusted for signed images (with the
    ones in /etc/verity.d/). Raises ``NotADdi``, ``HostCannotRun``, ``ImageUntrusted`` or
    ``ToolMissing``."""
    kind = image_kind(image)
    ddi = inspect_ddi(image) if kind == "ddi" else None
    if not shutil.which(nspawn):
        raise ToolMissing(nspawn, "systemd-container", "to run images as containers")
    host = host or probe_host()
    base = NspawnConfig(image=image, boot=boot, command=tuple(command), options=tuple(options), nspawn=nspawn,
                        register=host.can_register)  # fmt: skip
    if ddi is None:
        if host.euid != 0:
            raise HostCannotRun(f"cannot run {image} with systemd-nspawn: it needs root privileges")
        if kind == "directory":
            check_os_tree(image, image)
            return replace(base, directory=image)
        tree = extracted_tar(image, store or Store(Store.default_root()), say)
        check_os_tree(tree, image)
        return replace(base, directory=tree)
    trusted = [*certificates, *system_verity_certificates()]
    if not missing_requirements(ddi, host):
        # dm-verity checks the data against the root hash on every read; the hash itself must be
        # trusted first, as in user space (a signed image: its signature, by a trusted certificate).
        if not ddi.verity:
            return base
        root_hash, why = trusted_root_hash(ddi, trusted)
        say(f"root hash {root_hash[:16]}…: {why}; dm-verity checks the data")
        return replace(base, root_hash=root_hash)
    missing = userspace_missing(ddi, host)
    if not shutil.which(UNSHARE):
        raise ToolMissing(UNSHARE, "util-linux", "to mount the image's root in a private mount namespace")
    if missing:
        raise HostCannotRun(
            f"cannot run {ddi.path} with systemd-nspawn here; this host lacks:\n  - " + "\n  - ".join(missing),
            hint=f"boot it in a virtual machine instead: reprobuild vm {ddi.path}",
        )
    assert ddi.root_fs is not None and ddi.data_extent is not None
    at = "usr" if ddi.layout == "usr" else ""
    if not ddi.verity:
        say(f"{image} has no dm-verity: its {ddi.layout} partition is mounted read-only as it is")
        loop = LoopMount(image.absolute(), ddi.root_fs, *ddi.data_extent, at=at)
    else:
        root_hash, why = trusted_root_hash(ddi, trusted)
        say(f"root hash {root_hash[:16]}…: {why}")
        loop = LoopMount(verified_root(ddi, root_hash, store or Store(Store.default_root()), say), ddi.root_fs, at=at)
    if at:  # a /usr-only image: the root is a fresh tmpfs around it, as nspawn --volatile=yes gives
        base = replace(base, volatile="yes")
    if ddi.esp:
        say("note: the EFI System Partition is not mounted at /efi (only systemd-nspawn --image= does that)")
    return replace(base, loop=loop, root_hash=None)


def run_nspawn(cfg: NspawnConfig) -> int:
    """Run nspawn in the foreground on this terminal; its exit status. A loop-mounted root gets a
    fresh mount point (removed afterwards; the mount itself only exists in the private namespace)."""
    if cfg.loop is None or cfg.directory is not None:
        return subprocess.run(build_nspawn_argv(cfg), check=False).returncode
    with tempfile.TemporaryDirectory(prefix="reprobuild-root-") as mount_point:
        os.chmod(mount_point, 0o755)
        if cfg.loop.at:
            os.mkdir(Path(mount_point) / cfg.loop.at, 0o755)
        return subprocess.run(build_nspawn_argv(replace(cfg, directory=Path(mount_point))), check=False).returncode
