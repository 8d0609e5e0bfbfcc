"""Identifiers of a Discoverable Disk Image, derived exactly as systemd-repart derives them.

Nothing here reads the clock or a random source: every UUID and salt is a pure function of the
16-byte image seed (or, for the verity pair, of the root hash). See docs/formats.md §3 (type GUIDs,
flags, labels) and §4 (derivations). All functions are O(1) HMAC-SHA256 computations.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import uuid
from dataclasses import dataclass

# -- systemd's id128_make_v4_uuid (docs/formats.md §1) ------------------------------------------


def make_v4(b16: bytes) -> uuid.UUID:
    """Force the version (4) and variant (RFC 4122) bits of 16 bytes, as ``id128_make_v4_uuid``."""
    if len(b16) != 16:
        raise ValueError(f"a UUID needs 16 bytes, got {len(b16)}")
    b = bytearray(b16)
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(b))


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _check_seed(seed: bytes) -> None:
    if len(seed) != 16:
        raise ValueError(f"the image seed must be 16 bytes, got {len(seed)}")


# -- repart's derivations (docs/formats.md §4) ---------------------------------------------------


def derive_uuid(key16: bytes, token: str) -> uuid.UUID:
    """``v4(HMAC-SHA256(key16, token)[:16])``; token is ASCII without NUL (repart ``derive_uuid``)."""
    _check_seed(key16)
    return make_v4(_hmac(key16, token.encode("ascii"))[:16])


def disk_uuid(seed: bytes) -> uuid.UUID:
    """The GPT disk GUID repart derives from ``--seed``."""
    return derive_uuid(seed, "disk-uuid")


def partition_uuid(seed: bytes, type_uuid: uuid.UUID, k: int = 0) -> uuid.UUID:
    """Unique partition GUID of the (k+1)-th partition of ``type_uuid`` in definition order.

    repart hashes the RFC-order type bytes, followed by the little-endian u64 counter only when
    k > 0 (so the first partition of a type hashes the 16 type bytes alone).
    """
    _check_seed(seed)
    if k < 0:
        raise ValueError("the partition counter cannot be negative")
    msg = type_uuid.bytes + (struct.pack("<Q", k) if k else b"")
    return make_v4(_hmac(seed, msg)[:16])


def fs_uuid(part_uuid: uuid.UUID) -> uuid.UUID:
    """File system UUID: keyed by the *seed-derived* partition UUID (RFC bytes)."""
    return derive_uuid(part_uuid.bytes, "file-system-uuid")


def verity_salt(seed: bytes) -> bytes:
    """The 32-byte dm-verity salt; shared by every verity pair of an image."""
    _check_seed(seed)
    return _hmac(seed, b"verity-salt")


def verity_superblock_uuid(seed: bytes) -> uuid.UUID:
    """UUID written into the verity superblock (RFC byte order there)."""
    return derive_uuid(seed, "verity-uuid")


def verity_partition_uuids(root_hash: bytes) -> tuple[uuid.UUID, uuid.UUID]:
    """(data partition UUID, hash partition UUID): first and last 16 bytes of the root hash, unmasked.

    This is DPS "mode 1" discovery: a trusted ``roothash=`` finds both partitions.
    """
    if len(root_hash) < 16:
        raise ValueError("root hash too short to derive partition UUIDs")
    return uuid.UUID(bytes=bytes(root_hash[:16])), uuid.UUID(bytes=bytes(root_hash[-16:]))


def versioned_sig_uuid(root_hash: bytes) -> uuid.UUID:
    """The verity signature partition's UUID in an A/B image: ``v4(HMAC-SHA256(root hash,
    "reprobuild-verity-sig-uuid")[:16])``. systemd-repart derives it from the seed, which every
    version of one definition shares; systemd-sysupdate gives a new partition the UUID named in
    the release, and two partitions of one disk must never share a UUID (UEFI: unique partition GUID)."""
    if len(root_hash) < 16:
        raise ValueError("root hash too short to derive a partition UUID")
    return make_v4(_hmac(bytes(root_hash), b"reprobuild-verity-sig-uuid")[:16])


# -- DPS partition types, labels and flags (docs/formats.md §3) ----------------------------------


class Architecture(enum.Enum):
    """Architectures reprobuild builds for, by their Debian name; ``dps`` is systemd's suffix."""

    AMD64 = "amd64"
    ARM64 = "arm64"

    @property
    def dps(self) -> str:
        return {"amd64": "x86-64", "arm64": "arm64"}[self.value]

    @classmethod
    def parse(cls, name: str) -> Architecture:
        """Accept Debian (amd64/arm64) or systemd (x86-64/arm64/aarch64) spellings."""
        aliases = {"amd64": cls.AMD64, "x86-64": cls.AMD64, "x86_64": cls.AMD64,
                   "arm64": cls.ARM64, "aarch64": cls.ARM64}  # fmt: skip
        try:
            return aliases[name.lower()]
        except KeyError:
            raise ValueError(f"unsupported architecture {name!r} (known: amd64, arm64)") from None


