"""BuildScripts=: settings, the lock's build set, stage keys, and hermetic builds.

* the four settings parse (lists append, paths resolve against the file) and enter the config
  digest only when set, so every lock written before them stays current;
* ``reprobuild lock`` against the signed fixture repository adds a ``build`` set holding every
  image package at its image version plus ``BuildPackages=``; a build package that needs another
  version of an image package is refused with the reason;
* keys: a script edit or a source edit changes the ``build`` stage and every stage after it,
  never ``buildenv``/``install``/``tools``; a source's mtime is not an input;
* hermetic builds (the host-made base package as both image and build set, tar output, real
  sandbox): the script's ``$DESTDIR`` lands in the image with the documented environment; writes
  outside ``$DESTDIR`` reach neither the image, nor the cached build environment, nor the host;
  ``$SRCDIR`` is read-only; the sandbox has no network interface but ``lo``; a source edit reuses
  the build environment and the installed tree; a failing script names itself, its exit status
  and its last output lines and publishes nothing; ``--shell-on-failure`` opens a shell on a pty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from fixtures.make_repo import DEFAULT_SUITES, make_repo
from reprobuild.build import plan
from reprobuild.cache import Cache
from reprobuild.config import load_spec
from reprobuild.errors import ConfigError, LockError, ReprobuildError
from reprobuild.lock import LockOptions, lock_spec
from reprobuild.lockfile import build_set_problems, load_lock, save_lock
from reprobuild.pipeline.context import BuildContext
from reprobuild.pipeline.runner import Runner
from reprobuild.stages.buildscripts import source_mounts
from reprobuild.store import Store
from tests.check_fixture import make_definition

REPO = Path(__file__).resolve().parent.parent


# -- settings ------------------------------------------------------------------------------------


def test_settings_parse_and_enter_the_digest_only_when_set(tmp_path: Path) -> None:
    d = tmp_path / "def"
    (d / "src").mkdir(parents=True)
    (d / "reprobuild.conf.d").mkdir()
    (d / "reprobuild.conf").write_text("[Content]\nPackages=less\n")
    plain = load_spec(d)
    (d / "reprobuild.conf.d/build.conf").write_text(
        "[Content]\nBuildScripts=build.sh\nBuildPackages=gcc make\nBuildPackages=libc6-dev\n"
        "[Build]\nBuildSources=../src\nBuildDirectory=/var/tmp/bd\n")
    spec = load_spec(d)
    assert spec.content.build_scripts == (d / "reprobuild.conf.d/build.sh",)
    assert spec.content.build_packages == ("gcc", "make", "libc6-dev")
    assert spec.build.build_sources == (d / "src",)
    assert spec.build.build_directory == Path("/var/tmp/bd")
    assert spec.content.packages == ("less",)
    assert spec.digest() != plain.digest()
    data = spec.digest_input()
    assert data["Content"]["BuildPackages"] == ["gcc", "make", "libc6-dev"]
    assert data["Build"]["BuildSources"] == ["src"]  # relative to the image directory
    assert "BuildDirectory" not in data["Build"]  # where $BUILDDIR lives cannot change the output
    assert "BuildScripts" not in plain.digest_input()["Content"]
    # Only the place of the build directory changed: same digest.
    assert load_spec(d, ["Build.BuildDirectory=/elsewhere"]).digest() == spec.digest()
    assert load_spec(d, ["Content.BuildPackages="]).content.build_packages == ()
    with pytest.raises(ConfigError, match="BuildPackages=Not_A_Package"):
        load_spec(d, ["Content.BuildPackages=Not_A_Package"])


def test_committed_locks_stay_current() -> None:
    for name in ("minimal", "bootable"):
        assert load_spec(REPO / "lock" / name).digest() == load_lock(REPO / "lock" / name / "reprobuild.lock").config_digest


def test_source_mounts(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "x/b", tmp_path / "y/b"
    for p in (a, b, c):
        p.mkdir(parents=True)
    assert source_mounts((a,)) == [(a, "/work/src")]
    assert source_mounts((a, b)) == [(a, "/work/src/a"), (b, "/work/src/b")]
    with pytest.raises(ConfigError, match="both be mounted at /work/src/b"):
        source_mounts((a, b, c))
    with pytest.raises(ConfigError, match="not a directory"):
        source_mounts((tmp_path / "missing",))


# -- the lock's build set ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("buildrepo")
    return make_repo(root / "repo", DEFAULT_SUITES, gnupg_home=root / "gnupg")


def _image(tmp_path: Path, repo, content: str) -> Path:
    d = tmp_path / "image"
    d.mkdir(parents=True)
    url = repo.root.as_uri()
    (d / "reprobuild.conf").write_text(
        "[Distribution]\nRelease=stable\nUpdates=no\n"
        f"Mirror={url}\nKeyring={repo.keyring_path}\n"
        f"[Content]\nBaseSet=minbase\n{content}\n[Tools]\nToolsTree=host\n")
    return d


def test_lock_adds_a_build_set_holding_the_image_set(tmp_path: Path, repo) -> None:
    d = _image(tmp_path, repo, "Packages=hello\nBuildPackages=python3 needs-new-libold\n")
    lock = lock_spec(load_spec(d), None, LockOptions()).lock
    assert [s.name for s in lock.sets] == ["image", "build"]
    image, build = lock.package_set("image"), lock.package_set("build")
    assert build_set_problems(image, build) == []
    image_names = {p.name for p in image.packages}
    build_only = {p.name for p in build.packages} - image_names
    assert {"python3", "needs-new-libold"} <= build_only
    assert "python3" not in image_names
    assert build.requested == ("hello", "python3", "needs-new-libold")
    # Image packages keep the image set's reasons (apt's auto-installed marks).
    for p in image.packages:
        assert build.by_name()[p.name].reason == p.reason
    # The lock round-trips and a re-lock keeps the build set.
    save_lock(lock, d / "reprobuild.lock")
    assert load_lock(d / "reprobuild.lock") == lock
    again = lock_spec(load_spec(d), lock, LockOptions()).lock
    assert again.package_set("build") == build
    # Without BuildScripts=/BuildPackages= there is no build set.
    plain = lock_spec(load_spec(d, ["Content.BuildPackages="]), None, LockOptions()).lock
    assert [s.name for s in plain.sets] == ["image"]


def test_a_build_package_that_conflicts_with_the_image_is_refused(tmp_path: Path, repo) -> None:
    # The image holds libold 1.0-1; a build package needing libnew (which conflicts with it)
    # would replace an image library in the build environment: refused, with the chain.
    d = _image(tmp_path, repo, "Packages=uses-libold\nBuildPackages=needs-new-libold\n")
    with pytest.raises(ReprobuildError, match=r"(?s)requested libold \(= 1.0-1\).*libnew 2.0-1 conflicts with libold"):
        lock_spec(load_spec(d), None, LockOptions())
    d2 = _image(tmp_path / "b", repo, "Packages=conflict-a\nBuildPackages=conflict-b\n")
    with pytest.raises(ReprobuildError, match="conflict-a"):
        lock_spec(load_spec(d2), None, LockOptions())


def test_build_set_problems_names_what_differs() -> None:
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    image = lock.package_set("image")
    first, second = image.packages[0], image.packages[1]
    other = dataclasses.replace(first, version=first.version + "+x", sha256="f" * 64)
    build = dataclasses.replace(image, name="build", packages=(other, *image.packages[2:]))
    problems = build_set_problems(image, build)
    assert problems == [(f"{first.name} is {first.version}+x (ffffffffffff), the image has {first.version} "
                        f"({first.sha256[:12]})"), f"{second.name} is missing"]


# -- keys ----------------------------------------------------------------------------------------


def _with_build_set(lock):
    image = lock.package_set("image")
    return dataclasses.replace(lock, sets=(*lock.sets, dataclasses.replace(image, name="build")))


@pytest.fixture()
def definition(tmp_path: Path) -> Path:
    """lock/minimal's definition with a build script and a source tree."""
    d = tmp_path / "def"
    (d / "src").mkdir(parents=True)
    (d / "src/main.c").write_text("int main(void) { return 0; }\n")
    (d / "build.sh").write_text("#!/bin/sh\nmake\n")
    (d / "build.sh").chmod(0o755)
    conf = (REPO / "lock/minimal/reprobuild.conf").read_text()
    conf = "\n".join(line for line in conf.splitlines() if not line.startswith("LockKey"))
    (d / "reprobuild.conf").write_text(conf + "\n[Content]\nBuildScripts=build.sh\n[Build]\nBuildSources=src\n")
    return d


