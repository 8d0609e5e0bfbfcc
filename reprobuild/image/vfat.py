"""A read-only FAT12/16/32 reader in pure Python: boot sector, FAT, directories with long names.

docs/formats.md §16 describes the on-disk format this follows (Microsoft's "FAT: General Overview
of On-Disk Format" and its long-file-name extension, as Linux's fs/fat implements them). FAT has
no owners, modes, links or xattrs: an entry is a file or a directory with a name, a size and a
write time (2-second resolution, local time without a zone: read here as UTC, as reprobuild's
ESPs are written with ``TZ=UTC``).

Hostile input: every read lies inside the file system, cluster numbers are checked against the
cluster count, a cluster chain that loops or is shorter than its file is an error, directories
must form a tree (a directory reached twice is an error), names are checked (no ``/`` or NUL,
unique per directory, case-insensitively as FAT compares them), the walk stops at `MAX_ENTRIES`
entries and `MAX_DEPTH` levels. A malformed image raises `VfatInvalid` (a `FormatError`).
"""

from __future__ import annotations

import calendar
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from reprobuild.errors import FormatError
from reprobuild.image.fsread import read_exactly, walk_tree

ENTRY = 32
ATTR_VOLUME = 0x08
ATTR_DIRECTORY = 0x10
ATTR_LFN = 0x0F
NT_LOWER_BASE = 0x08
NT_LOWER_EXT = 0x10

MAX_ENTRIES = 2_000_000
MAX_DEPTH = 1024
MAX_DIR_BYTES = 64 << 20  # a FAT directory holds at most 65536 entries of 32 bytes (2 MiB)


class VfatInvalid(FormatError):
    """The FAT image is malformed (or truncated)."""


@dataclass(frozen=True)
class BootSector:
    bytes_per_sector: int
    sectors_per_cluster: int
    fat_offset: int  # byte offset of the first FAT
    fat_size: int  # bytes of one FAT
    root_offset: int  # FAT12/16: byte offset of the fixed root directory
    root_size: int  # FAT12/16: its bytes (0 for FAT32)
    root_cluster: int  # FAT32: the root directory's first cluster (0 for FAT12/16)
    data_offset: int  # byte offset of cluster 2
    clusters: int  # data clusters (numbered 2 … clusters + 1)
    bits: int  # 12, 16 or 32
    end: int  # bytes of the file system

    @property
    def cluster_size(self) -> int:
        return self.bytes_per_sector * self.sectors_per_cluster


class Extent(NamedTuple):
    offset: int  # byte offset in the image
    length: int


class Entry(NamedTuple):
    key: int  # what identifies the entry's data: its first cluster, or -1 for the FAT12/16 root
    type: str  # "file" or "directory"
    size: int
    mtime: int
    extents: tuple[Extent, ...]  # its data in order


