"""The content-addressed store: atomic verified writes, verify, gc, bundles, locks, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from reprobuild.errors import FormatError, StoreError
from reprobuild.fileio import THREADED_HASH_MIN
from reprobuild.store import (
    CHUNK_SIZE,
    ObjectMismatch,
    ObjectMissing,
    Store,
    _tarinfo,
    check_sha256,
    object_relpath,
)

HELLO_SHA = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"  # sha256(b"hello")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- addressing


def test_layout_and_addressing(store: Store) -> None:
    assert object_relpath(HELLO_SHA) == f"objects/sha256/2c/{HELLO_SHA}"
    assert store.put_bytes(b"hello") == HELLO_SHA
    p = store.path(HELLO_SHA)
    assert p == store.root / object_relpath(HELLO_SHA)
    assert p.read_bytes() == b"hello"
    assert stat.S_IMODE(p.stat().st_mode) == 0o444  # immutable once published
    assert store.has(HELLO_SHA)
    with store.open(HELLO_SHA) as f:
        assert f.read() == b"hello"
    assert list(store.iter_objects()) == [HELLO_SHA]


@pytest.mark.parametrize("bad", ["", "AB" * 32, "ab" * 31, "g" * 64, "../" + "a" * 61, None],
                         ids=["empty", "upper", "short", "not-hex", "traversal", "none"])
def test_bad_addresses_are_refused(store: Store, bad: object) -> None:
    with pytest.raises(StoreError):
        check_sha256(bad)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.has(bad)  # type: ignore[arg-type]


def test_absent_object(store: Store) -> None:
    assert not store.has(HELLO_SHA)
    with pytest.raises(ObjectMissing):
        store.path(HELLO_SHA)
    with pytest.raises(ObjectMissing):
        store.open(HELLO_SHA)


def test_default_root() -> None:
    assert Store.default_root({"REPROBUILD_STORE": "/x/s", "XDG_CACHE_HOME": "/c"}) == Path("/x/s")
    assert Store.default_root({"XDG_CACHE_HOME": "/c"}) == Path("/c/reprobuild/store")
    assert Store.default_root({"HOME": "/home/u"}) == Path("/home/u/.cache/reprobuild/store")


# ---------------------------------------------------------------------------- verified writes


class Endless(io.RawIOBase):
    """A stream that never ends; counts what was asked of it."""

    def __init__(self) -> None:
        self.served = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = CHUNK_SIZE if n is None or n < 0 else n
        self.served += n
        return b"\0" * n


def test_put_stream_is_bounded(store: Store) -> None:
    src = Endless()
    with pytest.raises(ObjectMismatch) as ei:
        store.put_stream(src, "00" * 32, 1000)
    assert ei.value.reason == "long"
    assert src.served == 1001  # stopped right after the first byte too many
    assert list(store.iter_objects()) == [] and os.listdir(store.tmp_dir) == []


def test_put_stream_bounded_for_iterables(store: Store) -> None:
    pulled = 0

    def gen():
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 4096

    with pytest.raises(ObjectMismatch):
        store.put_stream(gen(), "00" * 32, 10_000)
    assert pulled == 3


@pytest.mark.parametrize("data,size,reason", [
    (b"hellO", 5, "sha256"),
    (b"hell", 5, "short"),
    (b"hello!", 5, "long"),
], ids=["corrupt", "truncated", "too-long"])
def test_wrong_bytes_are_never_visible(store: Store, data: bytes, size: int, reason: str) -> None:
    with pytest.raises(ObjectMismatch) as ei:
        store.put_stream(io.BytesIO(data), HELLO_SHA, size)
    assert ei.value.reason == reason
    assert not store.has(HELLO_SHA)
    assert os.listdir(store.tmp_dir) == []


def test_put_file_and_expected_hash(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    assert store.put_file(f) == HELLO_SHA
    with pytest.raises(ObjectMismatch):
        store.put_bytes(b"other", expected_sha256="00" * 32)


def _store_hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "store-hash"]


@pytest.mark.parametrize("size", [5, THREADED_HASH_MIN + 12345], ids=["inline-hash", "threaded-hash"])
def test_objects_small_and_large_are_hashed_right_and_wrong_bytes_kept_nowhere(store: Store, tmp_path: Path,
                                                                               size: int) -> None:
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    wrong = data[:-1] + bytes([data[-1] ^ 1])  # the last byte: the hash is all that can tell
    for stream, reason in ((io.BytesIO(wrong), "sha256"), (io.BytesIO(data[:-1]), "short"),
                           (io.BytesIO(data + b"!"), "long")):  # fmt: skip
        with pytest.raises(ObjectMismatch) as ei:
            store.put_stream(stream, sha(data), size)
        assert ei.value.reason == reason
    assert list(store.iter_objects()) == [] and os.listdir(store.tmp_dir) == []
    assert _store_hash_threads() == []
    f = tmp_path / "f"
    f.write_bytes(data)
    assert store.put_file(f) == sha(data)
    assert store.path(sha(data)).read_bytes() == data
    assert _store_hash_threads() == []


def test_put_file_link_takes_the_file_itself(store: Store, tmp_path: Path) -> None:
    """link=True: the object is the caller's file (one inode, made read-only), nothing copied;
    a wrong expected hash keeps nothing in the store and leaves the file where it was."""
    f = tmp_path / "intermediate"
    f.write_bytes(b"hello")
    assert store.put_file(f, link=True, durable=False) == HELLO_SHA
    obj = store.path(HELLO_SHA)
    assert os.stat(obj).st_ino == os.stat(f).st_ino and stat.S_IMODE(os.stat(obj).st_mode) == 0o444
    assert store.read_bytes(HELLO_SHA) == b"hello" and store.verify().ok
    g = tmp_path / "other"
    g.write_bytes(b"other")
    with pytest.raises(ObjectMismatch):
        store.put_file(g, "00" * 32, link=True)
    assert not store.has(sha(b"other")) and g.read_bytes() == b"other"
    assert not [p for p in store.tmp_dir.iterdir() if p.name.endswith(".part")]


def test_put_file_link_copies_across_file_systems(store: Store, tmp_path: Path) -> None:
    """A file on another file system cannot be linked: it is copied, and stays writable."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the store")
    f = shm / f"reprobuild-test-{os.getpid()}"
    try:
        f.write_bytes(b"hello")
        assert store.put_file(f, link=True) == HELLO_SHA
        assert os.stat(store.path(HELLO_SHA)).st_ino != os.stat(f).st_ino
        assert stat.S_IMODE(os.stat(f).st_mode) & 0o200
    finally:
        f.unlink(missing_ok=True)


