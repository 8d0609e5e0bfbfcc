"""The verify stage: an image, its manifest and its lock → a report of independent checks.

Every check recomputes what it checks from the bytes it is given and compares with what the
signed lock (or a trusted key/certificate) says; none trusts the manifest on its own, and each
runs whatever the others found, so one tampered partition shows up under every check it breaks
(a flipped root byte fails ``partition-hashes`` *and* ``verity-root-hash``). The checks:

``lock-signature``   the lock's detached signature verifies against the trusted ed25519 key
``manifest-lock``    the manifest names this lock (digest, config digest, epoch, release,
                     architecture) and exactly the lock's ``image`` package list
``build-set``        (locks with a ``build`` set) it holds every image package at the image's
                     version and sha256: the image's software was built against its libraries
``image-digest``     sha256 and size of the image file (or archive) equal the manifest's
``gpt``              the GPT is valid and its disk GUID, partition types, UUIDs, labels, flags,
                     offsets and sizes equal the manifest's; the disk GUID follows from the seed
``partition-hashes`` sha256 of every partition extent equals the manifest's
``verity-root-hash`` the root hash recomputed from the data partition (salt and superblock UUID
                     derived from the lock's seed) equals the manifest's, ``image.roothash`` and
                     the data/hash partition UUIDs (DPS: the UUIDs are halves of the root hash)
``verity-hash-tree`` every stored hash block equals the one recomputed from the data
``verity-signature`` the signature partition is a valid PKCS#7 signature over that root hash by
                     a trusted certificate
``uki-signature``    the UKI on the ESP has a valid Authenticode signature by a trusted certificate
``uki-roothash``     the UKI's ``.cmdline`` pins (``roothash=``/``usrhash=``) the recomputed root hash
``installed-packages`` (tar/directory) the tree's dpkg status lists exactly the lock's packages
``provenance``       (with a provenance file) the DSSE envelope verifies and names this lock and image
``rebuild``          an independent rebuild from the lock is byte-for-byte identical

A check is *passed*, *failed* or *skipped* (it could not apply, or the input needed to trust it,
such as a certificate, was not given; the detail says which). :attr:`VerifyReport.ok` requires
no failure and at least one pass. Cost: one read of the image for the digests, one for the
verity tree, a few small reads; the rebuild costs a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobuild.checkresult import UNSIGNED_KINDS, Check, all_passed, failed, passed, skipped, summary_line
from reprobuild.errors import FormatError, ReprobuildError, VerificationFailed
from reprobuild.fileio import ReadRefused, check_input, read_bounded
from reprobuild.lockfile import (
    SIGNATURE_SUFFIX,
    Lock,
    build_set_problems,
    loads,
    lock_digest,
    read_lock_bytes,
)
from reprobuild.progress import Update, set_counts
from reprobuild.rootfs.oci import read_layer_file

Say = Callable[[str], None]

# Build output format → the ``format`` the manifest records (build.py: disk manifests say "ddi").
MANIFEST_FORMATS = {"ddi": "disk", "disk": "disk", "tar": "tar", "cpio": "cpio", "directory": "directory",
                    "oci": "oci"}
_CHUNK = 4 << 20
MAX_MANIFEST_BYTES = 16 << 20  # an image manifest lists packages: a few hundred KiB at most
# What ``--allow-unsigned`` may name: the signatures verify can check.


class VerifyError(VerificationFailed):
    """Verification could not even start (unreadable lock or manifest path)."""


@dataclass(frozen=True)
class VerifyReport:
    image: str
    lock: str
    checks: tuple[Check, ...]
    diff_summary: str | None = None  # the diff's text summary when the rebuild differs
    diff: dict[str, Any] | None = None  # the diff as JSON data (schema reprobuild-diff/1)

    @property
    def ok(self) -> bool:
        return all_passed(self.checks)

    @property
    def summary(self) -> str:
        """The last line of the report: what was checked and what was not."""
        return summary_line(self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.passed is False)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def as_json(self) -> dict[str, Any]:
        return {"schema": "reprobuild-verify/1", "image": self.image, "lock": self.lock, "ok": self.ok,
                "checks": [c.as_json() for c in self.checks], "summary": self.summary,
                "not_checked": [{"name": c.name, "reason": c.reason or "not applicable"}
                                for c in self.checks if c.passed is None],
                "diff_summary": self.diff_summary, "diff": self.diff}  # fmt: skip


@dataclass(frozen=True)
class VerifyOptions:
    """What beyond the image and lock to use. ``rebuild`` defaults off in the library (the CLI
    turns it on unless ``--no-rebuild``): it costs a whole build."""

    manifest: Path | None = None  # default: IMAGE.manifest.json beside the image
    rebuild: bool = False
    definition: Path | None = None  # image directory for the rebuild; default: the lock's directory
    store: Path | None = None  # store for the rebuild; default: a fresh, empty one
    bundle: Path | None = None  # store bundle to import into that store (then the rebuild is offline)
    provenance: Path | None = None
    jobs: int = 4
    work_dir: Path | None = None  # where the rebuild's temporary directory goes
    # Signatures present but not to be checked (no trust anchor): a subset of UNSIGNED_KINDS.
    # Without its name here, a present signature that cannot be checked fails.
    allow_unsigned: frozenset[str] = frozenset()


# -- entry point ---------------------------------------------------------------------------------


def manifest_path_for(image: Path) -> Path:
    return image.with_name(image.name + ".manifest.json")


def verify_image(image: Path, lock_path: Path, trusted_key: Path | None = None,
                 certificates: Sequence[Path] = (), options: VerifyOptions = VerifyOptions(),
                 say: Say = lambda _m: None, fetch_progress: Any = None) -> VerifyReport:  # fmt: skip
    """Run every applicable check on ``image`` (a DDI, tar, cpio or directory output) against
    ``lock_path``. Never raises for a failed check: failures are in the report. Raises
    VerifyError only when the image or lock path does not exist. ``say`` gets messages and
    stage updates, ``fetch_progress`` (a :class:`reprobuild.progress.Progress`) the rebuild's
    downloads."""
    image, lock_path = Path(image), Path(lock_path)
    for what, p in (("image", image), ("lock", lock_path)):
        if not p.exists():
            raise VerifyError(f"{p}: no such {what}")
    checks: list[Check] = []
    lock_bytes = read_lock_bytes(lock_path)
    try:
        lock: Lock | None = loads(lock_bytes, str(lock_path))
    except ReprobuildError as e:
        lock = None
        checks.append(failed("lock", e.message))
    allow = options.allow_unsigned
    checks.append(check_lock_signature(lock_path, lock_bytes, trusted_key, "lock" in allow))

    manifest_file = options.manifest or manifest_path_for(image)
    try:
        manifest = json.loads(read_bounded(manifest_file, MAX_MANIFEST_BYTES))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - reported like a JSON syntax error
    except (OSError, ValueError, RecursionError, ReadRefused) as e:
        checks.append(failed("manifest", f"{manifest_file}: unreadable manifest ({e})"))
        return VerifyReport(str(image), str(lock_path), tuple(checks))
    if lock is None:
        return VerifyReport(str(image), str(lock_path), tuple(checks))
    checks.append(check_manifest_lock(manifest, lock))
    if lock.has_set("build"):
        checks.append(check_build_set(lock))

    fmt = MANIFEST_FORMATS.get(str(manifest.get("format")), "")
    refusal = image_refusal(image, fmt, manifest)
    if refusal is not None:  # checked before any read: no FIFO, device or oversized file is read
        checks.append(failed("image", refusal))
        return VerifyReport(str(image), str(lock_path), tuple(checks))
    if fmt == "disk":
        checks += verify_disk(image, manifest, lock, [Path(c) for c in certificates], allow, say)
    elif fmt in ("tar", "cpio", "directory", "oci"):
        checks += verify_archive(image, manifest, lock, fmt)
    else:
        checks.append(failed("manifest", f"unknown output format {manifest.get('format')!r}"))
    if options.provenance is not None:
        from reprobuild.provenance import check_provenance

        checks.append(check_provenance(options.provenance, lock, lock_bytes, image, manifest, trusted_key,
                                       "provenance" in allow))  # fmt: skip
    diff_summary = diff_data = None
    if options.rebuild:
        check, diff_summary, diff_data = rebuild_and_compare(image, fmt, lock, lock_path, options, say,
                                                             fetch_progress)  # fmt: skip
        checks.append(check)
    else:
        checks.append(skipped("rebuild", "not requested (--no-rebuild)", "--no-rebuild"))
    return VerifyReport(str(image), str(lock_path), tuple(checks), diff_summary, diff_data)


def image_refusal(image: Path, fmt: str, manifest: dict[str, Any]) -> str | None:
    """Why ``image`` must not be read, or None: a directory output must be a directory; any
    other must be a regular file of at most the manifest's size (one stat, before any read; a
    shorter file is read, and fails the digest and format checks with their own words)."""
    if fmt == "directory":
        return None if image.is_dir() and not image.is_symlink() else f"{image}: not a directory"
    size = manifest.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"the manifest gives no valid size for {image}"
    try:
        st = check_input(image)
    except ReadRefused as e:
        return f"{e}: refused before reading"
    except OSError as e:
        return f"{image}: {e.strerror}"
    if st.st_size > size:
        return f"{image}: {st.st_size} bytes, but the manifest says {size}: refused before reading"
    return None


# -- the lock ------------------------------------------------------------------------------------


def check_lock_signature(lock_path: Path, lock_bytes: bytes, trusted_key: Path | None,
                         allow_unsigned: bool = False) -> Check:  # fmt: skip
    """``lock-signature``. A ``.sig`` present without a ``trusted_key`` to check it fails unless
    ``allow_unsigned``; a lock with no ``.sig`` and no key is reported as unsigned (skipped)."""
    from reprobuild import keys

    name = "lock-signature"
    sig_path = lock_path.with_name(lock_path.name + SIGNATURE_SUFFIX)
    if trusted_key is None:
        if not sig_path.exists():
            return skipped(name, f"the lock is not signed (no {sig_path.name}): who made it is not checked",
                           "the lock is unsigned")  # fmt: skip
        if allow_unsigned:
            return skipped(name, f"{sig_path.name} is present but not checked (--allow-unsigned lock)",
                           "--allow-unsigned lock")  # fmt: skip
        return failed(name, f"{sig_path.name} is present but no --trusted-key was given to check it "
                            "(give the lock key's .pub, or --allow-unsigned lock)")  # fmt: skip
    if not sig_path.exists():
        return failed(name, f"{sig_path}: the lock is not signed")
    try:
        signer = keys.verify_lock(lock_bytes, keys.read_key_file(sig_path, "signature file"), str(sig_path),
                                  keys.load_trusted_keys(Path(trusted_key)))
    except ReprobuildError as e:
        return failed(name, e.message)
    return passed(name, f"signed by trusted key {signer}")


def lock_package_list(lock: Lock) -> list[str]:
    """The manifest's ``packages`` entries as the build writes them, from the lock alone."""
    return [p.pin for p in lock.package_set("image").packages]


