"""fetch_all against a hermetic fault-injecting HTTP server on 127.0.0.1.

Every fault is bounded in time and bytes so that a fetcher bug fails a test instead of hanging.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reprobuild.fetch import (
    FetchConfig,
    FetchFailed,
    FetchItem,
    ObjectsMissing,
    candidate_urls,
    fetch_all,
    make_session,
    substituter_url,
)
from reprobuild.progress import PlainProgress
from reprobuild.store import Store

# Short timeouts: a stalled server is abandoned in half a second, retried once.
FAST = FetchConfig(retries=1, backoff=0.01, backoff_max=0.05, connect_timeout=2.0, read_timeout=0.5,
                   deadline_base=3.0, min_rate=10e6)
STALL_SECONDS = 4.0  # how long a "stall" fault holds a connection before giving up
ENDLESS_LIMIT = 256 << 20  # an "endless" response stops here at the latest


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class FaultServer:
    """Serves ``files`` (path -> bytes); ``faults`` (path -> mode) breaks some of them.

    Modes: 404, 500-once, corrupt (one byte flipped), truncate (half, no Content-Length),
    short-cl (announces all, sends half), wrong-cl (announces one byte more), stall (a few
    bytes then silence), endless (data without end), dribble (one byte per 50 ms),
    throttle (16 KiB per 10 ms)."""

    base: str
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    hits: collections.Counter = field(default_factory=collections.Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, name: str, data: bytes, path: str | None = None) -> FetchItem:
        path = path or f"/pool/{name}.deb"
        self.files[path] = data
        return FetchItem(name, hashlib.sha256(data).hexdigest(), len(data), (self.base + path,))


def _handler(fs: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _head(self, code: int, length: int | None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            if length is None:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def do_GET(self) -> None:
            fs.hits[self.path] += 1
            mode = fs.faults.get(self.path)
            body = fs.files.get(self.path)
            if body is None or mode == "404":
                self._head(404, 0)
                return
            if mode == "500-once" and fs.hits[self.path] == 1:
                self._head(500, 0)
                return
            try:
                self._serve(mode, body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _serve(self, mode: str | None, body: bytes) -> None:
            w = self.wfile
            if mode == "corrupt":
                body = bytes([body[0] ^ 1]) + body[1:]
            if mode == "truncate":
                self._head(200, None)
                w.write(body[: len(body) // 2])
            elif mode == "short-cl":
                self._head(200, len(body))
                w.write(body[: len(body) // 2])
                self.close_connection = True
            elif mode == "wrong-cl":
                self._head(200, len(body) + 1)
                w.write(body + b"x")
            elif mode == "stall":
                self._head(200, len(body))
                w.write(body[:10])
                w.flush()
                fs.stop.wait(STALL_SECONDS)
                self.close_connection = True
            elif mode == "endless":
                self._head(200, None)
                chunk, sent = b"\0" * 65536, 0
                while not fs.stop.is_set() and sent < ENDLESS_LIMIT:
                    w.write(chunk)
                    sent += len(chunk)
            elif mode == "dribble":
                self._head(200, len(body))
                for i in range(len(body)):
                    if fs.stop.wait(0.05):
                        break
                    w.write(body[i : i + 1])
                    w.flush()
                self.close_connection = True
            elif mode == "labelled-gzip":  # a .gz file wrongly served as gzip-encoded
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                w.write(body)
            elif mode == "throttle":
                self._head(200, len(body))
                for i in range(0, len(body), 16384):
                    if fs.stop.wait(0.01):
                        break
                    w.write(body[i : i + 16384])
                    w.flush()
            else:
                self._head(200, len(body))
                w.write(body)

    return Handler


@pytest.fixture
def server() -> Iterator[FaultServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    httpd.daemon_threads = True
    fs = FaultServer(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.RequestHandlerClass = _handler(fs)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield fs
    fs.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_store_clean(store: Store, expected: set[str]) -> None:
    """The store holds exactly the expected objects, each correct, and no temporaries."""
    assert set(store.iter_objects()) == expected
    assert store.verify().ok
    assert os.listdir(store.tmp_dir) == []


# ---------------------------------------------------------------------------- happy paths


def test_fetch_all_downloads_verifies_and_reports(server: FaultServer, store: Store) -> None:
    items = [server.add(f"pkg{i}", blob(i, 1000 + 50_000 * i)) for i in range(6)]
    report = fetch_all(store, items, jobs=3, config=FAST)
    assert {i.sha256 for i, _ in report.fetched} == {i.sha256 for i in items}
    assert report.bytes_downloaded == sum(i.size for i in items)
    assert report.present == ()
    for it in items:
        assert store.read_bytes(it.sha256) == server.files[it.urls[0].removeprefix(server.base)]
    assert_store_clean(store, {i.sha256 for i in items})


def test_second_fetch_touches_no_network(server: FaultServer, store: Store) -> None:
    items = [server.add(f"pkg{i}", blob(i, 5000)) for i in range(3)]
    fetch_all(store, items, config=FAST)
    hits = sum(server.hits.values())
    report = fetch_all(store, items, config=FAST)
    assert sum(server.hits.values()) == hits
    assert report.fetched == () and len(report.present) == 3


def test_same_object_under_two_names_is_fetched_once(server: FaultServer, store: Store) -> None:
    data = blob(7, 3000)
    a = server.add("a", data)
    b = server.add("b", data, path="/other/b.deb")
    report = fetch_all(store, [a, b], config=FAST)
    assert len(report.fetched) == 1
    assert sum(server.hits.values()) == 1


def test_plain_progress_lines(server: FaultServer, store: Store) -> None:
    import io

    items = [server.add(f"pkg{i}", blob(i, 2000)) for i in range(2)]
    out = io.StringIO()
    fetch_all(store, items, config=FAST, progress=PlainProgress(out))
    lines = out.getvalue().splitlines()
    # A log gets a start line and a summary (no line per package), sizes and rate in binary units.
    assert len(lines) == 2, lines
    assert lines[0] == "fetch: 2 packages, 3.9 KiB …"
    assert lines[1].startswith("fetch: 2/2 packages, 3.9 KiB, ") and "KiB/s (" in lines[1]


# ---------------------------------------------------------------------------- faults


FAULTS = {
    "corrupt": "wrong content: sha256 mismatch",
    "truncate": "sent only",
    "404": "HTTP 404",
    "stall": "stalled: no data for 0.5 s",
    "endless": "more than the expected",
    "wrong-cl": "server announces",
    "short-cl": "connection broken",
    "dribble": "too slow",
}


def test_each_fault_is_refused_with_a_clear_error(server: FaultServer, store: Store) -> None:
    good = [server.add(f"good{i}", blob(100 + i, 70_000)) for i in range(3)]
    bad = {}
    for k, mode in enumerate(FAULTS):
        it = server.add(f"bad-{mode}", blob(200 + k, 300_000 if mode == "dribble" else 90_000))
        server.faults[it.urls[0].removeprefix(server.base)] = mode
        bad[it.name] = (it, mode)
    t0 = time.monotonic()
    with pytest.raises(FetchFailed) as ei:
        fetch_all(store, good + [b for b, _ in bad.values()], jobs=4, config=FAST)
    elapsed = time.monotonic() - t0
    err = ei.value
    assert {f.item.name for f in err.failures} == set(bad)
    for f in err.failures:
        mode = bad[f.item.name][1]
        assert f.attempts, f
        assert all(a.url == f.item.urls[0] for a in f.attempts)
        assert FAULTS[mode] in f.attempts[0].outcome, (mode, f.attempts)
        # Only transient failures are retried.
        assert len(f.attempts) == (2 if mode in ("stall", "short-cl", "dribble") else 1), (mode, f.attempts)
    message = err.format_message()
    for name in bad:
        assert name in message
    assert "lock --update" in message  # the 404 earns the hint
    # Everything fetchable was kept; nothing wrong is visible.
    assert {i.sha256 for i, _ in err.report.fetched} == {g.sha256 for g in good}
    assert_store_clean(store, {g.sha256 for g in good})
    assert elapsed < 30


def test_endless_response_is_not_read_to_its_end(server: FaultServer, store: Store) -> None:
    it = server.add("endless", blob(1, 1000))
    server.faults["/pool/endless.deb"] = "endless"
    with pytest.raises(FetchFailed):
        fetch_all(store, [it], config=FAST)
    assert_store_clean(store, set())


def test_no_hint_without_404(server: FaultServer, store: Store) -> None:
    it = server.add("x", blob(1, 1000))
    server.faults["/pool/x.deb"] = "corrupt"
    with pytest.raises(FetchFailed) as ei:
        fetch_all(store, [it], config=FAST)
    assert ei.value.hint is None


def test_falls_back_to_next_url_in_order(server: FaultServer, store: Store) -> None:
    data = blob(3, 4000)
    it = server.add("p", data)
    server.files["/mirror2/p.deb"] = data
    server.faults["/pool/p.deb"] = "corrupt"
    it = FetchItem("p", it.sha256, it.size, (it.urls[0], server.base + "/mirror2/p.deb"))
    report = fetch_all(store, [it], config=FAST)
    assert report.fetched[0][1] == server.base + "/mirror2/p.deb"
    assert_store_clean(store, {it.sha256})


def test_transfer_encoding_label_is_not_decoded(server: FaultServer, store: Store) -> None:
    import gzip

    it = server.add("Packages.gz", gzip.compress(blob(5, 20_000), mtime=0))
    server.faults["/pool/Packages.gz.deb"] = "labelled-gzip"
    fetch_all(store, [it], config=FAST)
    assert store.read_bytes(it.sha256)[:2] == b"\x1f\x8b"


def test_transient_500_is_retried(server: FaultServer, store: Store) -> None:
    it = server.add("p", blob(4, 4000))
    server.faults["/pool/p.deb"] = "500-once"
    fetch_all(store, [it], config=FAST)
    assert server.hits["/pool/p.deb"] == 2
    assert store.has(it.sha256)


def test_unreachable_mirror_then_second_url(server: FaultServer, store: Store) -> None:
    dead = closed_port_url()
    items = []
    for i in range(5):
        good = server.add(f"p{i}", blob(i, 2000))
        items.append(FetchItem(good.name, good.sha256, good.size, (f"{dead}/pool/p{i}.deb",) + good.urls))
    report = fetch_all(store, items, jobs=1, config=FAST)
    assert all(url.startswith(server.base) for _, url in report.fetched)
    assert len(report.fetched) == 5


def test_all_urls_dead_names_each_url(store: Store) -> None:
    dead = closed_port_url()
    data = blob(1, 100)
    it = FetchItem("gone", hashlib.sha256(data).hexdigest(), 100, (f"{dead}/a.deb", f"{dead}/b.deb"))
    with pytest.raises(FetchFailed) as ei:
        fetch_all(store, [it], substituters=[dead + "/cache"], config=FAST)
    msg = ei.value.format_message()
    assert f"{dead}/a.deb: connection refused" in msg
    assert f"{dead}/b.deb: connection refused" in msg
    assert substituter_url(dead + "/cache", it.sha256) + ": connection refused" in msg


def test_item_without_any_source(store: Store) -> None:
    data = b"x"
    it = FetchItem("orphan", hashlib.sha256(data).hexdigest(), 1)
    with pytest.raises(FetchFailed, match="no URL and no substituter"):
        fetch_all(store, [it], config=FAST)


def test_candidate_urls_order() -> None:
    sha = "ab" * 32
    it = FetchItem("p", sha, 1, ("http://m/a", "http://m/b", "http://m/a"))
    assert candidate_urls(it, ["http://c1/", "http://c2/x"]) == (
        "http://m/a", "http://m/b", f"http://c1/objects/sha256/ab/{sha}", f"http://c2/x/objects/sha256/ab/{sha}")


def test_conflicting_sizes_for_one_hash_are_refused(store: Store) -> None:
    from reprobuild.errors import FetchError

    sha = "cd" * 32
    with pytest.raises(FetchError, match="sizes 1 and 2"):
        fetch_all(store, [FetchItem("a", sha, 1), FetchItem("b", sha, 2)], offline=True)


# ---------------------------------------------------------------------------- offline


def test_offline_lists_what_is_missing(server: FaultServer, store: Store) -> None:
    items = [server.add(f"pkg{i}", blob(i, 1000)) for i in range(3)]
    fetch_all(store, items[:1], config=FAST)
    with pytest.raises(ObjectsMissing) as ei:
        fetch_all(store, items, offline=True)
    assert [i.name for i in ei.value.missing] == ["pkg1", "pkg2"]
    assert "pkg1" in ei.value.format_message() and "pkg0" not in ei.value.message
    hits = sum(server.hits.values())
    report = fetch_all(store, items[:1], offline=True)
    assert len(report.present) == 1 and sum(server.hits.values()) == hits


# ---------------------------------------------------------------------------- processes

CHILD = """
import json, sys
from reprobuild.fetch import FetchConfig, FetchItem, fetch_all
from reprobuild.store import Store
args = json.loads(sys.argv[1])
items = [FetchItem(i["name"], i["sha256"], i["size"], tuple(i["urls"])) for i in args["items"]]
r = fetch_all(Store(args["store"]), items, jobs=3, config=FetchConfig(read_timeout=5, retries=0))
print(json.dumps({"fetched": len(r.fetched), "present": len(r.present)}))
"""


def spawn_fetch(store: Store, items: list[FetchItem]) -> subprocess.Popen[str]:
    arg = json.dumps({"store": str(store.root), "items": [
        {"name": i.name, "sha256": i.sha256, "size": i.size, "urls": list(i.urls)} for i in items]})
    return subprocess.Popen([sys.executable, "-c", CHILD, arg], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_fetching_one_lock(server: FaultServer, store: Store) -> None:
    items = [server.add(f"pkg{i}", blob(i, 200_000)) for i in range(8)]
    for it in items:  # slow enough that the two processes overlap
        server.faults[it.urls[0].removeprefix(server.base)] = "throttle"
    a, b = spawn_fetch(store, items), spawn_fetch(store, items)
    results = []
    for p in (a, b):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    # Between them they fetched every object exactly once: the per-object lock made the
    # loser of each race wait and then find the object present.
    assert sum(r["fetched"] for r in results) == len(items)
    assert sum(r["present"] for r in results) == len(items)
    assert all(n == 1 for n in server.hits.values()), server.hits
    assert_store_clean(store, {i.sha256 for i in items})


def test_kill_9_mid_download_leaves_nothing_usable(server: FaultServer, store: Store) -> None:
    it = server.add("big", blob(9, 8 << 20))
    server.faults["/pool/big.deb"] = "throttle"  # 16 KiB per 10 ms: ~5 s, time enough to kill it
    child = spawn_fetch(store, [it])
    deadline = time.monotonic() + 20
    partial = None
    while time.monotonic() < deadline:
        parts = [p for p in store.tmp_dir.iterdir() if p.stat().st_size > 0]
        if parts:
            partial = parts[0]
            break
        time.sleep(0.05)
    assert partial is not None, "the child never started writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert not store.has(it.sha256)
    assert partial.exists()  # the leftover is there, but not under any address
    del server.faults["/pool/big.deb"]
    report = fetch_all(store, [it], config=FAST)  # cleans the dead writer's temporary first
    assert len(report.fetched) == 1
    assert_store_clean(store, {it.sha256})


def test_session_is_pooled() -> None:
    s = make_session(8)
    adapter = s.get_adapter("http://127.0.0.1/")
    assert adapter._pool_maxsize == 8
    assert s.headers["Accept-Encoding"] == "identity"


def test_bundle_lets_an_offline_machine_fetch(server: FaultServer, store: Store, tmp_path: Path) -> None:
    """Export on a connected machine, import on an empty one, then fetch --offline succeeds."""
    items = [server.add(f"pkg{i}", blob(i, 10_000 * (i + 1))) for i in range(4)]
    fetch_all(store, items, config=FAST)
    bundle = tmp_path / "lock.bundle"
    store.export_bundle([i.sha256 for i in items], bundle)
    offline = Store(tmp_path / "offline-store")
    with pytest.raises(ObjectsMissing):
        fetch_all(offline, items, offline=True)
    offline.import_bundle(bundle)
    hits = sum(server.hits.values())
    report = fetch_all(offline, items, offline=True)
    assert len(report.present) == 4 and sum(server.hits.values()) == hits
    assert_store_clean(offline, {i.sha256 for i in items})


# ---------------------------------------------------------------------------- progress & CLI


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_make_progress_chooses_by_terminal(server: FaultServer, store: Store) -> None:
    from reprobuild.progress import NullProgress, RichProgress, make_progress

    assert isinstance(make_progress(True, FakeTTY()), NullProgress)
    assert isinstance(make_progress(False, io.StringIO(), environ={}), PlainProgress)
    assert isinstance(make_progress(False, FakeTTY(), environ={"CI": "true"}), PlainProgress)
    tty = FakeTTY()
    rich = make_progress(False, tty, environ={})
    assert isinstance(rich, RichProgress)
    items = [server.add(f"pkg{i}", blob(i, 3000)) for i in range(3)]
    fetch_all(store, items, config=FAST, progress=rich)
    assert "3/3" in tty.getvalue()


@pytest.fixture
def fake_lock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[FetchItem]:
    """The lock side of the CLI contract, faked: load_spec, load_lock, Lock.all_packages, fetch_items."""
    import types

    import reprobuild.config
    import reprobuild.lockfile

    items: list[FetchItem] = []
    lock = types.SimpleNamespace(all_packages=lambda: list(items))
    spec = types.SimpleNamespace(lock_path=tmp_path / "reprobuild.lock",
                                 build=types.SimpleNamespace(substituters=()))
    (tmp_path / "reprobuild.lock").write_text("{}")
    monkeypatch.setattr(reprobuild.config, "load_spec", lambda directory, overrides=None: spec)
    monkeypatch.setattr(reprobuild.lockfile, "load_lock", lambda path: lock)
    import reprobuild.mirrors

    monkeypatch.setattr(reprobuild.mirrors, "fetch_items", lambda lock, mirrors: list(items))
    monkeypatch.setattr(reprobuild.mirrors, "mirrors_for_spec", lambda spec: None)
    return items


def cli(*args: str) -> str:
    from click.testing import CliRunner

    from reprobuild.cli import _register_commands
    from reprobuild.cli import cli as group

    _register_commands()
    r = CliRunner().invoke(group, list(args), catch_exceptions=False, standalone_mode=False)
    return r.stdout


def test_cli_fetch_gc_export_import(server: FaultServer, store: Store, tmp_path: Path,
                                    fake_lock: list[FetchItem]) -> None:
    fake_lock += [server.add(f"pkg{i}", blob(i, 5000)) for i in range(3)]
    root = str(store.root)
    with pytest.raises(ObjectsMissing):
        cli("fetch", "-C", str(tmp_path), "--store", root, "--offline")
    doc = json.loads(cli("fetch", "-C", str(tmp_path), "--store", root, "--json"))
    assert len(doc["fetched"]) == 3
    doc = json.loads(cli("fetch", "-C", str(tmp_path), "--store", root, "--json", "--offline"))
    assert len(doc["present"]) == 3
    extra = store.put_bytes(b"not in the lock")
    lock = str(tmp_path / "reprobuild.lock")
    doc = json.loads(cli("store", "gc", "--store", root, "--keep", lock, "--json"))
    assert doc["removed"] == [extra]
    cli("store", "export", "--store", root, lock, "-o", str(tmp_path / "b.tar.zst"), "-q")
    other = Store(tmp_path / "other")
    doc = json.loads(cli("store", "import", "--store", str(other.root), str(tmp_path / "b.tar.zst"), "--json"))
    assert len(doc["added"]) == 3
    assert json.loads(cli("fetch", "-C", str(tmp_path), "--store", str(other.root), "--offline", "--json"))


def test_many_failures_are_summarised(store: Store) -> None:
    dead = closed_port_url()
    items = [FetchItem(f"p{i:02}", hashlib.sha256(bytes([i])).hexdigest(), 1, (f"{dead}/p{i}",))
             for i in range(30)]
    with pytest.raises(FetchFailed) as ei:
        fetch_all(store, items, config=FAST, jobs=4)
    assert len(ei.value.failures) == 30
    msg = ei.value.format_message()
    assert "p24 " in msg and "p25 " not in msg and "… and 5 more" in msg
