"""Stage ``esp``: the Unified Kernel Image (signed when a Secure Boot key is configured) on an
ESP image, with systemd-boot when ``Bootloader=systemd-boot``.

Its content key is made from every byte it is made of — the command line with the root hash,
kernel, stub, initrd, os-release, boot loader, signing key digests — so a change that keeps the
root hash (a new verity key) reuses it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from reprobuild.cache import file_digest
from reprobuild.errors import BuildError
from reprobuild.fileio import sha256_file
from reprobuild.image.authenticode import sign_pe
from reprobuild.image.esp import auto_size, make_esp
from reprobuild.image.ids import esp_fs_uuid
from reprobuild.image.initrd import find_kernel_version
from reprobuild.image.uki import build_uki
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.stage import Stage, Upstream
from reprobuild.signer import key_identity, open_signer
from reprobuild.stages.disksettings import update_plan
from reprobuild.tools import tool_runner

# Per DPS architecture: the systemd-stub file inside the tree, the removable-media boot path,
# and systemd-boot.
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_os_release(tree: Path) -> str:
    for rel in ("usr/lib/os-release", "etc/os-release"):
        path = tree / rel
        if path.is_file() and not path.is_symlink():
            return path.read_text()
    raise BuildError("the root tree has no os-release (usr/lib/os-release)")


class EspStage(Stage):
    name = "esp"
    file_name = "esp.img"
    upstream = ("tools",)
    reads = ("tree", "fs", "initrd")

    def options(self, ctx: BuildContext) -> dict[str, Any]:
        return {"bootloader": ctx.spec.build.bootloader, "layout": ctx.spec.build.root_layout,
                "cmdline": list(ctx.spec.content.kernel_command_line), "architecture": ctx.spec.distribution.architecture,
                "seed": ctx.lock.seed, "epoch": ctx.epoch, "uki_name": ctx.spec.build.versioned_name,
                **self._room(ctx)}

    @staticmethod
    def _room(ctx: BuildContext) -> dict[str, Any]:
        """[Updates]: the ESP holds InstancesMax UKIs (only when set, so other definitions keep their keys)."""
        plan = update_plan(ctx.spec, ctx.lock)
        return {"uki_instances": plan.instances_max} if plan is not None and plan.uki else {}

    @staticmethod
    def _uki_name(ctx: BuildContext, kernel_version: str) -> str:
        """The UKI's file name in EFI/Linux/ (Bootloader=systemd-boot): ``<id>_<version>.efi`` with
        ImageId= and ImageVersion= (what systemd-sysupdate's UKI transfer matches), else the kernel's."""
        return f"{ctx.spec.build.versioned_name or kernel_version}.efi"

    def inputs(self, ctx: BuildContext) -> dict[str, Any]:
        s = ctx.spec.signing
        # key_identity: a key file's sha256, or a pkcs11: URI without its PIN source.
        return {"secure_boot_key": key_identity(s.secure_boot_key),
                "secure_boot_cert": file_digest(s.secure_boot_certificate)}

    def _parts(self, ctx: BuildContext, up: Upstream) -> tuple[Path, Path, Path, str, str]:
        tree = up.artifact("tree").path
        assert tree is not None
        stub_rel = BOOT_FILES[ctx.spec.distribution.architecture][0]
        kernel_version = find_kernel_version(tree / "usr/lib/modules")
        kernel = tree / "boot" / f"vmlinuz-{kernel_version}"
        if not kernel.is_file():
            raise BuildError(f"the root tree has modules for {kernel_version} but no boot/vmlinuz-{kernel_version}")
        stub = tree / stub_rel
        if not stub.is_file():
            raise BuildError(f"no systemd-stub at /{stub_rel}", hint="add systemd-boot-efi to [Content] Packages=")
        hash_word = "usrhash" if ctx.spec.build.root_layout == "usr" else "roothash"
        cmdline = " ".join((f"{hash_word}={up.meta('fs')['root_hash']}",) + DEFAULT_CMDLINE
                           + tuple(ctx.spec.content.kernel_command_line))
        return tree, kernel, stub, kernel_version, cmdline

    def content(self, ctx: BuildContext, up: Upstream) -> dict[str, Any]:
        tree, kernel, stub, kernel_version, cmdline = self._parts(ctx, up)
        sdboot = tree / BOOT_FILES[ctx.spec.distribution.architecture][2]
        return {"cmdline": cmdline, "kernel": sha256_file(kernel), "stub": sha256_file(stub),
                "initrd": sha256_file(up.file("initrd")), "os_release": _read_os_release(tree),
                "kernel_version": kernel_version, "sdboot": sha256_file(sdboot) if sdboot.is_file() else None}

    def run(self, ctx: BuildContext, up: Upstream, out: Path) -> dict[str, Any]:
        # The initrd first: in a thread of its own (the runner makes ddi's upstreams, fs and esp,
        # concurrently), its package tree is built while the image's is.
        initrd_bytes = up.file("initrd").read_bytes()
        tree, kernel, stub, kernel_version, cmdline = self._parts(ctx, up)
        _stub_rel, boot_path, sdboot_rel = BOOT_FILES[ctx.spec.distribution.architecture]
        uki = build_uki(stub.read_bytes(), kernel.read_bytes(), initrd_bytes, cmdline, _read_os_release(tree),
                        kernel_version)
        unsigned_sha = _sha256(uki)
        signing = ctx.spec.signing
        signed = False
        if signing.secure_boot_key or signing.secure_boot_certificate:
            if not (signing.secure_boot_key and signing.secure_boot_certificate):
                raise BuildError("Secure Boot signing needs both SecureBootKey= and SecureBootCertificate=")
            # A signer from the key source (file or PKCS#11 token): the key never leaves the token.
            sb_signer = open_signer(signing.secure_boot_key, signing.secure_boot_certificate, os.environ)
            uki = sign_pe(uki, sb_signer)
            signed = True
        files: dict[str, bytes] = {}
        bootloader = ctx.spec.build.bootloader
        if bootloader == "systemd-boot":
            sdboot = (tree / sdboot_rel).read_bytes()
            if signed:
                sdboot = sign_pe(sdboot, sb_signer)
            files[boot_path] = sdboot
            files[f"EFI/systemd/{Path(sdboot_rel).name}"] = sdboot
            files[f"EFI/Linux/{self._uki_name(ctx, kernel_version)}"] = uki
        else:
            files[boot_path] = uki
        volume_id = int.from_bytes(esp_fs_uuid(bytes.fromhex(ctx.lock.seed)).bytes[:4], "big")
        tools = up.artifact("tools")
        ctx.say("writing the UKI and the ESP")
        room = self._room(ctx).get("uki_instances")
        # With updates, room for that many UKIs of up to twice this one's size beside the other files.
        size = (auto_size([len(b) for b in files.values()] + [2 * len(uki)] * room, 3) if room else None)
        make_esp(files, out, size=size, volume_id=volume_id, label="ESP", epoch=ctx.epoch,
                 runner=tool_runner(tools.path, tools.meta.get("versions", {})))
        return {"boot": {
            "kernel_version": kernel_version,
            "cmdline": cmdline,
            "initrd_sha256": _sha256(initrd_bytes),
            "initrd_size": len(initrd_bytes),
            "uki_unsigned_sha256": unsigned_sha,
            "uki_sha256": _sha256(uki),
            "uki_signed": signed,
            "uki_path": boot_path if bootloader == "uki" else f"EFI/Linux/{self._uki_name(ctx, kernel_version)}",
            "bootloader": bootloader,
            "esp_sha256": sha256_file(out),
        }}