def check_manifest_lock(manifest: dict[str, Any], lock: Lock) -> Check:
    name = "manifest-lock"
    problems = []
    expected = {"lock_digest": lock_digest(lock), "config_digest": lock.config_digest,
                "source_date_epoch": lock.source_date_epoch, "release": lock.release,
                "architecture": lock.architecture}  # fmt: skip
    for key, want in expected.items():
        if manifest.get(key) != want:
            problems.append(f"{key} is {manifest.get(key)!r}, the lock gives {want!r}")
    try:
        packages = lock_package_list(lock)
    except ReprobuildError as e:
        return failed(name, e.message)
    listed = manifest.get("packages")
    if listed != packages:
        if not isinstance(listed, list):
            problems.append("the manifest has no package list")
        else:
            extra, missing = sorted(set(listed) - set(packages)), sorted(set(packages) - set(listed))
            problems.append("package list differs from the lock"
                            + (f"; not in the lock: {', '.join(extra[:5])}" if extra else "")
                            + (f"; missing: {', '.join(missing[:5])}" if missing else "")
                            + ("; same packages, different order" if not extra and not missing else ""))  # fmt: skip
    if problems:
        return failed(name, "; ".join(problems))
    return passed(name, f"built from lock {expected['lock_digest'][:19]}…, packages as locked: "
                        f"{set_counts([('image', len(packages))])}")  # fmt: skip


