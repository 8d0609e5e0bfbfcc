"""Hostile input: locks and configurations as a pull request could craft them (issue 21).

A lock and a definition are made from the signed fixture repository (tests/repo_fixture.py);
each case then mutates the lock (or writes a configuration), and ``lock --verify``, ``fetch`` and
``build --locked`` run through the real command line (``reprobuild.cli.main``, in-process for
speed; a sample of cases also as a subprocess). For every case and command:

* non-zero exit and a one-line ``error:`` message (plus at most a ``hint:`` line), no traceback;
* nothing created or changed outside the case's own directory: files planted where a crafted
  name points (``../../…`` and an absolute target) and everything else under the test's
  directory are compared before and after;
* the store is byte-identical before and after (a listing of every path, mode, size and sha256).

Plus: kill -9 at several points of a cached and an uncached build leaves no scratch data after
the next command that touches the store; a full output file system (a small tmpfs mounted by
the test, as root) is named in the error; a full store stops ``fetch`` at once, naming it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprobuild.cli import main
from reprobuild.config import load_spec
from reprobuild.lock import LockOptions, lock_spec
from reprobuild.lockfile import dumps, load_lock, save_lock
from reprobuild.store import WORK_PREFIX, Store

REPO = Path(__file__).resolve().parent.parent
PLANT = "planted"  # beside the case directories: what a crafted ../../ name would reach


# -- the base definition and lock ------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    root: Path  # the module's directory: cases, planted files and the store live below it
    conf: str  # reprobuild.conf of the valid definition
    lock: dict[str, Any]  # the valid lock as JSON data
    store: Path
    absolute_plant: Path  # an absolute target outside the module's directory


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, repo_server) -> Iterator[Base]:
    root = tmp_path_factory.mktemp("hostile")
    conf = (f"[Distribution]\nRelease=stable\nUpdates=no\nMirror={repo_server.url}\nKeyring={repo_server.keyring}\n"
            "[Content]\nBaseSet=none\nPackages=hello\n[Build]\nFormat=tar\n[Tools]\nToolsTree=host\n")
    definition = root / "valid"
    definition.mkdir()
    (definition / "reprobuild.conf").write_text(conf)
    lock = lock_spec(load_spec(definition), None, LockOptions()).lock
    save_lock(lock, definition / "reprobuild.lock")
    store = root / "store"
    # A store that is in use (objects, locks, a gc root), so "unchanged" means something.
    assert _run(["fetch", "-C", str(definition), "--store", str(store), "-q"])[0] == 0
    Store(store).register_root("earlier-build", Store(store).iter_objects())
    (root / PLANT).mkdir()
    absolute = Path("/tmp") / f"reprobuild-hostile-{os.getpid()}"
    absolute.mkdir(exist_ok=True)
    try:
        yield Base(root, conf, json.loads(dumps(lock)), store, absolute)
    finally:
        import shutil

        shutil.rmtree(absolute, ignore_errors=True)


def _run(argv: list[str]) -> tuple[int, str]:
    """The real CLI in-process: (exit status, stderr + stdout). An exception that escapes main
    is a traceback, and fails the test with it."""
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue() + out.getvalue()


def _listing(*roots: Path, skip: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """path -> (mode, size, sha256 or link target) for everything below ``roots``."""
    out: dict[str, tuple[int, int, str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if skip is not None and Path(dirpath) == skip.parent:
                dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if os.path.islink(p):
                    body = os.readlink(p)
                elif os.path.isfile(p) and st.st_size > 64 << 20:  # an earlier case's sparse file
                    body = f"large, mtime {st.st_mtime_ns}, inode {st.st_ino}"
                elif os.path.isfile(p):
                    body = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                else:
                    body = ""
                out[p] = (st.st_mode, st.st_size if not os.path.isdir(p) else 0, body)
    return out


def _plant(base: Base) -> None:
    """Files where a crafted name could write: relative to the case, and absolute."""
    for d in (base.root / PLANT, base.absolute_plant):
        for name in ("target", "target_1.0_amd64.deb", "passwd"):
            (d / name).write_text(f"planted {name}\n")


COMMANDS = (
    ("lock", "--verify"),
    ("fetch", "-q"),
    ("build", "--locked", "-q"),
)


def _expect_refused(base: Base, case: Path, commands=COMMANDS, must_mention: str | None = None,
                    runner: Callable[[list[str]], tuple[int, str]] = _run) -> None:
    """Run every command on the definition ``case`` and check the promises of the module doc."""
    _plant(base)
    outside = _listing(base.root, base.absolute_plant, skip=case)
    store_before = _listing(base.store)
    for command in commands:
        argv = [command[0], "-C", str(case), *command[1:]]
        if command[0] != "lock":
            argv += ["--store", str(base.store)]
        if command[0] == "build":
            argv += ["-o", str(case / "out")]
        code, text = runner(argv)
        lines = [line for line in text.splitlines() if line.strip()]
        assert code != 0, f"{' '.join(command)} accepted {case.name}: {text[-500:]}"
        assert "Traceback" not in text, text
        assert lines and lines[0].startswith("error: "), f"{' '.join(command)}: {text[-800:]}"
        assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), text
        if must_mention is not None:
            assert must_mention in lines[0], f"{' '.join(command)} on {case.name}: {lines[0]}"
    assert _listing(base.root, base.absolute_plant, skip=case) == outside, "something outside the case changed"
    assert _listing(base.store) == store_before, "the store changed"


def _case_dir(base: Base, name: str, conf: str | None = None) -> Path:
    d = base.root / "cases" / name
    d.mkdir(parents=True)
    (d / "reprobuild.conf").write_text(base.conf if conf is None else conf)
    return d


def _write_lock(base: Base, name: str, mutate: Callable[[dict[str, Any]], Any]) -> Path:
    data = copy.deepcopy(base.lock)
    mutate(data)
    d = _case_dir(base, name)
    (d / "reprobuild.lock").write_text(json.dumps(data, indent=2, sort_keys=True))
    return d


def _pkg(d: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return d["sets"][0]["packages"][i]


def _set(*path_value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting one field: _set("sets", 0, "packages", 0, "name", value)."""
    *path, key, value = path_value

    def mutate(d: dict[str, Any]) -> None:
        target = d
        for step in path:
            target = target[step]
        target[key] = value

    return mutate


