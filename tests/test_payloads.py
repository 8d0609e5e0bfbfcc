"""reprobuild.rootfs.payloads: packages staged for dpkg with their payloads decompressed, ahead of
dpkg, by worker threads (the install's chunked unpack is covered end to end by the build tests,
which compare --no-cache, cached and rootless bytes)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from reprobuild.errors import FormatError
from reprobuild.rootfs.install import unpack_chunk
from reprobuild.rootfs.payloads import Payloads, is_decompressed, stage_payload
from tests.test_deb import dpkg_deb_build


def _fsys(path: Path) -> bytes:
    return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True, check=True).stdout


def test_a_compressed_package_is_staged_decompressed_and_complete(tmp_path: Path) -> None:
    deb = dpkg_deb_build(tmp_path, "a", files={"usr/share/a/x": b"x" * 5000})
    assert not is_decompressed(deb)
    dst = tmp_path / "stage.deb"
    stage_payload(deb, dst)
    assert is_decompressed(dst)
    assert _fsys(dst) == _fsys(deb)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_a_decompressed_package_is_linked_not_rewritten(tmp_path: Path) -> None:
    deb = dpkg_deb_build(tmp_path, "b", files={"usr/share/b/x": b"y"}, compression="none")
    dst = tmp_path / "stage.deb"
    stage_payload(deb, dst)
    assert dst.stat().st_ino == deb.stat().st_ino
    with pytest.raises(FileExistsError):  # never replaces what is there
        stage_payload(deb, dst)


def test_a_corrupt_package_leaves_nothing_half_written(tmp_path: Path) -> None:
    deb = dpkg_deb_build(tmp_path, "c", files={"usr/share/c": bytes(range(256)) * 400})
    blob = bytearray(deb.read_bytes())
    blob[len(blob) - 300] ^= 0xFF
    deb.write_bytes(bytes(blob))
    stage = tmp_path / "stage"
    stage.mkdir()
    with Payloads(["c" * 64], lambda _sha: deb, stage, names={"c" * 64: "c"}) as payloads, \
            pytest.raises(FormatError, match=r"^package c \(cccccccccccccccc…\): .*corrupt") as raised:
        payloads.path("c" * 64)
    assert "store verify" in (raised.value.hint or "")
    assert list(stage.iterdir()) == []


def test_packages_are_made_in_order_and_counted_as_a_ready_prefix(tmp_path: Path) -> None:
    debs = {f"{i:064x}": dpkg_deb_build(tmp_path, f"p{i}", files={f"usr/share/p{i}": b"z" * 100}) for i in range(4)}
    shas = list(debs)
    gate = threading.Event()

    def deb_path(sha: str) -> Path:
        if sha == shas[2]:
            gate.wait(10)  # the third package is slow to come
        return debs[sha]

    stage = tmp_path / "stage"
    stage.mkdir()
    with Payloads(shas, deb_path, stage, workers=1) as payloads:
        assert payloads.ready_prefix(shas, 2) == 2  # the third holds back the fourth
        gate.set()
        assert payloads.ready_prefix(shas[2:], 2) == 2
        assert sorted(p.name for p in stage.iterdir()) == sorted(f"{s}.deb" for s in shas)
        payloads.release(shas[:3])
        assert [p.name for p in stage.iterdir()] == [f"{shas[3]}.deb"]
        assert _fsys(payloads.path(shas[3])) == _fsys(debs[shas[3]])


def test_a_worker_error_reaches_the_caller_in_order(tmp_path: Path) -> None:
    good = dpkg_deb_build(tmp_path, "g", files={"usr/share/g": b"g"})
    shas = ["1" * 64, "2" * 64]

    def deb_path(sha: str) -> Path:
        if sha == shas[1]:
            raise FormatError("broken package")
        return good

    stage = tmp_path / "stage"
    stage.mkdir()
    with Payloads(shas, deb_path, stage) as payloads:
        assert payloads.ready_prefix(shas[:1], 1) == 1
        with pytest.raises(FormatError, match="broken package"):
            payloads.ready_prefix(shas, 2)


def test_unpack_chunks_are_a_quarter_of_what_remains_but_at_least_16() -> None:
    assert unpack_chunk(3) == 3
    assert unpack_chunk(16) == 16
    assert unpack_chunk(40) == 16
    assert unpack_chunk(212) == 53


def test_a_rotted_store_object_fails_the_build_in_one_line_naming_the_package(tmp_path: Path) -> None:
    """A package whose store copy changed after it was verified (bit rot, tampering): the
    worker that decompresses it fails, and the build says which package, with what to do, and
    leaves no output and nothing in its workspace."""
    import json
    import os
    import sys

    from fixtures.make_host_base import build_host_base
    from tests.check_fixture import make_definition

    d = make_definition(tmp_path / "fx", "http://127.0.0.1:9/unused", leak=False,
                        base_deb=build_host_base(tmp_path / "hostbase"))
    store = tmp_path / "fx" / "store"
    lock = json.loads((d / "reprobuild.lock").read_text())
    package = next(p for s in lock["sets"] if s["name"] == "image" for p in s["packages"])
    obj = store / "objects" / "sha256" / package["sha256"][:2] / package["sha256"]
    blob = bytearray(obj.read_bytes())
    blob[len(blob) - 200] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(blob))
    ws = tmp_path / "ws"
    ws.mkdir()
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    r = subprocess.run([sys.executable, "-m", "reprobuild", "build", "-C", str(d), "--locked", "--offline",
                        "-f", "tar", "-o", str(tmp_path / "out"), "--no-cache", "--workspace", str(ws)],
                       env=env, text=True, capture_output=True, timeout=600,
                       cwd=Path(__file__).resolve().parent.parent, check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    error = next(line for line in r.stderr.splitlines() if line.startswith("error:"))
    assert f"package {package['name']} (" in error and "corrupt" in error, r.stderr
    assert "store verify" in r.stderr
    assert not (tmp_path / "out" / "image.tar").exists()
    assert list(ws.iterdir()) == []