def check_build_set(lock: Lock) -> Check:
    """The lock's ``build`` set (BuildScripts=) holds every image package exactly as the image
    set does, so the software built in it was compiled against the image's libraries."""
    name = "build-set"
    try:
        image, build = lock.package_set("image"), lock.package_set("build")
    except ReprobuildError as e:
        return failed(name, e.message)
    problems = build_set_problems(image, build)
    if problems:
        return failed(name, "the build set differs from the image set: " + "; ".join(problems[:5]))
    extra = len(build.packages) - len(image.packages)
    return passed(name, f"{len(build.packages)} packages: the {len(image.packages)} of the image as locked "
                        f"and {extra} to build with")


# -- disk images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Extent:
    offset: int
    size: int


def hash_image(image: Path, extents: Sequence[_Extent], say: Say | None = None) -> tuple[str, int, list[str]]:
    """(sha256 of the file, its size, sha256 of each extent) in one sequential read; ``say``
    gets a progress update (MiB read) per chunk."""
    whole = hashlib.sha256()
    parts = [hashlib.sha256() for _ in extents]
    pos = 0
    buf = bytearray(_CHUNK)
    with open(image, "rb", buffering=0) as f:
        mib = -(-os.fstat(f.fileno()).st_size // (1 << 20))
        while n := f.readinto(buf):
            if say is not None:
                say(Update("hashing", pos >> 20, mib, "MiB", image.name))
            view = memoryview(buf)[:n]
            whole.update(view)
            for h, e in zip(parts, extents):
                lo, hi = max(pos, e.offset), min(pos + n, e.offset + e.size)
                if lo < hi:
                    h.update(view[lo - pos:hi - pos])
            pos += n
    if say is not None:
        say(Update("hashing", mib, mib, "MiB"))
    return whole.hexdigest(), pos, [h.hexdigest() for h in parts]


def verify_disk(image: Path, manifest: dict[str, Any], lock: Lock, certificates: Sequence[Path],
                allow_unsigned: frozenset[str] = frozenset(), say: Say | None = None) -> list[Check]:  # fmt: skip
    """Every check of a DDI: digests, GPT, verity, its signature, the UKI."""
    from reprobuild.image import gpt, ids

    checks: list[Check] = []
    try:
        disk = gpt.read_gpt_path(image)
    except ReprobuildError as e:
        disk = None
        checks.append(failed("gpt", e.message))
    ss = disk.sector_size if disk else 512
    parts = list(disk.partitions) if disk else []
    sha, size, part_shas = hash_image(image, [_Extent(p.offset(ss), p.size(ss)) for p in parts], say)

    checks.append(digest_check(manifest, sha, size))
    if disk is None:
        return checks

    listed = manifest.get("partitions") if isinstance(manifest.get("partitions"), list) else []
    seed = bytes.fromhex(lock.seed)
    problems = []
    if str(disk.disk_guid) != manifest.get("disk_guid"):
        problems.append(f"disk GUID {disk.disk_guid} differs from the manifest's {manifest.get('disk_guid')}")
    if disk.disk_guid != ids.disk_uuid(seed):
        problems.append(f"disk GUID {disk.disk_guid} does not follow from the lock's seed")
    if disk.sector_size != manifest.get("sector_size"):
        problems.append(f"sector size {disk.sector_size}, the manifest says {manifest.get('sector_size')}")
    if len(listed) != len(parts):
        problems.append(f"{len(parts)} partitions, the manifest lists {len(listed)}")
    roles: dict[str, tuple[gpt.GptPartition, dict[str, Any]]] = {}
    for i, (p, m) in enumerate(zip(parts, listed)):
        mine = {"type": str(p.type_guid), "uuid": str(p.unique_guid), "label": p.name,
                "attributes": f"{p.attributes:#018x}", "offset": p.offset(ss), "size": p.size(ss)}  # fmt: skip
        for key, value in mine.items():
            if m.get(key) != value:
                problems.append(f"partition {i + 1} ({m.get('role', '?')}): {key} is {value}, "
                                f"the manifest says {m.get(key)}")  # fmt: skip
        t = ids.type_by_guid(p.type_guid)
        if t is not None and p.name != ids.EMPTY_LABEL:  # not an empty A/B slot ([Updates])
            roles.setdefault(t.role.value, (p, m))
    checks.append(failed("gpt", "; ".join(problems)) if problems else
                  passed("gpt", f"{len(parts)} partitions as in the manifest, disk GUID from the seed"))

    bad = [f"{m.get('role', i + 1)}: sha256 {h}, manifest {m.get('sha256')}"
           for i, (h, m) in enumerate(zip(part_shas, listed)) if m.get("sha256") != h]  # fmt: skip
    checks.append(failed("partition-hashes", "; ".join(bad)) if bad else
                  passed("partition-hashes", f"{len(parts)} partitions hash as in the manifest"))

    if say is not None:
        say("recomputing the dm-verity hash tree")
    root_hash, verity_checks = _check_verity(image, ss, roles, manifest, lock, certificates,
                                             "verity" in allow_unsigned)  # fmt: skip
    checks += verity_checks
    if isinstance(manifest.get("boot"), dict) or "esp" in roles:
        checks += _check_uki(image, ss, roles, manifest, root_hash, certificates, "uki" in allow_unsigned)
    return checks


def _data_roles(roles: dict[str, Any]) -> tuple[str, str, str] | None:
    for data in ("root", "usr"):
        if data in roles:
            return data, f"{data}-verity", f"{data}-verity-sig"
    return None


def _check_verity(image: Path, ss: int, roles: dict[str, Any], manifest: dict[str, Any], lock: Lock,
                  certificates: Sequence[Path], allow_unsigned: bool = False) -> tuple[str | None, list[Check]]:  # fmt: skip
    """Returns (the root hash recomputed from the data partition, the verity checks)."""
    from reprobuild.image import ids, verity

    names = _data_roles(roles)
    mode = manifest.get("verity")
    if names is None:
        return None, [failed("verity-root-hash", "the image has no root or usr partition")]
    data_role, hash_role, sig_role = names
    if hash_role not in roles:
        if mode == "no":
            return None, [skipped("verity-root-hash", "the image has no dm-verity (Verity=no)", "Verity=no")]
        return None, [failed("verity-root-hash", f"no {hash_role} partition, but the manifest says verity={mode}")]
    data_part, _ = roles[data_role]
    hash_part, _ = roles[hash_role]
    checks: list[Check] = []
    seed = bytes.fromhex(lock.seed)
    with open(image, "rb") as f:
        f.seek(hash_part.offset(ss))
        try:
            sb = verity.parse_superblock(f.read(verity.SB_SIZE))
        except ReprobuildError as e:
            return None, [failed("verity-root-hash", f"hash partition: {e.message}"),
                          failed("verity-hash-tree", f"hash partition: {e.message}")]
        p = sb.params
        if sb.data_blocks * p.data_block_size > data_part.size(ss):
            msg = "the superblock covers more blocks than the data partition holds"
            return None, [failed("verity-root-hash", msg), failed("verity-hash-tree", msg)]
        f.seek(data_part.offset(ss))
        tree = verity.build_tree(f, sb.data_blocks, p)
        root = tree.root_hash.hex()
        f.seek(hash_part.offset(ss) + p.hash_block_size)
        stored_ok = True
        for lv in tree.tree_bytes():
            if f.read(len(lv)) != lv:
                stored_ok = False
                break

    problems = []
    if p.salt != ids.verity_salt(seed) or p.uuid != ids.verity_superblock_uuid(seed):
        problems.append("the superblock's salt or UUID does not follow from the lock's seed")
    if manifest.get("root_hash") != root:
        problems.append(f"the data partition gives root hash {root}, the manifest says {manifest.get('root_hash')}")
    roothash_file = image.with_name(image.stem + ".roothash")
    if roothash_file.exists() and roothash_file.read_text().strip() != root:
        problems.append(f"{roothash_file.name} says {roothash_file.read_text().strip()}")
    u_data, u_hash = ids.verity_partition_uuids(tree.root_hash)
    if (data_part.unique_guid, hash_part.unique_guid) != (u_data, u_hash):
        problems.append("the data/hash partition UUIDs are not those the root hash gives")
    checks.append(failed("verity-root-hash", "; ".join(problems)) if problems else
                  passed("verity-root-hash", f"root hash {root} recomputed from the data partition"))
    checks.append(passed("verity-hash-tree", f"{tree.hash_blocks} hash blocks match the data") if stored_ok else
                  failed("verity-hash-tree", "the stored hash tree differs from the one the data gives"))
    checks.append(_check_verity_sig(image, ss, roles.get(sig_role), mode, root, manifest, certificates,
                                    allow_unsigned))  # fmt: skip
    return root, checks


def _load_certs(certificates: Sequence[Path]) -> list:
    from reprobuild.x509 import load_certificate

    return [load_certificate(Path(c).read_bytes()) for c in certificates]


def _check_verity_sig(image: Path, ss: int, sig: Any, mode: Any, root: str, manifest: dict[str, Any],
                      certificates: Sequence[Path], allow_unsigned: bool = False) -> Check:  # fmt: skip
    from cryptography.hazmat.primitives.serialization import pkcs7

    from reprobuild.image import veritysig
    from reprobuild.x509 import certificate_fingerprint

    name = "verity-signature"
    if sig is None:
        if mode == "signed":
            return failed(name, "the manifest says verity=signed but the image has no signature partition")
        return skipped(name, f"the image has no verity signature (verity={mode})", "the image has none")
    part, _ = sig
    with open(image, "rb") as f:
        f.seek(part.offset(ss))
        blob = f.read(min(part.size(ss), 1 << 20))
    try:
        parsed = veritysig.parse_verity_sig(blob)
    except ReprobuildError as e:
        return failed(name, e.message)
    if parsed.root_hash != root:
        return failed(name, f"the signature is for root hash {parsed.root_hash}, the data gives {root}")
    if manifest.get("certificate_fingerprint") not in (None, parsed.certificate_fingerprint):
        return failed(name, f"signed by certificate {parsed.certificate_fingerprint}, the manifest names "
                            f"{manifest.get('certificate_fingerprint')}")  # fmt: skip
    try:
        trusted = _load_certs(certificates)
    except (OSError, ReprobuildError) as e:
        return failed(name, f"cannot read a --certificate: {e}")
    if not trusted:
        try:
            embedded = pkcs7.load_der_pkcs7_certificates(parsed.signature)
            veritysig.check_verity_sig(parsed, root, embedded[0])
        except (ReprobuildError, ValueError, IndexError) as e:
            return failed(name, f"the signature does not verify even with its embedded certificate: {e}")
        what = f"valid for its embedded certificate {certificate_fingerprint(embedded[0])}, but"
        if allow_unsigned:
            return skipped(name, f"{what} not checked against a trusted one (--allow-unsigned verity)",
                           "--allow-unsigned verity")  # fmt: skip
        return failed(name, f"{what} no --certificate was given to trust it "
                            "(give the verity certificate, or --allow-unsigned verity)")  # fmt: skip
    errors = []
    for cert in trusted:
        try:
            veritysig.check_verity_sig(parsed, root, cert)
            return passed(name, f"root hash signed by trusted certificate {certificate_fingerprint(cert)}")
        except ReprobuildError as e:
            errors.append(e.message)
    return failed(name, "not signed by any trusted certificate: " + "; ".join(errors))


def read_esp_file(image: Path, offset: int, path: str) -> bytes:
    """One file from the FAT file system at byte ``offset`` of ``image`` (mtools, no mounting)."""
    from reprobuild.errors import ToolMissing

    exe = shutil.which("mcopy")
    if exe is None:
        raise ToolMissing("mcopy", "mtools", "to read the UKI from the ESP")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "MTOOLS_SKIP_CHECK": "1",
           "MTOOLSRC": "/dev/null"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="reprobuild-verify-esp-") as tmp:
        out = Path(tmp, "file")
        r = subprocess.run([exe, "-n", "-i", f"{image}@@{offset}", "::/" + path.lstrip("/"), str(out)],
                           capture_output=True, text=True, env=env, check=False)  # fmt: skip
        if r.returncode != 0 or not out.exists():
            raise VerificationFailed(f"cannot read /{path.lstrip('/')} from the ESP: "
                                     f"{(r.stderr or r.stdout).strip() or r.returncode}")  # fmt: skip
        return out.read_bytes()


