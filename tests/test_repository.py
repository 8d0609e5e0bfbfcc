"""Verified repository metadata: signatures, expiry, by-hash indices, the index cache.

Hermetic tests run against the signed fixture repository (tests/repo_fixture.py) over a local
HTTP server (with fault injection) or over file:// copies we tamper with. One ``live`` test
talks to the host's configured Debian mirror.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from fixtures.make_repo import (
    DEFAULT_SUITES,
    FixturePackage,
    build_deb,
    generate_key,
    make_repo,
    sign_clear,
    stop_agent,
)
from reprobuild.debian import gpg, repository
from reprobuild.debian.gpg import SignatureError, dearmor, parse_status, verify_clearsigned
from reprobuild.debian.repository import (
    CorruptIndex,
    ExpiredRelease,
    IndexCache,
    RepositorySource,
    fetch_index_text,
    fetch_packages,
    fetch_release,
    fetch_releases,
    index_entries,
    parse_release,
    snapshot_id,
    snapshot_source,
)
from reprobuild.debian.stanzaindex import scan_stanzas
from reprobuild.errors import RepositoryError, ToolMissing

NOW = datetime(2025, 6, 1, tzinfo=UTC)  # inside the fixture's validity window


@pytest.fixture
def server(repo_server):
    repo_server.reset()
    yield repo_server
    repo_server.reset()


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def http_source(server, suite: str = "stable", **kw) -> RepositorySource:
    return RepositorySource("debian", server.url, suite, keyrings=(server.keyring,), **kw)


@pytest.fixture
def repo_copy(fixture_repo, tmp_path):
    """A private file:// copy of the fixture's dists/ (and keyring) that a test may tamper with."""
    root = tmp_path / "copy"
    shutil.copytree(fixture_repo.root / "dists", root / "dists")
    return root


def file_source(root: Path, keyring: Path, suite: str = "stable") -> RepositorySource:
    return RepositorySource("debian", root.as_uri(), suite, keyrings=(keyring,))


# --------------------------------------------------------------------------------------- Release


def test_inrelease_verifies_and_parses(server, session):
    verified = fetch_release(session, http_source(server), now=NOW)
    release = verified.release
    assert (release.suite, release.codename) == ("stable", "fixture")
    assert release.date == datetime(2025, 1, 1, tzinfo=UTC)
    assert release.valid_until == datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=3650)
    assert release.acquire_by_hash
    assert release.architectures == ("all", "amd64", "i386")
    assert release.arch_all_in_arch_indices
    raw = (server.root / "dists/stable/InRelease").read_bytes()
    assert verified.raw == raw
    assert verified.inrelease_sha256 == hashlib.sha256(raw).hexdigest()
    entry = release.sha256["main/binary-amd64/Packages.xz"]
    xz = (server.root / "dists/stable/main/binary-amd64/Packages.xz").read_bytes()
    assert (entry.size, entry.sha256) == (len(xz), hashlib.sha256(xz).hexdigest())
    assert verified.snapshot_id == "20250101T000000Z"


def test_inrelease_is_cached_by_hash(server, session, tmp_path):
    cache = IndexCache(tmp_path / "cache")
    verified = fetch_release(session, http_source(server), cache, now=NOW)
    assert cache.get(verified.inrelease_sha256).read_bytes() == verified.raw


def test_tampered_release_body_refused(fixture_repo, repo_copy):
    inrelease = repo_copy / "dists/stable/InRelease"
    text = inrelease.read_bytes()
    xz_line = next(line for line in text.splitlines() if line.endswith(b"main/binary-amd64/Packages.xz"))
    forged = b" " + b"0" * 64 + xz_line[65:]
    inrelease.write_bytes(text.replace(xz_line, forged))
    with pytest.raises(SignatureError, match="BAD signature") as e:
        fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path), now=NOW)
    assert fixture_repo.key_fingerprint[-16:] in str(e.value)


def test_wrong_key_refused(fixture_repo, tmp_path, repo_copy):
    other_home = tmp_path / "other-gnupg"
    other_fpr = generate_key(other_home, "someone else <other@invalid>")
    try:
        other_keyring = tmp_path / "other.gpg"
        other_keyring.write_bytes(subprocess.run(
            ["gpg", "--homedir", str(other_home), "--batch", "--export", other_fpr],
            check=True, capture_output=True).stdout)  # fmt: skip
        # Verified against a keyring that lacks the signer: refused, naming the signer's key id.
        with pytest.raises(SignatureError, match="no public key") as e:
            fetch_release(None, file_source(repo_copy, other_keyring), now=NOW)
        assert fixture_repo.key_fingerprint[-16:] in str(e.value)
        # Re-signed by a key we do not trust: refused although the signature itself is valid.
        release = (repo_copy / "dists/stable/Release").read_bytes()
        (repo_copy / "dists/stable/InRelease").write_bytes(sign_clear(other_home, other_fpr, release))
        with pytest.raises(SignatureError, match=other_fpr[-16:]):
            fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path), now=NOW)
    finally:
        stop_agent(other_home)


