"""`reprobuild check`: variations really applied, bisection, and a deliberate leak caught.

The builds use tests/check_fixture.py: a one-package image (the host-made base .deb) built as a
tar in seconds, with no Debian mirror. The "store" variation downloads the package again from a
local HTTP server (the lock's URL). Building a root tree needs root (dpkg, namespaces).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from reprobuild.check import (
    VARIATIONS,
    _bisect,
    build_argv,
    check_reproducible,
    make_run,
    relocate_definition,
)
from reprobuild.config import load_spec
from tests.check_fixture import make_definition
from tests.test_verify import call_main

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="building a root tree needs root (dpkg, namespaces)")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def base_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_host_base(tmp_path_factory.mktemp("hostbase"))


def _definition(tmp_path: Path, served: tuple[str, Path], base_deb: Path, leak: bool) -> Path:
    url, root = served
    definition = make_definition(tmp_path, url, leak=leak, base_deb=base_deb)
    (root / base_deb.name).write_bytes(base_deb.read_bytes())
    return definition


# -- pure parts ----------------------------------------------------------------------------------


def test_bisect_finds_single_and_interacting_causes() -> None:
    items = list(VARIATIONS)
    assert _bisect(items, lambda s: "umask" in s) == [["umask"]]
    assert _bisect(items, lambda s: "umask" in s or "store" in s) == [["umask"], ["store"]]
    # Only together: time (first half) and store (second half) → the smallest set that still differs.
    both = _bisect(items, lambda s: "time" in s and "store" in s)
    assert len(both) == 1 and {"time", "store"} <= set(both[0])


def test_every_variation_is_really_applied(tmp_path: Path, served, base_deb: Path) -> None:
    definition = _definition(tmp_path / "fx", served, base_deb, leak=False)
    control = make_run(definition, tmp_path / "work", "control", frozenset(), tmp_path / "fx" / "store")
    varied = make_run(definition, tmp_path / "work", "b1", frozenset(VARIATIONS), tmp_path / "fx" / "store")
    assert control.definition == definition and varied.definition != definition
    assert (varied.definition / "reprobuild.conf").read_bytes() == (definition / "reprobuild.conf").read_bytes()
    assert varied.cwd != control.cwd and varied.output != control.output
    assert control.env["TZ"] == "UTC" and varied.env["TZ"] == "Pacific/Kiritimati"
    assert control.env["LC_ALL"] != varied.env["LC_ALL"]
    assert "SOURCE_DATE_EPOCH" not in control.env and varied.env["SOURCE_DATE_EPOCH"] == "1"
    assert control.env["HOME"] != varied.env["HOME"] and control.env["TMPDIR"] != varied.env["TMPDIR"]
    assert varied.store != control.store and not varied.store.exists()
    argv = build_argv(varied, "tar")
    text = " ".join(argv)
    assert "umask 077" in text and argv[:2] == ["unshare", "--uts"] and "taskset -c 0" in text
    assert build_argv(control, "tar")[:3] == ["sh", "-c", 'umask 022; exec "$@"']
    assert "--workspace output" in text and "--workspace auto" in " ".join(build_argv(control, "tar"))
    if varied.time_shift:
        assert "faketime -f +397d" in text


def test_relocated_definition_keeps_its_digest_and_external_files(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "v.crt").write_text("cert")
    d = tmp_path / "images" / "one"
    (d / "extra").mkdir(parents=True)
    (d / "extra" / "f").write_text("x")
    (d / "reprobuild.conf").write_text("[Content]\nExtraTrees=extra\n[Signing]\nVerityCertificate=../../keys/v.crt\n")
    new = relocate_definition(d, tmp_path / "elsewhere")
    assert new != d and (new / "extra" / "f").read_text() == "x"
    spec, moved = load_spec(d), load_spec(new)
    assert moved.digest() == spec.digest()
    assert moved.signing.verity_certificate.read_text() == "cert"


# -- real builds (root) --------------------------------------------------------------------------


@needs_root
def test_clean_fixture_is_reproducible_under_all_variations(tmp_path: Path, served, base_deb: Path) -> None:
    definition = _definition(tmp_path / "fx", served, base_deb, leak=False)
    report = check_reproducible(definition, tmp_path / "work", store=tmp_path / "fx" / "store")
    assert report.reproducible, report
    assert len(report.builds) == 2 and report.builds[1].variations == tuple(
        sorted(v.name for v in report.variations if v.applied))
    assert report.builds[0].sha256 == report.builds[1].sha256
    # The cold store really was filled by downloading from the lock's URL.
    cold = next((tmp_path / "work").glob("*/cold-store/objects"))
    assert any(p.is_file() for p in cold.rglob("*"))


@needs_root
def test_leaked_build_directory_is_caught_and_named(tmp_path: Path, served, base_deb: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    definition = _definition(tmp_path / "fx", served, base_deb, leak=True)
    code = call_main(["check", "-C", str(definition), "--store", str(tmp_path / "fx" / "store"),
                      "--work", str(tmp_path / "work"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["reproducible"]
    assert report["culprits"] == [["build-path"]]
    assert "etc/leaked-build-path" in report["diff_summary"]
    assert len(report["builds"]) <= 2 + 2 * 4 + 2
