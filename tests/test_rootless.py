"""Rootless mode (reprobuild.userns): an ordinary user builds the same bytes as root.

The pure parts (subordinate-id files, id maps, the sysctl checks) are tested directly. The rest
runs as real unprivileged users that the tests create and remove (:mod:`tests.rootless_users`;
they need root, as ``make test`` runs in CI):

* ``reprobuild-rl`` with a subordinate id range (``usermod --add-subuids``), its store in the
  default place (``~/.cache/reprobuild/store``);
* ``reprobuild-nosub`` without one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reprobuild import userns
from reprobuild.fileio import sha256_file
from tests.live_images import REPO, run_reprobuild
from tests.rootless_users import Env, rootless_users

USER = "reprobuild-rl"
NOSUB = "reprobuild-nosub"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating test users needs root")


# -- pure parts ----------------------------------------------------------------------------------
SUBUID = "alice:100000:65536\n# comment\nbob:165536:1000\nbob:200000:65536\n1003:300000:70000\nbad:x:1\n"


def test_parse_subids_by_name_and_uid() -> None:
    assert userns.parse_subids(SUBUID, "alice", 1001) == [userns.IdRange(100000, 65536)]
    assert userns.parse_subids(SUBUID, "bob", 1002) == [userns.IdRange(165536, 1000), userns.IdRange(200000, 65536)]
    assert userns.parse_subids(SUBUID, "carol", 1003) == [userns.IdRange(300000, 70000)]
    assert userns.parse_subids(SUBUID, "bad", 1004) == []


def test_usable_range_needs_65535_ids() -> None:
    assert userns.usable_range(userns.parse_subids(SUBUID, "bob", 1002)) == userns.IdRange(200000, 65536)
    assert userns.usable_range([userns.IdRange(100000, 65534)]) is None
    assert userns.usable_range([userns.IdRange(100000, 65535)]) == userns.IdRange(100000, 65535)


def test_suggested_range_overlaps_none() -> None:
    assert userns.suggest_start("", "") == 100000
    assert userns.suggest_start(SUBUID, "dave:500000:65536\n") == 565536
    assert userns.usermod_command("dave", 100000) == \
        "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 dave"


def test_map_arguments_user_is_root_and_range_is_one_to_65535() -> None:
    assert userns.map_arguments(1001, userns.IdRange(100000, 65536)) == ["0", "1001", "1", "1", "100000", "65535"]


def test_initial_map() -> None:
    assert userns.is_initial_map("         0          0 4294967295\n")
    assert not userns.is_initial_map("         0       1001          1\n         1     100000      65535\n")


@pytest.mark.parametrize(("path", "value", "sysctl"), [
    ("/proc/sys/user/max_user_namespaces", "0\n", "user.max_user_namespaces"),
    ("/proc/sys/kernel/unprivileged_userns_clone", "0\n", "kernel.unprivileged_userns_clone"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1\n", "kernel.apparmor_restrict_unprivileged_userns"),
])  # fmt: skip
def test_disabled_user_namespaces_name_the_sysctl(path: str, value: str, sysctl: str) -> None:
    files = {"/proc/sys/user/max_user_namespaces": "15000\n", path: value}
    reason = userns.disabled_reason(files.get)
    assert reason is not None and sysctl in reason and f"sysctl -w {sysctl}=" in reason
    with pytest.raises(userns.RootlessUnavailable, match=sysctl.replace(".", r"\.")):
        userns.plan(lambda p: files.get(p))
    assert userns.disabled_reason({"/proc/sys/user/max_user_namespaces": "15000\n"}.get) is None


# -- real users ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rootless_env() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.skip("creating test users needs root")
    with rootless_users({USER: True, NOSUB: False}) as env:
        yield env


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@needs_root
def test_missing_subuid_range_is_one_line_with_the_usermod_command(rootless_env: Env) -> None:
    work = Path(pwd.getpwnam(NOSUB).pw_dir)
    result = rootless_env.run(NOSUB, "build", "--locked", "-f", "tar", "-o", "out", cwd=work)
    line = _one_error_line(result)
    assert f"subordinate ids for {NOSUB}" in line and "usermod --add-subuids " in line and line.endswith(NOSUB)
    assert not (work / "out").exists() and not (work / ".cache/reprobuild").exists()
    # The command it prints is the fix: the same build now gets past the user namespace (and
    # stops at the missing definition, the next thing it needs).
    fix = line.split("as root, ", 1)[1].split()
    subprocess.run(fix, check=True)
    result = rootless_env.run(NOSUB, "build", "--locked", "-f", "tar", "-o", "out", cwd=work)
    assert "subordinate" not in result.stderr and "reprobuild.conf" in result.stderr, result.stderr
    subprocess.run(["usermod", "--del-subuids", fix[2], "--del-subgids", fix[4], NOSUB], check=True)
    # Commands that need no ids run without a range.
    rootless_env.ok(NOSUB, "keygen", "--out", "k", cwd=work)
    assert (work / "k.key").exists() and (work / "k.key").stat().st_uid == pwd.getpwnam(NOSUB).pw_uid


@needs_root
def test_missing_newuidmap_names_the_package(rootless_env: Env) -> None:
    work = Path(pwd.getpwnam(USER).pw_dir)
    result = rootless_env.run(USER, "build", "--locked", "-o", "out", cwd=work, env={"PATH": "/nonexistent"})
    assert "apt-get install uidmap" in _one_error_line(result)


@needs_root
def test_a_store_of_another_user_is_refused(rootless_env: Env, tmp_path: Path) -> None:
    work = Path(pwd.getpwnam(USER).pw_dir)
    shared = rootless_env.root / "shared-store"
    shared.mkdir(mode=0o2775)
    try:
        line = _one_error_line(rootless_env.run(USER, "build", "--store", str(shared), cwd=work))
        assert "belongs to uid 0" in line and "--store" in line
        os.chown(shared, pwd.getpwnam(USER).pw_uid, -1)
        os.chmod(shared, 0o2775)
        line = _one_error_line(rootless_env.run(USER, "store", "gc", "--store", str(shared), cwd=work))
        assert "writable by other users (mode 2775)" in line and "chmod go-w" in line
    finally:
        shutil.rmtree(shared)


@needs_root
def test_unshare_maps_the_user_to_root_and_its_range_below(rootless_env: Env) -> None:
    work = Path(pwd.getpwnam(USER).pw_dir)
    out = rootless_env.ok(USER, "unshare", "cat", "/proc/self/uid_map", "/proc/self/gid_map", cwd=work).stdout
    uid = pwd.getpwnam(USER).pw_uid
    start = userns.usable_range(userns.parse_subids(Path("/etc/subuid").read_text(), USER, uid))
    assert start is not None
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["0", str(uid), "1"] and rows[1] == ["1", str(start.start), "65535"]
    assert rootless_env.run(USER, "unshare", "sh", "-c", "exit 7", cwd=work).returncode == 7


MAKE_TWO_IMAGES = """set -e
mkdir -p a/etc b/etc
echo data > a/etc/f; echo data > b/etc/f
chown 42:42 b/etc/f
touch -d @1700000000 a/etc/f b/etc/f a/etc b/etc a b
mkfs.erofs --quiet -T 1700000000 -U 11111111-1111-1111-1111-111111111111 a.img a
mkfs.erofs --quiet -T 1700000000 -U 11111111-1111-1111-1111-111111111111 b.img b
"""


@needs_root
def test_diff_as_an_ordinary_user_reads_owners(rootless_env: Env) -> None:
    """Two erofs images that differ only in one file's owner: ``diff`` as the user (inside its
    namespace) reports it; so does a user without subordinate ids, since erofs is read in place
    (owners come from the image, not from an extraction that needs root)."""
    if shutil.which("mkfs.erofs") is None:
        raise AssertionError("mkfs.erofs is missing (make setup installs erofs-utils)")
    user = pwd.getpwnam(USER)
    work = Path(user.pw_dir) / "diff"
    work.mkdir()
    os.chown(work, user.pw_uid, user.pw_gid)
    rootless_env.ok(USER, "unshare", "sh", "-c", MAKE_TWO_IMAGES, cwd=work)
    result = rootless_env.run(USER, "diff", "a.img", "b.img", cwd=work)
    assert result.returncode == 1 and "0:0" in result.stdout and "42:42" in result.stdout, result
    other = Path(pwd.getpwnam(NOSUB).pw_dir)
    for name in ("a.img", "b.img"):
        shutil.copy(work / name, other / name)
    result = rootless_env.run(NOSUB, "diff", "a.img", "b.img", cwd=other)
    assert result.returncode == 1 and "0:0" in result.stdout and "42:42" in result.stdout, result


MINIMAL_SIGNING = "\n[Signing]\nLockKey={k}/lock.key\nVerityKey={k}/verity.key\nVerityCertificate={k}/verity.crt\n"


@pytest.mark.live
@needs_root
def test_rootless_lock_fetch_build_verify_equal_root(rootless_env: Env, warm_store: Path, tmp_path: Path) -> None:
    """The issue's "done when": lock/minimal's definition, locked, fetched, built (disk, tar and
    cpio, cached and --no-cache) and verified by an ordinary user gives root's bytes."""
    user = pwd.getpwnam(USER)
    home = Path(user.pw_dir)
    work = home / "minimal"
    for d in (work, work / "keys"):
        d.mkdir()
        os.chown(d, user.pw_uid, user.pw_gid)
    env = rootless_env
    env.ok(USER, "keygen", "--out", "keys/lock", cwd=work)
    env.ok(USER, "keygen", "--verity", "--out", "keys/verity", cwd=work)
    conf = "\n".join(line for line in (REPO / "lock/minimal/reprobuild.conf").read_text().splitlines()
                     if not line.startswith(("LockKey", "[Signing]")))
    (work / "reprobuild.conf").write_text(conf + MINIMAL_SIGNING.format(k=work / "keys"))
    os.chown(work / "reprobuild.conf", user.pw_uid, user.pw_gid)

    env.ok(USER, "lock", "-q", cwd=work)
    env.ok(USER, "fetch", "-q", cwd=work)
    for fmt in ("disk", "tar", "cpio"):
        env.ok(USER, "build", "--locked", "-f", fmt, "-o", f"out-{fmt}", "-q", cwd=work)
        env.ok(USER, "build", "--locked", "-f", fmt, "--no-cache", "-o", f"nocache-{fmt}", "-q", cwd=work)
    verified = env.ok(USER, "verify", "out-disk/image.raw", "--lock", "reprobuild.lock", "--trusted-key",
                      "keys/lock.pub", "--certificate", "keys/verity.crt", "--store",
                      str(home / ".cache/reprobuild/store"), cwd=work)
    assert "PASS  rebuild" in verified.stdout and "PASS  verity-signature" in verified.stdout, verified.stdout

    # Root builds the same lock (its own copy of the definition, the shared warm store).
    as_root = tmp_path / "minimal"
    as_root.mkdir()
    for name in ("reprobuild.conf", "reprobuild.lock", "reprobuild.lock.sig"):
        shutil.copy(work / name, as_root / name)
    for fmt, name in (("disk", "image.raw"), ("tar", "image.tar"), ("cpio", "image.cpio")):
        run_reprobuild("build", "-C", str(as_root), "--locked", "-f", fmt, "-o", str(as_root / f"out-{fmt}"),
                       "--store", str(warm_store), "-q", timeout=1500)
        rootless = sha256_file(work / f"out-{fmt}" / name)
        assert rootless == sha256_file(as_root / f"out-{fmt}" / name), f"{fmt}: rootless differs from root"
        assert rootless == sha256_file(work / f"nocache-{fmt}" / name), f"{fmt}: cached differs from --no-cache"
    assert env.run(USER, "diff", "out-disk/image.raw", "nocache-disk/image.raw", cwd=work).returncode == 0

    # Outputs belong to the user; owners in the image are the packages' owners, not the user's.
    for p in (work / "out-disk/image.raw", work / "out-tar/image.tar", work / "out-tar/image.tar.manifest.json"):
        assert (p.stat().st_uid, p.stat().st_gid) == (user.pw_uid, user.pw_gid), p
    with tarfile.open(work / "out-tar/image.tar") as tf:
        members = {m.name.removeprefix("./"): m for m in tf.getmembers()}
    assert (members["etc/shadow"].uid, members["etc/shadow"].gid) == (0, 42)  # root:shadow
    assert members["usr/bin/passwd"].uid == 0 and members["usr/bin/passwd"].mode & stat.S_ISUID
    assert all(m.uid < 65536 and m.gid < 65536 for m in members.values())

    # What the host sees in the store: trees owned by the user's subordinate ids, in a 0700 directory.
    store = home / ".cache/reprobuild/store"
    trees = store / "trees"
    assert stat.S_IMODE(trees.stat().st_mode) == 0o700 and trees.stat().st_uid == user.pw_uid
    sub = userns.usable_range(userns.parse_subids(Path("/etc/subgid").read_text(), USER, user.pw_uid))
    assert sub is not None
    # unix_chkpwd is root:shadow (42) 2755 in the image: the user's own uid and subordinate gid 42 here.
    chkpwd = [p.stat() for p in trees.glob("*/usr/sbin/unix_chkpwd")]
    assert chkpwd and all((st.st_uid, st.st_gid) == (user.pw_uid, sub.start + 41) and st.st_mode & stat.S_ISGID
                          for st in chkpwd)

    # A directory output: the image's owners inside the namespace, the user's ids outside.
    env.ok(USER, "build", "--locked", "-f", "directory", "-o", "out-dir", "-q", cwd=work)
    assert env.ok(USER, "unshare", "stat", "-c", "%u:%g %a", "out-dir/image/etc/shadow", cwd=work).stdout == "0:42 640\n"
    st = (work / "out-dir/image/etc/shadow").stat()
    assert (st.st_uid, st.st_gid) == (user.pw_uid, sub.start + 41)
    # The store's maintenance reads those trees with their owners (verify compares them with their
    # objects), and `check` builds twice, one in a new UTS namespace with another hostname.
    assert "0 extracted tree(s) removed" in env.ok(USER, "store", "verify", cwd=work).stdout
    env.ok(USER, "store", "gc", "--keep", "reprobuild.lock", cwd=work)
    checked = env.ok(USER, "check", "-f", "tar", "--variation", "umask", "--variation", "hostname", "--no-bisect",
                     cwd=work, timeout=1500)
    said = checked.stdout + checked.stderr
    assert "applied  hostname" in said and "bit-for-bit identical" in said, said
    _killed_build_leaves_nothing(env, work, store, sub)
    # `reprobuild unshare` removes what the user's builds left, whoever owns it in the image.
    env.ok(USER, "unshare", "rm", "-rf", str(home / ".cache/reprobuild"), cwd=work)
    assert not (home / ".cache/reprobuild").exists()


