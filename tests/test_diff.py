"""reprobuild diff: two DDIs that differ in known ways report exactly those, classified; hostile inputs."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tarfile
import uuid
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from reprobuild.cli import _register_commands, cli
from reprobuild.diff.archives import decompress
from reprobuild.diff.compare import DiffOptions, compare_paths
from reprobuild.diff.detect import Kind, detect
from reprobuild.diff.difference import CONTENT, METADATA, Difference, Field, Status, leaves, summarize
from reprobuild.diff.render import render_html, render_json, render_text, to_json_data
from reprobuild.diff.source import ByteSource, TooLarge
from tests.test_diff_support import CHANGES, EPOCH, make_ddi, make_keys, make_tree, set_partition_uuid

SCHEMA = json.loads((Path(__file__).parents[1] / "reprobuild/diff/schema.json").read_text())
ESP_UUID = uuid.UUID("12345678-1234-4234-8234-123456789abc")

_register_commands()


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["diff", *args], standalone_mode=False, catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        # What reprobuild.cli.main does with a ReprobuildError: message + exit code.
        code = getattr(r.exception, "exit_code", None)
        assert code is not None, f"unexpected exception: {r.exception!r}"
        return code, r.output + str(r.exception)
    return (r.return_value if isinstance(r.return_value, int) else r.exit_code), r.output


def cli_exit(*args: str) -> tuple[int, str]:
    """Exit status as `reprobuild` would return it (click's ctx.exit raises Exit under standalone_mode=False)."""
    import click

    try:
        rv = cli.main(args=["diff", *args], prog_name="reprobuild", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code, ""
    except Exception as e:  # noqa: BLE001
        return getattr(e, "exit_code", -1), getattr(e, "message", str(e))
    return 0 if rv is None else rv, ""


@pytest.fixture(scope="module")
def ddis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    w = tmp_path_factory.mktemp("ddis")
    keys = make_keys(w)
    a = make_ddi(w, "a", keys=keys)
    a2 = make_ddi(w, "a2", keys=keys)
    b = make_ddi(w, "b", frozenset(CHANGES), keys=keys)
    set_partition_uuid(b, 0, ESP_UUID)
    meta_only = make_ddi(w, "m", frozenset({"mtime"}), keys=keys)
    return {"a": a, "a2": a2, "b": b, "m": meta_only, "dir": w}


def by_path(diff: Difference | None) -> dict[str, Difference]:
    assert diff is not None
    return {" / ".join(p): n for p, n in leaves(diff)}


# -- the acceptance test: known differences, exactly, classified -----------------------------------


def test_identical_ddis_report_nothing(ddis: dict[str, Path]) -> None:
    assert ddis["a"].read_bytes() == ddis["a2"].read_bytes()  # the builder is reproducible
    result = compare_paths(ddis["a"], ddis["a2"])
    assert result.identical and result.difference is None
    assert "identical" in render_text(result)
    assert cli_exit(str(ddis["a"]), str(ddis["a2"]))[0] == 0


def test_ddi_reports_exactly_the_known_differences(ddis: dict[str, Path]) -> None:
    result = compare_paths(ddis["a"], ddis["b"])
    got = by_path(result.difference)
    fs = "root-x86-64"
    expected_files = {f"{fs} / {path}": (what, cls) for path, what, cls in CHANGES.values()}
    files = {k: v for k, v in got.items() if k.startswith(fs + " / ")}
    assert set(files) == set(expected_files)
    for key, (what, cls) in expected_files.items():
        node = files[key]
        assert node.classification.value == cls, key
        if what in ("added", "removed"):
            assert node.status.value == what
        elif what == "content":
            assert node.diff is not None and "-alpha" in node.diff and "+bravo" in node.diff
        else:
            assert [f.name for f in node.fields] == [what]
    # The partition UUID that was changed on purpose, and what follows from the new root hash:
    # the verity partition UUIDs, the root hash and the signature — all metadata, nothing else.
    others = {k: v for k, v in got.items() if k not in files}
    assert set(others) == {"esp", "root-x86-64", "root-x86-64-verity", "root-x86-64-verity-sig"}
    assert others["esp"].fields == (Field("UUID", str(others["esp"].fields[0].old), str(ESP_UUID), METADATA),)
    assert all(f.classification is METADATA for n in others.values() for f in n.fields)
    assert all(n.classification is METADATA for k, n in others.items() if k != "root-x86-64")
    assert {f.name for f in others["root-x86-64-verity"].fields} == {"UUID", "root hash"}
    assert {f.name for f in others["root-x86-64-verity-sig"].fields} == {"signed root hash", "signature"}
    assert result.difference.classification is CONTENT
    s = summarize(result.difference)
    assert (s.content, s.metadata) == (4, 5)


def test_metadata_only_pair_is_cosmetic_and_no_metadata_exits_0(ddis: dict[str, Path]) -> None:
    result = compare_paths(ddis["a"], ddis["m"])
    assert result.difference is not None and result.difference.classification is METADATA
    assert "metadata-only" in render_text(result)
    assert cli_exit(str(ddis["a"]), str(ddis["m"]))[0] == 1
    assert cli_exit("--no-metadata", str(ddis["a"]), str(ddis["m"]))[0] == 0
    assert compare_paths(ddis["a"], ddis["m"], DiffOptions(metadata=False)).identical


def test_cli_json_matches_schema_and_html_is_self_contained(ddis: dict[str, Path], tmp_path: Path) -> None:
    page = tmp_path / "diff.html"
    code, out = run_cli("--json", "--html", str(page), str(ddis["a"]), str(ddis["b"]))
    assert code == 1
    doc = json.loads(out)
    jsonschema.validate(doc, SCHEMA)
    assert doc["schema"] == "reprobuild-diff/1" and doc["identical"] is False
    assert doc["summary"] == {"differences": 9, "content": 4, "metadata": 5}
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<details" in text and "<script" not in text
    assert "http" not in text.split("<body>")[1]  # no external resources
    same = to_json_data(compare_paths(ddis["a"], ddis["a2"]))
    jsonschema.validate(same, SCHEMA)
    assert same["difference"] is None and same["summary"]["differences"] == 0


def test_exclude_and_max_depth(ddis: dict[str, Path]) -> None:
    got = by_path(compare_paths(ddis["a"], ddis["b"], DiffOptions(exclude=("hostname", "usr/*"))).difference)
    assert not any(k.endswith("hostname") or "/ usr/" in k for k in got)
    assert any(k.endswith("etc/added.conf") for k in got)
    shallow = compare_paths(ddis["a"], ddis["b"], DiffOptions(max_depth=1)).difference
    node = by_path(shallow)["root-x86-64"]
    assert any("max-depth" in c for c in node.comments) and node.classification is CONTENT


# -- hostile and bad input: a clear error, exit 2, never a traceback -----------------------------


def test_bad_gpt_crc_truncated_and_missing_input_exit_2(ddis: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.raw"
    shutil.copy(ddis["a"], bad)
    with open(bad, "r+b") as f:
        f.seek(512 + 56)
        f.write(b"\xff")
    code, msg = cli_exit(str(bad), str(ddis["a"]))
    assert code == 2 and "CRC32" in msg
    trunc = tmp_path / "trunc.raw"
    trunc.write_bytes(ddis["a"].read_bytes()[: 3 << 20])
    code, msg = cli_exit(str(ddis["a"]), str(trunc))
    assert code == 2 and "second image" in msg
    code, msg = cli_exit(str(ddis["a"]), str(tmp_path / "nope"))
    assert code == 2 and "No such file" in msg


def test_corrupt_file_system_in_partition_is_a_clear_error(ddis: dict[str, Path], tmp_path: Path) -> None:
    from reprobuild.image.gpt import read_gpt_path

    bad = tmp_path / "badfs.raw"
    shutil.copy(ddis["a"], bad)
    disk = read_gpt_path(bad)
    root = next(p for p in disk.partitions if p.name == "root-x86-64")
    with open(bad, "r+b") as f:
        f.seek(root.offset(disk.sector_size) + 40)  # squashfs superblock: bytes used, the table starts
        f.write(b"\xff" * 48)
    code, msg = cli_exit(str(ddis["a"]), str(bad))
    assert code == 2 and "root-x86-64: squashfs: the superblock says 18446744073709551615 bytes" in msg, msg


def test_verity_tree_not_matching_its_data_is_content(ddis: dict[str, Path], tmp_path: Path) -> None:
    from reprobuild.image.gpt import read_gpt_path

    bad = tmp_path / "tampered.raw"
    shutil.copy(ddis["a"], bad)
    disk = read_gpt_path(bad)
    root = next(p for p in disk.partitions if p.name == "root-x86-64")
    end = root.offset(disk.sector_size) + root.size(disk.sector_size)
    with open(bad, "r+b") as f:  # the last byte of the data partition: padding, files stay the same
        f.seek(end - 1)
        f.write(b"\x01")
    got = by_path(compare_paths(ddis["a"], bad).difference)
    verity = got["root-x86-64-verity"]
    assert Field("hash tree matches data", "yes", "no", CONTENT) in verity.fields
    assert verity.classification is CONTENT
    assert got["root-x86-64"].classification is CONTENT


def test_decompression_is_bounded(tmp_path: Path) -> None:
    bomb = gzip.compress(bytes(8 << 20))
    with pytest.raises(TooLarge):
        decompress(Kind.GZIP, ByteSource.of_bytes(bomb), 1 << 20)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "z.gz").write_bytes(bomb)
    (b / "z.gz").write_bytes(gzip.compress(bytes(8 << 20) + b"x"))
    got = by_path(compare_paths(a, b, DiffOptions(memory_limit=1 << 20)).difference)
    assert any("not decompressed" in c for c in got["z.gz"].comments)


@pytest.mark.parametrize("blob", [b"EFI PART" * 100, b"\x00" * 1024 + b"\xe2\xe1\xf5\xe0" + b"\0" * 3000,
                                  b"hsqs" + b"\xff" * 5000, b"070701" + b"Z" * 200, b"\x1f\x8b\x08" + b"\0" * 50],
                         ids=["gpt-magic-only", "erofs-magic-only", "squashfs-garbage", "cpio-garbage", "gzip-garbage"])
def test_hostile_top_level_inputs_exit_2(tmp_path: Path, blob: bytes) -> None:
    x, y = tmp_path / "x", tmp_path / "y"
    x.write_bytes(blob)
    y.write_bytes(blob[:-1] + b"\x01")
    code, msg = cli_exit(str(x), str(y))
    assert code == 2, msg
    assert msg and "Traceback" not in msg


def test_hostile_nested_member_falls_back_to_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x.gz").write_bytes(b"\x1f\x8b\x08" + b"\0" * 50)
    (b / "x.gz").write_bytes(b"\x1f\x8b\x08" + b"\1" * 50)
    node = by_path(compare_paths(a, b).difference)["x.gz"]
    assert any("could not be read as gzip" in c for c in node.comments)


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fs", ["erofs", "ext4", "squashfs"])
def test_file_system_images_and_mixed_pairs(tmp_path: Path, fs: str) -> None:
    from reprobuild.image.fs import make_filesystem

    ta = make_tree(tmp_path / "ta")
    tb = make_tree(tmp_path / "tb", frozenset({"content", "mode", "added", "removed"}))
    ia, ib = tmp_path / "a.img", tmp_path / "b.img"
    make_filesystem(fs, ta, ia, uuid.UUID(int=7), EPOCH, "root")
    make_filesystem(fs, tb, ib, uuid.UUID(int=7), EPOCH, "root")
    assert detect(ByteSource.of_file(ia)).value == fs
    got = by_path(compare_paths(ia, ib).difference)
    want = {p for name, (p, _, _) in CHANGES.items() if name != "mtime"}
    assert set(got) == want
    # An image against a directory: the same differences (make_filesystem clamps times to EPOCH,
    # and so does make_tree).
    mixed = by_path(compare_paths(ia, tb, DiffOptions(exclude=("lost+found",))).difference)
    assert set(mixed) == want
    assert compare_paths(ia, ta, DiffOptions(exclude=("lost+found",))).identical


def test_same_files_different_superblock_is_metadata(tmp_path: Path) -> None:
    from reprobuild.image.fs import make_filesystem

    t = make_tree(tmp_path / "t")
    ia, ib = tmp_path / "a.img", tmp_path / "b.img"
    make_filesystem("erofs", t, ia, uuid.UUID(int=1), EPOCH, "root")
    make_filesystem("erofs", t, ib, uuid.UUID(int=2), EPOCH, "root")
    d = compare_paths(ia, ib).difference
    assert d is not None and d.classification is METADATA
    assert [f.name for f in d.fields] == ["UUID"]


def _tar(tree: Path, out: Path, mtime_bump: str | None = None) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(tree.rglob("*")):
            ti = tf.gettarinfo(str(p), p.relative_to(tree).as_posix())
            if p.relative_to(tree).as_posix() == mtime_bump:
                ti.mtime += 60
            tf.addfile(ti, io.BytesIO(p.read_bytes()) if ti.isreg() else None)


def test_tar_against_directory_and_nested_archives(tmp_path: Path) -> None:
    ta = make_tree(tmp_path / "ta")
    tb = make_tree(tmp_path / "tb", frozenset({"content"}))
    _tar(ta, tmp_path / "a.tar")
    _tar(tb, tmp_path / "b.tar", mtime_bump="etc/os-release")
    got = by_path(compare_paths(tmp_path / "a.tar", tmp_path / "b.tar").difference)
    assert set(got) == {"etc/hostname", "etc/os-release"}
    assert got["etc/os-release"].classification is METADATA
    assert set(by_path(compare_paths(tmp_path / "a.tar", tb).difference)) == {"etc/hostname"}
    # A .tar.gz inside a directory is opened: gzip → tar → the member that differs.
    da, db = tmp_path / "da", tmp_path / "db"
    da.mkdir(), db.mkdir()
    (da / "x.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes(), mtime=0))
    (db / "x.tar.gz").write_bytes(gzip.compress((tmp_path / "b.tar").read_bytes(), mtime=0))
    nested = by_path(compare_paths(da, db).difference)
    assert "x.tar.gz / x.tar / etc/hostname" in nested


def test_text_binary_and_json(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "t.txt").write_text("one\ntwo\nthree\n")
    (b / "t.txt").write_text("one\n2\nthree\n")
    (a / "x.bin").write_bytes(b"\0\1\2\3" * 100)
    (b / "x.bin").write_bytes(b"\0\1\2\3" * 50 + b"\0\1\2\4" + b"\0\1\2\3" * 49)
    (a / "image.manifest.json").write_text(json.dumps({"image": {"uuid": "1", "packages": ["a=1"]}}))
    (b / "image.manifest.json").write_text(json.dumps({"image": {"uuid": "2", "packages": ["a=2"]}}))
    got = by_path(compare_paths(a, b).difference)
    assert "-two\n+2\n" in got["t.txt"].diff
    assert any("first difference at offset 203 (0xcb)" in c for c in got["x.bin"].comments)
    fields = {f.name: f for f in got["image.manifest.json"].fields}
    assert fields["image.uuid"].classification is METADATA
    assert fields["image.packages[0]"] == Field("image.packages[0]", '"a=1"', '"a=2"', CONTENT)


def _lock(version: str, date: str) -> bytes:
    from reprobuild.lockfile import Lock, LockedPackage, LockSource, PackageSet, config_digest_of, dumps

    src = LockSource("bookworm/main", "debian", "bookworm", "bookworm", "main", date, "20240101T000000Z",
                     "a" * 64, "b" * 64)  # fmt: skip
    pkgs = tuple(LockedPackage(n, v, "amd64", "bookworm/main", n, v, f"pool/main/{n}_{v}.deb", 100, h * 64, 10,
                               False, "optional", "no", (), ())
                 for n, v, h in (("base-files", "12.4", "c"), ("hello", version, "d" if version == "2.10-3" else "e")))  # fmt: skip
    config = {"Content": {"Packages": ["hello"]}}
    return dumps(Lock(config_digest_of(config), "debian", "bookworm", "amd64", EPOCH, "0" * 32, (src,),
                      (PackageSet("image", "bookworm", "minbase", ("hello",), False, pkgs),), config))  # fmt: skip


def test_lockfiles_report_package_versions(tmp_path: Path) -> None:
    a, b = tmp_path / "a.lock", tmp_path / "b.lock"
    a.write_bytes(_lock("2.10-3", "Sat, 10 Feb 2024 10:00:00 UTC"))
    b.write_bytes(_lock("2.10-4", "Sat, 17 Feb 2024 10:00:00 UTC"))
    assert detect(ByteSource.of_file(a)) is Kind.LOCKFILE
    got = by_path(compare_paths(a, b).difference)
    assert set(got) == {"sources / bookworm/main", "set image / hello:amd64"}
    pkg = got["set image / hello:amd64"]
    assert {f.name: (f.old, f.new) for f in pkg.fields}["version"] == ("2.10-3", "2.10-4")
    assert pkg.classification is CONTENT
    assert got["sources / bookworm/main"].classification is METADATA
    assert "version: 2.10-3 → 2.10-4" in render_text(compare_paths(a, b))
    bad = tmp_path / "bad.lock"
    bad.write_text('{"config_digest": 1, "sets": []}')
    assert cli_exit(str(a), str(bad))[0] == 2


def test_uki_sections_and_initrd_cpio(tmp_path: Path) -> None:
    from reprobuild.image.cpio import CpioEntry, write_cpio
    from tests.test_pe import make_pe

    def initrd(init: bytes) -> bytes:
        buf = io.BytesIO()
        write_cpio([CpioEntry("init", 0o100755, data=init), CpioEntry("etc", 0o40755)], buf)
        return buf.getvalue()

    def uki(cmdline: bytes, init: bytes) -> bytes:
        return make_pe([(".osrel", b"ID=debian\n"), (".cmdline", cmdline), (".uname", b"6.1.0-18-amd64"),
                        (".initrd", initrd(init)), (".linux", b"\x90" * 700)])  # fmt: skip

    a, b = tmp_path / "a.efi", tmp_path / "b.efi"
    a.write_bytes(uki(b"root=PARTUUID=1 ro", b"#!/bin/sh\n"))
    b.write_bytes(uki(b"root=PARTUUID=1 rw", b"#!/bin/sh\nexec /sbin/init\n"))
    assert detect(ByteSource.of_file(a)) is Kind.PE
    got = by_path(compare_paths(a, b).difference)
    assert set(got) == {".cmdline", ".initrd / init"}
    assert "+root=PARTUUID=1 rw" in got[".cmdline"].diff
    assert "+exec /sbin/init" in got[".initrd / init"].diff


def test_difference_constructors_return_none_for_same() -> None:
    assert Difference.of("x", "file") is None
    assert Difference.of("x", "file", fields=[Field.of("mode", "0644", "0644")], details=[None]) is None
    assert Field.of("mode", 1, 1) is None
    d = Difference.of("x", "file", fields=[Field.of("mtime", 1, 2, METADATA)])
    assert d is not None and d.classification is METADATA and d.status is Status.CHANGED


def test_render_text_and_html_escape(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "<x>.txt").write_text("<script>\n")
    (b / "<x>.txt").write_text("</script>\n")
    r = compare_paths(a, b)
    page = render_html(r)
    assert "<script>" not in page and "&lt;script&gt;" in page
    text = render_text(r)
    assert text.index("Summary") < text.index("Details")
    assert json.loads(render_json(r))["summary"]["differences"] == 1
    _ = os


def test_build_manifests_beside_disks_give_a_package_summary(ddis: dict[str, Path], tmp_path: Path) -> None:
    """`image.raw.manifest.json` beside each disk (what `build` writes): the packages the two
    images were built from are compared package by package."""
    import shutil

    from reprobuild.diff.lockdiff import diff_pins

    a, b = tmp_path / "a" / "image.raw", tmp_path / "b" / "image.raw"
    for src, dst in ((ddis["a"], a), (ddis["b"], b)):
        dst.parent.mkdir()
        shutil.copyfile(src, dst)
    base = {"format": "disk", "packages": ["base-files=13.8:amd64", "less=661-1:amd64", "zlib1g=1:1.3-1:amd64"]}
    other = {"format": "disk", "packages": ["base-files=13.9:amd64", "zlib1g=1:1.3-1:amd64", "hello=2.10-3:amd64"]}
    (a.parent / "image.raw.manifest.json").write_text(json.dumps(base))
    (b.parent / "image.raw.manifest.json").write_text(json.dumps(other))
    got = by_path(compare_paths(a, b).difference)
    packages = {k.split(" / ")[-1]: v for k, v in got.items() if " / packages / " in f" / {k}"}
    assert packages["less:amd64"].status.value == "removed" and "was 661-1" in packages["less:amd64"].comments[0]
    assert packages["hello:amd64"].status.value == "added"
    assert packages["base-files:amd64"].fields == (Field("version", "13.8", "13.9", CONTENT),)
    assert "zlib1g:amd64" not in packages  # epochs in versions are kept apart from the architecture
    assert diff_pins("packages", base["packages"], base["packages"]) is None


# -- erofs and ext4 DDIs: compared through the verity hash trees, read in place -------------------


# What "b" changes. The build clamps every time to the epoch, so no mtime change. ext4 allocates
# inodes and blocks in tree order: an added or removed file renumbers and moves every later one,
# and the trees then rightly show most blocks changed — so its pair changes files in place only.
DDI_CHANGES = {"erofs": frozenset(CHANGES) - {"mtime"}, "ext4": frozenset({"content", "mode"})}


@pytest.fixture(scope="module", params=["erofs", "ext4"])
def erofs_ddis(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three DDIs whose root is ``request.param`` as the build makes it (the name is the first
    file system this path was made for); "fs" names it."""
    fs = request.param
    w = tmp_path_factory.mktemp(f"{fs}-ddis")
    keys = make_keys(w)
    changes = DDI_CHANGES[fs]
    return {"a": make_ddi(w, "a", keys=keys, fs=fs, extra_bytes=8 << 20),
            "a2": make_ddi(w, "a2", keys=keys, fs=fs, extra_bytes=8 << 20),
            "b": make_ddi(w, "b", changes, keys=keys, fs=fs, extra_bytes=8 << 20), "fs": Path(fs)}  # fmt: skip


def _root_range(image: Path) -> tuple[int, int]:
    from reprobuild.image.gpt import read_gpt_path

    disk = read_gpt_path(image)
    root = next(p for p in disk.partitions if p.name == "root-x86-64")
    return root.offset(disk.sector_size), root.offset(disk.sector_size) + root.size(disk.sector_size)


@pytest.fixture
def root_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read through os.pread (every read of the diff's byte sources and readers) inside
    ``[lo, hi)`` — the root partition of both images; and no file system may be extracted."""
    seen = {"lo": 0, "hi": 0, "bytes": 0}
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        buf = real(fd, n, off)
        seen["bytes"] += max(0, min(off + len(buf), seen["hi"]) - max(off, seen["lo"]))
        return buf

    def no_extraction(*a: object, **k: object) -> None:
        raise AssertionError("a file system was extracted")

    monkeypatch.setattr(os, "pread", counting)
    monkeypatch.setattr("reprobuild.diff.fstree.extract_fs", no_extraction)
    return seen


def test_identical_erofs_ddis_do_not_read_the_root_data(erofs_ddis: dict[str, Path],
                                                        root_reads: dict[str, int]) -> None:  # fmt: skip
    assert erofs_ddis["a"].read_bytes() == erofs_ddis["a2"].read_bytes()
    root_reads["lo"], root_reads["hi"] = _root_range(erofs_ddis["a"])
    assert compare_paths(erofs_ddis["a"], erofs_ddis["a2"]).identical
    # Equal top hash blocks: of the data partitions only the superblock magic is read.
    assert root_reads["bytes"] <= 2 * 4096, root_reads


def test_erofs_ddis_report_the_changed_files_via_the_hash_trees(erofs_ddis: dict[str, Path],
                                                                 root_reads: dict[str, int]) -> None:  # fmt: skip
    lo, hi = root_reads["lo"], root_reads["hi"] = _root_range(erofs_ddis["a"])
    assert _root_range(erofs_ddis["b"]) == (lo, hi)
    code, out = run_cli("--json", str(erofs_ddis["a"]), str(erofs_ddis["b"]))
    assert code == 1
    jsonschema.validate(json.loads(out), SCHEMA)
    assert "compared through the dm-verity hash trees" in out
    # The CLI run read a small part of the two root partitions (metadata and the changed files).
    assert 0 < root_reads["bytes"] < 2 * (hi - lo) // 20, (root_reads["bytes"], hi - lo)
    result = compare_paths(erofs_ddis["a"], erofs_ddis["b"])
    got = by_path(result.difference)
    fs = "root-x86-64"
    kind = erofs_ddis["fs"].name
    want = {f"{fs} / {CHANGES[name][0]}" for name in DDI_CHANGES[kind]}
    assert {k for k in got if k.startswith(fs + " / ")} == want
    assert "-alpha" in (got[f"{fs} / etc/hostname"].diff or "")
    assert [f.name for f in got[f"{fs} / usr/bin/tool"].fields] == ["mode"]
    root = next(d for d in result.difference.details if d.name == fs)
    tree_note = next(c for c in root.comments if c.startswith("compared through the dm-verity hash trees"))
    m = re.match(r".*: (\d+) of (\d+) data blocks differ", tree_note)
    assert m is not None
    changed, total = int(m.group(1)), int(m.group(2))
    assert 0 < changed < total // 100  # a few blocks of an 8 MiB+ file system
    assert any(c.startswith(f"{kind} read in place") for c in root.comments)
    verity = got[f"{fs}-verity"]
    assert {f.name for f in verity.fields} == {"UUID", "root hash"} and verity.classification is METADATA
    assert summarize(result.difference).content == len(DDI_CHANGES[kind])


def test_squashfs_ddis_say_why_the_hash_trees_were_not_used(ddis: dict[str, Path]) -> None:
    root = by_path(compare_paths(ddis["a"], ddis["b"]).difference)["root-x86-64"]
    assert any("mapped to files only for erofs" in c for c in root.comments)
    assert any(c.startswith("squashfs read in place") for c in root.comments)


def test_hostile_erofs_in_a_ddi_is_a_clear_error(tmp_path: Path) -> None:
    """A looping directory in an erofs root whose verity tree covers it, against the same image
    without the loop (same tree shape: the hash-tree path reads it): exit 2 naming the partition
    and the loop, no traceback."""
    import struct

    from reprobuild.image import erofs
    from reprobuild.image.fs import make_filesystem

    tree = make_tree(tmp_path / "tree")
    img = tmp_path / "root.erofs"
    make_filesystem("erofs", tree, img, uuid.UUID(int=7), EPOCH, "root")
    data = bytearray(img.read_bytes())
    fs = erofs.Erofs(lambda off, n: bytes(data[off:off + n]), len(data))
    usr = next(ino for p, n, ino in fs.walk() if p + n == b"usr")
    # Point usr/bin's directory entry back at usr: a loop.
    bin_entry = next(off for ext in usr.extents for off in range(ext.offset, ext.offset + ext.length - 12, 12)
                     if struct.unpack_from("<H", data, off + 8)[0] < ext.length
                     and data[ext.offset + struct.unpack_from("<H", data, off + 8)[0]:][:3] == b"bin")  # fmt: skip
    struct.pack_into("<Q", data, bin_entry, usr.nid)
    keys = make_keys(tmp_path)
    good = make_ddi(tmp_path, "good", keys=keys, root_fs=img, esp=False)
    img.write_bytes(data)
    bad = make_ddi(tmp_path, "bad", keys=keys, root_fs=img, esp=False)
    code, msg = cli_exit(str(good), str(bad))
    assert code == 2 and "root-x86-64" in msg and "reached twice" in msg, msg


def _squashfs_pair(tmp_path: Path, *options: str) -> tuple[Path, Path]:
    import subprocess

    ta = make_tree(tmp_path / "ta", extra_bytes=4 << 20)
    tb = make_tree(tmp_path / "tb", frozenset({"content", "mode"}), extra_bytes=4 << 20)
    os.setxattr(ta / "usr/share/doc/copyright", "user.origin", b"a")
    os.setxattr(tb / "usr/share/doc/copyright", "user.origin", b"b")
    blob = bytearray((tb / "usr/lib/big/blob0002").read_bytes())
    blob[700_000] ^= 1  # one bit in the sixth 128 KiB block of a 1 MiB file stored in blocks
    (tb / "usr/lib/big/blob0002").write_bytes(blob)
    for t, img in ((ta, "a.img"), (tb, "b.img")):
        subprocess.run(["mksquashfs", str(t), str(tmp_path / img), "-noappend", "-quiet", "-no-progress",
                        "-all-time", str(EPOCH), "-mkfs-time", str(EPOCH), *options], check=True)  # fmt: skip
    return tmp_path / "a.img", tmp_path / "b.img"


def test_squashfs_is_read_in_place_and_only_differing_files_are_decompressed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """No unsquashfs on PATH: the reader does it all. The 4 MiB of blobs and the unchanged files
    are compared as stored; xattrs are compared for any user (unsquashfs as non-root drops them)."""
    a, b = _squashfs_pair(tmp_path, "-comp", "zstd", "-xattrs")
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    d = compare_paths(a, b).difference
    assert d is not None
    got = by_path(d)
    assert set(got) == {"etc/hostname", "usr/bin/tool", "usr/share/doc/copyright", "usr/lib/big/blob0002"}
    assert {f.name for f in got["usr/share/doc/copyright"].fields} == {"xattr user.origin"}
    assert {f.name for f in got["usr/bin/tool"].fields} == {"mode"}
    (note,) = [c for c in d.comments if c.startswith("squashfs read in place")]
    # Each side's hostname, tool and copyright: the paths whose attributes or stored bytes differ,
    # less the blob, whose random blocks mksquashfs stores uncompressed (read as a slice in place).
    assert "6 file(s) decompressed" in note, note
    assert compare_paths(a, a).identical


def test_lz4_squashfs_falls_back_to_unsquashfs_and_says_so(tmp_path: Path) -> None:
    a, b = _squashfs_pair(tmp_path, "-comp", "lz4")
    d = compare_paths(a, b).difference
    assert d is not None and {"etc/hostname", "usr/bin/tool", "usr/lib/big/blob0002"} <= set(by_path(d))
    assert any("lz4 compression is not supported: extracted with unsquashfs instead" in c for c in d.comments)


def test_ext4_is_read_in_place_with_xattrs_and_ext2_falls_back_to_debugfs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """No debugfs on PATH: the reader does it all, xattrs included (debugfs rdump drops them).
    An ext2 image (block-mapped files) goes to debugfs, which is then needed, and the node says so."""
    import subprocess

    from reprobuild.image.fs import make_filesystem

    ta = make_tree(tmp_path / "ta")
    tb = make_tree(tmp_path / "tb", frozenset({"content", "mode", "added"}))
    os.setxattr(ta / "usr/share/doc/copyright", "user.origin", b"a")
    os.setxattr(tb / "usr/share/doc/copyright", "user.origin", b"b")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_filesystem("ext4", ta, a, uuid.UUID(int=7), EPOCH, "root")
    make_filesystem("ext4", tb, b, uuid.UUID(int=7), EPOCH, "root")
    empty = tmp_path / "no-tools"
    empty.mkdir()
    with monkeypatch.context() as m:
        m.setenv("PATH", str(empty))
        d = compare_paths(a, b).difference
    assert d is not None
    got = by_path(d)
    assert set(got) == {"etc/hostname", "usr/bin/tool", "etc/added.conf", "usr/share/doc/copyright"}
    assert {f.name for f in got["usr/share/doc/copyright"].fields} == {"xattr user.origin"}
    assert any(c.startswith("ext4 read in place") and "entries" in c for c in d.comments), d.comments
    for t, img in ((ta, "a2.img"), (tb, "b2.img")):
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-d", str(t), str(tmp_path / img), "8M"], check=True,
                       capture_output=True)  # fmt: skip
    d2 = compare_paths(tmp_path / "a2.img", tmp_path / "b2.img").difference
    assert d2 is not None and {"etc/hostname", "usr/bin/tool", "etc/added.conf"} <= set(by_path(d2))
    assert any("block-mapped" in c and "extracted with debugfs instead" in c for c in d2.comments), d2.comments


def test_esp_vfat_is_read_in_place_without_mtools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ESPs as the build makes them (mkfs.fat + mcopy), one UKI changed and one entry added;
    no mtools on PATH while they are compared: the files are named, FAT's fields only."""
    from reprobuild.image.fs import make_filesystem

    trees = []
    for name, uki in (("a", b"MZ" + bytes(200_000)), ("b", b"MZ" + bytes(100_000) + b"changed" + bytes(99_993))):
        t = tmp_path / name
        (t / "EFI/Linux").mkdir(parents=True)
        (t / "EFI/BOOT").mkdir()
        (t / "EFI/BOOT/BOOTX64.EFI").write_bytes(uki)
        (t / "EFI/Linux/loader.conf").write_text("timeout 0\n")
        if name == "b":
            (t / "EFI/Linux/extra.conf").write_text("added\n")
        make_filesystem("vfat", t, tmp_path / f"{name}.vfat", uuid.UUID(int=1), EPOCH, "ESP")
        for p in t.rglob("*"):  # the times the build gives the ESP's files
            os.utime(p, (EPOCH, EPOCH))
        trees.append(t)
    empty = tmp_path / "no-tools"
    empty.mkdir()
    with monkeypatch.context() as m:
        m.setenv("PATH", str(empty))
        d = compare_paths(tmp_path / "a.vfat", tmp_path / "b.vfat").difference
    assert d is not None
    got = by_path(d)
    assert set(got) == {"EFI/BOOT/BOOTX64.EFI", "EFI/Linux/extra.conf"}
    assert got["EFI/Linux/extra.conf"].status is Status.ADDED
    assert {f.name for f in got["EFI/BOOT/BOOTX64.EFI"].fields} <= {"size", "sha256"}
    # A FAT image against a directory: the same two differences (FAT's fields only).
    assert set(by_path(compare_paths(tmp_path / "a.vfat", trees[1]).difference)) == set(got)
    assert compare_paths(tmp_path / "a.vfat", trees[0]).identical


def test_compressed_erofs_falls_back_to_fsck_erofs_and_says_so(tmp_path: Path) -> None:
    import subprocess

    ta = make_tree(tmp_path / "ta")
    tb = make_tree(tmp_path / "tb", frozenset({"content"}))
    for t, img in ((ta, "a.img"), (tb, "b.img")):
        (t / "usr/share/doc/long").write_bytes(b"compress me " * 4000)  # lz4 only stores what shrinks
        os.utime(t / "usr/share/doc/long", (EPOCH, EPOCH))
        subprocess.run(["mkfs.erofs", "--quiet", "-zlz4", f"-T{EPOCH}", str(tmp_path / img), str(t)], check=True)
    d = compare_paths(tmp_path / "a.img", tmp_path / "b.img").difference
    assert d is not None and set(by_path(d)) == {"etc/hostname"}
    assert any("compressed" in c and "extracted with fsck.erofs instead" in c for c in d.comments), d.comments
