"""OCI registries: references, credentials, the pushed layout, and ``publish``/``verify REFERENCE``
end to end against Debian's real docker-registry (tests/registry_fixture.py), once over plain
HTTP on 127.0.0.1 and once over TLS (a CA made by the test) with basic auth (htpasswd, bcrypt).

* an ``oci`` output built hermetically (the one-package fixture definition) is published, Debian's
  skopeo inspects it (same digest) and copies it into an OCI layout, and ``verify REFERENCE`` pulls
  it by digest and passes every check, the rebuild included;
* a signed DDI (tests/test_verify.py's miniature) with its provenance is published as an artifact
  with the lock, the SBOMs and the provenance attached through the OCI 1.1 fallback tag (this
  registry has no referrers API), and verified by reference over TLS with the password on stdin
  or from REGISTRY_AUTH_FILE;
* a blob altered in the registry's storage directory makes verify fail with a one-line message,
  a wrong password gives the one-line 401 error, a non-loopback registry without TLS is refused.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fixtures.make_host_base import build_host_base
from reprobuild import keys
from reprobuild.errors import FormatError, UsageError
from reprobuild.lockfile import save_lock
from reprobuild.provenance import write_provenance
from reprobuild.registry.auth import credentials_from_auths, find_credentials, parse_challenge
from reprobuild.registry.layout import (
    ARTIFACT_CYCLONEDX,
    ARTIFACT_DDI,
    ARTIFACT_LOCK,
    ARTIFACT_PROVENANCE,
    ARTIFACT_SPDX,
    fallback_tag,
    merge_referrers,
    parse_index,
)
from reprobuild.registry.reference import Reference, is_loopback, looks_like_reference, parse_reference
from reprobuild.x509 import generate_rsa_key_and_certificate
from tests.check_fixture import make_definition
from tests.registry_fixture import PASSWORD, USER, Registry, needs_registry, start_registry
from tests.test_verify import build_image, make_lock

REPO = Path(__file__).resolve().parent.parent
HEX = "ab" * 32


# -- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:5000/images/demo:1", Reference("127.0.0.1:5000", "images/demo", "1")),
    ("oci://localhost/demo", Reference("localhost", "demo")),
    (f"registry.example.org/a/b-c_d@sha256:{HEX}", Reference("registry.example.org", "a/b-c_d", None, f"sha256:{HEX}")),
    (f"[::1]:5000/x:v1.2@sha256:{HEX}", Reference("[::1]:5000", "x", "v1.2", f"sha256:{HEX}")),
    ("docker.io/debian:trixie", Reference("docker.io", "library/debian", "trixie")),
])  # fmt: skip
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected
    assert str(parse_reference(str(expected))) == str(expected)


@pytest.mark.parametrize(("text", "why"), [
    ("demo:1", "no repository"),
    ("images/demo:1", "does not name a registry"),
    ("127.0.0.1:5000/Images/demo", "lowercase"),
    ("127.0.0.1:5000/demo:-bad", "tag"),
    ("127.0.0.1:5000/demo@sha256:1234", "digest"),
    ("127.0.0.1:5000/", "no repository"),
])  # fmt: skip
def test_bad_references_are_one_line_errors(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as e:
        parse_reference(text)
    assert "\n" not in e.value.message
    assert not looks_like_reference(text) or text.startswith("oci://")


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("192.0.2.2") and not is_loopback("localhost.example.org") and not is_loopback("::2")
    assert parse_reference("[::1]:5000/x").loopback and not parse_reference("example.org/x").loopback


def test_credentials_from_auth_files(tmp_path: Path) -> None:
    auth = base64.b64encode(b"alice:pa:ss").decode()
    doc = {"auths": {"https://registry.example.org:5000/v2/": {"auth": auth}, "other.org": {"auth": "x"}}}
    creds = credentials_from_auths(doc, "registry.example.org:5000", "f")
    assert (creds.username, creds.password) == ("alice", "pa:ss") and "pa:ss" not in repr(creds)
    assert credentials_from_auths(doc, "registry.example.org", "f") is None
    docker = {"auths": {"https://index.docker.io/v1/": {"username": "bob", "password": "pw"}}}
    assert credentials_from_auths(docker, "docker.io", "f").username == "bob"
    with pytest.raises(UsageError, match="not base64"):
        credentials_from_auths({"auths": {"r.org": {"auth": "!!"}}}, "r.org", "f")
    # REGISTRY_AUTH_FILE first, then ~/.docker/config.json
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps({"auths": {"r.org": {"auth": auth}}}))
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {"r.org": {"username": "carol", "password": "x"}}}))
    assert find_credentials("r.org", {"HOME": str(tmp_path)}).username == "alice"
    env = {"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    assert find_credentials("r.org", env).username == "carol"
    assert find_credentials("s.org", env) is None
    (tmp_path / "auth.json").write_text("{")
    with pytest.raises(UsageError, match="unreadable registry credentials"):
        find_credentials("r.org", env)


def test_oci_substituters() -> None:
    from reprobuild.config import parse_substituter
    from reprobuild.fetch import substituter_urls

    assert parse_substituter("oci://127.0.0.1:5000/cache/debs") == "oci://127.0.0.1:5000/cache/debs"
    path = f"127.0.0.1:5000/v2/cache/debs/blobs/sha256:{HEX}"
    assert substituter_urls("oci://127.0.0.1:5000/cache/debs", HEX) == (f"http://{path}", f"https://{path}")
    assert substituter_urls("oci://registry.example.org/c", HEX) == (f"https://registry.example.org/v2/c/blobs/sha256:{HEX}",)
    for bad in ("oci://registry.example.org/c:tag", "oci://registry.example.org", "oci://Registry/x"):
        with pytest.raises(ValueError, match="substituter|OCI reference"):
            parse_substituter(bad)


def test_challenges() -> None:
    c = parse_challenge('Bearer realm="https://auth.example.org/token",service="registry.example.org",'
                        'scope="repository:a/b:pull"')  # fmt: skip
    assert c.scheme == "bearer" and c.params == {"realm": "https://auth.example.org/token",
                                                 "service": "registry.example.org", "scope": "repository:a/b:pull"}
    assert parse_challenge('Basic realm="test"').scheme == "basic"
    assert parse_challenge("") is None


def test_fallback_index() -> None:
    assert fallback_tag(f"sha256:{HEX}") == f"sha256-{HEX}"
    a = {"mediaType": "m", "digest": "sha256:" + "2" * 64, "size": 1, "artifactType": "t"}
    b = {**a, "digest": "sha256:" + "1" * 64}
    one = merge_referrers(None, [a])
    both = merge_referrers(one, [b, a])
    assert [d["digest"] for d in parse_index(both)] == [b["digest"], a["digest"]]
    assert merge_referrers(both, [a]) == both  # pushing again changes nothing
    with pytest.raises(FormatError):
        parse_index(b'{"manifests": 3}')


# -- against docker-registry ---------------------------------------------------------------------


def _cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The caller's registry settings never leak in: no CA bundle, no auth file, no Docker config.
    full = {k: v for k, v in os.environ.items()
            if k not in ("SOURCE_DATE_EPOCH", "REQUESTS_CA_BUNDLE", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    full["DOCKER_CONFIG"] = "/nonexistent"
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "reprobuild", *args], env=full, text=True, capture_output=True,
                          timeout=600, cwd=REPO, input=stdin, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (make apt)")
    registry = start_registry(tmp_path_factory.mktemp("registry-plain"), tls=False)
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("docker-registry") is None or shutil.which("htpasswd") is None:
        pytest.skip("docker-registry and htpasswd are not installed (make apt)")
    registry = start_registry(tmp_path_factory.mktemp("registry-tls"), tls=True)
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def oci_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture definition built -f oci (offline, from its store) with a LockKey= that signs the
    provenance; the lock signed with it too."""
    root = tmp_path_factory.mktemp("oci-publish")
    d = make_definition(root, "http://127.0.0.1:9/unused", leak=False, base_deb=build_host_base(root / "base"))
    key, pub = keys.generate_keypair(root / "keys" / "lock")
    with open(d / "reprobuild.conf", "a") as conf:  # LockKey= is not in the lock's config digest
        conf.write(f"\n[Signing]\nLockKey={key}\n")
    store = root / "store"
    r = _cli("build", "-C", str(d), "--locked", "--offline", "-f", "oci", "--store", str(store),
             "-o", str(d / "out"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lock = d / "reprobuild.lock"
    lock.with_name("reprobuild.lock.sig").write_bytes(keys.sign_lock(lock.read_bytes(), keys.open_lock_signer(key, {})))
    return {"definition": d, "out": d / "out", "store": store, "pub": pub}


@pytest.fixture(scope="module")
def ddi_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tests/test_verify.py's signed miniature DDI with its signed lock and provenance."""
    d = tmp_path_factory.mktemp("ddi-publish")
    key, pub = keys.generate_keypair(d / "keys" / "lock")
    verity_pair = generate_rsa_key_and_certificate("test verity")
    sb_pair = generate_rsa_key_and_certificate("test secure boot")
    (d / "keys" / "verity.crt").write_bytes(verity_pair[1])
    (d / "keys" / "sb.crt").write_bytes(sb_pair[1])
    lock = make_lock()
    lock_path = d / "reprobuild.lock"
    data = save_lock(lock, lock_path)
    lock_path.with_name("reprobuild.lock.sig").write_bytes(keys.sign_lock(data, keys.open_lock_signer(key, {})))
    image = build_image(d / "out", lock, verity_pair, sb_pair)
    manifest = json.loads((d / "out" / "image.raw.manifest.json").read_text())
    write_provenance(lock, lock_path, manifest, d / "out", keys.open_lock_signer(key, {}), ["reprobuild", "build"])
    return {"out": image.parent, "pub": pub, "verity": d / "keys" / "verity.crt", "sb": d / "keys" / "sb.crt",
            "image": image}


@needs_registry
def test_publish_and_verify_oci_image(plain: Registry, oci_output: dict[str, Path], tmp_path: Path) -> None:
    ref = f"{plain.address}/reprobuild/fixture:1"
    r = _cli("publish", str(oci_output["out"]), ref, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    manifest = json.loads((oci_output["out"] / "image.oci.tar.manifest.json").read_text())
    assert result["digest"] == "sha256:" + manifest["oci"]["index_digest"].removeprefix("sha256:")
    assert result["kind"] == "oci" and result["referrers_api"] is False
    assert {p["artifactType"] for p in result["referrers"]} == {ARTIFACT_LOCK, ARTIFACT_SPDX, ARTIFACT_CYCLONEDX,
                                                                ARTIFACT_PROVENANCE}  # fmt: skip
    # Publishing again uploads nothing and gives the same digest.
    again = json.loads(_cli("publish", str(oci_output["out"]), ref, "--json").stdout)
    assert again["digest"] == result["digest"] and again["uploaded_blobs"] == 0

    # Debian's skopeo reads it as an image (the tag names the archive's index, whose one manifest
    # is the archive's), and copies it into an OCI layout with the same layer.
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"], capture_output=True,
                             text=True, check=True)  # fmt: skip
    info = json.loads(inspect.stdout)
    assert info["Digest"] == result["digest"] and info["Layers"] == [manifest["oci"]["layer_digest"]]
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{tmp_path / 'layout'}:copied"], check=True, capture_output=True)  # fmt: skip
    layer = manifest["oci"]["layer_digest"].removeprefix("sha256:")
    copied = tmp_path / "layout" / "blobs" / "sha256" / layer
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == layer

    # verify by reference: pulled by digest, the attached lock, every local check, the rebuild.
    v = _cli("verify", ref, "--trusted-key", str(oci_output["pub"]), "-C", str(oci_output["definition"]),
             "--store", str(oci_output["store"]), "--json")  # fmt: skip
    report = json.loads(v.stdout)
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert v.returncode == 0, (v.stderr, status)
    assert status["registry"] == "passed" and status["lock-signature"] == "passed"
    assert status["image-digest"] == "passed" and status["installed-packages"] == "passed"
    assert status["rebuild"] == "passed" and status["provenance"] == "passed"
    assert report["image"] == f"{ref}@{result['digest']}"

    # Not something reprobuild published (the referrers index itself), and a tag that does not exist.
    other = _cli("verify", f"{plain.address}/reprobuild/fixture:{result['fallback_tag']}", "--no-rebuild")
    assert other.returncode == 1 and "exactly one image manifest" in other.stderr, other.stderr
    missing = _cli("verify", f"{plain.address}/reprobuild/fixture:nope", "--no-rebuild")
    assert missing.returncode == 1 and "not found: 404" in missing.stderr and missing.stderr.count("\n") == 1


@needs_registry
def test_publish_and_verify_ddi_over_tls(tls: Registry, ddi_output: dict[str, Path], tmp_path: Path) -> None:
    ref = f"{tls.address}/reprobuild/ddi:v1"
    access = ("--ca-cert", str(tls.ca))
    r = _cli("publish", str(ddi_output["out"]), ref, "--lock", str(ddi_output["out"].parent / "reprobuild.lock"),
             *access, "--username", USER, "--password-stdin", "--json", stdin=PASSWORD + "\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["kind"] == "disk" and result["fallback_tag"] == fallback_tag(result["digest"])
    assert len(result["referrers"]) == 4

    # skopeo sees the artifact and the fallback referrers index (raw manifests).
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(tls.ca, certs / "ca.crt")
    skopeo = ["skopeo", "inspect", "--raw", "--cert-dir", str(certs), "--creds", f"{USER}:{PASSWORD}"]
    raw = subprocess.run([*skopeo, f"docker://{ref}"], capture_output=True, check=True).stdout
    assert json.loads(raw)["artifactType"] == ARTIFACT_DDI
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == result["digest"]
    fallback = json.loads(subprocess.run([*skopeo, f"docker://{tls.address}/reprobuild/ddi:{result['fallback_tag']}"],
                                         capture_output=True, check=True).stdout)  # fmt: skip
    assert sorted(d["digest"] for d in fallback["manifests"]) == sorted(p["digest"] for p in result["referrers"])

    # Credentials from REGISTRY_AUTH_FILE; verify pinned by digest.
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {tls.address: {"auth": base64.b64encode(
        f"{USER}:{PASSWORD}".encode()).decode()}}}))  # fmt: skip
    args = ("--trusted-key", str(ddi_output["pub"]), "--certificate", str(ddi_output["verity"]),
            "--certificate", str(ddi_output["sb"]), "--no-rebuild", *access)  # fmt: skip
    for target in (ref, f"oci://{tls.address}/reprobuild/ddi@{result['digest']}"):
        v = _cli("verify", target, *args, "--json", env={"REGISTRY_AUTH_FILE": str(auth)})
        report = json.loads(v.stdout)
        status = {c["name"]: c["status"] for c in report["checks"]}
        assert v.returncode == 0, (v.stderr, status)
        for name in ("registry", "lock-signature", "manifest-lock", "image-digest", "gpt", "partition-hashes",
                     "verity-root-hash", "verity-signature", "uki-signature", "provenance"):
            assert status[name] == "passed", (name, report)

    # The CA from REQUESTS_CA_BUNDLE, the credentials from ~/.docker/config.json.
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    shutil.copy(auth, home / ".docker" / "config.json")
    v = _cli("verify", ref, *args[:-2], "--json", env={"HOME": str(home), "DOCKER_CONFIG": "",
                                                       "REQUESTS_CA_BUNDLE": str(tls.ca)})  # fmt: skip
    assert v.returncode == 0, v.stderr

    # A wrong password: one line naming the 401.
    bad = _cli("verify", ref, *args, "--username", USER, "--password-stdin", stdin="wrong\n")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") <= 2 and "401 Unauthorized" in bad.stderr, bad.stderr
    # No credentials at all.
    none = _cli("verify", ref, *args)
    assert none.returncode != 0 and "no credentials found" in none.stderr, none.stderr
    # Without the CA the TLS check fails (one line, no fallback to HTTP: 127.0.0.1 would allow it,
    # but the registry speaks only TLS).
    no_ca = _cli("verify", ref, *args[:-2], env={"REGISTRY_AUTH_FILE": str(auth)})
    assert no_ca.returncode != 0 and "Traceback" not in no_ca.stderr and "certificate" in no_ca.stderr.lower()

    # Tampering with the disk's blob in the registry's storage: verify refuses it.
    disk_digest = "sha256:" + json.loads((ddi_output["out"] / "image.raw.manifest.json").read_text())["sha256"]
    blob = tls.blob_file(disk_digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    t = _cli("verify", ref, *args, env={"REGISTRY_AUTH_FILE": str(auth)})
    assert t.returncode != 0 and "Traceback" not in t.stderr
    assert f"blob {disk_digest}" in t.stderr and "corrupt or tampered" in t.stderr, t.stderr


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_plain_http_refused_off_loopback(tmp_path: Path) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = http.server.ThreadingHTTPServer((address, 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ref = f"{address}:{server.server_address[1]}/x/y:1"
        r = _cli("verify", ref, "--no-rebuild")
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "TLS failed" in r.stderr and "--insecure" in r.stderr, r.stderr
        # With --insecure it speaks plain HTTP (and finds no registry there: this server answers 501).
        r = _cli("verify", ref, "--no-rebuild", "--insecure")
        assert r.returncode != 0 and "TLS failed" not in r.stderr and "server error 501" in r.stderr, r.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_usage_errors(ddi_output: dict[str, Path]) -> None:
    r = _cli("verify", "no-such-file.raw", "--no-rebuild")
    assert r.returncode == 2 and "not a registry reference" in r.stderr
    r = _cli("verify", "127.0.0.1:1/x:y", "--lock", "x.lock", "--no-rebuild")
    assert r.returncode == 2 and "attached lock" in r.stderr
    r = _cli("verify", "127.0.0.1:1/x:y")
    assert r.returncode == 2 and "-C DIR" in r.stderr
    r = _cli("publish", str(REPO / "docs"), "127.0.0.1:1/x:y")
    assert r.returncode == 2 and "holds no image.oci.tar" in r.stderr
    r = _cli("publish", str(ddi_output["out"]), "127.0.0.1:1/x:y", "--lock", str(REPO / "lock/minimal/reprobuild.lock"))
    assert r.returncode == 2 and "names lock sha256:" in r.stderr and "--lock" in r.stderr, r.stderr
    r = _cli("verify", "127.0.0.1:1/x:y", "--no-rebuild")
    assert r.returncode == 1 and "cannot connect" in r.stderr and r.stderr.count("\n") <= 2, r.stderr


class _TokenRegistry(http.server.BaseHTTPRequestHandler):
    """A minimal registry with Bearer token auth and the referrers API, for the client's flows that
    Debian's docker-registry 2.8 does not offer (token auth needs a token server; it has no
    referrers API). It records requests; manifests live in ``self.server.manifests``."""

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == "Bearer T0KEN":
            return True
        realm = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}/token"  # type: ignore[attr-defined]
        self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                   {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'})  # fmt: skip
        return False

    def do_GET(self) -> None:
        srv = self.server
        if self.path.startswith("/token"):
            srv.token_requests.append(self.path)  # type: ignore[attr-defined]
            good = "Basic " + base64.b64encode(b"alice:pw").decode()
            if self.headers.get("Authorization") != good:
                self._send(401)
                return
            self._send(200, b'{"token": "T0KEN"}')
            return
        if not self._authorized():
            return
        if self.path == "/v2/":
            self._send(200, b"{}")
        elif self.path.startswith("/v2/x/forbidden/"):
            self._send(403, b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}')
        elif self.path.startswith("/v2/x/broken/"):
            self._send(503, b"upstream storage unavailable")
        elif self.path.startswith("/v2/x/y/referrers/"):
            subject = self.path.rsplit("/", 1)[1]
            found = [d for d, (data, _t) in srv.manifests.items()  # type: ignore[attr-defined]
                     if json.loads(data).get("subject", {}).get("digest") == subject]
            index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d,
                 "size": len(srv.manifests[d][0]), "artifactType": json.loads(srv.manifests[d][0])["artifactType"]}  # type: ignore[attr-defined]
                for d in found]}  # fmt: skip
            self._send(200, json.dumps(index).encode(), {"Content-Type": "application/vnd.oci.image.index.v1+json"})
        elif self.path.startswith("/v2/x/y/blobs/"):
            data = srv.blobs.get(self.path.rsplit("/", 1)[1])  # type: ignore[attr-defined]
            self._send(200, data) if data is not None else self._send(404)
        elif self.path.startswith("/v2/x/y/manifests/"):
            ref = self.path.rsplit("/", 1)[1]
            if ref not in srv.manifests:  # type: ignore[attr-defined]
                self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
                return
            data, media = srv.manifests[ref]  # type: ignore[attr-defined]
            self._send(200, data, {"Content-Type": media})
        else:
            self._send(404)

    def do_PUT(self) -> None:
        if not self._authorized():
            return
        data = self.rfile.read(int(self.headers["Content-Length"]))
        ref = self.path.rsplit("/", 1)[1]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        media = self.headers["Content-Type"]
        self.server.manifests[ref] = self.server.manifests[digest] = (data, media)  # type: ignore[attr-defined]
        subject = json.loads(data).get("subject")
        headers = {"Docker-Content-Digest": digest, **({"OCI-Subject": subject["digest"]} if subject else {})}
        self._send(201, b"", headers)