def test_unsigned_inrelease_refused(fixture_repo, repo_copy):
    dist = repo_copy / "dists/stable"
    (dist / "InRelease").write_bytes((dist / "Release").read_bytes())
    with pytest.raises(SignatureError, match="not an OpenPGP clearsigned message"):
        fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path), now=NOW)


def test_unsigned_release_without_any_signature_refused(fixture_repo, repo_copy):
    dist = repo_copy / "dists/stable"
    (dist / "InRelease").unlink()
    (dist / "Release.gpg").unlink()
    with pytest.raises(SignatureError, match="not signed"):
        fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path), now=NOW)


def test_detached_signature_fallback(fixture_repo, repo_copy):
    dist = repo_copy / "dists/stable"
    (dist / "InRelease").unlink()
    verified = fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path), now=NOW)
    assert verified.release.suite == "stable"
    assert verified.inrelease_sha256 == hashlib.sha256((dist / "Release").read_bytes()).hexdigest()
    # …and a Release altered after signing is refused.
    (dist / "Release").write_bytes(
        (dist / "Release").read_bytes().replace(b"Suite: stable", b"Suite: stable ")
    )
    with pytest.raises(SignatureError, match="BAD signature"):
        fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path), now=NOW)


@pytest.mark.parametrize("where", ["before", "after", "second-message"])
def test_text_outside_the_signature_refused(fixture_repo, repo_copy, where):
    inrelease = repo_copy / "dists/stable/InRelease"
    signed = inrelease.read_bytes()
    smuggled = b"Acquire-By-Hash: no\nSHA256:\n " + b"1" * 64 + b" 1 main/binary-amd64/Packages\n"
    hostile = {
        "before": smuggled + signed,
        "after": signed + smuggled,
        "second-message": signed + signed.replace(b"Suite: stable", b"Suite: stable"),
    }[where]
    inrelease.write_bytes(hostile)
    with pytest.raises(SignatureError):
        fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path), now=NOW)


def test_signed_content_comes_from_gpgv_not_the_envelope(fixture_repo):
    """Dash-escaped lines come back unescaped: we parse gpgv's output, not our own reading."""
    home = fixture_repo.gnupg_home
    try:
        body = b"Suite: stable\n- dashed line\n"
        signed = sign_clear(home, fixture_repo.key_fingerprint, body)
        assert b"\n- - dashed line" in signed
        assert verify_clearsigned(signed, [fixture_repo.keyring_path]) == body
    finally:
        stop_agent(home)


def test_expired_release_refused_and_allowed_for_snapshots(server, session):
    source = http_source(server)
    valid_until = server.repo.valid_until
    later = valid_until + timedelta(days=1)
    with pytest.raises(ExpiredRelease) as e:
        fetch_release(session, source, now=later)
    message = e.value.format_message()
    assert "stable" in message and "Valid-Until Sat, 30 Dec 2034" in message and "2025" in message
    verified = fetch_release(session, source, now=later, allow_expired=True)
    assert verified.release.valid_until == valid_until


def test_release_of_another_suite_refused(fixture_repo, repo_copy):
    dist = repo_copy / "dists"
    shutil.copy(dist / "stable/InRelease", dist / "stable-updates/InRelease")
    with pytest.raises(RepositoryError, match="is for suite 'stable'"):
        fetch_release(None, file_source(repo_copy, fixture_repo.keyring_path, "stable-updates"), now=NOW)


def test_missing_suite_is_a_clear_error(server, session):
    with pytest.raises(RepositoryError, match="neither InRelease nor Release"):
        fetch_release(session, http_source(server, suite="nonexistent"), now=NOW)


@pytest.mark.parametrize(
    "text, message",
    [
        ("Suite: x\nSHA256:\n " + "a" * 64 + " 1 p\n", "no Date"),
        ("Suite: x\nDate: Wed, 01 Jan 2025 00:00:00 UTC\n", "no SHA256"),
        ("Suite: x\nDate: yesterday\nSHA256:\n", "unparseable Date"),
        ("Suite: x\nDate: Wed, 01 Jan 2025 00:00:00 UTC\nSHA256:\n abc 1 p\n", "malformed SHA256"),
        (
            "Suite: x\nDate: Wed, 01 Jan 2025 00:00:00 UTC\nSHA256:\n " + "g" * 64 + " 1 p\n",
            "not hexadecimal",
        ),
        (" leading continuation\n", "continuation line"),
        ("no colon here\n", "not a 'Field: value' line"),
    ],
    ids=["no-date", "no-sha256", "bad-date", "short-hash", "non-hex", "orphan-continuation", "no-colon"],
)
def test_parse_release_hostile(text, message):
    with pytest.raises(RepositoryError, match=message):
        parse_release(text)


