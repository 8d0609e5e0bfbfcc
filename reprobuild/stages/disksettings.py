"""Disk settings that several disk stages read: the dm-verity choice and whether the image boots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reprobuild.config import ImageSpec
from reprobuild.errors import BuildError, ConfigError
from reprobuild.image.sysupdate import UpdatePlan, source_type_of
from reprobuild.lockfile import Lock
from reprobuild.pkcs11uri import is_uri


@dataclass(frozen=True)
class VerityChoice:
    mode: str  # "signed" | "hash" | "no"
    key: Path | str | None  # a key file or a pkcs11: URI
    certificate: Path | None


def choose_verity(spec: ImageSpec) -> VerityChoice:
    """``Verity=`` resolved: ``auto`` is ``signed`` when a key pair is configured, else ``hash``."""
    mode = spec.build.verity
    key, cert = spec.signing.verity_key, spec.signing.verity_certificate
    if mode == "auto":
        mode = "signed" if key and cert else "hash"
    if mode == "signed":
        for what, path in (("VerityKey=", key), ("VerityCertificate=", cert)):
            if path is None:
                raise BuildError(f"Verity=signed needs [Signing] {what}",
                                 hint="create a pair with reprobuild keygen --verity --out keys/verity")
            if not is_uri(path) and not Path(path).exists():  # a pkcs11: URI is no file
                raise BuildError(f"[Signing] {what}{path}: no such file",
                                 hint="create a pair with reprobuild keygen --verity --out keys/verity")
    if mode == "no" and spec.build.root_filesystem != "ext4":
        raise BuildError("Verity=no makes a writable root, which needs RootFilesystem=ext4")
    return VerityChoice(mode, key, cert)


def is_bootable(spec: ImageSpec, lock: Lock) -> bool:
    """A kernel in the lock (an ``initrd`` set) and ``Bootable=`` not ``no``."""
    return lock.has_set("initrd") and spec.content.bootable != "no"


def update_plan(spec: ImageSpec, lock: Lock) -> UpdatePlan | None:
    """``[Updates]`` as the transfer files need it, or None without ``Source=``. Refuses what
    systemd-sysupdate could not update: no ``<id>_<version>`` to match, or a bootable image whose
    UKI has the firmware's fixed path (``Bootloader=uki``) instead of a versioned entry."""
    updates = spec.updates
    if updates.source is None:
        if updates.public_key is not None or updates.instances_max != 2 or updates.slot_size != 1 << 30:
            raise ConfigError("[Updates] settings without Source=", hint="set [Updates] Source= (a URL or a directory)")
        return None
    if spec.build.versioned_name is None:
        raise ConfigError("[Updates] needs [Build] ImageId= and ImageVersion= (the transfers match <id>_<version>)")
    bootable = is_bootable(spec, lock)
    if bootable and spec.build.bootloader != "systemd-boot":
        raise ConfigError("[Updates] on a bootable image needs [Build] Bootloader=systemd-boot",
                          hint="with Bootloader=uki the firmware boots the one UKI at EFI/BOOT/, which cannot "
                               "be versioned; systemd-boot boots the newest EFI/Linux/<id>_<version>.efi")
    source_type = source_type_of(updates.source)
    return UpdatePlan(image_id=spec.build.image_id or "", source=updates.source, source_type=source_type,
                      instances_max=updates.instances_max, architecture=spec.distribution.architecture,
                      layout=spec.build.root_layout, verity=choose_verity(spec).mode, uki=bootable)