def uki_cmdline(uki: bytes) -> str:
    """The ``.cmdline`` section of a UKI as text."""
    from reprobuild.image.pe import parse_pe

    sec = parse_pe(uki).section(".cmdline")
    if sec is None:
        raise VerificationFailed("the UKI has no .cmdline section")
    raw = uki[sec.pointer_to_raw_data:sec.pointer_to_raw_data + min(sec.virtual_size, sec.size_of_raw_data)]
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _check_uki(image: Path, ss: int, roles: dict[str, Any], manifest: dict[str, Any], root: str | None,
               certificates: Sequence[Path], allow_unsigned: bool = False) -> list[Check]:  # fmt: skip
    from reprobuild.image.authenticode import read_signatures, verify_pe_signature
    from reprobuild.x509 import certificate_fingerprint

    boot = manifest.get("boot") if isinstance(manifest.get("boot"), dict) else {}
    if "esp" not in roles:
        msg = "the manifest describes a UKI but the image has no ESP"
        return [failed("uki-signature", msg), failed("uki-roothash", msg)]
    path = boot.get("uki_path", "EFI/BOOT/BOOTX64.EFI")
    # systemd-boot: the UKI is under EFI/Linux/ (named <id>_<version>.efi with ImageId= and
    # ImageVersion=, else after the kernel), as uki_path says; older manifests named the loader there.
    if boot.get("bootloader") == "systemd-boot" and not str(path).startswith("EFI/Linux/") and boot.get("kernel_version"):
        path = f"EFI/Linux/{boot['kernel_version']}.efi"
    esp, _ = roles["esp"]
    try:
        uki = read_esp_file(image, esp.offset(ss), path)
    except ReprobuildError as e:
        return [failed("uki-signature", e.message), failed("uki-roothash", e.message)]
    checks = []
    digest = hashlib.sha256(uki).hexdigest()
    name = "uki-signature"
    try:
        signatures = read_signatures(uki)
    except ReprobuildError as e:
        signatures, bad = [], e.message
    else:
        bad = None
    if bad:
        checks.append(failed(name, bad))
    elif boot.get("uki_sha256") not in (None, digest):
        checks.append(failed(name, f"/{path} has sha256 {digest}, the manifest says {boot.get('uki_sha256')}"))
    elif not signatures:
        checks.append(failed(name, f"/{path} is not signed") if boot.get("uki_signed") else
                      skipped(name, f"/{path} is not signed (no SecureBootKey=)", "the UKI is unsigned"))
    else:
        try:
            trusted = _load_certs(certificates)
        except (OSError, ReprobuildError) as e:
            trusted, bad = [], f"cannot read a --certificate: {e}"
        match = next((c for c in trusted if verify_pe_signature(uki, c)), None)
        if bad:
            checks.append(failed(name, bad))
        elif match is not None:
            checks.append(passed(name, f"/{path} signed by trusted certificate {certificate_fingerprint(match)}"))
        elif not trusted and allow_unsigned:
            checks.append(skipped(name, f"/{path} is signed, but not checked (--allow-unsigned uki)",
                                  "--allow-unsigned uki"))  # fmt: skip
        elif not trusted:
            checks.append(failed(name, f"/{path} is signed, but no --certificate was given to check it against "
                                       "(give the Secure Boot certificate, or --allow-unsigned uki)"))  # fmt: skip
        else:
            checks.append(failed(name, f"/{path} is not signed by any trusted certificate (Authenticode)"))
    try:
        words = uki_cmdline(uki).split()
    except ReprobuildError as e:
        checks.append(failed("uki-roothash", e.message))
        return checks
    pinned = [w.split("=", 1)[1] for w in words if w.startswith(("roothash=", "usrhash="))]
    if root is None:
        checks.append(failed("uki-roothash", "no root hash could be recomputed to compare with"))
    elif pinned == [root]:
        checks.append(passed("uki-roothash", f"the UKI's command line pins root hash {root[:16]}…"))
    else:
        checks.append(failed("uki-roothash", f"the UKI's command line pins {pinned or 'no root hash'}, "
                                             f"the data partition gives {root}"))  # fmt: skip
    return checks


