"""PE32+ parsing, checksum, Authenticode ranges and ukify-style section placement."""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
from pathlib import Path

import pytest

from reprobuild.errors import FormatError
from reprobuild.image.pe import (
    COFF_HEADER,
    DATA_DIRECTORY,
    OPTIONAL_HEADER_64,
    SECTION_HEADER,
    NewSection,
    PeInvalid,
    add_sections,
    authenticode_digest,
    authenticode_ranges,
    parse_pe,
    pe_checksum,
)

FILE_ALIGN = 0x200
SECT_ALIGN = 0x1000


def make_pe(
    sections: list[tuple[str, bytes]] | None = None,
    size_of_headers: int = 0x400,
    file_align: int = FILE_ALIGN,
    sect_align: int = SECT_ALIGN,
    symbols: bytes = b"",
    size_of_image_extra: int = 0,
) -> bytes:
    """A small but valid PE32+ EFI application (not runnable): DOS header, COFF, optional header
    with 16 data directories, the given sections laid out at the given alignments."""
    sections = sections if sections is not None else [(".text", b"\xc3" * 100), (".sbat", b"sbat,1\n")]
    pe_off = 0x40
    opt_off = pe_off + 4 + COFF_HEADER.size
    table = opt_off + OPTIONAL_HEADER_64.size + 16 * DATA_DIRECTORY.size
    buf = bytearray(size_of_headers)
    buf[0:2] = b"MZ"
    struct.pack_into("<I", buf, 0x3C, pe_off)
    buf[pe_off : pe_off + 4] = b"PE\0\0"
    raw_ptr, va = size_of_headers, sect_align
    headers = []
    body = bytearray()
    for name, data in sections:
        raw_size = -(-len(data) // file_align) * file_align
        headers.append(SECTION_HEADER.pack({
            "Name": name.encode(), "VirtualSize": len(data), "VirtualAddress": va, "SizeOfRawData": raw_size,
            "PointerToRawData": raw_ptr, "PointerToRelocations": 0, "PointerToLinenumbers": 0,
            "NumberOfRelocations": 0, "NumberOfLinenumbers": 0, "Characteristics": 0x40000040,
        }))  # fmt: skip
        body += data + bytes(raw_size - len(data))
        raw_ptr += raw_size
        va += -(-len(data) // sect_align) * sect_align
    sym_ptr = size_of_headers + len(body) if symbols else 0
    buf[pe_off + 4 : opt_off] = COFF_HEADER.pack({
        "Machine": 0x8664, "NumberOfSections": len(sections), "TimeDateStamp": 0,
        "PointerToSymbolTable": sym_ptr, "NumberOfSymbols": len(symbols) // 18,
        "SizeOfOptionalHeader": OPTIONAL_HEADER_64.size + 16 * DATA_DIRECTORY.size, "Characteristics": 0x206,
    })  # fmt: skip
    opt = {n: 0 for n in OPTIONAL_HEADER_64.names}
    opt.update(Magic=0x20B, SectionAlignment=sect_align, FileAlignment=file_align, SizeOfImage=va + size_of_image_extra,
               SizeOfHeaders=size_of_headers, Subsystem=10, NumberOfRvaAndSizes=16, AddressOfEntryPoint=sect_align)
    buf[opt_off : opt_off + OPTIONAL_HEADER_64.size] = OPTIONAL_HEADER_64.pack(opt)
    for i, h in enumerate(headers):
        buf[table + i * 40 : table + (i + 1) * 40] = h
    return bytes(buf + body + symbols)


def test_parse_fake() -> None:
    pe = parse_pe(make_pe())
    assert pe.machine == 0x8664
    assert (pe.file_alignment, pe.section_alignment, pe.size_of_headers) == (FILE_ALIGN, SECT_ALIGN, 0x400)
    assert [s.name for s in pe.sections] == [".text", ".sbat"]
    assert pe.sections[1].pointer_to_raw_data == 0x600 and pe.sections[1].virtual_address == 0x2000
    # docs/formats.md §7 offsets: CheckSum at optional+64, certificate directory at optional+144.
    assert pe.checksum_offset == 0x40 + 24 + 64
    assert pe.cert_dir_offset == 0x40 + 24 + 144


def _slow_checksum(data: bytes, checksum_offset: int) -> int:
    """The textbook algorithm (sbsign's csum_bytes): fold after every 16-bit word, add the length."""
    words = bytearray(data)
    words[checksum_offset : checksum_offset + 4] = bytes(4)
    if len(words) % 2:
        words += b"\0"
    csum = 0
    for (word,) in struct.iter_unpack("<H", words):
        csum += word
        csum = (csum >> 16) + (csum & 0xFFFF)
    return (csum + len(data)) & 0xFFFFFFFF


@pytest.mark.parametrize("seed", range(6))
def test_checksum_matches_word_loop(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 5000)
    data = bytes([0xFF] * n) if seed == 0 else bytes(n) if seed == 1 else rng.randbytes(n)
    assert pe_checksum(data, 8) == _slow_checksum(data, 8)


def test_authenticode_ranges_skip_checksum_and_cert_entry() -> None:
    data = make_pe()
    pe = parse_pe(data)
    ranges = authenticode_ranges(data)
    covered = set()
    for start, end in ranges:
        covered.update(range(start, end))
    skipped = set(range(len(data))) - covered
    assert skipped == set(range(pe.checksum_offset, pe.checksum_offset + 4)) | set(
        range(pe.cert_dir_offset, pe.cert_dir_offset + 8)
    )
    independent = hashlib.sha256(
        data[: pe.checksum_offset] + data[pe.checksum_offset + 4 : pe.cert_dir_offset] + data[pe.cert_dir_offset + 8 :]
    ).digest()
    assert authenticode_digest(data) == independent


def test_authenticode_pads_unaligned_image_and_hashes_trailing_data() -> None:
    data = make_pe() + b"trailing!"  # 9 bytes after the sections, not 8-aligned
    assert authenticode_digest(data) == authenticode_digest(data + bytes(7))


def test_add_sections_places_like_ukify(tmp_path: Path) -> None:
    stub = make_pe(symbols=b"S" * 36)
    kernel = b"K" * 5000
    out = add_sections(stub, [NewSection(".osrel", b"ID=debian\n"), NewSection(".cmdline", b"quiet"),
                              NewSection(".linux", kernel, True, 0x9000)])  # fmt: skip
    pe = parse_pe(out)
    names = [s.name for s in pe.sections]
    assert names == [".text", ".sbat", ".osrel", ".cmdline", ".linux"]
    assert pe.coff["PointerToSymbolTable"] == 0 and pe.coff["NumberOfSymbols"] == 0
    prev = pe.sections[1]
    for sec in pe.sections[2:]:
        assert sec.virtual_address == -(-(prev.virtual_address + prev.virtual_size) // SECT_ALIGN) * SECT_ALIGN
        assert sec.pointer_to_raw_data % FILE_ALIGN == 0 and sec.size_of_raw_data % FILE_ALIGN == 0
        prev = sec
    linux = pe.section(".linux")
    assert linux is not None and linux.virtual_size == 0x9000 and linux.characteristics == 0x40000020
    assert pe.section(".osrel").characteristics == 0x40000040  # type: ignore[union-attr]
    assert out[linux.pointer_to_raw_data : linux.pointer_to_raw_data + len(kernel)] == kernel
    assert pe.size_of_image == linux.virtual_address + 0x9000
    assert pe.optional["CheckSum"] == pe_checksum(out, pe.checksum_offset)
    assert b"S" * 36 not in out  # the symbol table is gone
    (tmp_path / "u.efi").write_bytes(out)
    objdump = subprocess.run(["objdump", "-h", str(tmp_path / "u.efi")], capture_output=True, text=True, check=True)
    for name in names:
        assert name in objdump.stdout


def test_add_sections_replaces_existing_section_in_place() -> None:
    stub = make_pe()
    out = add_sections(stub, [NewSection(".sbat", b"sbat,1,new\n" * 10)])
    pe = parse_pe(out)
    assert len(pe.sections) == 2 and len(out) == len(stub)
    sbat = pe.section(".sbat")
    assert sbat is not None and sbat.virtual_size == 110
    assert out[sbat.pointer_to_raw_data : sbat.pointer_to_raw_data + 110] == b"sbat,1,new\n" * 10
    with pytest.raises(PeInvalid, match="do not fit"):
        add_sections(stub, [NewSection(".sbat", b"x" * (FILE_ALIGN + 1))])


def test_add_sections_header_room() -> None:
    # Header area 0x200: table at 0x148 holds 2 headers up to 0x198; room for 2 more (0x1e8), not 3.
    stub = make_pe(size_of_headers=0x200)
    add_sections(stub, [NewSection(".a", b"1"), NewSection(".b", b"2")])
    with pytest.raises(PeInvalid, match="header room"):
        add_sections(stub, [NewSection(".a", b"1"), NewSection(".b", b"2"), NewSection(".c", b"3")])


def test_add_sections_refuses_signed_stub_and_bad_names() -> None:
    stub = bytearray(make_pe())
    pe = parse_pe(stub)
    struct.pack_into("<II", stub, pe.cert_dir_offset, len(stub) - 8, 8)
    with pytest.raises(PeInvalid, match="signed"):
        add_sections(bytes(stub), [NewSection(".a", b"1")])
    with pytest.raises(PeInvalid, match="section name"):
        add_sections(make_pe(), [NewSection(".toolongname", b"1")])


GOOD = make_pe()


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"ZM" + GOOD[2:],
        _patch(GOOD, 0x3C, "<I", 0x10000000),
        _patch(GOOD, 0x40, "<I", 0),
        _patch(GOOD, 0x58, "<H", 0x10B),
        GOOD[:0x500],
        _patch(GOOD, 0x46, "<H", 500),
        _patch(GOOD, 0x58 + 108, "<I", 3),
        _patch(GOOD, 0x58 + 36, "<I", 0x300),
    ],
    ids=["empty", "no-mz", "lfanew-past-end", "no-pe-signature", "pe32-not-plus", "truncated-section",
         "too-many-sections", "no-cert-directory", "alignment-not-power-of-two"],
)
def test_hostile_pe(blob: bytes) -> None:
    with pytest.raises(PeInvalid):
        parse_pe(blob)
    assert issubclass(PeInvalid, FormatError)
