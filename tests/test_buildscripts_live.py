"""Live: a C project (fixtures/hello-c) compiled with gcc and make from the locked build set of a
trixie minbase image (lock/minimal's definition + BuildPackages=gcc make libc6-dev) into the
image.

* build A (cache on, cold store, cwd = the definition, TZ=UTC, umask 022) and build B
  (``--no-cache``, cwd /, TZ=Pacific/Chatham, umask 077, another output path) give the same tar
  bytes;
* the image holds the program and no compiler, make or C headers; the lock's image set has no
  gcc, its build set has gcc and every image package at the image's version;
* the program runs inside the image (chroot into the extracted tar, as root);
* editing one source file re-uses the build environment and the installed packages
  (``build --json`` ``cache_hits``) and ``reprobuild diff`` between the two builds names the
  changed binary;
* a build script that tries to reach a TCP server the host itself reaches fails (no network);
* with a disk output too: two builds give the same DDI bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reprobuild.lockfile import build_set_problems, load_lock
from tests.live_images import reprobuild_argv, run_reprobuild, sha256_file

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "fixtures/hello-c"
PROGRAM = "usr/bin/hello-reprobuild"
GREETING = b"hello from a reprobuild build script\n"


def _definition(root: Path, name: str, script: Path, extra: str = "") -> Path:
    d = root / name
    d.mkdir(parents=True)
    shutil.copytree(PROJECT, d / "src")
    shutil.copy2(script, d / "build.sh")
    conf = (REPO / "lock/minimal/reprobuild.conf").read_text()
    conf = "\n".join(line for line in conf.splitlines() if not line.startswith("LockKey"))
    (d / "reprobuild.conf").write_text(
        conf + "\n[Content]\nBuildPackages=gcc make libc6-dev\nBuildScripts=build.sh\n"
        f"[Build]\nBuildSources=src\nFormat=tar\n{extra}")
    return d


def _build(d: Path, store: Path, out: Path, *extra: str, cwd: Path | None = None, env: dict | None = None,
           umask: str = "022") -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("SOURCE_DATE_EPOCH", "TZ", "LANG", "LC_ALL")}
    command = ["sh", "-c", f'umask {umask}; exec "$@"', "sh",
               *reprobuild_argv("build", "-C", str(d), "--locked", "-o", str(out), "--json", *extra)]
    r = subprocess.run(command, cwd=cwd or d, env={**base, "REPROBUILD_STORE": str(store), **(env or {})},
                       text=True, capture_output=True, timeout=1800, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict]]:
    root = tmp_path_factory.mktemp("buildscripts")
    d = _definition(root, "def", PROJECT / "build.sh")
    store = root / "store"
    run_reprobuild("lock", "-C", str(d), "--store", str(store), "-q", timeout=900)
    run_reprobuild("fetch", "-C", str(d), "--store", str(store), "-q", timeout=1200)
    a = _build(d, store, d / "out-a", env={"TZ": "UTC", "LC_ALL": "C.UTF-8"})
    yield d, store, a
    shutil.rmtree(root, ignore_errors=True)  # 2+ GB of store: free it before the next module


def test_two_builds_are_byte_identical(project, tmp_path: Path) -> None:
    d, store, a = project
    b = _build(d, store, tmp_path / "other place" / "out b", "--no-cache", cwd=Path("/"), umask="077",
               env={"TZ": "Pacific/Chatham", "LC_ALL": "C", "LANG": "fr_FR.UTF-8"})
    assert sha256_file(d / "out-a/image.tar") == sha256_file(tmp_path / "other place/out b/image.tar")
    assert a["manifest"]["sha256"] == b["manifest"]["sha256"]
    assert [r["outcome"] for r in a["stages"]] == ["built"] * 5


def test_the_image_has_the_program_and_no_compiler(project) -> None:
    d, _, _ = project
    with tarfile.open(d / "out-a/image.tar") as tf:
        names = {m.name.removeprefix("./") for m in tf}
    assert PROGRAM in names
    tools = [n for n in names if n.split("/")[-1] in ("gcc", "cc", "make", "cpp", "as", "ld") and "/bin/" in n]
    assert tools == []
    assert "usr/include/stdio.h" not in names
    lock = load_lock(d / "reprobuild.lock")
    image, build = lock.package_set("image"), lock.package_set("build")
    assert "gcc" not in image.by_name() and "libc6-dev" not in image.by_name()
    assert {"gcc", "make", "libc6-dev"} <= set(build.by_name())
    assert build_set_problems(image, build) == []


def test_the_program_runs_inside_the_image(project, tmp_path: Path) -> None:
    d, _, _ = project
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-xpf", str(d / "out-a/image.tar"), "-C", str(tree), "--numeric-owner"], check=True)
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert chroot is not None
    r = subprocess.run([chroot, str(tree), f"/{PROGRAM}"], capture_output=True, timeout=60, check=False,
                       env={"PATH": "/usr/bin:/bin"})
    assert (r.returncode, r.stdout) == (0, GREETING), r.stderr


def test_a_source_edit_reuses_the_environment_and_diff_names_the_binary(project) -> None:
    d, store, _ = project
    source = d / "src/greet.c"
    original = source.read_text()
    source.write_text(original.replace("hello from", "greetings from"))
    try:
        edited = _build(d, store, d / "out-edited")
    finally:
        source.write_text(original)
    assert edited["cache_hits"] == ["buildenv", "install"], edited["stages"]
    outcomes = {r["stage"]: r["outcome"] for r in edited["stages"]}
    assert outcomes == {"buildenv": "hit", "build": "built", "install": "hit", "tree": "built", "tar": "built"}
    seconds = {r["stage"]: r["seconds"] for r in edited["stages"]}
    print(f"incremental rebuild after one source edit: {seconds}")
    r = subprocess.run(reprobuild_argv("diff", str(d / "out-a/image.tar"), str(d / "out-edited/image.tar"),
                                       "--no-color"), capture_output=True, text=True, timeout=600, check=False)
    print(f"reprobuild diff of the two builds:\n{r.stdout[:3000]}")
    assert r.returncode == 1, r.stderr
    assert "hello-reprobuild" in r.stdout, r.stdout
    # Only the program differs.
    assert "1 difference: 1 content" in r.stdout and "~ usr/bin/hello-reprobuild" in r.stdout, r.stdout


def _host_address() -> str:
    """A non-loopback address of this host (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it picks the source address
        address = s.getsockname()[0]
    assert not address.startswith("127."), address
    return address


def test_a_script_cannot_reach_the_network(project, tmp_path: Path) -> None:
    d, store, _ = project
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    address = _host_address()
    accepted: list[bytes] = []

    def serve() -> None:
        server.settimeout(120)
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    accepted.append(conn.recv(100))
        except OSError:
            return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        # The host reaches the server: the same connection from the build script can only fail
        # because the sandbox has no network.
        with socket.create_connection((address, port), timeout=10) as c:
            c.sendall(b"from the host\n")
        script = tmp_path / "net.sh"
        script.write_text(f"#!/bin/bash\nset -e\nexec 3<>/dev/tcp/{address}/{port}\necho 'from the build' >&3\n")
        script.chmod(0o755)
        nd = _definition(tmp_path, "net", script)
        shutil.copy2(d / "reprobuild.lock", nd / "reprobuild.lock")  # same configuration digest
        base = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
        r = subprocess.run(reprobuild_argv("build", "-C", str(nd), "--locked", "-o", str(nd / "out")),
                           env={**base, "REPROBUILD_STORE": str(store)}, capture_output=True, text=True,
                           timeout=1800, check=False)
    finally:
        server.close()
        thread.join(10)
    print(f"the network script's failure:\n{r.stderr[-1500:]}")
    assert r.returncode == 1, r.stderr
    assert "build script build.sh failed with exit status 1" in r.stderr, r.stderr
    assert "Network is unreachable" in r.stderr or "connect" in r.stderr, r.stderr
    assert accepted == [b"from the host\n"]
    assert not (nd / "out/image.tar").exists()


def test_two_disk_builds_are_byte_identical(project, tmp_path: Path) -> None:
    d, store, _ = project
    a = _build(d, store, d / "out-disk-a", "-f", "disk")
    b = _build(d, store, tmp_path / "disk b", "-f", "disk", "--no-cache", cwd=Path("/"), umask="077",
               env={"TZ": "Pacific/Chatham", "LC_ALL": "C"})
    assert sha256_file(d / "out-disk-a/image.raw") == sha256_file(tmp_path / "disk b/image.raw")
    assert a["manifest"]["sha256"] == b["manifest"]["sha256"]
    # The tar builds' stages serve the disk: the build environment is not even needed.
    assert {"build", "install"} <= set(a["cache_hits"])
    assert {r["stage"]: r["outcome"] for r in a["stages"]}["buildenv"] == "not needed"


def test_verify_checks_the_build_set_and_rebuilds_the_same_image(project) -> None:
    d, store, _ = project
    r = subprocess.run(reprobuild_argv("verify", str(d / "out-a/image.tar"), "--lock", str(d / "reprobuild.lock"),
                                       "-C", str(d), "--store", str(store), "--json"),
                       capture_output=True, text=True, timeout=1800, check=False)
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["build-set"]["status"] == "passed", checks["build-set"]
    # An independent rebuild (no build cache) compiles the program again: the same bytes.
    assert checks["rebuild"]["status"] == "passed", checks["rebuild"]
    assert r.returncode == 0 and report["ok"], r.stdout[-3000:]