# -- tar, cpio and directory outputs -------------------------------------------------------------


def digest_check(manifest: dict[str, Any], sha: str, size: int) -> Check:
    """``image-digest``: the output's sha256 and size are the ones its manifest records."""
    problems = []
    if manifest.get("sha256") != sha:
        problems.append(f"sha256 is {sha}, the manifest says {manifest.get('sha256')}")
    if manifest.get("size") != size:
        problems.append(f"size is {size}, the manifest says {manifest.get('size')}")
    return failed("image-digest", "; ".join(problems)) if problems else passed("image-digest", f"sha256 {sha}")


def dpkg_status_packages(status: str) -> list[str]:
    """``name=version:arch`` for every package dpkg's status file lists as installed, sorted."""
    from reprobuild.debian.control import iter_stanzas

    out = []
    for stanza in iter_stanzas(status):
        if stanza.get("Status", "").split()[-1:] == ["installed"]:
            out.append(f"{stanza['Package']}={stanza['Version']}:{stanza['Architecture']}")
    return sorted(out)


def _read_status(image: Path, fmt: str) -> str | None:
    rel = "var/lib/dpkg/status"
    if fmt == "directory":
        p = image / rel
        return p.read_text("utf-8") if p.is_file() and not p.is_symlink() else None
    if fmt == "tar":
        with tarfile.open(image) as tf:
            for name in (rel, "./" + rel):
                try:
                    member = tf.getmember(name)
                except KeyError:
                    continue
                f = tf.extractfile(member)
                return f.read().decode("utf-8") if f else None
    if fmt == "oci":
        data = read_layer_file(image, rel)
        return data.decode("utf-8") if data is not None else None
    return None