def test_parse_release_fields():
    release = parse_release(
        "Suite: stable\nCodename: trixie\nDate: Sat, 09 Aug 2025 09:15:11 UTC\n"
        "Valid-Until: Sat, 16 Aug 2025 09:15:11 UTC\nArchitectures: all amd64\nComponents: main contrib\n"
        "NotAutomatic: yes\nButAutomaticUpgrades: yes\n"
        "SHA256:\n " + "A" * 64 + "  123 main/binary-amd64/Packages.xz\n"
    )
    assert release.date == datetime(2025, 8, 9, 9, 15, 11, tzinfo=UTC)
    assert release.valid_until - release.date == timedelta(days=7)
    assert release.not_automatic and release.but_automatic_upgrades
    assert release.components == ("main", "contrib")
    # "all" listed, no No-Support-for-Architecture-all: arch:all only in binary-all.
    assert not release.arch_all_in_arch_indices
    entry = release.index_entry("main/binary-amd64/Packages")
    assert (entry.size, entry.sha256) == (123, "a" * 64)


def test_snapshot_id_and_source():
    assert snapshot_id(datetime(2025, 5, 20, 0, 0, 0, tzinfo=UTC)) == "20250520T000000Z"
    cet = timezone(timedelta(hours=2))
    assert snapshot_id(datetime(2025, 5, 20, 2, 3, 4, tzinfo=cet)) == "20250520T000304Z"
    with pytest.raises(ValueError):
        snapshot_id(datetime(2025, 5, 20))
    source = RepositorySource("debian-security", "http://mirror.invalid/debian-security", "trixie-security")
    snap = snapshot_source(source, "http://snapshots.invalid/archive/", "20250520T000000Z")
    assert snap.base_url == "http://snapshots.invalid/archive/debian-security/20250520T000000Z"
    assert snap.dists_url.endswith("/20250520T000000Z/dists/trixie-security")


# --------------------------------------------------------------------------------------- Packages


def test_packages_fetched_by_hash_and_verified(server, session, tmp_path):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    server.reset()
    index = fetch_packages(session, source, verified, "main", "amd64", IndexCache(tmp_path))
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    assert server.requests == [f"/dists/stable/main/binary-amd64/by-hash/SHA256/{entry.sha256}"]
    assert (index.sha256, index.path, index.all_sha256) == (entry.sha256, entry.path, None)
    names = {p.name for p in index.packages}
    assert {"dash", "libc6", "py-plugin", "tzdata", "hello"} <= names  # arch:all included
    assert {p.architecture for p in index.packages} == {"amd64", "all"}
    assert {p.origin for p in index.packages} == {"stable/main"}
    hello = next(p for p in index.packages if p.name == "hello")
    deb = (server.root / hello.filename).read_bytes()
    assert (hello.size, hello.sha256) == (len(deb), hashlib.sha256(deb).hexdigest())


def test_packages_by_name_when_release_has_no_by_hash(server, session):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    no_by_hash = dataclasses.replace(verified.release, acquire_by_hash=False)
    server.reset()
    fetch_packages(session, source, no_by_hash, "main", "amd64")
    assert server.requests == ["/dists/stable/main/binary-amd64/Packages.xz"]


def test_by_hash_404_falls_back_to_the_name(server, session):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    by_hash = f"/dists/stable/main/binary-amd64/by-hash/SHA256/{entry.sha256}"
    with server.fault(by_hash, "404"):
        index = fetch_packages(session, source, verified, "main", "amd64")
    assert server.requests[-2:] == [by_hash, "/dists/stable/main/binary-amd64/Packages.xz"]
    assert len(index.packages) > 10


@pytest.mark.parametrize("fault, message", [("corrupt", "does not match the signed Release"),
                                            ("truncate", "fetching .* failed|got [0-9]+ bytes"), ("endless", "larger than"),
                                            ("500", "HTTP 500")])  # fmt: skip
def test_bad_packages_download_refused(server, session, tmp_path, fault, message):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    cache = IndexCache(tmp_path)
    by_hash = f"/dists/stable/main/binary-amd64/by-hash/SHA256/{entry.sha256}"
    with server.fault(by_hash, fault), pytest.raises(RepositoryError, match=message):
        fetch_packages(session, source, verified, "main", "amd64", cache)
    assert cache.get_text(entry.sha256) is None  # nothing unverified was kept
    assert not (tmp_path / "texts").exists()


