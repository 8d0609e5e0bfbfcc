"""Lock signatures in the SSH format, checked by OpenSSH's own ``ssh-keygen -Y verify``; signing
keys from a file and from a real ``ssh-agent``; the old JSON format; key hygiene.

Hermetic: a copy of lock/minimal's definition and committed lock (``lock --resign`` and
``lock --verify`` do not touch the network).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reprobuild import keys, sshsig
from reprobuild.config import SigningConfig
from reprobuild.signer import key_file_warnings

REPO = Path(__file__).parent.parent
IDENTITY = "release@example"

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs openssh-client")


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "reprobuild", *args], capture_output=True, text=True,
                            env=env if env is not None else _env(), check=False, timeout=120)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"reprobuild {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env.update(extra)
    return env


def ssh_verify(directory: Path, allowed: Path, identity: str = IDENTITY,
               namespace: str = "reprobuild-lock") -> subprocess.CompletedProcess[str]:  # fmt: skip
    with (directory / "reprobuild.lock").open("rb") as lock:
        return subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", identity, "-n", namespace,
                               "-s", str(directory / "reprobuild.lock.sig")], stdin=lock, capture_output=True,
                              text=True, check=False)  # fmt: skip


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.definition = root / "def"
        self.definition.mkdir()
        for name in ("reprobuild.conf", "reprobuild.lock"):
            shutil.copy(REPO / "lock/minimal" / name, self.definition / name)
        self.key, self.pub, line = self.keygen("lock")
        self.allowed = root / "allowed_signers"
        self.allowed.write_text(line + "\n")

    def keygen(self, name: str) -> tuple[Path, Path, str]:
        result = run("keygen", "--out", str(self.root / "keys" / name), "--identity", IDENTITY)
        key, pub = self.root / "keys" / f"{name}.key", self.root / "keys" / f"{name}.pub"
        return key, pub, result.stdout.strip()

    @property
    def lock(self) -> Path:
        return self.definition / "reprobuild.lock"

    @property
    def sig(self) -> Path:
        return self.definition / "reprobuild.lock.sig"

    def sign(self, key: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run("lock", "-C", str(self.definition), "--resign", "--sign-key", str(key), env=env)

    def verify(self, trusted: Path) -> subprocess.CompletedProcess[str]:
        return run("lock", "-C", str(self.definition), "--verify", "--trusted-key", str(trusted), check=False)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_keygen_writes_openssh_keys_and_refuses_to_overwrite(setup: Setup) -> None:
    assert setup.key.stat().st_mode & 0o777 == 0o600
    assert setup.key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    # ssh-keygen reads both halves and derives the same public key from the private one.
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(setup.key)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == setup.pub.read_text().split()[:2]
    line = setup.allowed.read_text().strip()
    assert line.startswith(f'{IDENTITY} namespaces="reprobuild-lock" ssh-ed25519 ')
    before = setup.key.read_bytes()
    again = run("keygen", "--out", str(setup.root / "keys" / "lock"), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert setup.key.read_bytes() == before


def test_fresh_lock_verifies_with_ssh_keygen_and_reprobuild(setup: Setup) -> None:
    setup.sign(setup.key)
    result = ssh_verify(setup.definition, setup.allowed)
    assert result.returncode == 0, result.stderr
    assert f'Good "reprobuild-lock" signature for {IDENTITY}' in result.stdout
    # Byte-identical to what ssh-keygen -Y sign writes with the same key (ed25519 is deterministic).
    copy = setup.root / "copy.lock"
    shutil.copy(setup.lock, copy)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(setup.key), "-n", "reprobuild-lock", str(copy)],
                   check=True, capture_output=True)  # fmt: skip
    assert copy.with_name("copy.lock.sig").read_bytes() == setup.sig.read_bytes()
    first = setup.sig.read_bytes()
    setup.sign(setup.key)
    assert setup.sig.read_bytes() == first, "re-signing an unchanged lock gives the same bytes"
    for trusted in (setup.allowed, setup.pub):
        ok = setup.verify(trusted)
        assert ok.returncode == 0, ok.stderr
        assert "signature verified" in ok.stdout


def test_one_byte_edit_fails(setup: Setup) -> None:
    setup.sign(setup.key)
    data = bytearray(setup.lock.read_bytes())
    data[len(data) // 2] ^= 0x01
    setup.lock.write_bytes(bytes(data))
    assert ssh_verify(setup.definition, setup.allowed).returncode != 0
    bad = setup.verify(setup.allowed)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_signature_edit_fails(setup: Setup) -> None:
    """Changed lock bytes that still parse: reprobuild says the lock changed after signing."""
    setup.sign(setup.key)
    lock = json.loads(setup.lock.read_text())
    lock["seed"] = "0" * 32
    setup.lock.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    assert ssh_verify(setup.definition, setup.allowed).returncode != 0
    with pytest.raises(keys.VerificationFailed, match="changed after signing"):
        keys.verify_lock(setup.lock.read_bytes(), setup.sig.read_bytes(), "sig", keys.load_trusted_keys(setup.allowed))


def test_signature_by_another_key_fails(setup: Setup) -> None:
    other_key, _, _ = setup.keygen("other")
    setup.sign(other_key)
    result = ssh_verify(setup.definition, setup.allowed)
    assert result.returncode != 0
    bad = setup.verify(setup.allowed)
    assert bad.returncode == 1 and "does not trust" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_allowed_signers_with_the_wrong_namespace_fails(setup: Setup) -> None:
    setup.sign(setup.key)
    wrong = setup.root / "allowed_git"
    wrong.write_text(setup.allowed.read_text().replace('namespaces="reprobuild-lock"', 'namespaces="git"'))
    assert ssh_verify(setup.definition, wrong).returncode != 0
    assert ssh_verify(setup.definition, setup.allowed).returncode == 0  # same key, right namespace
    bad = setup.verify(wrong)
    assert bad.returncode == 1 and "not for namespace reprobuild-lock" in bad.stderr
    # A signature made for another namespace is refused even by a key trusted for every namespace.
    sig = sshsig.decode(setup.sig.read_bytes(), "sig")
    key = keys.load_private_key(setup.key)
    forged = sshsig.make_signature(sig.public_key, "git", key.sign(sshsig.signed_data("git", setup.lock.read_bytes())))
    setup.sig.write_bytes(sshsig.encode(forged))
    assert ssh_verify(setup.definition, setup.allowed).returncode != 0
    assert "namespace" in setup.verify(setup.pub).stderr


def test_old_json_signature_still_verifies_and_resign_migrates(setup: Setup) -> None:
    key = keys.load_private_key(setup.key)
    blob = sshsig.public_key_blob(key.public_key())
    data = setup.lock.read_bytes()
    setup.sig.write_text(json.dumps({"algorithm": "ed25519", "key_id": keys.legacy_key_id(blob),
                                     "signature": base64.b64encode(key.sign(data)).decode()}, indent=2) + "\n")
    ok = setup.verify(setup.pub)
    assert ok.returncode == 0 and "old JSON signature format" in ok.stdout
    data_edit = data.replace(b'"version": 1', b'"version": 1 ')
    with pytest.raises(keys.VerificationFailed, match="changed after signing"):
        keys.verify_lock(data_edit, setup.sig.read_bytes(), "sig", keys.load_trusted_keys(setup.pub))
    setup.sign(setup.key)
    assert sshsig.is_armored(setup.sig.read_bytes())
    assert ssh_verify(setup.definition, setup.allowed).returncode == 0


def test_committed_locks_verify_with_ssh_keygen() -> None:
    for name in ("minimal", "bootable"):
        directory = REPO / "lock" / name
        result = ssh_verify(directory, directory / "allowed_signers", identity="release@reprobuild")
        assert result.returncode == 0, f"lock/{name}: {result.stderr}"
        trusted = keys.load_trusted_keys(directory / "lock.pub")
        keys.verify_lock((directory / "reprobuild.lock").read_bytes(),
                         (directory / "reprobuild.lock.sig").read_bytes(), name, trusted)


# -- ssh-agent -----------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real ssh-agent on a socket in tmp_path, stopped afterwards; yields the environment."""
    if shutil.which("ssh-agent") is None:
        pytest.skip("needs ssh-agent")
    sock = tmp_path / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        yield _env(SSH_AUTH_SOCK=str(sock))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def test_agent_signs_with_no_private_key_file(setup: Setup, agent: dict[str, str]) -> None:
    setup.sign(setup.key)
    by_file = setup.sig.read_bytes()
    setup.sig.unlink()
    subprocess.run(["ssh-add", "-q", str(setup.key)], env=agent, check=True, capture_output=True)
    # A second key in the agent: "agent:" alone is then ambiguous and must be named.
    other_key, _, _ = setup.keygen("other")
    subprocess.run(["ssh-add", "-q", str(other_key)], env=agent, check=True, capture_output=True)
    setup.key.unlink()
    other_key.unlink()
    assert not list((setup.root / "keys").glob("*.key")), "no private key file is left for the build"
    ambiguous = run("lock", "-C", str(setup.definition), "--resign", "--sign-key", "agent:", env=agent, check=False)
    assert ambiguous.returncode == 1 and "several ssh-ed25519 keys" in ambiguous.stderr
    fingerprint = sshsig.fingerprint(sshsig.parse_public_key_line(setup.pub.read_text(), "pub"))
    result = setup.sign(f"agent:{fingerprint}", env=agent)
    assert "ssh-agent key" in result.stdout
    assert setup.sig.read_bytes() == by_file, "the agent's signature is the file key's, byte for byte"
    assert ssh_verify(setup.definition, setup.allowed).returncode == 0
    missing = run("lock", "-C", str(setup.definition), "--resign", "--sign-key", "agent:nobody@example",
                  env=agent, check=False)  # fmt: skip
    assert missing.returncode == 1 and "no ssh-ed25519 key named 'nobody@example'" in missing.stderr