def test_put_of_present_object_does_not_read(store: Store) -> None:
    store.put_bytes(b"hello")
    src = Endless()
    store.put_stream(src, HELLO_SHA, 5)
    assert src.served == 0


def test_concurrent_puts_of_one_object(store: Store) -> None:
    data = os.urandom(300_000)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            store.put_bytes(data)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert list(store.iter_objects()) == [sha(data)]
    assert store.verify().ok


# ---------------------------------------------------------------------------- temporaries


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True)
    return int(p.stdout)


def test_clean_tmp_removes_only_dead_writers(store: Store) -> None:
    dead = store.tmp_dir / f"abcd.{dead_pid()}.0011223344556677.part"
    dead.write_bytes(b"partial")
    fd, live = store._new_tmp("live")  # held (flocked) by this live process
    try:
        os.utime(live, (0, 0))  # even an old live temporary is not touched
        assert store.clean_tmp() == 1
        assert not dead.exists() and live.exists()
        assert store.clean_tmp(grace=0) == 0
    finally:
        os.close(fd)
    # Once its writer is gone (lock released) and it is old enough, it goes.
    assert store.clean_tmp(grace=0) == 1
    assert os.listdir(store.tmp_dir) == []


def test_young_unlocked_tmp_of_live_pid_is_kept(store: Store) -> None:
    # A writer between creating and locking its temporary: unlocked, young, live pid.
    p = store.tmp_dir / f"abcd.{os.getpid()}.0011223344556677.part"
    p.write_bytes(b"")
    assert store.clean_tmp() == 0
    assert store.clean_tmp(grace=0) == 1