def test_stalled_download_times_out(server, session):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    started = time.monotonic()
    by_hash = f"/dists/stable/main/binary-amd64/by-hash/SHA256/{entry.sha256}"
    with server.fault(by_hash, "stall"), pytest.raises(RepositoryError, match="failed"):
        fetch_packages(session, source, verified, "main", "amd64", timeout=(2.0, 0.5))
    assert time.monotonic() - started < 2.5


def test_packages_with_wrong_sha256_refused(fixture_repo, repo_copy):
    """The file served under the listed name and hash is not the one the Release signed."""
    source = file_source(repo_copy, fixture_repo.keyring_path)
    verified = fetch_release(None, source, now=NOW)
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    binary = repo_copy / "dists/stable/main/binary-amd64"
    original = lzma.decompress((binary / "Packages.xz").read_bytes())
    evil = lzma.compress(original.replace(b"Package: hello\n", b"Package: hellp\n"))
    for path in (binary / "Packages.xz", binary / "by-hash/SHA256" / entry.sha256):
        path.write_bytes(evil)
    with pytest.raises(CorruptIndex):
        fetch_packages(None, source, verified, "main", "amd64")


def test_missing_component_or_arch(server, session):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    with pytest.raises(RepositoryError, match="no component 'contrib'"):
        fetch_packages(session, source, verified, "contrib", "amd64")
    with pytest.raises(RepositoryError, match="lists no main/binary-arm64/Packages"):
        fetch_packages(session, source, verified, "main", "arm64")


def test_text_cache_hit_downloads_nothing(server, session, tmp_path):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    cache = IndexCache(tmp_path / "cache")
    first = fetch_packages(session, source, verified, "main", "amd64", cache)
    assert cache.text_path(first.sha256).is_file()

    class NoNetwork:
        def get(self, *args, **kwargs):
            raise AssertionError("downloaded again")

    second = fetch_packages(NoNetwork(), source, verified, "main", "amd64", cache)
    assert second.packages == first.packages
    assert second.sha256 == first.sha256


def test_one_index_in_two_suites_keeps_each_origin(server, session, tmp_path):
    """The text cache is keyed by content; the origin comes from the source asking."""
    cache = IndexCache(tmp_path / "cache")
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    fetch_packages(session, source, verified, "main", "amd64", cache)
    alias = dataclasses.replace(source, suite="alias")
    again = fetch_packages(session, alias, verified, "main", "amd64", cache)
    assert {p.origin for p in again.packages} == {"alias/main"}


def test_index_cache_put_is_verified_and_atomic(tmp_path):
    cache = IndexCache(tmp_path)
    data = b"index bytes"
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(CorruptIndex):
        cache.put_bytes(hashlib.sha256(b"other").hexdigest(), data)
    assert cache.get(digest) is None
    path = cache.put_bytes(digest, data)
    assert path == tmp_path / "indices/sha256" / digest and path.read_bytes() == data
    assert cache.get(digest) == path
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(ValueError):
        cache.get("../../etc/passwd")


def test_arch_all_only_in_binary_all(tmp_path, session):
    """Without No-Support-for-Architecture-all, arch:all packages come from binary-all."""
    suites = {
        "stable": [FixturePackage("native", "1", arch="amd64"), FixturePackage("indep", "1", arch="all")]
    }
    repo = make_repo(tmp_path / "repo", suites, gnupg_home=tmp_path / "gnupg", split_arch_all=True)
    source = file_source(repo.root, repo.keyring_path)
    verified = fetch_release(None, source, now=NOW)
    assert not verified.release.arch_all_in_arch_indices
    index = fetch_packages(None, source, verified, "main", "amd64")
    assert sorted((p.name, p.architecture) for p in index.packages) == [("indep", "all"), ("native", "amd64")]
    assert index.all_sha256 == verified.release.sha256["main/binary-all/Packages.xz"].sha256


def test_fetch_releases_runs_concurrently_in_source_order(server, session, tmp_path):
    """Each InRelease answer is held back 0.6 s; fetched side by side, three suites take about
    one delay, not three. Results come back in the order of the sources."""

    class SlowSession:
        def get(self, url, **kwargs):
            time.sleep(0.6)
            return session.get(url, **kwargs)

    sources = [http_source(server, "stable-updates"), http_source(server, "stable"), http_source(server, "stable")]
    started = time.monotonic()
    releases = fetch_releases(SlowSession(), sources, IndexCache(tmp_path), NOW)
    elapsed = time.monotonic() - started
    assert [r.release.suite for r in releases] == ["stable-updates", "stable", "stable"]
    assert [r.source for r in releases] == sources
    assert elapsed < 1.5, f"{elapsed:.2f} s: InRelease fetches did not overlap (serial: >= 1.8 s)"


