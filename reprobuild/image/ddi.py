"""Assemble a Discoverable Disk Image: [ESP] + root/usr file system + verity hash + verity signature.

The result is what ``systemd-repart --seed=… --size=auto`` would write for the same partitions
(docs/formats.md §2-§6): GUIDs, labels and flags from `ids`, layout from `gpt`, hash tree from
`verity`, signature from `veritysig`. Every identifier comes from the 16-byte seed or the root
hash; nothing depends on time, cwd, umask or the host.

Cost: one pass over the root file system for the hash tree, one streaming copy of every payload
into the image, one read pass for the image digest. Memory: the hash tree (~1/128 of the data).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from reprobuild.errors import BuildError, FormatError
from reprobuild.image import gpt, ids, verity, veritysig
from reprobuild.image.ids import data_fs_uuid, esp_fs_uuid  # noqa: F401 (re-exported)
from reprobuild.signer import Signer, file_signer
from reprobuild.x509 import certificate_fingerprint, key_matches_certificate, load_certificate, load_key

VerityMode = Literal["signed", "hash", "no"]
Layout = Literal["root", "usr"]
_ROLES = ids.LAYOUT_ROLES


class DdiError(BuildError):
    """The DDI could not be assembled from the given inputs."""


@dataclass(frozen=True)
class DdiSpec:
    """Inputs of `build_ddi`. verity="signed" needs ``signer`` (a key file or token,
    reprobuild.signer), or ``key``/``certificate`` PEM files."""

    architecture: str
    seed: bytes
    root_fs_image: Path
    output: Path
    verity: VerityMode = "signed"
    key: Path | None = None
    certificate: Path | None = None
    esp_image: Path | None = None
    signer: Signer | None = None
    layout: Layout = "root"
    sector_size: int = 512
    label: str | None = None  # ``<id>_<version>`` (ImageId=, ImageVersion=) for root/usr, verity, signature
    # A/B ([Updates] SlotSize=): every root/usr, verity and signature partition gets a fixed slot
    # size (the data partition ``slot_size`` bytes, the others what it needs), and a second,
    # empty slot labelled ``_empty`` follows each: what systemd-sysupdate writes the next version into.
    slot_size: int | None = None


@dataclass(frozen=True)
class DdiPartition:
    role: str  # "esp", "root", "root-verity", "root-verity-sig", "usr", …
    type_guid: uuid.UUID
    uuid: uuid.UUID
    label: str
    attributes: int
    offset: int
    size: int
    sha256: str  # of the whole partition extent, zero padding included
    payload_size: int = 0  # the bytes written into it (an A/B slot is larger; an empty slot has none)

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "type": str(self.type_guid), "uuid": str(self.uuid), "label": self.label,
                "attributes": f"{self.attributes:#018x}", "offset": self.offset, "size": self.size,
                "sha256": self.sha256, "payload_size": self.payload_size}  # fmt: skip


@dataclass(frozen=True)
class DdiResult:
    path: Path
    disk_guid: uuid.UUID
    size: int
    sha256: str
    sector_size: int
    architecture: str
    verity: VerityMode
    root_hash: str | None
    certificate_fingerprint: str | None
    partitions: tuple[DdiPartition, ...] = field(default_factory=tuple)

    def manifest(self) -> dict[str, Any]:
        """JSON-ready description; the caller adds the lock digest and the package list."""
        return {"file": self.path.name, "size": self.size, "sha256": self.sha256,
                "architecture": self.architecture, "sector_size": self.sector_size,
                "disk_guid": str(self.disk_guid), "verity": self.verity, "root_hash": self.root_hash,
                "certificate_fingerprint": self.certificate_fingerprint,
                "partitions": [p.as_dict() for p in self.partitions]}  # fmt: skip


# -- identifiers the caller needs *before* building file systems ------------------------------------


# -- assembly ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    role: str
    ptype: ids.PartitionType
    uuid: uuid.UUID
    attributes: int
    payload: Path | None
    size: int


def _check_spec(spec: DdiSpec) -> ids.Architecture:
    try:
        arch = ids.Architecture.parse(spec.architecture)
    except ValueError as e:
        raise DdiError(str(e)) from e
    if len(spec.seed) != 16:
        raise DdiError(f"the image seed must be 16 bytes, got {len(spec.seed)}")
    if spec.verity not in ("signed", "hash", "no"):
        raise DdiError(f"verity must be 'signed', 'hash' or 'no', not {spec.verity!r}")
    if spec.layout not in _ROLES:
        raise DdiError(f"layout must be 'root' or 'usr', not {spec.layout!r}")
    if spec.verity == "signed" and spec.signer is None and (spec.key is None or spec.certificate is None):
        raise DdiError("verity=signed needs a key and a certificate", hint="run 'reprobuild keygen'")
    for p in (spec.root_fs_image, spec.esp_image):
        if p is not None and not Path(p).is_file():
            raise DdiError(f"{p}: no such file")
    size = os.path.getsize(spec.root_fs_image)
    if size == 0 or size % gpt.GRAIN:
        raise DdiError(f"{spec.root_fs_image}: size {size} is not a positive multiple of 4096 "
                       "(dm-verity covers whole 4 KiB blocks)")  # fmt: skip
    if spec.slot_size is not None:
        if spec.slot_size <= 0 or spec.slot_size % gpt.GRAIN:
            raise DdiError(f"slot size {spec.slot_size} is not a positive multiple of 4096")
        if size > spec.slot_size:
            raise DdiError(f"the root file system ({size} bytes) is larger than a slot ({spec.slot_size} bytes)",
                           hint="raise [Updates] SlotSize=")
    return arch


def slot_sizes(slot_size: int) -> dict[str, int]:
    """The A/B slot size of each kind of partition for a data slot of ``slot_size`` bytes: the
    verity hash slot holds the hash tree of a full data slot (sha256, 4 KiB blocks) and its
    superblock, the signature slot repart's fixed size."""
    params = verity.VerityParams(b"", uuid.UUID(int=0))
    blocks = slot_size // params.data_block_size
    return {"data": slot_size, "hash": (1 + sum(verity.level_sizes(blocks, params))) * params.hash_block_size,
            "sig": veritysig.VERITY_SIG_SIZE}


