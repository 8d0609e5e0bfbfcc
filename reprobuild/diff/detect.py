"""Recognise what a byte source is, by content (magic numbers), never by file name alone.

`detect` reads at most the first 64 KiB plus, for JSON, the whole object up to a limit. The
checks run most specific first: a GPT disk also starts with an MBR, a .deb is also an ar archive.
"""

from __future__ import annotations

import enum
import json
import struct

from reprobuild.diff.source import ByteSource
from reprobuild.rootfs.oci import is_oci_archive

HEAD = 64 * 1024
JSON_LIMIT = 64 << 20  # lockfiles and manifests are parsed whole; beyond this, treat as text


class Kind(str, enum.Enum):
    DIRECTORY = "directory"
    DISK = "disk"  # GPT partitioned image (a DDI)
    EROFS = "erofs"
    SQUASHFS = "squashfs"
    EXT4 = "ext4"
    VFAT = "vfat"
    VERITY_HASH = "verity-hash"
    VERITY_SIG = "verity-sig"
    TAR = "tar"
    OCI = "oci"  # an OCI image layout's archive (a tar: blobs/, index.json, oci-layout)
    CPIO = "cpio"
    DEB = "deb"
    PE = "pe"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    BZIP2 = "bzip2"
    LOCKFILE = "lockfile"
    JSON = "json"
    TEXT = "text"
    BINARY = "binary"
    EMPTY = "empty"


FILE_SYSTEMS = frozenset({Kind.EROFS, Kind.SQUASHFS, Kind.EXT4, Kind.VFAT})
ARCHIVES = frozenset({Kind.TAR, Kind.CPIO, Kind.OCI})
TREES = FILE_SYSTEMS | ARCHIVES | {Kind.DIRECTORY}
COMPRESSED = frozenset({Kind.GZIP, Kind.XZ, Kind.ZSTD, Kind.BZIP2})

EROFS_MAGIC = struct.pack("<I", 0xE0F5E1E2)  # at offset 1024 (erofs_fs.h EROFS_SUPER_OFFSET)
EXT_MAGIC = struct.pack("<H", 0xEF53)  # s_magic at superblock (1024) + 0x38


def detect(src: ByteSource) -> Kind:
    """The kind of ``src``. Cost: one read of up to 64 KiB (whole object for small JSON)."""
    if src.length == 0:
        return Kind.EMPTY
    head = src.head(HEAD)
    if head[512:520] == b"EFI PART" or head[4096:4104] == b"EFI PART":
        return Kind.DISK
    if head[:8] == b"verity\0\0":
        return Kind.VERITY_HASH
    if head[1024:1028] == EROFS_MAGIC:
        return Kind.EROFS
    if head[:4] == b"hsqs":
        return Kind.SQUASHFS
    if head[1024 + 0x38:1024 + 0x3A] == EXT_MAGIC:
        return Kind.EXT4
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32"):
        return Kind.VFAT
    if head[:6] in (b"070701", b"070702"):
        return Kind.CPIO
    if head[257:262] == b"ustar":
        return Kind.OCI if is_oci_archive(head) else Kind.TAR
    if head[:8] == b"!<arch>\n" and head[8:21] == b"debian-binary":
        return Kind.DEB
    if head[:2] == b"MZ" and len(head) >= 0x40:
        (pe,) = struct.unpack_from("<I", head, 0x3C)
        if head[pe:pe + 4] == b"PE\0\0":
            return Kind.PE
    if head[:3] == b"\x1f\x8b\x08":
        return Kind.GZIP
    if head[:6] == b"\xfd7zXZ\0":
        return Kind.XZ
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return Kind.ZSTD
    if head[:3] == b"BZh" and head[3:4].isdigit():
        return Kind.BZIP2
    stripped = head.lstrip()
    if stripped[:11] == b'{"rootHash"':
        return Kind.VERITY_SIG
    if stripped[:1] in (b"{", b"[") and src.length <= JSON_LIMIT:
        try:
            doc = json.loads(src.read(JSON_LIMIT).rstrip(b"\0"))
        except (UnicodeDecodeError, ValueError):
            doc = None
        else:
            if isinstance(doc, dict) and "config_digest" in doc and "sets" in doc:
                return Kind.LOCKFILE
            return Kind.JSON
    if is_text(head):
        return Kind.TEXT
    return Kind.BINARY


def is_text(head: bytes) -> bool:
    """UTF-8 without NUL bytes (a multi-byte character cut at the end of ``head`` is allowed)."""
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and len(head) >= HEAD
