"""GUID Partition Table: layout like systemd-repart, write, and read back with full validation.

Formats follow UEFI spec ch. 5 and docs/formats.md §2 (the values libfdisk/repart write). The core
(`layout_disk`, `write_gpt`, `parse_*`) is pure; `write_image` and `read_gpt` are thin I/O shells
that stream, so a multi-GiB image is never held in memory.
"""

from __future__ import annotations

import itertools
import os
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reprobuild.errors import FormatError
from reprobuild.fileio import HashThread


class GptInvalid(FormatError):
    """The data is not a valid GPT disk (bad magic, CRC, geometry or partition table)."""


# -- constants (docs/formats.md §2) ---------------------------------------------------------------

SIGNATURE = b"EFI PART"
REVISION = 0x00010000
HEADER_SIZE = 92
ENTRY_COUNT = 128  # what libfdisk/repart write
ENTRY_SIZE = 128
ARRAY_BYTES = ENTRY_COUNT * ENTRY_SIZE  # 16 KiB
GRAIN = 4096  # repart: partition offsets and sizes are multiples of max(4096, sector size)
FIRST_USABLE_BYTES = 1 << 20  # libfdisk topology alignment: first usable LBA 2048 at 512 B sectors
NAME_UNITS = 36  # UTF-16 code units in a partition name
# Reader limits against hostile input: no real disk needs more, and they bound allocations.
MAX_ARRAY_BYTES = 1 << 20
MAX_ENTRY_SIZE = 4096
SECTOR_SIZES = (512, 4096)

# Protective MBR partition record (UEFI 5.2.3; docs/formats.md §2 "LBA 0"): boot indicator, CHS start,
# OS type, CHS end, StartingLBA, SizeInLBA.
MBR_RECORD = struct.Struct("<B3sB3sII")
MBR_RECORDS_OFFSET = 446
MBR_SIGNATURE_OFFSET = 510
PROTECTIVE_TYPE = 0xEE

# GPT header (UEFI 5.3.2; docs/formats.md §2 "LBA 1"): Signature, Revision, HeaderSize,
# HeaderCRC32, Reserved, MyLBA, AlternateLBA, FirstUsableLBA, LastUsableLBA, DiskGUID (mixed-endian),
# PartitionEntryLBA, NumberOfPartitionEntries, SizeOfPartitionEntry, PartitionEntryArrayCRC32.
HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
assert HEADER.size == HEADER_SIZE
HEADER_CRC_OFFSET = 16

# Partition entry (UEFI 5.3.3): TypeGUID, UniqueGUID (both mixed-endian), StartingLBA,
# EndingLBA (inclusive), Attributes, Name (36 UTF-16LE code units, NUL padded).
ENTRY = struct.Struct("<16s16sQQQ72s")
assert ENTRY.size == ENTRY_SIZE


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# -- model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GptPartition:
    """One used partition entry. ``last_lba`` is inclusive, as on disk."""

    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str

    def offset(self, sector_size: int) -> int:
        return self.first_lba * sector_size

    def size(self, sector_size: int) -> int:
        return (self.last_lba - self.first_lba + 1) * sector_size


@dataclass(frozen=True)
class GptDisk:
    """A whole disk: geometry plus the used entries, in array order (indices 0..n-1 when written)."""

    disk_guid: uuid.UUID
    sector_size: int
    total_sectors: int
    first_usable: int
    last_usable: int
    partitions: tuple[GptPartition, ...]

    @property
    def array_sectors(self) -> int:
        return round_up(ARRAY_BYTES, self.sector_size) // self.sector_size

    @property
    def size_bytes(self) -> int:
        return self.total_sectors * self.sector_size


@dataclass(frozen=True)
class PartitionRequest:
    """What `layout_disk` places: ``size`` in bytes (rounded up to the grain)."""

    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    name: str
    attributes: int
    size: int


# -- layout --------------------------------------------------------------------------------------