def build_ddi(spec: DdiSpec) -> DdiResult:
    """Build the DDI described by ``spec`` at ``spec.output`` (atomically: temp name + rename).

    Partitions, in this order: ESP (if given), root|usr, its verity hash (unless verity="no"), its
    verity signature (verity="signed"). Raises DdiError, FormatError, ToolMissing-free (pure Python).
    """
    arch = _check_spec(spec)
    data_role, hash_role, sig_role = _ROLES[spec.layout]
    out = Path(spec.output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    signer = spec.signer
    if spec.verity == "signed" and signer is None:
        key, cert = Path(spec.key).read_bytes(), load_certificate(Path(spec.certificate).read_bytes())
        if not key_matches_certificate(load_key(key), cert):
            raise DdiError(f"{spec.key} is not the key of certificate {spec.certificate}")
        signer = file_signer(key, cert, str(spec.key))

    types = [ids.partition_type(ids.Role.ESP)] if spec.esp_image else []
    types.append(ids.partition_type(data_role, arch))
    if spec.verity != "no":
        types.append(ids.partition_type(hash_role, arch))
    if spec.verity == "signed":
        types.append(ids.partition_type(sig_role, arch))
    seeded = ids.partition_uuids(spec.seed, [t.guid for t in types])
    labels = ids.versioned_labels(types, spec.label)

    with tempfile.TemporaryDirectory(prefix=".ddi-", dir=out.parent) as tmp:
        work = Path(tmp)
        planned: list[_Planned] = []
        it = iter(zip(types, seeded))
        root_hash: bytes | None = None
        if spec.esp_image:
            t, u = next(it)
            planned.append(_Planned("esp", t, u, ids.default_flags(t.role), Path(spec.esp_image),
                                    os.path.getsize(spec.esp_image)))  # fmt: skip
        t_data, u_data = next(it)
        if spec.verity == "no":
            planned.append(_Planned(data_role.value, t_data, u_data, ids.default_flags(data_role),
                                    Path(spec.root_fs_image), os.path.getsize(spec.root_fs_image)))  # fmt: skip
        else:
            # Salt and superblock UUID come from the seed alone (repart derive_salt / "verity-uuid").
            params = verity.VerityParams(ids.verity_salt(spec.seed), ids.verity_superblock_uuid(spec.seed))
            hash_file = work / "verity.img"
            tree = verity.write_hash_device(Path(spec.root_fs_image), hash_file, params)
            root_hash = tree.root_hash
            # DPS mode 1: the partition UUIDs are the first/last 128 bits of the root hash, unmasked.
            u_data, u_hash = ids.verity_partition_uuids(root_hash)
            t_hash, _ = next(it)
            planned.append(_Planned(data_role.value, t_data, u_data, ids.default_flags(data_role, verity_data=True),
                                    Path(spec.root_fs_image), os.path.getsize(spec.root_fs_image)))  # fmt: skip
            planned.append(_Planned(hash_role.value, t_hash, u_hash, ids.default_flags(hash_role), hash_file,
                                    tree.hash_device_size))  # fmt: skip
            if spec.verity == "signed":
                t_sig, u_sig = next(it)
                if spec.slot_size is not None:  # A/B: unique across versions (ids.versioned_sig_uuid)
                    u_sig = ids.versioned_sig_uuid(root_hash)
                sig_file = work / "verity-sig.img"
                sig_file.write_bytes(veritysig.make_verity_sig(root_hash, signer))
                planned.append(_Planned(sig_role.value, t_sig, u_sig, ids.default_flags(sig_role), sig_file,
                                        veritysig.VERITY_SIG_SIZE))  # fmt: skip

        if spec.slot_size is not None:
            planned, labels = _with_slots(planned, labels, spec, (data_role, hash_role, sig_role))

        requests = [gpt.PartitionRequest(p.ptype.guid, p.uuid, label, p.attributes, p.size)
                    for p, label in zip(planned, labels)]  # fmt: skip
        disk_guid = ids.disk_uuid(spec.seed)
        try:
            disk = gpt.layout_disk(requests, disk_guid, spec.sector_size)
        except ValueError as e:
            raise DdiError(f"cannot lay out the disk: {e}") from e
        tmp_image = work / "image.raw"
        written = gpt.write_image(disk, [p.payload for p in planned], tmp_image)
        digests, image_sha = written.partition_sha256, written.sha256
        payload_sizes = [os.path.getsize(p.payload) if p.payload is not None else 0 for p in planned]
        with open(tmp_image, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_image, out)  # never visible half-written under its final name

    parts = tuple(
        DdiPartition(p.role, p.ptype.guid, p.uuid, gp.name, gp.attributes, gp.offset(disk.sector_size),
                     gp.size(disk.sector_size), d, size)
        for p, gp, d, size in zip(planned, disk.partitions, digests, payload_sizes)
    )
    return DdiResult(out, disk_guid, disk.size_bytes, image_sha, disk.sector_size, arch.value, spec.verity,
                     root_hash.hex() if root_hash else None,
                     certificate_fingerprint(signer.certificate) if signer is not None and spec.verity == "signed" else None, parts)  # fmt: skip



def _with_slots(planned: list[_Planned], labels: list[str], spec: DdiSpec,
                roles: tuple[ids.Role, ids.Role, ids.Role]) -> tuple[list[_Planned], list[str]]:
    """A/B: the data, verity and signature partitions grown to their slot size, then an empty
    second slot of each (the type's second seed-derived UUID, label ``_empty``)."""
    assert spec.slot_size is not None
    sizes = slot_sizes(spec.slot_size)
    kind = {roles[0].value: "data", roles[1].value: "hash", roles[2].value: "sig"}
    grown, empty = [], []
    for p in planned:
        if p.role not in kind:
            grown.append(p)
            continue
        size = sizes[kind[p.role]]
        if p.size > size:  # the data partition was checked in _check_spec; the others follow from it
            raise DdiError(f"the {p.role} partition ({p.size} bytes) is larger than its slot ({size} bytes)")
        grown.append(_Planned(p.role, p.ptype, p.uuid, p.attributes, p.payload, size))
        empty.append(_Planned(p.role, p.ptype, ids.partition_uuid(spec.seed, p.ptype.guid, 1), p.attributes, None,
                              size))
    return grown + empty, labels + [ids.EMPTY_LABEL] * len(empty)


def extract_partition(image: Path, part: gpt.GptPartition, sector_size: int, out: Path) -> None:
    """Copy one partition's bytes out of an image (for verification and tests). Streams."""
    with open(out, "wb") as dst:
        copy_partition(image, part, sector_size, dst)


def copy_partition(image: Path, part: gpt.GptPartition, sector_size: int, dst: BinaryIO) -> None:
    """Stream one partition's extent (its zero padding included) from ``image`` into ``dst``."""
    left = part.size(sector_size)
    with open(image, "rb") as src:
        src.seek(part.offset(sector_size))
        while left:
            chunk = src.read(min(left, 4 << 20))
            if not chunk:
                raise FormatError(f"{image} ends inside partition {part.name!r}")
            dst.write(chunk)
            left -= len(chunk)