def _pkgset(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return _set("sets", 0, "packages", 0, field, value)


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


class _Raw:
    """A case whose lock file is raw text (not JSON data a mutation can express)."""

    def __init__(self, text: Callable[[dict[str, Any]], str]) -> None:
        self.text = text

    def __call__(self, data: dict[str, Any]) -> None:
        raise AssertionError("raw cases are written by _lock_case")


def _raw(text: str) -> _Raw:
    return _Raw(lambda _data: text)


def _token(key: str, token: str) -> _Raw:
    """The valid lock with the top-level ``key`` set to a raw JSON token (1e400, NaN)."""
    def text(data: dict[str, Any]) -> str:
        return json.dumps({**data, key: "@@"}, indent=2, sort_keys=True).replace('"@@"', token)
    return _Raw(text)


PLANT_REL = f"../../../{PLANT}/target"
# (id, mutation of the lock's JSON data, text the error must contain)
LOCK_CASES: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("name-traversal", _pkgset("name", PLANT_REL), "packages[0].name"),
    ("name-absolute", _pkgset("name", "/tmp/reprobuild-hostile/target"), "packages[0].name"),
    ("name-slash", _pkgset("name", "a/b"), "packages[0].name"),
    ("name-upper", _pkgset("name", "Hello"), "packages[0].name"),
    ("name-one-char", _pkgset("name", "h"), "packages[0].name"),
    ("name-number", _pkgset("name", 7), "packages[0].name"),
    ("version-slash", _pkgset("version", "1.0/../../../../planted/target"), "packages[0].version"),
    ("version-space", _pkgset("version", "1.0 -1"), "packages[0].version"),
    ("version-newline", _pkgset("version", "1.0\n-1"), "packages[0].version"),
    ("version-colons", _pkgset("version", "1:2:3"), "packages[0].version"),
    ("version-bad-epoch", _pkgset("version", "a:1.0"), "packages[0].version"),
    ("version-empty", _pkgset("version", ""), "packages[0].version"),
    ("source-version-slash", _pkgset("source_version", "1/2"), "source_version"),
    ("sha256-number", _pkgset("sha256", 12345), "packages[0].sha256"),
    ("sha256-upper", _pkgset("sha256", "A" * 64), "packages[0].sha256"),
    ("sha256-short", _pkgset("sha256", "a" * 63), "packages[0].sha256"),
    ("sha256-traversal", _pkgset("sha256", "../" * 21 + "a"), "packages[0].sha256"),
    ("path-number", _pkgset("path", 5), "packages[0].path"),
    ("path-absolute", _pkgset("path", "/etc/passwd"), "packages[0].path"),
    ("path-dotdot", _pkgset("path", "../../etc/passwd"), "packages[0].path"),
    ("path-inner-dotdot", _pkgset("path", "pool/../../x.deb"), "packages[0].path"),
    ("path-double-slash", _pkgset("path", "pool//x.deb"), "packages[0].path"),
    ("size-string", _pkgset("size", "100"), "packages[0].size"),
    ("size-negative", _pkgset("size", -1), "packages[0].size"),
    ("size-huge", _pkgset("size", 10**30), "packages[0].size"),
    ("size-float", _pkgset("size", 1.5), "packages[0].size"),
    ("installed-size-bool", _pkgset("installed_size", True), "installed_size"),
    ("essential-string", _pkgset("essential", "yes"), "essential"),
    ("arch-number", _set("architecture", 64), "architecture"),
    ("arch-unknown", _set("architecture", "vax"), "architecture"),
    ("arch-disagrees", _set("architecture", "arm64"), "architecture"),
    ("pkg-arch-traversal", _pkgset("architecture", "../x"), "packages[0].architecture"),
    ("epoch-1e10", _set("source_date_epoch", 10**10), "source_date_epoch"),
    ("epoch-1e26", _set("source_date_epoch", 10**26), "source_date_epoch"),
    ("epoch-negative", _set("source_date_epoch", -1), "source_date_epoch"),
    ("epoch-string", _set("source_date_epoch", "1735689600"), "source_date_epoch"),
    ("seed-not-hex", _set("seed", "zz" * 16), "seed"),
    ("seed-short", _set("seed", "ab" * 8), "seed"),
    ("seed-number", _set("seed", 1234), "seed"),
    ("depends-traversal", _pkgset("depends", [PLANT_REL]), "depends"),
    ("depends-string", _pkgset("depends", "libc6"), "depends"),
    ("depends-missing", _pkgset("depends", ["ghost"]), "depends on ghost"),
    ("sets-object", _set("sets", {"image": []}), "sets"),
    ("set-name", _set("sets", 0, "name", "../evil"), "sets[0].name"),
    ("requested-traversal", _set("sets", 0, "requested", ["../x"]), "requested"),
    ("recommends-string", _set("sets", 0, "recommends", "no"), "recommends"),
    ("unknown-field", _pkgset("post_install", "rm -rf /"), "unknown field"),
    ("missing-sha256", lambda d: _pkg(d).pop("sha256"), "sha256: missing"),
    ("source-unknown", _pkgset("source", "elsewhere/main"), "unknown source"),
    ("source-mirror-space", _set("sources", 0, "mirror", "http://a b/"), "mirror"),
    ("snapshot-bad", _set("sources", 0, "snapshot", "yesterday"), "snapshot"),
    ("release-traversal", _set("release", "../x"), "release"),
    ("config-edited", _set("config", "Content", "Packages", ["hello", "evil"]), "config_digest"),
    ("config-nested", _set("config", "Content", "Packages", _nested(50)), "config.Content.Packages"),
    ("priority-newline", _pkgset("priority", "required\nEssential: yes"), "priority"),
    ("reason-control", _pkgset("reason", "\x1b[2Jgotcha"), "reason"),
    ("duplicate-package", lambda d: d["sets"][0]["packages"].append(copy.deepcopy(_pkg(d))), "twice"),
    ("generator-number", _set("generator", 3), "generator"),
    ("version-2", _set("version", 2), "version 2 is not supported"),
    ("top-array", _raw("[1, 2, 3]"), "top level"),
    ("not-json", _raw("\x00\x01garbage"), "not a JSON lockfile"),
    ("nested-deep", _raw("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("epoch-1e400", _token("source_date_epoch", "1e400"), "source_date_epoch"),
    ("nan", _token("source_date_epoch", "NaN"), "NaN"),
    ("duplicate-key", _raw('{"version": 1, "version": 1}'), "appears twice"),
]


def _lock_case(base: Base, name: str, mutate: Callable[[dict[str, Any]], Any]) -> Path:
    if isinstance(mutate, _Raw):
        d = _case_dir(base, name)
        (d / "reprobuild.lock").write_text(mutate.text(copy.deepcopy(base.lock)))
        return d
    return _write_lock(base, name, mutate)


@pytest.mark.parametrize("name, mutate, mention", LOCK_CASES, ids=[c[0] for c in LOCK_CASES])
def test_crafted_lock_is_refused_by_every_command(base: Base, name: str, mutate, mention: str) -> None:
    case = _lock_case(base, name, mutate)
    _expect_refused(base, case, must_mention=mention)


def test_there_are_enough_cases() -> None:
    assert len(LOCK_CASES) >= 40 and len(CONFIG_CASES) >= 30


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse-huge", "directory"])
def test_lock_file_that_is_not_a_small_regular_file(base: Base, kind: str) -> None:
    case = _case_dir(base, f"lockfile-{kind}")
    lock = case / "reprobuild.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "dev-zero":
        lock.symlink_to("/dev/zero")
    elif kind == "sparse-huge":
        with open(lock, "wb") as f:
            f.truncate(1 << 40)
    else:
        lock.mkdir()
    started = time.monotonic()
    _expect_refused(base, case, must_mention="reprobuild.lock")
    assert time.monotonic() - started < 60, "refused at once, not after reading"


# Strings no grammar of the lock accepts in a name, version or pool path position.
HOSTILE = st.text(alphabet=st.sampled_from(list("/.: \n\t\\~%+-aZ0\x00é")), min_size=1, max_size=24)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["name", "version", "path", "architecture", "source_package"]), value=HOSTILE)
def test_generated_strings_never_reach_a_file_name(base: Base, field: str, value: str) -> None:
    from reprobuild.lockfile import ARCHITECTURES, is_debian_version, is_package_name, is_pool_path

    valid = {"name": is_package_name, "source_package": is_package_name, "version": is_debian_version,
             "path": is_pool_path, "architecture": lambda v: v in ARCHITECTURES}[field](value)
    if valid:
        return  # a string the grammar allows (e.g. "a.0" as a name) is not hostile
    name = f"gen-{hashlib.sha256(f'{field}{value}'.encode()).hexdigest()[:12]}"
    if (base.root / "cases" / name).exists():
        return
    case = _write_lock(base, name, _pkgset(field, value))
    _expect_refused(base, case, commands=COMMANDS[:2], must_mention=f"packages[0].{field}")


