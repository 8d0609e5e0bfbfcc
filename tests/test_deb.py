"""The pure-Python .deb reader against packages built by the real dpkg-deb (xz, zstd, gzip, none)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from reprobuild.debian.deb import (
    DebFile,
    parse_ar_index,
    parse_control_stanza,
    read_control,
    write_decompressed,
)
from reprobuild.errors import FormatError


def dpkg_deb_build(workdir: Path, name: str, *, version: str = "1.0", arch: str = "all",
                   files: dict[str, bytes] | None = None, scripts: dict[str, str] | None = None,
                   extra_fields: str = "", compression: str = "xz") -> Path:
    """Build a real .deb with the host's dpkg-deb (test helper, shared by the rootfs tests)."""
    root = workdir / f"{name}-src"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: t <t@invalid>\n"
        f"{extra_fields}Description: test package {name}\n")
    for rel, data in (files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for script, body in (scripts or {}).items():
        p = root / "DEBIAN" / script
        p.write_text(body)
        p.chmod(0o755)
    out = workdir / f"{name}_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.mark.parametrize("compression", ["xz", "zstd", "gzip", "none"])
def test_reads_what_dpkg_deb_writes(tmp_path: Path, compression: str) -> None:
    deb = dpkg_deb_build(tmp_path, "hello", version="2:1.0-3", arch="amd64",
                         files={"usr/share/hello/a.txt": b"A" * 5000, "usr/bin/hello": b"#!/bin/sh\n"},
                         scripts={"postinst": "#!/bin/sh\necho hi\n"},
                         extra_fields="Depends: libc6 (>= 2.36), dash | bash\n", compression=compression)
    with DebFile(deb) as d:
        names = [m.name for m in d.members]
        assert names[0] == "debian-binary"
        ext = {"xz": ".xz", "zstd": ".zst", "gzip": ".gz", "none": ""}[compression]
        assert names[2] == "data.tar" + ext
        c = d.control()
        assert (c.package, c.version, c.architecture) == ("hello", "2:1.0-3", "amd64")
        assert c.fields["Depends"] == "libc6 (>= 2.36), dash | bash"
        assert c.scripts["postinst"] == b"#!/bin/sh\necho hi\n"
        contents = {}
        with d.open_tar("data") as tf:
            for ti in tf:
                contents[ti.name] = tf.extractfile(ti).read() if ti.isfile() else None
    assert contents["./usr/share/hello/a.txt"] == b"A" * 5000
    # Cross-check the member list with dpkg-deb itself.
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(listing)) as tf:
        assert sorted(tf.getnames()) == sorted(contents)


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


@pytest.mark.parametrize(
    "blob,message",
    [
        (b"not an ar archive", "missing ar magic"),
        (b"!<arch>\ndebian-binary   0", "truncated ar header"),
        (_ar([("debian-binary", b"2.0\n")])[:-3], "runs past the end"),
        (_ar([("debian-binary", b"3.0\n"), ("control.tar", b""), ("data.tar", b"")]), "unsupported .deb format"),
        (_ar([("control.tar", b""), ("debian-binary", b"2.0\n")]), "first ar member"),
        (_ar([("debian-binary", b"2.0\n"), ("control.tar.gz", b"")]), "no data.tar"),
    ],
    ids=["no-magic", "truncated-header", "truncated-member", "bad-version", "wrong-order", "no-data"],
)
def test_hostile_ar(tmp_path: Path, blob: bytes, message: str) -> None:
    p = tmp_path / "bad.deb"
    p.write_bytes(blob)
    with pytest.raises(FormatError, match=message):
        DebFile(p)


def test_corrupt_compressed_member_is_a_format_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.deb"
    p.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b"garbage!"), ("data.tar.xz", b"x")]))
    with pytest.raises(FormatError, match="corrupt control.tar.xz"):
        read_control(p)


def test_ar_index_is_pure() -> None:
    blob = _ar([("debian-binary", b"2.0\n"), ("odd", b"123")])
    members = parse_ar_index(lambda off, n: blob[off:off + n], len(blob))
    assert [(m.name, m.size) for m in members] == [("debian-binary", 4), ("odd", 3)]
    assert blob[members[1].offset:members[1].offset + 3] == b"123"


def test_control_stanza_continuations() -> None:
    f = parse_control_stanza("Package: x\nDescription: short\n long line\n .\nVersion: 1\n")
    assert f == {"Package": "x", "Description": "short\nlong line\n.", "Version": "1"}
    with pytest.raises(FormatError):
        parse_control_stanza(" starts with continuation\n")


@pytest.mark.parametrize("compression", ["xz", "zstd", "gzip", "none"])
@pytest.mark.parametrize("odd", [False, True])
def test_decompressed_package_is_the_same_package_for_dpkg(tmp_path: Path, compression: str, odd: bool) -> None:
    """write_decompressed (the build cache's per-.deb payload): dpkg-deb reads the same control,
    scripts and file system tree from it, and its data member is a plain data.tar."""
    deb = dpkg_deb_build(tmp_path, "hello", version="1:2.0-1", arch="amd64",
                         files={"usr/share/hello/a.txt": b"B" * (7001 if odd else 7000), "usr/bin/hello": b"#!/bin/sh\n"},
                         scripts={"postinst": "#!/bin/sh\necho hi\n"}, compression=compression)
    out = tmp_path / "plain.deb"
    with open(out, "wb") as f:
        write_decompressed(deb, f)

    def dpkg_deb(*args: str, path: Path) -> bytes:
        return subprocess.run(["dpkg-deb", *args, str(path)], capture_output=True, check=True).stdout

    assert dpkg_deb("--fsys-tarfile", path=out) == dpkg_deb("--fsys-tarfile", path=deb)
    assert dpkg_deb("--field", path=out) == dpkg_deb("--field", path=deb)
    assert dpkg_deb("--ctrl-tarfile", path=out) == dpkg_deb("--ctrl-tarfile", path=deb)
    assert subprocess.run(["ar", "t", str(out)], capture_output=True, text=True, check=True).stdout.split() == \
        ["debian-binary", next(m.name for m in DebFile(deb).members if m.name.startswith("control")), "data.tar"]
    with DebFile(out) as d, d.open_tar("data") as tf:
        assert any(ti.name == "./usr/share/hello/a.txt" for ti in tf)
    # read_tar: the plain member is read in one piece, the compressed one decompressed: same bytes.
    with DebFile(out) as plain, DebFile(deb) as original:
        assert plain.read_tar("data") == original.read_tar("data") == dpkg_deb("--fsys-tarfile", path=deb)


def test_decompressing_a_corrupt_package_is_a_format_error(tmp_path: Path) -> None:
    deb = dpkg_deb_build(tmp_path, "hello", files={"usr/share/x": bytes(range(256)) * 400})
    blob = bytearray(deb.read_bytes())
    with DebFile(deb) as d:
        data = next(m for m in d.members if m.name.startswith("data.tar"))
    blob[data.offset + data.size // 2] ^= 0xFF
    deb.write_bytes(bytes(blob))
    with pytest.raises(FormatError, match="corrupt data.tar.xz"), open(tmp_path / "out.deb", "wb") as f:
        write_decompressed(deb, f)
