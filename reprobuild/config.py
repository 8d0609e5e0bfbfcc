"""The image definition: ``reprobuild.conf`` (+ drop-ins) → a frozen :class:`ImageSpec`.

Every setting is declared once in :data:`SETTINGS` (section, key, parser, default, help). Lists
append across assignments and files; an empty assignment resets the list, as in systemd units.
Errors name the file and line.

``ImageSpec.digest()`` is the config digest written into the lock: it covers every setting that
changes what is locked or built, and none that only say where bytes come from or how loudly to
talk (mirrors, substituters, key file locations).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from reprobuild.errors import ConfigError, UsageError
from reprobuild.ini import Assignment, read_with_dropins
from reprobuild.lockfile import MAX_SOURCE_DATE_EPOCH
from reprobuild.pkcs11uri import KeySource, parse_uri
from reprobuild.registry.reference import PREFIX as OCI_PREFIX
from reprobuild.registry.reference import substituter_blob_urls

CONFIG_NAME = "reprobuild.conf"
DEFAULT_RELEASE = "trixie"  # Debian's current stable release
KNOWN_RELEASES = ("bookworm", "trixie", "forky", "sid", "unstable", "testing")

# Architecture names users write → (Debian architecture, DPS architecture).
ARCHITECTURES = {
    "x86-64": ("amd64", "x86-64"),
    "x86_64": ("amd64", "x86-64"),
    "amd64": ("amd64", "x86-64"),
    "arm64": ("arm64", "arm64"),
    "aarch64": ("arm64", "arm64"),
}


# --------------------------------------------------------------------------------------------
# Value parsers: str → value, raising ValueError with a message that fits after "Key=value: "


def parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected a boolean (yes/no)")


def choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in options:
            raise ValueError(f"expected one of: {', '.join(options)}")
        return value

    return parse


def parse_release(value: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9-]*", value):
        raise ValueError("expected a Debian release code name such as trixie or bookworm")
    return value


def parse_architecture(value: str) -> str:
    if value not in ARCHITECTURES:
        raise ValueError(f"unknown architecture; expected one of: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[value][1]


def parse_url(value: str) -> str:
    if not re.match(r"^(https?|file)://", value):
        raise ValueError("expected an http://, https:// or file:// URL")
    return value.rstrip("/")


def parse_substituter(value: str) -> str:
    """An http(s):// or file:// store URL, or ``oci://registry[:port]/repository`` (docs/registry.md)."""
    if value.startswith(OCI_PREFIX):
        try:
            substituter_blob_urls(value, "0" * 64)
        except UsageError as e:
            raise ValueError(e.message) from None
        return value
    return parse_url(value)