def _keys(d: Path, tmp: Path, fmt: str = "disk") -> dict[str, str]:
    lock = _with_build_set(load_lock(REPO / "lock/minimal/reprobuild.lock"))
    spec = load_spec(d)
    store = Store(tmp / "store")
    ctx = BuildContext(spec=spec, lock=lock, store=store, cache=Cache(store, enabled=False), work=tmp, format=fmt)
    return Runner(ctx, plan(spec, lock, fmt)).keys()


def _changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {n for n in a if a[n] != b[n]}


def test_plan_runs_the_build_before_the_tree(definition: Path, tmp_path: Path) -> None:
    keys = _keys(definition, tmp_path)
    assert list(keys) == ["tools", "buildenv", "build", "install", "tree", "fs", "ddi"]
    assert list(_keys(definition, tmp_path, "tar")) == ["buildenv", "build", "install", "tree", "tar"]
    lock = _with_build_set(load_lock(REPO / "lock/minimal/reprobuild.lock"))
    tree = next(s for s in plan(load_spec(definition), lock, "tar") if s.name == "tree")
    assert tree.upstream == ("install", "build")
    # Without BuildScripts= the plan is unchanged; with it, a lock without a build set is refused.
    plain = load_spec(definition, ["Content.BuildScripts="])
    assert [s.name for s in plan(plain, lock, "tar")] == ["install", "tree", "tar"]
    with pytest.raises(LockError, match="no build package set"):
        plan(load_spec(definition), load_lock(REPO / "lock/minimal/reprobuild.lock"), "tar")