# ---------------------------------------------------------------------------- verify


def test_verify_quarantines_corrupt_and_stray(store: Store) -> None:
    good = store.put_bytes(b"good")
    bad = store.put_bytes(b"hello")
    p = store.path(bad)
    p.chmod(0o644)
    p.write_bytes(b"rotten")
    stray = store.objects_dir / "2c" / "notes.txt"
    stray.write_text("x")
    report = store.verify()
    assert not report.ok
    assert report.checked == 2
    reasons = {c.name: c.reason for c in report.corrupt}
    assert reasons[object_relpath(bad)] == f"content hashes to {sha(b'rotten')}"
    assert reasons["objects/sha256/2c/notes.txt"] == "not an object name"
    assert not store.has(bad) and store.has(good) and not stray.exists()
    assert (store.quarantine_dir / bad).read_bytes() == b"rotten"
    assert store.verify().ok  # the bad ones are gone from the address space


# ---------------------------------------------------------------------------- gc


def test_gc_roots_registered_roots_and_keys(store: Store) -> None:
    a, b, c, d, e = (store.put_bytes(x) for x in (b"a", b"b", b"c", b"d", b"e"))
    store.register_root("build-1", [b])
    store.set_key("indices", "http://example.invalid/Packages", c)
    assert store.get_key("indices", "http://example.invalid/Packages") == c
    assert store.roots() == {"build-1": frozenset({b})}

    dry = store.gc({a}, dry_run=True)
    assert dry.dry_run and sorted(dry.removed) == sorted([d, e]) and dry.freed_bytes == 2
    assert store.has(d) and store.has(e)

    report = store.gc({a})
    assert sorted(report.removed) == sorted([d, e]) and report.kept == 3
    assert {x for x in (a, b, c, d, e) if store.has(x)} == {a, b, c}

    store.unregister_root("build-1")
    store.delete_key("indices", "http://example.invalid/Packages")
    assert store.gc().kept == 0
    assert list(store.iter_objects()) == []


def test_gc_root_names_and_unreadable_roots(store: Store) -> None:
    with pytest.raises(StoreError):
        store.register_root("../evil", [])
    (store.roots_dir / "broken.json").write_text("{")
    with pytest.raises(StoreError, match="unreadable"):
        store.gc()


def test_gc_waits_for_users(store: Store) -> None:
    with store.in_use():
        with pytest.raises(StoreError, match="in use"), store.exclusive(blocking=False):
            pass
        with store.in_use():  # shared with other users
            pass
    with store.exclusive(blocking=False):
        pass


# ---------------------------------------------------------------------------- bundles


def fill(store: Store, n: int = 5) -> list[str]:
    return [store.put_bytes(os.urandom(1000 * (i + 1))) for i in range(n)]


def test_bundle_round_trip_is_deterministic(tmp_path: Path, store: Store) -> None:
    shas = fill(store)
    r1 = store.export_bundle(shas, tmp_path / "one.tar.zst")
    assert r1.objects == 5 and r1.bytes == sum(1000 * (i + 1) for i in range(5))
    # Another store, objects added in another order at another time: the same bytes.
    other = Store(tmp_path / "other")
    for s in reversed(shas):
        other.put_bytes(store.read_bytes(s))
    other.export_bundle(list(reversed(shas)) + shas[:1], tmp_path / "two.tar.zst")
    assert (tmp_path / "one.tar.zst").read_bytes() == (tmp_path / "two.tar.zst").read_bytes()

    empty = Store(tmp_path / "empty")
    rep = empty.import_bundle(tmp_path / "one.tar.zst")
    assert sorted(rep.added) == sorted(shas) and rep.already_present == ()
    assert sorted(empty.iter_objects()) == sorted(shas) and empty.verify().ok
    assert empty.import_bundle(tmp_path / "one.tar.zst").added == ()