def verify_archive(image: Path, manifest: dict[str, Any], lock: Lock, fmt: str) -> list[Check]:
    """Checks of a tar, cpio, oci or directory output: its digest and the packages its dpkg lists."""
    checks = []
    if fmt == "directory":
        checks.append(skipped("image-digest", "a directory output's manifest records no digest "
                                              "(the rebuild compares its content)", "a directory has none"))  # fmt: skip
    else:
        sha, size, _ = hash_image(image, [])
        checks.append(digest_check(manifest, sha, size))
    try:
        status = _read_status(image, fmt)
    except (OSError, tarfile.TarError, UnicodeDecodeError, FormatError) as e:
        checks.append(failed("installed-packages", f"cannot read var/lib/dpkg/status: {e}"))
        return checks
    if status is None:
        checks.append(skipped("installed-packages", "no var/lib/dpkg/status in this output", "no dpkg status"))
        return checks
    installed = dpkg_status_packages(status)
    wanted = sorted(lock_package_list(lock))
    if installed == wanted:
        checks.append(passed("installed-packages", f"dpkg lists exactly the locked packages: "
                                                   f"{set_counts([('image', len(wanted))])}"))  # fmt: skip
    else:
        extra, missing = sorted(set(installed) - set(wanted)), sorted(set(wanted) - set(installed))
        checks.append(failed("installed-packages", f"dpkg's status differs from the lock: not locked: "
                                                   f"{', '.join(extra[:5]) or '-'}; missing: {', '.join(missing[:5]) or '-'}"))
    return checks


