"""Session-scoped live images: locked from the real Debian mirror and built once per test run.

Every image is built twice by the real command line, in parallel, under deliberately different
conditions, so that each test of the pair can compare sha256 without building again:

* build A: a cold, empty store with the build cache on (so every stage takes the cached path:
  per-package payloads, the installed tree extracted in the store and configured through an
  overlay, the tools tree used in place); cwd = the image directory; TZ=UTC, LC_ALL=C.UTF-8,
  umask 022;
* build B: the warm shared store, ``--no-cache`` (every stage built in one piece, as a user
  distrusting the cache would); cwd = /; TZ=Pacific/Chatham, LC_ALL=C, LANG=fr_FR.UTF-8,
  umask 077; a longer, differently named output directory.

So every pair that compares equal also proves a cached build byte-identical to an uncached one.

Definitions come from the project's reference definitions under ``lock/`` (minus their signing
key, plus test keys), locked fresh: the committed locks may name versions the mirror has dropped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from reprobuild.fileio import sha256_file

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 1500

MARKER_UNIT = """\
[Unit]
Description=Report on the kernel console that the image reached multi-user
After=multi-user.target systemd-user-sessions.service

[Service]
Type=oneshot
# /dev/kmsg reaches the serial console whatever getty does with ttyS0.
ExecStart=/bin/sh -c 'echo "REPROBUILD-MARKER root=$(findmnt -no SOURCE,OPTIONS /) REPROBUILD-MARKER-END" > /dev/kmsg'

[Install]
WantedBy=multi-user.target
"""


# A unit that reports a digest of the system credential "reprobuild.test" (given to the guest by
# `reprobuild vm --credential…`), or "none", on the kernel console: the secret itself is never shown.
CREDENTIAL_UNIT = """\
[Unit]
Description=Report on the kernel console the credential reprobuild.test that systemd imported

[Service]
Type=oneshot
ImportCredential=reprobuild.test
ExecStart=/usr/local/bin/reprobuild-credential

[Install]
WantedBy=multi-user.target
"""
CREDENTIAL_SCRIPT = """\
#!/bin/sh
if [ -r "$CREDENTIALS_DIRECTORY/reprobuild.test" ]; then
  seen=$(sha256sum < "$CREDENTIALS_DIRECTORY/reprobuild.test" | cut -c1-16)
else
  seen=none