def test_bundle_members_have_fixed_metadata(tmp_path: Path, store: Store) -> None:
    shas = fill(store, 2)
    store.export_bundle(shas, tmp_path / "b")
    with open(tmp_path / "b", "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as z, \
            tarfile.open(fileobj=z, mode="r|") as t:
        members = [(m.name, m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname) for m in t]
    assert members[0][0] == "reprobuild-bundle.json"
    assert [m[0] for m in members[1:]] == [object_relpath(s) for s in sorted(shas)]
    assert {m[1:] for m in members} == {(0o444, 0, 0, 0, "", "")}


def test_export_of_missing_object(tmp_path: Path, store: Store) -> None:
    with pytest.raises(StoreError, match="not in the store"):
        store.export_bundle(["00" * 32], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def hostile_bundle(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], manifest: object | None) -> None:
    with open(path, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z, \
            tarfile.open(fileobj=z, mode="w|", format=tarfile.USTAR_FORMAT) as t:
        if manifest is not None:
            data = json.dumps(manifest).encode()
            t.addfile(_tarinfo("reprobuild-bundle.json", len(data)), io.BytesIO(data))
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data))


def manifest_for(*pairs: tuple[str, int]) -> dict[str, object]:
    return {"format": 1, "objects": [{"sha256": s, "size": n} for s, n in pairs]}


def test_import_refuses_corrupt_member(tmp_path: Path, store: Store) -> None:
    good = b"good bytes"
    bundle = tmp_path / "b"
    hostile_bundle(bundle, [(_tarinfo(object_relpath(sha(good)), 10), good),
                            (_tarinfo(object_relpath(HELLO_SHA), 5), b"hellO")],
                   manifest_for((sha(good), 10), (HELLO_SHA, 5)))
    with pytest.raises(FormatError, match="corrupt"):
        store.import_bundle(bundle)
    assert list(store.iter_objects()) == [sha(good)]  # verified independently, so kept
    assert os.listdir(store.tmp_dir) == []


def symlink_member() -> tarfile.TarInfo:
    ti = _tarinfo(object_relpath(HELLO_SHA), 0)
    ti.type = tarfile.SYMTYPE
    ti.linkname = "/etc/passwd"
    return ti


@pytest.mark.parametrize("member", [
    _tarinfo("../" + HELLO_SHA, 5),
    _tarinfo(f"objects/sha256/00/{HELLO_SHA}", 5),
    _tarinfo("etc/passwd", 5),
    symlink_member(),
], ids=["traversal", "wrong-fanout", "odd-name", "symlink"])
def test_import_refuses_hostile_members(tmp_path: Path, store: Store, member: tarfile.TarInfo) -> None:
    bundle = tmp_path / "b"
    hostile_bundle(bundle, [(member, b"hello" if member.isreg() else b"")], manifest_for((HELLO_SHA, 5)))
    with pytest.raises(FormatError):
        store.import_bundle(bundle)
    assert list(store.iter_objects()) == []


def test_import_refuses_truncated_or_foreign(tmp_path: Path, store: Store) -> None:
    shas = fill(store, 3)
    good = tmp_path / "good"
    store.export_bundle(shas, good)
    data = good.read_bytes()
    empty = Store(tmp_path / "empty")
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        empty.import_bundle(tmp_path / "cut")
    (tmp_path / "junk").write_bytes(b"not a bundle at all")
    with pytest.raises(FormatError):
        empty.import_bundle(tmp_path / "junk")
    # Manifest lists an object the bundle lacks.
    hostile_bundle(tmp_path / "short", [], manifest_for((HELLO_SHA, 5)))
    with pytest.raises(FormatError, match="truncated"):
        empty.import_bundle(tmp_path / "short")
    hostile_bundle(tmp_path / "nomanifest", [(_tarinfo(object_relpath(HELLO_SHA), 5), b"hello")], None)
    with pytest.raises(FormatError, match="no reprobuild-bundle.json"):
        empty.import_bundle(tmp_path / "nomanifest")