def test_a_script_edit_changes_the_build_and_later_stages_only(definition: Path, tmp_path: Path) -> None:
    before = _keys(definition, tmp_path)
    (definition / "build.sh").write_text("#!/bin/sh\nmake -j2\n")
    after = _keys(definition, tmp_path)
    assert _changed(before, after) == {"build", "tree", "fs", "ddi"}


def test_a_source_edit_changes_the_build_and_later_stages_only(definition: Path, tmp_path: Path) -> None:
    before = _keys(definition, tmp_path)
    os.utime(definition / "src/main.c", (1, 1))
    os.utime(definition / "src", (1, 1))
    assert _keys(definition, tmp_path) == before  # times are not inputs
    (definition / "src/main.c").write_text("int main(void) { return 1; }\n")
    assert _changed(before, _keys(definition, tmp_path)) == {"build", "tree", "fs", "ddi"}


def test_a_build_set_change_changes_buildenv_not_install(definition: Path, tmp_path: Path) -> None:
    before = _keys(definition, tmp_path)
    lock = _with_build_set(load_lock(REPO / "lock/minimal/reprobuild.lock"))
    build = lock.package_set("build")
    extra = dataclasses.replace(build.packages[0], name="zz-extra", sha256="e" * 64)
    lock = dataclasses.replace(lock, sets=(*lock.sets[:-1], dataclasses.replace(build, packages=(
        *build.packages, extra))))
    spec = load_spec(definition)
    store = Store(tmp_path / "store")
    ctx = BuildContext(spec=spec, lock=lock, store=store, cache=Cache(store, enabled=False), work=tmp_path,
                       format="disk")
    after = Runner(ctx, plan(spec, lock, "disk")).keys()
    assert _changed(before, after) == {"buildenv", "build", "tree", "fs", "ddi"}