def layout_disk(
    requests: Sequence[PartitionRequest], disk_guid: uuid.UUID, sector_size: int = 512
) -> GptDisk:
    """Place partitions back to back as repart does with ``--size=auto``.

    The first partition starts at 1 MiB; offsets and sizes are multiples of the grain
    (max(4096, sector size)); the image ends at ``round_up(end_of_last + backup_structures, grain)``
    (docs/formats.md §2, checked against repart 252 in tests/test_gpt.py). O(number of partitions).
    """
    if sector_size not in SECTOR_SIZES:
        raise ValueError(f"sector size must be 512 or 4096, not {sector_size}")
    if len(requests) > ENTRY_COUNT:
        raise ValueError(f"at most {ENTRY_COUNT} partitions fit in the table")
    grain = max(GRAIN, sector_size)
    array_sectors = ARRAY_BYTES // sector_size
    first_usable = FIRST_USABLE_BYTES // sector_size
    offset = round_up(first_usable * sector_size, grain)
    parts = []
    for r in requests:
        if r.size <= 0:
            raise ValueError(f"partition {r.name!r} has no size")
        _encode_name(r.name)  # fail early on over-long names
        size = round_up(r.size, grain)
        first = offset // sector_size
        parts.append(GptPartition(r.type_guid, r.unique_guid, first, first + size // sector_size - 1,
                                  r.attributes, r.name))  # fmt: skip
        offset += size
    # Backup array + backup header after the last partition, then round to the grain.
    total_bytes = round_up(offset + (array_sectors + 1) * sector_size, grain)
    total = total_bytes // sector_size
    return GptDisk(disk_guid, sector_size, total, first_usable, total - array_sectors - 2, tuple(parts))


# -- writing (pure) ------------------------------------------------------------------------------


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-16-le")
    if len(raw) > NAME_UNITS * 2:
        raise ValueError(f"partition name {name!r} is longer than {NAME_UNITS} UTF-16 code units")
    return raw


def pack_entries(partitions: Sequence[GptPartition]) -> bytes:
    """The full 128×128-byte entry array: used entries first, the rest zero."""
    out = bytearray(ARRAY_BYTES)
    for i, p in enumerate(partitions):
        ENTRY.pack_into(out, i * ENTRY_SIZE, p.type_guid.bytes_le, p.unique_guid.bytes_le,
                        p.first_lba, p.last_lba, p.attributes, _encode_name(p.name))  # fmt: skip
    return bytes(out)


def pack_header(disk: GptDisk, *, backup: bool, array_crc: int) -> bytes:
    """One header sector (92 significant bytes, zero-filled), with its CRC computed."""
    last = disk.total_sectors - 1
    my_lba, alt_lba = (last, 1) if backup else (1, last)
    entries_lba = last - disk.array_sectors if backup else 2
    fields = [SIGNATURE, REVISION, HEADER_SIZE, 0, 0, my_lba, alt_lba, disk.first_usable,
              disk.last_usable, disk.disk_guid.bytes_le, entries_lba, ENTRY_COUNT, ENTRY_SIZE,
              array_crc]  # fmt: skip
    crc = zlib.crc32(HEADER.pack(*fields))
    fields[3] = crc
    return HEADER.pack(*fields).ljust(disk.sector_size, b"\0")


def pack_protective_mbr(disk: GptDisk) -> bytes:
    """LBA 0: one 0xEE record covering the disk (capped at 2^32-1 sectors), boot code zero."""
    mbr = bytearray(disk.sector_size)
    size = min(disk.total_sectors - 1, 0xFFFFFFFF)
    MBR_RECORD.pack_into(mbr, MBR_RECORDS_OFFSET, 0, b"\x00\x02\x00", PROTECTIVE_TYPE, b"\xff\xff\xff", 1, size)
    mbr[MBR_SIGNATURE_OFFSET:MBR_SIGNATURE_OFFSET + 2] = b"\x55\xaa"
    return bytes(mbr)


def _check_disk(disk: GptDisk) -> None:
    if disk.sector_size not in SECTOR_SIZES:
        raise ValueError(f"sector size must be 512 or 4096, not {disk.sector_size}")
    if len(disk.partitions) > ENTRY_COUNT:
        raise ValueError(f"at most {ENTRY_COUNT} partitions fit in the table")
    problem = _partition_problem(disk.partitions, disk.first_usable, disk.last_usable)
    if problem:
        raise ValueError(problem)
    if disk.last_usable != disk.total_sectors - disk.array_sectors - 2:
        raise ValueError("last usable LBA does not leave room for the backup structures")


