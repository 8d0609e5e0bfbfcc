"""Live: the bootable image (lock/bootable's definition, freshly locked from the mirror) built with
its verity and Secure Boot keys in a SoftHSM2 token is byte-identical to the build with the same
keys as files; sbverify accepts the UKI; ``reprobuild verify`` passes; the lock is signed by a key
held only in a real ssh-agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from reprobuild.image.gpt import read_gpt_path
from tests.live_images import make_definition, make_keys, require_tools, run_reprobuild

pytestmark = pytest.mark.live

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "2468"


def _token(root: Path, keys: dict[str, Path]) -> dict[str, str]:
    """A SoftHSM2 token in ``root`` holding ``keys`` (label -> PEM key); returns its environment."""
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "release", "--pin", PIN, "--so-pin", "1357"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    for number, (label, key) in enumerate(keys.items(), 1):
        subprocess.run(["softhsm2-util", "--import", str(key), "--token", "release", "--label", label,
                        "--id", f"{number:02x}", "--pin", PIN], env=env, check=True, capture_output=True)  # fmt: skip
    return {"SOFTHSM2_CONF": str(conf), "RELEASE_TOKEN_PIN": PIN}


def _uki(image: Path, work: Path) -> Path:
    disk = read_gpt_path(image)
    esp = next(p for p in disk.partitions if p.name == "esp")
    with open(image, "rb") as src, open(work / "esp.img", "wb") as dst:
        src.seek(esp.offset(disk.sector_size))
        dst.write(src.read(esp.size(disk.sector_size)))
    subprocess.run(["mcopy", "-i", str(work / "esp.img"), "::/EFI/BOOT/BOOTX64.EFI", str(work / "uki.efi")],
                   check=True, capture_output=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    return work / "uki.efi"


@pytest.mark.timeout(3600)
def test_bootable_image_with_token_keys_equals_file_keys(tmp_path: Path) -> None:
    require_tools("sbverify", "mcopy", "softhsm2-util", "ssh-agent", "ssh-add")
    if not MODULE.exists():
        pytest.skip("needs softhsm2")
    keys = make_keys(tmp_path / "keys")
    token_env = _token(tmp_path / "hsm", {"verity": keys.verity_key, "secure-boot": keys.sb_key})

    # The lock key lives only in an ssh-agent: the definition names agent:, no key file remains.
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not sock.exists():
            time.sleep(0.05)
        agent_env = {**{k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(keys.lock_key)], env=agent_env, check=True, capture_output=True)
        keys.lock_key.unlink()

        by_file = make_definition(tmp_path / "file", "bootable", keys)
        conf = (by_file / "reprobuild.conf").read_text().replace(f"LockKey={keys.lock_key}", "LockKey=agent:")
        (by_file / "reprobuild.conf").write_text(conf)
        run_reprobuild("lock", "-C", str(by_file), "-q", env=agent_env, timeout=900)
        by_token = tmp_path / "token" / "bootable"
        shutil.copytree(by_file, by_token)
        source = f"module-path={MODULE}&pin-source=env:RELEASE_TOKEN_PIN"
        conf = (conf.replace(f"VerityKey={keys.verity_key}", f"VerityKey=pkcs11:token=release;object=verity?{source}")
                .replace(f"SecureBootKey={keys.sb_key}", f"SecureBootKey=pkcs11:token=release;object=secure-boot?{source}"))
        (by_token / "reprobuild.conf").write_text(conf)

        env = {**agent_env, **token_env}
        images = {}
        for name, directory in (("file", by_file), ("token", by_token)):
            out = tmp_path / f"out-{name}"
            started = time.monotonic()
            # The token build runs without the cache: every signature in it is made by the token.
            extra = ("--no-cache",) if name == "token" else ()
            result = run_reprobuild("build", "-C", str(directory), "--locked", "-o", str(out), *extra, env=env,
                                    timeout=1800)  # fmt: skip
            print(f"build with {name} keys: {time.monotonic() - started:.1f}s")
            assert PIN not in result.stdout + result.stderr
            images[name] = out / "image.raw"
            provenance = (out / "image.raw.intoto.jsonl").read_text()
            assert json.loads(provenance)["signatures"], "the provenance is signed by the agent's key"
            assert PIN not in (out / "image.raw.manifest.json").read_text() and PIN not in provenance
        digests = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in images.items()}
        print(f"image.raw sha256: {digests}")
        assert digests["token"] == digests["file"]

        uki = _uki(images["token"], tmp_path)
        subprocess.run(["sbverify", "--cert", str(keys.sb_crt), str(uki)], check=True, capture_output=True)
        verified = run_reprobuild("verify", str(images["token"]), "--lock", str(by_token / "reprobuild.lock"),
                                  "--trusted-key", str(keys.lock_pub), "--certificate", str(keys.verity_crt),
                                  "--certificate", str(keys.sb_crt), "--provenance",
                                  str(tmp_path / "out-token" / "image.raw.intoto.jsonl"), "--no-rebuild", "--json",
                                  env=env)  # fmt: skip
        report = json.loads(verified.stdout)
        statuses = {c["name"]: c["status"] for c in report["checks"]}
        assert statuses["lock-signature"] == "passed" and statuses["provenance"] == "passed", statuses
        assert "failed" not in statuses.values(), statuses
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
