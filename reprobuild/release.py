"""``reprobuild release``: the disk image built from the lock alone, split into versioned artifacts
with a ``SHA256SUMS`` and, given an OpenPGP key, its detached signature ``SHA256SUMS.gpg``.

The artifacts are what systemd-sysupdate transfers: the root (or ``/usr``) partition, its
dm-verity hash partition, its verity signature partition — each the partition's whole extent as
it lies in ``image.raw`` — and the UKI, named ``<id>_<version>_<partition uuid>.<role>.raw`` and
``<id>_<version>.efi`` from ``ImageId=`` and ``ImageVersion=`` (the patterns of the image's
transfer files, :mod:`reprobuild.image.sysupdate`: ``@u`` gives the new partition its UUID). Everything is derived from the
built image, so a release rebuilt from the same lock is byte-identical; the signature is too
(its time is pinned, see :func:`sign_sums`). Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from reprobuild.build import BuildOptions, BuildResult, build_locked
from reprobuild.compression import COMPRESSIONS, SUFFIXES, compressing_writer
from reprobuild.config import ImageSpec
from reprobuild.errors import BuildError, ConfigError, ToolMissing
from reprobuild.fileio import write_atomic, write_atomically_hashed
from reprobuild.image import gpt, ids
from reprobuild.image.ddi import copy_partition
from reprobuild.image.sysupdate import SOURCE_COMPRESSIONS, artifact_name, uki_name
from reprobuild.lockfile import Lock
from reprobuild.progress import Update
from reprobuild.store import Store
from reprobuild.verify import read_esp_file

Say = Callable[[str], None]

SUMS_NAME = "SHA256SUMS"
SIGNATURE_NAME = "SHA256SUMS.gpg"


@dataclass(frozen=True)
class ReleaseOptions:
    release_dir: Path
    build: BuildOptions  # where the image itself is built (its format is always disk)
    sign_key: str | None = None  # overrides [Signing] ReleaseKey=
    compress: str = "none"  # one of reprobuild.compression.COMPRESSIONS


@dataclass(frozen=True)
class ReleaseArtifact:
    file: str
    sha256: str
    size: int
    source: str  # the partition role ("root", "root-verity", …) or "uki"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "size": self.size, "source": self.source}


@dataclass
class ReleaseResult:
    directory: Path
    name: str
    artifacts: list[ReleaseArtifact] = field(default_factory=list)
    sums: Path | None = None
    signature: Path | None = None
    build: BuildResult | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "name": self.name,
                "artifacts": [a.as_dict() for a in self.artifacts],
                "sha256sums": str(self.sums) if self.sums else None,
                "signature": str(self.signature) if self.signature else None,
                "image": str(self.build.outputs["disk"]) if self.build else None}


def release_name(spec: ImageSpec) -> str:
    """``<id>_<version>``; a release needs both settings."""
    name = spec.build.versioned_name
    if name is None:
        raise ConfigError("a release needs [Build] ImageId= and ImageVersion= (its files are named <id>_<version>)",
                          hint="set both in reprobuild.conf, or pass --set Build.ImageVersion=… for a one-off")
    return name


def format_sums(entries: Mapping[str, str]) -> bytes:
    """sha256sum(1) lines (``<hex>  <name>``), sorted by name: what ``sha256sum -c`` and
    systemd-sysupdate read."""
    return "".join(f"{entries[name]}  {name}\n" for name in sorted(entries)).encode()


def release(spec: ImageSpec, lock: Lock, store: Store, options: ReleaseOptions, say: Say = lambda _m: None,
            fetch_progress=None) -> ReleaseResult:
    """Build the disk image from ``lock`` (:func:`build_locked`) and write the release into
    ``options.release_dir``. Returns what was written."""
    name = release_name(spec)
    if options.compress not in COMPRESSIONS:
        raise ConfigError(f"unknown compression {options.compress!r}; expected one of: {', '.join(COMPRESSIONS)}")
    if options.compress not in SOURCE_COMPRESSIONS and spec.updates.source is not None:
        readable = " or ".join(f"--compress {c}" for c in SOURCE_COMPRESSIONS if c != "none")
        raise ConfigError(f"--compress {options.compress}: the image's systemd-sysupdate could not read these files "
                          "(Debian trixie's systemd-pull decompresses xz and gzip, not zstd)",
                          hint=f"use {readable} for an image with [Updates]")
    key = options.sign_key or spec.signing.release_key
    gpg = _gpg() if key else None
    if key and gpg:
        key_created(gpg, key, os.environ)  # before the build: a missing gpg or key is known at once
    built = build_locked(spec, lock, store, replace(options.build, format="disk"), say, fetch_progress)
    signature = options.release_dir / SIGNATURE_NAME
    # An earlier release's signature would not match the new SHA256SUMS, also if signing fails.
    signature.unlink(missing_ok=True)
    result = write_release(built.outputs["disk"], built.manifest, options.release_dir, name, options.compress, say)
    result.build = built
    if key and gpg:
        say(f"signing {SUMS_NAME} with OpenPGP key {key}")
        assert result.sums is not None
        sign_sums(gpg, result.sums, signature, key, lock.source_date_epoch, os.environ)
        result.signature = signature
    return result


def write_release(image: Path, manifest: Mapping[str, Any], out: Path, name: str, compress: str = "none",
                  say: Say = lambda _m: None) -> ReleaseResult:
    """Split the DDI ``image`` (described by its build ``manifest``) into ``out``: every partition
    but the ESP as ``<name>_<partition uuid>.<role>.raw``, the UKI (read from the ESP at the manifest's
    ``boot.uki_path``) as ``<name>.efi``, then ``SHA256SUMS``. Each partition and the UKI must
    have the manifest's sha256."""
    out.mkdir(parents=True, exist_ok=True)
    result = ReleaseResult(directory=out, name=name)
    suffix = SUFFIXES[compress]
    verb = "writing" if compress == "none" else "compressing"
    disk = gpt.read_gpt_path(image)
    recorded = {p["uuid"]: p for p in manifest["partitions"]}
    for part in disk.partitions:
        ptype = ids.type_by_guid(part.type_guid)
        if ptype is None or ptype.role in (ids.Role.ESP, ids.Role.XBOOTLDR) or part.name == ids.EMPTY_LABEL:
            continue  # the ESP (its UKI follows), and the empty A/B slots
        role = ptype.role.value
        file = artifact_name(name, role, str(part.unique_guid)) + suffix
        entry = recorded.get(str(part.unique_guid), {})
        # The payload only: an A/B slot ([Updates] SlotSize=) is larger than what was written into it.
        keep = int(entry.get("payload_size") or part.size(disk.sector_size))
        extent = hashlib.sha256()
        report = _progress(say, verb, file, keep)
        written = _write(out / file, lambda f, p=part, k=keep, h=extent, r=report: copy_partition(
            image, p, disk.sector_size, _Prefix(f, k, h, r)), compress, role)
        report(keep)
        if entry.get("role") != role or extent.hexdigest() != entry.get("sha256"):  # the manifest's digest of the extent
            (out / file).unlink()
            raise BuildError(f"partition {role} of {image} differs from its manifest entry")
        result.artifacts.append(written)
    boot = manifest.get("boot")
    if boot:
        esp = next((p for p in disk.partitions if p.type_guid == ids.partition_type(ids.Role.ESP).guid), None)
        if esp is None:
            raise BuildError(f"{image} has no ESP, but its manifest names a UKI")
        uki = read_esp_file(image, esp.offset(disk.sector_size), boot["uki_path"])
        if hashlib.sha256(uki).hexdigest() != boot["uki_sha256"]:
            raise BuildError(f"the UKI in {image} differs from its manifest entry")
        file = uki_name(name) + suffix
        report = _progress(say, verb, file, len(uki))
        result.artifacts.append(_write(out / file, lambda f: f.write(uki), compress, "uki"))
        report(len(uki))
    result.sums = out / SUMS_NAME
    write_atomic(result.sums, format_sums({a.file: a.sha256 for a in result.artifacts}))
    return result


