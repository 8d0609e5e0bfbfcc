"""Provenance: in-toto statement + SLSA v1 predicate in a DSSE envelope signed with the lock key."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from reprobuild import keys, sshsig
from reprobuild.lockfile import save_lock
from reprobuild.provenance import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ProvenanceInvalid,
    check_provenance,
    open_envelope,
    pae,
    purl,
    write_provenance,
)
from tests.test_verify import make_lock


def test_pae_matches_the_dsse_spec_vector() -> None:
    # DSSE protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    assert pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_purl() -> None:
    assert purl("libc6", "2.41-12", "amd64") == "pkg:deb/debian/libc6@2.41-12?arch=amd64"
    assert purl("bsdutils", "1:2.41-5", "amd64") == "pkg:deb/debian/bsdutils@1%3A2.41-5?arch=amd64"


def _trusted(pub: Path) -> list[bytes]:
    return keys.load_trusted_keys(pub).keys_for(keys.LOCK_NAMESPACE)


@pytest.fixture
def built(tmp_path: Path):
    key_path, pub_path = keys.generate_keypair(tmp_path / "lock")
    lock = make_lock()
    lock_path = tmp_path / "reprobuild.lock"
    data = save_lock(lock, lock_path)
    lock_path.with_name("reprobuild.lock.sig").write_bytes(keys.sign_lock(data, keys.open_lock_signer(key_path, {})))
    out = tmp_path / "out"
    out.mkdir()
    image = out / "image.raw"
    image.write_bytes(b"image bytes")
    import hashlib

    manifest = {"format": "ddi", "sha256": hashlib.sha256(b"image bytes").hexdigest(), "root_hash": "ab" * 32,
                "lock_digest": "x"}
    (out / "image.raw.manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    argv = ["reprobuild", "build", "--locked"]
    path = write_provenance(lock, lock_path, manifest, out, keys.open_lock_signer(key_path, {}), argv)
    return lock, lock_path, data, image, manifest, path, pub_path, key_path, argv


def test_statement_content(built) -> None:
    lock, lock_path, data, _image, manifest, path, pub, _, argv = built
    assert path.name == "image.raw.intoto.jsonl"
    envelope = json.loads(path.read_text())
    statement = open_envelope(envelope, _trusted(pub))
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    assert envelope["payloadType"] == PAYLOAD_TYPE
    subject = statement["subject"][0]
    assert subject == {"name": "image.raw", "digest": {"sha256": manifest["sha256"]},
                       "annotations": {"dm-verity-root-hash": "ab" * 32}}
    bd = statement["predicate"]["buildDefinition"]
    import hashlib

    assert bd["externalParameters"]["lock"]["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    sig = sshsig.decode(lock_path.with_name("reprobuild.lock.sig").read_bytes(), "sig")
    assert bd["externalParameters"]["lock"]["signature"] == {
        "format": "sshsig", "namespace": "reprobuild-lock", "keyid": sig.fingerprint,
        "sig": base64.b64encode(sig.signature).decode()}
    assert envelope["signatures"][0]["keyid"] == sig.fingerprint
    assert bd["externalParameters"]["command"] == argv
    shas = {d["digest"]["sha256"] for d in bd["resolvedDependencies"]}
    assert {p.sha256 for p in lock.all_packages()} <= shas
    assert any(d["uri"].startswith("pkg:deb/debian/") for d in bd["resolvedDependencies"][1:])
    assert statement["predicate"]["runDetails"]["builder"]["id"]


def test_envelope_is_reproducible(built, tmp_path: Path) -> None:
    lock, lock_path, _, _, manifest, path, _, key_path, argv = built
    first = path.read_bytes()
    signer = keys.open_lock_signer(key_path, {})
    assert write_provenance(lock, lock_path, manifest, path.parent, signer, argv).read_bytes() == first


def test_tampered_payload_or_wrong_key_fails(built, tmp_path: Path) -> None:
    _, _, _, _, _, path, pub, _, _ = built
    envelope = json.loads(path.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    forged = dict(envelope, payload=base64.b64encode(json.dumps(statement).encode()).decode())
    with pytest.raises(ProvenanceInvalid, match="no signature"):
        open_envelope(forged, _trusted(pub))
    _, other = keys.generate_keypair(tmp_path / "other")
    with pytest.raises(ProvenanceInvalid):
        open_envelope(envelope, _trusted(other))
    with pytest.raises(ProvenanceInvalid, match="not signed"):
        open_envelope(dict(envelope, signatures=[]), _trusted(pub))


def test_check_provenance(built, tmp_path: Path) -> None:
    lock, _lock_path, data, image, manifest, path, pub, _, _ = built
    assert check_provenance(path, lock, data, image, manifest, pub).passed is True
    # Signed, but nothing to check the signature with: a failure unless the user allows it by name.
    unchecked = check_provenance(path, lock, data, image, manifest, None)
    assert unchecked.passed is False and "--allow-unsigned provenance" in unchecked.detail
    allowed = check_provenance(path, lock, data, image, manifest, None, allow_unsigned=True)
    assert allowed.passed is None and allowed.reason == "--allow-unsigned provenance"
    other_lock = make_lock(extra="hello")
    bad = check_provenance(path, other_lock, data + b" ", image, manifest, pub)
    assert bad.passed is False and "another lock" in bad.detail
    bad = check_provenance(path, lock, data, image, dict(manifest, sha256="1" * 64), pub)
    assert bad.passed is False and "sha256" in bad.detail
    _, other = keys.generate_keypair(tmp_path / "k2")
    assert check_provenance(path, lock, data, image, manifest, other).passed is False


def test_provenance_does_not_import_verify() -> None:
    """verify imports provenance's check; the check-result type lives in checkresult, so the import
    goes one way (also not through an import inside a function)."""
    import ast

    import reprobuild.provenance as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "reprobuild.verify" not in imported and "reprobuild.checkresult" in imported
