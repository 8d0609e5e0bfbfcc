"""systemd-sysupdate transfer definitions for an image (sysupdate.d(5), systemd 257), pure.

In systemd 257 ``[Transfer]`` holds ``ProtectVersion=`` and ``Verify=``, ``[Target]`` holds
``InstancesMax=`` (the manual page shipped in Debian trixie's systemd-container).

An image built with ``[Updates]`` carries one ``/usr/lib/sysupdate.d/*.transfer`` file per
resource that ``reprobuild release`` publishes: the root (or ``/usr``) partition, its dm-verity
hash partition, its verity signature partition and, for bootable images, the UKI. Each source
pattern matches the release's file name (:func:`artifact_pattern`), as it is or compressed
(:data:`SOURCE_SUFFIXES`), each partition target the
``<id>_<version>`` label and the Discoverable Partitions Specification type the image already
uses, and the UKI target ``EFI/Linux/<id>_<version>.efi`` on the ESP (Boot Loader Specification
type #2 entries, which systemd-boot sorts newest first).

The partition artifacts carry their partition UUID in the name (``@u``): the new partition gets
that UUID, and the root and verity UUIDs are the halves of the root hash that the UKI's
``roothash=`` names (DPS; systemd-veritysetup-generator finds the partitions by them), so the
new UKI finds the new slot.

Files are numbered so that systemd-sysupdate, which takes transfers in file name order, writes
the partitions before the UKI that boots them.
"""

from __future__ import annotations

from dataclasses import dataclass

from reprobuild.compression import SUFFIXES
from reprobuild.image import ids

TRANSFER_DIR = "usr/lib/sysupdate.d"
SOURCE_TYPES = ("url-file", "regular-file")
# The UKIs under EFI/Linux/: the name reprobuild writes, and the names systemd-boot's boot
# counting gives it (<name>+LEFT-DONE.efi, <name>+LEFT.efi; Boot Loader Specification).
UKI_DIR = "/EFI/Linux"
# Boot counting (Boot Loader Specification, "Boot counting"; systemd-boot(7), sysupdate.d(5)
# TriesLeft=/TriesDone=): a new UKI is installed as <name>+3-0.efi; systemd-boot takes a try off
# its name before each boot, and the image's systemd-bless-boot.service renames it to <name>.efi
# once boot-complete.target is reached. An entry whose tries are used up is booted only after every
# other, so a version that never comes up falls back to the one before. Only an image that has
# systemd-bless-boot (Debian trixie: package systemd-boot) can mark a boot good, so only such an
# image's transfers start counting: without it every new version would be given up after 3 boots.
BLESS_BOOT = "usr/lib/systemd/systemd-bless-boot"
BOOT_TRIES = 3
# What a source file's name may end in after the artifact's own name: uncompressed, xz or gzip.
# systemd-sysupdate hands a url-file source to systemd-pull, which detects the compression from
# the data and decompresses it (sysupdate.d(5): "downloaded and decompressed"); a regular-file
# source is "uncompressed and written" too. Debian trixie's systemd-pull (257) is linked with
# liblzma, zlib and libbz2 but not libzstd, so a .zst file could not be read (and ``reprobuild
# release --compress zstd`` is refused for an image with transfers).
SOURCE_COMPRESSIONS = ("none", "xz", "gzip")
SOURCE_SUFFIXES = tuple(SUFFIXES[c] for c in SOURCE_COMPRESSIONS)


@dataclass(frozen=True)
class UpdatePlan:
    """What the transfers describe. ``source`` is an http(s):// or file:// URL (``url-file``:
    systemd-pull fetches ``SHA256SUMS`` and checks ``SHA256SUMS.gpg``) or an absolute directory
    in the running system (``regular-file``: read as it is, no signature check)."""

    image_id: str
    source: str
    source_type: str  # "url-file" | "regular-file"
    instances_max: int
    architecture: str  # "x86-64" | "arm64" (or a Debian spelling)
    layout: str = "root"  # "root" | "usr"
    verity: str = "signed"  # "signed" | "hash" | "no"
    uki: bool = False  # a bootable image with systemd-boot: the UKI under EFI/Linux/
    boot_tries: int = 0  # > 0: a new UKI starts boot counting with this many tries (see BLESS_BOOT)


def source_type_of(source: str) -> str:
    """``url-file`` for an http://, https:// or file:// URL, ``regular-file`` for an absolute path;
    anything else is a ValueError."""
    if source.startswith(("http://", "https://", "file://")):
        return "url-file"
    if source.startswith("/"):
        return "regular-file"
    raise ValueError("expected an http://, https:// or file:// URL, or an absolute directory path in the image")


