"""UKI assembly: SBAT merge, section contents and order, and the real Debian stub + kernel (live)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from reprobuild.image.authenticode import sign_pe, verify_pe_signature
from reprobuild.image.pe import PeInvalid, parse_pe
from reprobuild.image.uki import (
    DEFAULT_UKI_SBAT,
    SBAT_HEADER,
    build_uki,
    concat_initrds,
    merge_sbat,
    normalize_cmdline,
)
from reprobuild.signer import file_signer
from reprobuild.x509 import generate_rsa_key_and_certificate
from tests.test_pe import make_pe

STUB_SBAT = b"sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\nsystemd,1,The systemd Developers,systemd,252,https://systemd.io/\n\0"
KERNEL_PATH = "boot/vmlinuz-*"
STUB_PATH = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"


def fake_stub() -> bytes:
    return make_pe([(".text", b"\xc3" * 300), (".sbat", STUB_SBAT + bytes(600))], sect_align=0x200)


def fake_kernel(size_of_image_extra: int = 0x10000) -> bytes:
    return make_pe([(".setup", b"S" * 100), (".text", b"K" * 3000)], size_of_image_extra=size_of_image_extra)


def _section_bytes(uki: bytes, name: str) -> bytes:
    sec = parse_pe(uki).section(name)
    assert sec is not None, name
    return uki[sec.pointer_to_raw_data : sec.pointer_to_raw_data + min(sec.virtual_size, sec.size_of_raw_data)]


def test_merge_sbat_like_ukify() -> None:
    merged = merge_sbat(fake_stub(), fake_kernel(), None).decode()
    assert merged == (SBAT_HEADER + "\nsystemd,1,The systemd Developers,systemd,252,https://systemd.io/\n"
                      + DEFAULT_UKI_SBAT + "\n\0")  # fmt: skip
    extra = merge_sbat(fake_stub(), fake_kernel(), "sbat,1,ignored header\nmine,1,Me,mine,1,https://example.invalid/\n")
    assert extra.decode().splitlines()[1:] == [
        "systemd,1,The systemd Developers,systemd,252,https://systemd.io/",
        "mine,1,Me,mine,1,https://example.invalid/",
        "\0",
    ]


def test_cmdline_normalized() -> None:
    assert normalize_cmdline("  root=PARTUUID=x \n ro\tquiet  ") == b"root=PARTUUID=x ro quiet"


def test_build_uki_sections() -> None:
    kernel = fake_kernel()
    uki = build_uki(fake_stub(), kernel, b"INITRD", "console=ttyS0   quiet", "ID=debian\n", "6.1.0-test")
    pe = parse_pe(uki)
    assert [s.name for s in pe.sections] == [".text", ".sbat", ".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
    assert _section_bytes(uki, ".osrel") == b"ID=debian\n"
    assert _section_bytes(uki, ".cmdline") == b"console=ttyS0 quiet"
    assert _section_bytes(uki, ".uname") == b"6.1.0-test"
    assert _section_bytes(uki, ".initrd") == b"INITRD"
    linux = pe.section(".linux")
    assert linux is not None and linux.virtual_size == parse_pe(kernel).size_of_image
    assert uki[linux.pointer_to_raw_data : linux.pointer_to_raw_data + len(kernel)] == kernel
    assert _section_bytes(uki, ".sbat").endswith(DEFAULT_UKI_SBAT.encode() + b"\n\0")
    assert build_uki(fake_stub(), kernel, b"INITRD", "console=ttyS0 quiet", "ID=debian\n", "6.1.0-test") == uki


def test_default_sbat_line_dropped_when_it_does_not_fit() -> None:
    # .sbat with only 0x100 bytes of address space before the next section (like Debian 12's stub).
    long_sbat = STUB_SBAT[:-1] + b"systemd.debian,1,Debian GNU/Linux,systemd,252.39-1~deb12u2,https://bugs.debian.org/\n\0"
    assert len(long_sbat) == 226  # the Debian 12 stub's
    stub = bytearray(make_pe([(".text", b"\xc3" * 300), (".sbat", long_sbat), (".sdmagic", b"m")],
                             sect_align=0x100, file_align=0x200))  # fmt: skip
    uki = build_uki(bytes(stub), fake_kernel(), b"", "x", "ID=t\n", "")
    assert _section_bytes(uki, ".sbat") == long_sbat
    with pytest.raises(PeInvalid, match="do not fit"):
        build_uki(bytes(stub), fake_kernel(), b"", "x", "ID=t\n", "", sbat_extra="x,1,X,x,1," + "u" * 200)


def test_build_uki_rejects_mismatches() -> None:
    arm_kernel = bytearray(fake_kernel())
    arm_kernel[0x44:0x46] = (0xAA64).to_bytes(2, "little")
    with pytest.raises(PeInvalid, match="machine"):
        build_uki(fake_stub(), bytes(arm_kernel), b"", "", "", "")
    with pytest.raises(PeInvalid, match="no .sbat"):
        build_uki(make_pe([(".text", b"\xc3")]), fake_kernel(), b"", "", "", "")
    with pytest.raises(PeInvalid):
        build_uki(fake_stub(), b"not a kernel", b"", "", "", "")


def test_concat_initrds_pads_to_4() -> None:
    assert concat_initrds([b"abc", b"defgh", b""]) == b"abc\0defgh\0\0\0"


# ---- live: the real Debian stub and kernel ------------------------------------------------------


def fetch_debian_boot_files(cache: Path) -> dict[str, Path]:
    """Download (once per cache dir) and unpack systemd-boot-efi, the cloud kernel and
    busybox-static with ``apt-get download`` from the host's configured mirror."""
    root = cache / "root"
    done = cache / ".done"
    if not done.exists():
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        depends = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
        kernel_pkg = re.search(r"Depends: (linux-image-\S+)", depends)
        assert kernel_pkg, depends
        subprocess.run(["apt-get", "download", "-q", "systemd-boot-efi", kernel_pkg.group(1), "busybox-static"],
                       cwd=debs, check=True, capture_output=True)  # fmt: skip
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        done.touch()
    (kernel,) = sorted(root.glob(KERNEL_PATH))
    return {"stub": root / STUB_PATH, "kernel": kernel, "busybox": root / "bin" / "busybox",
            "uname": Path(kernel.name.removeprefix("vmlinuz-"))}  # fmt: skip