def test_fetch_releases_raises_the_first_failure_in_source_order(server, session):
    """Whichever thread fails first in time, the error is the first failing source's."""
    sources = [http_source(server, "stable"), http_source(server, "no-such-suite"), http_source(server, "gone")]
    with server.fault("/dists/stable/InRelease", "500"), pytest.raises(RepositoryError, match="InRelease: HTTP 500"):
        fetch_releases(session, sources, now=NOW)


    class SlowFirst:  # the first failing source also fails last in time
        def get(self, url, **kwargs):
            if "no-such-suite" in url:
                time.sleep(0.3)
            return session.get(url, **kwargs)

    with pytest.raises(RepositoryError, match="no-such-suite has neither InRelease"):
        fetch_releases(SlowFirst(), sources, now=NOW)
    assert fetch_releases(session, [], now=NOW) == []


def test_index_entries_name_what_fetch_packages_reads(server, session, tmp_path):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    entry, all_entry = index_entries(source, verified, "main", "amd64")
    assert (entry.path, all_entry) == ("main/binary-amd64/Packages.xz", None)
    index = fetch_packages(session, source, verified, "main", "amd64")
    assert (index.sha256, index.path) == (entry.sha256, entry.path)
    with pytest.raises(RepositoryError, match="no component 'contrib'"):
        index_entries(source, verified, "contrib", "amd64")
    with pytest.raises(RepositoryError, match="lists no main/binary-arm64/Packages"):
        index_entries(source, verified.release, "main", "arm64")


def test_index_entries_with_arch_all_split_out(tmp_path):
    suites = {"stable": [FixturePackage("native", "1", arch="amd64"), FixturePackage("indep", "1", arch="all")]}
    repo = make_repo(tmp_path / "repo", suites, gnupg_home=tmp_path / "gnupg", split_arch_all=True)
    source = file_source(repo.root, repo.keyring_path)
    verified = fetch_release(None, source, now=NOW)
    _, all_entry = index_entries(source, verified, "main", "amd64")
    assert all_entry is not None and all_entry.path == "main/binary-all/Packages.xz"
    assert index_entries(source, verified, "main", "all")[1] is None


def test_derived_cache_round_trip_and_key_checks(tmp_path):
    cache = IndexCache(tmp_path)
    key = hashlib.sha256(b"inputs").hexdigest()
    assert cache.get_derived("universe", key) is None
    path = cache.put_derived("universe", key, b"derived bytes")
    assert path == tmp_path / "derived/universe" / key
    assert cache.get_derived("universe", key) == b"derived bytes"
    assert cache.get_derived("other", key) is None
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    for kind, bad_key in (("universe", "../../etc/passwd"), ("../x", key), ("universe", key.upper())):
        with pytest.raises(ValueError):
            cache.put_derived(kind, bad_key, b"x")


# --------------------------------------------------------------------------------------- gpg


def test_parse_status_rules():
    good = (
        "[GNUPG:] GOODSIG 6ED0E7B82643E131 Debian\n[GNUPG:] VALIDSIG "
        + "4CB50190207B4758A3F73A796ED0E7B82643E131"
        + " 2026-09-12 1 0 4 0 1 8 01 B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8\n"
    )
    assert parse_status(good).good_fingerprints == ("B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8",)
    expired = "[GNUPG:] EXPKEYSIG 6ED0E7B82643E131 Debian\n" + good.split("\n", 1)[1]
    check = parse_status(expired)
    assert check.good_fingerprints == () and check.problems == (
        "signature from expired key 6ED0E7B82643E131",
    )
    missing = "[GNUPG:] ERRSIG 1111111111111111 1 8 01 1 9\n[GNUPG:] NO_PUBKEY 1111111111111111\n"
    assert parse_status(missing + good).good_fingerprints  # another good signature suffices (apt)
    assert parse_status(missing).problems[-1] == "no public key 1111111111111111 in the keyrings"


def test_real_debian_keyring_rejects_fixture_signature(fixture_repo):
    data = (fixture_repo.root / "dists/stable/InRelease").read_bytes()
    with pytest.raises(SignatureError, match=fixture_repo.key_fingerprint[-16:]):
        verify_clearsigned(data, [gpg.DEFAULT_KEYRING])