def test_bearer_token_and_referrers_api(tmp_path: Path) -> None:
    """The Bearer challenge is answered with a token fetched with the user's credentials (by the
    client, and by fetch for an ``oci://`` substituter); a referrer's PUT answered with
    OCI-Subject is listed by the referrers API (no fallback tag)."""
    from reprobuild.registry.client import RegistryError, open_client
    from reprobuild.registry.layout import artifact_manifest, referrer_descriptor
    from reprobuild.verifyref import list_referrers

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenRegistry)
    server.manifests = {}  # type: ignore[attr-defined]
    server.token_requests = []  # type: ignore[attr-defined]
    server.blobs = {}  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        _ref, client = open_client(f"{address}/x/y:1", {}, username="alice", password="pw", push=True)
        subject = artifact_manifest(ARTIFACT_DDI, [], 0)
        client.put_manifest(subject.digest, subject.data, subject.media_type)
        referrer = artifact_manifest(ARTIFACT_LOCK, [], 0, subject.descriptor())
        r = client.put_manifest(referrer.digest, referrer.data, referrer.media_type)
        assert r.headers["OCI-Subject"] == subject.digest
        assert [d["digest"] for d in list_referrers(client, subject.digest)] == [referrer.digest]
        assert referrer_descriptor(referrer)["artifactType"] == ARTIFACT_LOCK
        assert len(server.token_requests) == 1  # type: ignore[attr-defined]
        assert "scope=repository%3Ax%2Fy%3Apull%2Cpush" in server.token_requests[0]  # type: ignore[attr-defined]
        assert "service=fake" in server.token_requests[0]  # type: ignore[attr-defined]
        # The oci:// substituter answers the same challenge (credentials from REGISTRY_AUTH_FILE).
        from reprobuild.fetch import FetchItem, fetch_all
        from reprobuild.store import Store

        deb = b"a package's bytes"
        sha = hashlib.sha256(deb).hexdigest()
        server.blobs = {f"sha256:{sha}": deb}  # type: ignore[attr-defined]
        auth_file = tmp_path / "auth.json"
        auth_file.write_text(json.dumps({"auths": {address: {"username": "alice", "password": "pw"}}}))
        report = fetch_all(Store(tmp_path / "store"), [FetchItem("p", sha, len(deb), ())], [f"oci://{address}/x/y"],
                           env={"REGISTRY_AUTH_FILE": str(auth_file)})  # fmt: skip
        assert len(report.fetched) == 1 and len(server.token_requests) == 2  # type: ignore[attr-defined]
        assert "scope=repository%3Ax%2Fy%3Apull&" in server.token_requests[1] + "&"  # type: ignore[attr-defined]
        # 403 and 5xx: one line each, naming the status (and the registry's error code when it sends one).
        _ref, forbidden = open_client(f"{address}/x/forbidden:1", {}, username="alice", password="pw")
        with pytest.raises(RegistryError, match=r"access denied: 403 Forbidden \(DENIED: requested access") as e:
            forbidden.get_manifest("1")
        assert "\n" not in e.value.message
        _ref, broken = open_client(f"{address}/x/broken:1", {}, username="alice", password="pw")
        with pytest.raises(RegistryError, match="server error 503 Service Unavailable") as e:
            broken.get_manifest("1")
        assert "\n" not in e.value.message
        # Wrong credentials: the token service's 401, one line.
        _ref, bad = open_client(f"{address}/x/y:1", {}, username="alice", password="no")
        with pytest.raises(RegistryError, match="401 Unauthorized") as e:
            bad.get_manifest(subject.digest)
        assert "\n" not in e.value.message
    finally:
        server.shutdown()
        server.server_close()