def write_gpt(disk: GptDisk) -> tuple[bytes, bytes]:
    """(head, tail): MBR + primary header + array for LBA 0.., and backup array + header for the end.

    ``head`` goes at offset 0, ``tail`` at ``(total_sectors - 1 - array_sectors) * sector_size``.
    """
    _check_disk(disk)
    array = pack_entries(disk.partitions)
    array_crc = zlib.crc32(array)
    head = pack_protective_mbr(disk) + pack_header(disk, backup=False, array_crc=array_crc) + array
    tail = array + pack_header(disk, backup=True, array_crc=array_crc)
    return head, tail


def tail_offset(disk: GptDisk) -> int:
    return (disk.total_sectors - 1 - disk.array_sectors) * disk.sector_size


# -- writing (I/O shell) -------------------------------------------------------------------------

_CHUNK = 4 << 20
_ZEROS = bytes(_CHUNK)


@dataclass(frozen=True)
class WrittenImage:
    partition_sha256: list[str]  # of every partition's full extent (payload + zero padding)
    sha256: str  # of the whole image file


def _zeros(n: int) -> Iterator[memoryview]:
    if n < 0:
        raise ValueError("internal error: writing backwards")
    while n:
        k = min(n, _CHUNK)
        yield memoryview(_ZEROS)[:k]
        n -= k


def write_image(disk: GptDisk, payloads: Sequence[Path | None], out: Path) -> WrittenImage:
    """Write the whole image to ``out`` (created/truncated), streaming each payload into its partition.

    ``payloads[i]`` fills partition i from its start (None = leave zero); a payload larger than its
    partition is an error. Unwritten ranges stay as holes (they read as zeros). Returns the sha256
    of every partition's full extent (payload + zero padding) and of the whole image. Cost: one
    pass over the payloads; the two kinds of digest are computed by two threads meanwhile.
    """
    if len(payloads) != len(disk.partitions):
        raise ValueError("one payload (or None) per partition is required")
    for part, src in zip(disk.partitions, payloads):
        if src is not None and os.path.getsize(src) > part.size(disk.sector_size):
            raise ValueError(f"{src} does not fit into partition {part.name!r} ({part.size(disk.sector_size)} bytes)")
    head, tail = write_gpt(disk)
    parts, whole = HashThread("image-hash"), HashThread("image-hash")
    position = 0  # how far ``whole`` has been fed: every byte of the file, in order

    def at(offset: int, data: bytes | memoryview) -> None:
        nonlocal position
        for gap in _zeros(offset - position):  # a hole before ``offset``
            whole.update(gap)
        whole.update(data)
        position = offset + len(data)

    # In the order of their offsets (the table's order need not be), so that the image's bytes
    # reach ``whole`` in file order; partition digests are returned in the table's order.
    order = sorted(range(len(payloads)), key=lambda i: disk.partitions[i].offset(disk.sector_size))
    try:
        with open(out, "wb") as f:
            f.write(head)
            at(0, head)
            for part, src in ((disk.partitions[i], payloads[i]) for i in order):
                offset, size = part.offset(disk.sector_size), part.size(disk.sector_size)
                f.seek(offset)
                written = 0
                if src is not None:
                    with open(src, "rb") as s:
                        while written < size and (chunk := s.read(min(_CHUNK, size - written))):
                            f.write(chunk)
                            parts.update(chunk)
                            at(offset + written, chunk)
                            written += len(chunk)
                for zeros in _zeros(size - written):
                    parts.update(zeros)
                    at(offset + written, zeros)
                    written += len(zeros)
                parts.cut()
            f.seek(tail_offset(disk))
            f.write(tail)
            at(tail_offset(disk), tail)
            f.truncate(disk.size_bytes)
            for gap in _zeros(disk.size_bytes - position):
                whole.update(gap)
            whole.cut()
    finally:
        partition_sha256, image_sha256 = parts.close(), whole.close()
    in_table_order = [""] * len(order)
    for i, digest in zip(order, partition_sha256, strict=True):
        in_table_order[i] = digest
    return WrittenImage(in_table_order, image_sha256[0])


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: uuid.UUID
    entries_lba: int
    entry_count: int
    entry_size: int
    array_crc: int


