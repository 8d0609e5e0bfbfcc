"""Build provenance: an in-toto Statement with a SLSA v1 provenance predicate, in a DSSE envelope.

``write_provenance`` writes ``OUTPUT.intoto.jsonl`` (one envelope, one line) beside a build's
outputs; ``check_provenance`` is the ``provenance`` check of ``reprobuild verify``.

* Statement (in-toto Attestation Framework v1): ``_type`` https://in-toto.io/Statement/v1,
  ``subject`` = the image (sha256, plus its dm-verity root hash as an annotation) and its
  manifest, ``predicateType`` https://slsa.dev/provenance/v1.
* Predicate (SLSA Provenance v1): ``buildDefinition.externalParameters`` holds the lock digest, the
  lock's signature (key id and signature bytes), the build command line and options;
  ``resolvedDependencies`` (the SLSA v0.2 "materials") lists the lock file and every package with
  its sha256 and a host-independent URI (the lock's URL when it records one, else the package's
  purl) annotated with archive, pool path and snapshot id; ``runDetails.builder.id`` names
  reprobuild and its version.
* Envelope (DSSE v1): ``payloadType`` application/vnd.in-toto+json, ``payload`` base64 of the
  statement, ``signatures`` = one ed25519 signature by the lock key over
  ``PAE(type, payload)`` = ``"DSSEv1" SP len(type) SP type SP len(payload) SP payload``, with
  ``keyid`` the key's OpenSSH fingerprint (``SHA256:…``). The key comes from the same place as the
  lock's (a key file or an ssh-agent, :mod:`reprobuild.keys`); DSSE is kept rather than an SSH
  signature because in-toto verifiers read DSSE, and PAE's "DSSEv1" prefix keeps the two kinds of
  signature by one key apart. A verifier trusts the keys its ``--trusted-key`` allows for the
  ``reprobuild-lock`` namespace.

Reproducibility: no timestamps, no host names, no invocation ids (SLSA makes them optional), JSON
with sorted keys; ed25519 is deterministic, so the same build writes the same envelope.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from reprobuild import __version__
from reprobuild.checkresult import Check, failed, passed, skipped
from reprobuild.digest import canonical_json
from reprobuild.errors import ReprobuildError, VerificationFailed
from reprobuild.fileio import ReadRefused, read_bounded, write_atomic
from reprobuild.keys import (
    LOCK_NAMESPACE,
    LockSigner,
    ed25519_key,
    load_trusted_keys,
    read_key_file,
    signature_record,
)
from reprobuild.lockfile import SIGNATURE_SUFFIX, Lock, dumps
from reprobuild.manifest import output_file
from reprobuild.sshsig import SshFormatError, fingerprint

MAX_PROVENANCE_BYTES = 16 << 20  # one DSSE envelope line: a few KiB

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# Identifiers of this builder and its build type: URNs, so that nothing points at a web site
# that does not exist; the version is in builder.version.
BUILDER_ID = "urn:reprobuild:builder"
BUILD_TYPE = "urn:reprobuild:build-type:locked-image:v1"
PROVENANCE_SUFFIX = ".intoto.jsonl"


class ProvenanceInvalid(VerificationFailed):
    """A provenance envelope is malformed, unsigned, badly signed, or about something else."""


def purl(name: str, version: str, architecture: str) -> str:
    """``pkg:deb/debian/NAME@VERSION?arch=ARCH`` (package-url spec: ``:`` in versions escaped)."""
    from urllib.parse import quote

    return f"pkg:deb/debian/{quote(name, safe='')}@{quote(version, safe='~+.')}?arch={quote(architecture, safe='')}"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (what is signed)."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


canonical = canonical_json


def output_name(manifest: dict[str, Any]) -> str:
    return output_file(str(manifest.get("format")))


def make_statement(lock: Lock, lock_bytes: bytes, lock_signature: dict[str, str] | None,
                   manifest: dict[str, Any], manifest_bytes: bytes, argv: list[str]) -> dict[str, Any]:  # fmt: skip
    """The in-toto statement for a build (pure)."""
    name = output_name(manifest)
    subjects: list[dict[str, Any]] = []
    if manifest.get("sha256"):
        subject: dict[str, Any] = {"name": name, "digest": {"sha256": manifest["sha256"]}}
        if manifest.get("root_hash"):
            subject["annotations"] = {"dm-verity-root-hash": manifest["root_hash"]}
        subjects.append(subject)
    subjects.append({"name": name + ".manifest.json", "digest": {"sha256": hashlib.sha256(manifest_bytes).hexdigest()}})
    dependencies: list[dict[str, Any]] = [
        {"name": "reprobuild.lock", "digest": {"sha256": hashlib.sha256(lock_bytes).hexdigest()}}]
    for p in lock.all_packages():
        source = lock.source(p.source)
        dependencies.append({
            "name": p.filename,
            "uri": p.urls[0] if p.urls else purl(p.name, p.version, p.architecture),
            "digest": {"sha256": p.sha256},
            "annotations": {"archive": source.archive, "path": p.path, "snapshot": source.snapshot},
        })
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "lock": {"digest": "sha256:" + hashlib.sha256(lock_bytes).hexdigest(),
                             "signature": lock_signature},
                    "command": list(argv),
                    "format": manifest.get("format"),
                },
                "internalParameters": {"source_date_epoch": lock.source_date_epoch, "seed": lock.seed,
                                       "config_digest": lock.config_digest},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"reprobuild": __version__}},
                "byproducts": ([{"name": "image.roothash", "content": base64.b64encode(
                    (manifest["root_hash"] + "\n").encode()).decode()}] if manifest.get("root_hash") else []),
            },
        },
    }


def sign_envelope(statement: dict[str, Any], signer: LockSigner | None) -> dict[str, Any]:
    """A DSSE envelope around ``statement``; with no signer, an envelope without signatures."""
    payload = canonical(statement)
    signatures = []
    if signer is not None:
        signatures.append({"keyid": fingerprint(signer.public_key),
                           "sig": base64.b64encode(signer.sign(pae(PAYLOAD_TYPE, payload))).decode()})
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(), "signatures": signatures}


def _verifies(public: bytes, sig: dict[str, Any], message: bytes) -> bool:
    try:
        ed25519_key(public).verify(base64.b64decode(sig["sig"], validate=True), message)
        return True
    except (InvalidSignature, KeyError, TypeError, binascii.Error, SshFormatError):
        return False


def open_envelope(envelope: dict[str, Any], trusted: list[bytes] | None) -> dict[str, Any]:
    """Check the envelope (a signature by one of the ``trusted`` SSH key blobs, when given) and
    return the statement.

    Raises ProvenanceInvalid."""
    try:
        if envelope.get("payloadType") != PAYLOAD_TYPE:
            raise ProvenanceInvalid(f"payloadType is {envelope.get('payloadType')!r}, not {PAYLOAD_TYPE}")
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = envelope.get("signatures") or []
    except (KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise ProvenanceInvalid(f"malformed DSSE envelope: {e}") from None
    if trusted is not None:
        if not signatures:
            raise ProvenanceInvalid("the provenance is not signed")
        message = pae(PAYLOAD_TYPE, payload)
        if not any(_verifies(k, s, message) for k in trusted for s in signatures):
            names = ", ".join(fingerprint(k) for k in trusted) or "none"
            raise ProvenanceInvalid(f"no signature by a trusted key ({names}) verifies "
                                    f"(signed by {', '.join(str(s.get('keyid')) for s in signatures)})")  # fmt: skip
    try:
        statement = json.loads(payload)
    except ValueError as e:
        raise ProvenanceInvalid(f"the payload is not JSON: {e}") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise ProvenanceInvalid("the payload is not an in-toto v1 statement")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise ProvenanceInvalid(f"predicate type {statement.get('predicateType')!r} is not SLSA provenance v1")
    return statement


def write_provenance(lock: Lock, lock_path: Path, result_manifest: dict[str, Any], out_dir: Path,
                     signer: LockSigner | None, argv: list[str]) -> Path:  # fmt: skip
    """Write ``OUT_DIR/OUTPUT.intoto.jsonl`` for a finished build and return its path.

    ``lock_path`` supplies the lock's exact bytes and its ``.sig`` (recorded when present);
    ``signer`` is the lock key (keys.open_lock_signer), or None for an unsigned envelope.
    The manifest file must already be in ``out_dir``. Cost: hashing the lock and manifest.
    """
    lock_bytes = lock_path.read_bytes() if lock_path.exists() else dumps(lock)
    sig_path = lock_path.with_name(lock_path.name + SIGNATURE_SUFFIX)
    lock_signature = signature_record(read_key_file(sig_path, "signature file"), str(sig_path)) if sig_path.exists() else None
    name = output_name(result_manifest)
    manifest_bytes = (out_dir / (name + ".manifest.json")).read_bytes()
    statement = make_statement(lock, lock_bytes, lock_signature, result_manifest, manifest_bytes, argv)
    envelope = sign_envelope(statement, signer)
    path = out_dir / (name + PROVENANCE_SUFFIX)
    write_atomic(path, canonical(envelope) + b"\n")
    return path


def check_provenance(path: Path, lock: Lock, lock_bytes: bytes, image: Path, manifest: dict[str, Any],
                     trusted_key: Path | None, allow_unsigned: bool = False) -> Check:  # fmt: skip
    """The ``provenance`` check: envelope signed by the trusted key, about this lock and image.

    A signed envelope with no ``trusted_key`` to check it fails unless ``allow_unsigned``."""

    name = "provenance"
    try:
        text = read_bounded(Path(path), MAX_PROVENANCE_BYTES).decode("utf-8")  # no FIFO, device or huge file
        lines = [ln for ln in text.splitlines() if ln.strip()]
        envelope = json.loads(lines[0])
        public = load_trusted_keys(Path(trusted_key)).keys_for(LOCK_NAMESPACE) if trusted_key else None
        statement = open_envelope(envelope, public)
    except (OSError, ValueError, IndexError, RecursionError, ReadRefused) as e:
        return failed(name, f"{path}: unreadable provenance ({e})")
    except ReprobuildError as e:
        return failed(name, e.message)
    problems = []
    params = statement.get("predicate", {}).get("buildDefinition", {}).get("externalParameters", {})
    if params.get("lock", {}).get("digest") != "sha256:" + hashlib.sha256(lock_bytes).hexdigest():
        problems.append("it names another lock")
    # The image-digest check ties the manifest to the image; here the statement to the manifest.
    subjects = {s.get("digest", {}).get("sha256") for s in statement.get("subject", [])}
    want = manifest.get("sha256")
    if want and want not in subjects:
        problems.append(f"no subject has the image's sha256 {want}")
    deps = statement["predicate"]["buildDefinition"].get("resolvedDependencies", [])
    dep_shas = {d.get("digest", {}).get("sha256") for d in deps}
    missing = [p.name for p in lock.all_packages() if p.sha256 not in dep_shas]
    if missing:
        problems.append(f"materials lack {len(missing)} locked packages ({', '.join(missing[:3])})")
    if problems:
        return failed(name, "; ".join(problems))
    if public is None and not envelope.get("signatures"):
        return skipped(name, "statement matches; the provenance is not signed", "the provenance is unsigned")
    if public is None and allow_unsigned:
        return skipped(name, "statement matches; its signature is not checked (--allow-unsigned provenance)",
                       "--allow-unsigned provenance")  # fmt: skip
    if public is None:
        return failed(name, "statement matches, but it is signed and no --trusted-key was given to check "
                            "the signature (give the lock key's .pub, or --allow-unsigned provenance)")  # fmt: skip
    signers = ", ".join(str(s.get("keyid")) for s in envelope.get("signatures") or [])
    return passed(name, f"DSSE signed by trusted key {signers}; SLSA provenance for this image and lock, "
                        f"{len(deps) - 1} materials")  # fmt: skip
