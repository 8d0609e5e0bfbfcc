"""Live + boot: an A/B update by systemd-sysupdate inside the guest (issue #16's proof).

One definition (lock/bootable with systemd-boot, systemd-container, gpg and ``[Updates]``) is
locked from the mirror and built as version 1; version 2 changes one file of the extra tree and
``ImageVersion=`` and is published with ``reprobuild release --compress xz`` (signed by a test
OpenPGP key made here); a copy of that release has its ``SHA256SUMS.gpg`` made by another key.
Each release is put on an ext4 image of its own (``mkfs.ext4 -d``, no mounting on the host).
Then, under qemu + OVMF (TCG is fine), three boots:

1. version 1 boots with both release disks; a unit mounts each in turn at ``/run/updates`` (the
   image's ``Source=file:///run/updates/``) and runs ``systemd-sysupdate update``:
   - first the release signed by the other key: sysupdate refuses it, and the partitions' names
     and UUIDs (read from the disk with ``blkid -p``) and the ESP are what they were before:
     three ``_empty`` slots, version 1's UKI alone;
   - then the real release. First as a directory (``regular-file``) source: the transfers
     reprobuild writes for ``Source=/run/updates`` (made by the build's own code, put into the
     image under ``/usr/lib/sysupdate-dir.d/``) make ``systemd-sysupdate --definitions=…
     check-new`` name version 2; nothing is installed from them. Then through the image's own
     ``url-file`` transfers: it is installed, and the unit reboots;
2. the same disk boots again: the marker reports ``IMAGE_VERSION=2``, the root is
   ``/dev/mapper/root`` over the B slot (partition 5), version 1's UKI is still on the ESP and
   version 2's file is there; version 2's UKI, installed as ``abtest_2+3-0.efi`` (boot counting:
   the image has systemd-boot's systemd-bless-boot), was booted with a try taken off and then
   marked good: ``systemd-bless-boot status`` says ``good`` and the file is ``abtest_2.efi``;
3. a copy of that disk, with version 2's UKI renamed on the ESP (mtools, on the host) to
   ``abtest_2+0-3.efi`` — the name three boots that never reached ``boot-complete.target`` leave
   (systemd-boot takes a try off before each) — boots version 1 again, from slot A: an entry with
   no tries left is sorted after every other (the fall-back the transfer's boot counting is for).

(The refusal used to have a boot of its own; sharing the first boot saves CI two minutes, and it
also shows that a refused release leaves nothing that stops the next, good one.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from reprobuild.config import load_spec
from reprobuild.image.gpt import read_gpt_path
from reprobuild.image.sysupdate import BOOT_TRIES, transfer_files
from reprobuild.lockfile import load_lock
from reprobuild.stages.disksettings import update_plan
from tests.live_images import Keys, make_definition, require_tools, run_reprobuild

pytestmark = [pytest.mark.live, pytest.mark.boot]

SOURCE = "file:///run/updates/"
DIRECTORY_SOURCE = "/run/updates"

UPDATE_UNIT = """\
[Unit]
Description=A/B update test: report the running version, update from the second disk, reboot
After=multi-user.target systemd-bless-boot.service

[Service]
Type=oneshot
ExecStart=/usr/local/bin/ab-update

