"""Session-wide hermetic apt repository and a local HTTP server for it, with fault injection.

Registered in tests/conftest.py: any test module uses them as parameters, without importing.

``fixture_repo`` is a :class:`fixtures.make_repo.FixtureRepo` built once per session from
``DEFAULT_SUITES``. ``repo_server`` serves it on ``127.0.0.1`` (port chosen by the kernel)::

    repo_server.url       "http://127.0.0.1:PORT" (the archive root: dists/ and pool/ below it)
    repo_server.root      the directory served
    repo_server.keyring   binary keyring gpgv verifies the fixture's signatures with
    repo_server.faults    dict: URL path ("/dists/stable/InRelease") -> behaviour
    repo_server.requests  list of URL paths requested, in order (thread-safe appends)
    repo_server.reset()   clear faults and the request log
    with repo_server.fault(path, behaviour): …   set a fault for the block only

Behaviours: ``"404"``; ``"500"``; ``"corrupt"`` (same length, bytes flipped); ``"truncate"``
(announces the full Content-Length, sends half, closes); ``"stall"`` (sends headers, then
nothing for ``stall_seconds``, default 3 s, then closes); ``"endless"`` (no Content-Length,
streams zeros until ``endless_limit`` bytes, default 64 MiB, then closes). Stall and endless are
bounded so a client bug shows up as a failed assertion, never as a hung test run.

The server is shared by the whole session: tests that set faults must undo them (use
``fault()`` or call ``reset()``), and must not assume an empty request log without ``reset()``.
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from fixtures.make_repo import FixtureRepo, make_repo

FAULTS = ("404", "500", "corrupt", "truncate", "stall", "endless")


@dataclass
class RepoServer:
    url: str
    root: Path
    keyring: Path
    repo: FixtureRepo
    faults: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    stall_seconds: float = 3.0
    endless_limit: int = 64 << 20
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()

    @contextlib.contextmanager
    def fault(self, path: str, behaviour: str) -> Iterator[None]:
        if behaviour not in FAULTS:
            raise ValueError(f"unknown fault {behaviour!r}; known: {FAULTS}")
        path = _norm(path)
        self.faults[path] = behaviour
        try:
            yield
        finally:
            self.faults.pop(path, None)

    def requested(self, needle: str) -> list[str]:
        """Logged request paths containing ``needle``."""
        with self.lock:
            return [p for p in self.requests if needle in p]


def _norm(path: str) -> str:
    return "/" + path.lstrip("/")


def _handler(server_state: RepoServer) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(server_state.root), **kwargs)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean; the request log is server_state.requests

        def do_GET(self) -> None:
            path = _norm(unquote(urlsplit(self.path).path))
            with server_state.lock:
                server_state.requests.append(path)
            behaviour = server_state.faults.get(path)
            if behaviour is None:
                super().do_GET()
                return
            getattr(self, "_fault_" + behaviour)(path)

        def _file_bytes(self, path: str) -> bytes | None:
            target = (server_state.root / path.lstrip("/")).resolve()
            if server_state.root.resolve() not in target.parents or not target.is_file():
                return None
            return target.read_bytes()

        def _headers(self, status: int, length: int | None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

        def _fault_404(self, path: str) -> None:
            self.send_error(404, "fault injected")

        def _fault_500(self, path: str) -> None:
            self.send_error(500, "fault injected")

        def _fault_corrupt(self, path: str) -> None:
            data = self._file_bytes(path)
            if data is None:
                self.send_error(404)
                return
            flipped = bytes(b ^ 0x5A for b in data[: len(data) // 2 + 1]) + data[len(data) // 2 + 1 :]
            self._headers(200, len(flipped))
            self.wfile.write(flipped)

        def _fault_truncate(self, path: str) -> None:
            data = self._file_bytes(path)
            if data is None:
                self.send_error(404)
                return
            self._headers(200, len(data))
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _fault_stall(self, path: str) -> None:
            self._headers(200, 1 << 20)
            self.wfile.flush()
            deadline = time.monotonic() + server_state.stall_seconds
            while time.monotonic() < deadline:
                time.sleep(0.05)

        def _fault_endless(self, path: str) -> None:
            self._headers(200, None)
            chunk = b"\0" * (1 << 16)
            sent = 0
            with contextlib.suppress(OSError):  # the client hanging up early is the expected outcome
                while sent < server_state.endless_limit:
                    self.wfile.write(chunk)
                    sent += len(chunk)

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-response (a fetch that stops at a local write error) is not
        # a server fault; anything else is still printed.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="session")
def fixture_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FixtureRepo]:
    """The default fixture repository (``fixtures.make_repo.DEFAULT_SUITES``), built once."""
    base = tmp_path_factory.mktemp("fixture-repo")
    repo = make_repo(base / "repo", gnupg_home=base / "gnupg")
    yield repo
    shutil.rmtree(base / "gnupg", ignore_errors=True)


@pytest.fixture(scope="session")
def repo_server(fixture_repo: FixtureRepo) -> Iterator[RepoServer]:
    """An HTTP server for ``fixture_repo`` on 127.0.0.1 with fault injection (see module doc)."""
    state = RepoServer(url="", root=fixture_repo.root, keyring=fixture_repo.keyring_path, repo=fixture_repo)
    httpd = _Server(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="repo-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