def test_armored_keyring_is_accepted(fixture_repo, tmp_path):
    armored = subprocess.run(
        ["gpg", "--homedir", str(fixture_repo.gnupg_home), "--batch", "--armor", "--export",
         fixture_repo.key_fingerprint], check=True, capture_output=True).stdout  # fmt: skip
    stop_agent(fixture_repo.gnupg_home)
    assert dearmor(armored) == fixture_repo.keyring_path.read_bytes()
    asc = tmp_path / "key.asc"
    asc.write_bytes(armored)
    data = (fixture_repo.root / "dists/stable/InRelease").read_bytes()
    assert verify_clearsigned(data, [asc]).startswith(b"Origin: Reprobuild Fixture\n")


def test_gpgv_missing_is_toolmissing(fixture_repo, monkeypatch):
    monkeypatch.setattr(gpg.shutil, "which", lambda name: None)
    with pytest.raises(ToolMissing, match="gpgv") as e:
        verify_clearsigned(
            (fixture_repo.root / "dists/stable/InRelease").read_bytes(), [fixture_repo.keyring_path]
        )
    assert e.value.hint == "apt-get install gpgv"


def test_detached_signature_helper(fixture_repo):
    release = (fixture_repo.root / "dists/stable/Release").read_bytes()
    signature = (fixture_repo.root / "dists/stable/Release.gpg").read_bytes()
    assert gpg.verify_detached(release, signature, [fixture_repo.keyring_path]) == release
    with pytest.raises(SignatureError, match="BAD"):
        gpg.verify_detached(release + b"X: y\n", signature, [fixture_repo.keyring_path])


# --------------------------------------------------------------------------------------- fixture repo


def test_fixture_debs_are_real_and_reproducible(fixture_repo):
    hello = next(p for p in DEFAULT_SUITES["stable"] if p.name == "hello")
    deb, _ = build_deb(hello)
    assert deb == build_deb(hello)[0]  # deterministic
    path = fixture_repo.root / hello.pool_path
    assert path.read_bytes() == deb
    fields = subprocess.run(["dpkg-deb", "--field", str(path), "Package", "Version", "Depends"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert fields == "Package: hello\nVersion: 2.10-3\nDepends: libc6 (>= 2.36)\n"
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(path)], check=True, capture_output=True, text=True
    )
    assert "-rwxr-xr-x root/root        31 2025-01-01 00:00 ./usr/bin/hello" in listing.stdout
    scripts = subprocess.run(["dpkg-deb", "--info", str(path), "postinst"], check=True, capture_output=True)
    assert b"/var/lib/hello/state" in scripts.stdout


def test_fixture_repo_is_fast_and_deterministic_except_signatures(tmp_path):
    started = time.monotonic()
    repo = make_repo(tmp_path / "a", gnupg_home=tmp_path / "ga")
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"fixture repo took {elapsed:.2f}s"
    other = make_repo(tmp_path / "b", gnupg_home=tmp_path / "gb")
    assert repo.key_fingerprint != other.key_fingerprint
    for rel in ("dists/stable/Release", "dists/stable-updates/Release",
                "pool/main/g/glibc/libc6_2.36-9_i386.deb"):  # fmt: skip
        assert (repo.root / rel).read_bytes() == (other.root / rel).read_bytes()


def test_fixture_by_hash_copies_match(fixture_repo):
    release = parse_release((fixture_repo.root / "dists/stable/Release").read_bytes())
    for entry in release.sha256.values():
        directory = entry.path.rsplit("/", 1)[0]
        by_hash = fixture_repo.root / "dists/stable" / directory / "by-hash/SHA256" / entry.sha256
        assert hashlib.sha256(by_hash.read_bytes()).hexdigest() == entry.sha256


# --------------------------------------------------------------------------------------- live


@pytest.mark.live
def test_live_debian_mirror(tmp_path, session):
    """trixie and bookworm from the host's mirror: verified, fetched cold (scanned while it
    downloads), then read from the text cache; a universe over the cached text answers as the
    fully decoded index does."""
    from reprobuild.debian.sources import host_mirror_for
    from reprobuild.resolve import IndexText, Universe

    base = host_mirror_for("debian")
    cache = IndexCache(tmp_path / "cache")
    timings = []
    for suite in ("trixie", "bookworm"):
        source = RepositorySource("debian", base, suite)
        started = time.perf_counter()
        verified = fetch_release(session, source, cache)
        release_s = time.perf_counter() - started
        entry, _ = index_entries(source, verified, "main", "amd64")
        started = time.perf_counter()
        text, heads = fetch_index_text(session, source, verified, entry)
        cold_s = time.perf_counter() - started
        cache.put_text(entry.sha256, text)
        cached = cache.get_text(entry.sha256)
        assert cached[:] == text and heads == scan_stanzas(cached)
        started = time.perf_counter()
        universe = Universe.from_bytes(Universe.from_indices([IndexText("o", text, heads=heads)], "amd64").to_bytes(),
                                       [cached])  # fmt: skip
        dpkg = universe.candidate("dpkg")
        warm_s = time.perf_counter() - started
        decoded = fetch_packages(None, source, verified, "main", "amd64", cache)  # every stanza, from the cache
        assert verified.release.codename == suite
        assert len(heads) > 50000 and len(decoded.packages) == len(heads)
        assert "dpkg" in universe.essential_names and dpkg.package.essential
        assert [c.package for c in universe.versions("dpkg")] == [
            dataclasses.replace(p, origin="o") for p in decoded.packages if p.name == "dpkg"
        ]
        timings.append(f"{suite}: InRelease {release_s:.2f}s, cold index text {cold_s:.2f}s "
                       f"({len(heads)} stanzas), table and one lookup {warm_s:.2f}s")  # fmt: skip
    print("\n" + "\n".join(timings))


