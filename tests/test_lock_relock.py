"""No stale lock signatures (re-locking): when the lock changes, `lock` (and `build` when it re-locks) re-signs
it with the configured key, or removes the old `.sig` and says so in one line.

Hermetic: the session's signed fixture repository over file://, through the real command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reprobuild import keys
from reprobuild.cli import main

Conf = "[Distribution]\nRelease=stable\nUpdates=no\nMirror={url}\nKeyring={keyring}\n[Content]\nBaseSet=minbase\nPackages={packages}\n[Tools]\nToolsTree=host\n"


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def definition(tmp_path: Path, fixture_repo) -> Path:
    d = tmp_path / "image"
    d.mkdir()
    _write(d, fixture_repo, "hello")
    return d


def _write(d: Path, repo, packages: str, extra: str = "") -> None:
    (d / "reprobuild.conf").write_text(Conf.format(url=repo.root.as_uri(), keyring=repo.keyring_path,
                                                   packages=packages) + extra)


def _signature_verifies(d: Path, pub: Path) -> bool:
    sig = d / "reprobuild.lock.sig"
    if not sig.exists():
        return False
    try:
        keys.verify_lock((d / "reprobuild.lock").read_bytes(), sig.read_bytes(), "sig", keys.load_trusted_keys(pub))
    except keys.VerificationFailed:
        return False
    return True


def test_relock_without_key_removes_the_stale_signature(definition: Path, fixture_repo, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = keys.generate_keypair(tmp_path / "keys" / "demo")
    store = ["--store", str(tmp_path / "store")]
    assert _run(["lock", "-C", str(definition), *store, "--sign-key", str(key)]) == 0
    assert _signature_verifies(definition, pub)
    capsys.readouterr()
    # Same configuration, no key: the lock's bytes do not change, its signature stays valid.
    assert _run(["lock", "-C", str(definition), *store]) == 0
    assert _signature_verifies(definition, pub)
    assert "unsigned" not in capsys.readouterr().err
    # A real change without a key: the old signature would be stale, so it goes, with one line.
    _write(definition, fixture_repo, "hello mail-user")
    assert _run(["lock", "-C", str(definition), *store]) == 0
    err = capsys.readouterr().err
    assert not (definition / "reprobuild.lock.sig").exists()
    notes = [ln for ln in err.splitlines() if "now unsigned" in ln]
    assert len(notes) == 1 and "reprobuild.lock.sig" in notes[0] and "--sign-key" in notes[0]
    assert _run(["lock", "-C", str(definition), *store, "--verify"]) == 0  # current, unsigned
    assert _run(["lock", "-C", str(definition), *store, "--verify", "--trusted-key", str(pub)]) != 0


def test_relock_with_configured_key_resigns(definition: Path, fixture_repo, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = keys.generate_keypair(tmp_path / "keys" / "demo")
    store = ["--store", str(tmp_path / "store")]
    _write(definition, fixture_repo, "hello", f"[Signing]\nLockKey={key}\n")
    assert _run(["lock", "-C", str(definition), *store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signed"] is True
    _write(definition, fixture_repo, "hello mail-user", f"[Signing]\nLockKey={key}\n")
    assert _run(["lock", "-C", str(definition), *store, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["signed"] and out["changed"] and not out["removed_stale_signature"]
    assert _signature_verifies(definition, pub)
    assert _run(["lock", "-C", str(definition), *store, "--verify", "--trusted-key", str(pub)]) == 0


def test_bad_key_leaves_lock_and_signature_untouched(definition: Path, fixture_repo, tmp_path: Path) -> None:
    key, pub = keys.generate_keypair(tmp_path / "keys" / "demo")
    store = ["--store", str(tmp_path / "store")]
    assert _run(["lock", "-C", str(definition), *store, "--sign-key", str(key)]) == 0
    before = ((definition / "reprobuild.lock").read_bytes(), (definition / "reprobuild.lock.sig").read_bytes())
    _write(definition, fixture_repo, "hello mail-user")
    assert _run(["lock", "-C", str(definition), *store, "--sign-key", str(tmp_path / "missing.key")]) != 0
    after = ((definition / "reprobuild.lock").read_bytes(), (definition / "reprobuild.lock.sig").read_bytes())
    assert after == before and _signature_verifies(definition, pub)


@pytest.mark.parametrize("configured", [False, True])
def test_build_relock_never_leaves_a_stale_signature(definition: Path, fixture_repo, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], configured: bool) -> None:
    """`build` without --locked re-locks an out-of-date lock the same way (the build itself then
    stops: --offline with an empty store; what matters here is the lock and its signature)."""
    key, pub = keys.generate_keypair(tmp_path / "keys" / "demo")
    store = ["--store", str(tmp_path / "store")]
    assert _run(["lock", "-C", str(definition), *store, "--sign-key", str(key)]) == 0
    old = (definition / "reprobuild.lock").read_bytes()
    _write(definition, fixture_repo, "hello mail-user", f"[Signing]\nLockKey={key}\n" if configured else "")
    capsys.readouterr()
    _run(["build", "-C", str(definition), *store, "--offline", "-f", "tar", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert (definition / "reprobuild.lock").read_bytes() != old  # re-locked
    if configured:
        assert _signature_verifies(definition, pub) and "now unsigned" not in err
    else:
        assert not (definition / "reprobuild.lock.sig").exists()
        assert sum("now unsigned" in ln for ln in err.splitlines()) == 1


def test_lock_out_of_date_is_a_configuration_error(definition: Path, fixture_repo, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The user guide: configuration errors exit 2; a lock that no longer matches its definition is one."""
    store = ["--store", str(tmp_path / "store")]
    assert _run(["lock", "-C", str(definition), *store]) == 0
    _write(definition, fixture_repo, "hello mail-user")
    capsys.readouterr()
    assert _run(["lock", "-C", str(definition), *store, "--verify"]) == 2
    assert "lock is out of date" in capsys.readouterr().err
    assert _run(["build", "-C", str(definition), *store, "--locked", "-f", "tar", "-o", str(tmp_path / "o")]) == 2