def parse_header(sector: bytes, what: str = "GPT header") -> _Header:
    """Validate signature, size and CRC of one header sector (pure)."""
    if len(sector) < HEADER_SIZE:
        raise GptInvalid(f"{what}: truncated")
    (sig, rev, hsize, crc, _res, my_lba, alt, first, last, guid, entries_lba, count, esize,
     acrc) = HEADER.unpack_from(sector)  # fmt: skip
    if sig != SIGNATURE:
        raise GptInvalid(f"{what}: no 'EFI PART' signature")
    if rev >> 16 != 1:
        raise GptInvalid(f"{what}: unsupported revision {rev:#010x}")
    if not HEADER_SIZE <= hsize <= len(sector):
        raise GptInvalid(f"{what}: header size {hsize} out of range")
    raw = bytearray(sector[:hsize])
    raw[HEADER_CRC_OFFSET:HEADER_CRC_OFFSET + 4] = bytes(4)
    if zlib.crc32(raw) != crc:
        raise GptInvalid(f"{what}: header CRC32 mismatch (stored {crc:#010x}, computed {zlib.crc32(raw):#010x})")
    if esize < ENTRY_SIZE or esize > MAX_ENTRY_SIZE or esize % ENTRY_SIZE:
        raise GptInvalid(f"{what}: absurd partition entry size {esize}")
    if count == 0 or count * esize > MAX_ARRAY_BYTES:
        raise GptInvalid(f"{what}: absurd partition entry count {count} (x {esize} bytes)")
    return _Header(my_lba, alt, first, last, uuid.UUID(bytes_le=guid), entries_lba, count, esize, acrc)


def parse_entries(array: bytes, count: int, esize: int) -> tuple[GptPartition, ...]:
    """Decode used entries (non-zero type GUID) in array order (pure)."""
    parts = []
    for i in range(count):
        tguid, ugid, first, last, attrs, name = ENTRY.unpack_from(array, i * esize)
        if tguid == bytes(16):
            continue
        try:
            text = name.decode("utf-16-le").split("\0", 1)[0]
        except UnicodeDecodeError as e:
            raise GptInvalid(f"partition entry {i}: name is not valid UTF-16") from e
        parts.append(GptPartition(uuid.UUID(bytes_le=tguid), uuid.UUID(bytes_le=ugid), first, last, attrs, text))
    return tuple(parts)


def _partition_problem(parts: Sequence[GptPartition], first_usable: int, last_usable: int) -> str | None:
    for i, p in enumerate(parts):
        if p.first_lba > p.last_lba:
            return f"partition {i + 1} ({p.name!r}) ends before it starts"
        if p.first_lba < first_usable or p.last_lba > last_usable:
            return (f"partition {i + 1} ({p.name!r}) LBA {p.first_lba}-{p.last_lba} lies outside the usable "
                    f"range {first_usable}-{last_usable}")  # fmt: skip
    ordered = sorted(enumerate(parts), key=lambda ip: ip[1].first_lba)
    for (i, a), (j, b) in itertools.pairwise(ordered):
        if b.first_lba <= a.last_lba:
            return f"partitions {i + 1} ({a.name!r}) and {j + 1} ({b.name!r}) overlap"
    seen: set[uuid.UUID] = set()
    for i, p in enumerate(parts):
        if p.unique_guid in seen:
            return f"partition {i + 1} ({p.name!r}) reuses unique GUID {p.unique_guid}"
        seen.add(p.unique_guid)
    return None


def _read_at(f: BinaryIO, offset: int, n: int, file_size: int, what: str) -> bytes:
    if offset < 0 or offset + n > file_size:
        raise GptInvalid(f"{what} lies beyond the end of the image (truncated file?)")
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise GptInvalid(f"{what}: short read (truncated file?)")
    return data


def detect_sector_size(f: BinaryIO, file_size: int) -> int:
    """512 or 4096: where ``EFI PART`` sits (512 is tried first, as the DDI spec says)."""
    for ss in SECTOR_SIZES:
        if file_size >= 2 * ss:
            f.seek(ss)
            if f.read(8) == SIGNATURE:
                return ss
    raise GptInvalid("no GPT header ('EFI PART') at offset 512 or 4096")