fi
echo "REPROBUILD-CREDENTIAL $seen END" > /dev/kmsg
"""


@dataclass(frozen=True)
class Keys:
    lock_key: Path
    lock_pub: Path
    verity_key: Path
    verity_crt: Path
    sb_key: Path
    sb_crt: Path


@dataclass(frozen=True)
class BuiltPair:
    directory: Path
    output_a: Path
    output_b: Path
    log_a: str
    log_b: str

    def sha256(self, name: str) -> tuple[str, str]:
        return sha256_file(self.output_a / name), sha256_file(self.output_b / name)


def reprobuild_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "reprobuild", *args]


def run_reprobuild(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                   timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(reprobuild_argv(*args), cwd=cwd, env=env or dict(os.environ), text=True,
                            capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"reprobuild {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    run_reprobuild("keygen", "--out", str(directory / "lock"))
    run_reprobuild("keygen", "--verity", "--out", str(directory / "verity"))
    run_reprobuild("keygen", "--secure-boot", "--out", str(directory / "sb"))
    return Keys(directory / "lock.key", directory / "lock.pub", directory / "verity.key", directory / "verity.crt",
                directory / "sb.key", directory / "sb.crt")


def make_definition(root: Path, reference: str, keys: Keys, extra_conf: str = "",
                    extra_files: dict[str, str] | None = None) -> Path:
    """A copy of ``lock/<reference>/reprobuild.conf`` using the test keys, locked fresh."""
    directory = root / reference
    directory.mkdir(parents=True)
    conf = (REPO / "lock" / reference / "reprobuild.conf").read_text()
    conf = "\n".join(line for line in conf.splitlines()
                     if not line.split("=", 1)[0].strip() in ("LockKey", "VerityKey", "VerityCertificate",
                                                              "SecureBootKey", "SecureBootCertificate"))
    conf += (f"\n[Signing]\nLockKey={keys.lock_key}\nVerityKey={keys.verity_key}\n"
             f"VerityCertificate={keys.verity_crt}\nSecureBootKey={keys.sb_key}\n"
             f"SecureBootCertificate={keys.sb_crt}\n{extra_conf}")
    (directory / "reprobuild.conf").write_text(conf)
    write_files(directory, extra_files or {})
    return directory


def write_files(directory: Path, files: dict[str, str]) -> None:
    """Write ``files`` (relative path → text, or ``"symlink:TARGET"``) below ``directory``."""
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text.startswith("symlink:"):
            path.symlink_to(text.removeprefix("symlink:"))
        else:
            path.write_text(text)


def build_pair(directory: Path, warm_store: Path, cold_store: Path, fmt: str, name: str) -> BuiltPair:
    """Build ``directory`` twice in parallel under different conditions (see module docstring)."""
    run_reprobuild("fetch", "-C", str(directory), "--store", str(warm_store), "-q", timeout=900)
    out_a = directory / f"out-{name}"
    out_b = directory.parent / f"other place with spaces/{name}/output B"
    out_b.parent.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("SOURCE_DATE_EPOCH", "TZ", "LANG", "LC_ALL")}
    env_a = {**base, "TZ": "UTC", "LC_ALL": "C.UTF-8", "REPROBUILD_STORE": str(cold_store)}
    env_b = {**base, "TZ": "Pacific/Chatham", "LC_ALL": "C", "LANG": "fr_FR.UTF-8",
             "REPROBUILD_STORE": str(warm_store)}
    command = reprobuild_argv("build", "-C", str(directory), "--locked", "-f", fmt, "-q")
    procs = [
        subprocess.Popen(["sh", "-c", 'umask 022; exec "$@"', "sh", *command, "-o", str(out_a)],
                         cwd=directory, env=env_a, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        subprocess.Popen(["sh", "-c", 'umask 077; exec "$@"', "sh", *command, "--no-cache", "-o", str(out_b)],
                         cwd="/", env=env_b, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
    ]
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        logs.append(out)
    for proc, log in zip(procs, logs):
        if proc.returncode != 0:
            raise AssertionError(f"build of {directory.name} ({fmt}) failed ({proc.returncode}):\n{log[-4000:]}")
    return BuiltPair(directory, out_a, out_b, logs[0], logs[1])


@pytest.fixture(scope="session")
def live_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("live")


@pytest.fixture(scope="session")
def live_keys(live_root: Path) -> Keys:
    return make_keys(live_root / "keys")


@pytest.fixture(scope="session")
def warm_store(live_root: Path) -> Path:
    return live_root / "store-warm"


@pytest.fixture(scope="session")
def minimal_trixie(live_root: Path, live_keys: Keys) -> Path:
    directory = make_definition(live_root / "defs", "minimal", live_keys)
    run_reprobuild("lock", "-C", str(directory), "--store", str(live_root / "store-warm"), "-q")
    return directory


@pytest.fixture(scope="session")
def minimal_tar(minimal_trixie: Path, warm_store: Path, live_root: Path) -> BuiltPair:
    return build_pair(minimal_trixie, warm_store, live_root / "store-cold-tar", "tar", "tar")


@pytest.fixture(scope="session")
def minimal_disk(minimal_trixie: Path, warm_store: Path, live_root: Path) -> BuiltPair:
    return build_pair(minimal_trixie, warm_store, live_root / "store-cold-disk", "disk", "disk")


@pytest.fixture(scope="session")
def bootable_trixie(live_root: Path, live_keys: Keys) -> Path:
    directory = make_definition(
        live_root / "defs", "bootable", live_keys, extra_conf="[Content]\nExtraTrees=extra\n",
        extra_files={
            "extra/etc/systemd/system/reprobuild-marker.service": MARKER_UNIT,
            "extra/etc/systemd/system/multi-user.target.wants/reprobuild-marker.service":
                "symlink:../reprobuild-marker.service",
            "extra/etc/systemd/system/reprobuild-credential.service": CREDENTIAL_UNIT,
            "extra/etc/systemd/system/multi-user.target.wants/reprobuild-credential.service":
                "symlink:../reprobuild-credential.service",
            "extra/usr/local/bin/reprobuild-credential": CREDENTIAL_SCRIPT,
        })
    (directory / "extra/usr/local/bin/reprobuild-credential").chmod(0o755)
    run_reprobuild("lock", "-C", str(directory), "--store", str(live_root / "store-warm"), "-q")
    return directory


@pytest.fixture(scope="session")
def bootable_disk(bootable_trixie: Path, warm_store: Path, live_root: Path) -> BuiltPair:
    return build_pair(bootable_trixie, warm_store, live_root / "store-cold-boot", "disk", "disk")


@pytest.fixture(scope="session")
def minimal_bookworm(live_root: Path, live_keys: Keys) -> Path:
    directory = make_definition(live_root / "defs-bookworm", "minimal", live_keys,
                                extra_conf="[Distribution]\nRelease=bookworm\n")
    run_reprobuild("lock", "-C", str(directory), "--store", str(live_root / "store-warm"), "-q")
    return directory


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise AssertionError(f"tools missing (make setup installs them): {', '.join(missing)}")