@pytest.mark.parametrize("name", ["name-traversal", "version-slash", "epoch-1e26", "nested-deep", "seed-not-hex"])
def test_sample_cases_through_a_real_process(base: Base, name: str) -> None:
    """The same promises from the installed entry point (stderr of a real process)."""
    mutate = next(m for n, m, _ in LOCK_CASES if n == name)
    case = _lock_case(base, f"process-{name}", mutate)

    def runner(argv: list[str]) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-m", "reprobuild", *argv], capture_output=True, text=True,
                           timeout=120, cwd=REPO, check=False)
        return r.returncode, r.stderr + r.stdout

    _expect_refused(base, case, runner=runner)


# -- configurations ----------------------------------------------------------------------------------


def _conf(extra: str) -> Callable[[Base, Path], str]:
    return lambda base, d: base.conf + extra


def _include(make: Callable[[Path], Path]) -> Callable[[Base, Path], str]:
    def conf(base: Base, d: Path) -> str:
        return base.conf + f"[Build]\nInclude={make(d)}\n"
    return conf


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "fifo.conf")
    return d / "fifo.conf"


def _sparse(d: Path) -> Path:
    with open(d / "big.conf", "wb") as f:
        f.truncate(1 << 34)
    return d / "big.conf"


def _latin1(d: Path) -> Path:
    (d / "latin1.conf").write_bytes(b"[Content]\nHostname=caf\xe9\n")
    return d / "latin1.conf"