class Role(enum.Enum):
    """Partition roles; the architecture-dependent ones are looked up in ``_ARCH_TYPES``."""

    ROOT = "root"
    USR = "usr"
    ROOT_VERITY = "root-verity"
    USR_VERITY = "usr-verity"
    ROOT_VERITY_SIG = "root-verity-sig"
    USR_VERITY_SIG = "usr-verity-sig"
    ESP = "esp"
    XBOOTLDR = "xbootldr"
    SWAP = "swap"
    HOME = "home"
    SRV = "srv"
    VAR = "var"
    TMP = "tmp"


_U = uuid.UUID
_ARCH_TYPES: dict[Architecture, dict[Role, uuid.UUID]] = {
    Architecture.AMD64: {
        Role.ROOT: _U("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
        Role.USR: _U("8484680c-9521-48c6-9c11-b0720656f69e"),
        Role.ROOT_VERITY: _U("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5"),
        Role.USR_VERITY: _U("77ff5f63-e7b6-4633-acf4-1565b864c0e6"),
        Role.ROOT_VERITY_SIG: _U("41092b05-9fc8-4523-994f-2def0408b176"),
        Role.USR_VERITY_SIG: _U("e7bb33fb-06cf-4e81-8273-e543b413e2e2"),
    },
    Architecture.ARM64: {
        Role.ROOT: _U("b921b045-1df0-41c3-af44-4c6f280d3fae"),
        Role.USR: _U("b0e01050-ee5f-4390-949a-9101b17104e9"),
        Role.ROOT_VERITY: _U("df3300ce-d69f-4c92-978c-9bfb0f38d820"),
        Role.USR_VERITY: _U("6e11a4e7-fbca-4ded-b9e9-e1a512bb664e"),
        Role.ROOT_VERITY_SIG: _U("6db69de6-29f4-4758-a7a5-962190f00ce3"),
        Role.USR_VERITY_SIG: _U("c23ce4ff-44bd-4b00-b2d4-b41b3419e02a"),
    },
}
_GENERIC_TYPES: dict[Role, uuid.UUID] = {
    Role.ESP: _U("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
    Role.XBOOTLDR: _U("bc13c2ff-59e6-4262-a352-b275fd6f7172"),
    Role.SWAP: _U("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"),
    Role.HOME: _U("933ac7e1-2eb4-4f13-b844-0e14e2aef915"),
    Role.SRV: _U("3b8f8425-20e0-4f3b-907f-1a25a76f98e8"),
    Role.VAR: _U("4d21b016-b534-45c2-a9fb-5c16e091fd2d"),
    Role.TMP: _U("7ec6f557-3bc5-4aca-b293-16ef5df639d1"),
}

# Attribute bits (u64 at partition entry offset 48), docs/formats.md §3.
FLAG_GROWFS = 1 << 59
FLAG_READ_ONLY = 1 << 60
FLAG_NO_AUTO = 1 << 63

_ARCH_ROLES = frozenset(_ARCH_TYPES[Architecture.AMD64])
_VERITY_ROLES = frozenset({Role.ROOT_VERITY, Role.USR_VERITY})
_GROWFS_ROLES = frozenset({Role.ROOT, Role.USR, Role.HOME, Role.SRV, Role.VAR, Role.TMP, Role.XBOOTLDR})


@dataclass(frozen=True)
class PartitionType:
    """A DPS partition type: its role, architecture (None if generic) and GPT type GUID."""

    role: Role
    architecture: Architecture | None
    guid: uuid.UUID

    @property
    def default_label(self) -> str:
        """repart's default label: the first name of the type in systemd's table (``root-x86-64``)."""
        if self.architecture is None:
            return self.role.value
        base, _, suffix = self.role.value.partition("-")
        return f"{base}-{self.architecture.dps}" + (f"-{suffix}" if suffix else "")


def partition_type(role: Role, architecture: Architecture | None = None) -> PartitionType:
    """Look up the DPS type GUID for a role (architecture required for root/usr/verity/sig)."""
    if role in _ARCH_ROLES:
        if architecture is None:
            raise ValueError(f"partition role {role.value} needs an architecture")
        return PartitionType(role, architecture, _ARCH_TYPES[architecture][role])
    return PartitionType(role, None, _GENERIC_TYPES[role])


def type_by_guid(guid: uuid.UUID) -> PartitionType | None:
    """Reverse lookup, for readers (diff, verify); None for types outside the DPS table."""
    for arch, table in _ARCH_TYPES.items():
        for role, g in table.items():
            if g == guid:
                return PartitionType(role, arch, g)
    for role, g in _GENERIC_TYPES.items():
        if g == guid:
            return PartitionType(role, None, g)
    return None


def default_flags(role: Role, *, verity_data: bool = False) -> int:
    """repart 252 default attribute flags.

    Read-only is implied for verity hash partitions and for ``Verity=data`` partitions; the sig
    partition is *not* marked (repart leaves it alone, docs/formats.md §3). GrowFS is on for types
    that support it unless the partition is read-only.
    """
    if role in _VERITY_ROLES or verity_data:
        return FLAG_READ_ONLY
    if role in _GROWFS_ROLES:
        return FLAG_GROWFS
    return 0


def default_labels(types: list[PartitionType]) -> list[str]:
    """Labels for partitions in definition order: the type's default, then ``-2``, ``-3`` … for repeats."""
    seen: dict[str, int] = {}
    out = []
    for t in types:
        base = t.default_label
        n = seen.get(base, 0) + 1
        seen[base] = n
        out.append(base if n == 1 else f"{base}-{n}")
    return out


def versioned_labels(types: list[PartitionType], versioned: str | None) -> list[str]:
    """Labels with ImageId=/ImageVersion=: every partition but the ESP is labelled ``<id>_<version>``,
    the form systemd-sysupdate's ``MatchPattern=<id>_@v`` reads the version from (sysupdate.d(5));
    the partition type tells root, verity and signature apart. Without: :func:`default_labels`."""
    defaults = default_labels(types)
    if versioned is None:
        return defaults
    return [label if t.role in (Role.ESP, Role.XBOOTLDR) else versioned for t, label in zip(types, defaults)]


# The label systemd-sysupdate gives a partition slot that holds no version yet (sysupdate.d(5)).
EMPTY_LABEL = "_empty"


def partition_uuids(seed: bytes, types: list[uuid.UUID]) -> list[uuid.UUID]:
    """Seed-derived partition UUIDs in definition order, with repart's per-type counter."""
    counts: dict[uuid.UUID, int] = {}
    out = []
    for t in types:
        k = counts.get(t, 0)
        counts[t] = k + 1
        out.append(partition_uuid(seed, t, k))
    return out


# The roles of the data, verity and verity signature partitions, per layout.
LAYOUT_ROLES: dict[str, tuple[Role, Role, Role]] = {
    "root": (Role.ROOT, Role.ROOT_VERITY, Role.ROOT_VERITY_SIG),
    "usr": (Role.USR, Role.USR_VERITY, Role.USR_VERITY_SIG),
}


def data_fs_uuid(seed: bytes, architecture: str, layout: str = "root") -> uuid.UUID:
    """UUID to give the root/usr file system: derived from the partition's *seed-derived* UUID
    (as repart does, because the verity UUIDs only exist after the file system is built)."""
    arch = Architecture.parse(architecture)
    t = partition_type(LAYOUT_ROLES[layout][0], arch)
    return fs_uuid(partition_uuid(seed, t.guid, 0))


def esp_fs_uuid(seed: bytes) -> uuid.UUID:
    """UUID (vfat: its first 32 bits are the volume id) for the ESP file system."""
    return fs_uuid(partition_uuid(seed, partition_type(Role.ESP).guid, 0))
