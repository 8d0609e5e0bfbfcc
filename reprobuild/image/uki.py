"""Unified Kernel Images: systemd-stub + kernel + initrd + cmdline + os-release, as ukify builds them.

Spec: UAPI "Unified Kernel Image"; docs/formats.md §7 (ukify's section order, contents and .sbat
merge). The stub comes from the locked ``systemd-boot-efi`` package. Pure: bytes in, bytes out.
Signing is a separate step (``reprobuild.image.authenticode.sign_pe``) so the unsigned UKI can be
compared and re-signed independently.
"""

from __future__ import annotations

from reprobuild.image.pe import (
    IMAGE_SUBSYSTEM_EFI_APPLICATION,
    NewSection,
    PeInvalid,
    add_sections,
    parse_pe,
    section_capacity,
)

SBAT_HEADER = "sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md"
DEFAULT_UKI_SBAT = "uki,1,UKI,uki,1,https://uapi-group.org/specifications/specs/unified_kernel_image/"


def sbat_lines(pe_bytes: bytes) -> list[str]:
    """The entries (header line dropped) of a PE's .sbat section; [] if it has none or it is not SBAT."""
    pe = parse_pe(pe_bytes)
    sec = pe.section(".sbat")
    if sec is None:
        return []
    raw = pe_bytes[sec.pointer_to_raw_data : sec.pointer_to_raw_data + min(sec.virtual_size, sec.size_of_raw_data)]
    lines = raw.rstrip(b"\0").decode("utf-8").splitlines()
    if not lines or not lines[0].startswith("sbat,"):
        return []  # ukify skips a .sbat that does not start with the sbat header, so do we
    return lines[1:]


def merge_sbat(stub: bytes, kernel: bytes, extra: str | None) -> bytes:
    """ukify's merge_sbat: header, stub entries, kernel entries, then ``extra``'s entries (or the
    default ``uki,1,…`` line when ``extra`` is None), joined with newlines, ending ``"\\n\\0"``.

    A leading ``sbat,`` header line in ``extra`` is dropped (there must be exactly one, first).
    """
    entries = sbat_lines(stub) + sbat_lines(kernel)
    extra_lines = (extra if extra is not None else DEFAULT_UKI_SBAT).splitlines()
    if extra_lines and extra_lines[0].startswith("sbat,"):
        extra_lines = extra_lines[1:]
    entries += [line for line in extra_lines if line.strip()]
    return (SBAT_HEADER + "\n" + "\n".join(entries) + "\n\0").encode("utf-8")


def normalize_cmdline(cmdline: str) -> bytes:
    """ukify: runs of whitespace collapse to one space; no trailing NUL or newline."""
    return " ".join(cmdline.split()).encode("utf-8")


def build_uki(
    stub: bytes,
    kernel: bytes,
    initrd: bytes,
    cmdline: str,
    os_release: str,
    uname: str,
    sbat_extra: str | None = None,
) -> bytes:
    """Assemble an (unsigned) UKI. Deterministic: a pure function of its arguments.

    Sections, in ukify's order: .osrel, .cmdline, .uname, .initrd, then .linux last (virtual size
    = the kernel's SizeOfImage so it can run in place), then the stub's .sbat replaced by the merged
    SBAT data (the default ``uki,1`` line is left out when it does not fit, see below). Raises PeInvalid if stub or kernel is not a PE32+ image, their machines differ, the
    stub is not an EFI application, or the merged .sbat does not fit the stub's .sbat section.
    Cost: O(size of kernel + initrd), a few copies.
    """
    stub_pe = parse_pe(stub)
    kernel_pe = parse_pe(kernel)  # an x86 bzImage / arm64 Image with the EFI stub is a PE32+ too
    if stub_pe.optional["Subsystem"] != IMAGE_SUBSYSTEM_EFI_APPLICATION:
        raise PeInvalid(f"UKI: stub subsystem {stub_pe.optional['Subsystem']} is not an EFI application (10)")
    if stub_pe.machine != kernel_pe.machine:
        raise PeInvalid(f"UKI: stub machine {stub_pe.machine:#x} differs from kernel machine {kernel_pe.machine:#x}")
    if stub_pe.section(".sbat") is None:
        raise PeInvalid("UKI: the stub has no .sbat section to merge into")
    sections = [NewSection(".osrel", os_release.encode("utf-8")), NewSection(".cmdline", normalize_cmdline(cmdline))]
    if uname:
        sections.append(NewSection(".uname", uname.encode("utf-8")))
    if initrd:
        sections.append(NewSection(".initrd", initrd))
    sections.append(NewSection(".linux", kernel, True, kernel_pe.size_of_image))
    sbat = merge_sbat(stub, kernel, sbat_extra)
    if sbat_extra is None and len(sbat) > section_capacity(stub_pe, ".sbat"):
        # Debian 12's stub leaves 256 bytes of address space for .sbat (SectionAlignment 0x200,
        # .sdmagic follows at +0x100) and its own entries take 226: the optional default
        # "uki,1,…" line does not fit without overlapping .sdmagic once loaded. ukify would write
        # it anyway (it only checks the raw size); we drop the default line instead.
        sbat = merge_sbat(stub, kernel, "")
    sections.append(NewSection(".sbat", sbat))
    return add_sections(stub, sections)


def concat_initrds(initrds: list[bytes]) -> bytes:
    """Several initrds as one, each padded to 4 bytes as ukify does (the kernel unpacks them in turn)."""
    return b"".join(part + bytes(-len(part) % 4) for part in initrds)