def test_security_style_components_are_accepted() -> None:
    """debian-security lists "updates/main" in Components but keeps indices under main/."""
    from datetime import datetime

    from reprobuild.debian.repository import ReleaseFile, RepositorySource, fetch_packages

    release = ReleaseFile(suite="stable-security", codename="trixie-security",
                          date=datetime(2026, 1, 1, tzinfo=UTC), components=("updates/main",))
    source = RepositorySource(archive="debian-security", base_url="http://127.0.0.1:9", suite="trixie-security")
    # The component check passes; the failure comes later, from the missing index entry.
    with pytest.raises(RepositoryError) as e:
        fetch_packages(None, source, release, "main", "amd64")
    assert "has no component" not in str(e.value)
    with pytest.raises(RepositoryError, match="has no component 'contrib'"):
        fetch_packages(None, source, release, "contrib", "amd64")


# --------------------------------------------------------------------------------------- index texts


def test_index_text_is_the_verified_decompressed_index(server, session):
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    text, heads = fetch_index_text(session, source, verified, entry)
    assert heads == scan_stanzas(text)
    assert text == lzma.decompress((server.root / "dists/stable/main/binary-amd64/Packages.xz").read_bytes())
    assert server.requests[-1] == f"/dists/stable/main/binary-amd64/by-hash/SHA256/{entry.sha256}"


@pytest.mark.parametrize("fault, message", [("corrupt", "does not match the signed Release"),
                                            ("truncate", "fetching .* failed|got [0-9]+ bytes"), ("endless", "larger than"),
                                            ("500", "HTTP 500")])  # fmt: skip
def test_bad_index_text_download_refused(server, session, fault, message):
    """Decompressing while downloading never judges a damaged file by its decompression: the
    size and hash against the signed Release come first."""
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    by_hash = f"/dists/stable/main/binary-amd64/by-hash/SHA256/{entry.sha256}"
    with server.fault(by_hash, fault), pytest.raises(RepositoryError, match=message):
        fetch_index_text(session, source, verified, entry)


def _with_plain_size(verified, size: int):
    """``verified``'s Release with the plain Packages entry claiming ``size`` bytes."""
    release = verified.release
    plain = release.sha256["main/binary-amd64/Packages"]
    entries = {**release.sha256, plain.path: dataclasses.replace(plain, size=size)}
    return dataclasses.replace(release, sha256=entries)


def test_index_text_is_bounded_by_the_plain_size(server, session):
    """A compressed index that expands beyond the plain size the Release lists (a decompression
    bomb, or another file) is refused without holding more than that in memory."""
    source = http_source(server)
    verified = fetch_release(session, source, now=NOW)
    entry = verified.release.sha256["main/binary-amd64/Packages.xz"]
    plain_size = verified.release.sha256["main/binary-amd64/Packages"].size
    with pytest.raises(RepositoryError, match=f"cannot decompress .*more than {plain_size - 10} bytes"):
        fetch_index_text(session, source, _with_plain_size(verified, plain_size - 10), entry)
    with pytest.raises(CorruptIndex, match=f"decompresses to {plain_size} bytes, the signed Release lists"):
        fetch_index_text(session, source, _with_plain_size(verified, plain_size + 10), entry)


def test_index_text_of_a_damaged_stream_with_the_right_hash(fixture_repo, repo_copy, tmp_path):
    """A file that matches its (signed) hash but is no valid xz stream: a clear error, no traceback."""
    source = file_source(repo_copy, fixture_repo.keyring_path)
    verified = fetch_release(None, source, now=NOW)
    junk = b"\xfd7zXZ\x00 not really xz"
    entry = repository.ReleaseEntry("main/binary-amd64/Packages.xz", len(junk), hashlib.sha256(junk).hexdigest())
    (repo_copy / "dists/stable/main/binary-amd64/Packages.xz").write_bytes(junk)
    release = dataclasses.replace(verified.release, acquire_by_hash=False)
    with pytest.raises(RepositoryError, match="cannot decompress main/binary-amd64/Packages.xz"):
        fetch_index_text(None, source, release, entry)