[Install]
WantedBy=multi-user.target
"""

# Markers are assembled at run time ("AB-" "…") so the kernel's echo of a command never matches.
UPDATE_SCRIPT = """\
#!/bin/sh
say() { echo "$*" > /dev/kmsg; }
. /usr/lib/os-release
slaves=$(cd /sys/block && for s in dm-*/slaves/*; do printf '%s ' "${s##*/}"; done)
efi=$(ls /efi/EFI/Linux | tr '\\n' ' ')
root=$(findmnt -no SOURCE /)
bless=$(/usr/lib/systemd/systemd-bless-boot status 2>&1 | tr '\\n' ' ')
say "AB-""RUNNING version=$IMAGE_VERSION root=$root slaves=${slaves}efi=$efi note=$(cat /etc/ab-note) bless=$bless END"
# Update only version 1, and only with the release disks attached (not in the fall-back boot).
{ [ "$IMAGE_VERSION" = 1 ] && blkid -L updates > /dev/null; } || exec systemctl poweroff
# Each partition's NAME/UUID as the GPT on the disk has them now (a low-level probe, no cache).
names() {
    for p in /dev/vda[0-9]*; do
        printf '%s/%s ' "$(blkid -p -o value -s PART_ENTRY_NAME "$p")" "$(blkid -p -o value -s PART_ENTRY_UUID "$p")"
    done
}
update() {  # $1: the release disk's label, $2: the tag of its log lines
    mkdir -p /run/updates
    mount -o ro "LABEL=$1" /run/updates || say "AB-""MOUNT-FAILED $1"
    /usr/lib/systemd/systemd-sysupdate update > /run/sysupdate.log 2>&1
    rc=$?
    while read -r l; do say "AB-$2 $l"; done < /run/sysupdate.log
    umount /run/updates
}
before=$(names)
update untrusted BADLOG
say "AB-""REFUSED rc=$rc names-before=${before}names-after=$(names)efi=$(ls /efi/EFI/Linux | tr '\\n' ' ')END"
# The same release as a directory (regular-file) source, through reprobuild's transfers for one:
# sysupdate must find version 2 there. Nothing is installed from it.
mkdir -p /run/updates
mount -o ro LABEL=updates /run/updates || say "AB-""MOUNT-FAILED updates"
new=$(/usr/lib/systemd/systemd-sysupdate --definitions=/usr/lib/sysupdate-dir.d check-new 2> /run/check.log)
crc=$?
while read -r l; do say "AB-DIRLOG $l"; done < /run/check.log
say "AB-""DIRCHECK rc=$crc new=$new END"
umount /run/updates
update updates LOG
say "AB-""UPDATE rc=$rc END"
sync
if [ "$rc" = 0 ]; then exec systemctl reboot; fi
exec systemctl poweroff
"""


def _definition(root: Path, keys: Keys, version: str, pubring: Path) -> Path:
    d = make_definition(
        root, "bootable", keys,
        extra_conf=("[Content]\nPackages=systemd-container gpg systemd-boot\nExtraTrees=extra\n"
                    f"[Build]\nBootloader=systemd-boot\nImageId=abtest\nImageVersion={version}\n"
                    f"[Updates]\nSource={SOURCE}\nPublicKey={pubring}\nSlotSize=768M\n"),
        extra_files={
            "extra/etc/systemd/system/ab-update.service": UPDATE_UNIT,
            "extra/etc/systemd/system/multi-user.target.wants/ab-update.service": "symlink:../ab-update.service",
            "extra/usr/local/bin/ab-update": UPDATE_SCRIPT,
            "extra/etc/ab-note": f"note of version {version}\n",
        })
    (d / "extra/usr/local/bin/ab-update").chmod(0o755)
    return d


def _add_directory_source_transfers(definition: Path) -> None:
    """Put the transfers reprobuild writes for ``Source=/run/updates`` (a ``regular-file``
    source), with boot counting as the image has systemd-bless-boot, into the definition's extra
    tree under ``/usr/lib/sysupdate-dir.d/``: the plan is made by the build's own code from the
    definition with only ``Source=`` changed."""
    spec = load_spec(definition, [f"Updates.Source={DIRECTORY_SOURCE}"])
    plan = update_plan(spec, load_lock(definition / "reprobuild.lock"))
    assert plan is not None and plan.source_type == "regular-file" and plan.uki
    for rel, content in transfer_files(replace(plan, boot_tries=BOOT_TRIES)).items():
        target = definition / "extra/usr/lib/sysupdate-dir.d" / Path(rel).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def _gpg(env: dict[str, str], *args: str) -> None:
    subprocess.run(["gpg", "--batch", *args], env=env, check=True, capture_output=True)


def _updates_disk(release: Path, label: str, out: Path) -> Path:
    subprocess.run(["truncate", "-s", "512M", str(out)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(release), "-L", label, str(out)], check=True,
                   capture_output=True)
    return out


def _boot(image: Path, disks: list[Path], log: Path, marker: bytes) -> str:
    from reprobuild.vm import QemuConfig
    from tests.guest_boot import boot_until

    extra = tuple(a for d in disks for a in ("-drive", f"if=virtio,format=raw,readonly=on,file={d}"))
    # snapshot=False: the update writes into this copy; -no-reboot makes the guest's reboot end qemu.
    config = QemuConfig(image=image, memory="2G", snapshot=False, serial_log=log, extra_args=extra)
    boot = boot_until(config, marker, timeout=1200, stop_on=())
    return boot.tail(len(boot.console))  # a retry's note (if any) first, then the whole console


def _line(console: str, tag: str) -> str:
    lines = [line for line in console.splitlines() if f"AB-{tag} " in line and line.rstrip().endswith("END")]
    assert lines, f"no AB-{tag} line; console tail:\n{console[-6000:]}"
    return lines[-1]


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, live_keys: Keys, warm_store: Path) -> dict[str, Path]:
    require_tools("qemu-system-x86_64", "mkfs.ext4", "gpg", "mdir")
    tmp = tmp_path_factory.mktemp("ab")
    home = tmp / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        for who in ("Release <release@example.invalid>", "Other <other@example.invalid>"):
            _gpg(env, "--passphrase", "", "--quick-gen-key", who, "ed25519", "sign", "never")
        _gpg(env, "--export", "--output", str(tmp / "release.gpg"), "release@example.invalid")
        v1 = _definition(tmp / "v1", live_keys, "1", tmp / "release.gpg")
        v2 = _definition(tmp / "v2", live_keys, "2", tmp / "release.gpg")
        for d in (v1, v2):
            run_reprobuild("lock", "-C", str(d), "--store", str(warm_store), "-q", timeout=900)
        _add_directory_source_transfers(v1)
        store = {**os.environ, "REPROBUILD_STORE": str(warm_store)}
        run_reprobuild("build", "-C", str(v1), "--locked", "-o", str(tmp / "v1-out"), "-q", env=store, timeout=1500)
        # xz-compressed: systemd-pull in the guest decompresses what it downloads (sysupdate.d(5)).
        run_reprobuild("release", "-C", str(v2), "-o", str(tmp / "rel"), "--build-output", str(tmp / "v2-out"),
                       "--sign-key", "release@example.invalid", "--compress", "xz", "-q", env={**store, **env},
                       timeout=1500)
        assert sorted(p.suffix for p in (tmp / "rel").iterdir()) == ["", ".gpg", ".xz", ".xz", ".xz", ".xz"]
        # The same release, its SHA256SUMS signed by a key the image does not trust.
        shutil.copytree(tmp / "rel", tmp / "rel-bad")
        (tmp / "rel-bad/SHA256SUMS.gpg").unlink()
        _gpg(env, "--local-user", "other@example.invalid", "--detach-sign", "--output",
             str(tmp / "rel-bad/SHA256SUMS.gpg"), str(tmp / "rel-bad/SHA256SUMS"))
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True)
    return {"tmp": tmp, "v1": tmp / "v1-out/image.raw", "rel": tmp / "rel", "rel-bad": tmp / "rel-bad"}


def _esp_files(image: Path) -> list[str]:
    disk = read_gpt_path(image)
    esp = disk.partitions[0]
    r = subprocess.run(["mdir", "-b", "-i", f"{image}@@{esp.offset(disk.sector_size)}", "::/EFI/Linux"],
                       capture_output=True, text=True, check=True)
    return sorted(Path(line).name for line in r.stdout.split())


@pytest.fixture(scope="module")
def first_boot(versions: dict[str, Path]) -> tuple[Path, str]:
    """Version 1's disk after its first boot (both releases tried, the good one installed), and
    that boot's console."""
    tmp = versions["tmp"]
    disk = tmp / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(versions["v1"]), str(disk)], check=True)
    releases = [_updates_disk(versions["rel-bad"], "untrusted", tmp / "untrusted.img"),
                _updates_disk(versions["rel"], "updates", tmp / "updates.img")]
    return disk, _boot(disk, releases, tmp / "boot1.log", b"AB-NEVER-SEEN")  # runs until the guest reboots