def _progress(say: Say, stage: str, file: str, total: int) -> Callable[[int], None]:
    """A callback taking the bytes done so far: an :class:`Update` in MiB every 16 MiB, and the
    stage's end when ``total`` is reached (compressing a partition with xz takes minutes)."""
    shown: list[int | None] = [-1]  # the last 16 MiB step shown; None once the end is
    mib = -(-total >> 20)  # rounded up: a small artifact is 1 MiB, not 0

    def report(done: int) -> None:
        if shown[0] is None:
            return
        if done >= total:
            shown[0] = None
            say(Update(f"{stage} {file}", mib, mib, "MiB"))
        elif done >> 24 != shown[0]:
            shown[0] = done >> 24
            say(Update(f"{stage} {file}", done >> 20, mib, "MiB"))

    report(0)
    return report


class _Prefix:
    """A write-only file that passes on the first ``keep`` bytes and hashes all of them into
    ``extent``; ``report`` is told the bytes passed on so far."""

    def __init__(self, inner: Any, keep: int, extent: Any, report: Callable[[int], None]) -> None:
        self.inner, self.keep, self.left, self.extent, self.report = inner, keep, keep, extent, report

    def write(self, data: bytes) -> int:
        self.extent.update(data)
        if self.left > 0:
            self.inner.write(data[:self.left])
            self.left -= min(len(data), self.left)
            self.report(self.keep - self.left)
        return len(data)


