"""Live: verify a real minbase disk image (one session build), with the rebuild; check on minbase.

Marked ``live``: builds a fresh lock of lock/minimal's definition (the committed lock may name
versions the mirror has since dropped), signed with a throw-away key, with the store (warm at ~/.cache/reprobuild/store or
$REPROBUILD_STORE; packages missing from it are downloaded from the host's mirror). Needs root.
Measured on the 2-core development machine (warm store): build 15 s, verify with rebuild 16 s, check (tar,
all variations, cold store re-downloading minbase) 34 s; 67 s for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from reprobuild.build import BuildOptions, build_locked
from reprobuild.config import load_spec
from reprobuild.keys import open_lock_signer
from reprobuild.lockfile import load_lock
from reprobuild.provenance import write_provenance
from reprobuild.store import Store
from reprobuild.verify import VerifyOptions, verify_image
from tests.test_verify import call_main

pytestmark = pytest.mark.live
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def minimal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(definition, lock key, public key): lock/minimal's definition, freshly locked and signed."""
    from reprobuild import keys

    root = tmp_path_factory.mktemp("live-verify-def")
    key, pub = keys.generate_keypair(root / "keys" / "lock")
    definition = root / "minimal"
    definition.mkdir()
    conf = "\n".join(line for line in (REPO / "lock/minimal/reprobuild.conf").read_text().splitlines()
                     if not line.startswith("LockKey="))
    (definition / "reprobuild.conf").write_text(conf + f"\nLockKey={key}\n")
    assert call_main(["lock", "-C", str(definition), "-q"]) == 0
    return definition, key, pub


@pytest.fixture(scope="session")
def minimal_image(minimal: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fresh minimal lock built once per session as a disk image, with its provenance."""
    definition, key, _ = minimal
    out = tmp_path_factory.mktemp("live-verify") / "out"
    spec = load_spec(definition)
    lock = load_lock(spec.lock_path)
    result = build_locked(spec, lock, Store(Store.default_root()), BuildOptions(output_dir=out, format="disk"))
    write_provenance(lock, spec.lock_path, result.manifest, out, open_lock_signer(key, os.environ),
                     ["reprobuild", "build", "-C", str(definition), "--locked"])
    return result.outputs["disk"]


def test_real_image_verifies_with_rebuild(minimal_image: Path, minimal: tuple[Path, Path, Path]) -> None:
    definition, _, trusted = minimal
    report = verify_image(minimal_image, definition / "reprobuild.lock", trusted, (),
                          VerifyOptions(rebuild=True, store=Store.default_root(),
                                        provenance=minimal_image.with_name("image.raw.intoto.jsonl")))
    s = {c.name: c.status for c in report.checks}
    assert report.ok, [c for c in report.checks]
    for name in ("manifest-lock", "image-digest", "gpt", "partition-hashes", "verity-root-hash",
                 "verity-hash-tree", "rebuild"):
        assert s[name] == "passed", (name, report.checks)
    assert s["lock-signature"] == s["provenance"] == "passed"


def test_real_image_one_flipped_byte_through_the_cli(minimal_image: Path, minimal: tuple[Path, Path, Path],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "image.raw"
    shutil.copy2(minimal_image, copy)
    shutil.copy2(minimal_image.with_name("image.raw.manifest.json"), tmp_path / "image.raw.manifest.json")
    from reprobuild.image import gpt

    root = gpt.read_gpt_path(copy).partitions[0]
    with open(copy, "r+b") as f:
        f.seek(root.offset(512) + (5 << 20) + 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    code = call_main(["verify", str(copy), "--lock", str(minimal[0] / "reprobuild.lock"), "--no-rebuild", "--json"])
    report = json.loads(capsys.readouterr().out)
    failed = {c["name"] for c in report["checks"] if c["status"] == "failed"}
    assert code == 1 and {"partition-hashes", "verity-root-hash", "image-digest"} <= failed


def test_check_minbase_is_reproducible(minimal: tuple[Path, Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = call_main(["check", "-C", str(minimal[0]), "-f", "tar", "--work", str(tmp_path / "work"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["reproducible"], report
    print(json.dumps(report["builds"]), file=sys.stderr)
