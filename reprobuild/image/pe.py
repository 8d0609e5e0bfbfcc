"""PE32+ (EFI) images: parse headers, compute the Authenticode hash and PE checksum, append sections.

Spec: Microsoft "PE Format" (headers, section table, certificate table) and "Windows Authenticode
Portable Executable Signature Format"; docs/formats.md §7-§8 for what ukify, systemd-stub and sbsign do.
Everything here is pure: bytes in, bytes or frozen dataclasses out.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from reprobuild.errors import FormatError


class PeInvalid(FormatError):
    """A PE image is malformed, unsupported (not PE32+), or cannot take the requested change."""


class _Layout:
    """A little-endian record: a ``struct.Struct`` plus the byte offset of every named field."""

    def __init__(self, name: str, fields: Sequence[tuple[str, str]]) -> None:
        self.name = name
        self.names = tuple(n for n, _ in fields)
        self.struct = struct.Struct("<" + "".join(f for _, f in fields))
        self.size = self.struct.size
        self.offset = {n: struct.calcsize("<" + "".join(f for _, f in fields[:i])) for i, (n, _) in
                       enumerate(fields)}  # fmt: skip
        self._formats = dict(fields)

    def unpack(self, buf: bytes | bytearray, at: int) -> dict[str, int | bytes]:
        if at < 0 or at + self.size > len(buf):
            raise PeInvalid(f"PE: {self.name} at offset {at:#x} runs past the end of the file")
        return dict(zip(self.names, self.struct.unpack_from(buf, at), strict=True))

    def pack(self, values: dict[str, int | bytes]) -> bytes:
        return self.struct.pack(*(values[n] for n in self.names))

    def put(self, buf: bytearray, at: int, field: str, value: int) -> None:
        struct.pack_into("<" + self._formats[field], buf, at + self.offset[field], value)


# MS-DOS stub header: only the magic and e_lfanew (offset 0x3C) matter to us.
DOS_MAGIC = b"MZ"
E_LFANEW_OFFSET = 0x3C
PE_SIGNATURE = b"PE\0\0"
# COFF file header (PE Format, "COFF File Header (Object and Image)"), right after "PE\0\0".
COFF_HEADER = _Layout("COFF header", [
    ("Machine", "H"), ("NumberOfSections", "H"), ("TimeDateStamp", "I"),
    ("PointerToSymbolTable", "I"), ("NumberOfSymbols", "I"), ("SizeOfOptionalHeader", "H"),
    ("Characteristics", "H"),
])  # fmt: skip
# PE32+ optional header without the data directories (PE Format, "Optional Header"); 112 bytes.
OPTIONAL_HEADER_64 = _Layout("optional header", [
    ("Magic", "H"), ("MajorLinkerVersion", "B"), ("MinorLinkerVersion", "B"), ("SizeOfCode", "I"),
    ("SizeOfInitializedData", "I"), ("SizeOfUninitializedData", "I"), ("AddressOfEntryPoint", "I"),
    ("BaseOfCode", "I"), ("ImageBase", "Q"), ("SectionAlignment", "I"), ("FileAlignment", "I"),
    ("MajorOperatingSystemVersion", "H"), ("MinorOperatingSystemVersion", "H"),
    ("MajorImageVersion", "H"), ("MinorImageVersion", "H"), ("MajorSubsystemVersion", "H"),
    ("MinorSubsystemVersion", "H"), ("Win32VersionValue", "I"), ("SizeOfImage", "I"),
    ("SizeOfHeaders", "I"), ("CheckSum", "I"), ("Subsystem", "H"), ("DllCharacteristics", "H"),
    ("SizeOfStackReserve", "Q"), ("SizeOfStackCommit", "Q"), ("SizeOfHeapReserve", "Q"),
    ("SizeOfHeapCommit", "Q"), ("LoaderFlags", "I"), ("NumberOfRvaAndSizes", "I"),
])  # fmt: skip
DATA_DIRECTORY = _Layout("data directory", [("VirtualAddress", "I"), ("Size", "I")])
SECTION_HEADER = _Layout("section header", [
    ("Name", "8s"), ("VirtualSize", "I"), ("VirtualAddress", "I"), ("SizeOfRawData", "I"),
    ("PointerToRawData", "I"), ("PointerToRelocations", "I"), ("PointerToLinenumbers", "I"),
    ("NumberOfRelocations", "H"), ("NumberOfLinenumbers", "H"), ("Characteristics", "I"),
])  # fmt: skip
# Certificate table entry header (PE Format, "The Attribute Certificate Table").
WIN_CERTIFICATE = _Layout("WIN_CERTIFICATE", [("dwLength", "I"), ("wRevision", "H"), ("wCertificateType", "H")])
WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002

PE32_PLUS_MAGIC = 0x20B
IMAGE_DIRECTORY_ENTRY_SECURITY = 4  # its VirtualAddress is a *file offset*, not an RVA
IMAGE_SUBSYSTEM_EFI_APPLICATION = 10
IMAGE_SCN_CNT_CODE = 0x00000020
IMAGE_SCN_CNT_INITIALIZED_DATA = 0x00000040
IMAGE_SCN_MEM_READ = 0x40000000
MAX_SECTIONS = 96  # PE Format: "the Windows loader limits the number of sections to 96"


@dataclass(frozen=True)
class DataDirectory:
    virtual_address: int
    size: int


@dataclass(frozen=True)
class Section:
    name: str
    virtual_size: int
    virtual_address: int
    size_of_raw_data: int
    pointer_to_raw_data: int
    characteristics: int
    header_offset: int  # file offset of this 40-byte section header


@dataclass(frozen=True)
class PeImage:
    """The parsed headers of a PE32+ image plus the file offsets of the fields we rewrite."""

    pe_offset: int
    coff: dict[str, int]
    optional: dict[str, int]
    data_directories: tuple[DataDirectory, ...]
    sections: tuple[Section, ...]
    optional_offset: int
    section_table_offset: int

    @property
    def machine(self) -> int:
        return self.coff["Machine"]

    @property
    def section_alignment(self) -> int:
        return self.optional["SectionAlignment"]

    @property
    def file_alignment(self) -> int:
        return self.optional["FileAlignment"]

    @property
    def size_of_headers(self) -> int:
        return self.optional["SizeOfHeaders"]

    @property
    def size_of_image(self) -> int:
        return self.optional["SizeOfImage"]

    @property
    def checksum_offset(self) -> int:
        return self.optional_offset + OPTIONAL_HEADER_64.offset["CheckSum"]

    @property
    def cert_dir_offset(self) -> int:
        """File offset of data directory 4 (the certificate table entry)."""
        return self.optional_offset + OPTIONAL_HEADER_64.size + IMAGE_DIRECTORY_ENTRY_SECURITY * DATA_DIRECTORY.size

    @property
    def cert_table(self) -> DataDirectory:
        if len(self.data_directories) <= IMAGE_DIRECTORY_ENTRY_SECURITY:
            return DataDirectory(0, 0)
        return self.data_directories[IMAGE_DIRECTORY_ENTRY_SECURITY]

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)


def parse_pe(data: bytes | bytearray) -> PeImage:
    """Parse and sanity-check the headers of a PE32+ image. O(number of sections).

    Raises PeInvalid for a bad MZ/PE signature, a non-PE32+ optional header, header fields that
    point outside the file, an optional header too small for the certificate directory, a section
    table past SizeOfHeaders or the file, or section data past the end of the file.
    """
    if len(data) < E_LFANEW_OFFSET + 4 or data[:2] != DOS_MAGIC:
        raise PeInvalid(f"PE: no MZ header (starts with {bytes(data[:2])!r})")
    (pe_offset,) = struct.unpack_from("<I", data, E_LFANEW_OFFSET)
    if data[pe_offset : pe_offset + 4] != PE_SIGNATURE:
        raise PeInvalid(f"PE: no PE signature at e_lfanew={pe_offset:#x}")
    coff = COFF_HEADER.unpack(data, pe_offset + 4)
    optional_offset = pe_offset + 4 + COFF_HEADER.size
    optional = OPTIONAL_HEADER_64.unpack(data, optional_offset)
    if optional["Magic"] != PE32_PLUS_MAGIC:
        raise PeInvalid(f"PE: optional header magic {optional['Magic']:#x} is not PE32+ (0x20b)")
    n_dirs = optional["NumberOfRvaAndSizes"]
    if coff["SizeOfOptionalHeader"] < OPTIONAL_HEADER_64.size + n_dirs * DATA_DIRECTORY.size:
        raise PeInvalid(f"PE: SizeOfOptionalHeader {coff['SizeOfOptionalHeader']} too small for {n_dirs} directories")
    if n_dirs <= IMAGE_DIRECTORY_ENTRY_SECURITY:
        raise PeInvalid(f"PE: only {n_dirs} data directories, no certificate table entry")
    dirs = tuple(
        DataDirectory(d["VirtualAddress"], d["Size"])  # type: ignore[arg-type]
        for d in (DATA_DIRECTORY.unpack(data, optional_offset + OPTIONAL_HEADER_64.size + i * 8)
                  for i in range(n_dirs))
    )  # fmt: skip
    for name in ("FileAlignment", "SectionAlignment"):
        value = optional[name]
        if value == 0 or value & (value - 1):
            raise PeInvalid(f"PE: {name} {value:#x} is not a power of two")
    n_sections = coff["NumberOfSections"]
    if n_sections > MAX_SECTIONS:
        raise PeInvalid(f"PE: {n_sections} sections (the limit is {MAX_SECTIONS})")
    table = optional_offset + coff["SizeOfOptionalHeader"]
    if optional["SizeOfHeaders"] > len(data) or table + n_sections * SECTION_HEADER.size > optional["SizeOfHeaders"]:
        raise PeInvalid("PE: section table or SizeOfHeaders runs past the headers or the file")
    sections = []
    for i in range(n_sections):
        at = table + i * SECTION_HEADER.size
        raw = SECTION_HEADER.unpack(data, at)
        sec = Section(
            name=bytes(raw["Name"]).rstrip(b"\0").decode("ascii", "replace"),  # type: ignore[arg-type]
            virtual_size=raw["VirtualSize"],  # type: ignore[arg-type]
            virtual_address=raw["VirtualAddress"],  # type: ignore[arg-type]
            size_of_raw_data=raw["SizeOfRawData"],  # type: ignore[arg-type]
            pointer_to_raw_data=raw["PointerToRawData"],  # type: ignore[arg-type]
            characteristics=raw["Characteristics"],  # type: ignore[arg-type]
            header_offset=at,
        )
        if sec.size_of_raw_data and sec.pointer_to_raw_data + sec.size_of_raw_data > len(data):
            raise PeInvalid(f"PE: section {sec.name!r} data runs past the end of the file")
        sections.append(sec)
    cert = dirs[IMAGE_DIRECTORY_ENTRY_SECURITY]
    if cert.size and (cert.virtual_address + cert.size > len(data) or cert.virtual_address < optional["SizeOfHeaders"]):
        raise PeInvalid("PE: certificate table lies outside the file")
    return PeImage(
        pe_offset=pe_offset,
        coff=coff,  # type: ignore[arg-type]
        optional=optional,  # type: ignore[arg-type]
        data_directories=dirs,
        sections=tuple(sections),
        optional_offset=optional_offset,
        section_table_offset=table,
    )


def round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def pe_checksum(data: bytes | bytearray, checksum_offset: int) -> int:
    """The PE image checksum: 16-bit one's-complement-style sum of the file (CheckSum field read
    as 0) plus the file length, as imagehlp's CheckSumMappedFile and sbsign compute it.

    Cost O(len(data)) with big-integer arithmetic: since 65536 ≡ 1 (mod 65535), the folded word
    sum equals the file read as one little-endian integer modulo 65535 (0xFFFF unless all zero).
    """
    body = bytes(data[:checksum_offset]) + b"\0\0\0\0" + bytes(data[checksum_offset + 4 :])
    if len(body) % 2:
        body += b"\0"
    number = int.from_bytes(body, "little")
    folded = 0 if number == 0 else (number % 0xFFFF or 0xFFFF)
    return (folded + len(data)) & 0xFFFFFFFF


def authenticode_ranges(data: bytes | bytearray, image: PeImage | None = None) -> list[tuple[int, int]]:
    """The (start, end) file ranges the Authenticode hash covers, in hashing order.

    headers without CheckSum and the certificate directory entry; each section's raw data sorted
    by PointerToRawData; then any data after the bytes counted so far up to the certificate table
    (or the end of the file). Like sbsign, an image whose length is not a multiple of 8 is hashed
    as if zero-padded to 8 (``authenticode_digest`` adds the padding) because the signature is
    appended at the next 8-byte boundary and the padding becomes part of the image.
    """
    pe = image or parse_pe(data)
    ranges = [
        (0, pe.checksum_offset),
        (pe.checksum_offset + 4, pe.cert_dir_offset),
        (pe.cert_dir_offset + DATA_DIRECTORY.size, pe.size_of_headers),
    ]
    hashed = pe.size_of_headers
    for sec in sorted(pe.sections, key=lambda s: s.pointer_to_raw_data):
        if sec.size_of_raw_data:
            ranges.append((sec.pointer_to_raw_data, sec.pointer_to_raw_data + sec.size_of_raw_data))
            hashed += sec.size_of_raw_data
    cert = pe.cert_table
    end = cert.virtual_address if cert.size else round_up(len(data), 8)
    if hashed < end:
        ranges.append((hashed, end))
    return ranges


def authenticode_digest(data: bytes | bytearray, algorithm: str = "sha256") -> bytes:
    """The Authenticode image hash (docs/formats.md §8) of a PE32+ image; O(len(data))."""
    padded = bytes(data) if len(data) % 8 == 0 or parse_pe(data).cert_table.size else bytes(data) + bytes(-len(data) % 8)
    h = hashlib.new(algorithm)
    view = memoryview(padded)
    for start, end in authenticode_ranges(padded):
        h.update(view[start:end])
    return h.digest()


class NewSection(NamedTuple):
    """A section for ``add_sections``. ``linux_size_of_image`` applies to the kernel (``is_linux``)."""

    name: str
    data: bytes
    is_linux: bool = False
    linux_size_of_image: int | None = None


def section_capacity(pe: PeImage, name: str) -> int:
    """How many bytes an existing section can hold in place: its raw size, and no more than the
    address space before the next section (so the data cannot overlap it once loaded)."""
    sec = pe.section(name)
    if sec is None:
        raise PeInvalid(f"PE: no section {name}")
    following = [s.virtual_address for s in pe.sections if s.virtual_address > sec.virtual_address]
    va_room = (min(following) if following else 1 << 32) - sec.virtual_address
    return min(sec.size_of_raw_data, va_room)


def _check_name(name: str) -> bytes:
    raw = name.encode("ascii")
    # PE section names in an image are at most 8 bytes (longer names need a COFF string table,
    # which images do not have); ukify enforces the same limit.
    if not raw or len(raw) > 8:
        raise PeInvalid(f"PE: section name {name!r} must be 1-8 ASCII characters")
    return raw


def _strip_symbols(buf: bytearray, pe: PeImage) -> bytearray:
    """Drop a trailing COFF symbol table (and its string table) as ukify does."""
    pointer = pe.coff["PointerToSymbolTable"]
    if not pointer:
        return buf
    data_end = max((s.pointer_to_raw_data + s.size_of_raw_data for s in pe.sections), default=pe.size_of_headers)
    if pointer < data_end:
        raise PeInvalid("PE: symbol table is not at the end of the file")
    del buf[pointer:]
    COFF_HEADER.put(buf, pe.pe_offset + 4, "PointerToSymbolTable", 0)
    COFF_HEADER.put(buf, pe.pe_offset + 4, "NumberOfSymbols", 0)
    return buf


def add_sections(stub: bytes, sections: Sequence[NewSection | tuple[str, bytes, bool, int | None]]) -> bytes:
    """Append ``sections`` to the PE32+ ``stub`` following ukify's placement (docs/formats.md §7).

    A section whose name the stub already has (in practice ``.sbat``) replaces that section's data
    in place; it must fit in its raw size and its virtual range. Alignments come from the stub.
    Raises PeInvalid for signed stubs, a lack of header room, or misaligned stub sections.
    The CheckSum is set to the real PE checksum (ukify writes 0; firmware ignores it, sbsign
    recomputes it; a correct value costs one pass and keeps ``pecheck``-style tools quiet).
    Cost O(total size).
    """
    pe = parse_pe(stub)
    if pe.cert_table.size or pe.cert_table.virtual_address:
        raise PeInvalid("PE: the stub is already signed; refusing to add sections (sign the result instead)")
    file_align, sect_align = pe.file_alignment, pe.section_alignment
    buf = _strip_symbols(bytearray(stub), pe)
    for sec in pe.sections:
        if sec.size_of_raw_data and (sec.pointer_to_raw_data % file_align or sec.size_of_raw_data % file_align):
            # ukify realigns such sections; no stub we support needs it, so refuse rather than guess.
            raise PeInvalid(f"PE: stub section {sec.name!r} is not aligned to FileAlignment {file_align:#x}")
    # Like ukify: the space before the first section's data is unused, so SizeOfHeaders may grow
    # to the file alignment; never further.
    size_of_headers = round_up(pe.size_of_headers, file_align)
    first_data = min((s.pointer_to_raw_data for s in pe.sections if s.size_of_raw_data), default=len(buf))
    if size_of_headers > first_data:
        raise PeInvalid("PE: SizeOfHeaders would overlap the first section")
    OPTIONAL_HEADER_64.put(buf, pe.optional_offset, "SizeOfHeaders", size_of_headers)
    existing = {s.name: s for s in pe.sections}
    n_sections = len(pe.sections)
    last_va_end = max((s.virtual_address + s.virtual_size for s in pe.sections), default=0)
    init_data = pe.optional["SizeOfInitializedData"]
    for spec in sections:
        new = NewSection(*spec)
        raw_name = _check_name(new.name)
        if new.name in existing:
            old = existing[new.name]
            # ukify checks only the raw size; we also refuse to overlap the next section's addresses.
            capacity = section_capacity(pe, new.name)
            if len(new.data) > capacity:
                raise PeInvalid(f"PE: {len(new.data)} bytes do not fit the stub's {new.name} section "
                                f"(room for {capacity} bytes)")  # fmt: skip
            start = old.pointer_to_raw_data
            buf[start : start + old.size_of_raw_data] = new.data + bytes(old.size_of_raw_data - len(new.data))
            SECTION_HEADER.put(buf, old.header_offset, "VirtualSize", len(new.data))
            continue
        header_at = pe.section_table_offset + n_sections * SECTION_HEADER.size
        if header_at + SECTION_HEADER.size > size_of_headers:
            raise PeInvalid(f"PE: no header room for section {new.name} (SizeOfHeaders {size_of_headers:#x})")
        if new.is_linux and new.linux_size_of_image:
            # The kernel runs in place: reserve its whole SizeOfImage (the reason .linux goes last).
            virtual_size = max(len(new.data), new.linux_size_of_image)
        else:
            virtual_size = len(new.data)
        pointer = round_up(len(buf), file_align)
        raw_size = round_up(len(new.data), file_align)
        va = round_up(last_va_end, sect_align)
        characteristics = IMAGE_SCN_MEM_READ | (IMAGE_SCN_CNT_CODE if new.is_linux else IMAGE_SCN_CNT_INITIALIZED_DATA)
        buf += bytes(pointer - len(buf)) + new.data + bytes(raw_size - len(new.data))
        buf[header_at : header_at + SECTION_HEADER.size] = SECTION_HEADER.pack({
            "Name": raw_name, "VirtualSize": virtual_size, "VirtualAddress": va, "SizeOfRawData": raw_size,
            "PointerToRawData": pointer, "PointerToRelocations": 0, "PointerToLinenumbers": 0,
            "NumberOfRelocations": 0, "NumberOfLinenumbers": 0, "Characteristics": characteristics,
        })  # fmt: skip
        n_sections += 1
        init_data += virtual_size
        last_va_end = va + virtual_size
    coff_at = pe.pe_offset + 4
    COFF_HEADER.put(buf, coff_at, "NumberOfSections", n_sections)
    OPTIONAL_HEADER_64.put(buf, pe.optional_offset, "SizeOfInitializedData", init_data & 0xFFFFFFFF)
    OPTIONAL_HEADER_64.put(buf, pe.optional_offset, "SizeOfImage", round_up(last_va_end, sect_align))
    OPTIONAL_HEADER_64.put(buf, pe.optional_offset, "CheckSum", pe_checksum(buf, pe.checksum_offset))
    parse_pe(buf)  # the result must itself be a valid image
    return bytes(buf)
