"""The host apt sources reader, against fake /etc trees (host names are .invalid on purpose)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reprobuild.debian.sources import (
    AptSource,
    host_mirror_for,
    parse_deb822,
    parse_one_line,
    read_apt_sources,
)
from reprobuild.errors import RepositoryError

DEB822 = """\
Types: deb
# http://snapshots.invalid/archive/debian/20250520T000000Z
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshots.invalid/archive/debian-security/20250520T000000Z
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "etc/apt" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_deb822_like_a_debian_host(tmp_path):
    root = fake_root(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert host_mirror_for("debian", root) == "http://mirror.invalid/debian"
    assert host_mirror_for("debian-security", root) == "http://mirror.invalid/debian-security"
    first = read_apt_sources(root)[0]
    assert first == AptSource(
        types=("deb",),
        uris=("http://mirror.invalid/debian",),
        suites=("bookworm", "bookworm-updates"),
        components=("main",),
        signed_by=(Path("/usr/share/keyrings/debian-archive-keyring.gpg"),),
        origin=f"{root}/etc/apt/sources.list.d/debian.sources:1",
    )


def test_disabled_files_stanzas_and_schemes_are_skipped(tmp_path):
    root = fake_root(tmp_path, {
        "sources.list.d/a-disabled.sources.disabled-by-farm": "Types: deb\nURIs: http://wrong1.invalid/debian\n"
                                                             "Suites: trixie\nComponents: main\n",
        "sources.list.d/b.sources": "Types: deb\nURIs: http://wrong2.invalid/debian\nSuites: trixie\n"
                                    "Components: main\nEnabled: no\n\n"
                                    "Types: deb\nURIs: cdrom:[Debian 13]/ mirror+http://wrong3.invalid/list\n"
                                    "Suites: trixie\nComponents: main\n",
        "sources.list.d/c.list": "deb cdrom:[Debian GNU/Linux 13]/ trixie main\n"
                                 "deb [enabled=no] http://wrong4.invalid/debian trixie main\n",
        "sources.list.d/d.sources": "Types: deb\nURIs: https://right.invalid/debian/\nSuites: trixie\n"
                                    "Components: main\n",
    })  # fmt: skip
    assert [s.uris for s in read_apt_sources(root)] == [("https://right.invalid/debian/",)]
    assert host_mirror_for("debian", root) == "https://right.invalid/debian"  # trailing slash dropped


def test_one_line_format_with_options(tmp_path):
    root = fake_root(tmp_path, {
        "sources.list": "# comment\n"
                        "deb-src http://src.invalid/debian trixie main\n"
                        "deb [arch=amd64 signed-by=/etc/k1.gpg,/etc/k2.gpg] http://one.invalid/debian trixie main contrib\n"
                        "deb http://one.invalid/debian-security trixie-security main # trailing comment\n",
    })  # fmt: skip
    sources = read_apt_sources(root)
    assert [s.types for s in sources] == [("deb-src",), ("deb",), ("deb",)]
    assert sources[1].signed_by == (Path("/etc/k1.gpg"), Path("/etc/k2.gpg"))
    assert sources[1].components == ("main", "contrib")
    assert host_mirror_for("debian", root) == "http://one.invalid/debian"  # deb-src is not a binary source
    assert host_mirror_for("debian-security", root) == "http://one.invalid/debian-security"


def test_sources_list_read_before_sources_list_d(tmp_path):
    root = fake_root(tmp_path, {
        "sources.list": "deb http://first.invalid/debian trixie main\n",
        "sources.list.d/aaa.list": "deb http://second.invalid/debian trixie main\n",
    })  # fmt: skip
    assert host_mirror_for("debian", root) == "http://first.invalid/debian"


def test_match_by_suite_when_the_path_says_nothing(tmp_path):
    root = fake_root(tmp_path, {
        "sources.list.d/other.sources": "Types: deb\nURIs: http://vendor.invalid/apt\nSuites: nodistro\n"
                                        "Components: main\n",
        "sources.list.d/pub.sources": "Types: deb\nURIs: http://pub.invalid/pub/linux\nSuites: trixie trixie-updates\n"
                                      "Components: main\n\n"
                                      "Types: deb\nURIs: http://pub.invalid/pub/sec\nSuites: trixie-security\n"
                                      "Components: main\n",
    })  # fmt: skip
    assert host_mirror_for("debian", root) == "http://pub.invalid/pub/linux"
    assert host_mirror_for("debian-security", root) == "http://pub.invalid/pub/sec"


def test_snapshot_style_urls_match_by_path(tmp_path):
    root = fake_root(tmp_path, {
        "sources.list.d/snap.sources": "Types: deb\nURIs: http://snap.invalid/archive/debian-security/20250520T000000Z/\n"
                                       "Suites: bookworm-security\nComponents: main\n\n"
                                       "Types: deb\nURIs: http://snap.invalid/archive/debian/20250520T000000Z\n"
                                       "Suites: bookworm\nComponents: main\n",
    })  # fmt: skip
    assert host_mirror_for("debian", root) == "http://snap.invalid/archive/debian/20250520T000000Z"
    assert host_mirror_for("debian-security", root).endswith("/debian-security/20250520T000000Z")


def test_a_security_only_host_has_no_debian_mirror(tmp_path):
    root = fake_root(tmp_path, {
        "sources.list.d/s.sources": "Types: deb\nURIs: http://m.invalid/debian-security\n"
                                    "Suites: trixie-security\nComponents: main\n",
    })  # fmt: skip
    with pytest.raises(RepositoryError, match="'debian' archive") as e:
        host_mirror_for("debian", root)
    assert "s.sources" in e.value.message and "Mirror=" in e.value.hint


def test_no_sources_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(
        RepositoryError, match="no apt source on this host serves the 'debian-security' archive"
    ):
        host_mirror_for("debian-security", tmp_path)


def test_unknown_archive_name():
    with pytest.raises(ValueError):
        host_mirror_for("ubuntu", Path("/nonexistent"))  # type: ignore[arg-type]


def test_inline_signed_by_key_is_not_a_path():
    text = (
        "Types: deb\nURIs: http://m.invalid/debian\nSuites: trixie\nComponents: main\n"
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mDMEZ\n -----END PGP PUBLIC KEY BLOCK-----\n"
    )
    (source,) = parse_deb822(text)
    assert source.signed_by == () and source.suites == ("trixie",)


def test_parsers_ignore_garbage_lines():
    assert parse_one_line("deb\ndeb http://x.invalid/debian\nfoo bar baz\n") == []
    assert parse_deb822("\n\n# only comments\n") == []


@pytest.mark.live
def test_the_real_host_has_a_debian_mirror():
    """This machine's own apt configuration names a Debian mirror (the live tests depend on it)."""
    url = host_mirror_for("debian")
    assert url.startswith(("http://", "https://", "file:")) and not url.endswith("/")
