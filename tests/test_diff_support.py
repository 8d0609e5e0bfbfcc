"""Builders for the diff tests and bench/diff.py: fixture trees and DDIs that differ in known ways.

No tests here. `make_tree` writes a small root tree; ``changes`` applies the known differences.
`make_ddi` builds a DDI (ESP + root + verity + signature) with `reprobuild.image.ddi.build_ddi`.
The root file system is squashfs built with per-file mtimes kept (``-mkfs-time`` fixed, no
``-all-time``), so an mtime difference survives into the image; erofs via `make_filesystem`
would clamp every time to the epoch.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

EPOCH = 1_700_000_000
SEED = bytes(range(16))

# name of change -> (path in the tree, expected field or status, expected classification)
CHANGES = {
    "content": ("etc/hostname", "content", "content"),
    "mode": ("usr/bin/tool", "mode", "content"),
    "added": ("etc/added.conf", "added", "content"),
    "removed": ("usr/share/doc/readme", "removed", "content"),
    "mtime": ("etc/os-release", "mtime", "metadata"),
}


def make_tree(root: Path, changes: frozenset[str] = frozenset(), extra_bytes: int = 0) -> Path:
    """A small root tree; each name in ``changes`` (keys of CHANGES) applies one difference."""
    files = {
        "etc/hostname": b"alpha\n" if "content" not in changes else b"bravo\n",
        "etc/os-release": b'ID=debian\nVERSION_ID="12"\n',
        "usr/bin/tool": b"#!/bin/sh\necho tool\n",
        "usr/share/doc/readme": b"read me\n",
        "usr/share/doc/copyright": b"MIT\n",
        # Incompressible, so the root file system spans many 4 KiB blocks (a real verity tree).
        "usr/lib/data.bin": hashlib.shake_256(b"reprobuild").digest(96 * 1024),
    }
    if "removed" in changes:
        del files["usr/share/doc/readme"]
    if "added" in changes:
        files["etc/added.conf"] = b"added=1\n"
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, 0o644)
    os.chmod(root / "usr/bin/tool", 0o700 if "mode" in changes else 0o755)
    if extra_bytes:
        big = root / "usr/lib/big"
        big.mkdir(parents=True, exist_ok=True)
        for i in range(max(1, extra_bytes >> 20)):  # incompressible 1 MiB files, same in every build
            (big / f"blob{i:04d}").write_bytes(hashlib.shake_256(i.to_bytes(8, "little")).digest(1 << 20))
    os.symlink("../usr/bin/tool", root / "etc/tool-link")
    for p in sorted(root.rglob("*"), reverse=True):
        t = EPOCH + 3600 if ("mtime" in changes and p == root / "etc/os-release") else EPOCH
        os.utime(p, (t, t), follow_symlinks=False)
    os.utime(root, (EPOCH, EPOCH))
    return root


def make_squashfs(tree: Path, out: Path) -> Path:
    """squashfs with per-file mtimes kept and a fixed mkfs time; padded to 4 KiB for verity."""
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress", "-reproducible",
                    "-mkfs-time", str(EPOCH), "-comp", "gzip", "-all-root"], check=True, env=env)  # fmt: skip
    size = out.stat().st_size
    os.truncate(out, -(-size // 4096) * 4096)
    return out


def make_keys(d: Path) -> tuple[Path, Path]:
    from reprobuild.x509 import generate_rsa_key_and_certificate

    key, crt = d / "verity.key", d / "verity.crt"
    if not key.exists():
        k, c = generate_rsa_key_and_certificate("reprobuild diff test")
        key.write_bytes(k)
        crt.write_bytes(c)
    return key, crt


def make_ddi(work: Path, name: str, changes: frozenset[str] = frozenset(), keys: tuple[Path, Path] | None = None,
             extra_bytes: int = 0, esp: bool = True, fs: str = "squashfs", tree: Path | None = None,
             root_fs: Path | None = None) -> Path:  # fmt: skip
    """Build ``work/name.raw``: [ESP (vfat)] + root + verity + signature.

    The root is squashfs (per-file mtimes kept) or, with ``fs="erofs"`` or ``fs="ext4"``, that
    file system as the build makes it (`make_filesystem`). ``tree``: a root tree to use instead of `make_tree`'s (``changes``
    and ``extra_bytes`` then do not apply). ``root_fs``: a ready root file-system image."""
    from reprobuild.image.ddi import DdiSpec, build_ddi
    from reprobuild.image.fs import make_filesystem

    d = work / name
    d.mkdir(parents=True)
    if tree is None:
        tree = make_tree(d / "tree", changes, extra_bytes)
    if root_fs is not None:
        root_img = root_fs
    elif fs in ("erofs", "ext4"):
        root_img = d / f"root.{fs}"
        make_filesystem(fs, tree, root_img, uuid.UUID(int=7), EPOCH, "root")
    else:
        root_img = make_squashfs(tree, d / "root.squashfs")
    esp_img = None
    if esp:
        esp_tree = d / "esp"
        (esp_tree / "EFI/Linux").mkdir(parents=True)
        (esp_tree / "EFI/Linux/loader.conf").write_text("timeout 0\n")
        esp_img = d / "esp.vfat"
        make_filesystem("vfat", esp_tree, esp_img, uuid.UUID(int=1), EPOCH, "ESP")
    key, crt = keys or make_keys(work)
    out = work / f"{name}.raw"
    build_ddi(DdiSpec(architecture="amd64", seed=SEED, root_fs_image=root_img, output=out, verity="signed",
                      key=key, certificate=crt, esp_image=esp_img))  # fmt: skip
    return out


def set_partition_uuid(image: Path, index: int, new: uuid.UUID) -> None:
    """Rewrite one partition's unique GUID in both GPT copies, with correct CRCs."""
    from reprobuild.image import gpt

    with open(image, "rb") as f:
        disk = gpt.read_gpt(f)
    parts = list(disk.partitions)
    parts[index] = gpt.GptPartition(parts[index].type_guid, new, parts[index].first_lba, parts[index].last_lba,
                                    parts[index].attributes, parts[index].name)  # fmt: skip
    disk = gpt.GptDisk(disk.disk_guid, disk.sector_size, disk.total_sectors, disk.first_usable, disk.last_usable,
                       tuple(parts))  # fmt: skip
    head, tail = gpt.write_gpt(disk)
    with open(image, "r+b") as f:
        f.write(head)
        f.seek(gpt.tail_offset(disk))
        f.write(tail)


def corrupt_gpt_crc(image: Path) -> None:
    """Flip one byte of the primary GPT header's disk GUID (the stored CRC no longer matches)."""
    with open(image, "r+b") as f:
        f.seek(512 + 56)
        b = f.read(1)
        f.seek(512 + 56)
        f.write(bytes([b[0] ^ 0xFF]))


_ = (struct, zlib)