def test_agent_selected_by_comment_via_config(setup: Setup, agent: dict[str, str]) -> None:
    subprocess.run(["ssh-add", "-q", str(setup.key)], env=agent, check=True, capture_output=True)
    conf = setup.definition / "reprobuild.conf"
    conf.write_text("\n".join(ln for ln in conf.read_text().splitlines() if not ln.startswith("LockKey="))
                    + f"\n[Signing]\nLockKey=agent:{IDENTITY}\n")  # fmt: skip
    setup.key.unlink()
    run("lock", "-C", str(setup.definition), "--resign", env=agent)
    assert ssh_verify(setup.definition, setup.allowed).returncode == 0


def test_no_agent_is_a_one_line_error(setup: Setup, tmp_path: Path) -> None:
    for env in (_env(), _env(SSH_AUTH_SOCK=str(tmp_path / "nothing.sock"))):
        result = run("lock", "-C", str(setup.definition), "--resign", "--sign-key", "agent:", env=env, check=False)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert not setup.sig.exists()


# -- hygiene -------------------------------------------------------------------------------------


def test_readable_private_key_warns(setup: Setup) -> None:
    signing = SigningConfig(lock_key=setup.key, verity_key=setup.key)
    assert key_file_warnings(signing) == []
    setup.key.chmod(0o644)
    warnings = key_file_warnings(signing)
    assert len(warnings) == 1 and str(setup.key) in warnings[0] and "0644" in warnings[0]
    assert key_file_warnings(SigningConfig(lock_key="agent:", verity_key="pkcs11:token=t;object=o")) == []