@pytest.fixture(scope="session")
def debian_boot_files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Kept in pytest's cache between runs (27 MB of packages) unless the cache plugin is disabled.
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("reprobuild-debian-boot") if cache else tmp_path_factory.mktemp("debian-boot")
    return fetch_debian_boot_files(Path(where))


@pytest.mark.live
def test_real_stub_and_kernel(tmp_path: Path, debian_boot_files: dict[str, Path]) -> None:
    stub = debian_boot_files["stub"].read_bytes()
    kernel = debian_boot_files["kernel"].read_bytes()
    uname = str(debian_boot_files["uname"])
    uki = build_uki(stub, kernel, b"\x28\xb5\x2f\xfd" + bytes(100), "console=ttyS0", "ID=debian\n", uname)
    assert build_uki(stub, kernel, b"\x28\xb5\x2f\xfd" + bytes(100), "console=ttyS0", "ID=debian\n", uname) == uki
    (tmp_path / "uki.efi").write_bytes(uki)
    objdump = subprocess.run(["objdump", "-h", str(tmp_path / "uki.efi")], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    rows = re.findall(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", objdump, re.MULTILINE)
    names = [r[0] for r in rows]
    assert names[-5:] == [".osrel", ".cmdline", ".uname", ".initrd", ".linux"] and ".sbat" in names
    stub_pe = parse_pe(stub)
    for _name, _size, vma, file_off in rows[-5:]:  # (the stub's own .sdmagic sits at 0x19100)
        assert int(vma, 16) % stub_pe.section_alignment == 0
        assert int(file_off, 16) % stub_pe.file_alignment == 0
    # The stub's symbol table is stripped; the result is still a valid image sbverify can sign-check.
    assert parse_pe(uki).coff["PointerToSymbolTable"] == 0
    key, cert = generate_rsa_key_and_certificate("live UKI")
    signed = sign_pe(uki, file_signer(key, cert))
    (tmp_path / "signed.efi").write_bytes(signed)
    (tmp_path / "cert.pem").write_bytes(cert)
    result = subprocess.run(["sbverify", "--cert", str(tmp_path / "cert.pem"), str(tmp_path / "signed.efi")],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert verify_pe_signature(signed, cert)