# -- the rebuild ---------------------------------------------------------------------------------


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def rebuild_and_compare(image: Path, fmt: str, lock: Lock, lock_path: Path, options: VerifyOptions,
                        say: Say, fetch_progress: Any = None) -> tuple[Check, str | None, dict[str, Any] | None]:  # fmt: skip
    """Build the lock again in a fresh directory and compare with ``image`` byte for byte.

    The rebuild uses the image definition (for the settings that are not in the lock, such as
    signing keys), a fresh empty store unless ``options.store`` names one, filled from
    ``options.bundle`` or else downloaded from the lock's package URLs only (the definition's
    substituters are dropped). The build cache is off: with a shared store, cached stages would
    make the "rebuild" a copy of an earlier result. On a mismatch the diff is run and its summary
    returned.
    """
    from dataclasses import replace

    from reprobuild.build import BuildOptions, build_locked
    from reprobuild.config import load_spec
    from reprobuild.diff.compare import compare_paths
    from reprobuild.diff.render import render_text, to_json_data
    from reprobuild.store import Store

    name = "rebuild"
    definition = options.definition or lock_path.parent
    try:
        spec = load_spec(definition)
        spec = replace(spec, build=replace(spec.build, substituters=()))
    except ReprobuildError as e:
        return failed(name, f"cannot read the image definition {definition}: {e.message}"), None, None
    work_parent = options.work_dir or image.parent
    with tempfile.TemporaryDirectory(prefix=".reprobuild-verify-", dir=work_parent) as tmp:
        store = Store(options.store or Path(tmp, "store"))
        try:
            if options.bundle is not None:
                store.import_bundle(options.bundle)
            say(f"rebuilding from the lock in {tmp}")
            result = build_locked(spec, lock, store,
                                  BuildOptions(output_dir=Path(tmp, "out"), format=fmt, jobs=options.jobs,
                                               offline=options.bundle is not None, cache=False), say=say,
                                  fetch_progress=fetch_progress)  # fmt: skip
        except ReprobuildError as e:
            return failed(name, f"the rebuild failed: {e.message}"), None, None
        rebuilt = result.outputs[fmt]
        say(f"comparing {image.name} with the rebuild")
        if fmt != "directory" and _same_bytes(image, rebuilt):
            return passed(name, f"an independent rebuild is bit-for-bit identical "
                                f"(sha256 {result.manifest.get('sha256')})"), None, None  # fmt: skip
        diff = compare_paths(image, rebuilt)
        if diff.identical:
            return passed(name, "an independent rebuild has identical content"), None, None
        text = render_text(diff)
        summary = text.split("\nDetails\n", 1)[0].rstrip() + "\n"
        return (failed(name, f"the rebuild differs (rebuilt sha256 {result.manifest.get('sha256')})"),
                summary, to_json_data(diff))


def iter_failures(report: VerifyReport) -> Iterator[str]:
    for c in report.failures:
        yield f"{c.name}: {c.detail}"


__all__ = ["UNSIGNED_KINDS", "Check", "VerifyError", "VerifyOptions", "VerifyReport", "check_lock_signature",
           "check_manifest_lock", "hash_image", "read_esp_file", "uki_cmdline", "verify_archive",
           "verify_disk", "verify_image"]  # fmt: skip