def test_messages_carry_no_key_material(setup: Setup) -> None:
    """Errors about a key name the file, never its bytes."""
    pem = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    text = pem.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()  # fmt: skip
    broken = setup.root / "broken.key"
    broken.write_text(text[:-40] + "\n")
    result = run("lock", "-C", str(setup.definition), "--resign", "--sign-key", str(broken), check=False)
    assert result.returncode == 1
    body = "".join(text.splitlines()[1:-1])
    assert body[:20] not in result.stderr and hashlib.sha256(body.encode()).hexdigest() not in result.stderr


def test_provenance_signed_through_the_agent_equals_the_key_file(setup: Setup, agent: dict[str, str]) -> None:
    """DSSE over the statement by the agent's key: the same envelope as with the key file."""
    from reprobuild.provenance import PAYLOAD_TYPE, open_envelope, sign_envelope

    statement = {"_type": "https://in-toto.io/Statement/v1", "predicateType": "https://slsa.dev/provenance/v1",
                 "subject": [], "predicate": {}}  # fmt: skip
    by_file = sign_envelope(statement, keys.open_lock_signer(setup.key, {}))
    subprocess.run(["ssh-add", "-q", str(setup.key)], env=agent, check=True, capture_output=True)
    by_agent = sign_envelope(statement, keys.open_lock_signer("agent:", agent))
    assert by_agent == by_file and by_agent["payloadType"] == PAYLOAD_TYPE
    trusted = keys.load_trusted_keys(setup.allowed).keys_for(keys.LOCK_NAMESPACE)
    assert open_envelope(by_agent, trusted) == statement
    assert by_agent["signatures"][0]["keyid"].startswith("SHA256:")


def test_encrypted_key_file_points_to_the_agent(setup: Setup) -> None:
    encrypted = setup.root / "enc"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(encrypted)], check=True)
    result = run("lock", "-C", str(setup.definition), "--resign", "--sign-key", str(encrypted), check=False)
    assert result.returncode == 1 and "encrypted" in result.stderr and "agent:" in result.stderr
    rsa = setup.root / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    result = run("lock", "-C", str(setup.definition), "--resign", "--sign-key", str(rsa), check=False)
    assert result.returncode == 1 and "needs an ed25519 key" in result.stderr


def test_key_and_signature_files_are_read_bounded(tmp_path: Path) -> None:
    """A FIFO, a device or a huge sparse file given as a signature or key is refused before it is
    read (a crafted pull request cannot hang or exhaust `lock --verify` or `verify`)."""
    import os
    import time

    fifo = tmp_path / "reprobuild.lock.sig"
    os.mkfifo(fifo)
    sparse = tmp_path / "huge.pub"
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)
    started = time.monotonic()
    for path, what in ((fifo, "signature file"), (Path("/dev/zero"), "signature file"), (sparse, "public key file")):
        with pytest.raises(keys.KeyFileError, match="not a"):
            keys.read_key_file(path, what)
    with pytest.raises(keys.KeyFileError, match="not a"):
        keys.load_trusted_keys(sparse)
    assert time.monotonic() - started < 5