def artifact_name(versioned: str, role: str, uuid: str) -> str:
    """A released partition's file name: ``<id>_<version>_<partition uuid>.<role>.raw``."""
    return f"{versioned}_{uuid}.{role}.raw"


def uki_name(versioned: str) -> str:
    return f"{versioned}.efi"


def artifact_pattern(image_id: str, role: str | None) -> str:
    """The sysupdate.d(5) pattern of :func:`artifact_name` (``role``) or :func:`uki_name` (None)."""
    return f"{image_id}_@v_@u.{role}.raw" if role else f"{image_id}_@v.efi"


def _render(sections: list[tuple[str, list[tuple[str, str]]]]) -> bytes:
    out = []
    for name, pairs in sections:
        out.append(f"[{name}]")
        out += [f"{k}={v}" for k, v in pairs]
        out.append("")
    return "\n".join(out).encode()


def _transfer(plan: UpdatePlan) -> list[tuple[str, str]]:
    # %A: the IMAGE_VERSION= of the running system (os-release), never removed.
    return [("ProtectVersion", "%A"), ("Verify", "yes" if plan.source_type == "url-file" else "no")]


def source_patterns(image_id: str, role: str | None) -> str:
    """The ``[Source] MatchPattern=`` value: :func:`artifact_pattern` with each of
    :data:`SOURCE_SUFFIXES`, separated by spaces (sysupdate.d(5): "one or more file name match
    patterns")."""
    base = artifact_pattern(image_id, role)
    return " ".join(base + suffix for suffix in SOURCE_SUFFIXES)


def _source(plan: UpdatePlan, patterns: str) -> list[tuple[str, str]]:
    return [("Type", plan.source_type), ("Path", plan.source), ("MatchPattern", patterns)]


def transfer_files(plan: UpdatePlan) -> dict[str, bytes]:
    """The transfer files, as paths inside the image (``usr/lib/sysupdate.d/NN-ROLE.transfer``)
    → bytes. Raises ValueError for a plan sysupdate could not carry out."""
    if plan.source_type not in SOURCE_TYPES:
        raise ValueError(f"unknown source type {plan.source_type!r}")
    if plan.source_type != source_type_of(plan.source):
        raise ValueError(f"source {plan.source!r} is no {plan.source_type} source")
    if plan.instances_max < 2:
        raise ValueError("InstancesMax= must be at least 2 (the running version and the new one)")
    arch = ids.Architecture.parse(plan.architecture)
    data, hash_, sig = ids.LAYOUT_ROLES[plan.layout]
    # The signature and hash partitions first, the data partition, the UKI last (a fixed number per role).
    roles = ([(40, sig)] if plan.verity == "signed" else []) + ([(50, hash_)] if plan.verity != "no" else []) + [(60, data)]
    files: dict[str, bytes] = {}
    for number, role in roles:
        ptype = ids.partition_type(role, arch)
        read_only = bool(ids.default_flags(role, verity_data=role == data and plan.verity != "no") & ids.FLAG_READ_ONLY)
        target = [("Type", "partition"), ("Path", "auto"), ("MatchPattern", f"{plan.image_id}_@v"),
                  ("MatchPartitionType", ptype.default_label)]
        if read_only:
            target.append(("ReadOnly", "yes"))
        target.append(("InstancesMax", str(plan.instances_max)))
        files[f"{TRANSFER_DIR}/{number}-{role.value}.transfer"] = _render(
            [("Transfer", _transfer(plan)), ("Source", _source(plan, source_patterns(plan.image_id, role.value))),
             ("Target", target)])
    if plan.uki:
        base = f"{plan.image_id}_@v"
        # The first pattern names what is installed (sysupdate.d(5)); all three recognise a UKI
        # whatever boot counting has made of its name.
        counting = [("TriesLeft", str(plan.boot_tries)), ("TriesDone", "0")] if plan.boot_tries > 0 else []
        if counting:
            names = [f"{base}+@l-@d.efi", f"{base}+@l.efi", f"{base}.efi"]
        else:
            names = [f"{base}.efi", f"{base}+@l-@d.efi", f"{base}+@l.efi"]
        files[f"{TRANSFER_DIR}/70-uki.transfer"] = _render(
            [("Transfer", _transfer(plan)), ("Source", _source(plan, source_patterns(plan.image_id, None))),
             ("Target", [("Type", "regular-file"), ("Path", UKI_DIR), ("PathRelativeTo", "boot"),
                         ("MatchPattern", " ".join(names)), ("Mode", "0444"), *counting,
                         ("InstancesMax", str(plan.instances_max))])])
    return files