# ---------------------------------------------------------------------------- stats & CLI


def test_stats(store: Store) -> None:
    fill(store, 3)
    store.register_root("r", [])
    st = store.stats()
    assert (st.objects, st.bytes, st.roots, st.temporaries, st.trees) == (3, 6000, 1, 0, 0)
    assert st.trees_bytes == st.indices_bytes == 0 and st.disk_bytes >= 6000


def test_stats_count_trees_and_indices_on_disk(store: Store) -> None:
    """Everything the store holds is counted: extracted trees (hard links once) and the index cache."""
    sha = fill(store, 1)[0]
    tmp = store.new_tmp_dir("tree")
    (tmp / "big").write_bytes(b"t" * 300_000)
    os.link(tmp / "big", tmp / "same")
    store.publish_tree(tmp, sha)
    (store.root / "indices").mkdir()
    (store.root / "indices" / "Packages").write_bytes(b"i" * 200_000)
    st = store.stats()
    assert 300_000 <= st.trees_bytes < 400_000  # the hard link is not counted twice
    assert 200_000 <= st.indices_bytes < 300_000
    assert st.disk_bytes >= st.trees_bytes + st.indices_bytes + 2000
    _, out = run_cli("store", "stats", "--store", str(store.root))
    from reprobuild.progress import format_bytes

    assert f"extracted tree(s) of the build cache {format_bytes(st.trees_bytes)}" in out
    assert f"repository indices {format_bytes(st.indices_bytes)}" in out and "on disk in all" in out


def test_extracted_trees_publish_race_and_removal(store: Store) -> None:
    sha = fill(store, 1)[0]
    first, second = store.new_tmp_dir("tree"), store.new_tmp_dir("tree")
    (first / "a").write_text("1")
    (second / "a").write_text("1")
    final = store.publish_tree(first, sha)
    assert final == store.tree_path(sha) and (final / "a").read_text() == "1"
    assert store.publish_tree(second, sha) == final and not second.exists()  # the racer's copy goes
    assert oct(store.trees_dir.stat().st_mode & 0o777) == "0o700"  # trees hold setuid programs
    assert store.stats().trees == 1 and list(store.iter_trees()) == [sha]
    assert store.remove_tree(sha) and not final.exists() and not store.remove_tree(sha)
    assert not any(store.tmp_dir.iterdir())


def test_gc_removes_tmp_dirs_of_dead_processes_only(store: Store) -> None:
    live = store.new_tmp_dir("tree")
    dead = store.tmp_dir / "tree.999999999.0123456789abcdef.d"
    dead.mkdir()
    store.gc()
    assert live.is_dir() and not dead.exists()