def _loop(d: Path) -> Path:
    (d / "loop.conf").write_text("[Build]\nInclude=loop.conf\n")
    return d / "loop.conf"


def _deep(d: Path) -> Path:
    for i in range(12):
        (d / f"inc{i}.conf").write_text(f"[Build]\nInclude=inc{i + 1}.conf\n")
    (d / "inc12.conf").write_text("[Build]\nFormat=tar\n")
    return d / "inc0.conf"


def _dir(d: Path) -> Path:
    (d / "adir").mkdir()
    return d / "adir"


def _dropin_fifo(base: Base, d: Path) -> str:
    (d / "reprobuild.conf.d").mkdir()
    os.mkfifo(d / "reprobuild.conf.d" / "10-fifo.conf")
    return base.conf


def _main_is_dev_zero(base: Base, d: Path) -> str:
    return "@symlink:/dev/zero"


# (id, configuration text or a function of (base, case dir), text the error must contain)
CONFIG_CASES: list[tuple[str, Callable[[Base, Path], str], str]] = [
    ("epoch-1e10", _conf("[Build]\nSourceDateEpoch=10000000000\n"), "SourceDateEpoch"),
    ("epoch-1e26", _conf("[Build]\nSourceDateEpoch=" + "1" + "0" * 26 + "\n"), "SourceDateEpoch"),
    ("epoch-negative", _conf("[Build]\nSourceDateEpoch=-1\n"), "SourceDateEpoch"),
    ("epoch-float", _conf("[Build]\nSourceDateEpoch=1e10\n"), "SourceDateEpoch"),
    ("epoch-arabic-digits", _conf("[Build]\nSourceDateEpoch=\u0661\u0662\u0663\n"), "SourceDateEpoch"),
    ("include-dev-zero", _include(lambda d: Path("/dev/zero")), "/dev/zero"),
    ("include-fifo", _include(_fifo), "fifo.conf"),
    ("include-sparse-16g", _include(_sparse), "big.conf"),
    ("include-directory", _include(_dir), "adir"),
    ("include-not-utf8", _include(_latin1), "latin1.conf"),
    ("include-loop", _include(_loop), "loop"),
    ("include-too-deep", _include(_deep), "nested"),
    ("include-missing", _include(lambda d: d / "nothing.conf"), "nothing.conf"),
    ("dropin-fifo", _dropin_fifo, "10-fifo.conf"),
    ("main-dev-zero", _main_is_dev_zero, "reprobuild.conf"),
    ("hostname-traversal", _conf("[Content]\nHostname=../../etc\n"), "Hostname"),
    ("hostname-underscore", _conf("[Content]\nHostname=a_b\n"), "Hostname"),
    ("locale-traversal", _conf("[Content]\nLocale=../../x\n"), "Locale"),
    ("timezone-traversal", _conf("[Content]\nTimezone=../../../../etc/passwd\n"), "Timezone"),
    ("removefiles-traversal", _conf("[Content]\nRemoveFiles=../../*\n"), "RemoveFiles"),
    ("package-traversal", _conf("[Content]\nPackages=../evil\n"), "Packages"),
    ("package-slash", _conf("[Content]\nPackages=foo/bar\n"), "Packages"),
    ("architecture-unknown", _conf("[Distribution]\nArchitecture=sparc\n"), "Architecture"),
    ("seed-not-hex", _conf("[Build]\nSeed=zz\n"), "Seed"),
    ("release-traversal", _conf("[Distribution]\nRelease=../x\n"), "Release"),
    ("format-unknown", _conf("[Build]\nFormat=exe\n"), "Format"),
    ("mirror-ftp", _conf("[Distribution]\nMirror=ftp://example.invalid/\n"), "Mirror"),
    ("section-unknown", _conf("[Evil]\nKey=1\n"), "[Evil]"),
    ("key-unknown", _conf("[Build]\nPostBuild=rm -rf /\n"), "PostBuild"),
    ("machine-id-bad", _conf("[Content]\nMachineId=xyz\n"), "MachineId"),
    ("module-traversal", _conf("[Initrd]\nKernelModules=../../x\n"), "KernelModules"),
    ("continuation-at-eof", _conf("[Build]\nFormat=tar \\\n"), "continuation"),
    ("outside-section", lambda base, d: "Format=tar\n" + base.conf, "outside any"),
    ("bad-header", _conf("[Build\nFormat=tar\n"), "section header"),
    ("control-character", _conf("[Content]\nRootPassword=a\x1bb\n"), "RootPassword"),
    ("bootable-maybe", _conf("[Content]\nBootable=maybe\n"), "Bootable"),
]