@needs_registry
def test_two_publishers_at_once(plain: Registry, oci_output: dict[str, Path]) -> None:
    """Two builders publishing the same output to one new repository at the same time both succeed
    (blob uploads and manifest PUTs of equal bytes are idempotent) and agree on the digest."""
    ref = f"{plain.address}/reprobuild/concurrent:1"
    env = {**os.environ, "HOME": "/nonexistent"}
    env.pop("REQUESTS_CA_BUNDLE", None)
    procs = [subprocess.Popen([sys.executable, "-m", "reprobuild", "publish", str(oci_output["out"]), ref, "--json"],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _out, err in results]
    digests = {json.loads(out)["digest"] for out, _err in results}
    assert len(digests) == 1
    v = _cli("verify", ref, "--trusted-key", str(oci_output["pub"]), "--no-rebuild")
    assert v.returncode == 0, v.stdout + v.stderr


@needs_registry
def test_store_push_and_oci_substituter(oci_output: dict[str, Path], tmp_path: Path) -> None:
    """``store push`` puts the lock's objects in a repository; a second builder with an empty store
    fetches them through ``--substituter oci://…`` (the lock's own URL is dead) and builds the same
    image offline; a blob altered in the registry's storage is refused by the fetch."""
    registry = start_registry(tmp_path / "registry", tls=False)
    try:
        definition, lock = oci_output["definition"], oci_output["definition"] / "reprobuild.lock"
        repo = f"{registry.address}/reprobuild/store"
        pushed = [_cli("store", "push", repo, "--lock", str(lock), "--store", str(oci_output["store"]), "--json")
                  for _ in range(2)]  # fmt: skip
        assert [p.returncode for p in pushed] == [0, 0], pushed[0].stderr
        first, second = (json.loads(p.stdout) for p in pushed)
        assert first["objects"] == first["uploaded"] == 1 and second["uploaded"] == 0
        assert first["digest"] == second["digest"] and ":lock-" in first["reference"]
        manifest = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                              f"docker://{first['reference'].split('@')[0]}"],
                                             capture_output=True, check=True).stdout)  # fmt: skip
        assert manifest["artifactType"] == "application/vnd.reprobuild.store.v1"
        [layer] = manifest["layers"]
        assert layer["mediaType"] == "application/vnd.debian.binary-package"
        assert layer["annotations"]["org.opencontainers.image.title"].endswith(".deb")

        fresh = tmp_path / "store2"
        f = _cli("fetch", "-C", str(definition), "--store", str(fresh), "--substituter", f"oci://{repo}", "--json")
        assert f.returncode == 0, f.stderr
        b = _cli("build", "-C", str(definition), "--locked", "--offline", "-f", "oci", "--store", str(fresh),
                 "-o", str(tmp_path / "out"))  # fmt: skip
        assert b.returncode == 0, b.stderr[-2000:]
        assert (tmp_path / "out" / "image.oci.tar").read_bytes() == (oci_output["out"] / "image.oci.tar").read_bytes()

        blob = registry.blob_file(layer["digest"])
        data = bytearray(blob.read_bytes())
        data[100] ^= 0xFF
        blob.write_bytes(bytes(data))
        t = _cli("fetch", "-C", str(definition), "--store", str(tmp_path / "store3"), "--substituter", f"oci://{repo}")
        assert t.returncode != 0 and "Traceback" not in t.stderr
        assert "sha256 mismatch" in t.stderr, t.stderr
        assert not [p for p in (tmp_path / "store3").rglob("*") if p.is_file() and p.parent.name != "tmp"
                    and len(p.name) == 64]  # no object stored
    finally:
        registry.stop()