def parse_epoch(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise ValueError("expected seconds since 1970-01-01 UTC (a non-negative integer)")
    if len(value) > 20 or int(value) > MAX_SOURCE_DATE_EPOCH:
        raise ValueError(f"after {MAX_SOURCE_DATE_EPOCH} (2106-02-07T06:28:15Z), the newest time every output "
                         "format can store")
    return int(value)


def parse_seed(value: str) -> str:
    cleaned = value.replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", cleaned):
        raise ValueError("expected 128 bits as 32 hex digits (or a UUID)")
    return cleaned


def parse_package(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?", value):
        raise ValueError("not a valid Debian package name (name, name:arch or name=version)")
    return value


def parse_machine_id(value: str) -> str:
    if value in ("", "uninitialized") or re.fullmatch(r"[0-9a-f]{32}", value):
        return value
    raise ValueError("expected 32 lowercase hex digits, 'uninitialized', or empty")


def parse_text(value: str) -> str:
    if not value.isprintable():
        raise ValueError("control characters are not allowed")
    return value


def parse_hostname(value: str) -> str:
    """RFC 1123 host name (hostname(5)): dot-separated labels of letters, digits and '-'."""
    if len(value) > 253 or not re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*", value):
        raise ValueError("not a valid host name (RFC 1123)")
    return value


def parse_locale(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,128}", value):
        raise ValueError("not a locale name such as C.UTF-8 or en_US.UTF-8")
    return value


def parse_tree_path(value: str) -> str:
    """A path inside the image (Timezone=, RemoveFiles= globs): no '..', no NUL or control bytes."""
    if not value.isprintable() or len(value) > 4096:
        raise ValueError("control characters are not allowed")
    if ".." in value.split("/"):
        raise ValueError("'..' is not allowed: the path must stay inside the image")
    return value


def parse_lock_key(value: str) -> str:
    """A key file path, or ``agent:[COMMENT|SHA256:…]`` (a key in the ssh-agent)."""
    if value.startswith("pkcs11:"):
        raise ValueError("the lock key is an ed25519 key file or agent:…; PKCS#11 is for VerityKey= / SecureBootKey=")
    return value


def parse_rsa_key(value: str) -> str:
    """An RSA key file path, or a ``pkcs11:`` URI (RFC 7512) naming a key in a token."""
    if value.startswith("agent:"):
        raise ValueError("agent: is for LockKey=; an RSA signing key is a file or a pkcs11: URI")
    if value.startswith("pkcs11:"):
        parse_uri(value)  # raises ValueError with what is wrong
    return value


# Values of key settings that name a key somewhere else than in a file: kept as they are.
KEY_URI_PREFIXES = ("agent:", "pkcs11:")

# The type of a signing key setting: a file (resolved against the image directory) or a URI.


def parse_image_word(value: str) -> str:
    """IMAGE_ID= / IMAGE_VERSION= of os-release(5): lower-case letters, digits, '.', '_' and '-'."""
    if len(value) > 34 or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", value):
        raise ValueError("expected at most 34 of a-z, 0-9, '.', '_', '-' (os-release's IMAGE_ID=/IMAGE_VERSION=), "
                         "starting with a letter or digit")
    return value


def parse_update_source(value: str) -> str:
    """[Updates] Source=: an http(s):// or file:// URL (systemd-sysupdate's url-file source) or an
    absolute, normalised directory path in the running image (its regular-file source)."""
    if not value.isprintable() or " " in value or len(value) > 4096:
        raise ValueError("spaces and control characters are not allowed")
    if value.startswith(("http://", "https://", "file://")):
        return value.rstrip("/") + "/"
    if not value.startswith("/") or any(part in ("", ".", "..") for part in value.rstrip("/").split("/")[1:]):
        raise ValueError("expected an http://, https:// or file:// URL, or a normalised absolute directory path "
                         "inside the image")
    return value.rstrip("/") or "/"


def parse_instances_max(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 2 <= int(value) <= 64:
        raise ValueError("expected a number from 2 to 64 (the running version and at least one more)")
    return int(value)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_slot_size(value: str) -> int:
    """A size in bytes with an optional K, M, G or T suffix (powers of 1024), a multiple of 4 KiB."""
    m = re.fullmatch(r"([0-9]{1,15})([KMGT]?)", value.upper())
    if not m:
        raise ValueError("expected a size such as 2G, 1536M or 1073741824 (bytes)")
    size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if size == 0 or size % 4096 or size > (1 << 50):
        raise ValueError("expected a positive multiple of 4 KiB (dm-verity's block size), at most 1 PiB")
    return size


def parse_module(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError("not a kernel module name")
    return value


# --------------------------------------------------------------------------------------------
# The settings table


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    dest: str  # attribute of the section dataclass
    parse: Callable[[str], Any]
    is_list: bool = False
    is_path: bool = False  # relative paths are resolved against the image directory
    in_digest: bool = True  # does it change what is locked or built?
    help: str = ""
    # Added after locks were first written: in the digest only when set, so that the digest of a
    # definition that does not use it (and every lock already written for one) stays the same.
    digest_if_set: bool = False


SETTINGS: tuple[Setting, ...] = (
    # [Distribution]
    Setting("Distribution", "Distribution", "distribution", choice("debian"), help="Only debian for now."),
    Setting("Distribution", "Release", "release", parse_release, help="Debian release code name."),
    Setting("Distribution", "Architecture", "architecture", parse_architecture, help="x86-64 or arm64."),
    Setting("Distribution", "Repositories", "repositories", choice("main", "contrib", "non-free",
            "non-free-firmware"), is_list=True, help="Archive components."),
    Setting("Distribution", "Updates", "updates", parse_bool, help="Also lock -updates and -security."),
    Setting("Distribution", "Mirror", "mirror", parse_url, in_digest=False,
            help="Debian archive base URL; written into the lock. Default: the host's apt sources."),
    Setting("Distribution", "SecurityMirror", "security_mirror", parse_url, in_digest=False,
            help="debian-security base URL. Default: the host's apt sources."),
    Setting("Distribution", "SnapshotMirror", "snapshot_mirror", parse_url, in_digest=False,
            help="Base URL of a snapshot archive (…/archive); packages are also fetched from "
                 "<base>/<archive>/<snapshot id>/<pool path>."),
    Setting("Distribution", "Keyring", "keyring", parse_text, is_list=True, is_path=True, in_digest=False,
            help="OpenPGP keyrings trusted for InRelease. Default: the Debian archive keyring."),
    # [Content]
    Setting("Content", "BaseSet", "base_set", choice("essential", "minbase", "none"),
            help="essential, minbase (Essential + required + apt) or none."),
    Setting("Content", "Packages", "packages", parse_package, is_list=True, help="Packages to install."),
    Setting("Content", "Recommends", "recommends", parse_bool, help="Install Recommends."),
    Setting("Content", "SkeletonTrees", "skeleton_trees", parse_text, is_list=True, is_path=True,
            help="Directories copied into the tree before packages."),
    Setting("Content", "ExtraTrees", "extra_trees", parse_text, is_list=True, is_path=True,
            help="Directories copied into the tree after packages."),
    Setting("Content", "PostInstallationScripts", "postinst_scripts", parse_text, is_list=True,
            is_path=True, help="Scripts run in the sandbox with the tree as root."),
    Setting("Content", "Hostname", "hostname", parse_hostname, help="/etc/hostname (an RFC 1123 host name)."),
    Setting("Content", "RootPassword", "root_password", parse_text,
            help="Root password (plain, or hashed:$y$… for a crypt hash)."),
    Setting("Content", "Autologin", "autologin", parse_bool, help="Log root in on the console."),
    Setting("Content", "Locale", "locale", parse_locale, help="LANG in /etc/locale.conf (letters, digits, _ . @ -)."),
    Setting("Content", "Timezone", "timezone", parse_tree_path,
            help="/etc/localtime target, e.g. Europe/Berlin (no '..')."),
    Setting("Content", "MachineId", "machine_id", parse_machine_id,
            help="/etc/machine-id content: empty (default), uninitialized, or an ID."),
    Setting("Content", "RemoveFiles", "remove_files", parse_tree_path, is_list=True,
            help="Globs removed from the tree after installation (no '..')."),
    Setting("Content", "BuildScripts", "build_scripts", parse_text, is_list=True, is_path=True, digest_if_set=True,
            help="Scripts run in order in the build environment (the locked build set) with "
                 "$SRCDIR, $BUILDDIR, $DESTDIR; what they put in $DESTDIR is merged into the image."),
    Setting("Content", "BuildPackages", "build_packages", parse_package, is_list=True, digest_if_set=True,
            help="Packages needed only to build (compilers, headers): locked with the image's "
                 "packages into the build set, never installed in the image."),
    Setting("Content", "CleanPackageMetadata", "clean_package_metadata", parse_bool,
            help="Drop apt lists and caches."),
    Setting("Content", "KernelCommandLine", "kernel_command_line", parse_text, is_list=True,
            help="Extra kernel command line words for the UKI."),
    Setting("Content", "Bootable", "bootable", choice("auto", "yes", "no"),
            help="Build an ESP with a signed UKI (auto: when the lock has a kernel)."),
    # [Initrd]
    Setting("Initrd", "Packages", "packages", parse_package, is_list=True,
            help="Extra packages of the initrd package set."),
    Setting("Initrd", "KernelModules", "kernel_modules", parse_module, is_list=True,
            help="Extra kernel modules for the initrd."),
    # [Tools]
    Setting("Tools", "ToolsTree", "tools_tree", choice("lock", "host"),
            help="Take mkfs tools from a locked tools tree (lock) or from the host."),
    Setting("Tools", "Release", "release", parse_release, help="Release of the tools tree."),
    Setting("Tools", "Packages", "packages", parse_package, is_list=True, help="Extra tools packages."),
    # [Build]
    Setting("Build", "SourceDateEpoch", "source_date_epoch", parse_epoch,
            help="Fixed timestamp, 0 to 4294967295 (2106-02-07, the newest time cpio and squashfs "
                 "can store). Default: the newest Release Date of the locked suites."),
    Setting("Build", "Seed", "seed", parse_seed, help="128-bit seed for UUIDs and salts. Default: from the lock."),
    Setting("Build", "Format", "format", choice("disk", "directory", "tar", "cpio", "oci"), help="Output format."),
    Setting("Build", "RootFilesystem", "root_filesystem", choice("erofs", "squashfs", "ext4"),
            help="Root file system type."),
    Setting("Build", "Verity", "verity", choice("auto", "signed", "hash", "no"),
            help="dm-verity: signed (needs a key), hash, or no (writable ext4)."),
    Setting("Build", "RootLayout", "root_layout", choice("root", "usr"), help="root or usr-only partitions."),
    Setting("Build", "Bootloader", "bootloader", choice("uki", "systemd-boot"),
            help="uki: the firmware boots the UKI; systemd-boot: signed systemd-boot + UKI."),
    Setting("Build", "ImageId", "image_id", parse_image_word, digest_if_set=True,
            help="IMAGE_ID= in os-release; with ImageVersion=, the root/verity/signature partition labels, "
                 "the UKI under EFI/Linux/ (Bootloader=systemd-boot) and 'reprobuild release' artifacts are "
                 "named `<id>_<version>` (systemd-sysupdate's patterns)."),
    Setting("Build", "ImageVersion", "image_version", parse_image_word, digest_if_set=True,
            help="IMAGE_VERSION= in os-release, and the version in labels, the UKI's name and release artifacts."),
    Setting("Build", "Substituters", "substituters", parse_substituter, is_list=True, in_digest=False,
            help="HTTP base URLs of other stores, or oci://registry/repository (blobs pushed by "
                 "reprobuild store push), tried after the mirrors."),
    Setting("Build", "BuildSources", "build_sources", parse_text, is_list=True, is_path=True, digest_if_set=True,
            help="Source directories mounted read-only at /work/src ($SRCDIR) for BuildScripts=; "
                 "with several, each at /work/src/<directory name>."),
    Setting("Build", "BuildDirectory", "build_directory", parse_text, is_path=True, in_digest=False,
            help="Keep $BUILDDIR here between builds (incremental compiles); default: a fresh "
                 "empty directory per build. Must not change the output, so not in the digest."),
    # [Signing]
    Setting("Signing", "LockKey", "lock_key", parse_lock_key, is_path=True, in_digest=False,
            help="ed25519 key signing the lock: an OpenSSH private key file, or agent:[COMMENT] for ssh-agent."),
    Setting("Signing", "VerityKey", "verity_key", parse_rsa_key, is_path=True, in_digest=False,
            help="RSA key signing the verity root hash: a PEM file or a pkcs11: URI."),
    Setting("Signing", "VerityCertificate", "verity_certificate", parse_text, is_path=True, in_digest=False,
            help="X.509 certificate of the verity key."),
    Setting("Signing", "SecureBootKey", "secure_boot_key", parse_rsa_key, is_path=True, in_digest=False,
            help="RSA key signing the UKI: a PEM file or a pkcs11: URI."),
    Setting("Signing", "SecureBootCertificate", "secure_boot_certificate", parse_text, is_path=True,
            in_digest=False, help="X.509 certificate of the Secure Boot key."),
    Setting("Signing", "ReleaseKey", "release_key", parse_text, in_digest=False,
            help="OpenPGP key (id, fingerprint or user id in the keyring of $GNUPGHOME) that "
                 "'reprobuild release' signs SHA256SUMS with (SHA256SUMS.gpg)."),
    # [Updates]
    Setting("Updates", "Source", "source", parse_update_source, digest_if_set=True,
            help="Where systemd-sysupdate finds new releases: an http(s):// or file:// URL (url-file: "
                 "SHA256SUMS and SHA256SUMS.gpg are checked) or an absolute directory in the running image "
                 "(regular-file: read as it is). Setting it writes /usr/lib/sysupdate.d/*.transfer."),
    Setting("Updates", "InstancesMax", "instances_max", parse_instances_max, digest_if_set=True,
            help="Versions kept of each resource (the running one included), 2 to 64."),
    Setting("Updates", "SlotSize", "slot_size", parse_slot_size, digest_if_set=True,
            help="Size of each of the two root (or /usr) partition slots (K/M/G suffixes); the verity and "
                 "signature slots follow from it. The image gets empty '_empty' second slots (A/B)."),
    Setting("Updates", "PublicKey", "public_key", parse_text, is_path=True, in_digest=False,
            help="Binary OpenPGP public key(s) (gpg --export KEY) the image trusts for SHA256SUMS.gpg: "
                 "written to /etc/systemd/import-pubring.gpg."),
)


@dataclass(frozen=True)
class DistributionConfig:
    distribution: str = "debian"
    release: str = DEFAULT_RELEASE
    architecture: str = "x86-64"  # DPS name; see debian_architecture
    repositories: tuple[str, ...] = ("main",)
    updates: bool = True
    mirror: str | None = None
    security_mirror: str | None = None
    snapshot_mirror: str | None = None
    keyring: tuple[Path, ...] = ()

    @property
    def debian_architecture(self) -> str:
        return ARCHITECTURES[self.architecture][0]


@dataclass(frozen=True)
class ContentConfig:
    base_set: str = "minbase"
    packages: tuple[str, ...] = ()
    recommends: bool = False
    skeleton_trees: tuple[Path, ...] = ()
    extra_trees: tuple[Path, ...] = ()
    postinst_scripts: tuple[Path, ...] = ()
    hostname: str | None = None
    root_password: str | None = None
    autologin: bool = False
    locale: str | None = None
    timezone: str | None = None
    machine_id: str = ""
    remove_files: tuple[str, ...] = ()
    build_scripts: tuple[Path, ...] = ()
    build_packages: tuple[str, ...] = ()
    clean_package_metadata: bool = True
    kernel_command_line: tuple[str, ...] = ()
    bootable: str = "auto"


@dataclass(frozen=True)
class InitrdConfig:
    packages: tuple[str, ...] = ()
    kernel_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToolsConfig:
    tools_tree: str = "lock"
    release: str | None = None
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildConfig:
    source_date_epoch: int | None = None
    seed: str | None = None
    format: str = "disk"
    root_filesystem: str = "erofs"
    verity: str = "auto"
    root_layout: str = "root"
    bootloader: str = "uki"
    substituters: tuple[str, ...] = ()
    build_sources: tuple[Path, ...] = ()
    build_directory: Path | None = None
    image_id: str | None = None
    image_version: str | None = None

    @property
    def versioned_name(self) -> str | None:
        """``<id>_<version>`` when both ImageId= and ImageVersion= are set (labels, UKI, release files)."""
        return f"{self.image_id}_{self.image_version}" if self.image_id and self.image_version else None


@dataclass(frozen=True)
class SigningConfig:
    lock_key: KeySource | None = None
    verity_key: KeySource | None = None
    verity_certificate: Path | None = None
    secure_boot_key: KeySource | None = None
    secure_boot_certificate: Path | None = None
    release_key: str | None = None


@dataclass(frozen=True)
class UpdatesConfig:
    source: str | None = None
    instances_max: int = 2
    slot_size: int = 1 << 30  # 1 GiB
    public_key: Path | None = None


SECTIONS: dict[str, str] = {  # INI section → ImageSpec attribute
    "Distribution": "distribution",
    "Content": "content",
    "Initrd": "initrd",
    "Tools": "tools",
    "Build": "build",
    "Signing": "signing",
    "Updates": "updates",
}


@dataclass(frozen=True)
class ImageSpec:
    """The user's intent, fully parsed. Build state lives elsewhere."""

    directory: Path
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    initrd: InitrdConfig = field(default_factory=InitrdConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)

    @property
    def lock_path(self) -> Path:
        return self.directory / "reprobuild.lock"

    def digest_input(self) -> dict[str, Any]:
        """The settings that change what is locked or built, as plain JSON data.

        Paths are written relative to the image directory, so the digest does not depend on
        where the definition is checked out.
        """
        data: dict[str, Any] = {}
        defaults = ImageSpec(directory=self.directory)
        for setting in SETTINGS:
            if not setting.in_digest:
                continue
            section = SECTIONS[setting.section]
            value = getattr(getattr(self, section), setting.dest)
            if setting.digest_if_set and value == getattr(getattr(defaults, section), setting.dest):
                continue
            data.setdefault(setting.section, {})[setting.key] = _jsonable(value, self.directory)
        return data

    def digest(self) -> str:
        blob = json.dumps(self.digest_input(), sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


def _jsonable(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        try:
            return value.relative_to(base).as_posix()
        except ValueError:
            return value.as_posix()
    if isinstance(value, tuple):
        return [_jsonable(v, base) for v in value]
    return value


_BY_KEY = {(s.section, s.key): s for s in SETTINGS}


def _unknown(assignment: Assignment) -> ConfigError:
    if assignment.section not in SECTIONS:
        close = difflib.get_close_matches(assignment.section, SECTIONS, n=1)
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        return ConfigError(f"{assignment.where}: unknown section [{assignment.section}]{hint}")
    keys = [s.key for s in SETTINGS if s.section == assignment.section]
    close = difflib.get_close_matches(assignment.key, keys, n=1)
    hint = f" (did you mean {close[0]}=?)" if close else ""
    return ConfigError(f"{assignment.where}: unknown setting {assignment.key}= in [{assignment.section}]{hint}")


def spec_from_assignments(directory: Path, assignments: list[Assignment]) -> ImageSpec:
    """Apply assignments in order onto the defaults."""
    values: dict[str, dict[str, Any]] = {attr: {} for attr in SECTIONS.values()}
    for assignment in assignments:
        setting = _BY_KEY.get((assignment.section, assignment.key))
        if setting is None:
            raise _unknown(assignment)
        bucket = values[SECTIONS[setting.section]]
        if setting.is_list:
            items = _split_list(assignment.value)
            if not items:
                bucket[setting.dest] = ()  # an empty assignment resets the list
                continue
            parsed = tuple(_parse_one(setting, item, assignment, directory) for item in items)
            bucket[setting.dest] = tuple(bucket.get(setting.dest, _default_list(setting))) + parsed
        elif assignment.value == "":
            bucket.pop(setting.dest, None)  # an empty assignment restores the default
        else:
            bucket[setting.dest] = _parse_one(setting, assignment.value, assignment, directory)
    spec = ImageSpec(directory=directory)
    for attr, overrides in values.items():
        if overrides:
            spec = replace(spec, **{attr: replace(getattr(spec, attr), **_dedup_lists(overrides))})
    return spec


def _default_list(setting: Setting) -> tuple[Any, ...]:
    section_cls = type(getattr(ImageSpec(directory=Path(".")), SECTIONS[setting.section]))
    for f in fields(section_cls):
        if f.name == setting.dest:
            return f.default if isinstance(f.default, tuple) else ()
    return ()


def _dedup_lists(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keep the first occurrence of repeated list items (order matters for trees and scripts)."""
    result = {}
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = tuple(dict.fromkeys(value))
        result[key] = value
    return result


def _split_list(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value) if item]


def _parse_one(setting: Setting, raw: str, assignment: Assignment, directory: Path) -> Any:
    try:
        value = setting.parse(raw)
    except ValueError as e:
        # A pkcs11: URI's query may hold a PIN (pin-value=, refused): never echo it.
        shown = raw.split("?")[0] + "?…" if raw.startswith("pkcs11:") and "?" in raw else raw
        raise ConfigError(f"{assignment.where}: {setting.key}={shown}: {e}") from None
    if setting.is_path and not (isinstance(value, str) and value.startswith(KEY_URI_PREFIXES)):
        path = Path(value)
        if not path.is_absolute():
            path = (assignment.path.parent / path).resolve()
        return path
    return value


def load_spec(directory: Path, overrides: list[str] | None = None) -> ImageSpec:
    """Read ``DIRECTORY/reprobuild.conf`` and its drop-ins; apply ``Section.Key=Value`` overrides."""
    directory = directory.resolve()
    main = directory / CONFIG_NAME
    if not main.exists():
        raise ConfigError(
            f"no {CONFIG_NAME} in {directory}",
            hint="pass -C DIR to name the image directory, or create reprobuild.conf there",
        )
    assignments = read_with_dropins(main)
    for number, override in enumerate(overrides or [], start=1):
        dotted, sep, value = override.partition("=")
        section, dot, key = dotted.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {override!r}: expected Section.Key=Value")
        assignments.append(Assignment(section, key, value, Path("<command line>"), number))
    return spec_from_assignments(directory, assignments)


def describe_settings() -> list[dict[str, Any]]:
    """The settings table as data, for documentation and ``--help`` output."""
    defaults = ImageSpec(directory=Path("."))
    rows = []
    for s in SETTINGS:
        default = getattr(getattr(defaults, SECTIONS[s.section]), s.dest)
        rows.append({**{k: v for k, v in asdict(s).items() if k in ("section", "key", "help")},
                     "list": s.is_list, "default": _jsonable(default, Path("."))})
    return rows