@pytest.mark.timeout(3600)
def test_sysupdate_refuses_a_release_signed_by_another_key(first_boot: tuple[Path, str]) -> None:
    _, console = first_boot
    assert "version=1 " in _line(console, "RUNNING")
    refused = _line(console, "REFUSED")
    assert "rc=0 " not in refused, refused
    bad_log = "\n".join(line for line in console.splitlines() if "AB-BADLOG " in line)
    assert "Signature verification failed" in bad_log, console[-6000:]
    # Nothing was written: the GPT's names and UUIDs are what they were, three slots still empty,
    # and the ESP holds version 1 alone.
    before = refused.split("names-before=")[1].split("names-after=")[0].split()
    after = refused.split("names-after=")[1].split("efi=")[0].split()
    assert [entry.split("/")[0] for entry in before] == ["esp", *["abtest_1"] * 3, *["_empty"] * 3], refused
    assert all(len(entry.split("/")[1]) == 36 for entry in before), refused  # every UUID was read
    assert after == before, refused
    assert refused.split("efi=")[1].split() == ["abtest_1.efi", "END"], refused


@pytest.fixture(scope="module")
def second_boot(first_boot: tuple[Path, str]) -> str:
    """The console of the updated disk's next boot (version 2 reports, then powers off)."""
    disk, _ = first_boot
    return _boot(disk, [], disk.with_name("boot2.log"), b"AB-NEVER-SEEN")