@pytest.mark.parametrize("name, make, mention", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_crafted_configuration_is_refused_by_every_command(base: Base, name: str, make, mention: str) -> None:
    d = base.root / "cases" / f"conf-{name}"
    d.mkdir(parents=True)
    text = make(base, d)
    if text.startswith("@symlink:"):
        (d / "reprobuild.conf").symlink_to(text.split(":", 1)[1])
    else:
        (d / "reprobuild.conf").write_text(text)
    (d / "reprobuild.lock").write_bytes(dumps(load_lock(base.root / "valid" / "reprobuild.lock")))
    started = time.monotonic()
    _expect_refused(base, d, must_mention=mention)
    assert time.monotonic() - started < 60


def test_update_of_a_package_not_in_the_lock_is_an_error(base: Base) -> None:
    d = _case_dir(base, "update-unknown")
    (d / "reprobuild.lock").write_bytes(dumps(load_lock(base.root / "valid" / "reprobuild.lock")))
    before = (d / "reprobuild.lock").read_bytes()
    for name in ("../../etc/passwd", "no-such-package"):
        code, text = _run(["lock", "-C", str(d), "--store", str(base.store), "--update", name])
        assert code != 0 and "not a package of the lock" in text, text
    assert (d / "reprobuild.lock").read_bytes() == before


def test_output_at_a_dangling_symlink_is_named(base: Base) -> None:
    d = _case_dir(base, "dangling-output")
    (d / "reprobuild.lock").write_bytes(dumps(load_lock(base.root / "valid" / "reprobuild.lock")))
    (d / "out").symlink_to(d / "nowhere")
    store_before = _listing(base.store)
    code, text = _run(["build", "-C", str(d), "--locked", "--store", str(base.store), "-o", str(d / "out")])
    assert code != 0 and "symbolic link" in text and "nowhere" in text and "File exists" not in text, text
    assert _listing(base.store) == store_before, "refused before any download or gc root"


def test_out_of_date_lock_is_refused_before_any_download(base: Base) -> None:
    """A valid lock the configuration has moved away from: build --locked and lock --verify stop
    before the store or anything else changes (fetch fetches what a valid lock pins)."""
    d = _case_dir(base, "out-of-date", base.conf + "[Content]\nHostname=changed\n")
    (d / "reprobuild.lock").write_bytes(dumps(load_lock(base.root / "valid" / "reprobuild.lock")))
    Store(base.store).unregister_root("earlier-build")  # so that a registered root would show
    try:
        _expect_refused(base, d, commands=(COMMANDS[0], COMMANDS[2]), must_mention="out of date")
    finally:
        Store(base.store).register_root("earlier-build", Store(base.store).iter_objects())


def test_lock_for_a_foreign_architecture_is_refused_before_any_download(base: Base) -> None:
    """A consistent arm64 lock for an arm64 configuration passes validation; on a machine that
    cannot run arm64 binaries the build stops before it fetches or registers anything."""
    from reprobuild.preflight import binfmt_handlers

    if os.uname().machine == "aarch64" or any(h.endswith("aarch64") for h in binfmt_handlers()):
        pytest.skip("this machine can run arm64 binaries")
    d = _case_dir(base, "arm64", base.conf + "[Distribution]\nArchitecture=arm64\n")
    spec = load_spec(d)
    data = copy.deepcopy(base.lock)
    data.update(architecture="arm64", config=spec.digest_input(), config_digest=spec.digest())
    for package_set in data["sets"]:
        for package in package_set["packages"]:
            if package["architecture"] != "all":
                package["architecture"] = "arm64"
    (d / "reprobuild.lock").write_text(json.dumps(data, indent=2, sort_keys=True))
    assert _run(["lock", "-C", str(d), "--verify"])[0] == 0, "the lock itself is valid"
    Store(base.store).unregister_root("earlier-build")  # so that fetching anything would show
    try:
        _expect_refused(base, d, commands=COMMANDS[2:], must_mention="binfmt_misc")
    finally:
        Store(base.store).register_root("earlier-build", Store(base.store).iter_objects())


def test_foreign_architecture_is_refused_up_front(base: Base) -> None:
    from reprobuild.errors import BuildError
    from reprobuild.preflight import check_architecture

    check_architecture("amd64", machine="x86_64", handlers=set())
    check_architecture("arm64", machine="x86_64", handlers={"qemu-aarch64"})
    with pytest.raises(BuildError, match="binfmt_misc") as e:
        check_architecture("arm64", machine="x86_64", handlers={"qemu-riscv64"})
    assert "qemu-user-static" in (e.value.hint or "")


# -- crashes and full disks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_definition(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-package host-base definition (tests/check_fixture.py) with a post-installation
    script that sleeps, so a build can be killed at known stages."""
    from tests.check_fixture import make_definition

    root = tmp_path_factory.mktemp("crash")
    d = make_definition(root, "http://127.0.0.1:9/unused", leak=False)
    (d / "slow.sh").write_text("#!/bin/sh\necho started > /etc/slow-started\nsleep 3\n")
    (d / "slow.sh").chmod(0o755)
    with open(d / "reprobuild.conf", "a") as f:
        f.write("\n[Content]\nPostInstallationScripts=slow.sh\n")
    spec = load_spec(d)
    lock = load_lock(d / "reprobuild.lock")
    save_lock(replace(lock, config_digest=spec.digest(), config=spec.digest_input()), d / "reprobuild.lock")
    return d


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "reprobuild", *argv]


def _scratch(store: Path, out: Path) -> list[str]:
    """What a build left: in the store's tmp/, beside the output, and in the trees' workspace
    (``out``'s sibling ``ws``, passed as --workspace)."""
    tmp = sorted(os.listdir(store / "tmp")) if (store / "tmp").is_dir() else []
    work = sorted(n for n in os.listdir(out) if n.startswith((WORK_PREFIX, ".ddi-"))) if out.is_dir() else []
    ws = out.parent / "ws"
    trees = sorted(os.listdir(ws)) if ws.is_dir() else []
    return [f"tmp/{n}" for n in tmp] + [f"out/{n}" for n in work] + [f"ws/{n}" for n in trees]


def _wait_for(predicate: Callable[[], bool], timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _started(store: Path, out: Path) -> bool:
    """The post-installation script runs: its marker is in some scratch tree."""
    for top in (store / "tmp", out, out.parent / "ws"):
        with contextlib.suppress(OSError):
            for dirpath, _dirs, files in os.walk(top):
                if "slow-started" in files:
                    return True
    return False


@pytest.mark.parametrize("cache", ["cached", "uncached"])
@pytest.mark.parametrize("point", ["work-dir", "packages", "script"])
def test_kill_9_leaves_no_scratch_after_the_next_command(slow_definition: Path, tmp_path: Path, cache: str,
                                                         point: str) -> None:
    import shutil

    store = tmp_path / "store"
    shutil.copytree(slow_definition.parent / "store", store)
    out = tmp_path / "out"
    # Private trees go to a workspace of their own (the default would be /dev/shm when they fit).
    (tmp_path / "ws").mkdir()
    extra = ("--no-cache",) if cache == "uncached" else ()
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    proc = subprocess.Popen(_cli("build", "-C", str(slow_definition), "--locked", "--offline", "-q", "-o", str(out),
                                 "--workspace", str(tmp_path / "ws"), *extra), env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        reached = {
            "work-dir": lambda: any(n.startswith(WORK_PREFIX) for n in os.listdir(out)) if out.is_dir() else False,
            "packages": lambda: _listing_has(store / "tmp", out, tmp_path / "ws", "var/lib/dpkg/status"),
            "script": lambda: _started(store, out),
        }[point]
        assert _wait_for(reached), f"the build never reached {point}: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # The sandbox (its own session, so not in the killed group) dies with the build: nothing goes
    # on writing into the scratch tree that the next command removes.
    assert _wait_for(lambda: not _sandboxes_under(tmp_path), timeout=2), _sandboxes_under(tmp_path)
    left = _scratch(store, out)
    assert left, "the kill left nothing to clean up (the test would prove nothing)"
    stats = json.loads(subprocess.run(_cli("store", "stats", "--json"), env=env, cwd=REPO, capture_output=True,
                                      text=True, check=True).stdout)
    assert stats["scratch_dead"] >= 1 and stats["scratch_bytes"] > 0, stats
    # The next command that touches the store (here: fetch, which has nothing to download).
    r = subprocess.run(_cli("fetch", "-C", str(slow_definition), "-q"), env=env, cwd=REPO, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert _scratch(store, out) == [], "scratch data survived the next command"
    stats = json.loads(subprocess.run(_cli("store", "stats", "--json"), env=env, cwd=REPO, capture_output=True,
                                      text=True, check=True).stdout)
    assert stats["scratch"] == 0 and stats["scratch_dead"] == 0, stats


def _sandboxes_under(top: Path) -> list[str]:
    """Command lines of running (not zombie) sandbox processes whose tree is below ``top``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "reprobuild-sandbox" in cmdline and str(top) in cmdline:
                found.append(f"{pid}: {cmdline[:200]}")
    return found


def _listing_has(*roots_and_rel: Any) -> bool:
    *roots, rel = roots_and_rel
    for top in roots:
        with contextlib.suppress(OSError):
            for dirpath, _dirs, _files in os.walk(top):
                if os.path.isfile(os.path.join(dirpath, rel)):
                    return True
    return False


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("cache", ["cached", "uncached"])
def test_full_output_file_system_is_named(slow_definition: Path, tmp_path: Path, cache: str) -> None:
    import shutil

    store = tmp_path / "store"
    shutil.copytree(slow_definition.parent / "store", store)
    d = tmp_path / "def"
    shutil.copytree(slow_definition, d)
    (d / "slow.sh").write_text("#!/bin/sh\nexit 0\n")  # the digest input is the path: same lock, no wait
    extra = ("--no-cache",) if cache == "uncached" else ()
    env = {**os.environ, "REPROBUILD_STORE": str(store)}
    if cache == "cached":  # the tree comes from the store: only the output's writes hit the small disk
        warm = subprocess.run(_cli("build", "-C", str(d), "--locked", "--offline", "-q", "-o", str(tmp_path / "w")),
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
        assert warm.returncode == 0, warm.stderr[-2000:]
    with _tmpfs(tmp_path / "small", "1m") as small:
        out = small / "out"
        r = subprocess.run(_cli("build", "-C", str(d), "--locked", "--offline", "-q", "-o", str(out), *extra),
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
        assert f"the file system at {small} is full" in lines[0], lines[0]
        # The path that failed: the output's temporary, or (a tree extracted into the work
        # directory beside the output) the member being extracted.
        assert f"{out}/" in lines[0] or "cannot extract /" in lines[0], lines[0]
        assert str(store) not in lines[0], "the store is not blamed"
        assert not [n for n in os.listdir(out) if n.startswith((WORK_PREFIX, ".image"))], os.listdir(out)


def test_full_store_stops_fetch_at_once_and_names_it(base: Base, tmp_path: Path, repo_server) -> None:
    with _tmpfs(tmp_path / "small", "256k") as small:
        store = small / "store"
        Store(store)
        with contextlib.suppress(OSError), open(small / "filler", "wb") as f:  # fill the file system
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        repo_server.reset()
        code, text = _run(["fetch", "-C", str(base.root / "valid"), "--store", str(store), "-q"])
        pool = repo_server.requested("/pool/")
        packages = sum(len(s["packages"]) for s in base.lock["sets"])
        assert len(pool) <= packages, f"the mirror was retried after a local write error: {pool}"
        lines = [line for line in text.splitlines() if line.strip()]
        assert code != 0 and "Traceback" not in text, text
        assert len(lines) <= 2 and lines[0].startswith("error: cannot write to the store"), text
        assert f"the file system at {small} is full" in lines[0] and str(store) in lines[0], text
        assert "retrying" not in text


# -- bounded reads: verify and diff refuse what they must not read -------------------------------------


@pytest.fixture(scope="module")
def built_tar(slow_definition: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(image.tar, its manifest, the lock) of a hermetic build of the crash tests' definition."""
    import shutil

    root = tmp_path_factory.mktemp("verify")
    store = root / "store"
    shutil.copytree(slow_definition.parent / "store", store)
    out = root / "out"
    r = subprocess.run(_cli("build", "-C", str(slow_definition), "--locked", "--offline", "-q", "-o", str(out)),
                       env={**os.environ, "REPROBUILD_STORE": str(store)}, cwd=REPO, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "image.tar", out / "image.tar.manifest.json", slow_definition / "reprobuild.lock"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse-1t", "manifest-fifo", "manifest-dev-zero",
                                  "provenance-fifo"])
def test_verify_refuses_before_reading(built_tar: tuple[Path, Path, Path], tmp_path: Path, kind: str) -> None:
    import shutil

    image, manifest, lock = built_tar
    target = tmp_path / "image.tar"
    beside = tmp_path / "image.tar.manifest.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    elif kind == "sparse-1t":
        shutil.copy(image, target)
        with open(target, "r+b") as f:
            f.truncate(1 << 40)
    else:
        shutil.copy(image, target)
    if kind == "manifest-fifo":
        os.mkfifo(beside)
    elif kind == "manifest-dev-zero":
        beside.symlink_to("/dev/zero")
    else:
        shutil.copy(manifest, beside)
    extra: tuple[str, ...] = ()
    if kind == "provenance-fifo":
        os.mkfifo(tmp_path / "provenance.jsonl")
        extra = ("--provenance", str(tmp_path / "provenance.jsonl"))
    started = time.monotonic()
    r = subprocess.run(_cli("verify", str(target), "--lock", str(lock), "--no-rebuild", *extra), cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
    text = r.stdout + r.stderr
    assert time.monotonic() - started < 60, "refused at once"
    assert r.returncode != 0 and "Traceback" not in text, text[-2000:]
    expected = {"fifo": "a FIFO, not a regular file", "dev-zero": "a character device, not a regular file",
                "sparse-1t": f"{1 << 40} bytes", "manifest-fifo": "not a regular file",
                "manifest-dev-zero": "not a regular file", "provenance-fifo": "a FIFO, not a regular file"}[kind]
    assert expected in text, text[-2000:]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse-1t"])
def test_diff_refuses_before_reading(tmp_path: Path, kind: str) -> None:
    """diff checks the file type, and a disk's size against its GPT, before reading."""
    from tests.test_diff_support import make_ddi, make_keys

    ddi = make_ddi(tmp_path, "a", keys=make_keys(tmp_path))
    other = tmp_path / "other.raw"
    if kind == "fifo":
        os.mkfifo(other)
    elif kind == "dev-zero":
        other.symlink_to("/dev/zero")
    else:
        import shutil

        shutil.copy(ddi, other)
        with open(other, "r+b") as f:
            f.truncate(1 << 40)
    started = time.monotonic()
    code, text = _run(["diff", str(ddi), str(other)])
    lines = [line for line in text.splitlines() if line.strip()]
    assert time.monotonic() - started < 30, "refused at once"
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), text
    expected = {"fifo": "a FIFO", "dev-zero": "a character device", "sparse-1t": "backup GPT header"}[kind]
    assert expected in lines[0], lines[0]


def test_live_scratch_is_kept_and_a_reused_pid_does_not_keep_dead_scratch(tmp_path: Path) -> None:
    from reprobuild.store import _owner_alive

    store = Store(tmp_path / "store")
    out = tmp_path / "out"
    out.mkdir()
    with store.work_dir(out) as work:
        (work / "file").write_bytes(b"x" * 4096)
        assert store.clean_scratch() == 0 and work.is_dir(), "a live build's work directory is kept"
        assert Store(store.root).stats().scratch == 1
    assert not work.exists() and os.listdir(store.tmp_dir) == []
    # Our pid made something now: alive. Something made long before this process started, named
    # after our pid: the pid was reused, its maker is gone.
    assert _owner_alive(os.getpid(), time.time())
    assert not _owner_alive(os.getpid(), time.time() - 10 * 365 * 86400)


def test_os_errors_name_both_paths_and_the_full_file_system(tmp_path: Path) -> None:
    import errno

    from reprobuild.errors import describe_os_error, disk_full_note, mount_point

    assert mount_point(tmp_path / "not" / "yet") == mount_point(tmp_path)
    text = describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a/b", None, "/c/d"))
    assert text == "Invalid cross-device link: /a/b -> /c/d"
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"), None, str(tmp_path / "y"))
    assert describe_os_error(full).endswith(f"(the file system at {mount_point(tmp_path)} is full)")
    from reprobuild.errors import BuildError

    try:
        try:
            raise full
        except OSError as e:
            raise BuildError("cannot write the tree") from e
    except BuildError as wrapped:
        assert disk_full_note(wrapped) == f"the file system at {mount_point(tmp_path)} is full"