def test_a_killed_but_unreaped_build_counts_as_dead(store: Store, tmp_path: Path) -> None:
    """A build killed with SIGKILL stays a zombie until its parent (often PID 1 of a container,
    which may be slow or never reap) collects it: its work directory and scratch are still removed,
    while those of a process that runs are kept."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    try:
        for _ in range(500):  # until the child has exited (a zombie: not reaped yet)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        out = tmp_path / "out"
        zombie_work = out / f".reprobuild-work-{pid}-0123456789ab"
        live_work = out / f".reprobuild-work-{os.getpid()}-0123456789ab"
        for d in (zombie_work / "tree/etc", live_work / "tree"):
            d.mkdir(parents=True)
        scratch = store.tmp_dir / f"work.{pid}.0123456789abcdef.d"
        scratch.mkdir()
        (scratch / "work-dir").write_bytes(os.fsencode(zombie_work))
        assert store.clean_scratch() == 2
        assert not scratch.exists() and not zombie_work.exists() and live_work.is_dir()
    finally:
        os.waitpid(pid, 0)


def run_cli(*args: str) -> tuple[int, str]:
    from reprobuild.cli import _register_commands, cli

    _register_commands()
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False, standalone_mode=False)
    code = r.return_value if isinstance(r.return_value, int) else r.exit_code
    return code, r.output


def test_cli_store_commands(store: Store) -> None:
    from reprobuild.errors import StoreError as Err

    shas = fill(store, 2)
    root = str(store.root)
    assert run_cli("store", "path", "--store", root)[1].strip() == root
    _, out = run_cli("store", "stats", "--store", root, "--json")
    assert json.loads(out)["objects"] == 2
    _, out = run_cli("store", "verify", "--store", root, "--json")
    assert json.loads(out)["ok"] is True
    _, out = run_cli("store", "gc", "--store", root, "--dry-run", "--json")
    assert sorted(json.loads(out)["removed"]) == sorted(shas) and store.has(shas[0])
    p = store.path(shas[0])
    p.chmod(0o644)
    p.write_bytes(b"x")
    with pytest.raises(Err, match="1 corrupt object"):
        run_cli("store", "verify", "--store", root)


def test_cli_via_main_exit_codes(store: Store) -> None:
    """The real entry point: verify exits 1 when it found corruption."""
    p = store.path(store.put_bytes(b"hello"))
    env = dict(os.environ, REPROBUILD_STORE=str(store.root))
    ok = subprocess.run([sys.executable, "-m", "reprobuild", "store", "verify"], env=env,
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    p.chmod(0o644)
    p.write_bytes(b"x")
    bad = subprocess.run([sys.executable, "-m", "reprobuild", "store", "verify"], env=env,
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "corrupt" in bad.stdout and "1 corrupt object(s) found" in bad.stderr


def test_gc_dry_run_says_what_each_object_is(store: Store, tmp_path: Path) -> None:
    """Not bare hashes: a package by name and version, a cache entry by its stage, else the format."""
    from tests.test_deb import dpkg_deb_build

    deb = store.put_file(dpkg_deb_build(tmp_path, "libdemo"))
    blob = store.put_bytes(b"no format at all")
    cached = store.put_bytes(b"an initrd")
    (store.root / "cache" / "initrd").mkdir(parents=True)
    (store.root / "cache" / "initrd" / ("0" * 64 + ".json")).write_text(json.dumps({"object": cached, "meta": {}}))
    output = store.put_bytes(b"a tar output")
    (store.root / "cache" / "tar").mkdir(parents=True)
    (store.root / "cache" / "tar" / ("1" * 64 + ".json")).write_text(
        json.dumps({"object": output, "meta": {"definition": "demo", "added_files": []}}))
    _, out = run_cli("store", "gc", "--store", str(store.root), "--dry-run")
    lines = {ln.split()[2][7:23]: ln for ln in out.splitlines() if ln.startswith("would remove sha256:")}
    assert "package libdemo 1.0 " in lines[deb[:16]]
    assert lines[cached[:16]].endswith("initrd (build cache)")
    assert lines[output[:16]].endswith("image.tar of demo (build output)")
    assert lines[blob[:16]].endswith("data, 16 B")
    _, out = run_cli("store", "gc", "--store", str(store.root), "--dry-run", "--json")
    assert json.loads(out)["objects"][deb].startswith("package libdemo 1.0 ")
    assert store.has(deb) and store.has(cached)


def test_verify_reports_progress_per_object(store: Store) -> None:
    from reprobuild.progress import Update

    fill(store, 3)
    said: list[str] = []
    assert store.verify(said.append).ok
    updates = [m for m in said if isinstance(m, Update)]
    assert {u.stage for u in updates} == {"hashing objects"} and all(u.total == 3 for u in updates)
    assert [u.done for u in updates] == [1, 2, 3, 3] and updates[-1].final
