"""Where a build makes its trees (reprobuild.workspace): the pure choice, and end to end the same
bytes whichever workspace the trees were made in, with nothing left in it afterwards."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild.errors import ConfigError
from reprobuild.workspace import RAM_DIRECTORY, FsFacts, choose, decide, estimate_bytes, mem_available, probe

GiB = 1 << 30
RAM = FsFacts(is_tmpfs=True, writable=True, free_bytes=10 * GiB)


def test_auto_uses_memory_when_the_trees_fit() -> None:
    w = choose(None, 1 * GiB, RAM, 8 * GiB, "tar")
    assert w.parent == RAM_DIRECTORY
    assert "in memory" in w.reason and "1024 MiB" in w.reason


@pytest.mark.parametrize(("ram", "available", "why"), [
    (None, 8 * GiB, "not a tmpfs"),
    (FsFacts(is_tmpfs=False, writable=True, free_bytes=10 * GiB), 8 * GiB, "not a tmpfs"),
    (FsFacts(is_tmpfs=True, writable=False, free_bytes=10 * GiB), 8 * GiB, "not writable"),
    (FsFacts(is_tmpfs=True, writable=True, free_bytes=GiB // 2), 8 * GiB, "512 MiB free"),
    (RAM, GiB, "half of the 1024 MiB of memory available"),
    (FsFacts(is_tmpfs=True, writable=True, free_bytes=10 * GiB, noexec=True), 8 * GiB, "mounted noexec"),
])  # fmt: skip
def test_auto_falls_back_to_the_output_directory(ram: FsFacts | None, available: int, why: str) -> None:
    w = choose("auto", 1 * GiB, ram, available, "disk")
    assert w.parent is None
    assert why in w.reason


def test_an_unknown_memory_size_does_not_block_the_tmpfs() -> None:
    assert choose(None, GiB, RAM, None, "tar").parent == RAM_DIRECTORY


def test_explicit_choices_win_and_directory_output_stays_beside_the_output(tmp_path: Path) -> None:
    assert choose(str(tmp_path), GiB, None, None, "tar").parent == tmp_path
    assert choose("output", GiB, RAM, 8 * GiB, "tar").parent is None
    # -f directory renames the final tree into the output directory: same file system.
    assert choose(str(tmp_path), GiB, RAM, 8 * GiB, "directory").parent is None
    assert choose(None, GiB, RAM, 8 * GiB, "directory").parent is None


def test_estimate_and_meminfo() -> None:
    assert estimate_bytes(0) == 64 << 20
    assert estimate_bytes(1024) == (1 << 20) * 9 // 4 + (64 << 20)
    assert mem_available("MemTotal:       24683652 kB\nMemAvailable:   20000000 kB\n") == 20000000 * 1024
    assert mem_available("MemTotal: 1 kB\n") is None
    assert mem_available("MemAvailable: lots\n") is None


def test_probe_reads_the_file_system_type(tmp_path: Path) -> None:
    facts = probe(tmp_path, statfs=lambda _p: (0x01021994, 100, 4096))
    assert facts == FsFacts(is_tmpfs=True, writable=True, free_bytes=409600,
                            noexec=bool(os.statvfs(tmp_path).f_flag & os.ST_NOEXEC))
    assert probe(tmp_path / "missing") is None
    (tmp_path / "link").symlink_to(tmp_path)
    assert probe(tmp_path / "link") is None
    if Path("/dev/shm").is_dir():  # the real statfs(2) call
        assert probe(Path("/dev/shm")) is not None


def test_a_missing_workspace_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        decide(str(tmp_path / "nope"), 1000, "tar", {})
    with pytest.raises(ConfigError, match="does not exist"):
        decide(None, 1000, "tar", {"REPROBUILD_WORKSPACE": str(tmp_path / "nope")})
    assert decide(None, 1000, "tar", {"REPROBUILD_WORKSPACE": str(tmp_path)}).parent == tmp_path


def test_a_noexec_workspace_directory_is_refused(tmp_path: Path) -> None:
    """A real noexec mount (root: a tmpfs mounted for the test)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "noexec"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=1m", "tmpfs", str(where)], check=True)
    try:
        assert probe(where) is not None and probe(where).noexec  # type: ignore[union-attr]
        with pytest.raises(ConfigError, match="mounted noexec"):
            decide(str(where), 1000, "tar", {})
    finally:
        subprocess.run(["umount", str(where)], check=True)


# -- end to end: the hermetic one-package definition, through the command line ----------------------
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.make_host_base import build_host_base

    return build_host_base(tmp_path_factory.mktemp("hostbase"))


def _run(d: Path, store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    env.pop("REPROBUILD_WORKSPACE", None)
    return subprocess.run([sys.executable, "-m", "reprobuild", "build", "-C", str(d), "--locked", "--offline",
                           "-f", "tar", "-o", str(out), "--json", *extra],
                          env=env, text=True, capture_output=True, timeout=600, cwd=REPO, check=False)


def test_every_workspace_gives_the_same_bytes_and_leaves_nothing(tmp_path: Path, base_deb: Path) -> None:
    import json

    from tests.check_fixture import make_definition

    d = make_definition(tmp_path / "fx", "http://127.0.0.1:9/unused", leak=False, base_deb=base_deb)
    store = tmp_path / "fx" / "store"  # make_definition's store, holding the fixture's packages
    ws = tmp_path / "ws"
    ws.mkdir()
    digests, reasons = {}, {}
    for name, extra in (("output", ("--workspace", "output")), ("dir", ("--workspace", str(ws))),
                        ("auto", ()), ("cached", ("--workspace", str(ws)))):
        no_cache = () if name == "cached" else ("--no-cache",)
        r = _run(d, store, tmp_path / name, *extra, *no_cache)
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout)
        digests[name] = hashlib.sha256((tmp_path / name / "image.tar").read_bytes()).hexdigest()
        assert digests[name] == doc["manifest"]["sha256"]
        reasons[name] = doc["workspace"]
        assert list(ws.iterdir()) == [], f"{name}: the workspace was not emptied"
    assert len(set(digests.values())) == 1, digests
    assert reasons["output"].startswith("beside the output")
    assert reasons["dir"] == f"in {ws} (--workspace)"
    assert reasons["auto"].startswith(("in memory", "beside the output"))
    bad = _run(d, store, tmp_path / "bad", "--workspace", str(tmp_path / "missing"), "--no-cache")
    assert bad.returncode != 0
    assert "workspace directory" in bad.stderr and "Traceback" not in bad.stderr