@pytest.mark.live
@pytest.mark.boot
@needs_root
@pytest.mark.timeout(900)
def test_vm_as_an_ordinary_user(rootless_env: Env, boot_images: dict[str, object]) -> None:
    """`reprobuild vm` as the user: qemu under TCG, a private copy of the OVMF variables with the
    user's certificate enrolled, Secure Boot on, a signed UKI booting to its marker."""
    user = pwd.getpwnam(USER)
    work = Path(user.pw_dir) / "vm"
    work.mkdir()
    shutil.copy(boot_images["signed"], work / "signed.img")  # type: ignore[arg-type]
    (work / "sb.crt").write_bytes(boot_images["cert"])  # type: ignore[arg-type]
    for p in (work, work / "signed.img", work / "sb.crt"):
        os.chown(p, user.pw_uid, user.pw_gid)
    before = sha256_file(work / "signed.img")
    result = rootless_env.run(USER, "vm", "signed.img", "--certificate", "sb.crt", "--kvm", "no", "-m", "1G",
                              "--expect", "REPROBUILD-BOOT-MARKER", "--timeout", "600", cwd=work, timeout=800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert sha256_file(work / "signed.img") == before


def _killed_build_leaves_nothing(env: Env, work: Path, store: Path, sub: userns.IdRange) -> None:
    """A rootless build killed with SIGKILL while dpkg runs leaves scratch directories (in the
    store's tmp/, in the output directory and in /dev/shm, where its trees are made) holding files of the user's subordinate ids, which the
    user alone cannot always remove; the next build removes them."""
    argv = env.argv(USER, "build", "--locked", "-f", "tar", "--no-cache", "-o", "out-killed")
    proc = subprocess.Popen(argv, cwd=work, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("installing: "):
            break  # extracted; dpkg runs in the namespace
    subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "".join(seen)

    uid = pwd.getpwnam(USER).pw_uid

    def leftovers() -> list[Path]:
        # The trees are made in memory (/dev/shm, reprobuild.workspace): the user's directories there too.
        trees = [p for p in Path("/dev/shm").glob(".reprobuild-work-*") if p.lstat().st_uid == uid]
        return [*(work / "out-killed").glob(".reprobuild-work-*"), *(store / "tmp").iterdir(), *trees]

    left = leftovers()
    assert left, f"the killed build left no scratch directory: {''.join(seen)}"
    foreign = [p for d in left if d.is_dir() for p in d.rglob("*") if not p.is_symlink() and p.lstat().st_gid >= sub.start]
    assert foreign, f"the killed build's scratch ({left}) holds no file of a subordinate id"
    assert not (work / "out-killed" / "image.tar").exists()

    env.ok(USER, "build", "--locked", "-f", "tar", "-o", "out-killed", "-q", cwd=work)
    assert sha256_file(work / "out-killed/image.tar") == sha256_file(work / "out-tar/image.tar")
    assert not leftovers()