@pytest.mark.timeout(3600)
def test_sysupdate_updates_v1_to_v2_in_the_guest_and_v2_boots_from_the_b_slot(
        first_boot: tuple[Path, str], second_boot: str) -> None:  # fmt: skip
    disk, first = first_boot
    running = _line(first, "RUNNING")
    # The verity device's data and hash partitions: slot A.
    assert "version=1 root=/dev/mapper/root slaves=vda2 vda3 efi=" in running, running
    # The release as a directory source: reprobuild's regular-file transfers find version 2.
    assert "AB-DIRCHECK rc=0 new=2 END" in first, _line(first, "DIRCHECK") + first[-6000:]
    assert "AB-UPDATE rc=0 END" in first, first[-6000:]
    log = "\n".join(line for line in first.splitlines() if "AB-LOG " in line)
    assert "Successfully installed update '2'" in log, first[-6000:]
    assert "abtest_2+3-0.efi" in log, first[-6000:]  # installed with 3 tries (boot counting)
    assert ".root.raw.xz" in log, first[-6000:]  # the compressed file is what systemd-pull fetched
    labels = [p.name for p in read_gpt_path(disk).partitions]
    assert labels == ["esp", "abtest_1", "abtest_1", "abtest_1", "abtest_2", "abtest_2", "abtest_2"], labels
    running = _line(second_boot, "RUNNING")
    assert "version=2 root=/dev/mapper/root slaves=vda5 vda6 efi=" in running, running  # slot B
    assert "efi=abtest_1.efi abtest_2.efi " in running and "note=note of version 2 " in running, running
    # systemd-boot took a try off abtest_2+3-0.efi, and systemd-bless-boot marked the boot good (renamed it).
    assert "bless=good " in running, running
    assert _esp_files(disk) == ["abtest_1.efi", "abtest_2.efi"]


@pytest.mark.timeout(3600)
def test_a_version_out_of_tries_falls_back_to_the_previous_one(first_boot: tuple[Path, str], second_boot: str) -> None:
    disk, _ = first_boot
    assert "version=2 " in _line(second_boot, "RUNNING")
    fallback = disk.with_name("fallback.raw")
    subprocess.run(["cp", "--sparse=always", str(disk), str(fallback)], check=True)
    # What three failed boots of version 2 leave: no tries left, three done.
    gpt = read_gpt_path(fallback)
    esp = f"{fallback}@@{gpt.partitions[0].offset(gpt.sector_size)}"
    subprocess.run(["mren", "-i", esp, "::/EFI/Linux/abtest_2.efi", "::/EFI/Linux/abtest_2+0-3.efi"], check=True,
                   capture_output=True)
    assert _esp_files(fallback) == ["abtest_1.efi", "abtest_2+0-3.efi"]
    console = _boot(fallback, [], fallback.with_name("boot3.log"), b"AB-NEVER-SEEN")
    running = _line(console, "RUNNING")
    assert "version=1 root=/dev/mapper/root slaves=vda2 vda3 " in running, running  # slot A again
    assert "efi=abtest_1.efi abtest_2+0-3.efi " in running and "note=note of version 1 " in running, running
    # Nothing in version 1's boot touched the exhausted entry or the slots.
    assert _esp_files(fallback) == ["abtest_1.efi", "abtest_2+0-3.efi"]
    labels = [p.name for p in read_gpt_path(fallback).partitions]
    assert labels == ["esp", "abtest_1", "abtest_1", "abtest_1", "abtest_2", "abtest_2", "abtest_2"], labels