# -- hermetic builds -----------------------------------------------------------------------------

SCRIPT = """#!/bin/sh
set -e
out="$DESTDIR/usr/share/greeting"
mkdir -p "$out"
cat "$SRCDIR/greeting.txt" > "$out/greeting"
echo "epoch=$SOURCE_DATE_EPOCH pwd=$(pwd) home=$HOME tz=$TZ lc=$LC_ALL umask=$(umask) arch=$ARCHITECTURE" > "$out/env"
cat /proc/net/dev > "$out/net"
# Writes outside $DESTDIR: the build environment, /tmp, $BUILDDIR, and (refused) the sources.
echo evil > /etc/evil
mkdir -p /usr/local/bin && echo evil > /usr/local/bin/evil
echo scratch > /tmp/scratch
echo object > "$BUILDDIR/object"
if echo changed > "$SRCDIR/greeting.txt" 2>/dev/null; then echo "sources are writable"; exit 1; fi
ls "$BUILDDIR" > "$out/builddir"
"""


@pytest.fixture(scope="module")
def base_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_host_base(tmp_path_factory.mktemp("hostbase"))


def _definition(root: Path, base_deb: Path, script: str = SCRIPT, extra_conf: str = "") -> tuple[Path, Path]:
    d = make_definition(root, "http://127.0.0.1:9/unused", leak=False, base_deb=base_deb)
    (d / "src").mkdir()
    (d / "src/greeting.txt").write_text("hello\n")
    (d / "build.sh").write_text(script)
    (d / "build.sh").chmod(0o755)
    with open(d / "reprobuild.conf", "a") as f:
        f.write(f"\n[Content]\nBuildScripts=build.sh\n[Build]\nBuildSources=src\n{extra_conf}")
    spec = load_spec(d)
    lock = load_lock(d / "reprobuild.lock")
    lock = _with_build_set(lock)
    save_lock(dataclasses.replace(lock, config_digest=spec.digest(), config=spec.digest_input()), d / "reprobuild.lock")
    return d, root / "store"


