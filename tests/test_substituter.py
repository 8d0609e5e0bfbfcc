"""A real web server (Debian's nginx) over another store's directory is a binary cache.

The test starts nginx on 127.0.0.1 with a configuration it writes itself (port chosen free,
``daemon off``, pid/log/temp paths in the test's tmp directory) and stops it afterwards.
nginx is a required test tool (CI installs nginx-light), so its absence fails, not skips.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reprobuild.fetch import FetchConfig, FetchFailed, FetchItem, fetch_all, substituter_url
from reprobuild.store import Store

FAST = FetchConfig(retries=1, backoff=0.01, connect_timeout=2.0, read_timeout=2.0, deadline_base=10.0)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /cache/ {{
            alias {root}/;
            autoindex off;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@pytest.fixture
def nginx_cache(tmp_path: Path) -> Iterator[tuple[Store, str]]:
    """(a populated store, the base URL nginx serves it under)."""
    if not os.path.exists(NGINX):
        pytest.fail("nginx is needed for this test: apt-get install nginx-light")
    source = Store(tmp_path / "cache-store")
    run = tmp_path / "nginx"
    run.mkdir()
    for _ in range(3):  # the free port may be taken between choosing and binding
        port = free_port()
        conf = run / "nginx.conf"
        # Started by root, nginx workers would switch to nobody, who cannot enter pytest's
        # 0700 tmp directories; as root keep them root (ignored when not root).
        conf.write_text(NGINX_CONF.format(tmp=run, port=port, root=source.root,
                                          user="user root root;" if os.geteuid() == 0 else ""))
        proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(run), "-e", str(run / "error.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if wait_listening(port, proc):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"nginx did not start: {(run / 'error.log').read_text(errors='replace')}")
    try:
        yield source, f"http://127.0.0.1:{port}/cache"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/debian"


def items_in(source: Store, n: int) -> list[FetchItem]:
    mirror = dead_url()  # the mirror is unreachable: only the substituter can help
    out = []
    for i in range(n):
        data = hashlib.sha512(str(i).encode()).digest() * (1000 * (i + 1))
        s = source.put_bytes(data)
        out.append(FetchItem(f"pkg{i}", s, len(data), (f"{mirror}/pool/pkg{i}.deb",)))
    return out


def test_empty_store_fills_from_nginx_substituter(tmp_path: Path, nginx_cache: tuple[Store, str]) -> None:
    source, base = nginx_cache
    items = items_in(source, 6)
    target = Store(tmp_path / "empty-store")
    report = fetch_all(target, items, [base], jobs=3, config=FAST)
    assert sorted(u for _, u in report.fetched) == sorted(substituter_url(base, i.sha256) for i in items)
    assert sorted(target.iter_objects()) == sorted(i.sha256 for i in items)
    assert target.verify().ok


def test_corrupt_object_served_by_substituter_is_refused(tmp_path: Path,
                                                         nginx_cache: tuple[Store, str]) -> None:
    source, base = nginx_cache
    items = items_in(source, 3)
    bad = items[1]
    p = source.path(bad.sha256)
    p.chmod(0o644)
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))  # same size, wrong bytes: only the hash can tell
    target = Store(tmp_path / "empty-store")
    with pytest.raises(FetchFailed) as ei:
        fetch_all(target, items, [base], config=FAST)
    (failure,) = ei.value.failures
    assert failure.item == bad
    outcomes = {a.url: a.outcome for a in failure.attempts}
    assert "connection refused" in outcomes[bad.urls[0]]
    assert "wrong content: sha256 mismatch" in outcomes[substituter_url(base, bad.sha256)]
    assert sorted(target.iter_objects()) == sorted(i.sha256 for i in items if i is not bad)
    assert target.verify().ok