def _write(target: Path, fill: Callable[[Any], object], compress: str, source: str) -> ReleaseArtifact:
    """Write the artifact made from ``source`` atomically through ``fill`` (compressed by
    ``compress``). Its sha256 (of the file, as SHA256SUMS names it) is made on a second thread
    while it is written."""

    def writer(f: BinaryIO) -> None:
        packed = compressing_writer(f, compress)
        fill(packed)
        packed.close()

    digest = write_atomically_hashed(target, writer)
    return ReleaseArtifact(target.name, digest, target.stat().st_size, source)


def _gpg() -> str:
    exe = shutil.which("gpg")
    if exe is None:
        raise ToolMissing("gpg", "gpg", "to sign SHA256SUMS")
    return exe


def _run(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=dict(env), check=False, timeout=300)


def key_created(gpg: str, key: str, env: Mapping[str, str]) -> int:
    """The newest creation time among the secret key ``key`` and its subkeys (gpg's colon listing,
    field 6 of ``sec``/``ssb`` records, GnuPG's doc/DETAILS)."""
    r = _run([gpg, "--batch", "--with-colons", "--list-secret-keys", "--", key], env)
    times = [int(f[5]) for f in (line.split(":") for line in r.stdout.splitlines())
             if f[0] in ("sec", "ssb") and len(f) > 5 and f[5].isdigit()]
    if r.returncode != 0 or not times:
        home = env.get("GNUPGHOME") or "~/.gnupg"
        raise ConfigError(f"release key {key!r}: no such secret key in the keyring of {home}",
                          hint="name a key id, fingerprint or user id of `gpg --list-secret-keys`, or set GNUPGHOME")
    return max(times)


def sign_sums(gpg: str, sums: Path, signature: Path, key: str, epoch: int, env: Mapping[str, str]) -> None:
    """``gpg --detach-sign`` of ``sums`` into ``signature`` (binary OpenPGP, written atomically).

    The signature's creation time is pinned (``--faked-system-time T!``) to the lock's
    SOURCE_DATE_EPOCH, or to the key's creation time when the key is newer (a signature older than
    its key does not verify). With an EdDSA or RSA key, whose signatures are deterministic, the
    same SHA256SUMS and key give the same SHA256SUMS.gpg."""
    when = max(epoch, key_created(gpg, key, env))
    tmp = signature.with_name(f".{signature.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        r = _run([gpg, "--batch", "--yes", "--no-tty", "--faked-system-time", f"{when}!", "--digest-algo", "SHA256",
                  "--local-user", key, "--detach-sign", "--output", str(tmp), "--", str(sums)], env)
        if r.returncode != 0 or not tmp.is_file():
            lines = [line for line in r.stderr.splitlines() if "faked system time" not in line]
            raise BuildError(f"gpg could not sign {sums.name} with key {key!r}: "
                             f"{(lines[-1] if lines else r.returncode)}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, signature)
    finally:
        tmp.unlink(missing_ok=True)