def _run(d: Path, store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run([sys.executable, "-m", "reprobuild", "build", "-C", str(d), "--locked", "--offline",
                           "-o", str(out), *extra], env=env, text=True, capture_output=True, timeout=600,
                          cwd=REPO, check=False)


def _build(d: Path, store: Path, out: Path, *extra: str) -> dict:
    r = _run(d, store, out, "--json", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _members(tar: Path) -> dict[str, bytes | None]:
    with tarfile.open(tar) as tf:
        return {m.name.removeprefix("./"): (tf.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                for m in tf}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(tree: Path) -> list[tuple[str, int]]:
    return sorted((os.path.relpath(os.path.join(dp, n), tree), os.lstat(os.path.join(dp, n)).st_mode)
                  for dp, dns, fns in os.walk(tree) for n in dns + fns)


def test_the_build_output_lands_in_the_image_and_nothing_else(tmp_path: Path, base_deb: Path) -> None:
    d, store = _definition(tmp_path / "fx", base_deb)
    before_def = _listing(d)
    first = _build(d, store, tmp_path / "a")
    members = _members(tmp_path / "a/image.tar")
    assert members["usr/share/greeting/greeting"] == b"hello\n"
    env = members["usr/share/greeting/env"].decode()
    assert env == "epoch=1735689600 pwd=/work/src home=/root tz=UTC lc=C.UTF-8 umask=0022 arch=amd64\n"
    net = members["usr/share/greeting/net"].decode()
    interfaces = [line.split(":")[0].strip() for line in net.splitlines()[2:]]
    assert interfaces == ["lo"], net  # a new network namespace: no way out
    assert members["usr/share/greeting/builddir"] == b"object\n"
    for leaked in ("etc/evil", "usr/local/bin/evil", "tmp/scratch", "work", "work/build-script"):
        assert leaked not in members
    # The host: the definition (sources included) is untouched, and nothing reached its /etc.
    assert _listing(d) == before_def and (d / "src/greeting.txt").read_text() == "hello\n"
    assert not Path("/etc/evil").exists() and not Path("/usr/local/bin/evil").exists()
    # The manifest names what the software was built from.
    from reprobuild.cache import content_digest
    from tests.test_pipeline import validate_manifest

    validate_manifest(first["manifest"])
    assert first["manifest"]["build"] == {
        "scripts": [{"name": "build.sh", "digest": content_digest(d / "build.sh")}],
        "sources": [{"path": "src", "digest": content_digest(d / "src")}], "packages": []}
    # The cached build environment below the overlay is untouched.
    reports = {r["stage"]: r for r in first["stages"]}
    assert reports["buildenv"]["outcome"] == "built" and reports["build"]["outcome"] == "built"
    store_obj = Store(store)
    for sha in store_obj.iter_trees():
        tree = store_obj.tree_path(sha)
        assert not (tree / "etc/evil").exists() and not (tree / "work").exists()
    assert not any(Path(store, "tmp").iterdir()), "scratch directories left behind"

    # Unchanged: everything from the cache, the same bytes; --no-cache: the same bytes.
    again = _build(d, store, tmp_path / "b")
    assert again["cache_hits"] == ["tar"]
    _build(d, store, tmp_path / "u", "--no-cache")
    assert _sha(tmp_path / "a/image.tar") == _sha(tmp_path / "b/image.tar") == _sha(tmp_path / "u/image.tar")

    # One source edit: the build environment and the installed tree come from the cache.
    (d / "src/greeting.txt").write_text("edited\n")
    edited = _build(d, store, tmp_path / "e")
    assert edited["cache_hits"] == ["buildenv", "install"], edited["cache_hits"]
    changed = {r["stage"]: r["changed"] for r in edited["stages"]}
    assert changed["build"] == ["inputs.sources"]
    assert _members(tmp_path / "e/image.tar")["usr/share/greeting/greeting"] == b"edited\n"
    assert edited["manifest"]["build"]["sources"][0]["digest"] != first["manifest"]["build"]["sources"][0]["digest"]
    _build(d, store, tmp_path / "eu", "--no-cache")
    assert _sha(tmp_path / "e/image.tar") == _sha(tmp_path / "eu/image.tar")


# Runs the CLI with an overlay mount the kernel refuses (as on a store that overlayfs cannot use).
FAILING_MOUNT = ("import sys, reprobuild.rootfs.overlay as o; o.OPTIONS = 'no_such_option=1'; "
                 "from reprobuild.cli import main; sys.argv[0] = 'reprobuild'; main()")


def test_a_refused_overlay_mount_falls_back_to_a_copy(tmp_path: Path, base_deb: Path) -> None:
    """The scripts run in an overlay over the cached build environment; where the kernel refuses
    the mount, the environment is copied instead: same bytes, said once, no scratch left."""
    d, store = _definition(tmp_path / "fx", base_deb)
    _build(d, store, tmp_path / "c")  # caches the build environment, kept extracted
    (d / "src/greeting.txt").write_text("edited\n")
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    env.pop("SOURCE_DATE_EPOCH", None)
    refused = subprocess.run([sys.executable, "-c", FAILING_MOUNT, "build", "-C", str(d), "--locked", "--offline",
                              "-o", str(tmp_path / "r")], env=env, text=True, capture_output=True, timeout=600,
                             cwd=REPO, check=False)
    assert refused.returncode == 0, refused.stderr[-3000:]
    assert "cannot mount an overlay" in refused.stderr and "copying the cached tree instead" in refused.stderr
    _build(d, store, tmp_path / "u", "--no-cache")
    assert _sha(tmp_path / "r/image.tar") == _sha(tmp_path / "u/image.tar")
    assert not any(Path(store, "tmp").iterdir())


def test_build_directory_is_kept_between_builds(tmp_path: Path, base_deb: Path) -> None:
    keep = tmp_path / "kept-build"
    d, store = _definition(tmp_path / "fx", base_deb, extra_conf=f"BuildDirectory={keep}\n")
    (keep / "stale").parent.mkdir()
    (keep / "stale").write_text("from an earlier build\n")
    _build(d, store, tmp_path / "a", "--no-cache")
    assert (keep / "object").read_text() == "object\n"  # kept for the next (incremental) build
    assert _members(tmp_path / "a/image.tar")["usr/share/greeting/builddir"] == b"object\nstale\n"


def test_a_failing_script_names_itself_and_publishes_nothing(tmp_path: Path, base_deb: Path) -> None:
    script = "#!/bin/sh\necho line one\necho line two >&2\necho partial > \"$DESTDIR/partial\"\nexit 3\n"
    d, store = _definition(tmp_path / "fx", base_deb, script=script)
    out = tmp_path / "out"
    r = _run(d, store, out)
    assert r.returncode == 1
    assert "build script build.sh failed with exit status 3" in r.stderr
    assert "line one\nline two" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "image.tar").exists() and not (out / "image.tar.manifest.json").exists()
    assert not any(Path(store, "tmp").iterdir())
    assert [p.name for p in out.iterdir()] == []


def test_an_output_directory_inside_the_sources_is_refused(tmp_path: Path, base_deb: Path) -> None:
    d, store = _definition(tmp_path / "fx", base_deb, extra_conf="BuildSources=\nBuildSources=.\n")
    r = _run(d, store, d / "out")
    assert r.returncode == 2 and "is inside BuildSources=" in r.stderr, r.stderr
    assert not (d / "out").exists()


def test_a_script_that_is_not_executable_is_a_config_error(tmp_path: Path, base_deb: Path) -> None:
    d, store = _definition(tmp_path / "fx", base_deb)
    (d / "build.sh").chmod(0o644)
    r = _run(d, store, tmp_path / "out")
    assert r.returncode == 2 and "is not executable" in r.stderr


def _read_until(fd: int, needle: bytes, deadline: float) -> bytes:
    seen = b""
    while needle not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never appeared in: {seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_shell_on_failure_opens_a_shell_in_the_build_environment(tmp_path: Path, base_deb: Path) -> None:
    d, store = _definition(tmp_path / "fx", base_deb, script="#!/bin/sh\necho before-failing\nexit 7\n")
    master, slave = pty.openpty()
    env = {**os.environ, "REPROBUILD_STORE": str(store), "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "reprobuild", "build", "-C", str(d), "--locked", "--offline",
                             "-o", str(tmp_path / "out"), "--shell-on-failure"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True)
    os.close(slave)
    try:
        deadline = time.monotonic() + 300
        _read_until(master, b"opening a shell", deadline)
        os.write(master, b"echo MARK-$(cat $SRCDIR/greeting.txt)-$(pwd)-$DESTDIR\n")
        _read_until(master, b"MARK-hello-/work/src-/work/dest", deadline)
        os.write(master, b"exit\n")
        rest = _read_until(master, b"failed with exit status 7", deadline)
        assert proc.wait(timeout=60) == 1, rest
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert not (tmp_path / "out/image.tar").exists()



# -- sbom and verify -----------------------------------------------------------------------------


def _lock_with_build_only_package():
    lock = load_lock(REPO / "lock/minimal/reprobuild.lock")
    image = lock.package_set("image")
    gcc = dataclasses.replace(image.packages[0], name="gcc-fixture", version="14.2.0-1", sha256="c" * 64,
                              reason="requested")
    build = dataclasses.replace(image, name="build", packages=tuple(sorted((*image.packages, gcc),
                                                                           key=lambda p: p.name)))
    return dataclasses.replace(lock, sets=(*lock.sets, build)), gcc


@pytest.mark.parametrize("fmt", ["spdx", "cyclonedx"])
def test_sbom_lists_build_only_packages_as_build_dependencies(fmt: str) -> None:
    from reprobuild.sbom import make_sbom
    from tests.test_sbom import errors

    lock, gcc = _lock_with_build_only_package()
    plain = make_sbom(load_lock(REPO / "lock/minimal/reprobuild.lock"), fmt)
    doc = make_sbom(lock, fmt)
    assert errors(doc, fmt) == []
    if fmt == "spdx":
        assert len(doc["packages"]) == len(plain["packages"]) + 1
        (entry,) = [p for p in doc["packages"] if p["name"] == "gcc-fixture"]
        assert entry["versionInfo"] == gcc.version and entry["checksums"][0]["checksumValue"] == gcc.sha256
        build_deps = [r for r in doc["relationships"] if r["relationshipType"] == "BUILD_DEPENDENCY_OF"]
        assert build_deps == [{"spdxElementId": entry["SPDXID"], "relationshipType": "BUILD_DEPENDENCY_OF",
                               "relatedSpdxElement": "SPDXRef-Image"}]
        assert not any(r["relatedSpdxElement"] == entry["SPDXID"] and r["relationshipType"] == "CONTAINS"
                       for r in doc["relationships"])
    else:
        (entry,) = [c for c in doc["components"] if c["name"] == "gcc-fixture"]
        assert entry["version"] == gcc.version
        assert entry["scope"] == "excluded"
        assert {"name": "reprobuild:package-set", "value": "build"} in entry["properties"]
        assert entry["purl"] not in doc["dependencies"][0]["dependsOn"]  # the image does not contain it
        assert len(doc["components"]) == len(plain["components"]) + 1


def test_verify_checks_the_build_set() -> None:
    from reprobuild.verify import check_build_set

    lock, _ = _lock_with_build_only_package()
    check = check_build_set(lock)
    assert check.passed is True and "and 1 to build with" in check.detail
    build = lock.package_set("build")
    first = build.packages[0]
    moved = dataclasses.replace(build, packages=(dataclasses.replace(first, version="0-other"), *build.packages[1:]))
    broken = dataclasses.replace(lock, sets=(*lock.sets[:-1], moved))
    check = check_build_set(broken)
    assert check.passed is False and f"{first.name} is 0-other" in check.detail


# -- reprobuild check and BuildDirectory= --------------------------------------------------------


def test_check_compares_a_kept_build_directory_with_an_empty_one(tmp_path: Path, base_deb: Path) -> None:
    from reprobuild.check import check_reproducible

    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "stale").write_text("left by an earlier build\n")
    # SCRIPT lists $BUILDDIR into the image: with a kept directory the output depends on it.
    d, store = _definition(tmp_path / "fx", base_deb, extra_conf=f"BuildDirectory={keep}\n")
    report = check_reproducible(d, tmp_path / "work", store=store, variations=("build-directory", "umask"))
    assert not report.reproducible
    assert report.culprits == (("build-directory",),)
    assert next(v for v in report.variations if v.name == "build-directory").applied

    clean = SCRIPT.replace('ls "$BUILDDIR" > "$out/builddir"\n', "")
    d2, store2 = _definition(tmp_path / "fx2", base_deb, script=clean, extra_conf=f"BuildDirectory={keep}\n")
    report = check_reproducible(d2, tmp_path / "work2", store=store2, variations=("build-directory", "umask"))
    assert report.reproducible, report
    assert (keep / "stale").exists()  # the kept directory is the user's: used, never emptied
