"""The disk stage: a built root tree → a Discoverable Disk Image, bootable when the lock has a kernel.

Order of work, each step a call into a format module:

1. the root (or ``/usr``) file system from the tree (``image.fs``), UUID derived from the seed;
2. its dm-verity root hash (``image.verity``), needed by the kernel command line;
3. for bootable images: the initrd tree from the lock's ``initrd`` package set plus the kernel
   modules that find and verify the root, as a deterministic cpio (``image.initrd``); the UKI from
   the locked stub and kernel (``image.uki``), signed (``image.authenticode``); the ESP (``image.esp``);
4. the DDI (``image.ddi``): GPT, verity hash and signature partitions, written atomically.

With a cache (``reprobuild.cache``), the file system image (and its verity root hash) and the
initrd are looked up by key first; the mkfs tools come from ``tools`` (the locked tools tree or
the host, ``reprobuild.tools``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobuild.config import ImageSpec
from reprobuild.errors import BuildError
from reprobuild.fileio import sha256_file, write_atomic
from reprobuild.lockfile import Lock
from reprobuild.signer import is_uri, key_identity, open_signer
from reprobuild.store import Store

Say = Callable[[str], None]

# Per DPS architecture: the systemd-stub file inside the tree, and the removable-media boot path.
BOOT_FILES = {
    "x86-64": ("usr/lib/systemd/boot/efi/linuxx64.efi.stub", "EFI/BOOT/BOOTX64.EFI",
               "usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
    "arm64": ("usr/lib/systemd/boot/efi/linuxaa64.efi.stub", "EFI/BOOT/BOOTAA64.EFI",
              "usr/lib/systemd/boot/efi/systemd-bootaa64.efi"),
}

# Kernel command line words every bootable image gets. The root is read-only (dm-verity), so:
# systemd-firstboot must not stop the boot to ask questions on the console, and /var becomes a
# tmpfs (systemd.volatile=state) so that services keeping state there (logind, journald,
# timesyncd) work, while / stays the verified /dev/mapper/root.
DEFAULT_CMDLINE = ("systemd.firstboot=off", "systemd.volatile=state")

# Initrd pruning: documentation, manuals and translations are never read while looking for the
# root file system, and they make up a large share of the Essential set.
INITRD_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                "usr/share/lintian", "var/cache/debconf", "var/lib/apt", "var/cache/apt")


@dataclass(frozen=True)
class VerityChoice:
    mode: str  # "signed" | "hash" | "no"
    key: Path | str | None  # a key file or a pkcs11: URI
    certificate: Path | None


def choose_verity(spec: ImageSpec) -> VerityChoice:
    mode = spec.build.verity
    key, cert = spec.signing.verity_key, spec.signing.verity_certificate
    if mode == "auto":
        mode = "signed" if key and cert else "hash"
    if mode == "signed":
        for what, path in (("VerityKey=", key), ("VerityCertificate=", cert)):
            if path is None:
                raise BuildError(f"Verity=signed needs [Signing] {what}",
                                 hint="create a pair with reprobuild keygen --verity --out keys/verity")
            if not is_uri(path) and not Path(path).exists():  # (#18: a pkcs11: URI is no file)
                raise BuildError(f"[Signing] {what}{path}: no such file",
                                 hint="create a pair with reprobuild keygen --verity --out keys/verity")
    if mode == "no" and spec.build.root_filesystem != "ext4":
        raise BuildError("Verity=no makes a writable root, which needs RootFilesystem=ext4")
    return VerityChoice(mode, key, cert)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_bootable(spec: ImageSpec, lock: Lock) -> bool:
    return lock.has_set("initrd") and spec.content.bootable != "no"


def disk_key_inputs(spec: ImageSpec, lock: Lock) -> dict[str, Any]:
    """Everything this module reads besides the tree and the tools, as cache-key data (signing
    keys and certificates by the sha256 of their bytes). Keep in step with build_disk."""
    from reprobuild.cache import file_digest, package_set_inputs

    choice = choose_verity(spec)
    b, s = spec.build, spec.signing
    return {
        "root_filesystem": b.root_filesystem, "layout": b.root_layout, "bootloader": b.bootloader,
        # (#18) key_identity: a key file's sha256, or a pkcs11: URI without its PIN source.
        "verity": choice.mode, "verity_key": key_identity(choice.key), "verity_cert": file_digest(choice.certificate),
        "secure_boot_key": key_identity(s.secure_boot_key), "secure_boot_cert": file_digest(s.secure_boot_certificate),
        "cmdline": list(spec.content.kernel_command_line), "initrd_modules": list(spec.initrd.kernel_modules),
        "bootable": is_bootable(spec, lock), "architecture": spec.distribution.architecture, "seed": lock.seed,
        "initrd": package_set_inputs(lock.package_set("initrd")) if lock.has_set("initrd") else None,
    }  # fmt: skip


def _modules_digest(files: list[Path], base: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(base).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def build_initrd(spec: ImageSpec, lock: Lock, store: Store, root_tree: Path, kernel_version: str, work: Path,
                 say: Say, cache=None) -> Path:
    """The initrd of a bootable image, as a zstd-compressed newc cpio at ``work/initrd.cpio.zst``.

    Cached by the initrd set, the kernel version and the content of the modules it copies from the
    root tree: an edit elsewhere in the root tree reuses it."""
    from reprobuild.build import planned_packages
    from reprobuild.cache import code_digest, initrd_inputs, stage_key
    from reprobuild.image.initrd import DEFAULT_ROOT_MODULES, make_initrd_cpio, select_kernel_modules
    from reprobuild.rootfs.plan import TreeSettings
    from reprobuild.rootfs.sandbox import run_in_tree
    from reprobuild.rootfs.tree import build_tree

    out = work / "initrd.cpio.zst"
    initrd_tree = work / "initrd-tree"
    package_set = lock.package_set("initrd")
    # Kernel modules: the closure (modules.dep) of what finding and verifying the root needs.
    modules_src = root_tree / "usr/lib/modules" / kernel_version
    modules_dst = initrd_tree / "usr/lib/modules" / kernel_version
    wanted = tuple(DEFAULT_ROOT_MODULES) + tuple(spec.initrd.kernel_modules)
    modules = select_kernel_modules(modules_src, wanted)
    key = None
    if cache is not None and cache.enabled:
        copied = modules + [modules_src / n for n in ("modules.order", "modules.builtin", "modules.builtin.modinfo")
                            if (modules_src / n).exists()]
        key = stage_key("initrd", initrd_inputs(package_set, kernel_version, _modules_digest(copied, modules_src),
                                                wanted, lock.source_date_epoch, code_digest()))
        entry = cache.get("initrd", key)
        if entry is not None:
            say("initrd: cached")
            cache.copy_out(entry, out)
            return out
    say(f"building the initrd tree ({len(package_set.packages)} packages)")
    deb_path = cache.deb_path if cache is not None else store.path
    build_tree(planned_packages(package_set), deb_path, initrd_tree, TreeSettings(machine_id=""),
               lock.source_date_epoch, progress=say)

    # Modes are set explicitly: the caller's umask must not reach the image.
    for module in modules:
        dest = modules_dst / module.relative_to(modules_src)
        _mkdirs(dest.parent, initrd_tree)
        shutil.copy2(module, dest)
        dest.chmod(0o644)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (modules_src / name).exists():
            shutil.copy2(modules_src / name, modules_dst / name)
            (modules_dst / name).chmod(0o644)
    # depmod from the initrd's own (locked) kmod writes the indexes libkmod reads; its output is
    # sorted and carries no timestamps.
    result = run_in_tree(initrd_tree, ["depmod", "-a", kernel_version])
    if result.returncode != 0:
        raise BuildError(f"depmod failed in the initrd tree: {result.output[-500:]}")

    # systemd recognises an initrd by /etc/initrd-release; the kernel runs /init.
    os_release = (initrd_tree / "usr/lib/os-release").read_text()
    (initrd_tree / "etc/initrd-release").unlink(missing_ok=True)
    (initrd_tree / "etc/initrd-release").write_text(os_release)
    (initrd_tree / "etc/initrd-release").chmod(0o644)
    init = initrd_tree / "init"
    init.unlink(missing_ok=True)
    init.symlink_to("usr/lib/systemd/systemd")
    for rel in INITRD_PRUNE:
        shutil.rmtree(initrd_tree / rel, ignore_errors=True)
    epoch = lock.source_date_epoch
    for path in (initrd_tree / "etc/initrd-release", init):
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    say("writing the initrd")
    make_initrd_cpio(initrd_tree, out, epoch)
    if key is not None:
        cache.put_file("initrd", key, out)
    shutil.rmtree(initrd_tree, ignore_errors=True)
    return out


def _mkdirs(path: Path, top: Path) -> None:
    """``mkdir -p`` with mode 0755 for every directory it creates below ``top``, whatever the umask."""
    missing = []
    while not path.exists() and path != top:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(0o755)


def _read_os_release(tree: Path) -> str:
    for rel in ("usr/lib/os-release", "etc/os-release"):
        path = tree / rel
        if path.is_file() and not path.is_symlink():
            return path.read_text()
    raise BuildError("the root tree has no os-release (usr/lib/os-release)")


def build_boot(spec: ImageSpec, lock: Lock, store: Store, tree: Path, work: Path, root_hash: str,
               layout: str, say: Say, timings: dict[str, float], *, cache=None,
               runner=None, runner_identity: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """UKI (signed when a Secure Boot key is configured) on an ESP image. Returns (esp, manifest part).

    With a cache, the pair is the ``esp`` stage, keyed by every byte it is made of (command line
    with the root hash, kernel, stub, initrd, os-release, boot loader, signing key digests, seed,
    epoch) and ``runner_identity`` (the mtools that write the FAT)."""
    from reprobuild.image.authenticode import sign_pe
    from reprobuild.image.ddi import esp_fs_uuid
    from reprobuild.image.esp import make_esp
    from reprobuild.image.initrd import find_kernel_version
    from reprobuild.image.uki import build_uki

    arch = spec.distribution.architecture
    stub_rel, boot_path, sdboot_rel = BOOT_FILES[arch]
    kernel_version = find_kernel_version(tree / "usr/lib/modules")
    kernel_path = tree / "boot" / f"vmlinuz-{kernel_version}"
    if not kernel_path.is_file():
        raise BuildError(f"the root tree has modules for {kernel_version} but no {kernel_path.relative_to(tree)}")
    stub_path = tree / stub_rel
    if not stub_path.is_file():
        raise BuildError(f"no systemd-stub at /{stub_rel}", hint="add systemd-boot-efi to [Content] Packages=")

    started = time.monotonic()
    initrd = build_initrd(spec, lock, store, tree, kernel_version, work, say, cache)
    timings["initrd"] = round(time.monotonic() - started, 3)

    started = time.monotonic()
    hash_word = "usrhash" if layout == "usr" else "roothash"
    cmdline = " ".join((f"{hash_word}={root_hash}",) + DEFAULT_CMDLINE + tuple(spec.content.kernel_command_line))
    initrd_bytes = initrd.read_bytes()
    esp = work / "esp.img"
    key = None
    if cache is not None and cache.enabled:
        from reprobuild.cache import code_digest, esp_inputs, file_digest, stage_key

        sdboot_path = tree / sdboot_rel
        key = stage_key("esp", esp_inputs(
            cmdline, _sha256(kernel_path.read_bytes()), _sha256(stub_path.read_bytes()), _sha256(initrd_bytes),
            _read_os_release(tree), kernel_version, spec.build.bootloader,
            _sha256(sdboot_path.read_bytes()) if sdboot_path.is_file() else None,
            key_identity(spec.signing.secure_boot_key), file_digest(spec.signing.secure_boot_certificate),
            lock.seed, lock.source_date_epoch, runner_identity, code_digest()))
        entry = cache.get("esp", key)
        if entry is not None:
            say("UKI and ESP: cached")
            cache.copy_out(entry, esp)
            timings["uki+esp"] = round(time.monotonic() - started, 3)
            return esp, dict(entry.meta["boot"])
    uki = build_uki(stub_path.read_bytes(), kernel_path.read_bytes(), initrd_bytes, cmdline,
                    _read_os_release(tree), kernel_version)
    unsigned_sha = _sha256(uki)
    signing = spec.signing
    signed = False
    if signing.secure_boot_key or signing.secure_boot_certificate:
        if not (signing.secure_boot_key and signing.secure_boot_certificate):
            raise BuildError("Secure Boot signing needs both SecureBootKey= and SecureBootCertificate=")
        # (#18) a Signer from the key source (file or PKCS#11 token) instead of the PEM bytes.
        sb_signer = open_signer(signing.secure_boot_key, signing.secure_boot_certificate, os.environ)
        uki = sign_pe(uki, sb_signer)
        signed = True
    files: dict[str, bytes] = {}
    if spec.build.bootloader == "systemd-boot":
        sdboot = (tree / sdboot_rel).read_bytes()
        if signed:
            sdboot = sign_pe(sdboot, sb_signer)
        files[boot_path] = sdboot
        files[f"EFI/systemd/{Path(sdboot_rel).name}"] = sdboot
        files[f"EFI/Linux/{kernel_version}.efi"] = uki
    else:
        files[boot_path] = uki
    volume_id = int.from_bytes(esp_fs_uuid(bytes.fromhex(lock.seed)).bytes[:4], "big")
    make_esp(files, esp, volume_id=volume_id, label="ESP", epoch=lock.source_date_epoch, runner=runner)
    boot = {
        "kernel_version": kernel_version,
        "cmdline": cmdline,
        "initrd_sha256": _sha256(initrd_bytes),
        "initrd_size": len(initrd_bytes),
        "uki_unsigned_sha256": unsigned_sha,
        "uki_sha256": _sha256(uki),
        "uki_signed": signed,
        "uki_path": boot_path if spec.build.bootloader == "uki" else f"EFI/Linux/{kernel_version}.efi",
        "bootloader": spec.build.bootloader,
        "esp_sha256": sha256_file(esp),
    }
    if key is not None:
        cache.put_file("esp", key, esp, {"boot": boot})
    timings["uki+esp"] = round(time.monotonic() - started, 3)
    return esp, boot


def build_disk(spec: ImageSpec, lock: Lock, store: Store, tree: Path, work: Path, target: Path, say: Say,
               timings: dict[str, float], *, cache=None, tree_key: str | None = None, tools=None) -> dict[str, Any]:
    """Write ``target`` (image.raw) and ``image.roothash`` beside it; return the manifest fields.

    ``cache`` + ``tree_key`` (the tree's stage key) enable the fs and initrd caches; ``tools``
    (a reprobuild.tools.Tools) runs the mkfs tools, default the host's."""
    from reprobuild.cache import code_digest, fs_inputs, stage_key
    from reprobuild.image import ids, verity
    from reprobuild.image.ddi import DdiSpec, build_ddi, data_fs_uuid
    from reprobuild.image.fs import FsKind, FsResult, make_filesystem

    seed = bytes.fromhex(lock.seed)
    arch = spec.distribution.architecture
    layout = spec.build.root_layout
    choice = choose_verity(spec)
    epoch = lock.source_date_epoch

    started = time.monotonic()
    efi_dir = is_bootable(spec, lock) and layout == "root"
    if efi_dir:
        # Mount point for the ESP: systemd-gpt-auto-generator mounts it at /efi, and on a
        # read-only root the directory must already exist.
        efi = tree / "efi"
        efi.mkdir(exist_ok=True)
        efi.chmod(0o755)  # explicit: mkdir's mode is filtered by the caller's umask
        os.utime(efi, (epoch, epoch))
    fs_tree = tree / "usr" if layout == "usr" else tree
    fs_image = work / "root.img"
    fs_uuid = data_fs_uuid(seed, arch, layout)
    read_only = choice.mode != "no"
    fs_key = fs_entry = None
    if cache is not None and cache.enabled and tree_key is not None:
        tools_id = tools.identity() if tools is not None else {"tree": "host"}
        fs_key = stage_key("fs", fs_inputs(tree_key, spec.build.root_filesystem, str(fs_uuid), layout, read_only,
                                           layout, efi_dir, epoch, tools_id, code_digest()))
        fs_entry = cache.get("fs", fs_key)
    if fs_entry is not None:
        say(f"{spec.build.root_filesystem} file system: cached")
        cache.copy_out(fs_entry, fs_image)
        m = fs_entry.meta["fs"]
        fs = FsResult(FsKind(m["kind"]), m["tool"], m["version"], tuple(m["argv"]), m["size"])
    else:
        say(f"making the {spec.build.root_filesystem} file system")
        fs = make_filesystem(spec.build.root_filesystem, fs_tree, fs_image, fs_uuid, epoch, label=layout,
                             read_only=read_only, runner=tools.runner() if tools is not None else None)
    timings["filesystem"] = round(time.monotonic() - started, 3)

    manifest: dict[str, Any] = {
        "filesystem": {"type": fs.kind.value, "tool": fs.tool, "version": fs.version, "argv": list(fs.argv),
                       "size": fs.size},
    }
    esp = None
    root_hash = None
    if is_bootable(spec, lock):
        if choice.mode == "no":
            raise BuildError("bootable images need dm-verity (Verity=hash or signed): the UKI pins the root hash")
        started = time.monotonic()
        params = verity.VerityParams(ids.verity_salt(seed), ids.verity_superblock_uuid(seed))
        params_id = f"{params.salt.hex()}/{params.uuid}"
        root_hash = (fs_entry.meta.get("verity", {}).get(params_id) if fs_entry is not None else None) \
            or verity.hash_file(fs_image, params).root_hash.hex()
        timings["verity-precompute"] = round(time.monotonic() - started, 3)
    if fs_key is not None and fs_entry is None:
        # Cached before anything reads it further; the verity root hash rides along as metadata.
        cache.put_file("fs", fs_key, fs_image, {
            "fs": {"kind": fs.kind.value, "tool": fs.tool, "version": fs.version, "argv": list(fs.argv),
                   "size": fs.size},
            "verity": {params_id: root_hash} if root_hash else {}})
    if root_hash is not None:
        esp, boot = build_boot(spec, lock, store, tree, work, root_hash, layout, say, timings, cache=cache,
                               runner=tools.runner() if tools is not None else None,
                               runner_identity=tools.identity() if tools is not None else {"tree": "host"})
        manifest["boot"] = boot

    started = time.monotonic()
    say("writing the disk image")
    result = build_ddi(DdiSpec(architecture=arch, seed=seed, root_fs_image=fs_image, output=target,
                               verity=choice.mode, esp_image=esp, layout=layout,
                               # (#18) a Signer from the key source (file or PKCS#11 token)
                               signer=(open_signer(choice.key, choice.certificate, os.environ)
                                       if choice.mode == "signed" else None)))
    timings["ddi"] = round(time.monotonic() - started, 3)
    if esp is not None and result.root_hash != manifest["boot"]["cmdline"].split()[0].split("=", 1)[1]:
        raise BuildError("internal error: the UKI's root hash differs from the image's")
    if result.root_hash:
        write_atomic(target.with_name(target.stem + ".roothash"), (result.root_hash + "\n").encode())
    manifest.update(result.manifest())
    return manifest
