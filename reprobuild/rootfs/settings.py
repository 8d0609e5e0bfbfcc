"""Image settings applied to the tree: trees to copy in, scripts, hostname, passwords, locale, time zone.

Each function does one setting, writes only inside the tree (through :class:`TreeWriter`, so a
symlink in the tree can never redirect a write outside it) and is deterministic: no random salt,
no current time.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from reprobuild.errors import BuildError, ConfigError
from reprobuild.image.sysupdate import BLESS_BOOT, BOOT_TRIES, UpdatePlan, transfer_files
from reprobuild.rootfs.normalize import remove_path
from reprobuild.rootfs.sandbox import Bind, run_in_tree
from reprobuild.rootfs.unpack import TreeWriter, UnsafePath, split_member_name

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def copy_tree_into(tree: Path, source: Path, epoch: int, *, keep_owners: bool = False) -> list[str]:
    """Copy the contents of directory ``source`` into ``tree`` (SkeletonTrees=/ExtraTrees=).

    Modes and symlinks are kept; owners become 0:0 and mtimes the epoch, because a checkout's
    owners and times depend on who cloned it when (mkosi also copies without owners). Walks in
    sorted order. Hard links inside ``source`` become separate files. ``keep_owners``: keep the
    numeric owners (a build script's ``$DESTDIR``, made in the sandbox, where they are meant). Returns
    the files and symlinks written, as paths relative to the tree.
    """
    if not source.is_dir():
        raise ConfigError(f"tree {source} is not a directory")
    writer = TreeWriter(tree)
    written = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, source)
        base = [] if rel_dir == "." else rel_dir.split(os.sep)
        for name in dirnames + sorted(filenames):
            src = os.path.join(dirpath, name)
            parts = base + [name]
            st = os.lstat(src)
            mode = stat.S_IMODE(st.st_mode)
            uid, gid = (st.st_uid, st.st_gid) if keep_owners else (0, 0)
            if stat.S_ISLNK(st.st_mode):
                writer.symlink(parts, os.readlink(src), uid, gid, epoch)
                written.append("/".join(parts))
            elif stat.S_ISDIR(st.st_mode):
                writer.mkdir(parts, mode, uid, gid, epoch)
            elif stat.S_ISREG(st.st_mode):
                with open(src, "rb") as f:
                    writer.write_file(parts, f.read, mode, uid, gid, epoch)
                written.append("/".join(parts))
            else:
                raise ConfigError(f"{src}: only files, directories and symlinks can be copied into the image")
    writer.finish()
    return written


def run_postinst_scripts(tree: Path, scripts: tuple[Path, ...], env: Mapping[str, str], hostname: str,
                         progress: Callable[[str], None]) -> None:
    """Run each PostInstallationScripts= entry in the sandbox with the tree as its root.

    The script is bind-mounted read-only at /run/reprobuild/script (a tmpfs: nothing stays behind)
    and executed directly, so its #! interpreter must exist in the tree. It gets ``BUILDROOT=/``.
    """
    for script in scripts:
        if not os.access(script, os.X_OK):
            raise ConfigError(f"post-installation script {script} is not executable")
        progress(f"running post-installation script {script.name}")
        r = run_in_tree(tree, ["/run/reprobuild/script"], {**env, "BUILDROOT": "/"}, hostname=hostname,
                        binds=(Bind(script, "/run/reprobuild/script"),))
        if r.returncode != 0:
            tail = "\n".join(r.output.rstrip().splitlines()[-15:])
            raise BuildError(f"post-installation script {script} failed with exit status {r.returncode}",
                             hint=f"its output ends with:\n{tail}")


def remove_files(tree: Path, patterns: tuple[str, ...]) -> list[tuple[str, str]]:
    """RemoveFiles=: delete paths matching each glob (relative to the root; ``**`` allowed).

    A match reached through a symlink leading outside the tree is an error, never a deletion.
    Returns (path relative to the tree, pattern) for each removal.
    """
    import glob

    root = os.path.realpath(tree)
    removed = []
    for pattern in patterns:
        split_member_name(pattern.lstrip("/"), "RemoveFiles= pattern")  # rejects ".."
        for match in sorted(glob.glob(os.path.join(glob.escape(root), pattern.lstrip("/")), recursive=True)):
            parent = os.path.realpath(os.path.dirname(match))
            if parent != root and not parent.startswith(root + os.sep):
                raise BuildError(f"RemoveFiles={pattern} matched {match}, which lies outside the tree")
            if os.path.lexists(match):
                remove_path(Path(match))
                removed.append((os.path.relpath(match, root), pattern))
    return removed


def hash_password(password: str, epoch: int) -> str:
    """SHA-512 crypt (``$6$``) of ``password`` with a salt derived from the password and the epoch.

    Reproducibility: a random salt would make /etc/shadow differ on every build. The derived salt
    means two images with the same password and epoch share the hash; pass an already hashed
    password (``hashed:…``) to choose your own salt.
    """
    digest = hashlib.sha256(f"reprobuild-root-salt\0{epoch}\0{password}".encode()).digest()
    salt = "".join(_CRYPT_ALPHABET[b % 64] for b in digest[:16])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # stdlib until 3.13; uses the host's libcrypt

    result = crypt.crypt(password, f"$6${salt}$")
    if not result or not result.startswith("$6$"):
        raise BuildError("the host's crypt(3) cannot compute SHA-512 password hashes")
    return result


def set_root_password(tree: Path, value: str, epoch: int) -> list[str]:
    """RootPassword=: write root's hash (field 2) and the epoch's day (field 3) into /etc/shadow."""
    hashed = value[len("hashed:"):] if value.startswith("hashed:") else hash_password(value, epoch)
    if ":" in hashed or "\n" in hashed:
        raise ConfigError("RootPassword= hash must not contain ':' or newlines")
    shadow = tree / "etc/shadow"
    if os.path.islink(shadow) or not shadow.is_file():
        raise BuildError("RootPassword= needs /etc/shadow in the tree (package 'passwd' / base-passwd)")
    lines = shadow.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 3:
            fields[1], fields[2] = hashed, str(epoch // 86400)
            lines[i] = ":".join(fields)
            break
    else:
        raise BuildError("/etc/shadow has no entry for root")
    mode = stat.S_IMODE(os.lstat(shadow).st_mode)
    TreeWriter(tree).write_file(["etc", "shadow"], ("\n".join(lines) + "\n").encode(), mode,
                                0, _gid(tree, "shadow"), epoch)
    return ["etc/shadow"]


def _gid(tree: Path, group: str) -> int:
    try:
        for line in (tree / "etc/group").read_text(encoding="utf-8").splitlines():
            fields = line.split(":")
            if fields[0] == group and len(fields) > 2:
                return int(fields[2])
    except (OSError, ValueError):
        pass
    return 0


def _write(tree: Path, rel: str, content: str, epoch: int, mode: int = 0o644) -> None:
    TreeWriter(tree).write_file(rel.split("/"), content.encode(), mode, 0, 0, epoch)


def set_hostname(tree: Path, hostname: str, epoch: int) -> list[str]:
    """Hostname=: /etc/hostname (hostname(5)), validated as an RFC 1123 host name."""
    if not re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*", hostname):
        raise ConfigError(f"Hostname={hostname!r} is not a valid host name")
    _write(tree, "etc/hostname", hostname + "\n", epoch)
    return ["etc/hostname"]


def set_locale(tree: Path, locale: str, epoch: int) -> list[str]:
    """Locale=: /etc/locale.conf (systemd) and /etc/default/locale (Debian's pam_env) agree."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]+", locale):
        raise ConfigError(f"Locale={locale!r} is not a locale name")
    _write(tree, "etc/locale.conf", f"LANG={locale}\n", epoch)
    _write(tree, "etc/default/locale", f"LANG={locale}\n", epoch)
    return ["etc/locale.conf", "etc/default/locale"]


def set_timezone(tree: Path, tz: str, epoch: int) -> list[str]:
    """Timezone=: /etc/localtime → ../usr/share/zoneinfo/<tz> and /etc/timezone (Debian)."""
    parts = split_member_name(tz, "Timezone=")
    if not parts:
        raise ConfigError("Timezone= is empty")
    try:
        zone = TreeWriter(tree).resolve(["usr", "share", "zoneinfo", *parts], follow_last=True)
    except (FileNotFoundError, UnsafePath):
        zone = ""  # no such directory on the way, or a loop: not in the tree
    if not zone or not os.path.isfile(zone):
        raise BuildError(f"Timezone={tz}: /usr/share/zoneinfo/{tz} is not in the tree", hint="add tzdata")
    TreeWriter(tree).symlink(["etc", "localtime"], "../usr/share/zoneinfo/" + "/".join(parts), 0, 0, epoch)
    _write(tree, "etc/timezone", "/".join(parts) + "\n", epoch)
    return ["etc/localtime", "etc/timezone"]


_AUTOLOGIN = {
    "getty@.service.d": "ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --noclear --autologin root - $TERM",
    "serial-getty@.service.d": "ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --keep-baud "
    "115200,57600,38400,9600 --autologin root - $TERM",
    "console-getty.service.d": "ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --noclear --keep-baud "
    "--autologin root console 115200,38400,9600 $TERM",
}


def set_autologin(tree: Path, epoch: int) -> list[str]:
    """Autologin=: systemd drop-ins making the gettys log root in (as mkosi does)."""
    written = []
    for unit_dir, exec_start in _AUTOLOGIN.items():
        written.append(f"etc/systemd/system/{unit_dir}/autologin.conf")
        _write(tree, written[-1], f"[Service]\nExecStart=\n{exec_start}\n", epoch)
    return written


def set_machine_id(tree: Path, machine_id: str, epoch: int) -> list[str]:
    """MachineId=: "" → empty file (mmdebstrap; machine-id(5) for images), "uninitialized" (first-boot
    semantics), or an explicit 32-hex id. A generated id never ships."""
    if machine_id == "":
        content = ""
    elif machine_id == "uninitialized":
        content = "uninitialized\n"
    elif re.fullmatch(r"[0-9a-f]{32}", machine_id):
        content = machine_id + "\n"
    else:
        raise ConfigError(f"MachineId={machine_id!r}: expected empty, 'uninitialized' or 32 hex digits")
    _write(tree, "etc/machine-id", content, epoch, 0o444)
    return ["etc/machine-id"]


def set_image_release(tree: Path, image_id: str | None, image_version: str | None, epoch: int) -> list[str]:
    """ImageId=/ImageVersion=: ``IMAGE_ID=`` and ``IMAGE_VERSION=`` in os-release(5), replacing any
    the package wrote. Edits /usr/lib/os-release, and /etc/os-release too when it is a file of its
    own rather than the usual symlink to it (os-release(5): /etc takes precedence)."""
    wanted = {"IMAGE_ID": image_id, "IMAGE_VERSION": image_version}
    changed = []
    for rel in ("usr/lib/os-release", "etc/os-release"):
        try:
            path = Path(TreeWriter(tree).resolve(rel.split("/"), follow_last=False))  # never outside the tree
        except (FileNotFoundError, NotADirectoryError):
            continue
        if os.path.islink(path) or not path.is_file():
            continue
        lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                 if line.split("=", 1)[0].strip() not in wanted]
        # The values' grammar (a-z, 0-9, '.', '_', '-') needs no shell quoting.
        lines += [f"{key}={value}" for key, value in wanted.items() if value]
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        TreeWriter(tree).write_file(rel.split("/"), ("\n".join(lines) + "\n").encode(), mode, 0, 0, epoch)
        changed.append(rel)
    if not changed:
        raise BuildError("ImageId=/ImageVersion= need os-release in the tree (/usr/lib/os-release)",
                         hint="install base-files, or put usr/lib/os-release into an ExtraTrees= directory")
    return changed


# Where systemd-pull (systemd-sysupdate's downloader) looks for the keyring it checks
# SHA256SUMS.gpg with: /etc/systemd/import-pubring.gpg, else the vendor keyring
# /usr/lib/systemd/import-pubring.gpg (systemd 257, src/import/pull-common.c; sysupdate.d(5)).
IMPORT_PUBRING = "etc/systemd/import-pubring.gpg"
_PUBLIC_KEY_TAGS = (6, 14)  # RFC 9580 §5: Public-Key and Public-Subkey packets
_MAX_PUBRING = 1 << 20


def openpgp_first_packet_tag(data: bytes) -> int | None:
    """The tag of the first OpenPGP packet (RFC 9580 §4.2: old and new header formats), or None
    when ``data`` does not start with a packet header (armored text, not OpenPGP)."""
    if not data or not data[0] & 0x80:
        return None
    return data[0] & 0x3F if data[0] & 0x40 else (data[0] >> 2) & 0x0F


def check_public_keyring(data: bytes, where: str) -> None:
    """A binary OpenPGP public key (``gpg --export KEY``): what gpg's ``--keyring`` reads. An
    armored file or a secret key is refused."""
    if data.lstrip().startswith(b"-----BEGIN PGP"):
        raise ConfigError(f"{where}: an armored OpenPGP file; the keyring must be binary",
                          hint="export it with gpg --export KEY > release.gpg (without --armor)")
    tag = openpgp_first_packet_tag(data)
    if tag in (5, 7):
        raise ConfigError(f"{where}: a secret key; the image must only get the public key",
                          hint="export it with gpg --export KEY > release.gpg")
    if tag not in _PUBLIC_KEY_TAGS:
        raise ConfigError(f"{where}: not a binary OpenPGP public key",
                          hint="export it with gpg --export KEY > release.gpg")


def set_updates(tree: Path, plan: UpdatePlan, public_key: Path | None, epoch: int) -> list[str]:
    """[Updates]: systemd-sysupdate's transfer files (:func:`transfer_files`) and, with
    ``PublicKey=``, the keyring systemd-pull checks ``SHA256SUMS.gpg`` with. A bootable image
    that has systemd-bless-boot gets boot counting for its new UKIs
    (:data:`reprobuild.image.sysupdate.BLESS_BOOT`)."""
    data = None
    if public_key is not None:  # checked before anything is written
        try:
            if not public_key.is_file() or public_key.stat().st_size > _MAX_PUBRING:
                raise ConfigError(f"[Updates] PublicKey={public_key}: not a file of at most 1 MiB")
            data = public_key.read_bytes()
        except OSError as e:
            raise ConfigError(f"[Updates] PublicKey={public_key}: {e.strerror}") from None
        check_public_keyring(data, f"[Updates] PublicKey={public_key}")
    if plan.uki and TreeWriter(tree).is_file(BLESS_BOOT.split("/")):  # something marks a boot good: count tries
        plan = replace(plan, boot_tries=BOOT_TRIES)
    written = []
    for rel, content in sorted(transfer_files(plan).items()):
        TreeWriter(tree).write_file(rel.split("/"), content, 0o644, 0, 0, epoch)
        written.append(rel)
    if data is not None:
        TreeWriter(tree).write_file(IMPORT_PUBRING.split("/"), data, 0o644, 0, 0, epoch)
        written.append(IMPORT_PUBRING)
    return written