def parse_boot_sector(buf: bytes, length: int) -> BootSector:
    if len(buf) < 512 or buf[510:512] != b"\x55\xaa":
        raise VfatInvalid("vfat: no boot sector signature")
    bps, spc, reserved, nfats, root_entries, total16, _media, fat16 = struct.unpack_from("<HBHBHHBH", buf, 11)
    total32, fat32, _flags, _version, root_cluster = struct.unpack_from("<IIHHI", buf, 32)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or reserved == 0 or nfats == 0:
        raise VfatInvalid(f"vfat: bad geometry ({bps} bytes per sector, {spc} per cluster)")
    total = total16 or total32
    fat_sectors = fat16 or fat32
    root_sectors = -(-root_entries * ENTRY // bps)
    data_start = reserved + nfats * fat_sectors + root_sectors
    if fat_sectors == 0 or total <= data_start:
        raise VfatInvalid("vfat: the FAT or data area is empty")
    clusters = (total - data_start) // spc
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    if (bits == 32) != (root_entries == 0):
        raise VfatInvalid(f"vfat: a FAT{bits} with {root_entries} fixed root entries")
    if total * bps > length:
        raise VfatInvalid(f"vfat: the boot sector says {total * bps} bytes, the image has {length} (truncated?)")
    if fat_sectors * bps * 8 < (clusters + 2) * bits:
        raise VfatInvalid("vfat: the FAT is too small for the clusters")
    return BootSector(bps, spc, reserved * bps, fat_sectors * bps, (reserved + nfats * fat_sectors) * bps,
                      root_sectors * bps, root_cluster if bits == 32 else 0, data_start * bps, clusters, bits,
                      total * bps)  # fmt: skip


class Vfat:
    """A FAT image read through ``read_at(offset, n)``; ``length`` is the image size in bytes."""

    def __init__(self, read_at: Callable[[int, int], bytes], length: int) -> None:
        self._read_at = read_at
        self.bytes_read = 0
        self._end = length
        self.boot = parse_boot_sector(self._read(0, min(512, length)), length)
        self._end = self.boot.end
        self._fat = self._read(self.boot.fat_offset, self.boot.fat_size)  # the first FAT, read once

    def _read(self, offset: int, n: int) -> bytes:
        buf = read_exactly(self._read_at, offset, n, self._end, VfatInvalid, "vfat: the file system")
        self.bytes_read += n
        return buf

    def _next(self, cluster: int) -> int:
        if self.boot.bits == 32:
            return struct.unpack_from("<I", self._fat, cluster * 4)[0] & 0x0FFFFFFF
        if self.boot.bits == 16:
            return struct.unpack_from("<H", self._fat, cluster * 2)[0]
        pair = struct.unpack_from("<H", self._fat, cluster * 3 // 2)[0]
        return pair >> 4 if cluster & 1 else pair & 0xFFF

    def chain(self, first: int, what: str) -> list[int]:
        """The clusters of a chain from ``first``; VfatInvalid on a loop, a bad or free cluster."""
        end_mark = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.boot.bits]
        out = []
        cluster = first
        while True:
            if not 2 <= cluster < self.boot.clusters + 2:
                raise VfatInvalid(f"vfat: {what}: cluster {cluster} is outside the data area")
            out.append(cluster)
            if len(out) > self.boot.clusters:
                raise VfatInvalid(f"vfat: {what}: its cluster chain loops")
            cluster = self._next(cluster)
            if cluster >= end_mark:
                return out

    def _extents(self, first: int, size: int, what: str) -> tuple[Extent, ...]:
        """The runs holding ``size`` bytes from cluster ``first`` (``size`` -1: the whole chain,
        for a directory)."""
        if first == 0:
            if size > 0:
                raise VfatInvalid(f"vfat: {what}: {size} bytes but no cluster")
            return ()
        cs = self.boot.cluster_size
        clusters = self.chain(first, what)
        need = len(clusters) * cs if size < 0 else size
        if size >= 0 and not (len(clusters) - 1) * cs < max(size, 1) <= len(clusters) * cs:
            raise VfatInvalid(f"vfat: {what}: {len(clusters)} clusters do not hold {size} bytes")
        runs: list[Extent] = []
        for c in clusters:
            off = self.boot.data_offset + (c - 2) * cs
            n = min(cs, need)
            if n <= 0:
                break
            if off + n > self._end:
                raise VfatInvalid(f"vfat: {what}: cluster {c} lies outside the file system")
            if runs and runs[-1].offset + runs[-1].length == off:
                runs[-1] = Extent(runs[-1].offset, runs[-1].length + n)
            else:
                runs.append(Extent(off, n))
            need -= n
        return tuple(runs)

    def root(self) -> Entry:
        if self.boot.bits == 32:
            return Entry(self.boot.root_cluster, "directory", 0, 0,
                         self._extents(self.boot.root_cluster, -1, "the root directory"))  # fmt: skip
        return Entry(-1, "directory", 0, 0, (Extent(self.boot.root_offset, self.boot.root_size),))

    def iter_data(self, e: Entry, chunk: int = 1 << 20) -> Iterator[bytes]:
        for off, n in e.extents:
            done = 0
            while done < n:
                k = min(chunk, n - done)
                yield self._read(off + done, k)
                done += k

    def read_data(self, e: Entry, limit: int) -> bytes:
        total = sum(n for _, n in e.extents)
        if total > limit:
            raise VfatInvalid(f"vfat: an entry of {total} bytes is over the limit of {limit}")
        return b"".join(self.iter_data(e))

    def children(self, d: Entry, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
        """(name as UTF-8, entry) of each entry of directory ``d``, "." and ".." left out."""
        data = self.read_data(d, MAX_DIR_BYTES)
        seen: set[bytes] = set()
        lfn: dict[int, bytes] = {}
        lfn_sum = -1
        for pos in range(0, len(data) - ENTRY + 1, ENTRY):
            raw = data[pos:pos + ENTRY]
            if raw[0] == 0:
                break  # the end of the directory
            if raw[0] == 0xE5:
                lfn.clear()
                continue  # deleted
            attr = raw[11]
            if attr & 0x3F == ATTR_LFN:
                seq = raw[0] & 0x1F
                if raw[0] & 0x40:
                    lfn.clear()
                    lfn_sum = raw[13]
                if not 1 <= seq <= 20 or raw[13] != lfn_sum:
                    lfn.clear()  # an orphaned or broken long name: the short name stands (as in Linux)
                    lfn_sum = -1
                    continue
                lfn[seq] = raw[1:11] + raw[14:26] + raw[28:32]
                continue
            if attr & ATTR_VOLUME:
                lfn.clear()
                continue
            short = (b"\xe5" + raw[1:11]) if raw[0] == 0x05 else raw[:11]
            name = self._name(short, raw[12], lfn, lfn_sum, prefix)
            lfn.clear()
            if name in (b".", b".."):
                continue
            folded = name.lower()
            if folded in seen:
                raise VfatInvalid(f"vfat: {(prefix + name)[:200]!r} appears twice in its directory")
            seen.add(folded)
            hi, wtime, wdate, lo, size = struct.unpack_from("<HHHHI", raw, 20)
            first = (hi << 16 | lo) if self.boot.bits == 32 else lo
            what = (prefix + name)[:200].decode("utf-8", "replace")
            if attr & ATTR_DIRECTORY:
                yield name, Entry(first, "directory", 0, _fat_time(wdate, wtime), self._extents(first, -1, what))
            else:
                yield name, Entry(first, "file", size, _fat_time(wdate, wtime), self._extents(first, size, what))

    def _name(self, short: bytes, nt: int, lfn: dict[int, bytes], lfn_sum: int, prefix: bytes) -> bytes:
        if lfn and lfn_sum == _lfn_checksum(short) and sorted(lfn) == list(range(1, len(lfn) + 1)):
            units = b"".join(lfn[i] for i in range(1, len(lfn) + 1))
            text = units.decode("utf-16-le", "surrogatepass").split("\0", 1)[0]
            name = text.encode("utf-8", "surrogateescape")
        else:  # 8.3: the OEM code page (437, as Linux and mtools default to); NT flags give the case
            base, ext = short[:8].rstrip(b" "), short[8:].rstrip(b" ")
            base = base.lower() if nt & NT_LOWER_BASE else base
            ext = ext.lower() if nt & NT_LOWER_EXT else ext
            name = (base + b"." + ext if ext else base).decode("cp437").encode()
        if not name or b"/" in name or b"\0" in name:
            raise VfatInvalid(f"vfat: {prefix[:200]!r}: an invalid entry name {name[:64]!r}")
        return name

    def walk(self) -> Iterator[tuple[bytes, bytes, Entry]]:
        """Every entry below the root as (parent path with "/" or b"", name, entry)."""
        return walk_tree(self.root(), lambda prefix, d: self.children(d, prefix), lambda e: e.key, VfatInvalid,
                         "vfat", MAX_ENTRIES, MAX_DEPTH)  # fmt: skip


def _lfn_checksum(short: bytes) -> int:
    s = 0
    for b in short:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def _fat_time(date: int, time: int) -> int:
    """Seconds since the epoch of a FAT date and time (2-second resolution), read as UTC."""
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F
    hour, minute, second = time >> 11, (time >> 5) & 0x3F, (time & 0x1F) * 2
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return 0  # no valid time recorded (0 is what an unset date means)
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