def read_gpt(f: BinaryIO) -> GptDisk:
    """Read and validate a GPT disk from a seekable binary file.

    Checks: protective MBR, header signature/size/CRC, entry size/count limits (≤ 1 MiB array),
    array CRC, geometry (usable range inside the disk, clear of the tables), partitions inside the
    usable range, no overlaps or duplicate GUIDs, and that the backup header at the last sector
    mirrors the primary. Every problem raises `GptInvalid`. Reads O(array size) bytes.
    """
    try:
        f.seek(0, os.SEEK_END)
        file_size = f.tell()
    except OSError as e:
        raise GptInvalid(f"cannot seek in image: {e}") from e
    ss = detect_sector_size(f, file_size)
    total = file_size // ss
    mbr = _read_at(f, 0, 512, file_size, "protective MBR")
    if mbr[MBR_SIGNATURE_OFFSET:MBR_SIGNATURE_OFFSET + 2] != b"\x55\xaa":
        raise GptInvalid("no MBR boot signature 55 AA at offset 510")
    types = [MBR_RECORD.unpack_from(mbr, MBR_RECORDS_OFFSET + 16 * i)[2] for i in range(4)]
    if PROTECTIVE_TYPE not in types:
        raise GptInvalid("no protective MBR record (type 0xEE)")

    hdr = parse_header(_read_at(f, ss, ss, file_size, "primary GPT header"), "primary GPT header")
    if hdr.my_lba != 1:
        raise GptInvalid(f"primary GPT header claims to be at LBA {hdr.my_lba}, not 1")
    array_bytes = hdr.entry_count * hdr.entry_size
    array_sectors = round_up(array_bytes, ss) // ss
    if hdr.entries_lba < 2 or hdr.entries_lba + array_sectors > total:
        raise GptInvalid(f"partition entry array at LBA {hdr.entries_lba} lies outside the image (truncated?)")
    array = _read_at(f, hdr.entries_lba * ss, array_bytes, file_size, "partition entry array")
    if zlib.crc32(array) != hdr.array_crc:
        raise GptInvalid("partition entry array CRC32 mismatch")
    if hdr.alternate_lba >= total:
        raise GptInvalid(f"backup GPT header at LBA {hdr.alternate_lba} is beyond the end of the image "
                         f"({total} sectors): truncated file")  # fmt: skip
    if hdr.alternate_lba != total - 1:
        raise GptInvalid(f"backup GPT header at LBA {hdr.alternate_lba}, but the image ends at LBA {total - 1}")
    if not (hdr.entries_lba + array_sectors <= hdr.first_usable <= hdr.last_usable < total - 1 - array_sectors):
        raise GptInvalid(f"usable range {hdr.first_usable}-{hdr.last_usable} overlaps the GPT structures "
                         f"or the end of the image")  # fmt: skip
    parts = parse_entries(array, hdr.entry_count, hdr.entry_size)
    problem = _partition_problem(parts, hdr.first_usable, hdr.last_usable)
    if problem:
        raise GptInvalid(problem)

    bak = parse_header(_read_at(f, (total - 1) * ss, ss, file_size, "backup GPT header"), "backup GPT header")
    if (bak.my_lba, bak.alternate_lba) != (total - 1, 1):
        raise GptInvalid("backup GPT header has wrong MyLBA/AlternateLBA")
    if (bak.disk_guid, bak.first_usable, bak.last_usable, bak.entry_count, bak.entry_size, bak.array_crc) != (
        hdr.disk_guid, hdr.first_usable, hdr.last_usable, hdr.entry_count, hdr.entry_size, hdr.array_crc
    ):
        raise GptInvalid("backup GPT header does not match the primary header")
    if not hdr.last_usable < bak.entries_lba <= total - 1 - array_sectors:
        raise GptInvalid(f"backup entry array at LBA {bak.entries_lba} is misplaced")
    bak_array = _read_at(f, bak.entries_lba * ss, array_bytes, file_size, "backup partition entry array")
    if bak_array != array:
        raise GptInvalid("backup partition entry array differs from the primary")
    return GptDisk(hdr.disk_guid, ss, total, hdr.first_usable, hdr.last_usable, parts)


def read_gpt_path(path: Path) -> GptDisk:
    """`read_gpt` on a file name; OS errors become `GptInvalid`."""
    try:
        with open(path, "rb") as f:
            return read_gpt(f)
    except OSError as e:
        raise GptInvalid(f"cannot read {path}: {e.strerror}") from e