def test_index_texts_with_arch_all_split_out_give_the_parsed_universe(tmp_path):
    from reprobuild.resolve import IndexText, Universe

    suites = {"stable": [FixturePackage("native", "1", arch="amd64"), FixturePackage("indep", "1", arch="all")]}
    repo = make_repo(tmp_path / "repo", suites, gnupg_home=tmp_path / "gnupg", split_arch_all=True)
    source = file_source(repo.root, repo.keyring_path)
    verified = fetch_release(None, source, now=NOW)
    entry, all_entry = index_entries(source, verified, "main", "amd64")
    assert all_entry is not None
    texts = []
    for e in (entry, all_entry):
        text, heads = fetch_index_text(None, source, verified, e)
        texts.append(IndexText("stable/main", text, e.path, binary_all=e is all_entry, heads=heads))
    indexed = Universe.from_indices(texts, "amd64")
    parsed = Universe.from_packages(
        [dataclasses.replace(p, origin="stable/main")
         for p in fetch_packages(None, source, verified, "main", "amd64").packages], "amd64")  # fmt: skip
    assert list(indexed._versions) == list(parsed._versions) == ["indep", "native"]
    assert [c.package for n in ("indep", "native") for c in indexed.versions(n)] == [
        c.package for n in ("indep", "native") for c in parsed.versions(n)
    ]


def test_index_text_cache_round_trip(tmp_path):
    cache = IndexCache(tmp_path)
    sha = "ab" * 32
    assert cache.get_text(sha) is None
    cache.put_text(sha, b"Package: a\nVersion: 1\n")
    assert cache.get_text(sha)[:] == b"Package: a\nVersion: 1\n"
    cache.put_text(sha, b"")
    assert cache.get_text(sha) == b""
    with pytest.raises(ValueError):
        cache.text_path("../../etc/passwd")


# --------------------------------------------------------------------------------------- gpgv verdicts


def _counting_gpgv(monkeypatch) -> list[str]:
    runs: list[str] = []
    real = repository.verify_clearsigned

    def counted(data, keyrings, what="InRelease"):
        runs.append(what)
        return real(data, keyrings, what=what)

    monkeypatch.setattr(repository, "verify_clearsigned", counted)
    return runs


def test_inrelease_verdict_is_reused_for_the_same_bytes_and_keyring(fixture_repo, repo_copy, tmp_path, monkeypatch):
    """gpgv runs once for an unchanged InRelease and keyring; new bytes, another keyring or a
    day later, it runs again — and a tampered InRelease is still refused with a verdict cached."""
    source = file_source(repo_copy, fixture_repo.keyring_path)
    cache = IndexCache(tmp_path / "cache")
    runs = _counting_gpgv(monkeypatch)
    first = fetch_release(None, source, cache, now=NOW)
    again = fetch_release(None, source, cache, now=NOW + timedelta(hours=23))
    assert len(runs) == 1
    assert again.release == first.release and again.inrelease_sha256 == first.inrelease_sha256
    fetch_release(None, source, cache, now=NOW + timedelta(hours=25))  # too old: verified again
    assert len(runs) == 2
    keyring = tmp_path / "keyring-copy.gpg"  # the same key, other bytes (a second copy appended)
    keyring.write_bytes(fixture_repo.keyring_path.read_bytes() * 2)
    fetch_release(None, file_source(repo_copy, keyring), cache, now=NOW)
    assert len(runs) == 3
    inrelease = repo_copy / "dists/stable/InRelease"
    inrelease.write_bytes(inrelease.read_bytes().replace(b"Suite: stable", b"Suite: stab1e"))
    with pytest.raises(SignatureError, match="BAD signature"):
        fetch_release(None, source, cache, now=NOW)
    assert len(runs) == 4


def test_a_damaged_cached_verdict_is_not_used(fixture_repo, repo_copy, tmp_path, monkeypatch):
    source = file_source(repo_copy, fixture_repo.keyring_path)
    cache = IndexCache(tmp_path / "cache")
    verified = fetch_release(None, source, cache, now=NOW)
    key = repository.verification_key(verified.raw, [fixture_repo.keyring_path])
    assert key is not None
    cache.put_derived("verified_inrelease", key, b"not a verdict")
    runs = _counting_gpgv(monkeypatch)
    assert fetch_release(None, source, cache, now=NOW).release == verified.release
    assert len(runs) == 1