@needs_registry
def test_oci_substituter_with_basic_auth_over_tls(tls: Registry, oci_output: dict[str, Path], tmp_path: Path) -> None:
    """The substituter of a registry that needs credentials: REGISTRY_AUTH_FILE answers its Basic
    challenge, REQUESTS_CA_BUNDLE trusts its CA; without credentials fetch names the 401."""
    definition, lock = oci_output["definition"], oci_output["definition"] / "reprobuild.lock"
    repo = f"{tls.address}/reprobuild/cache"
    p = _cli("store", "push", repo, "--lock", str(lock), "--store", str(oci_output["store"]), "--ca-cert",
             str(tls.ca), "--username", USER, "--password-stdin", stdin=PASSWORD + "\n")  # fmt: skip
    assert p.returncode == 0, p.stderr
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {tls.address: {"username": USER, "password": PASSWORD}}}))
    env = {"REGISTRY_AUTH_FILE": str(auth), "REQUESTS_CA_BUNDLE": str(tls.ca)}
    f = _cli("fetch", "-C", str(definition), "--store", str(tmp_path / "s1"), "--substituter", f"oci://{repo}",
             "--json", env=env)  # fmt: skip
    assert f.returncode == 0, f.stderr
    assert [u for _name, u in ((x["name"], x["url"]) for x in json.loads(f.stdout)["fetched"])] \
        == [f"https://{tls.address}/v2/reprobuild/cache/blobs/sha256:{next(iter(_lock_shas(lock)))}"]
    f = _cli("fetch", "-C", str(definition), "--store", str(tmp_path / "s2"), "--substituter", f"oci://{repo}",
             env={"REQUESTS_CA_BUNDLE": str(tls.ca)})  # fmt: skip
    assert f.returncode != 0 and "401" in f.stderr and "Traceback" not in f.stderr, f.stderr


def _lock_shas(lock: Path) -> set[str]:
    from reprobuild.lockfile import load_lock

    return {p.sha256 for p in load_lock(lock).all_packages()}
