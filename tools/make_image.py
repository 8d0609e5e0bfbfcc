#!/usr/bin/env python3
"""``make image``: build a reference image from its committed lock, on any fresh machine.

1. Signing keys: the committed locks are signed by the project's release key, whose private half
   is not in the repository. Building needs the verity and Secure Boot keys named in the image's
   configuration (``keys/`` at the top of the checkout); missing ones are generated here as local
   development keys and said so — images signed with them are reproducible on this machine, and on
   any machine given the same keys.
2. ``build --locked`` from the committed lock.
3. When the committed lock can no longer be fetched (Debian drops superseded versions from its
   mirrors and no snapshot mirror or substituter is configured), it says so, re-locks a scratch
   copy of the definition under ``out/relock/`` and builds that instead of failing.

Usage: tools/make_image.py IMAGE_DIR OUTPUT_DIR
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from reprobuild.build import BuildOptions, build_locked
from reprobuild.config import load_spec
from reprobuild.errors import ReprobuildError
from reprobuild.fetch import FetchFailed
from reprobuild.lock import LockOptions, lock_spec
from reprobuild.lockfile import load_lock, save_lock
from reprobuild.progress import make_reporter
from reprobuild.store import Store


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_keys(spec) -> None:
    from reprobuild.x509 import generate_rsa_key_and_certificate

    pairs = [(spec.signing.verity_key, spec.signing.verity_certificate, "reprobuild verity (development)"),
             (spec.signing.secure_boot_key, spec.signing.secure_boot_certificate,
              "reprobuild Secure Boot (development)")]
    for key, cert, name in pairs:
        # A key in a token (pkcs11: URI) is not generated here; nor is an existing pair.
        if key is None or cert is None or isinstance(key, str) or (key.exists() and cert.exists()):
            continue
        say(f"make image: generating a development key pair {key} / {cert}")
        key_pem, cert_pem = generate_rsa_key_and_certificate(name)
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(key_pem)
        key.chmod(0o600)
        cert.write_bytes(cert_pem)


def build(directory: Path, output: Path, store: Store) -> Path:
    spec = load_spec(directory)
    ensure_keys(spec)
    lock = load_lock(spec.lock_path)
    # One reporter for messages, stage progress and downloads: a live status per stage on a
    # terminal, a few lines per stage in a log.
    reporter = make_reporter(False)
    try:
        result = build_locked(spec, lock, store, BuildOptions(output_dir=output), say=reporter,
                              fetch_progress=reporter)
    finally:
        reporter.close()
    return result.outputs[spec.build.format]


def relock_scratch_copy(directory: Path, output: Path) -> Path:
    scratch = output / "relock" / directory.name
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(directory, scratch, ignore=shutil.ignore_patterns("out", "*.sig"))
    # The scratch lock is not the project's release artefact: it is written unsigned.
    conf = scratch / "reprobuild.conf.d"
    conf.mkdir(exist_ok=True)
    (conf / "zz-make-image.conf").write_text(
        "# written by make image: re-lock of a definition whose committed lock can no longer be fetched\n"
        "[Signing]\nLockKey=\n"
        f"VerityKey={(directory / '../../keys/verity.key').resolve()}\n"
        f"VerityCertificate={(directory / '../../keys/verity.crt').resolve()}\n"
        f"SecureBootKey={(directory / '../../keys/secure-boot.key').resolve()}\n"
        f"SecureBootCertificate={(directory / '../../keys/secure-boot.crt').resolve()}\n")
    spec = load_spec(scratch)
    save_lock(lock_spec(spec, None, LockOptions(progress=say,
                                                index_cache=Store(Store.default_root()).root / "indices")).lock,
              spec.lock_path)
    return scratch


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        say(__doc__.strip().splitlines()[-1])
        return 2
    directory, output = Path(argv[1]).resolve(), Path(argv[2]).resolve()
    store = Store(Store.default_root())
    started = time.monotonic()
    try:
        try:
            image = build(directory, output, store)
        except FetchFailed as e:
            if not any(a.not_found for f in e.failures for a in f.attempts):
                raise
            say(f"make image: the committed lock of {directory.name} can no longer be fetched "
                f"({len(e.failures)} package(s) gone from the mirror); re-locking a scratch copy")
            scratch = relock_scratch_copy(directory, output)
            image = build(scratch, output, store)
    except ReprobuildError as e:
        say(f"error: {e.format_message()}")
        return e.exit_code
    say(f"make image: {image} built in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
