"""Disk settings that several disk stages read: the dm-verity choice and whether the image boots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reprobuild.config import ImageSpec
from reprobuild.errors import BuildError
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
