"""``reprobuild vm``, ``boot`` and ``shell``: run a built image in qemu or as a container.

The work is done by :mod:`reprobuild.vm` (qemu + OVMF) and :mod:`reprobuild.nspawn`
(systemd-nspawn); this module parses arguments, finds the Secure Boot certificate and renders.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import click

from reprobuild.cli import cli
from reprobuild.errors import FormatError, UsageError

DEFAULT_EXPECT_TIMEOUT = 300.0
CONSOLE_TAIL_LINES = 40
ANSI_ESCAPE = re.compile(rb"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Za-z0-9]")
CONFIG_NAME = "reprobuild.conf"

image_argument = click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))


# ---- helpers ------------------------------------------------------------------------------------


def _is_fat(head: bytes) -> bool:
    """A FAT boot sector (a bare ESP image, which OVMF boots as removable media)."""
    return head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32")


def check_vm_disk(image: Path) -> None:
    """Refuse early what the firmware could never boot: a file that is neither a GPT disk with an
    EFI System Partition nor a bare FAT (ESP) image."""
    from reprobuild.image import gpt, ids

    try:
        disk = gpt.read_gpt_path(image)
    except gpt.GptInvalid as e:
        with open(image, "rb") as f:
            if _is_fat(f.read(512)):
                return
        raise FormatError(f"{image} is not a bootable disk image: {e.message}",
                          hint="reprobuild vm boots the image.raw that reprobuild build writes") from e  # fmt: skip
    esp = ids.partition_type(ids.Role.ESP).guid
    if not any(p.type_guid == esp for p in disk.partitions):
        raise FormatError(f"{image} has no EFI System Partition: the firmware has nothing to boot",
                          hint="bootable images need a kernel (e.g. Packages=linux-image-amd64 "
                               "systemd-boot-efi); or run it as a container: reprobuild shell IMAGE")  # fmt: skip


def _definition_beside(image: Path) -> Path | None:
    """The image directory an image was built in: its own directory or the one above (``build``
    writes to DIRECTORY/out by default), whichever holds reprobuild.conf."""
    where = image.absolute().parent  # where the user put it (not resolved: symlinks count as placed)
    for candidate in (where, where.parent):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def _load_certificate(path: Path) -> bytes:
    from cryptography import x509

    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            x509.load_pem_x509_certificate(data)
        else:
            x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise FormatError(f"{path}: not an X.509 certificate (PEM or DER): {e}") from e
    return data


def secure_boot_certificate(image: Path, certificate: Path | None, directory: Path | None,
                            say: Callable[[str], None]) -> bytes:
    """The certificate to enroll for ``--secure-boot``: ``--certificate``, else [Signing]
    SecureBootCertificate= of the definition in ``-C DIRECTORY`` or beside the image. The manifest
    does not name it (only the signed UKI's hashes), so one of those must be at hand."""
    manifest_path = image.with_name(image.name + ".manifest.json")
    if manifest_path.is_file():
        try:
            boot = json.loads(manifest_path.read_text()).get("boot") or {}
        except (ValueError, AttributeError):
            boot = {}
        if boot.get("uki_signed") is False:
            raise UsageError(f"{image}: its UKI is not signed (manifest: boot.uki_signed=false), "
                             "so Secure Boot would refuse to start it",
                             hint="set [Signing] SecureBootKey= and SecureBootCertificate= and rebuild")  # fmt: skip
    if certificate is not None:
        return _load_certificate(certificate)
    from reprobuild.config import load_spec

    where = directory or _definition_beside(image)
    if where is None:
        raise UsageError("--secure-boot needs the certificate the image's UKI is signed with, and none was "
                         f"found: no {CONFIG_NAME} beside {image}",
                         hint="pass --certificate CERT, or -C DIR for the image definition whose "
                              "[Signing] SecureBootCertificate= names it")  # fmt: skip
    spec = load_spec(where)
    path = spec.signing.secure_boot_certificate
    if path is None:
        raise UsageError(f"{where / CONFIG_NAME} sets no [Signing] SecureBootCertificate=, so its images "
                         "are not signed for Secure Boot",
                         hint="create a pair with reprobuild keygen --secure-boot --out keys/secure-boot, "
                              "set SecureBootKey=/SecureBootCertificate= and rebuild; or pass --certificate")  # fmt: skip
    if not path.is_file():
        raise UsageError(f"[Signing] SecureBootCertificate={path} (in {where / CONFIG_NAME}): no such file")
    say(f"Secure Boot: enrolling {path} (from {where / CONFIG_NAME})")
    return _load_certificate(path)


def console_tail(console: bytes, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last ``lines`` lines of a serial console capture, terminal escapes removed."""
    text = ANSI_ESCAPE.sub(b"", console).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    kept = [line for line in text.decode(errors="replace").split("\n") if line.strip()]
    return "\n".join(kept[-lines:])


def guest_credentials(values: tuple[str, ...], files: tuple[str, ...]) -> tuple:
    """``--credential NAME=VALUE`` and ``--credential-file NAME=PATH`` → vm.Credential tuple."""
    from reprobuild import vm

    out: dict[str, vm.Credential] = {}
    for option, items in (("--credential", values), ("--credential-file", files)):
        for item in items:
            name, sep, rest = item.partition("=")
            if not sep or not name:
                raise UsageError(f"{option} takes NAME=" + ("VALUE" if option == "--credential" else "PATH"))
            if name in out:
                raise UsageError(f"credential {name!r} is given twice")
            if option == "--credential":
                data = rest.encode()
            else:
                try:
                    data = Path(rest).read_bytes()
                except OSError as e:
                    raise UsageError(f"--credential-file {name}={rest}: {e.strerror}") from e
            try:
                out[name] = vm.Credential(name, data)
            except vm.VmError as e:
                raise UsageError(e.message) from e
    return tuple(out.values())


# ---- vm -----------------------------------------------------------------------------------------


@cli.command("vm")
@image_argument
@click.option("--secure-boot", is_flag=True,
              help="Enforce Secure Boot with the image's certificate enrolled as PK, KEK and db.")
@click.option("--certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Secure Boot certificate (PEM or DER) to enroll; implies --secure-boot "
                   "[default: the definition's [Signing] SecureBootCertificate=].")
@click.option("-C", "--directory", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Image definition to take the certificate from [default: the one beside IMAGE "
                   "or its parent].")
@click.option("-m", "--memory", default="2G", show_default=True, help="Guest memory (qemu -m syntax).")
@click.option("--cpus", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Guest CPUs (under TCG they take turns on one host thread: -accel tcg,thread=single).")
@click.option("--kvm", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="auto: KVM if /dev/kvm really runs a guest (probed), else TCG emulation.")
@click.option("--snapshot/--no-snapshot", default=True, show_default=True,
              help="Discard the guest's writes (the image file is never changed).")
@click.option("--expect", metavar="TEXT", default=None,
              help="Headless: wait for TEXT on the serial console; exit 0 when it appears, 1 if not.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help=f"With --expect: give up after SECONDS [default: {DEFAULT_EXPECT_TIMEOUT:.0f}].")
@click.option("--console-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --expect: also write the serial console to this file.")
@click.option("--credential", "credentials", multiple=True, metavar="NAME=VALUE",
              help="A systemd credential for the guest (SMBIOS type 11 from a private file, never on "
                   "qemu's command line); may repeat. VALUE is on reprobuild's own command line: "
                   "use --credential-file for secrets.")
@click.option("--credential-file", "credential_files", multiple=True, metavar="NAME=PATH",
              help="A systemd credential for the guest, read from PATH; may repeat.")
@click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- QEMU ARGS...]")
def vm_command(image: Path, secure_boot: bool, certificate: Path | None, directory: Path | None, memory: str,
               cpus: int, kvm: str, snapshot: bool, expect: str | None, timeout: float | None,
               console_log: Path | None, credentials: tuple[str, ...], credential_files: tuple[str, ...],
               qemu_args: tuple[str, ...]) -> int:  # fmt: skip
    """Boot IMAGE in qemu with UEFI firmware (OVMF), serial console on this terminal.

    \b
    Ctrl-A x quits qemu, Ctrl-A c switches to its monitor. Arguments after --
    go to qemu unchanged. With --expect the boot is headless and scripted:
      reprobuild vm out/image.raw --secure-boot --expect 'login:' --timeout 300
    """
    from reprobuild import vm
    from reprobuild.progress import make_reporter

    if (timeout is not None or console_log is not None) and expect is None:
        raise UsageError("--timeout and --console-log go with --expect TEXT")
    check_vm_disk(image)
    def say(message: str) -> None:
        click.echo(message, err=True)

    creds = guest_credentials(credentials, credential_files)
    cert = None
    if secure_boot or certificate is not None:
        cert = secure_boot_certificate(image, certificate, directory, say)
    cfg = vm.QemuConfig(image=image, memory=memory, cpus=cpus, secure_boot=cert is not None,
                        secure_boot_cert=cert, kvm=kvm, snapshot=snapshot,  # type: ignore[arg-type]
                        serial_log=console_log, extra_args=tuple(qemu_args), credentials=creds)  # fmt: skip
    if expect is None:
        say("serial console follows; Ctrl-A x quits, Ctrl-A c is the qemu monitor")
        return vm.run_interactive(cfg, say)
    limit = timeout if timeout is not None else DEFAULT_EXPECT_TIMEOUT
    started = time.monotonic()
    # A live status while waiting (seconds, the console's last line); a few lines in a log.
    reporter = make_reporter(False)
    try:
        found, console = vm.run_until(cfg, expect.encode(), limit, say=reporter)
    except vm.GuestKernelCrashed as e:  # the error names the oops line; the tail shows its context
        reporter.close()
        say(console_tail(e.console))
        raise
    finally:
        reporter.close()
    elapsed = time.monotonic() - started
    if found:
        click.echo(f"found {expect!r} on the console after {elapsed:.1f}s")
        return 0
    say(console_tail(console))
    say(f"{expect!r} did not appear on the console (stopped after {elapsed:.1f}s, limit {limit:.0f}s)")
    return 1


# ---- boot / shell -------------------------------------------------------------------------------


def verity_certificates(image: Path, certificates: tuple[Path, ...], directory: Path | None) -> list[Path]:
    """Certificates trusted for IMAGE's verity signature: ``--verity-certificate`` if given, else
    [Signing] VerityCertificate= of the definition in ``-C DIRECTORY`` or beside the image (if it
    sets one). systemd's /etc/verity.d/ is added by the library."""
    if certificates:
        return list(certificates)
    where = directory or _definition_beside(image)
    if where is None:
        return []
    from reprobuild.config import load_spec

    path = load_spec(where).signing.verity_certificate
    return [path] if path is not None and path.is_file() else []


def _nspawn_config(image: Path, boot: bool, command: tuple[str, ...], options: tuple[str, ...],
                   certificates: tuple[Path, ...], directory: Path | None):  # fmt: skip
    from reprobuild import nspawn

    def say(message: str) -> None:
        click.echo(message, err=True)

    trusted = verity_certificates(image, certificates, directory) if not image.is_dir() else []
    return nspawn.prepare(image, boot=boot, command=command, options=options, certificates=trusted, say=say)


run_image_argument = click.argument("image", type=click.Path(exists=True, path_type=Path))
verity_certificate_option = click.option(
    "--verity-certificate", "certificates", multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Certificate trusted for a signed image's verity root hash; may repeat [default: the "
         "definition's [Signing] VerityCertificate=, and /etc/verity.d/*.crt].")  # fmt: skip
definition_option = click.option(
    "-C", "--directory", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="Image definition to take the verity certificate from [default: the one beside IMAGE or its parent].")


@cli.command("boot")
@run_image_argument
@verity_certificate_option
@definition_option
@click.argument("nspawn_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- NSPAWN ARGS...]")
def boot_command(image: Path, certificates: tuple[Path, ...], directory: Path | None,
                 nspawn_args: tuple[str, ...]) -> int:  # fmt: skip
    """Boot IMAGE (image/, image.tar or image.raw) as a container: systemd-nspawn --boot.

    The image stays read-only (/var is a fresh tmpfs). A DDI's root is verity-checked: by
    dm-verity where the host has it, else block by block in user space before it runs (a signed
    image needs a trusted certificate). Arguments after -- go to systemd-nspawn (options, then
    arguments for the image's init). Needs root. Power the container off from inside
    (poweroff) or press Ctrl-] three times.
    """
    from reprobuild import nspawn

    return nspawn.run_nspawn(_nspawn_config(image, True, (), nspawn_args, certificates, directory))


@cli.command("shell")
@run_image_argument
@click.option("-o", "--nspawn-option", "options", multiple=True, metavar="OPTION",
              help="Extra systemd-nspawn option, e.g. -o --bind=/srv; may repeat.")
@verity_certificate_option
@definition_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND...]")
def shell_command(image: Path, options: tuple[str, ...], certificates: tuple[Path, ...], directory: Path | None,
                  command: tuple[str, ...]) -> int:  # fmt: skip
    """Run a shell (or COMMAND) inside IMAGE with systemd-nspawn, without booting it.

    IMAGE is image/, image.tar or image.raw. Without COMMAND: a login shell as root (/bin/bash,
    else /bin/sh). The exit status is the command's. The image is opened read-only and
    verity-checked, as for boot.
    """
    from reprobuild import nspawn

    return nspawn.run_nspawn(_nspawn_config(image, False, command, options, certificates, directory))
